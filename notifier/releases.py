"""Releasing the delayed sends that are due, many at once: what scheduler.py does with the release
entries rq-scheduler finds due.

rq-scheduler moves each due job onto its queue alone (a fetch, an enqueue and a removal, each a round
trip), and each delayed send took two jobs: that release job, run by a worker, then the delivery job
it queued. 1,000 sends due at one second went out over 28-45 s on a loaded 2-core machine, 5,000 over
four minutes, and a high-priority send due with 5,000 low ones waited up to 35 s. Here the due entries
are read in one call; their notifications move `scheduled` -> `queued` a page at a time, highest
priority first (the compare-and-set and the history lines in one statement a page on PostgreSQL:
store.release), and each page goes to its queues in shared jobs (queues.shared_job_ids, as a
batch's) in one pipeline that also takes its entries out of the schedule. The release job itself
never runs. The reconciler releases what is overdue (a schedule Redis lost) with the same release().

What it does not settle is left to rq-scheduler, which moves that release job as it always did: a
notification whose send_at is still ahead (a clock step) is put back for its time by the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from redis import Redis
from redis.client import Pipeline
from rq.job import Job
from rq.serializers import resolve_serializer
from rq_scheduler import Scheduler
from rq_scheduler.utils import to_unix

from notifier import queues, store
from notifier.config import Settings
from notifier.db import model_from
from notifier.models import Notification, Priority, Status

logger = logging.getLogger(__name__)

# Notifications moved and handed to Redis together: the first page of a lot due at one moment is on
# its queues within milliseconds, and no statement grows with the lot.
PAGE = 500
# Release entries one poll takes at most (the oldest first); the rest wait for the next poll, a
# second later. A scheduler down for a day would otherwise read every entry it missed at once.
MOST_PER_POLL = 10_000
REASON = "send time reached"
_RANK = {p.value: rank for rank, p in enumerate(Priority)}  # highest first
_COLUMNS = (Notification.seq, Notification.id, Notification.status, Notification.priority, Notification.send_at,
            Notification.attempts)
_NAMES = tuple(column.name for column in _COLUMNS)


def release_due(redis: Redis, settings: Settings, now: datetime, renew: Callable[[], None] | None = None) -> set[str]:
    """Release every notification whose release entry is due at now (naive UTC), and take those
    entries out of rq-scheduler's schedule, with the entries of notifications no longer `scheduled`
    (cancelled, released by the reconciler). Returns the entries left for rq-scheduler to move one at
    a time. renew: called after each page (the scheduler keeps its lock with it). Raises RedisError,
    and the database's errors: what was not released stays scheduled, and the next poll tries again."""
    due = [job_id.decode() for job_id in redis.zrangebyscore(Scheduler.scheduled_jobs_key, 0, to_unix(now),
                                                             start=0, num=MOST_PER_POLL)]
    entries: dict[str, list[str]] = {}
    for job_id in due:
        if (notification_id := queues.notification_of_release(job_id)) is not None:
            entries.setdefault(notification_id, []).append(job_id)
    if not entries:
        return set()
    ids = list(entries)
    rows = [model_from(Notification, dict(zip(_NAMES, row, strict=True))) for row in store.rows_of(ids, _COLUMNS)]
    scheduled = {row.id for row in rows if row.status == Status.SCHEDULED}
    early = {row.id for row in rows if row.id in scheduled and row.send_at > now}
    due_rows = sorted((row for row in rows if row.id in scheduled and row.id not in early),
                      key=lambda row: (_RANK[row.priority], row.seq))
    # Entries of notifications gone or no longer scheduled: nothing to release, nothing to keep.
    settled = [job_id for notification_id, job_ids in entries.items() if notification_id not in scheduled
               for job_id in job_ids]
    if settled:
        with redis.pipeline(transaction=False) as pipe:
            _drop(pipe, settled)
            pipe.execute()
    for start in range(0, len(due_rows), PAGE):
        page = due_rows[start:start + PAGE]
        request_ids = _request_ids(redis, [entries[row.id][0] for row in page])
        done = [job_id for row in page for job_id in entries[row.id]]
        release(redis, settings, page, REASON, request_ids={row.id: request_ids[entries[row.id][0]] for row in page},
                also=lambda pipe, done=done: _drop(pipe, done))
        if renew is not None:
            renew()
    if due_rows:
        logger.info("released %s delayed notifications", len(due_rows))
    return {job_id for notification_id in early for job_id in entries[notification_id]}


def release(redis: Redis, settings: Settings, rows: list[Notification], reason: str,
            request_ids: dict[str, str | None] | None = None,
            also: Callable[[Pipeline], None] | None = None) -> list[Notification]:
    """Move rows (scheduled and due, a page of them) to `queued`, highest priority first, each in the
    shared job it goes in (BATCH_JOB_SIZE of one priority: queues.shared_job_ids), and hand those
    that moved to their queues in one pipeline with whatever `also` adds to it. request_ids: the
    request each came from, by id (their jobs name them: queues.traced_members), when not the one
    being served. Returns the moved ones, as moved. Redis away: the reconciler queues them later."""
    rows = sorted(rows, key=lambda row: (_RANK[row.priority], row.seq))
    job_ids = queues.shared_job_ids(settings, [row.priority for row in rows])
    by_seq = {row.seq: job_id for row, job_id in zip(rows, job_ids, strict=True)}
    moved = set(store.release(by_seq, reason=reason))
    out = []
    for row in rows:
        if row.seq in moved:
            row.status, row.job_id = Status.QUEUED.value, by_seq[row.seq]
            out.append(row)
    queues.dispatch_many(redis, settings, out, also=also, request_ids=request_ids)
    return out


def _request_ids(redis: Redis, job_ids: list[str]) -> dict[str, str | None]:
    """The id of the request each release job came from (its meta), by job id; None where none is
    known. Raises RedisError."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "meta")
        metas = pipe.execute()
    serializer = resolve_serializer(None)  # RQ's default, which every job of ours is saved with
    out = {}
    for job_id, raw in zip(job_ids, metas, strict=True):
        try:
            meta = serializer.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - an unreadable meta loses a log field, never the send
            meta = {}
        out[job_id] = meta.get(queues.REQUEST_ID_META) if isinstance(meta, dict) else None
    return out


def _drop(pipe: Pipeline, job_ids: list[str]) -> None:
    """Take release entries out of the schedule, their jobs with them (never run, nothing to keep)."""
    pipe.zrem(Scheduler.scheduled_jobs_key, *job_ids)
    pipe.delete(*(Job.key_for(job_id) for job_id in job_ids))
