"""Keep a long-running process (the API, the worker, the scheduler) alive across an outage: of Redis
while it runs, of the database or Redis when it starts."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

logger = logging.getLogger(__name__)

# How often a process waiting for a service at its start says it still waits.
WAIT_LOG_SECONDS = 60.0


# How often a process that lost Redis asks whether it answers again: a ping a second costs nothing, and
# a backoff to 10 s left the worker (and its RQ scheduler, which fires retries) and scheduler.py idle up
# to 10 s after Redis was back.
REDIS_POLL_SECONDS = 1.0


# The key a process that lost Redis writes to learn whether Redis takes writes again.
WRITABLE_PROBE_KEY = "notifier:writable-probe"


def wait_for_redis(connection: Redis, max_delay: float = REDIS_POLL_SECONDS, pause: float = 0.0,
                   stop: threading.Event | None = None) -> bool:
    """Block until Redis takes a write again; False if SIGTERM or SIGINT asked us to stop meanwhile."""
    # A write, not PING: a Redis out of memory (noeviction) or a replica left read-only by a failover
    # answers PING and refuses every write, so the worker and the scheduler started again at once,
    # "Redis is back" and "lost Redis" a second each for as long as it lasted.
    return wait_until(lambda: probe_write(connection), RedisError, max_delay=max_delay, pause=pause, stop=stop)


def probe_write(connection: Redis) -> None:
    """One small write, raising RedisError where Redis would refuse the queues' (out of memory, read-only)."""
    connection.set(WRITABLE_PROBE_KEY, b"1", px=10_000)


def wait_until(attempt: Callable[[], object], errors, what: str | None = None, max_delay: float = 10.0,
               pause: float = 0.0, stop: threading.Event | None = None) -> bool:
    """Call attempt() until it raises none of errors, waiting longer each time (up to max_delay);
    False if SIGTERM or SIGINT asked us to stop meanwhile. what: named in a warning, at the first
    failure and every WAIT_LOG_SECONDS after it (None: the caller says it). pause: seconds to wait
    before the first attempt. stop: the process's own record of a stop, which the signals set here
    too, and which a stop heard before the wait began has set already."""
    stop = stop if stop is not None else threading.Event()
    # Event.set takes a lock, which a handler must never meet held: this thread only reads the flag.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    delay, told = 0.5, None
    try:
        _sleep_unless_stopped(stop, pause)
        while not stop.is_set():
            try:
                attempt()
                if told is not None:
                    logger.info("%s is available again", what)
                return True
            except errors as exc:
                if what is not None and (told is None or time.monotonic() - told >= WAIT_LOG_SECONDS):
                    logger.warning("%s is not available (%s: %s); waiting for it", what, type(exc).__name__,
                                   reason_of(exc))
                    told = time.monotonic()
                _sleep_unless_stopped(stop, delay)
                delay = min(delay * 2, max_delay)
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def reason_of(exc: BaseException) -> str:
    """The first line of exc's message, to log: libpq's and redis-py's name the host and port, never a
    password."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def redis_said(exc: RedisError) -> str:
    """reason_of(exc), without the command a pipeline's error quotes (`Command # 1 (SET key value) of
    pipeline caused error: `): Redis's own words."""
    return reason_of(exc).rsplit(" of pipeline caused error: ", 1)[-1]


def refuses_writes(exc: RedisError) -> bool:
    """Whether exc is Redis's answer that it takes no write now, whatever the command: out of memory
    under noeviction, a replica's READONLY, MISCONF (a failed snapshot with stop-writes-on-bgsave-error)."""
    return isinstance(exc, (OutOfMemoryError, ReadOnlyError)) or (
        type(exc) is ResponseError and redis_said(exc).startswith("MISCONF "))


def _sleep_unless_stopped(stop: threading.Event, seconds: float) -> None:
    # time.sleep() resumes after a signal's handler returns (PEP 475): SIGTERM or Ctrl-C was heard
    # only when the sleep ended, up to max_delay (10 s) later, as long as docker stop waits before
    # it kills. Short sleeps let it be heard within a tenth of a second.
    end = time.monotonic() + seconds
    while not stop.is_set() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.1))


def run_until_stopped(connection: Redis, run_once: Callable[[int], bool], what: str,
                      stop: threading.Event | None = None) -> None:
    """Call run_once(generation) until it returns True (a requested stop), waiting out Redis outages.
    stop: where the process notes a stop between generations, as one ends (see wait_until)."""
    generation = 0
    while True:
        started = time.monotonic()
        try:
            if run_once(generation):
                return
        except RedisError as exc:
            logger.warning("%s lost Redis (%s: %s); waiting for it to come back", what, type(exc).__name__,
                           redis_said(exc))
        else:
            logger.warning("%s stopped without being asked to; restarting it once Redis answers", what)
        generation += 1
        # Not again at once after a run that ended at once: a Redis out of memory answers PING but
        # refuses every write, and the worker started RQ hundreds of times a second, two lines each
        # (wait_for_redis waits for a write to pass).
        if not wait_for_redis(connection, pause=max(0.0, REDIS_POLL_SECONDS - (time.monotonic() - started)),
                              stop=stop):
            return
        logger.info("Redis is back; restarting the %s", what)
