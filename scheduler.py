"""Entry point: rq-scheduler, which moves delayed and periodic jobs onto the queues when they are due."""

from __future__ import annotations

import logging
import signal
import time

from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq_scheduler import Scheduler
from rq_scheduler.utils import to_unix

from notifier import releases
from notifier.config import Settings
from notifier.db import UNAVAILABLE_ERRORS, database
from notifier.models import Priority, utcnow
from notifier.queues import CONTROL_QUEUE, QUEUE_NAMES, connect_redis, notification_of_release
from notifier.resilience import reason_of, run_until_stopped
from notifier.runtime import configure_logging, load_settings, open_database, warn_about_redis_eviction

logger = logging.getLogger("notifier.scheduler")

POLL_SECONDS = 1
RECONCILE_JOB_ID = "notifier-reconcile"
DIGESTS_JOB_ID = "notifier-digests"
# Digests are due at a minute of the day; checking every half minute is on time and cheap.
DIGEST_POLL_SECONDS = 30
PURGE_JOB_ID = "notifier-purge"
# Retention counts in days, so a pass every ten minutes is on time; each is short (retention.PASS_SECONDS)
# and on the low queue, so it holds no worker from urgent mail for long, and runs when none waits.
PURGE_SECONDS = 600
PURGE_QUEUE = QUEUE_NAMES[Priority.LOW]
# How long rq-scheduler's lock outlives the poll that took it, if the scheduler dies holding it: its
# own is the poll interval and 10 s, so a scheduler SIGKILLed mid-poll held up every release (its
# own, restarted, too) for 11 s. A poll renews it as it goes (each page of releases).
LOCK_SECONDS = 3


class StandingByIsNoWarning(logging.Filter):
    """rq-scheduler warns 'Lock already taken - skipping run' whenever a poll finds another scheduler's
    poll holding the lock: routine when several run at once, as they may (each send is released once),
    and an alert on WARNING fired for it (71 times in 20 minutes of two schedulers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Lock already taken - skipping run"


def periodic_jobs(settings: Settings) -> list[tuple[str, str, int, str]]:
    """(stable id, job function, interval in seconds, queue) of every periodic job."""
    return [
        (RECONCILE_JOB_ID, "notifier.jobs.reconcile", settings.reconcile_interval, CONTROL_QUEUE),
        (DIGESTS_JOB_ID, "notifier.jobs.flush_digests", DIGEST_POLL_SECONDS, CONTROL_QUEUE),
        # Registered whatever RETENTION_DAYS says: the worker that runs it reads its own, and with 0 it
        # deletes nothing.
        (PURGE_JOB_ID, "notifier.jobs.purge", PURGE_SECONDS, PURGE_QUEUE),
    ]


class NotifierScheduler(Scheduler):
    """rq-scheduler that keeps our periodic jobs registered, once each, whatever happens to Redis.

    Periodic jobs have stable ids, so a restart or a second scheduler replaces them instead of adding
    copies; and since a flushed Redis forgets them, every poll puts back any that went missing."""

    stopping = False

    def __init__(self, settings: Settings, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        # The due release entries releases.release_due left for rq-scheduler to move as jobs.
        self._release_jobs: set[str] = set()
        # Said once as the database goes and once as it comes back: a warning a poll (a second) while
        # it was away buried everything else in the log.
        self._database_away = False
        self._periodic_ids = frozenset(job_id for job_id, *_ in periodic_jobs(settings))

    def _install_signal_handlers(self):
        # rq-scheduler's own handler records its death in Redis before exiting; with Redis gone at the
        # same moment that raised a connection error instead, and the process waited for Redis forever.
        def stop(signum, frame):
            self.stopping = True
            try:
                self.register_death()
                self.remove_lock()
            except RedisError:
                pass
            raise SystemExit()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def register_periodic_jobs(self, only_missing: bool = False) -> None:
        for job_id, func, interval, queue in periodic_jobs(self.settings):
            if only_missing and job_id in self:
                continue
            self.schedule(utcnow(), func, interval=interval, repeat=None, id=job_id, queue_name=queue,
                          result_ttl=600, timeout=300)
            logger.info("periodic job %s registered (every %ss)", job_id, interval)

    def acquire_lock(self):
        self._lock_acquired = bool(self.connection.set(self.scheduler_lock_key, time.time(), ex=LOCK_SECONDS,
                                                       nx=True))
        return self._lock_acquired

    def _renew_lock(self) -> None:
        if self._lock_acquired:
            self.connection.expire(self.scheduler_lock_key, LOCK_SECONDS)

    def enqueue_jobs(self):
        self.register_periodic_jobs(only_missing=True)
        # Delayed sends first, all that are due at once (notifier.releases); then rq-scheduler's own
        # move, one job at a time, of the periodic jobs and of what the release left to it.
        self._release_jobs = set()
        try:
            with database.connection_context():
                self._release_jobs = releases.release_due(self.connection, self.settings, utcnow(),
                                                          renew=self._renew_lock)
        except UNAVAILABLE_ERRORS as exc:
            # What was not released stays scheduled and due: the next poll releases it, a second
            # after the database answers again.
            database.close()
            if not self._database_away:
                self._database_away = True
                logger.warning("delayed notifications not released: the database is not available (%s: %s); "
                               "trying again every poll", type(exc).__name__, reason_of(exc))
        else:
            if self._database_away:
                self._database_away = False
                logger.info("the database is available again; delayed notifications are released")
        return super().enqueue_jobs()

    def enqueue_job(self, job):
        # A periodic job still waiting in its queue from its last time (every worker waits while the
        # database is away, notifier.outage) is not pushed again, only given its next time: pushed each
        # time it came due, an hour away left 120 reconciler passes and 120 of the digests' on the high
        # queue, run one after another ahead of the mail once the database answered. (Its status alone
        # would not do: a job a worker popped and never started still says `queued`.)
        interval = job.meta.get("interval")
        if job.id in self._periodic_ids and interval:
            queue = self.get_queue_for_job(job)
            if self.connection.lpos(queue.key, job.id) is not None:
                self.connection.zadd(self.scheduled_jobs_key, {job.id: to_unix(utcnow()) + int(interval)})
                return
        super().enqueue_job(job)

    def get_jobs_to_queue(self, with_times=False):
        """rq-scheduler's, without the release entries releases.release_due keeps to itself: those it
        did not hand back are released by its next poll (the database was away), never as jobs."""
        if with_times:
            return super().get_jobs_to_queue(with_times)
        return self._due_jobs()

    def _due_jobs(self):
        for raw in self.connection.zrangebyscore(self.scheduled_jobs_key, 0, to_unix(utcnow())):
            job_id = raw.decode()
            if notification_of_release(job_id) is not None and job_id not in self._release_jobs:
                continue
            try:
                yield self.job_class.fetch(job_id, connection=self.connection)
            except NoSuchJobError:
                self.cancel(job_id)  # as rq-scheduler does


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    logging.getLogger("rq_scheduler.scheduler").addFilter(StandingByIsNoWarning())
    open_database(settings, wait=True)
    connection = connect_redis(settings.redis_url)
    logger.info("scheduler starting, polling every %ss", POLL_SECONDS)

    def run_once(generation: int) -> bool:
        warn_about_redis_eviction(connection)  # at start, and again for the Redis a failover gave back
        scheduler = NotifierScheduler(settings, connection=connection, interval=POLL_SECONDS)
        scheduler.register_periodic_jobs()
        try:
            scheduler.run()
        except SystemExit:  # our answer to SIGTERM and SIGINT
            return True
        except RedisError:
            if scheduler.stopping:
                return True
            raise
        return False

    run_until_stopped(connection, run_once, "scheduler")


if __name__ == "__main__":
    main()
