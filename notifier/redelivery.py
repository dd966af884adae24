"""Status callbacks posted again on request: after one gave up (the caller's endpoint was down for
longer than CALLBACK_RETRY_INTERVALS last, or refused it), or after one was delivered and lost on
the caller's side. Without this a caller whose endpoint was away for an hour never heard how that
hour's notifications ended, except by reading each one.

The event is the one the notification owes now, with the same Notifier-Event-Id, so a receiver that
took it before drops it as a duplicate; it gets a fresh set of attempts, on the usual schedule."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from redis import Redis
from redis.exceptions import RedisError

from notifier import queues, store
from notifier.config import Settings
from notifier.db import database
from notifier.errors import Conflict, NotFound
from notifier.models import FINAL_STATUSES, ApiKey, CallbackStatus, Notification

logger = logging.getLogger(__name__)

# What may be posted again: a callback no job is posting or will post (None: a final row that never
# owed one, though it has a callback_url). A pending one is on its way.
REDELIVERABLE = (CallbackStatus.GAVE_UP.value, CallbackStatus.DELIVERED.value)
PAGE = 500


def redeliver(redis: Redis | None, settings: Settings, notification_id: str, api_key: ApiKey | None = None,
              by: str = "the caller") -> Notification:
    """Post the status event of a final notification again (api_key: only one of that key's); returns
    the notification, its callback `pending`. One whose callback is pending already is returned as
    it is. Raises NotFound, or Conflict when it has no callback_url or is not final yet."""
    while True:
        row = store.get_for_key(api_key, notification_id) if api_key is not None else store.get(notification_id)
        if row is None:
            raise NotFound("no such notification")
        if not row.callback_url:
            raise Conflict(f"notification {row.id} has no callback_url", code="no_callback")
        if row.status not in FINAL_STATUSES:
            raise Conflict(f"notification {row.id} is {row.status}: its event is posted when it reaches a final "
                           "state", {"status": row.status}, code="not_final")
        if row.callback_status == CallbackStatus.PENDING.value:
            return row
        with database.atomic():
            # Only as read: a dead letter requeued meanwhile owes another event, on its own schedule;
            # read again, it is answered for what it is now.
            made = (Notification.update(callback_status=CallbackStatus.PENDING.value, callback_attempts=0)
                    .where((Notification.seq == row.seq) & (Notification.status == row.status)
                           & (Notification.final_moves == row.final_moves)
                           & (Notification.callback_status.in_(REDELIVERABLE) | Notification.callback_status.is_null()))
                    .execute())
            if made:
                store.record(row.id, kind="callback", reason=f"callback to be posted again, as {by} asked")
        if made:
            current = store.get(row.id)
            _enqueue(redis, settings, current)
            return current


def _enqueue(redis: Redis | None, settings: Settings, notification: Notification) -> None:
    if redis is None:
        return
    try:
        queues.enqueue_callback(redis, settings, notification.id)
    except RedisError as exc:
        # Pending in the database: the reconciler queues it once Redis answers.
        logger.warning("callback for notification %s not queued: %s", notification.id, type(exc).__name__)


def gave_up(api_key: ApiKey | None = None, since: datetime | None = None) -> Iterator[str]:
    """The ids of final notifications whose callback gave up, oldest first (api_key: of that key only;
    since: that became final at or after it, naive UTC), a page at a time."""
    after = 0
    while True:
        query = (Notification.select(Notification.seq, Notification.id)
                 .where((Notification.callback_status == CallbackStatus.GAVE_UP.value) & (Notification.seq > after)))
        if api_key is not None:
            query = query.where(Notification.api_key == api_key.id)
        if since is not None:
            query = query.where(Notification.updated_at >= since)
        page = list(query.order_by(Notification.seq).limit(PAGE))
        yield from (n.id for n in page)
        if len(page) < PAGE:
            return
        after = page[-1].seq
