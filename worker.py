"""Entry point: an RQ worker on every priority queue, highest first, with RQ's scheduler for retries."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import threading
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from rq import SimpleWorker, worker_registration
from rq.exceptions import DeserializationError, StopRequested
from rq.job_lifecycle import call_exception_handlers
from rq.scheduler import RQScheduler
from rq.timeouts import UnixSignalDeathPenalty
from rq.worker import WorkerStatus

from notifier import failed_jobs, jobs, logs, metrics
from notifier.db import UNAVAILABLE_ERRORS
from notifier.errors import PermanentDeliveryError
from notifier.outage import DatabaseOutage, database_answers
from notifier.queues import REQUEST_ID_META, all_queues, connect_redis, mark_memory
from notifier.resilience import REDIS_POLL_SECONDS, WAIT_LOG_SECONDS, run_until_stopped
from notifier.runtime import (
    build_deliverer,
    configure_logging,
    load_settings,
    warn_about_redis_eviction,
    warn_about_smtp_login,
    warn_about_templates,
    warn_about_unsubscribe_links,
)

logger = logging.getLogger("notifier.worker")

# The signals that stop a worker: only its main thread may take them (see NotifierWorker.subscribe).
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# How often a worker whose RQ scheduler has died tries to start it again (see NotifierWorker).
SCHEDULER_CHECK_SECONDS = 5.0


def stop_retrying_permanent_failures(job, exc_type, exc_value, traceback):
    """RQ exception handler: a permanent failure must not use up the retry schedule."""
    if isinstance(exc_value, PermanentDeliveryError):
        job.retries_left = 0
    return True  # let RQ go on to record the failure in its failed registry


def _die_with_parent(parent_pid: int) -> None:
    # RQ forks its scheduler from the worker, and the child inherits the worker's Redis sockets. If
    # the worker is SIGKILLed, an orphaned child keeps those sockets open and Redis goes on handing
    # jobs from the worker's pending BLPOP to a socket nobody reads: they vanish. So the child must die
    # with the worker (Linux prctl PR_SET_PDEATHSIG); elsewhere this is a no-op.
    # The child (RQ's scheduler) installs its own stop handlers as it starts; until then a SIGTERM (the
    # worker stopping it) must end it, not run a handler of the worker's copy (main's would swallow it,
    # and the worker would wait for the child forever).
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


class QuietScheduler(RQScheduler):
    """RQ's scheduler, whose process ends without a raw traceback when its loop fails, and with a
    WARNING, not RQ's ERROR, when Redis went away. RQ's run() logs the error, then re-raises it, and
    multiprocessing wrote the traceback again to stderr ("Process Scheduler:"): plain text among the
    JSON lines, past the log filter's masks."""

    def work(self):
        try:
            super().work()
        except RedisError as exc:
            # Returned from, not raised: run() would log it as an ERROR with the traceback in its
            # message, for an outage the worker waits out (keep_scheduler starts the scheduler again).
            logging.getLogger("rq.scheduler").warning(
                "RQ scheduler stopped: Redis went away (%s); its worker starts it again once Redis answers",
                type(exc).__name__)
        except Exception as exc:
            # run() still logs it, the cause chained in; multiprocessing ends the process with this
            # code and writes nothing of its own.
            raise SystemExit(1) from exc


class NotifierWorker(SimpleWorker):
    """SimpleWorker: sending is I/O, and not forking per job keeps the SMTP and database connections
    warm. It remembers whether it was asked to stop, so a loop that ends for any other reason (Redis
    went away) can be told apart and started again."""

    # RQ's dequeue loop waits Redis out itself, backing off to 60 s between tries: the worker sat idle
    # that long after Redis was back, its RQ scheduler dead (README: started again within 5 s).
    max_connection_wait_time = REDIS_POLL_SECONDS
    stopping = False
    cold_stopping = False  # RQ's cold shutdown (a second SIGTERM): its SystemExit cuts the job off
    counts: metrics.Deferred | None = None  # the jobs' counters, sent with each heartbeat
    stop: threading.Event | None = None  # the jobs' Deliverer's: set with `stopping`
    outage: DatabaseOutage | None = None  # the process's, kept across generations; None: never pause
    _put_back: str | None = None  # the id of the job that met the database away, to go back as it was
    _scheduler_checked = 0.0
    _scheduler: RQScheduler | None = None
    _burst = False
    # RQ's default where SIGALRM exists, named because callback_job relies on it: the job's limit
    # is the process's one alarm, which the job can replace and cancel once its callback is answered.
    death_penalty_class = UnixSignalDeathPenalty

    @property
    def scheduler(self) -> RQScheduler | None:
        """RQ's scheduler of this worker, a QuietScheduler once started; None before."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: RQScheduler | None) -> None:
        # RQ makes its scheduler itself (Worker._start_scheduler), as an RQScheduler, and starts it
        # at once: it takes no class of ours, so the one it made becomes one before it is started.
        if type(scheduler) is RQScheduler:
            scheduler.__class__ = QuietScheduler
        self._scheduler = scheduler

    def heartbeat(self, timeout=None, pipeline=None):
        # RQ sends a heartbeat (twice per job) as three commands, a round trip each unless it is
        # given a pipeline: one pipeline makes it one, and the counts of the job just done ride along.
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline=pipeline)
        if self.stopping and self.get_state() != WorkerStatus.BUSY:
            # RQ's signal handler raises StopRequested wherever the worker happens to be, and code
            # that catches every Exception there (a logging handler formatting a line) swallows it.
            # The dequeue loop sends a heartbeat on every turn, also while it waits out a Redis
            # outage, so a requested stop takes effect here at the latest. (A job popped but not
            # started is in no queue or registry: on several queues RQ pops with BLPOP, without its
            # intermediate queue. The reconciler re-queues a `queued` notification whose job is missing.)
            raise StopRequested()
        self.keep_scheduler()
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            mark_memory(pipe)
            pipe.sismember(self.redis_workers_keys, self.key)
            own = len(pipe.command_stack)
            if self.counts is not None:
                try:
                    self.counts.apply(pipe)
                except StopRequested:
                    raise  # RQ's stop signal, raised wherever the worker happens to be: never swallow it
                except Exception:  # noqa: BLE001 - a bug in counting must not stop the worker
                    logger.warning("metrics not recorded", exc_info=True)
            # Only the heartbeat's own errors are RQ's business; a count that failed is dropped, as
            # metrics never get in the way of sending.
            replies = pipe.execute(raise_on_error=False)
        for reply in replies[:own]:
            if isinstance(reply, Exception):
                raise reply
        REDIS_AWAY.answered()
        if not replies[own - 1]:
            self._register_again(timeout)
        if any(isinstance(reply, Exception) for reply in replies[own:]):
            logger.warning("metrics not recorded: %s", next(r for r in replies[own:] if isinstance(r, Exception)))

    def _register_again(self, timeout=None) -> None:
        """Put this worker back in RQ's registry of workers, which Redis lost while the worker lived on
        (a restart without persistence, a flush, a failover to a replica that had not seen it).

        RQ registers a worker once, as it starts; its heartbeat only renews the key's TTL and
        `last_heartbeat`. A worker that waited out a Redis restart in its dequeue loop went on taking
        jobs, invisible to the reconciler, which reads the live workers from that registry
        (reconciler._running): a send of such a worker still going after SENDING_TIMEOUT (a slow mail
        server) was taken for one whose worker was lost, recovered, and sent a second time while the
        first was still in flight. The heartbeat, sent at every turn of the dequeue loop and after
        every job, asks whether the worker is registered, and registers it again when it is not."""
        if self.birth_date is None or self.stopping or self._stop_requested:
            return  # not started (a test's bare worker), or on its way out: never born again
        state = self.get_state()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping={**self.serialize(), "state": getattr(state, "value", state)})
            worker_registration.register(self, pipe)
            pipe.expire(self.key, timeout or self.worker_ttl + 60)
            pipe.execute()
        logger.warning("worker %s was missing from Redis's registry of workers (Redis lost it); registered "
                       "again", self.name)

    def subscribe(self):
        # RQ listens for its commands in a thread of its own. The kernel hands SIGTERM or Ctrl-C to any
        # thread that does not block it, and Python runs the handler only in the main thread: given to
        # the listener, it waited until the main thread's wait for a job (BLPOP) returned on its own,
        # seconds later (make run took 5 s to stop, one time in two). A new thread starts with the mask
        # of the thread that starts it, so the stop signals are blocked while RQ starts this one.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().subscribe()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _pubsub_exception_handler(self, exc, pubsub, pubsub_thread) -> None:
        # RQ's handler waits out a ConnectionError and lets anything else end the thread that hears the
        # worker's commands (shutdown, stop-job). redis-py's TimeoutError is no ConnectionError: in a
        # partition (Redis silent, nothing reset) the thread's reconnect timed out, it died with a
        # traceback on stderr, and the worker heard no command again for the rest of its life. A
        # Redis that does not answer in time is waited out as one that refuses is.
        if isinstance(exc, RedisError) and not isinstance(exc, RedisConnectionError):
            exc = RedisConnectionError(f"{type(exc).__name__}: {exc}")
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    def work(self, burst: bool = False, *args, **kwargs):
        # A burst run's scheduler moves what is due once, as the run starts, and has no process
        # (RQ's _start_scheduler): keep_scheduler must not start one for it.
        self._burst = burst
        return super().work(burst, *args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        # An idle worker sends its heartbeat, and so looks at its scheduler (keep_scheduler), once per
        # wait for a job, and RQ waits worker_ttl - 15 s (405 s). After a Redis outage of 3 to 6 s the
        # worker's last look came less than SCHEDULER_CHECK_SECONDS before Redis answered again (the
        # scheduler still alive then, or Redis still away), so the first good heartbeat skipped it and
        # the worker went back to waiting: the scheduler, and every retry, stayed dead that long.
        wait = super().dequeue_timeout
        if self.scheduler is not None:
            wait = min(wait, max(1, math.ceil(SCHEDULER_CHECK_SECONDS)))
        return wait

    def keep_scheduler(self) -> None:
        """Start RQ's scheduler again if it died, at most every SCHEDULER_CHECK_SECONDS.

        The scheduler (which fires retries, and the reconciler's re-queued ones, from RQ's scheduled
        registry) is a child process that dies as soon as Redis goes away; the worker itself waits
        Redis out in its dequeue loop and looks for a dead scheduler only at RQ's maintenance, every
        10 minutes. Until then no retry fired. The dequeue loop sends a heartbeat on every turn, and
        after every job: a dead scheduler is started again (if its locks are free) within about this
        once Redis is back. When another worker's scheduler holds the locks, nothing is started."""
        scheduler = self.scheduler
        if scheduler is None or self._burst or self.stopping or self._stop_requested:
            return
        if time.monotonic() - self._scheduler_checked < SCHEDULER_CHECK_SECONDS:
            return
        self._scheduler_checked = time.monotonic()
        if scheduler._process is not None and scheduler._process.is_alive():
            return
        try:
            if scheduler.acquire_locks(auto_start=True):
                logger.info("RQ scheduler started again for %s", ", ".join(sorted(scheduler.acquired_locks)))
        except RedisError as exc:
            logger.warning("RQ scheduler not started again: %s", type(exc).__name__)

    def execute_job(self, job, queue):
        # Every line logged while the job runs (RQ's own included) names the request it came from, and
        # masks the recipients the job reads (notifier.jobs), in whatever form a mail server echoed them.
        with logs.bound(request_id=(job.meta or {}).get(REQUEST_ID_META)), logs.concealing():
            return super().execute_job(job, queue)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # No job is taken while the database is away: each would fail at once, using up a retry of
        # its notification and logging an ERROR. The jobs stay in their queues, untouched, meanwhile.
        if self.outage is not None and self.outage.since is not None:
            self.set_state(WorkerStatus.SUSPENDED)  # what `rq info` shows meanwhile
            self.procline("Waiting for the database")
            self.outage.wait(self.heartbeat)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if self._put_back != job.id:
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        # Back at the front of its queue as it was, not a retry: the outage is not the notification's
        # fault, and a retry counted for it was one fewer for the mail server's own refusals. It cannot
        # send twice: the job re-reads its notification and claims it (store.claim) before it sends,
        # and one it had claimed, or sent without recording, it finds `sending` and records from its
        # receipt or leaves to the reconciler. RQ's retry would do the same, only one fewer left.
        self._put_back = None
        try:
            with self.connection.pipeline() as pipe:
                pipe.multi()  # before any command: enqueue_job starts the transaction itself otherwise, and fails
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                queue.enqueue_job(job, pipeline=pipe, at_front=True)
                pipe.execute()
        except RedisError as exc:
            # As RQ's own failure handling does when Redis does not take its writes: said, and gone on from.
            # The job is left `started`, for RQ's registry cleaning and the reconciler.
            logger.warning("job %s not put back on its queue: %s", job.id, type(exc).__name__)

    def handle_exception(self, job, *exc_info):
        exc = exc_info[1]
        # Not a job an operator asked to stop (RQ's stop-job, which a SimpleWorker only notes): RQ marks
        # it `stopped` and never runs it again; put back, it ran again once the database answered.
        if (self.outage is not None and self._stopped_job_id != job.id
                and isinstance(exc, (*UNAVAILABLE_ERRORS, jobs.SentNotRecorded)) and self.outage.begins(exc, job.id)):
            self._put_back = job.id  # handle_job_failure, next, puts it back; the outage's line says so
            return
        # RQ logs every failure at ERROR with its traceback in the message: each 451 retried, each
        # callback endpoint down, paged whoever alerts on errors, for an outcome the job had logged
        # already ("attempt 1 failed (will retry)"). The line is kept, at the level of what the
        # failure means (failed_jobs.failure_level), naming the notification it is about.
        call_exception_handlers(self._exc_handlers, job, *exc_info)  # first: they decide retries_left
        exc_type, exc_value, _ = exc_info
        extra = {"queue": job.origin}
        try:
            extra["func"] = job.func_name
        except DeserializationError:
            pass
        failed_jobs.log_failed_job(job.id, exc_value, job.should_retry, exc_info=exc_info,
                                   cold_stop=self.cold_stopping and isinstance(exc_value, SystemExit), **extra)

    def request_force_stop(self, signum, frame):
        try:
            super().request_force_stop(signum, frame)  # returns when it ignores the signal (within 1 s)
        except SystemExit:
            self.cold_stopping = True
            raise

    def _install_signal_handlers(self):
        super()._install_signal_handlers()
        if self.stop is not None and self.stop.is_set() and not self._stop_requested:
            # Asked to stop before RQ listened (see main): its loop stops at its first turn, and its
            # teardown stops the scheduler (which frees its locks) and says the worker is gone.
            self.stopping = self._stop_requested = True

    def teardown(self):
        # RQ's loop has ended, its warm-stop handler still in place: a stop heard now raised
        # StopRequested into the teardown, which cut short the worker's goodbye (registered, and its
        # scheduler's locks held, for a minute more) and ended the process with a traceback. Now it is
        # noted, and honoured as the teardown ends; a second one is still RQ's cold shutdown.
        if not (self.stopping or self._stop_requested) and threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                signal.signal(sig, self._stop_after_teardown)
        super().teardown()

    def _stop_after_teardown(self, signum, frame):
        self.stopping = True
        if self.stop is not None:
            self.stop.set()
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.request_force_stop)

    def request_stop(self, signum, frame):
        self.stopping = True
        if self.stop is not None:
            self.stop.set()  # never waited on in this thread, so no lock a signal could interrupt
        super().request_stop(signum, frame)


# RQ's lines as its loop ends on an exception, and on Redis timing out (rq/worker/base.py).
_LOOP_ENDED = "Worker %s: found an unhandled exception, quitting..."
_REDIS_TIMED_OUT = "Worker %s: Redis connection timeout, quitting..."
# ... and as its dequeue loop, or its pubsub thread, waits for Redis to take a connection again.
_CANNOT_CONNECT = "Worker %s: could not connect to Redis instance: %s retrying in %d seconds..."


class RedisAwayIsAWarning(logging.Filter):
    """RQ logs its loop ending on any exception as an ERROR with a traceback: Redis going away too,
    which the worker waits out and carries on from (notifier.resilience), so every Redis restart
    paged whoever alerts on errors. That one is a WARNING naming it, and so are RQ's lines as it
    waits for Redis to take a connection again: the first of an outage, then one every
    WAIT_LOG_SECONDS (RQ tries every second, and a long outage buried the log in them)."""

    def __init__(self):
        super().__init__()
        self._told: float | None = None  # when the last "could not connect" line went out

    def answered(self) -> None:
        """Redis answered: the next outage's first line goes out."""
        self._told = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _LOOP_ENDED and record.exc_info and isinstance(record.exc_info[1], RedisError):
            away = type(record.exc_info[1]).__name__
        elif record.msg == _REDIS_TIMED_OUT:  # a hung Redis, a failover: RQ logs it without the exception
            away = "TimeoutError"
        elif record.msg == _CANNOT_CONNECT:  # RQ waits and tries again: its own words, a WARNING
            told, now = self._told, time.monotonic()
            if told is not None and now - told < WAIT_LOG_SECONDS:
                return False
            self._told = now
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            return True
        else:
            return True
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.msg = "Worker %s: Redis went away (%s); waiting for it to carry on"
        record.args = (record.args[0] if record.args else "?", away)
        record.exc_info, record.exc_text = None, None
        return True


# The worker's: its heartbeat, which RQ sends on every turn of its dequeue loop, says when Redis answers.
REDIS_AWAY = RedisAwayIsAWarning()


def make_worker(connection, name: str | None = None, counts: metrics.Deferred | None = None,
                stop: threading.Event | None = None, outage: DatabaseOutage | None = None) -> NotifierWorker:
    """A worker on all notifier queues, highest priority first, callbacks last; with outage, one that
    pauses while the database is away (see notifier.outage)."""
    worker = NotifierWorker(
        all_queues(connection),
        connection=connection,
        name=name,
        exception_handlers=[stop_retrying_permanent_failures],
    )
    worker.counts, worker.stop, worker.outage = counts, stop, outage
    return worker


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    logging.getLogger("rq.worker").addFilter(REDIS_AWAY)
    warn_about_unsubscribe_links(settings)
    warn_about_smtp_login(settings)
    warn_about_templates(settings)
    parent = os.getpid()
    os.register_at_fork(after_in_child=lambda: _die_with_parent(parent))
    connection = connect_redis(settings.redis_url)
    counts = metrics.Deferred(connection)
    stop = threading.Event()
    outage = DatabaseOutage(lambda: database_answers(settings.database_connect_timeout))
    jobs.install(build_deliverer(settings, redis=connection, counts=counts, wait=True, stop=stop, outage=outage))
    # RQ installs its stop handlers only once it has registered the worker and started its scheduler,
    # which takes the scheduler's locks: a SIGTERM before then (a rolling deploy stopping a worker it
    # had just started) killed it outright, its registration and the locks outlived it by a minute, and
    # every retry waited for them. Until RQ listens, a stop is noted here and honoured as RQ's handlers
    # go in (NotifierWorker._install_signal_handlers), or as a generation ends.
    def note_stop(*_):
        stop.set()

    for sig in _STOP_SIGNALS:
        signal.signal(sig, note_stop)
    name = f"notifier-{socket.gethostname()}-{os.getpid()}"
    logger.info("worker %s starting", name)

    def run_once(generation: int) -> bool:
        # The handlers in place are the last generation's RQ's: a stop it heard while not busy raised
        # StopRequested wherever this one was starting, past run_until_stopped, with a traceback.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, note_stop)
        if stop.is_set():
            return True
        warn_about_redis_eviction(connection)  # at start, and again for the Redis a failover gave back
        worker = make_worker(connection, name=f"{name}-{generation}" if generation else name, counts=counts,
                             stop=stop, outage=outage)
        try:
            worker.work(with_scheduler=True, logging_level=settings.log_level)
        except RedisError:
            # Asked to stop while Redis went away too (Ctrl-C on the whole stack): stop, do not wait.
            if worker.stopping or stop.is_set():
                return True
            raise
        finally:
            # Until run_until_stopped waits for Redis (which listens for a stop itself), a stop is
            # noted, never raised by this generation's RQ handler into the code in between.
            for sig in _STOP_SIGNALS:
                signal.signal(sig, note_stop)
        return worker.stopping or stop.is_set()

    run_until_stopped(connection, run_once, "worker", stop=stop)
    counts.flush()  # the last job's, had no heartbeat followed it


if __name__ == "__main__":
    main()
