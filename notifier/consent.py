"""What the recipient agreed to: preferences per category, quiet hours, and the suppression list."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import cache, reduce
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from peewee import IntegrityError

from notifier.config import clock_text, parse_clock
from notifier.db import column_list, database, in_values, instance_of, is_postgres, prepared, select_one
from notifier.models import (
    ApiKey,
    Category,
    DeliveryMode,
    Notification,
    Preference,
    Status,
    Suppression,
    UserProfile,
    utcnow,
)

OPTIONAL_CATEGORIES = tuple(c for c in Category if c is not Category.TRANSACTIONAL)


# Whose preferences apply to mail sent with no user id: this and the address (no user id given to a
# send may start with it: schemas.SENT_USER_ID).
ADDRESS_KEY_PREFIX = "email:"


def user_key_for(user_id: str | None, to: str) -> str:
    """Whose preferences apply: the caller's user id, or the address when there is none."""
    return user_id if user_id else f"{ADDRESS_KEY_PREFIX}{to.lower()}"


def preferences_key(user_id: str) -> str:
    """Whose preferences a path names: the user id as it is, or for "email:<address>" the key that mail
    sent to that address with no user id has (user_key_for lower-cases it)."""
    if user_id.startswith(ADDRESS_KEY_PREFIX):
        return ADDRESS_KEY_PREFIX + user_id.removeprefix(ADDRESS_KEY_PREFIX).lower()
    return user_id


def zone(name: str | None) -> ZoneInfo:
    return ZoneInfo(zone_name(name))


def zone_name(stored: str | None) -> str:
    """The time zone a stored name means, as the API shows it. Names stored before they were checked
    against the zone database's own are read as what they copy (posix/Europe/Berlin as Europe/Berlin;
    right/ ones too, whose clocks are ~27 s off): shown as stored, a GET could not be PUT back. Any
    other that is no place's time (localtime: the host's own) is UTC."""
    name = stored or "UTC"
    if valid_timezone(name):
        return name
    copied = name.partition("/")[2] if name.startswith(("posix/", "right/")) else ""
    return copied if valid_timezone(copied) else "UTC"


# Names the zone database holds that are no place's time: the host's own clock (which differs from
# one host to the next), and placeholders.
_NOT_A_PLACE = frozenset({"localtime", "posixrules", "Factory"})


@cache
def _zone_names() -> frozenset[str]:
    # The database's names, read once: not its right/ copies (clocks that count leap seconds, ~27 s
    # off) nor its posix/ ones, which ZoneInfo would open too.
    return frozenset(available_timezones())


def valid_timezone(name: str) -> bool:
    if name in _NOT_A_PLACE or name not in _zone_names():
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    except OSError:  # a folder of zones ("America"), or a name longer than a file name may be
        return False
    return True


def get_profile(api_key: ApiKey, user_key: str) -> UserProfile | None:
    return UserProfile.get_or_none((UserProfile.api_key == api_key.id) & (UserProfile.user_key == user_key))


def preferences(api_key: ApiKey, user_key: str) -> dict:
    """The whole picture for one user, with defaults filled in."""
    profile = get_profile(api_key, user_key)
    modes = {category.value: DeliveryMode.IMMEDIATE.value for category in OPTIONAL_CATEGORIES}
    for pref in Preference.select().where((Preference.api_key == api_key.id) & (Preference.user_key == user_key)):
        modes[pref.category] = pref.mode
    quiet = None
    if (window := quiet_window(profile)) is not None:
        # As HH:MM: versions before the check stored " 7:00" as given, which a PUT of the GET refused.
        quiet = {"start": clock_text(window[0]), "end": clock_text(window[1])}
    return {
        "user_id": user_key,
        "timezone": zone_name(profile.timezone if profile else None),
        "quiet_hours": quiet,
        "categories": {Category.TRANSACTIONAL.value: DeliveryMode.IMMEDIATE.value, **modes},
    }


def update_preferences(api_key: ApiKey, user_key: str, changes: dict) -> dict:
    """Apply the given parts (timezone, quiet_hours, categories); leave the rest as it was. Returns the
    preferences as they are then, read in the same transaction: a failure reading them undoes the change."""
    db = Preference._meta.database
    with db.atomic():
        if "timezone" in changes or "quiet_hours" in changes:
            profile = {"updated_at": utcnow()}
            if "timezone" in changes:
                profile["timezone"] = changes["timezone"]
            if "quiet_hours" in changes:
                quiet = changes["quiet_hours"] or {}
                profile["quiet_start"], profile["quiet_end"] = quiet.get("start"), quiet.get("end")
            _upsert(UserProfile, {"api_key": api_key.id, "user_key": user_key}, profile)
        # Rows locked in one order whatever the body's: two requests listing the same categories in
        # other orders would each hold a row the other waits for, and PostgreSQL kills one.
        for category, mode in sorted((changes.get("categories") or {}).items()):
            set_mode(api_key, user_key, category, mode)
        return preferences(api_key, user_key)


def set_mode(api_key: ApiKey, user_key: str, category: str, mode: str) -> None:
    """Record how the user wants one category (an upsert that two requests may race on safely)."""
    _upsert(Preference, {"api_key": api_key.id, "user_key": user_key, "category": category},
            {"mode": mode, "updated_at": utcnow()})


def _upsert(model, key: dict, values: dict) -> None:
    """Set values on the row of model that key names (its unique columns), making the row if there is
    none: when another request makes it first, the unique index refuses ours and we update theirs."""
    where = reduce(operator.and_, (getattr(model, name) == value for name, value in key.items()))
    if model.update(**values).where(where).execute():
        return
    try:
        with model._meta.database.atomic():  # a savepoint: a refused insert leaves the caller's transaction usable
            model.create(**key, **values)
    except IntegrityError:
        if not model.update(**values).where(where).execute():
            raise  # not a row made meanwhile: some other constraint refused it


def mode_for(api_key_id: int, user_key: str, category: str) -> DeliveryMode:
    if category == Category.TRANSACTIONAL:
        return DeliveryMode.IMMEDIATE
    pref = select_one(Preference, '"api_key_id" = {} AND "user_key" = {} AND "category" = {}',
                      api_key_id, user_key, category)
    return DeliveryMode(pref.mode) if pref else DeliveryMode.IMMEDIATE


def suppression(api_key_id: int, email: str) -> Suppression | None:
    return select_one(Suppression, '"api_key_id" = {} AND "email" = {}', api_key_id, email.lower())


def suppress(api_key_id: int, email: str, reason: str) -> None:
    """Put an address on the key's suppression list (once)."""
    Suppression.insert(api_key=api_key_id, email=email.lower(), reason=reason).on_conflict_ignore().execute()


def quiet_window(profile: UserProfile | None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The user's quiet hours as ((hour, minute), (hour, minute)) from start to end; None when there
    are none (not set, not times of day, or an empty window)."""
    if profile is None or not profile.quiet_start or not profile.quiet_end:
        return None
    start, end = parse_clock(profile.quiet_start), parse_clock(profile.quiet_end)
    return None if start is None or end is None or start == end else (start, end)


def quiet_until(profile: UserProfile | None, at: datetime) -> datetime | None:
    """If `at` (naive UTC) falls in the user's quiet hours, when they end (naive UTC); else None."""
    if (window := quiet_window(profile)) is None:
        return None
    start, end = window
    tz = zone(profile.timezone)
    local = at.replace(tzinfo=UTC).astimezone(tz)
    now_t = (local.hour, local.minute)
    overnight = start > end
    inside = (now_t >= start or now_t < end) if overnight else (start <= now_t < end)
    if not inside:
        return None
    end_day = local.date() + timedelta(days=1) if overnight and now_t >= start else local.date()
    ends = [datetime.combine(end_day, time(*end, fold=fold), tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
            for fold in (0, 1)]
    if ends[1] < ends[0]:
        # The night the clocks go forward over the end's wall time, it never comes: quiet hours end
        # as the clocks jump past it (02:00 -> 03:00 for an end at 02:30), where the wall time first
        # reads later than the end. Fold 1 would read it with the new offset, an hour early and
        # still quiet; fold 0 with the old one, half an hour after mail arriving at 03:10 goes out.
        return _jump_over(end_day, end, tz)
    # The night the clocks go back, the end's wall time comes twice (fold 0, then 1): the end is the
    # first of them still to come, never one already gone.
    return min((e for e in ends if e > at), default=max(ends))


def _jump_over(day, clock: tuple[int, int], tz: ZoneInfo) -> datetime:
    """The instant (naive UTC) the clocks jump over clock, a wall time that does not exist on day."""
    moment = datetime.combine(day, time(*clock), tzinfo=tz)
    for _ in range(24 * 60):
        if moment.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == moment.replace(tzinfo=None):
            break  # a wall time that exists: the first past the jump
        moment += timedelta(minutes=1)  # wall-clock arithmetic, as both share tz
    return moment.astimezone(UTC).replace(tzinfo=None)


class Lookup:
    """Where decide() reads what recipients agreed to: the database, one question at a time."""

    def suppression(self, api_key_id: int, email: str) -> Suppression | None:
        return suppression(api_key_id, email)

    def mode(self, api_key_id: int, user_key: str, category: str) -> DeliveryMode:
        return mode_for(api_key_id, user_key, category)

    def profile(self, api_key_id: int, user_key: str) -> UserProfile | None:
        return select_one(UserProfile, '"api_key_id" = {} AND "user_key" = {}', api_key_id, user_key)

    def suppressed(self, api_key_id: int, email: str, reason: str) -> None:
        """An address was put on the suppression list just now (the database has it already)."""


class Prefetched(Lookup):
    """The same answers for a send or a whole batch, read in one round trip instead of up to three
    per item."""

    def __init__(self, api_key_id: int, rows):
        """rows: (kind, and four answers) each, as _consent_rows() reads them."""
        self._suppressed: dict[str, Suppression] = {}
        self._modes: dict[tuple[str, str], DeliveryMode] = {}
        self._profiles: dict[str, UserProfile] = {}
        for kind, a, b, c, d in rows:
            if kind == "s":
                self._suppressed[a] = Suppression(api_key=api_key_id, email=a, reason=b)
            elif kind == "p":
                self._modes[(a, b)] = DeliveryMode(c)
            else:
                self._profiles[a] = UserProfile(api_key=api_key_id, user_key=a, timezone=b, quiet_start=c, quiet_end=d)

    def suppression(self, api_key_id: int, email: str) -> Suppression | None:
        return self._suppressed.get(email.lower())

    def mode(self, api_key_id: int, user_key: str, category: str) -> DeliveryMode:
        if category == Category.TRANSACTIONAL:
            return DeliveryMode.IMMEDIATE
        return self._modes.get((user_key, category), DeliveryMode.IMMEDIATE)

    def profile(self, api_key_id: int, user_key: str) -> UserProfile | None:
        return self._profiles.get(user_key)

    def suppressed(self, api_key_id: int, email: str, reason: str) -> None:
        # A later email of the same shared job to this address must see it too.
        self._suppressed[email.lower()] = Suppression(api_key=api_key_id, email=email.lower(), reason=reason)


DATABASE = Lookup()


def prefetch(api_key_id: int, recipients) -> Prefetched:
    """A Prefetched for recipients, (to, user_key, category) each: only optional categories have
    preferences and quiet hours to look up."""
    recipients = list(recipients)
    emails = {to.lower() for to, _, _ in recipients}
    # Only those whose preferences may matter: transactional email has none to look up.
    user_keys = {user_key for _, user_key, category in recipients if user_key and category != Category.TRANSACTIONAL}
    return Prefetched(api_key_id, _consent_rows(api_key_id, emails, user_keys))


def sending(public_id: str) -> tuple[Notification | None, Lookup]:
    """The notification a job is to send, with what its recipient agreed to: what
    prefetch(row's key, [row's recipient]) answers. On PostgreSQL in one round trip and one
    statement instead of two, the consent rows joined to the notification's own (LATERAL)."""
    if not is_postgres(database):
        current = select_one(Notification, '"id" = {}', public_id)
        return current, for_waiting([current] if current else [])
    rows = database.execute_sql(_sending_sql(), (public_id,)).fetchall()
    if not rows:
        return None, DATABASE
    current = instance_of(Notification, rows[0])
    width = len(Notification._meta.sorted_fields)
    return current, Prefetched(current.api_key_id, [row[width:] for row in rows if row[width] is not None])


def for_waiting(rows: list[Notification]) -> Lookup:
    """Answers for those of rows (one key's) still to be sent, read in one round trip."""
    waiting = [r for r in rows if r.status in (Status.QUEUED, Status.RETRYING)]
    if not waiting:
        return DATABASE
    return prefetch(waiting[0].api_key_id, [(r.to, r.user_key, r.category) for r in waiting])


@cache
def _sending_sql() -> str:
    """sending()'s statement: _consent_rows()'s parts, matched to the notification's own columns."""
    parts = []
    for kind, model, column, answers in _PARTS:
        if column == "email":
            # Addresses are kept lower-cased by Python, as prefetch() asks for them (the API takes
            # ASCII only). lower() as the "C" collation has it, A-Z only: the database's own may
            # differ (a Turkish one makes "I" a dotless "ı"). Compared in the column's collation
            # again, so that the index on the address still serves.
            match = 'x."email" = lower(n."to" COLLATE "C") COLLATE "default"'
        else:
            match = f'x."user_key" = n."user_key" AND n."category" <> \'{Category.TRANSACTIONAL.value}\''
        shown = ", ".join(a if a == "NULL" else f'x."{a}"' for a in answers)
        parts.append(f"SELECT '{kind}' AS kind, {shown} FROM \"{model._meta.table_name}\" x "
                     f'WHERE x."api_key_id" = n."api_key_id" AND {match}')
    return prepared(f'SELECT {column_list(Notification, "n")}, c.* FROM "{Notification._meta.table_name}" n '
                    f'LEFT JOIN LATERAL ({" UNION ALL ".join(parts)}) c ON TRUE WHERE n."id" = {database.param}')


# Each part: a table, the column matched against the given values, and the four columns it answers
# with, so that one UNION ALL reads suppressions, preferences and profiles together.
_PARTS = (
    ("s", Suppression, "email", ("email", "reason", "NULL", "NULL")),
    ("p", Preference, "user_key", ("user_key", "category", "mode", "NULL")),
    ("u", UserProfile, "user_key", ("user_key", "timezone", "quiet_start", "quiet_end")),
)


def _consent_rows(api_key_id: int, emails: set[str], user_keys: set[str]) -> list[tuple]:
    selects, args = [], []
    for kind, model, column, answers in _PARTS:
        values = list(emails if column == "email" else user_keys)
        if not values:
            continue
        among, among_args = in_values(column, values)
        shown = ", ".join(a if a == "NULL" else f'"{a}"' for a in answers)
        selects.append(f"SELECT '{kind}', {shown} FROM \"{model._meta.table_name}\" "
                       f'WHERE "api_key_id" = {database.param} AND {among}')
        args += [api_key_id, *among_args]
    if not selects:
        return []
    sql = " UNION ALL ".join(selects)
    # On PostgreSQL one text for any count of values (= ANY), so worth preparing; IN (...) is not.
    return list(database.execute_sql(prepared(sql) if is_postgres(database) else sql, args).fetchall())


@dataclass(frozen=True)
class Decision:
    status: Status
    reason: str
    send_at: datetime | None = None


def decide(api_key: ApiKey, *, to: str, user_key: str, category: str, send_at: datetime | None,
           now: datetime, lookup: Lookup = DATABASE) -> Decision:
    """What to do with a new notification, given who it is for and what they agreed to."""
    suppressed = lookup.suppression(api_key.id, to)
    if suppressed is not None:
        return Decision(Status.SUPPRESSED, f"the address is on the suppression list: {suppressed.reason}")
    mode = lookup.mode(api_key.id, user_key, category)
    if mode is DeliveryMode.OFF:
        return Decision(Status.SUPPRESSED, f"the user turned off {category} email")
    if mode in (DeliveryMode.DAILY, DeliveryMode.WEEKLY):
        # The requested time stays with the item: no digest takes it before then, and it still holds
        # if the user switches back to immediate. Quiet hours are the digest's to honour, not the item's.
        return Decision(Status.HELD, f"collected for the user's {mode} {category} digest", send_at)
    profile = lookup.profile(api_key.id, user_key) if category != Category.TRANSACTIONAL else None
    return timing(profile, send_at=send_at, now=now)


def timing(profile: UserProfile | None, *, send_at: datetime | None, now: datetime) -> Decision:
    """When mail that is to go out goes: at the end of the user's quiet hours when its time falls in
    them, else at send_at, else now. Transactional mail has no quiet hours: pass no profile for it."""
    ends = quiet_until(profile, send_at or now)
    if ends is not None:
        return Decision(Status.SCHEDULED, "waiting for the user's quiet hours to end", ends)
    if send_at is not None:
        return Decision(Status.SCHEDULED, "accepted for later", send_at)
    return Decision(Status.QUEUED, "accepted")


def quiet_now(notification: Notification, now: datetime, lookup: Lookup = DATABASE) -> datetime | None:
    """At delivery time: when the recipient's quiet hours end, if they hold now, else None. Quiet hours
    were looked at when the mail was accepted, but it may have waited since (a backlog, a retry, the
    dead-letter queue), and the user may have set them meanwhile. Transactional mail has none."""
    if notification.category == Category.TRANSACTIONAL or not notification.user_key:
        return None
    return quiet_until(lookup.profile(notification.api_key_id, notification.user_key), now)


def unwanted(api_key_id: int, *, to: str, user_key: str | None, category: str,
             lookup: Lookup = DATABASE) -> str | None:
    """At delivery time: a reason not to send after all (unsubscribed or suppressed since), or None."""
    suppressed = lookup.suppression(api_key_id, to)
    if suppressed is not None:
        return f"the address is on the suppression list: {suppressed.reason}"
    turned_off = user_key and lookup.mode(api_key_id, user_key, category) is DeliveryMode.OFF
    if category != Category.TRANSACTIONAL and turned_off:
        return f"the user turned off {category} email"
    return None
