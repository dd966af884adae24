"""Keep a long-running loop (the worker, the scheduler) alive across a Redis outage."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


def wait_for_redis(connection: Redis, max_delay: float = 10.0) -> bool:
    """Block until Redis answers again; False if SIGTERM or SIGINT asked us to stop meanwhile."""
    stop = []
    previous = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
    delay = 0.5
    try:
        while not stop:
            try:
                connection.ping()
                return True
            except RedisError:
                time.sleep(delay)
                delay = min(delay * 2, max_delay)
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_until_stopped(connection: Redis, run_once: Callable[[int], bool], what: str) -> None:
    """Call run_once(generation) until it returns True (a requested stop), waiting out Redis outages."""
    generation = 0
    while True:
        try:
            if run_once(generation):
                return
        except RedisError as exc:
            logger.warning("%s lost Redis (%s); waiting for it to come back", what, type(exc).__name__)
        else:
            logger.warning("%s stopped without being asked to; restarting it once Redis answers", what)
        generation += 1
        if not wait_for_redis(connection):
            return
        logger.info("Redis is back; restarting the %s", what)
