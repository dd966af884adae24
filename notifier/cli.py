"""Operator commands: API keys and the schema."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from peewee import IntegrityError

from notifier import keys
from notifier.db import UNAVAILABLE_ERRORS, database
from notifier.runtime import load_settings, open_database


@click.group()
def main() -> None:
    """notifier's command line."""


@main.group(name="keys")
def keys_group() -> None:
    """Manage the API keys of calling services."""


def _unavailable(exc: Exception) -> click.ClickException:
    """A database that does not answer, in one line (exit 1). A one-off command does not wait for it as
    the processes do, and said so with two chained tracebacks; libpq's first line names the host, port
    and database, never the password."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return click.ClickException(f"the database is not available ({type(exc).__name__}: {reason})")


def _open():
    try:
        open_database(load_settings())
    except UNAVAILABLE_ERRORS as exc:
        raise _unavailable(exc) from exc
    return database.connection_context()


def _out_of_bounds(rate: str) -> bool:
    from notifier.ratelimit import check_rate

    try:
        check_rate(rate)
    except ValueError:
        return True
    return False


def _check_rate(ctx, param, value):
    if value is not None:
        value = value.strip()  # as RATE_LIMIT is: a line break kept made `keys list` two lines for the key
    if value is not None and _out_of_bounds(value):
        raise click.BadParameter("one rate of 1 to 10^12 per a period of at most 1,000 years, at most 40 "
                                 "characters, like 100/second or 6000/minute")
    return value


def _check_name(ctx, param, value):
    from notifier.models import ApiKey

    longest = ApiKey.name.max_length
    if not 1 <= len(value) <= longest:  # PostgreSQL would refuse it with a traceback
        raise click.BadParameter(f"1 to {longest} characters")
    # `keys list` writes one tab-separated line per key: a tab or line break in a name made it another
    # column or another key, and a blank name could only be named again by quoting its spaces exactly.
    if not value.strip() or any(not c.isprintable() for c in value):
        raise click.BadParameter("printable characters, not only spaces (no tab, line break or other control)")
    if value != value.strip():  # ' svc' and 'svc ' look the same in `keys list` as 'svc'
        raise click.BadParameter("no space at the start or the end")
    return value


def _like(name: str) -> list[str]:
    """Names of keys that differ from name only in case or in spaces around it."""
    from peewee import fn

    from notifier.models import ApiKey

    wanted = name.strip().lower()
    return [n for (n,) in ApiKey.select(ApiKey.name).where(fn.LOWER(fn.TRIM(ApiKey.name)) == wanted).tuples()
            if n != name]


def _no_key(name: str, what: str = "active key") -> click.ClickException:
    """No {what} named name; an operator who typed another case or spaces is told the name that is."""
    similar = _like(name)
    hint = f" (there is {', '.join(repr(n) for n in similar)})" if similar else ""
    return click.ClickException(f"no {what} named {name!r}{hint}")


@keys_group.command("create")
@click.argument("name", callback=_check_name)
@click.option("--rate", callback=_check_rate, help="this key's request rate, e.g. 100/second (default RATE_LIMIT)")
def keys_create(name: str, rate: str | None) -> None:
    """Create a key; its plaintext is the last line printed and is never shown again."""
    from notifier.models import ApiKey

    with _open():
        taken = ApiKey.get_or_none(ApiKey.name == name)
        if taken is not None:
            # Names are unique for good: a revoked key keeps its name, as the notifications it sent do.
            raise click.ClickException(f"a key named {name!r} already exists"
                                       + (", revoked; choose another name" if taken.revoked_at else ""))
        similar = _like(name)
        if similar:
            # Two keys told apart only by case: a revoke of the one would be typed for the other.
            raise click.ClickException(f"a key named {similar[0]!r} exists; names that differ only in case "
                                       "are refused")
        try:
            key, plaintext = keys.create(name, rate_limit=rate)
        except IntegrityError:
            raise click.ClickException(f"a key named {name!r} already exists") from None
    click.echo(f"created API key {key.name!r} (prefix {key.prefix})")
    click.echo(f"callback signing secret (verifies Notifier-Signature; `keys secret {name}` shows it again):")
    click.echo(f"  {key.callback_secret}")
    click.echo("API key (store it now; it is not shown again):")
    click.echo(plaintext)


@keys_group.command("list")
def keys_list() -> None:
    """List keys: name, prefix, created, revoked."""
    with _open():
        rows = keys.all_keys()
    for key in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M} UTC" if key.revoked_at else "active"
        if key.old_prefix and not key.revoked_at:
            state += f" (rotating: previous secret {key.old_prefix} still works)"
        if key.old_callback_secret:
            state += " (callback secret rotating: the previous one signs too)"
        rate = key.rate_limit or "default rate"
        if key.rate_limit and _out_of_bounds(key.rate_limit):
            # Stored before rates were bounded: the API holds the key to RATE_LIMIT instead (and logs so).
            rate = (f"{key.rate_limit[:40]!r} (out of bounds: RATE_LIMIT applies instead; "
                    f"`keys rate {key.name} RATE` changes it)")
        click.echo(f"{key.name}\t{key.prefix}\tcreated {key.created_at:%Y-%m-%d %H:%M} UTC\t{rate}\t{state}")


@keys_group.command("rate")
@click.argument("name")
@click.argument("rate", required=False, callback=_check_rate)
@click.option("--default", "default", is_flag=True, help="take RATE_LIMIT again instead of a rate of its own")
def keys_rate(name: str, rate: str | None, default: bool) -> None:
    """Change a key's request rate (like 100/second), or give it back RATE_LIMIT's with --default."""
    if (rate is None) != default:
        raise click.UsageError("give a rate (like 100/second) or --default")
    with _open():
        if not keys.set_rate(name, rate):
            raise _no_key(name)
    click.echo(f"{name!r} now takes {rate or 'the default rate (RATE_LIMIT)'}")


@keys_group.command("rotate")
@click.argument("name")
@click.option("--force", is_flag=True, help="rotate even while the last rotation's previous secret still works, "
                                            "which then stops working at once")
def keys_rotate(name: str, force: bool) -> None:
    """Give a key a new secret; the old one keeps working until `keys revoke NAME --old`."""
    with _open():
        try:
            plaintext = keys.rotate(name, force=force)
        except keys.RotationUnderway as underway:
            # A key holds one previous secret: rotating again would cut off callers still on it.
            raise click.ClickException(
                f"{name!r} is being rotated: its previous secret ({keys.KEY_PREFIX}_{underway.old_prefix}_...) "
                f"still works. End that first (`keys revoke {name} --old`), or pass --force to stop it now") from None
        if plaintext is None:
            raise _no_key(name)
    click.echo(f"rotated {name!r}; the previous secret works until `keys revoke {name} --old`.")
    click.echo("new API key (store it now; it is not shown again):")
    click.echo(plaintext)


@keys_group.command("revoke")
@click.argument("name")
@click.option("--old", "old_only", is_flag=True, help="revoke only the secret a rotation replaced")
def keys_revoke(name: str, old_only: bool) -> None:
    """Revoke a key (every request with it gets 401 as soon as the API processes hear of it: milliseconds)."""
    with _open():
        if not keys.revoke(name, old_only=old_only):
            raise _no_key(name, "active key being rotated" if old_only else "active key")
    click.echo(f"revoked {'the previous secret of ' if old_only else ''}{name!r}")


@keys_group.command("secret")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="a new callback secret; both sign each callback until --end-rotation")
@click.option("--end-rotation", is_flag=True, help="stop signing with the callback secret a rotation replaced")
def keys_secret(name: str, rotate: bool, end_rotation: bool) -> None:
    """Show the callback signing secret of a key, or rotate it."""
    from notifier.models import ApiKey

    if rotate and end_rotation:
        raise click.UsageError("--rotate or --end-rotation, not both")
    with _open():
        if rotate:
            before = ApiKey.get_or_none((ApiKey.name == name) & ApiKey.revoked_at.is_null())
            secret = keys.rotate_callback_secret(name)
            if secret is None:
                raise _no_key(name)
            if before.old_callback_secret:
                click.echo(f"a rotation was under way: the secret it replaced ({_hint(before.old_callback_secret)}) "
                           "no longer signs", err=True)
            # On stderr: stdout is the new secret alone, for a script that reads it ($(keys secret --rotate)).
            click.echo(f"rotated the callback secret of {name!r}: callbacks are signed with the new one and the "
                       f"previous one (two v1) until `keys secret {name} --end-rotation`.", err=True)
            click.echo(secret)
            return
        if end_rotation:
            if not keys.end_callback_rotation(name):
                raise _no_key(name, "key whose callback secret is being rotated")
            click.echo(f"callbacks of {name!r} are signed with its current callback secret only")
            return
        key = ApiKey.get_or_none(ApiKey.name == name)
        if key is None:
            raise _no_key(name, "key")
    if key.old_callback_secret:  # a revoked key's callbacks (its queued mail's, redeliveries) are still signed
        # On stderr: stdout stays the one secret to verify with, for a script that reads it. The previous
        # secret only by its end: the receiver already holds it, and output is often captured.
        click.echo(f"rotating: the previous secret ({_hint(key.old_callback_secret)}) also signs until "
                   f"`keys secret {name} --end-rotation`", err=True)
    click.echo(key.callback_secret)


def _hint(secret: str) -> str:
    return f"whsec_...{secret[-4:]}"


@main.group(name="dlq")
def dlq_group() -> None:
    """The dead-letter queue: notifications that failed for good."""


def _where(redis) -> str:
    where = redis.connection_pool.connection_kwargs
    return f"Redis at {where.get('host')}:{where.get('port')}/{where.get('db')}"


def _redis(required: bool = False):
    """The configured Redis, asked once that it answers: a command pointed at another one (make run's is
    on port 6390, the default REDIS_URL on 6379) looked as if it had worked. A command that only
    works on Redis (required) stops there; the others say so and go on, as the API does."""
    from redis.exceptions import RedisError, ResponseError

    from notifier.queues import connect_redis

    settings = load_settings()
    redis = connect_redis(settings.redis_url)
    try:
        redis.ping()
    except RedisError as exc:
        # A ResponseError is Redis's own answer ("DB index is out of range"), never a password.
        answer = f"refused: {exc}" if type(exc) is ResponseError else f"does not answer ({type(exc).__name__})"
        message = f"{_where(redis)} {answer}; is REDIS_URL the one the workers use?"
        if required:
            raise click.ClickException(message) from None
        click.echo(f"warning: {message}", err=True)
        # Not asked again: a Redis that takes connections and answers nothing (stopped, a network path
        # that holds packets) cost its 10 s timeout on every later call, one or two per dead letter
        # requeued or callback redelivered: a thousand took hours. What the command leaves undone in
        # Redis the reconciler does once it answers, as it would have done after those timeouts.
        redis = _not_asked()
    return redis, settings


def _not_asked():
    """A Redis client for one that did not answer the command's first ping: every call fails at once,
    as a RedisError, which the commands already take for Redis being away."""
    from redis import ConnectionPool, Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    class NotAsked(ConnectionPool):
        def get_connection(self, *args, **kwargs):
            raise RedisConnectionError("Redis did not answer this command's first ping; not asked again")

    return Redis(connection_pool=NotAsked())


@dlq_group.command("list")
# At least 1: 0 listed nothing and said "there are more", and a negative one crashed paging the rows.
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
def dlq_list(limit: int) -> None:
    """Failed notifications, newest first."""
    from notifier import deadletters

    redis, _ = _redis()
    with _open():
        entries, more = deadletters.list_dead(redis, limit=limit)
    for e in entries:
        where = {True: "in RQ failed registry", False: "not in RQ", None: "RQ unknown (Redis does not answer)"}[
            e.in_failed_registry]
        click.echo(f"{e.id}	{e.failed_at:%Y-%m-%d %H:%M:%S} UTC	attempts={e.attempts}	{where}	{e.reason}")
    click.echo(f"the {len(entries)} most recent dead letters; there are more (--limit)" if more
               else f"{len(entries)} dead letter(s)")


def _notification_id(ctx, param, value: str | None) -> str | None:
    # As the API takes one: our ids are lower-case UUIDs, the same id in capitals.
    return value.lower() if value else value


@dlq_group.command("show")
@click.argument("notification_id", callback=_notification_id)
def dlq_show(notification_id: str) -> None:
    """One dead letter: why it failed, the SMTP reply, attempts, and its RQ job."""
    from notifier import consent, deadletters, store
    from notifier.errors import ApiError

    redis, _ = _redis()
    with _open():
        try:
            entry, job = deadletters.show(redis, notification_id)
        except ApiError as exc:
            raise click.ClickException(exc.message) from None
        suppressed = consent.suppression(store.get(entry.id).api_key_id, entry.to)
    for field, value in vars(entry).items():
        if field == "in_failed_registry" and value is None:
            value = "unknown (Redis does not answer)"
        elif isinstance(value, datetime):
            value = f"{value:%Y-%m-%d %H:%M:%S} UTC"  # stored in UTC, whatever TZ the shell has
        click.echo(f"{field}: {'-' if value is None else value}")
    if suppressed is not None:
        since = f"{suppressed.created_at:%Y-%m-%d %H:%M:%S} UTC"
        click.echo(f"suppressed: the address is on the suppression list since {since}; `dlq requeue` is refused "
                   "until it is removed (DELETE /api/suppressions/<email>)")
    if job is not None:
        result = job.latest_result()
        status = job.get_status()
        click.echo(f"rq job: {job.id} ({getattr(status, 'value', status)})")
        if result is not None and result.exc_string:
            click.echo("rq exception (last line): " + result.exc_string.strip().splitlines()[-1])


@dlq_group.command("requeue")
@click.argument("notification_id", required=False, callback=_notification_id)
@click.option("--all", "everything", is_flag=True, help="requeue every dead letter")
def dlq_requeue(notification_id: str | None, everything: bool) -> None:
    """Send a failed notification (or all of them) again; a sent one is refused."""
    from notifier import deadletters
    from notifier.errors import ApiError

    if bool(notification_id) == everything:
        raise click.UsageError("a notification id or --all, not both" if everything
                               else "give a notification id or --all")
    redis, settings = _redis()
    with _open():
        if everything:
            outcomes = deadletters.requeue_all(redis, settings)
            # The ones left are said too: "requeued 0" alone read as if there were none to requeue.
            click.echo(f"requeued {outcomes['requeued']} notification(s)"
                       + (f"; left {outcomes['suppressed']} to an address on the suppression list (remove it "
                          "from the list first: DELETE /api/suppressions/<email>)" if outcomes["suppressed"] else ""))
            return
        try:
            deadletters.requeue(redis, settings, notification_id)
        except ApiError as exc:
            raise click.ClickException(exc.message) from None
    click.echo(f"requeued {notification_id}")


@dlq_group.command("purge")
@click.confirmation_option(prompt="Remove every job from RQ's failed registries?")
def dlq_purge() -> None:
    """Empty RQ's failed registries; the notifications keep their failed status and history."""
    from notifier import deadletters

    redis, _ = _redis(required=True)
    click.echo(f"purged {deadletters.purge(redis)} job(s)")


@main.group(name="callbacks")
def callbacks_group() -> None:
    """Status callbacks."""


@callbacks_group.command("redeliver")
@click.argument("notification_id", required=False, callback=_notification_id)
@click.option("--gave-up", "all_gave_up", is_flag=True, help="every callback that gave up")
@click.option("--key", "key_name", help="with --gave-up: only those of this API key")
@click.option("--since", help="with --gave-up: only notifications final since then (ISO 8601 with offset)")
def callbacks_redeliver(notification_id: str | None, all_gave_up: bool, key_name: str | None,
                        since: str | None) -> None:
    """Post the status event of a notification (or of every one whose callback gave up) again."""
    from notifier import redelivery
    from notifier.errors import ApiError
    from notifier.models import ApiKey

    if bool(notification_id) == all_gave_up:
        raise click.UsageError("a notification id or --gave-up, not both" if all_gave_up
                               else "give a notification id or --gave-up")
    if not all_gave_up and (key_name or since):
        raise click.UsageError("--key and --since go with --gave-up")
    after = _utc(since) if since else None
    redis, settings = _redis()
    with _open():
        if not all_gave_up:
            try:
                redelivery.redeliver(redis, settings, notification_id, by="an operator")
            except ApiError as exc:
                raise click.ClickException(exc.message) from None
            click.echo(f"the callback of {notification_id} goes again{_when_redis_answers(redis)}")
            return
        key = None
        if key_name is not None:
            key = ApiKey.get_or_none(ApiKey.name == key_name)
            if key is None:
                raise _no_key(key_name, "key")
        count = 0
        for nid in redelivery.gave_up(key, after):
            try:
                redelivery.redeliver(redis, settings, nid, by="an operator")
                count += 1
            except ApiError as exc:  # requeued meanwhile: it owes its own event now
                click.echo(f"{nid}: {exc.message}", err=True)
    click.echo(f"{count} callback(s) go again{_when_redis_answers(redis) if count else ''}")


def _when_redis_answers(redis) -> str:
    """What to add to "goes again" when the callback is pending in the database only: it said "not
    queued" and "goes again" side by side, as if one of them were wrong."""
    from redis.exceptions import RedisError

    try:
        redis.ping()
    except RedisError:
        return ": pending, Redis not answering; the reconciler queues it once Redis answers"
    return ""


def _utc(text: str):
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter("an ISO 8601 time with offset, like 2026-12-02T10:00:00+00:00",
                                 param_hint="--since") from None
    if when.tzinfo is None:
        raise click.BadParameter("give the offset (Z or +00:00)", param_hint="--since")
    try:
        return when.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # the year 1 or 9999, moved past its end by the offset
        raise click.BadParameter("a time within the years 1 to 9999 in UTC", param_hint="--since") from None


@main.command("reconcile")
def reconcile_now() -> None:
    """Run one reconciler pass now (scheduler.py runs it every RECONCILE_INTERVAL seconds)."""
    from rq import Worker

    from notifier.reconciler import reconcile

    redis, settings = _redis(required=True)
    if not Worker.count(connection=redis):
        # It queues work on this Redis: one no worker reads (another REDIS_URL, a database number
        # off by one) holds it until the right one's reconciler finds the jobs missing and queues them.
        click.echo(f"warning: no RQ worker is registered on {_where(redis)}; is REDIS_URL the one the workers "
                   "use? (going on: the work is queued there)", err=True)
    with _open():
        report = reconcile(settings, redis)
    click.echo(" ".join(f"{k}={v}" for k, v in report.as_dict().items()))


@main.command("purge")
def purge_now() -> None:
    """Delete, now and to the end, the notifications RETENTION_DAYS no longer keeps (scheduler.py has a
    worker do it every ten minutes, 10 s at a time)."""
    from notifier import metrics
    from notifier.retention import purge

    redis, settings = _redis()  # only to count what it deletes, as the periodic purge does
    if settings.retention_days <= 0:
        raise click.ClickException("RETENTION_DAYS is 0: every notification is kept, nothing to delete")
    with _open():
        deleted = purge(settings, seconds=None)
    metrics.purged(redis, deleted)
    days = settings.retention_days
    click.echo(f"deleted {deleted} notification(s) that ended over {days} day{'' if days == 1 else 's'} ago")


@main.group(name="db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema (safe to run any number of times)."""
    from notifier.db import bind
    from notifier.schema import upgrade

    settings = load_settings()
    db = bind(settings.database_url, settings.database_pool_size, settings.database_prepare,
              settings.database_statement_timeout, settings.database_connect_timeout)
    try:
        version = upgrade(db)
    except UNAVAILABLE_ERRORS as exc:
        raise _unavailable(exc) from exc
    click.echo(f"schema at version {version}")


@main.command("dev")
def dev() -> None:
    """Run API, worker, scheduler, Redis and an SMTP capture server together (what `make run` does)."""
    from notifier.dev import main as run_dev

    raise SystemExit(run_dev())
