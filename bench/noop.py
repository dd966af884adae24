"""The RQ baseline's jobs: they do (next to) nothing, so what is timed is RQ on the same worker setup."""

from __future__ import annotations

import time

STAMPS_KEY = "bench:stamps"


def noop(notification_id: str) -> None:
    """Take an id, as the delivery job does, and do nothing with it."""
    return None


def stamp(enqueued_at: float) -> None:
    """Record how long this job waited between enqueue and start (seconds, in a Redis list)."""
    from rq import get_current_job

    waited = time.time() - enqueued_at
    get_current_job().connection.rpush(STAMPS_KEY, waited)
