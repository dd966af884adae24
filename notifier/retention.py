"""Retention: notifications that ended more than RETENTION_DAYS ago are deleted, with their history.

A notification holds a recipient's address and what was sent to them; a service that keeps every one
forever keeps that personal data forever, and a table that only grows. Only what can never be needed
again goes: a final status (sent, failed, ...), reached before the cutoff, no callback still owed,
no idempotency key still remembered (the reconciler forgets keys after IDEMPOTENCY_TTL_DAYS, so a
retry can never be taken for a new send), and a dead letter not before its RQ job has expired
(DEAD_LETTER_TTL_DAYS), while `dlq requeue` may still be asked for it. The record of a digest made
goes once its notification has.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from peewee import fn

from notifier.config import Settings
from notifier.models import FINAL_STATUSES, CallbackStatus, Digest, Notification, Status, utcnow

logger = logging.getLogger(__name__)

PAGE = 500
# A periodic pass stops starting pages after this long; the next pass (scheduler.PURGE_SECONDS later)
# goes on. A first pass over years of mail would otherwise hold a worker, and the urgent mail it would
# take next, for as long as it takes.
PASS_SECONDS = 10.0


@dataclass(frozen=True)
class Cutoffs:
    ended: datetime  # a notification that reached its final status before this may go
    dead_letter: datetime  # and a failed one before this (its RQ job, that `dlq requeue` needs, expired)

    @classmethod
    def of(cls, settings: Settings, now: datetime) -> Cutoffs:
        days = settings.retention_days
        return cls(now - timedelta(days=days), now - timedelta(days=max(days, settings.dead_letter_ttl_days)))

    def condition(self):
        """Which rows may go, as SQL: checked again by the DELETE itself, so a row that moved since it
        was read (a dead letter requeued, a callback owed again) is left alone."""
        final = [s.value for s in FINAL_STATUSES]
        return (
            Notification.status.in_(final)
            & (Notification.updated_at < self.ended)
            & ((Notification.status != Status.FAILED.value) | (Notification.updated_at < self.dead_letter))
            & (Notification.callback_status.is_null() | (Notification.callback_status != CallbackStatus.PENDING.value))
            & Notification.idempotency_key.is_null()
        )


def purge(settings: Settings, now: datetime | None = None, seconds: float | None = PASS_SECONDS) -> int:
    """Delete what retention no longer keeps, a page at a time; return how many notifications went.
    Nothing when RETENTION_DAYS is 0. seconds: when to stop starting pages (None: until done)."""
    if settings.retention_days <= 0:
        return 0
    cutoffs = Cutoffs.of(settings, now or utcnow())
    started, after, deleted = time.monotonic(), 0, 0
    while seconds is None or time.monotonic() - started < seconds:
        # Walk the primary key from the oldest row: seq grows with created_at, so the rows that may go
        # come first and the walk ends at the first page made after the cutoff. What stays behind it
        # (mail still waiting, an owed callback) is read again each pass, and is little.
        page = list(
            Notification.select(Notification.seq, Notification.created_at)
            .where(Notification.seq > after)
            .order_by(Notification.seq)
            .limit(PAGE)
            .tuples()
        )
        if not page:
            break
        seqs = [seq for seq, _ in page]
        deleted += _delete(cutoffs, seqs[0], seqs[-1])
        after = seqs[-1]
        if min(created for _, created in page) >= cutoffs.ended:
            break
    _forget_digests(cutoffs)
    if deleted:
        logger.info("retention: deleted %d notifications that ended over %d days ago", deleted,
                    settings.retention_days)
    return deleted


def _forget_digests(cutoffs: Cutoffs) -> None:
    # The record of each digest made (one per user, category and window, so none is made twice) names
    # the user; once its notification is gone, and its window long past, nothing reads it again.
    gone = ~fn.EXISTS(Notification.select(Notification.seq).where(Notification.id == Digest.notification_id))
    Digest.delete().where((Digest.created_at < cutoffs.ended) & gone).execute()


def _delete(cutoffs: Cutoffs, first: int, last: int) -> int:
    # One statement: the history goes with each row by the foreign key's ON DELETE CASCADE (SQLite's
    # connections turn foreign keys on, notifier.db), so no row is ever left without its history or
    # history without its row, whatever moves meanwhile.
    return Notification.delete().where(Notification.seq.between(first, last) & cutoffs.condition()).execute()
