"""Erasure: what one API key holds of one user, removed at the user's request (GDPR art. 17).

A user is named as the stats route names one (listing.users_mail): the notifications of their user id,
or for "email:<address>" those sent to that address with no user id. In one transaction:
  1. Every notification of theirs still waiting to go out (scheduled, queued, retrying, held; a digest
     not sent yet, its items with it) is cancelled by store's guarded transitions, so whatever reads it
     later (its RQ job, its release, a reconciler pass, a digest pass) finds it final and sends nothing.
  2. If any is being sent (`sending`, or `in_digest` in a digest being sent), nothing changes: InFlight,
     a 409 the caller retries after Retry-After, once the send has ended.
  3. A notification that still answers for something becomes a tombstone: one whose idempotency key is
     remembered (a retried request must replay it, never become a new send: the promise retention keeps
     too), and one whose status callback is owed (the event, which then carries no metadata and no
     error, is still posted). Its address, user id and key, data, metadata, subject, text, html and last
     error go; its id, status, times, idempotency key and scope, request hash, API key, priority,
     category, template name, Message-ID and callback URL stay, and erased_at says when. Its history
     (whose reasons and server replies can quote the address) is one line of kind `erasure`. Retention
     deletes a tombstone as any other notification once it answers for nothing.
  4. Every other notification of theirs is deleted with its history.
  5. The records of their digests, their preferences and their profile (timezone, quiet hours) go.
What stays: the suppression list, by address, which protects the sender's reputation (the address's
server said it does not exist): DELETE /api/suppressions/<email> takes an address off it. Mail sent to
the user's address with no user id is "email:<address>"'s, erased by naming that. Log lines already
written, RQ's records of jobs (which hold notification ids, never addresses) and the RECIPIENT_CAP count
of the address in Redis (named by a keyed hash of the address, never the address; it expires with its
window) are not touched.

A send accepted while an erasure runs is either erased or kept whole: rows change only by compare-and-set
on their status, and one not final when its page is erased is left as it is. A tombstone is never sent:
a requeue refuses one, and a worker cancels one it finds queued (requeued as it was being erased, on
SQLite). A requeue takes the erasure's turn of the user's (lock_owner), so none is kept whole by one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from peewee import JOIN, SQL, EnclosedNodeList, NodeList, Value
from redis import Redis
from redis.exceptions import RedisError

from notifier import queues, store
from notifier.config import Settings
from notifier.consent import ADDRESS_KEY_PREFIX
from notifier.db import is_postgres
from notifier.errors import Conflict
from notifier.listing import users_mail
from notifier.models import (
    DIGEST_TEMPLATE,
    FINAL_STATUSES,
    ApiKey,
    CallbackStatus,
    Digest,
    Event,
    Notification,
    Preference,
    Status,
    UserProfile,
    utcnow,
)
from notifier.redact import mask_address

logger = logging.getLogger(__name__)

# Rows a statement reads or changes at most: each statement stays far inside DATABASE_STATEMENT_TIMEOUT
# however much mail the user has (100,000 notifications are 200 pages of a few statements each).
PAGE = 500
REASON = "erased at the user's request"
# What can still be stopped before it goes out.
STOPPABLE = (Status.SCHEDULED, Status.QUEUED, Status.RETRYING, Status.HELD)
# A send takes seconds; a digest's, or one past a slow server, a little longer.
RETRY_AFTER_SECONDS = 5
# Ids an InFlight answer lists at most.
IN_FLIGHT_SHOWN = 100
# Status callbacks of what the erasure cancelled, queued as it answers; the reconciler queues the rest.
CALLBACKS_AT_ONCE = 100
# Passes of the cancel step: a digest made from the user's held mail just before the first pass is
# cancelled by the second (with its items); one made later still is in flight (409).
CANCEL_PASSES = 3
# Erasures of one user take turns (PostgreSQL advisory lock of this class and a hash of key and user);
# negative as the callbacks' class is, and another number: never an API key's id, which idempotency locks with.
_LOCK_CLASS = -0x65726173  # "eras"
_FINAL = sorted(s.value for s in FINAL_STATUSES)


class InFlight(Conflict):
    """Some of the user's mail is being sent: nothing was erased, try again after Retry-After."""

    code = "in_flight"

    def __init__(self, ids: list[str]):
        super().__init__(
            "some of the user's mail is being sent right now; nothing was erased: try again after Retry-After seconds",
            {"in_flight": ids[:IN_FLIGHT_SHOWN], "count": len(ids)},
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


@dataclass
class Erased:
    """What an erasure did."""

    user_id: str
    cancelled: int = 0  # stopped before they went out (each now a tombstone or deleted)
    tombstoned: int = 0
    deleted: int = 0
    digests: int = 0  # records of digests made (the digests' notifications are counted above)
    preferences: int = 0
    profile: int = 0
    _owed: list[str] = field(default_factory=list, repr=False)  # callbacks of what it cancelled

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def erase(redis: Redis, settings: Settings, api_key: ApiKey, user_key: str) -> Erased:
    """Erase what api_key holds of the user user_key names (a user id, or "email:<address>" as
    consent.preferences_key writes it); see the module's docstring. Raises InFlight, having changed
    nothing, while any of their mail is being sent. A user with nothing is answered with zeros."""
    whose = users_mail(api_key.id, user_key)
    done = Erased(user_key)
    db = Notification._meta.database
    with db.atomic():
        lock_user(api_key.id, user_key)
        _refuse_in_flight(whose, before_cancelling=True)  # before anything is written
        cancelled: set[int] = set()
        for _ in range(CANCEL_PASSES):
            moved = _cancel(whose)
            cancelled.update(moved)
            if not moved:
                break
        # Again, now that what waited is cancelled: a worker's claim may have come before a cancel (which
        # then did not move it), and the transaction is rolled back.
        _refuse_in_flight(whose, before_cancelling=False)
        _erase_rows(whose, cancelled, done)
        done.cancelled = len(cancelled)
        done.digests = Digest.delete().where((Digest.api_key == api_key.id) & (Digest.user_key == user_key)).execute()
        done.preferences = (Preference.delete()
                            .where((Preference.api_key == api_key.id) & (Preference.user_key == user_key)).execute())
        done.profile = (UserProfile.delete()
                        .where((UserProfile.api_key == api_key.id) & (UserProfile.user_key == user_key)).execute())
    _queue_callbacks(redis, settings, done._owed)
    who = mask_address(user_key.removeprefix(ADDRESS_KEY_PREFIX)) if user_key.startswith(ADDRESS_KEY_PREFIX) \
        else "a user id"
    counts = {name: count for name, count in done.as_dict().items() if name != "user_id"}
    logger.info("erasure for key %s (%s): %s", api_key.id, who, counts)
    return done


def lock_user(api_key_id: int, user_key: str) -> None:
    """Take, until the end of the current transaction, the turn erasures of this user take (PostgreSQL;
    SQLite writes one transaction at a time anyway)."""
    db = Notification._meta.database
    if is_postgres(db):
        db.execute_sql("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, f"{api_key_id}:{user_key}"))


def lock_owner(notification: Notification) -> None:
    """lock_user() for whoever an erasure of notification's user names: its user id, or with none its
    "email:<address>" key. Anything that makes a final notification waiting again (a requeue) takes it,
    then reads the row again and decides: an erasure that came first has made the row a tombstone (the
    requeue is refused) or deleted it; one that comes after finds it waiting and cancels it. Without it a
    row requeued between the erasure's cancel and its page's erasure was kept whole (not final) and sent
    after the erasure had answered 200 (helper 4's review)."""
    owner = notification.user_id if notification.user_id is not None else notification.user_key
    if owner is not None:
        lock_user(notification.api_key_id, owner)


def _guard(condition):
    """condition as a filter only, which no index serves (as store._UNINDEXED_STATUS): the pages walk
    the index of key, user and seq, never one of every row in a status."""
    return NodeList((EnclosedNodeList([condition]), SQL("IS TRUE")))


def _refuse_in_flight(whose, before_cancelling: bool) -> None:
    """Raise InFlight if any of the user's mail is being sent: `sending`, or in a digest being sent.
    Before cancelling, an item in a digest that is still waiting is not: the digest is cancelled with it."""
    # Not guarded (_guard): few rows are `sending` at any time, and their partial index finds them at once.
    ids = [i for (i,) in Notification.select(Notification.id)
           .where(whose & (Notification.status == Status.SENDING.value)).order_by(Notification.seq).tuples()]
    held_by = Notification.alias()
    items = Notification.select(Notification.id).where(whose & (Notification.status == Status.IN_DIGEST.value))
    if before_cancelling:
        items = (items.join(held_by, JOIN.LEFT_OUTER, on=(held_by.id == Notification.digest_id))
                 .where(held_by.status.is_null() | held_by.status.not_in([s.value for s in STOPPABLE])))
    ids += [i for (i,) in items.order_by(Notification.seq).tuples()]
    if ids:
        raise InFlight(ids)


def _cancel(whose) -> list[int]:
    """Cancel what the user has waiting, a page at a time; the seqs of what moved (a digest's items too)."""
    moved: list[int] = []
    after = 0
    waiting = _guard(Notification.status.in_([s.value for s in STOPPABLE]))
    not_a_digest = Notification.template.is_null() | (Notification.template != DIGEST_TEMPLATE)
    while True:
        rows = list(Notification.select(Notification.seq, Notification.id, Notification.template)
                    .where(whose & (Notification.seq > after) & waiting)
                    .order_by(Notification.seq).limit(PAGE).tuples())
        if not rows:
            return moved
        first, after = rows[0][0], rows[-1][0]
        # The page by its range of seq, not a list of it: peewee took longer to write 500 values than the
        # database to run the statement. A row of the user's that became waiting in the range since it was
        # read (committed late) is cancelled with it: it is theirs, and counted.
        moved += store.transition_matching(whose & Notification.seq.between(first, after) & not_a_digest,
                                           Status.CANCELLED, reason=REASON, sources=STOPPABLE)
        for seq, public_id, template in rows:
            # A digest one at a time, by the transition that moves its items with it.
            if template == DIGEST_TEMPLATE and store.transition(public_id, Status.CANCELLED, reason=REASON,
                                                                sources=STOPPABLE):
                moved.append(seq)
                # Only this cancel makes an item of this digest `cancelled` (a cancelled digest is never requeued).
                moved += [s for (s,) in Notification.select(Notification.seq).where(
                    (Notification.digest_id == public_id) & _guard(Notification.status == Status.CANCELLED.value))
                    .tuples()]


def _erase_rows(whose, cancelled: set[int], done: Erased) -> None:
    """Delete or tombstone every final notification of the user, a page at a time, counting into done."""
    after = 0
    final = _guard(Notification.status.in_(_FINAL))
    owed = Notification.callback_status == CallbackStatus.PENDING.value
    while True:
        rows = list(Notification.select(Notification.seq, Notification.status)
                    .where(whose & (Notification.seq > after)).order_by(Notification.seq).limit(PAGE).tuples())
        if not rows:
            return
        first, after = rows[0][0], rows[-1][0]
        if any(status not in _FINAL for _, status in rows):
            # Accepted (or requeued) while this runs: kept whole, and sent as it would have been.
            logger.info("erasure: %s notifications not final as their page was erased are kept whole",
                        sum(1 for _, status in rows if status not in _FINAL))
        page = whose & Notification.seq.between(first, after) & final
        # Each statement checks again what it may do (as the page is read by its range, a row of the user's
        # committed late inside it is erased too, if final): what moved since the page was read (a key
        # forgotten, a callback owed again) is a tombstone below if it is still there.
        done.deleted += Notification.delete().where(
            page & Notification.idempotency_key.is_null() & (Notification.callback_status.is_null() | ~owed)).execute()
        _tombstone(page, first, after, cancelled, done)


def _tombstone(page, first: int, last: int, cancelled: set[int], done: Erased) -> None:
    """Make the rows page selects tombstones, their history one line saying so."""
    now = utcnow()
    stones = list(Notification.update(
        to="", user_id=None, user_key=None, data=None, subject=None, text=None, html=None, metadata=None,
        last_error=None, erased_at=now,
    ).where(page).returning(Notification.seq, Notification.id, Notification.callback_status).tuples().execute())
    if not stones:
        return
    done.tombstoned += len(stones)
    # Those just made: no other row of the range was erased at this very instant (an earlier tombstone
    # of the user's no longer matches page, and this transaction holds their rows).
    made = Notification.seq.between(first, last) & (Notification.erased_at == now)
    # Its history goes (a reason or a server's reply can quote the address; the row keeps its times and
    # final status), but for one line saying it was erased. Deleting costs less than blanking each line.
    Event.delete().where(Event.notification.in_(Notification.select(Notification.seq).where(made))).execute()
    line = Notification.select(Notification.seq, Value(Event.at.db_value(now)), Value("erasure"), Notification.status,
                               Notification.status, Value(REASON)).where(made)
    Event.insert_from(line, [Event.notification, Event.at, Event.kind, Event.from_status, Event.to_status,
                             Event.reason]).execute()
    done._owed += [public_id for seq, public_id, callback_status in stones
                   if seq in cancelled and callback_status == CallbackStatus.PENDING.value]


def _queue_callbacks(redis: Redis, settings: Settings, owed: list[str]) -> None:
    """Queue the status callbacks the cancelled tombstones owe (after the commit, as service.cancel does);
    Redis away, or more than CALLBACKS_AT_ONCE: the reconciler queues them, as any owed callback."""
    try:
        for notification_id in owed[:CALLBACKS_AT_ONCE]:
            queues.enqueue_callback(redis, settings, notification_id, new_event=True)
    except RedisError as exc:
        logger.warning("callbacks of erased notifications not queued (%s); the reconciler queues them",
                       type(exc).__name__)
