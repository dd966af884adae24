"""The reconciler: PostgreSQL knows what is owed; this puts back into Redis whatever Redis lost.

scheduler.py runs it every RECONCILE_INTERVAL seconds (a periodic rq-scheduler job with a stable id).
Each pass, in pages of BATCH rows (at most MAX_PAGES a step):
  1. expires notifications whose deadline passed before they were sent;
  2. releases delayed notifications whose send time passed but whose release job never ran, and
     schedules again the release of those due before the next pass whose release job Redis lost
     (flushed, restarted empty), so that they still go out on time;
  3. recovers notifications stuck in `sending` past SENDING_TIMEOUT. One whose worker kept a sent
     receipt in Redis (the server took the email while the database was away) is recorded `sent`.
     One whose job a live worker is still running is left to it: the send is only slow (RQ's job
     timeout bounds it). Any other lost its worker mid-send and goes out again: the one case where a
     message may go out twice, so each one is recorded and counted;
  4. re-enqueues `queued` (a priority at a time, most urgent first) and `retrying` notifications
     whose job is gone from Redis (flushed, restarted empty, lost between BLPOP and a crash, or
     failed by RQ as abandoned);
  5. re-enqueues owed status callbacks whose job is gone;
  6. forgets idempotency keys older than IDEMPOTENCY_TTL_DAYS.
Nothing here sends mail: it only hands work back to the queues, and the claim in the delivery job
keeps a notification that ends up queued twice from being sent twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from peewee import Value, fn
from redis import Redis
from rq import Worker
from rq.job import Job
from rq.utils import parse_composite_key, utcparse
from rq_scheduler import Scheduler

from notifier import metrics, queues, receipts, releases, store
from notifier.config import Settings
from notifier.db import execute_once, is_postgres
from notifier.models import WAITING_STATUSES, CallbackStatus, Event, Notification, Priority, Status, utcnow

logger = logging.getLogger(__name__)

BATCH = 500
# Pages of BATCH one step (each status of the requeue step, each priority of queued work) may take
# in a pass. One page a pass brought a backlog that Redis lost back at 500 rows per
# RECONCILE_INTERVAL (17 a second at the default 30 s, against workers that send hundreds). Past a
# step's first page, a pass also stops at half the interval (see reconcile), so that it has ended
# before the next is due.
MAX_PAGES = 20
RECOVERED_REASON = "recovered: the worker was lost mid-send, so this message may have been sent already"


@dataclass
class Report:
    expired: int = 0
    released: int = 0
    rescheduled: int = 0
    recovered: int = 0
    recorded_late: int = 0
    requeued: int = 0
    callbacks: int = 0
    keys_forgotten: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def reconcile(settings: Settings, redis: Redis, now: datetime | None = None) -> Report:
    """One pass over the database; returns what it did."""
    now = now or utcnow()
    settled = now - timedelta(seconds=settings.reconcile_grace_seconds)
    # rq-scheduler queues the next pass when the interval is up, running or not: a long one (a large
    # backlog lost from Redis, a slow database) leaves the rest of its pages to the next.
    stop_at = time.monotonic() + settings.reconcile_interval / 2
    report = Report()
    try:
        # Each step counts into the report as it goes, so a pass that stops half-way (the database
        # went away) still reports what it did: `recovered` above all.
        _expire(redis, settings, now, report, stop_at)
        _release(redis, settings, settled, report, stop_at)
        _reschedule(redis, settings, settled, now, report, stop_at)
        _recover(redis, settings, now, report, stop_at)
        _requeue(redis, settings, settled, now - timedelta(seconds=settings.sending_timeout), report, stop_at)
        _callbacks(redis, settings, settled, report, stop_at)
        _forget_keys(now - timedelta(days=settings.idempotency_ttl_days), report, stop_at)
    finally:
        if any(asdict(report).values()):
            logger.info("reconciled: %s", report.as_dict())
            metrics.reconciled(redis, report.as_dict())
    return report


def _pages(*conditions, stop_at: float) -> Iterator[list[Notification]]:
    """The rows that meet conditions, BATCH at a time in seq order: at most MAX_PAGES pages, and
    none after the first once the pass is at stop_at (time.monotonic()). Each page starts
    after the last one's seq, so rows left where they were are not read again, and on PostgreSQL a
    partial index by seq of the rows each step looks for finds it (see models.Notification)."""
    after = 0
    for page in range(MAX_PAGES):
        if page and time.monotonic() >= stop_at:
            return
        query = Notification.select().where(Notification.seq > after, *conditions)
        rows = list(query.order_by(Notification.seq).limit(BATCH))
        if rows:
            yield rows
        if len(rows) < BATCH:
            return
        after = rows[-1].seq


def _expire(redis: Redis, settings: Settings, now: datetime, report: Report, stop_at: float) -> None:
    waiting = tuple(WAITING_STATUSES)
    for rows in _pages(Notification.status.in_([s.value for s in waiting]), Notification.expires_at <= now,
                       stop_at=stop_at):
        for row in _move_each(rows, Status.EXPIRED, "deadline passed before it could be sent", waiting):
            report.expired += 1
            # Counted as a worker counts one it finds late: an alert on this metric sees every expiry.
            metrics.expired(redis, row)
            queues.dispatch_callback(redis, settings, row)


def _release(redis: Redis, settings: Settings, settled: datetime, report: Report, stop_at: float) -> None:
    reason = "send time reached (released by the reconciler)"
    for rows in _pages(Notification.status == Status.SCHEDULED.value, Notification.send_at <= settled,
                       stop_at=stop_at):
        # A page at a time, as scheduler.py releases what is due (a whole schedule Redis lost, once
        # overdue, comes back in shared jobs, not a job each).
        report.released += len(releases.release(redis, settings, rows, reason))


# How soon after a notification becomes `scheduled` the process that made it has written its release
# (a batch of 1,000 takes well under a second).
RELEASES_WRITTEN_WITHIN = timedelta(seconds=10)


def _reschedule(redis: Redis, settings: Settings, settled: datetime, now: datetime, report: Report,
                stop_at: float) -> None:
    # Without this, a delayed send whose release job Redis lost waited until _release found it
    # overdue: up to RECONCILE_GRACE_SECONDS and a RECONCILE_INTERVAL late (a minute at the
    # defaults). Those due before the pass after next are looked at, so a pass that starts late
    # still finds each before its time. A release scheduled twice (the API's racing this, or one
    # that woke early and put itself back under another id) releases once: the second finds the
    # notification no longer `scheduled` (jobs.Deliverer.release).
    soon = now + timedelta(seconds=2 * settings.reconcile_interval)
    # Those due after the next pass only once scheduled RELEASES_WRITTEN_WITHIN ago: a batch writes its
    # releases one by one after its commit, and a pass meanwhile counted hundreds it had not written yet
    # as lost (`rescheduled`). What is due before the next pass is looked at however young: left to
    # it, one whose release Redis lost would go a pass late.
    settled_or_due = ((Notification.updated_at <= now - RELEASES_WRITTEN_WITHIN)
                      | (Notification.send_at <= now + timedelta(seconds=settings.reconcile_interval)))
    for rows in _pages(Notification.status == Status.SCHEDULED.value, Notification.send_at > settled,
                       Notification.send_at <= soon, settled_or_due, stop_at=stop_at):
        for row in _without_release(redis, rows):
            queues.schedule_release(redis, settings, row.id, row.send_at, row.priority,
                                    job_id=queues.release_job_id_of(row))
            report.rescheduled += 1


def _without_release(redis: Redis, rows: list[Notification]) -> list[Notification]:
    """Those of rows (scheduled) whose release job (the one recorded with the row when a worker put
    it off, or a release woke early: queues.release_job_id_of) is neither in rq-scheduler's schedule
    nor queued or running. Raises RedisError."""
    job_ids = [queues.release_job_id_of(row) for row in rows]
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.zscore(Scheduler.scheduled_jobs_key, job_id)
            pipe.hget(Job.key_for(job_id), "status")
        replies = pipe.execute()
    return [row for row, score, state in zip(rows, replies[::2], replies[1::2], strict=True)
            if score is None and state not in (b"queued", b"started")]


def _move_each(rows, target: Status, reason: str, sources) -> Iterator[Notification]:
    """Move each row to target (a compare-and-set each) and yield the moved ones, read again."""
    for row in rows:
        if store.transition(row.id, target, reason=reason, sources=sources):
            yield store.get(row.id)


def _recover(redis: Redis, settings: Settings, now: datetime, report: Report, stop_at: float) -> None:
    sending = Notification.status == Status.SENDING.value
    stuck_before = now - timedelta(seconds=settings.sending_timeout)
    # A worker killed outright is taken for dead once its key's TTL is out (_running): JOB_TIMEOUT and
    # 60 s after its last heartbeat, which came before the claim. No live worker is still sending then.
    limit_passed = now - timedelta(seconds=settings.job_timeout + 60)
    for rows in _pages(sending, Notification.updated_at <= stuck_before, stop_at=stop_at):
        # Without Redis this raises and the pass stops: recovering a row whose receipt could not be
        # read would send again an email known to have gone out, and one whose job could not be read
        # may still be going out.
        kept, running, since, forgotten = _receipts_and_running_jobs(redis, rows)
        for row in rows:
            if row.id in kept:
                if receipts.record(redis, settings, row, kept[row.id], redis):
                    report.recorded_late += 1
                continue
            if queues.job_id_of(row) in running:
                # Its worker is alive and still in the job that claimed it: the server is slow to answer,
                # or the `sent` record waits for the database. Taking it back would send it twice.
                logger.info("notification %s sending past SENDING_TIMEOUT; its worker is still at it", row.id)
                continue
            unseen = (since is not None and row.updated_at < since) or row.job_id in forgotten
            if unseen and limit_passed < row.updated_at:
                # Claimed before Redis lost what it knew of the running jobs (queues.REMEMBERS_SINCE_KEY),
                # or by a batch's shared job that started before (Redis no longer holds the job): its
                # worker may still be at it, unseen. A soak found one sent twice, its history saying
                # the worker was lost, when Redis restarted during a slow server's answer. A shared job
                # claims its emails one at a time, long after it started: its claims after Redis's
                # memory began are not shown running either (SimpleWorker sends no heartbeat inside a
                # job, and the job's keep-alive only renews keys), so their claim time says nothing.
                logger.info("notification %s sending past SENDING_TIMEOUT, claimed by a job started before Redis "
                            "lost its record of running jobs; left until JOB_TIMEOUT + 60 s after its claim", row.id)
                continue
            if row.attempts < settings.max_attempts:
                moved = store.transition(row.id, Status.RETRYING, reason=RECOVERED_REASON, sources=(Status.SENDING,),
                                         last_error="worker lost mid-send")
                if moved:
                    queues.dispatch(redis, settings, store.get(row.id))
            else:
                moved = store.transition(row.id, Status.FAILED, sources=(Status.SENDING,),
                                         reason="the worker was lost during the final attempt; delivery is unknown",
                                         last_error="worker lost during the final attempt")
                if moved:
                    # Counted as a worker counts a final failure: accepted and never counted as what it
                    # ended as, it was missing from the metrics' outcomes (sent, failed, expired).
                    metrics.attempt_failed(redis, row, None, final=True)
                    queues.dispatch_callback(redis, settings, store.get(row.id))
            if moved:
                logger.warning("notification %s recovered from a lost worker (possible duplicate)", row.id)
                report.recovered += 1


def _receipts_and_running_jobs(redis: Redis, rows: list[Notification]) -> tuple[dict[str, receipts.Receipt],
                                                                                 set[str], datetime | None, set[str]]:
    """The sent receipts kept for rows, the ids of the jobs a live worker is running now (the rows'
    jobs are queues.job_id_of them), since when Redis remembers which those are
    (queues.REMEMBERS_SINCE_KEY, noted now if it was not), and the ids of the rows' shared jobs Redis
    no longer holds (it lost them with its memory, or they ended long ago). Two round trips for the
    page: the receipts, shared jobs and RQ's registry of workers, then each worker's state and
    executions. Raises RedisError."""
    ids = [row.id for row in rows]
    shared = sorted({row.job_id for row in rows if row.job_id is not None})
    with redis.pipeline(transaction=False) as pipe:
        pipe.mget(receipts.keys(ids))
        pipe.smembers(Worker.redis_workers_keys)
        queues.mark_memory(pipe)
        pipe.get(queues.REMEMBERS_SINCE_KEY)
        for job_id in shared:
            pipe.exists(Job.key_for(job_id))
        values, registered, _, since, *held = pipe.execute()
    names = sorted(key.decode().removeprefix(Worker.redis_worker_namespace_prefix) for key in registered)
    forgotten = {job_id for job_id, exists in zip(shared, held, strict=True) if not exists}
    return receipts.parsed(ids, values), _running(redis, names), queues.remembers_since(since), forgotten


def _running(redis: Redis, workers: list[str]) -> set[str]:
    """The ids of the jobs these workers (names) are running, of those alive, read in one round trip.

    Not from the job's own hash (its status and worker_name): one job id can be queued twice (the
    reconciler hands on a job taken from its queue but not started yet, an enqueue whose answer
    timed out), and the second run, which finds the notification claimed and skips it, writes
    `finished` over the first run's `started` while the first is still sending.

    Alive as RQ tells it (Worker.register_birth): the worker's key is there and holds no `death`. A
    worker's heartbeat keeps the key as long as the job it starts may run (JOB_TIMEOUT) and 60 s
    more; a shared job, whose timeout is JOB_TIMEOUT per email, keeps it that long from one email to
    the next (jobs.KEEP_ALIVE_SECONDS) instead; and a worker that stops registers its death. One
    killed outright says nothing: its key stays until that TTL runs out, and the notification it was
    sending is recovered then, no sooner than a live worker could still be sending it. (RQ's own
    maintenance calls a single job abandoned at about that time, its started-registry entry having
    the same TTL.) Running: the job is among the worker's executions, which RQ adds as the job
    starts and takes out as it ends."""
    if not workers:
        return set()
    with redis.pipeline(transaction=False) as pipe:
        for name in workers:
            key, executions = queues.worker_keys(name)
            pipe.hmget(key, "last_heartbeat", "death")
            pipe.smembers(executions)
        replies = pipe.execute()
    running: set[str] = set()
    for (heartbeat, death), executions in zip(replies[::2], replies[1::2], strict=True):
        if heartbeat is not None and death is None:
            running |= {parse_composite_key(member.decode())[0] for member in executions}
    return running


def _missing_jobs(redis: Redis, job_ids: list[str], queue_names: list[str],
                  started_before: datetime | None = None) -> set[str]:
    """The job ids Redis no longer holds as live work. With started_before, a job that started before
    it counts as gone too: its notification would have been claimed long since, so the worker died
    (RQ only calls a dead worker's job abandoned after the job's whole timeout, and a batch's shared
    job has many notifications to reach)."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(Job.key_for(job_id), "status", "started_at")
        found = pipe.execute()
    states = [state for state, _ in found]
    missing = {job_id for job_id, state in zip(job_ids, states, strict=True) if state not in queues.LIVE_JOB_STATES}
    if started_before is not None:
        missing |= {job_id for job_id, (state, started) in zip(job_ids, found, strict=True)
                    if state == b"started" and started
                    and utcparse(started.decode()).replace(tzinfo=None) < started_before}
    # A job marked queued but in no queue list was lost between BLPOP and a crash.
    queued = [(job_id, name) for job_id, state, name in zip(job_ids, states, queue_names, strict=True)
              if state == b"queued"]
    if queued:
        with redis.pipeline(transaction=False) as pipe:
            for job_id, name in queued:
                pipe.lpos(f"rq:queue:{name}", job_id)
            positions = pipe.execute()
        missing |= {job_id for (job_id, _), pos in zip(queued, positions, strict=True) if pos is None}
    return missing


def _requeue(redis: Redis, settings: Settings, settled: datetime, stuck_before: datetime, report: Report,
             stop_at: float) -> None:
    # Queued work a priority at a time, the most urgent first: a password reset that Redis lost (a
    # failover drops the newest writes) must not wait until a bulk backlog queued before it drains.
    lots = [(Status.QUEUED, (Notification.priority == p.value,)) for p in Priority]  # highest first
    for status, lot in (*lots, (Status.RETRYING, ())):
        for rows in _pages(Notification.status == status.value, *lot, Notification.updated_at <= settled,
                           stop_at=stop_at):
            missing = _missing_jobs(redis, [queues.job_id_of(r) for r in rows],
                                    [queues.QUEUE_NAMES[r.priority] for r in rows], started_before=stuck_before)
            if not missing and status == Status.QUEUED:
                # A queued backlog waiting its turn costs one page of its priority a pass: each page
                # deeper would look for its jobs further down a long queue (LPOS), and what was lost
                # behind it is reached as it drains, which it would have waited for anyway. Retries
                # wait in RQ's scheduled registry instead, an hour for the last one, so their pages
                # go on while the pass has time.
                break
            _requeue_rows(redis, settings, [r for r in rows if queues.job_id_of(r) in missing], report)


REQUEUED_REASON = "re-enqueued by the reconciler: its job was missing from Redis"


def _requeue_rows(redis: Redis, settings: Settings, rows: list[Notification], report: Report) -> None:
    """Queue a job for each row whose job Redis lost that is still as read, counting them into report.

    The page is read before Redis is, and a job that ran in between (its email sent, or claimed by a
    batch's shared job) is no longer live work either: a pass held up there (a worker's warm shutdown
    stops RQ's scheduler inside its signal handler, a second or so) re-queued a hundred sent
    notifications, and would clear the job_id of one a shared job had claimed meanwhile (a slow send
    of it then looked lost). Only a row still as read is put back, and from now on it travels alone
    (its shared job is gone), so the next pass looks for its own job.

    A page at a time, as a row at a time before (an update, a job and a history line each: 8-36 ms a
    row, so a backlog Redis lost came back at 30-120 a second): one statement takes the rows still as
    read, one Redis round trip queues their jobs, one statement writes their history lines, in that
    order as before. Redis failing after the first leaves rows with no job and no line: the next pass
    finds their jobs missing again and queues them. Raises RedisError."""
    if not rows:
        return
    taken = set(_unchanged_taken(rows))
    moved = [row for row in rows if row.seq in taken]
    if not moved:
        return
    with redis.pipeline(transaction=False) as pipe:
        # RQ's enqueue starts a MULTI on a pipeline not in one yet, which redis-py refuses once enqueue_at
        # (a retry not due yet) has queued commands on it: begun here, it is one transaction either way.
        pipe.multi()
        for row in moved:
            queues.enqueue_delivery(redis, settings, row.id, row.priority, row.attempts,
                                    at=queues.retry_due(settings, row), pipeline=pipe)
        pipe.execute()
    report.requeued += len(moved)  # before the lines: a pass the database stops there still counts them
    # Of the rows as they are now, as store.record wrote it: one sent and erased since its job was queued
    # is gone, and a line naming it would fail the pass on its foreign key.
    line = Notification.select(Notification.seq, Value(Event.at.db_value(utcnow())), Value("status"),
                               Notification.status, Notification.status, Value(REQUEUED_REASON)).where(
        Notification.seq.in_([row.seq for row in moved]))
    Event.insert_from(line, [Event.notification, Event.at, Event.kind, Event.from_status, Event.to_status,
                             Event.reason]).execute()


def _unchanged_taken(rows: list[Notification]) -> list[int]:
    """Clear the job_id of those of rows still as read (status, updated_at and job_id: a compare-and-set
    each) and return their seqs."""
    db = Notification._meta.database
    if not is_postgres(db):
        return [row.seq for row in rows if Notification.update(job_id=None).where(
            Notification.seq == row.seq, Notification.status == row.status, Notification.updated_at == row.updated_at,
            Notification.job_id.is_null() if row.job_id is None else Notification.job_id == row.job_id).execute()]
    # One statement for the page. Its rows are locked in order of seq, and one that another transaction
    # holds is passed over (SKIP LOCKED) for the next pass: a row at a time, the update only ever held
    # one row, whereas a page held while it waited for another could deadlock with a transaction that
    # takes several of them (an erasure cancelling a user's mail), and PostgreSQL would cancel one of
    # the two. NO KEY UPDATE, as the update takes: a history line being written (FOR KEY SHARE of its
    # notification) does not make a row pass.
    same = ('(n."status" = v.status) IS TRUE AND n."updated_at" = v.updated_at '
            'AND n."job_id" IS NOT DISTINCT FROM v.job_id')
    sql = (
        'WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::varchar[], %s::timestamp[], %s::varchar[]) '
        "AS v (seq, status, updated_at, job_id)), "
        f'taken AS (SELECT n."seq" FROM "notifications" n JOIN v ON n."seq" = v.seq WHERE {same} '
        'ORDER BY n."seq" FOR NO KEY UPDATE OF n SKIP LOCKED) '
        'UPDATE "notifications" n SET "job_id" = NULL FROM v '
        f'WHERE n."seq" = v.seq AND n."seq" IN (SELECT "seq" FROM taken) AND {same} RETURNING n."seq"'
    )
    params = [[r.seq for r in rows], [r.status for r in rows], [r.updated_at for r in rows], [r.job_id for r in rows]]
    return [seq for (seq,) in execute_once(db, sql, params).fetchall()]


def _callbacks(redis: Redis, settings: Settings, settled: datetime, report: Report, stop_at: float) -> None:
    # Pages as _requeue's: a page of callbacks waiting in their queue ends the step, as queued work
    # does (each page deeper would look for its jobs further down a long queue); one waiting for a
    # retry in RQ's scheduled registry (half an hour for the last) does not, as retrying work does
    # not: a callback Redis lost behind such a page (a failover loses the newest writes) waited until
    # every one of them had given up.
    pending = Notification.callback_status == CallbackStatus.PENDING.value
    for rows in _pages(pending, Notification.updated_at <= settled, stop_at=stop_at):
        job_ids = [queues.callback_job_id_for(r.id) for r in rows]
        missing = _missing_jobs(redis, job_ids, [queues.CALLBACK_QUEUE] * len(rows))
        abandoned = _abandoned(redis, job_ids)
        if not missing and not abandoned and _any_queued(redis, job_ids):
            return
        for row in rows:
            job_id = queues.callback_job_id_for(row.id)
            # A missing one only if it is still missing: a redelivery or a final transition may have
            # queued it since it was looked at.
            if job_id in abandoned:  # its worker died mid-post: that attempt goes again now
                queued = queues.enqueue_callback(redis, settings, row.id, row.callback_attempts, unless_live=False)
            elif job_id in missing:
                # A retry Redis lost (a flush, a restart empty) goes when it was due: queued now, the
                # attempts left went at once, and the last gave up seconds after the one before.
                queued = queues.enqueue_callback(redis, settings, row.id, row.callback_attempts,
                                                 at=_callback_due(settings, row))
            else:
                continue
            if queued:
                report.callbacks += 1


def _callback_due(settings: Settings, row: Notification) -> datetime | None:
    """When the next attempt of a callback that failed row.callback_attempts times is due, by
    CALLBACK_RETRY_INTERVALS from the end of its last (None: now)."""
    attempts = row.callback_attempts
    if not 0 < attempts <= len(settings.callback_retry_intervals):
        return None
    last = (Event.select(fn.MAX(Event.at))
            .where((Event.notification == row.seq) & (Event.kind == "callback")).scalar())
    if last is None:
        return None
    due = last + timedelta(seconds=settings.callback_retry_intervals[attempts - 1])
    return due if due > utcnow() else None


def _any_queued(redis: Redis, job_ids: list[str]) -> bool:
    """Whether any of job_ids waits in its queue. Raises RedisError."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        return b"queued" in pipe.execute()


def _abandoned(redis: Redis, job_ids: list[str]) -> set[str]:
    """Those of job_ids that are `started` while no live worker runs them: their worker was killed
    (SIGKILL, OOM) mid-job. RQ's maintenance, which would call them abandoned and retry them, runs
    every 10 minutes per worker, so a callback whose worker was killed waited that long; it is queued
    again instead once the dead worker's key has expired (the callback job's limit and 60 s after it
    started, see _running). A live worker only slow to record an answer keeps the advisory lock on
    the callback (callbacks.turn): the job queued again finds it held and skips. Raises RedisError."""
    with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        pipe.smembers(Worker.redis_workers_keys)
        *states, registered = pipe.execute()
    started = {job_id for job_id, state in zip(job_ids, states, strict=True) if state == b"started"}
    if not started:
        return set()
    names = sorted(key.decode().removeprefix(Worker.redis_worker_namespace_prefix) for key in registered)
    return started - _running(redis, names)


def _forget_keys(before: datetime, report: Report, stop_at: float) -> None:
    # A page of keys at a time, as every other step: in one statement, a lot of keys due at once (the
    # first pass after IDEMPOTENCY_TTL_DAYS was lowered, or after the scheduler was down for days)
    # could outlast DATABASE_STATEMENT_TIMEOUT, be cancelled, and be cancelled again every pass.
    # The page is read first and then updated by seq: as one statement (IN a subquery with LIMIT),
    # PostgreSQL's planner, with statistics from a backlog, joined it against the whole table.
    keyed = Notification.idempotency_key.is_null(False)
    for page in range(MAX_PAGES):
        seqs = [row.seq for row in Notification.select(Notification.seq)
                .where(keyed & (Notification.created_at < before))
                .order_by(Notification.created_at).limit(BATCH)]
        if seqs:
            report.keys_forgotten += (
                Notification.update(idempotency_key=None, idempotency_scope=None, request_hash=None)
                .where(Notification.seq.in_(seqs) & keyed).execute())
        if len(seqs) < BATCH or (page and time.monotonic() >= stop_at):
            return
