"""Waiting for a service at a process's start (notifier.resilience)."""

from __future__ import annotations

import os
import signal
import threading
import time

from notifier import resilience


def test_sigterm_while_waiting_for_a_service_stops_the_wait_at_once_not_after_its_sleep():
    # Once the waits reach max_delay, SIGTERM (docker stop, Ctrl-C) was heard only when the sleep
    # ended, up to 10 s later: as long as docker stop waits before it kills.
    def unavailable():
        raise ConnectionError("no")

    started = time.monotonic()
    # Sleeps of 0.5, 1 and 2 s: the signal comes 0.1 s into the third, which ends at 3.5 s.
    timer = threading.Timer(1.6, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert resilience.wait_until(unavailable, ConnectionError, max_delay=10.0) is False
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.8


def test_a_stop_noted_before_the_wait_for_redis_ends_it_at_once():
    # A worker generation ending as Redis goes: a SIGTERM heard before run_until_stopped began to wait
    # was noted, then forgotten, and the worker waited for Redis however long it stayed away.
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    stop = threading.Event()
    nowhere = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    runs = []

    def run_once(generation: int) -> bool:
        runs.append(generation)
        stop.set()  # as the worker's own handler does for a SIGTERM heard as its loop ends
        raise RedisConnectionError("Redis went away")

    started = time.monotonic()
    resilience.run_until_stopped(nowhere, run_once, "worker", stop=stop)
    assert runs == [0]
    assert time.monotonic() - started < 2
