"""The dead-letter queue: notifications that ended `failed`, and their jobs in RQ's failed registries.

PostgreSQL is the record (RQ's registry lives in Redis and expires); requeueing always asks the
database first, so a notification that was sent is never sent again, even when RQ filed its job as
failed (RQ can move a job that succeeded into the failed registry as abandoned)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from peewee import Tuple
from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from notifier import consent, cursors, erasure, queues, store
from notifier.config import Settings
from notifier.errors import Conflict, NotFound
from notifier.models import ApiKey, Event, Notification, Status

logger = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    id: str
    to: str
    template: str | None
    priority: str
    attempts: int
    reason: str | None
    smtp_code: int | None
    smtp_reply: str | None
    failed_at: datetime
    in_failed_registry: bool | None  # None: Redis did not answer, so nobody can say


def _failed_registry_ids(redis: Redis, rows: list[Notification]) -> set[str] | None:
    """The job ids of these notifications that RQ's failed registries still hold (None when Redis does
    not answer), asked one by one in
    one round trip (a registry holds DEAD_LETTER_TTL_DAYS of failures: reading all of it for each
    page of dead letters grew with every bounce). A notification's job is filed in its priority's
    registry; an entry past its expiry, which RQ drops at its next cleanup, is gone already."""
    job_ids = [queues.job_id_for(row.id) for row in rows]
    try:
        keys = {p: queues.queue_for(p, redis).failed_job_registry.key for p in {row.priority for row in rows}}
        with redis.pipeline(transaction=False) as pipe:
            for row, job_id in zip(rows, job_ids, strict=True):
                pipe.zscore(keys[row.priority], job_id)
            expiries = pipe.execute()
    except RedisError as exc:
        # The database is the record; without Redis the list is still right, only this flag is unknown.
        logger.warning("RQ's failed registries are unreadable: %s", type(exc).__name__)
        return None
    now = time.time()
    # RQ scores an entry with its expiry time, or with a negative TTL for one that never expires.
    return {job_id for job_id, expiry in zip(job_ids, expiries, strict=True)
            if expiry is not None and (expiry < 0 or expiry > now)}


def _failures(rows: list[Notification]) -> dict[int, Event]:
    """The last move to `failed` in the history of each of these notifications, by seq: a query for up
    to 500 of them (one per row made a page of 100 dead letters 100 round trips, 0.3 s, and `dlq list --limit 1000`
    4 s). A notification has one such line per time it failed: few."""
    seqs, last = [row.seq for row in rows], {}
    for start in range(0, len(seqs), _FAILURES_AT_ONCE):
        lines = (Event.select()
                 .where(Event.notification.in_(seqs[start:start + _FAILURES_AT_ONCE])
                        & (Event.to_status == Status.FAILED.value) & (Event.kind == "status"))
                 .order_by(Event.at, Event.id))
        last.update((line.notification_id, line) for line in lines)  # the last one of each wins
    return last


_FAILURES_AT_ONCE = 500  # seqs per query: well under SQLite's limit on parameters


def _entry(row: Notification, registry: set[str] | None, last: Event | None) -> DeadLetter:
    return DeadLetter(
        id=row.id,
        to=row.to,
        template=row.template,
        priority=row.priority,
        attempts=row.attempts,
        reason=last.reason if last else row.last_error,
        smtp_code=last.smtp_code if last else None,
        smtp_reply=last.smtp_reply if last else None,
        failed_at=row.updated_at,
        in_failed_registry=None if registry is None else queues.job_id_for(row.id) in registry,
    )


def _is_dead_letter():
    # A failed digest's items are failed too, but the digest is their dead letter: requeueing it
    # takes them back into it, and each alone is refused (see requeue). Listed and counted once. A
    # tombstone of an erased user (notifier.erasure) is no dead letter: it is never sent again.
    return ((Notification.status == Status.FAILED.value) & Notification.digest_id.is_null()
            & Notification.erased_at.is_null())


def count() -> int:
    """Dead letters in the database, as `dlq list` shows them (the notifier_dead_letters metric)."""
    return Notification.select().where(_is_dead_letter()).count()


def _dead(api_key: ApiKey | None, limit: int, after: tuple[datetime, int] | None = None) -> list[Notification]:
    query = Notification.select().where(_is_dead_letter())
    if api_key is not None:
        query = query.where(Notification.api_key == api_key.id)
    if after is not None:
        # The keyset of the order below: pages stay whole while new failures arrive.
        query = query.where(Tuple(Notification.updated_at, Notification.seq) < Tuple(*after))
    return list(query.order_by(Notification.updated_at.desc(), Notification.seq.desc()).limit(limit))


def list_dead(redis: Redis, api_key: ApiKey | None = None, limit: int = 100,
              after: tuple[datetime, int] | None = None) -> tuple[list[DeadLetter], str | None]:
    """A page of failed notifications, most recently failed first (only api_key's when given), and
    the cursor of the next page (None: this is the last); after: what decode_cursor read of one."""
    rows, next_cursor = cursors.page(_dead(api_key, limit + 1, after), limit,
                                     lambda row: (row.updated_at, row.seq), padded=True)
    registry, failures = _failed_registry_ids(redis, rows), _failures(rows)
    return [_entry(row, registry, failures.get(row.seq)) for row in rows], next_cursor


def decode_cursor(cursor: str) -> tuple[datetime, int] | None:
    """The (failed at, seq) a dead-letter cursor points at, or None when the cursor is not one of ours."""
    return cursors.decode(cursor, datetime, int, padded=True)


def show(redis: Redis, notification_id: str, api_key: ApiKey | None = None) -> tuple[DeadLetter, Job | None]:
    """One dead letter and its RQ job, if Redis still has it."""
    row = _owned(notification_id, api_key)
    if row.status != Status.FAILED:
        raise NotFound(f"notification {notification_id} is {row.status}, not a dead letter")
    if row.digest_id is not None:
        # Failed with its digest, which is the dead letter (listed, requeued) it belongs to.
        raise NotFound(f"notification {notification_id} failed with digest {row.digest_id}, which is the dead "
                       "letter: show or requeue the digest")
    try:
        job = Job.fetch(queues.job_id_for(row.id), connection=redis)
    except NoSuchJobError:
        job = None
    except RedisError as exc:
        # The database is the record, as in list_dead(): without Redis only the job is missing.
        logger.warning("RQ's job of notification %s is unreadable: %s", row.id, type(exc).__name__)
        job = None
    return _entry(row, _failed_registry_ids(redis, [row]), _failures([row]).get(row.seq)), job


def _owned(notification_id: str, api_key: ApiKey | None) -> Notification:
    row = store.get_for_key(api_key, notification_id) if api_key is not None else store.get(notification_id)
    if row is None:
        raise NotFound("no such notification")
    return row


def requeue(redis: Redis, settings: Settings, notification_id: str, api_key: ApiKey | None = None) -> Notification:
    """Give a failed notification a fresh set of attempts; refuse anything that is not failed, and an
    item of a digest (its digest is what is requeued, taking its failed items back into it)."""
    with Notification._meta.database.atomic():
        # In turn with an erasure of its user (erasure.lock_owner), and decided on the row as it is then.
        erasure.lock_owner(_owned(notification_id, api_key))
        row = _requeue(notification_id, api_key)
    _drop_from_registries(redis, [row.id])
    notification = store.get(row.id)
    queues.dispatch(redis, settings, notification)
    return notification


def _requeue(notification_id: str, api_key: ApiKey | None) -> Notification:
    """requeue()'s checks and move, under the erasure lock of the row's user."""
    row = _owned(notification_id, api_key)
    if row.erased_at is not None:
        # A tombstone (notifier.erasure): no address to send to, and its user asked that nothing more be.
        raise Conflict(f"notification {row.id} was erased at its user's request; it is never sent again",
                       {"status": row.status, "erased_at": row.erased_at.isoformat() + "Z"}, code="erased")
    if row.digest_id is not None:
        # Sent alone as well as in its digest, it would go out twice.
        raise Conflict(f"notification {row.id} went into digest {row.digest_id}; requeue the digest instead",
                       {"status": row.status, "digest_id": row.digest_id}, code="not_requeueable")
    suppressed = consent.suppression(row.api_key_id, row.to) if row.status == Status.FAILED else None
    if suppressed is not None:
        # Its mail server said the address does not exist (the bounce that failed it, often): requeued,
        # it would only end `suppressed`, after a 202 that said it goes again.
        raise Conflict(f"notification {row.id} is to an address on the suppression list ({suppressed.reason}); "
                       "remove the address from it first (DELETE /api/suppressions/<email>)",
                       {"status": row.status, "suppressed_at": suppressed.created_at.isoformat() + "Z"},
                       code="suppressed")
    if not store.transition(row.id, Status.QUEUED, reason="requeued from the dead-letter queue",
                            sources=(Status.FAILED,), attempts=0, last_error=None, callback_status=None,
                            callback_attempts=0):
        current = store.get(row.id)
        raise Conflict(
            f"notification {row.id} is {current.status}; only failed notifications can be requeued"
            + (" (it was sent, and is never sent twice)" if current.status == Status.SENT else ""),
            {"status": current.status},
            code="not_requeueable",
        )
    return row


def requeue_all(redis: Redis, settings: Settings, api_key: ApiKey | None = None) -> Counter[str]:
    """Requeue every dead letter; returns how many were `requeued`, and how many were left by the code
    of the refusal (`suppressed`: the address is on the suppression list; `not_requeueable`: no
    longer failed, requeued or sent meanwhile)."""
    outcomes: Counter[str] = Counter()
    for row in _dead(api_key, limit=100_000):
        try:
            requeue(redis, settings, row.id)
        except Conflict as exc:
            outcomes[exc.code] += 1
        else:
            outcomes["requeued"] += 1
    return outcomes


def _drop_from_registries(redis: Redis, notification_ids: list[str]) -> None:
    try:
        queues.unfile_failed(redis, [queues.job_id_for(i) for i in notification_ids])
    except RedisError as exc:
        # The database has it queued already, and the reconciler queues it once Redis answers; its old
        # entry then only lingers in rq-dashboard's Failed list until it expires.
        logger.warning("requeued notifications left in RQ's failed registries: %s", type(exc).__name__)


def purge(redis: Redis) -> int:
    """Empty RQ's failed registries. The notifications stay `failed`, with their history."""
    count = 0
    for queue in queues.all_queues(redis):
        registry = queue.failed_job_registry
        for job_id in registry.get_job_ids():
            try:
                registry.remove(job_id, delete_job=True)
            except NoSuchJobError:  # the job's data expired or was evicted; its entry goes all the same
                registry.remove(job_id)
            count += 1
    return count
