"""Daily and weekly digests: held notifications collected into one email per user, category and window.

A digest window ends at DIGEST_TIME in the user's timezone (every day, or on DIGEST_WEEKDAY), so
windows follow daylight saving time. Correct by construction:
  - one digest per user, category and window: a unique index on (key, user, category, window end);
  - an item is in exactly one digest: taking an item is a compare-and-set from `held` to `in_digest`,
    in the same transaction that creates the digest, so a crash leaves either both or neither;
  - an item says what became of it: it ends as its digest ends (`digested` once the digest was sent,
    `failed` with the reason when it failed, ...), moved by store.transition with the digest itself;
  - an item that arrives while a digest is being made is still `held` afterwards (it was not in the
    transaction's snapshot, or its insert committed later) and goes into the next window's digest;
  - an item keeps the send_at it was asked for: a window takes it only once that time is at or before
    the window's end, so it goes into the digest of the window it falls due in, never an earlier one.
A digest goes out like any other non-transactional mail: one made inside the user's quiet hours waits
for their end. What was held for a category the user switched back to `immediate` goes out item by
item, each as if it had just arrived; nothing is held for a category turned `off`.

An item's deadline (expires_at) holds inside a digest as it does alone: past it, the item is never
mailed and ends `expired`, owing its callback then.
  - held: each digest pass first expires what a user and category hold past its deadline (window due
    or not, whatever the user's preference now), and a window never takes an item past it, so a
    window whose every item expired makes no digest;
  - in_digest: a digest can wait long after it was made (quiet hours, retries, the dead-letter queue
    and a requeue), so what it shows is not final until it goes out. Before each attempt, the items
    whose deadline has passed are expired and the digest's data is made again from the others, in one
    transaction, so that it says what went out; a digest none of whose items is left is not sent but
    expired, and its items with it. Only the worker holding the claimed digest does this: anyone else
    expiring an item meanwhile could not stop a send already under way. Each item is still in one
    digest only, and sent once at most: an expired item is final, and nothing moves it back.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time, timedelta

from peewee import JOIN, IntegrityError, fn

from notifier import metrics, queues, schema, store
from notifier.config import Settings, parse_clock
from notifier.consent import Decision, get_profile, mode_for, timing, zone
from notifier.db import UNAVAILABLE_ERRORS, cancelled
from notifier.errors import STOPPING
from notifier.models import (
    DIGEST_TEMPLATE,
    ApiKey,
    Category,
    DeliveryMode,
    Digest,
    Notification,
    Preference,
    Priority,
    Status,
    UserProfile,
    utcnow,
)
from notifier.rendering import html_to_text

logger = logging.getLogger(__name__)

ITEM_TEXT_CHARS = 500


def boundary_at_or_before(instant: datetime, tz_name: str, clock: str, weekday: int | None = None) -> datetime:
    """The latest digest time at or before instant (naive UTC in, naive UTC out)."""
    tz = zone(tz_name)
    hour, minute = parse_clock(clock)
    local_day = instant.replace(tzinfo=UTC).astimezone(tz).date()
    for back in range(0, 9):
        day = local_day - timedelta(days=back)
        if weekday is not None and day.weekday() != weekday:
            continue
        candidate = datetime.combine(day, time(hour, minute), tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
        if candidate <= instant:
            return candidate
    raise AssertionError("no digest time in the past eight days")  # unreachable: a week always has one


def boundary_after(instant: datetime, tz_name: str, clock: str, weekday: int | None = None) -> datetime:
    """The first digest time strictly after instant (naive UTC)."""
    tz = zone(tz_name)
    hour, minute = parse_clock(clock)
    local_day = instant.replace(tzinfo=UTC).astimezone(tz).date()
    for ahead in range(0, 9):
        day = local_day + timedelta(days=ahead)
        if weekday is not None and day.weekday() != weekday:
            continue
        candidate = datetime.combine(day, time(hour, minute), tzinfo=tz).astimezone(UTC).replace(tzinfo=None)
        if candidate > instant:
            return candidate
    raise AssertionError("no digest time in the next eight days")


def due_window(settings: Settings, mode: DeliveryMode, tz_name: str, now: datetime) -> datetime | None:
    """The end of the newest window that may be flushed now, or None for modes that are not digests."""
    if mode not in (DeliveryMode.DAILY, DeliveryMode.WEEKLY):
        return None
    weekday = settings.digest_weekday if mode is DeliveryMode.WEEKLY else None
    return boundary_at_or_before(now - timedelta(seconds=settings.digest_grace_seconds), tz_name,
                                 settings.digest_time, weekday)


def flush_due(settings: Settings, redis, renderer, now: datetime | None = None) -> int:
    """Make every digest that is due; returns how many were made. What was held for a category the
    user has since turned off is suppressed, and what was held for one switched back to immediate is
    released."""
    now = now or utcnow()
    # Every pass expires what is held past its deadline, window due or not; then only the groups with
    # something to do are looked at one by one.
    _expire_held(settings, redis, now)
    made = 0
    for api_key_id, user_key, category, oldest, stored_mode, stored_zone in _groups():
        if _nothing_due(settings, category, oldest, stored_mode, stored_zone, now):
            continue
        try:
            made += _flush_group(settings, redis, renderer, api_key_id, user_key, category, now)
        except STOPPING:
            raise
        except UNAVAILABLE_ERRORS as exc:
            if not cancelled(exc):
                raise  # the database is away: the next pass tries every group again
            logger.warning("a %s digest for key %s was cancelled (%s); the other groups go on", category,
                           api_key_id, type(exc).__name__)
        except Exception:  # noqa: BLE001 - one group that keeps failing must not starve the groups after it
            logger.warning("a %s digest for key %s failed; the other groups go on", category, api_key_id,
                           exc_info=True)
    return made


def _groups() -> list[tuple]:
    """(api_key_id, user_key, category, oldest item's created_at, stored mode, stored time zone) of each
    user and category holding mail, in one query: the mode and zone None when none is stored."""
    preference = ((Preference.api_key == Notification.api_key) & (Preference.user_key == Notification.user_key)
                  & (Preference.category == Notification.category))
    profile = (UserProfile.api_key == Notification.api_key) & (UserProfile.user_key == Notification.user_key)
    # Grouped by the mode and zone too, which are one row's at most each (their unique indexes).
    return list(
        Notification.select(Notification.api_key, Notification.user_key, Notification.category,
                            fn.MIN(Notification.created_at), Preference.mode, UserProfile.timezone)
        .join(Preference, JOIN.LEFT_OUTER, on=preference)
        .switch(Notification).join(UserProfile, JOIN.LEFT_OUTER, on=profile)
        .where(Notification.status == Status.HELD.value)
        .group_by(Notification.api_key, Notification.user_key, Notification.category, Preference.mode,
                  UserProfile.timezone)
        .tuples()
    )


def _nothing_due(settings: Settings, category: str, oldest: datetime, stored_mode: str | None,
                 stored_zone: str | None, now: datetime) -> bool:
    """Whether a user's held mail of a category is surely not due: a daily or weekly digest whose
    window, by the preference and time zone _groups() read, ended before its oldest item arrived.

    Held for a digest, a user's mail waits up to a week, and every pass looked at every user holding
    any: seven round trips each to make nothing (23 s for 1,600 users, in a pass every 30 s). Anything
    else, a preference switched to immediate or off included, is _flush_group's, which reads it all
    again; one switched since this read is seen by the next pass."""
    if category == Category.TRANSACTIONAL or stored_mode not in (DeliveryMode.DAILY, DeliveryMode.WEEKLY):
        return False
    window_end = due_window(settings, DeliveryMode(stored_mode), stored_zone or "UTC", now)
    return window_end is not None and oldest >= window_end


def _flush_group(settings, redis, renderer, api_key_id: int, user_key: str, category: str, now: datetime) -> int:
    """flush_due() for one user and category: how many digests it made (one at most for each address
    the user's held mail was sent to)."""
    _expire_held(settings, redis, now, _held(api_key_id, user_key, category))
    api_key = ApiKey.get_by_id(api_key_id)
    mode = mode_for(api_key_id, user_key, category)
    if mode is DeliveryMode.OFF:
        _suppress_held(settings, redis, api_key_id, user_key, category)
        return 0
    profile = get_profile(api_key, user_key)
    if mode is DeliveryMode.IMMEDIATE:
        _release_held(settings, redis, api_key_id, user_key, category, profile, now)
        return 0
    window_end = due_window(settings, mode, profile.timezone if profile else "UTC", now)
    if window_end is None:
        return 0
    # Made now, it goes out as any mail made now would: after the user's quiet hours.
    when = timing(profile, send_at=None, now=now)
    addresses = (_held(api_key_id, user_key, category).select(fn.LOWER(Notification.to)).distinct().tuples())
    made = 0
    for (address,) in sorted(addresses):
        try:
            made += _flush(settings, redis, renderer, api_key, user_key, category, address, mode, window_end, when, now)
        except _OneDigestPerWindow:
            # Left, that address's mail would wait while the first address of the window has any.
            logger.warning("a version-14 process made the unique index of one digest per window again; dropped")
            schema.drop_one_digest_per_window(Notification._meta.database)
            made += _flush(settings, redis, renderer, api_key, user_key, category, address, mode, window_end, when, now)
    return made


class _OneDigestPerWindow(Exception):
    """A digest of another address took the window: the unique index of a schema before version 15."""


def _held(api_key_id: int, user_key: str, category: str):
    return Notification.select().where(
        (Notification.status == Status.HELD.value) & (Notification.api_key == api_key_id)
        & (Notification.user_key == user_key) & (Notification.category == category)
    )


def _expire_held(settings, redis, now: datetime, held=None) -> None:
    """Expire what is held past its deadline (held: of one user and category; None: everyone's). The
    reconciler would too, but only at its next pass: a digest made meanwhile would have taken it."""
    if held is None:
        held = Notification.select().where(Notification.status == Status.HELD.value)
    seqs = [n.seq for n in held.where(Notification.expires_at <= now).select(Notification.seq)]
    moved = store.transition_many(seqs, Status.EXPIRED, reason="deadline passed while it was held for a digest",
                                  sources=(Status.HELD,))
    if moved:
        for item in Notification.select().where(Notification.seq.in_(moved)):
            metrics.expired(redis, item)
            queues.dispatch_callback(redis, settings, item)


def _suppress_held(settings, redis, api_key_id: int, user_key: str, category: str) -> None:
    """Suppress what a user holds for a category they turned off; each item owes its callback now, as
    one suppressed at its send does (not at the reconciler's next look for owed callbacks)."""
    seqs = [n.seq for n in _held(api_key_id, user_key, category)]
    moved = store.transition_many(seqs, Status.SUPPRESSED, reason=f"the user turned off {category} email",
                                  sources=(Status.HELD,))
    if moved:
        for item in Notification.select().where(Notification.seq.in_(moved)):
            queues.dispatch_callback(redis, settings, item)


def _release_held(settings, redis, api_key_id: int, user_key: str, category: str, profile: UserProfile | None,
                  now: datetime) -> None:
    """Send what was held as if each item had just arrived: the user asked for it immediately, and
    each goes out as itself (its own subject, body and status), after quiet hours and not before its
    own send_at. Each is released by a compare-and-set from `held`, so once, whoever else looks."""
    released = []
    for item in _held(api_key_id, user_key, category).order_by(Notification.seq):
        when = timing(profile, send_at=item.send_at if item.send_at and item.send_at > now else None, now=now)
        if store.transition(item.id, when.status, sources=(Status.HELD,), known=item, send_at=when.send_at,
                            reason=_timed(f"released: the user switched {category} email to immediate", when)):
            released.append(item.id)
    if released:
        logger.info("%s held %s notifications released", len(released), category)
        queues.dispatch_many(redis, settings, list(store.get_many(released).values()))


def _timed(reason: str, when: Decision) -> str:
    return reason if when.status is Status.QUEUED else f"{reason}; {when.reason}"


def _flush(settings, redis, renderer, api_key, user_key, category, address: str, mode, window_end,
           when: Decision, now: datetime) -> bool:
    """The digest of what a user holds for a category and sent to one address (lower-cased), if it has
    any item due in the window; whether it was made."""
    db = Notification._meta.database
    with db.atomic() as tx:
        # An item asked for later than the window's end waits for the window it falls due in; one past
        # its deadline is never taken, even one that arrived after _expire_held looked.
        due = Notification.send_at.is_null() | (Notification.send_at <= window_end)
        alive = Notification.expires_at.is_null() | (Notification.expires_at > now)
        taken = (_held(api_key.id, user_key, category)
                 .where((fn.LOWER(Notification.to) == address) & (Notification.created_at < window_end) & due & alive)
                 .order_by(Notification.seq))
        seqs = [row.seq for row in taken.select(Notification.seq)]
        if not seqs:
            return False
        data, newest = _contents(settings, renderer, seqs, mode.value)
        digest_fields = {
            "to": newest.to,
            "user_id": newest.user_id,
            "user_key": user_key,
            "template": DIGEST_TEMPLATE,
            "send_at": when.send_at,
            "data": data,
            "priority": Priority.LOW.value,
            "category": category,
        }
        try:
            with db.atomic():
                notification = store.create_notification(
                    api_key, digest_fields, status=when.status,
                    reason=_timed(f"{mode} digest of {len(seqs)} {category} notifications", when))
                Digest.create(api_key=api_key, user_key=user_key, category=category, window_end=window_end,
                              email=address, notification_id=notification.id, items=len(seqs))
        except IntegrityError:
            tx.rollback()
            exists = Digest.select().where((Digest.api_key == api_key.id) & (Digest.user_key == user_key)
                                         & (Digest.category == category) & (Digest.window_end == window_end)
                                         & (Digest.email == address)).exists()
            if not exists:
                raise _OneDigestPerWindow() from None
            return False  # this window's digest at this address exists already; its items were taken by it
        moved = store.transition_many(
            seqs, Status.IN_DIGEST, reason=f"included in digest {notification.id}",
            sources=(Status.HELD,), digest_id=notification.id,
        )
        if len(moved) != len(seqs):
            tx.rollback()  # someone changed an item meanwhile (cancelled it): try again next pass
            return False
    logger.info("digest %s made with %s items", notification.id, len(seqs))
    queues.dispatch(redis, settings, notification)
    return True


def _contents(settings, renderer, seqs: list[int], period: str) -> tuple[dict, Notification]:
    """The data of a digest of the items with these seqs (oldest first), and the newest item."""
    # Only the rows the digest shows, and the newest (whose address it goes to), are read whole;
    # from the seqs read before them, so that each row shown is one the digest takes.
    read = {seqs[-1], *seqs[: settings.digest_max_items]}
    rows = {n.seq: n for n in Notification.select().where(Notification.seq.in_(list(read)))}
    shown = [_item(renderer, rows[seq]) for seq in seqs[: settings.digest_max_items]]
    return {"items": shown, "more": len(seqs) - len(shown), "period": period}, rows[seqs[-1]]


def leave_out_expired(settings, renderer, digest: Notification, now: datetime) -> tuple[list[Notification], bool]:
    """Before a claimed digest goes out: its items past their deadline, and whether any other is left.

    With others left, the expired ones are expired here and the digest's data is made again from the
    others, in one transaction, and digest.data is the new one. With none left nothing changes: the
    caller expires the digest, and its items end with it. A digest of no items (a caller's own send
    of the digest template) has nothing to leave out."""
    # By digest_id alone, the status filtered here: a guard on status could lead the planner to an
    # index by status (see store._UNINDEXED_STATUS), and the digest's rows are few.
    items = (Notification.select(Notification.seq, Notification.status, Notification.expires_at)
             .where(Notification.digest_id == digest.id).order_by(Notification.seq).tuples())
    kept, expired = [], []
    for seq, status, deadline in items:
        if status == Status.IN_DIGEST:
            (kept if deadline is None or deadline > now else expired).append(seq)
    if expired and kept:
        with Notification._meta.database.atomic():
            store.transition_many(expired, Status.EXPIRED, reason=f"deadline passed before digest {digest.id} was sent",
                                  sources=(Status.IN_DIGEST,))
            data, _ = _contents(settings, renderer, kept, (digest.data or {}).get("period"))
            Notification.update(data=data).where(Notification.seq == digest.seq).execute()
        digest.data = data
    return list(Notification.select().where(Notification.seq.in_(expired))) if expired else [], bool(kept)


def _item(renderer, notification: Notification) -> dict:
    if notification.template:
        try:
            subject, text = renderer.summary(notification.template, notification.data)
        except STOPPING:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken item must not hold the whole digest back
            # Its template removed or broken since it was accepted: listed by name alone, which its
            # reader cannot act on, so the operator hears of it (never the data, which may be quoted).
            logger.warning("notification %s: template %r cannot be shown in its digest (%s); listed by name alone",
                           notification.id, notification.template, type(exc).__name__)
            return {"subject": notification.template.replace("_", " ").capitalize(), "text": ""}
    else:
        # A send of html alone has its words in the html: the text part it would have had alone.
        subject = notification.subject or ""
        text = notification.text if notification.text is not None else html_to_text(notification.html or "")
    return {"subject": subject, "text": _shortened((text or "").strip())}


def _shortened(text: str) -> str:
    """text, cut to at most ITEM_TEXT_CHARS at the end of a word: a link cut in the middle would
    lead nowhere, so a word cut across is left out whole."""
    if len(text) <= ITEM_TEXT_CHARS:
        return text
    cut = text[: ITEM_TEXT_CHARS - 1]
    if not text[ITEM_TEXT_CHARS - 1].isspace():
        words = cut.rsplit(None, 1)
        cut = words[0] if len(words) == 2 else ""  # one word alone (a link) longer than all: none of it
    return cut.rstrip() + "…"


def pending_counts() -> dict[str, int]:
    """How many items wait per category (for operators)."""
    rows = (Notification.select(Notification.category, fn.COUNT(Notification.seq))
            .where(Notification.status == Status.HELD.value).group_by(Notification.category).tuples())
    return dict(rows)
