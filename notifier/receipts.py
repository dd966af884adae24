"""Sent receipts: what a worker keeps in Redis as soon as the SMTP server has taken an email, until
the database holds its `sent` record.

Without a receipt, a notification whose worker was killed between the server's `250` and the `sent`
record (a few milliseconds at the median; longer behind a lock, or while the database is away) stays
`sending`, and once SENDING_TIMEOUT has passed the reconciler can only assume its worker died before
the server answered, so it sends the email again. A receipt shows the email went out, for as long as
Redis keeps it. Whoever finds it next records the `sent`: the worker when its next job finds the
database answering, a job for the same notification, or the reconciler. A compare-and-set from
`sending` makes sure exactly one of them does. The worker deletes the receipt with its next heartbeat
once its own record is written. Only when Redis is away too (or loses the receipt), or the worker
dies in the one round trip between the `250` and the receipt (at most KEEP_TIMEOUT_SECONDS), is
there nothing to find, and recovery may still send the email twice.

A job whose `sent` record the database would not take fails (SentNotRecorded, or the database error
of a retry that came too soon), and once out of retries RQ files it in its failed registry. Whoever
records the receipt takes that job out again. The dead-letter API and `dlq list` read the database,
where the notification was never `failed`, so they never listed it; the registry is what
rq-dashboard's Failed list shows, and there it stayed a failure for DEAD_LETTER_TTL_DAYS, an email
that went out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from redis import Redis
from redis.exceptions import RedisError

from notifier import metrics, queues, store
from notifier.config import Settings
from notifier.models import Notification, Status

logger = logging.getLogger(__name__)

KEY_PREFIX = "notifier:sent-receipt:"
# How long a worker waits for Redis to keep a receipt, with the server's answer in hand and the `sent`
# record waiting: Redis answers in well under a millisecond; one frozen or failing over would hold
# the record (and widen the window a kill leaves) for its whole socket timeout.
KEEP_TIMEOUT_SECONDS = 0.5
# Longer than any outage the database can have while Redis stays up. A worker deletes the receipts it
# recorded with its next heartbeat, and the reconciler records the rest SENDING_TIMEOUT after the
# database is back, so they do not pile up; those a killed worker did not delete expire.
TTL_SECONDS = 7 * 86400
LATE_REASON = ("accepted by SMTP server; recorded late, from the receipt its worker kept in Redis (the database "
               "was unavailable, or the worker was lost before it could record it)")


@dataclass(frozen=True)
class Receipt:
    """What the `sent` record of one notification holds."""

    notification_id: str
    smtp_code: int | None
    smtp_reply: str | None
    message_id: str | None
    sent_at: datetime  # naive UTC, as every column stores it
    # The RQ job that sent it (None outside a job, and in receipts kept before this was stored).
    job_id: str | None = None

    def fields(self) -> dict:
        """The changes store.transition() makes for this `sent` record."""
        return {"smtp_code": self.smtp_code, "smtp_reply": self.smtp_reply, "message_id": self.message_id,
                "sent_at": self.sent_at, "last_error": None}


def _key(notification_id: str) -> str:
    return f"{KEY_PREFIX}{notification_id}"


def keep(redis: Redis | None, receipt: Receipt) -> bool:
    """Store receipt in Redis for TTL_SECONDS; False (logged) when Redis cannot take it either."""
    if redis is None:
        return False
    value = json.dumps({"smtp_code": receipt.smtp_code, "smtp_reply": receipt.smtp_reply,
                        "message_id": receipt.message_id, "sent_at": receipt.sent_at.isoformat(),
                        "job_id": receipt.job_id})
    try:
        redis.set(_key(receipt.notification_id), value, ex=TTL_SECONDS)
    except RedisError as exc:
        logger.warning("notification %s: sent receipt not kept: %s", receipt.notification_id, type(exc).__name__)
        return False
    return True


def find(redis: Redis, notification_ids: list[str]) -> dict[str, Receipt]:
    """The receipts kept for any of these notifications, by id, read in one round trip. Raises
    RedisError: a caller that cannot tell whether an email went out must not act as if it had not."""
    if not notification_ids:
        return {}
    return parsed(notification_ids, redis.mget(keys(notification_ids)))


def keys(notification_ids: list[str]) -> list[str]:
    """The Redis keys of these notifications' receipts, for a caller that reads them in its own pipeline."""
    return [_key(i) for i in notification_ids]


def parsed(notification_ids: list[str], values: list[bytes | None]) -> dict[str, Receipt]:
    """The receipts among values, as MGET of keys(notification_ids) answered, by notification id."""
    found = {i: _parsed(i, v) for i, v in zip(notification_ids, values, strict=True) if v is not None}
    return {i: r for i, r in found.items() if r is not None}


def _parsed(notification_id: str, value: bytes) -> Receipt | None:
    try:
        data = json.loads(value)
        return Receipt(notification_id, data["smtp_code"], data["smtp_reply"], data["message_id"],
                       datetime.fromisoformat(data["sent_at"]), data.get("job_id"))
    except (ValueError, KeyError, TypeError):
        # No notifier version writes such a receipt. Leave it for a person to read, and recover the
        # notification as before.
        logger.warning("notification %s: sent receipt not understood; left as it is", notification_id)
        return None


def forget(redis: Redis | metrics.Deferred | None, notification_ids: list[str]) -> None:
    """Delete these receipts (with a worker's next heartbeat, given its metrics.Deferred). A receipt
    that stays behind does no harm: it says only that the server took an email of the notification,
    which stays true, it is read only for a notification still `sending`, and it expires."""
    names = keys(notification_ids)
    if isinstance(redis, metrics.Deferred):
        redis.add(lambda pipe: pipe.delete(*names))
        return
    if redis is None:
        return
    try:
        redis.delete(*names)
    except RedisError as exc:
        logger.debug("sent receipts not deleted: %s", type(exc).__name__)


def record(redis: Redis, settings: Settings, notification: Notification, receipt: Receipt,
           counts: Redis | metrics.Deferred | None) -> bool:
    """Record a kept receipt as the `sent` of notification (as read, still `sending`). Counts it,
    queues the callbacks it owes, takes the job that sent it out of RQ's failed registry and deletes
    the receipt. Returns whether this call made the record: a notification that moved on meanwhile
    (another process recorded the same receipt) is left alone."""
    recorded = store.transition(notification.id, Status.SENT, reason=LATE_REASON, sources=(Status.SENDING,),
                                known=notification, **receipt.fields())
    if recorded:
        # Counted here and not by the worker that gave up: the compare-and-set picks one recorder.
        metrics.sent(counts, notification, receipt.smtp_code, at=receipt.sent_at)
        logger.info("notification %s sent at %s; recorded late from its receipt", notification.id,
                    receipt.sent_at.isoformat())
        queues.dispatch_callback(redis, settings, store.get(notification.id))
        if receipt.job_id is not None:
            _unfile(redis, notification.id, receipt.job_id)
        # Only when this call recorded it: one that lost leaves what may be a later attempt's receipt.
        forget(redis, [notification.id])
    return recorded


def _unfile(redis: Redis, notification_id: str, job_id: str) -> None:
    # Only the job the receipt names, the one that sent the email and gave up: any other failed job,
    # of this notification or of its batch, failed for a reason of its own. The job itself stays: it
    # may be the very job recording this receipt, run again by RQ.
    try:
        queues.unfile_failed(redis, [job_id])
    except RedisError as exc:
        # The record is made; the entry only lingers in rq-dashboard's Failed list until it expires.
        logger.warning("notification %s: its job left in RQ's failed registry: %s", notification_id,
                       type(exc).__name__)
