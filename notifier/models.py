"""Peewee models, the notification statuses and the transitions allowed between them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum

from peewee import (
    SQL,
    BigAutoField,
    CharField,
    DateTimeField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
    fn,
)

from notifier.db import database


def utcnow() -> datetime:
    """The current time as a naive UTC datetime, the form every column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


class Status(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    # Waiting for the user's daily or weekly digest; then `in_digest`, taken into one that has not
    # gone out yet; then as the digest ends: `digested` once it was sent, else what it became.
    HELD = "held"
    IN_DIGEST = "in_digest"
    DIGESTED = "digested"
    # Not sent on purpose: the user turned the category off, or the address is on the suppression list.
    SUPPRESSED = "suppressed"


FINAL_STATUSES = frozenset(
    {Status.SENT, Status.FAILED, Status.CANCELLED, Status.EXPIRED, Status.DIGESTED, Status.SUPPRESSED}
)
# Statuses in which a notification is still waiting to go out, and may be cancelled or expire.
WAITING_STATUSES = frozenset({Status.QUEUED, Status.RETRYING, Status.SCHEDULED, Status.HELD})

# Every move a notification may make. Anything else is refused by store.transition(), which is how a
# job delivered twice sends once: the second claim finds the row no longer queued.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SCHEDULED: frozenset({Status.QUEUED, Status.CANCELLED, Status.EXPIRED, Status.SUPPRESSED}),
    # queued/retrying -> scheduled: a worker finds the recipient's quiet hours holding as it is about to
    # send (the mail waited in the queue, for a retry, or in the dead-letter queue), and it waits for their end.
    Status.QUEUED: frozenset({Status.SENDING, Status.CANCELLED, Status.FAILED, Status.EXPIRED, Status.SUPPRESSED,
                              Status.SCHEDULED}),
    Status.RETRYING: frozenset({Status.SENDING, Status.CANCELLED, Status.FAILED, Status.EXPIRED, Status.SUPPRESSED,
                                Status.SCHEDULED}),
    # held -> queued or scheduled: the user switched the category back to immediate.
    Status.HELD: frozenset({Status.IN_DIGEST, Status.QUEUED, Status.SCHEDULED, Status.CANCELLED, Status.EXPIRED,
                            Status.SUPPRESSED}),
    # Only ever moved with its digest (store.transition): never cancelled or expired on its own, as the
    # digest that holds it would still send it. The one exception is the worker that has claimed the
    # digest: it expires an item past its deadline and leaves it out before sending (notifier.digests).
    Status.IN_DIGEST: frozenset({Status.DIGESTED, Status.FAILED, Status.CANCELLED, Status.EXPIRED,
                                 Status.SUPPRESSED}),
    # sending -> retrying is also how the reconciler recovers a notification whose worker died.
    Status.SENDING: frozenset({Status.SENT, Status.RETRYING, Status.FAILED, Status.EXPIRED}),
    # failed -> queued: an operator requeues a dead letter; failed -> in_digest: the item of a failed
    # digest goes back into it when the digest is requeued.
    Status.FAILED: frozenset({Status.QUEUED, Status.IN_DIGEST}),
    Status.SENT: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.EXPIRED: frozenset(),
    Status.DIGESTED: frozenset(),
    Status.SUPPRESSED: frozenset(),
}


# The template of the digests notifier makes; their items name them in digest_id.
DIGEST_TEMPLATE = "digest"


def digest_item_move(source: Status, target: Status) -> tuple[Status, Status] | None:
    """How a digest's items move when the digest moves from source to target: (from, to), or None.

    Each item ends as its digest ends (`digested` once it was sent); requeueing a failed digest puts
    its failed items back into it. store.transition moves them in the digest's own transaction."""
    if target in FINAL_STATUSES:
        return Status.IN_DIGEST, Status.DIGESTED if target is Status.SENT else target
    if (source, target) == (Status.FAILED, Status.QUEUED):
        return Status.FAILED, Status.IN_DIGEST
    return None


class Category(StrEnum):
    TRANSACTIONAL = "transactional"  # always sent: verification, password reset, receipts
    PRODUCT = "product"
    MARKETING = "marketing"
    UPDATES = "updates"


class DeliveryMode(StrEnum):
    IMMEDIATE = "immediate"
    DAILY = "daily"
    WEEKLY = "weekly"
    OFF = "off"


class CallbackStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"


def allowed_sources(target: Status) -> frozenset[Status]:
    """The statuses from which a notification may move to target."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


class Priority(StrEnum):
    HIGH = "high"
    DEFAULT = "default"
    LOW = "low"


class JSONField(TextField):
    """JSON stored as text, so SQLite and PostgreSQL behave the same."""

    def db_value(self, value):
        return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database


class ApiKey(BaseModel):
    name = CharField(max_length=100, unique=True)
    prefix = CharField(max_length=16, unique=True)
    key_hash = CharField(max_length=64)
    # Signs status callbacks; the caller needs it back to verify them, so it is kept, not hashed.
    callback_secret = CharField(max_length=80)
    # While the callback secret is being rotated, the one it replaced, which signs each callback too
    # (a second v1), until the rotation ends.
    old_callback_secret = CharField(max_length=80, null=True)
    # During a rotation the previous secret keeps working until it is revoked.
    old_prefix = CharField(max_length=16, null=True, unique=True)
    old_key_hash = CharField(max_length=64, null=True)
    rate_limit = CharField(max_length=40, null=True)  # e.g. "100/second"; RATE_LIMIT when unset
    created_at = DateTimeField(default=utcnow)
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_keys"


def new_public_id() -> str:
    return str(uuid.uuid4())


class Notification(BaseModel):
    # seq orders pages: it only grows, so a cursor on it is stable while rows are being inserted.
    seq = BigAutoField()
    id = CharField(max_length=36, unique=True, default=new_public_id)
    # No index of the key alone: (api_key, seq) begins with it (for ON DELETE RESTRICT, say).
    api_key = ForeignKeyField(ApiKey, backref="notifications", on_delete="RESTRICT", index=False)
    to = CharField(max_length=320)
    user_id = CharField(max_length=200, null=True)
    template = CharField(max_length=100, null=True)
    data = JSONField(null=True)
    subject = TextField(null=True)
    text = TextField(null=True)
    html = TextField(null=True)
    priority = CharField(max_length=10, default=Priority.DEFAULT.value)
    # Its DEFAULT in the DDL too (schema._add_missing_columns): a version-1 table, from before categories, gets
    # the column in place, every row of it transactional, as all mail then was.
    category = CharField(max_length=32, default=Category.TRANSACTIONAL.value,
                         constraints=[SQL(f"DEFAULT '{Category.TRANSACTIONAL.value}'")])
    # Whose preferences apply: user_id when the caller gave one, otherwise "email:<to>".
    user_key = CharField(max_length=330, null=True)
    # For an item that went out inside a digest: the digest notification's id.
    digest_id = CharField(max_length=36, null=True)
    metadata = JSONField(null=True)
    status = CharField(max_length=16, default=Status.QUEUED.value)
    attempts = IntegerField(default=0)
    last_error = TextField(null=True)
    message_id = CharField(max_length=255, null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    sent_at = DateTimeField(null=True)
    send_at = DateTimeField(null=True)
    expires_at = DateTimeField(null=True)
    idempotency_key = CharField(max_length=255, null=True)  # as the caller gave it
    # Which part of the request the key answers for (notifier.idempotency): "send", "event:<template>",
    # "batch:<index>". NULL beside a key: stored before schema version 8, the scope inside the key.
    idempotency_scope = CharField(max_length=120, null=True)
    request_hash = CharField(max_length=64, null=True)
    callback_url = TextField(null=True)
    callback_status = CharField(max_length=16, null=True)
    callback_attempts = IntegerField(default=0)
    # How many status changes have made it final: more than one when a dead letter (or its digest) was
    # requeued and ended again. It tells one occurrence of an event from another of the same status
    # (callbacks.event_id) and guards recording a callback's answer against a new occurrence.
    final_moves = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])  # in the DDL: schema._add_missing_columns
    # The RQ job that carries it when it shares one with others of its batch; None: its own job. While
    # `scheduled`, a release job of a new id that a worker put it off with (queues.release_job_id_of).
    job_id = CharField(max_length=64, null=True)
    # When the user's data was erased (notifier.erasure): the row is a tombstone, kept only to answer a
    # retried request under its idempotency key, or to post the status callback it owes. Never sent.
    erased_at = DateTimeField(null=True)

    class Meta:
        table_name = "notifications"
        indexes = (
            (("api_key", "seq"), False),
            (("api_key", "user_id", "seq"), False),
            (("api_key", "idempotency_key", "idempotency_scope"), True),
        )


# What the reconciler's passes look for, and nothing else: rows in one status, owed callbacks,
# waiting rows with a deadline, idempotency keys to forget. Each is small however large the table
# grows, and in an index of its own by seq, the order of the pass's pages: the planner takes it
# over the primary key (same order, fewer rows) whatever its statistics say. With one index of every
# row's status, statistics from a past backlog had it walk the primary key through the whole table
# instead, expecting a match every few rows; forgetting keys read the whole unique index of them.
def _partial(name: str, where, *fields) -> None:
    Notification.add_index(Notification.index(*fields, where=where, name=f"notifications_{name}"))


# Queued rows by priority first: the reconciler pages them a priority at a time, most urgent first.
_partial("queued_priority_seq", Notification.status == Status.QUEUED.value, Notification.priority, Notification.seq)
for _status in (Status.RETRYING, Status.SENDING):
    _partial(f"{_status.value}_seq", Notification.status == _status.value, Notification.seq)
_partial("callback_pending_seq", Notification.callback_status == CallbackStatus.PENDING.value, Notification.seq)
# The callbacks that gave up, for an operator posting them again (notifier.redelivery): written only
# as one gives up.
_partial("callback_gave_up_seq", Notification.callback_status == CallbackStatus.GAVE_UP.value, Notification.seq)
_partial("expiring_seq", Notification.expires_at.is_null(False)
         & Notification.status.in_(sorted(s.value for s in WAITING_STATUSES)), Notification.seq)
_partial("scheduled_seq", Notification.status == Status.SCHEDULED.value, Notification.seq)
_partial("keyed_created_at", Notification.idempotency_key.is_null(False), Notification.created_at)
# What waits for a digest, by user and category (notifier.digests), and the dead letters, newest first
# (notifier.deadletters). Both were indexes of every row, led by status: each claim and each `sent`
# record, changing the status, wrote a line into both (and into the key's own index, which the
# three above begin with) for rows that are neither.
_partial("held_user_category", Notification.status == Status.HELD.value, Notification.api_key,
         Notification.user_key, Notification.category)
_partial("dead_updated_at", (Notification.status == Status.FAILED.value) & Notification.digest_id.is_null(),
         Notification.updated_at, Notification.seq)
# A digest's items, found when the digest ends (and when a failed one is requeued): only rows that
# were ever in a digest.
_partial("digest_id", Notification.digest_id.is_null(False), Notification.digest_id)
# A key's mail that did not go out, by status and seq: the API's `status=` filter for those statuses (GET
# /api/notifications?status=expired). Without it that filter read every row of the key, most of them
# `sent`, for the few it wanted (0.2-0.7 s over a key's 36,000). Partial, so no claim or `sent` record
# writes a line into it: only the move into one of these statuses does, once (schema version 18).
UNSENT_STATUSES = (Status.CANCELLED, Status.EXPIRED, Status.FAILED, Status.SUPPRESSED)
_partial("key_unsent_seq", Notification.status.in_(sorted(s.value for s in UNSENT_STATUSES)), Notification.api_key,
         Notification.status, Notification.seq)
# A key's mail to one address, newest first: the API's `to` filter (GET /api/notifications?to=) and a
# user's counts by address (listing.stats_for_user). Of every row, unlike the others: the address is
# what a support desk asks about. Without it both read every row of the key (1-3 s over a key's
# 1.7 million; schema version 16 adds it).
Notification.add_index(Notification.index(Notification.api_key, fn.LOWER(Notification.to), Notification.seq,
                                          name="notifications_key_lower_to_seq"))


class Event(BaseModel):
    """One line of a notification's history: a status change or a delivery attempt."""

    notification = ForeignKeyField(Notification, backref="events", on_delete="CASCADE")
    at = DateTimeField(default=utcnow)
    kind = CharField(max_length=16, default="status")  # "status" or "callback"
    from_status = CharField(max_length=16, null=True)
    to_status = CharField(max_length=16)
    reason = TextField(null=True)
    smtp_code = SmallIntegerField(null=True)
    smtp_reply = TextField(null=True)

    class Meta:
        table_name = "notification_events"


class UserProfile(BaseModel):
    """A recipient's timezone and quiet hours, as one calling service knows them."""

    api_key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    user_key = CharField(max_length=330)
    timezone = CharField(max_length=64, default="UTC")
    quiet_start = CharField(max_length=5, null=True)  # "22:00", local time
    quiet_end = CharField(max_length=5, null=True)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "user_profiles"
        indexes = ((("api_key", "user_key"), True),)


class Preference(BaseModel):
    """How a recipient wants one category of mail: immediate, daily, weekly or off."""

    api_key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    user_key = CharField(max_length=330)
    category = CharField(max_length=32)
    mode = CharField(max_length=16)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "preferences"
        indexes = ((("api_key", "user_key", "category"), True),)


class Digest(BaseModel):
    """One digest per user, category, window and address: the unique index is what makes a second one
    impossible. By address too: a user id a caller sends to several addresses (a person's work and
    home, an organisation's people) gets one digest at each, of the items sent to it, never one
    address's mail at another."""

    api_key = ForeignKeyField(ApiKey, on_delete="CASCADE")
    user_key = CharField(max_length=330)
    category = CharField(max_length=32)
    window_end = DateTimeField()
    # Lower-cased; '' for a digest made before version 15, when a user's window had one digest.
    email = CharField(max_length=320, default="", constraints=[SQL("DEFAULT ''")])  # schema._add_missing_columns
    notification_id = CharField(max_length=36)
    items = IntegerField()
    # Indexed for retention, which forgets those made before its cutoff whose notification is gone
    # (schema version 18): it read every digest, and every notification beside them, each pass.
    created_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "digests"
        indexes = ((("api_key", "user_key", "category", "window_end", "email"), True),)


class Suppression(BaseModel):
    """An address that must not be mailed: the server said it does not exist."""

    # No index of the key alone: both below begin with it (for ON DELETE CASCADE, say).
    api_key = ForeignKeyField(ApiKey, on_delete="CASCADE", index=False)
    email = CharField(max_length=320)
    reason = TextField()
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "suppressions"
        # By email for a send's lookup; by id for the API's pages of a key's list, newest first.
        indexes = ((("api_key", "email"), True), (("api_key", "id"), False))


class SchemaVersion(BaseModel):
    version = IntegerField()

    class Meta:
        table_name = "schema_version"


MODELS = (ApiKey, Notification, Event, UserProfile, Preference, Digest, Suppression, SchemaVersion)
