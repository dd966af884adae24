"""A worker's pause while the database is away: it takes no job until the database answers again, and
says so once as the outage begins and once as it ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from notifier.db import UNAVAILABLE_ERRORS, database
from notifier.patience import answer_within
from notifier.resilience import reason_of

logger = logging.getLogger(__name__)

# How long a paused worker waits before it asks the database again: soon at first (a restart or a
# failover takes seconds), then twice as long each time up to the most, one connection attempt per
# worker each time. It takes jobs again within about the most (and DATABASE_CONNECT_TIMEOUT, for a
# server still silent) of the database's return.
FIRST_ASK_SECONDS = 0.5
MOST_ASK_SECONDS = 5.0


def database_answers(connect_timeout: float) -> bool:
    """Whether the database runs a statement now, answering within connect_timeout (a silent server
    sends no error of its own)."""
    try:
        with answer_within(connect_timeout), database.connection_context():
            database.execute_sql("SELECT 1")
    except UNAVAILABLE_ERRORS:
        return False
    return True


class DatabaseOutage:
    """What a worker knows of the database being away, and how it waits for it to come back.

    Before, a worker went on taking jobs through an outage, and each failed at once on its first
    statement: an ERROR line per job, and RQ's retries of every queued notification used up in
    minutes (RETRY_INTERVALS' first ones are short), for a fault that was none of theirs; their
    dead letters were then requeued by the reconciler. Now the first job that meets the outage goes
    back to its queue as it was (worker.NotifierWorker), and the worker waits here before it takes
    another."""

    def __init__(self, answers: Callable[[], bool], first_ask: float = FIRST_ASK_SECONDS,
                 most_ask: float = MOST_ASK_SECONDS):
        self.answers = answers
        self.first_ask = first_ask
        self.most_ask = most_ask
        self.since: float | None = None  # time.monotonic() as the outage began; None: no outage known

    def begins(self, exc: BaseException, job_id: str) -> bool:
        """Whether a job that failed on exc (an error an outage raises) met the database away: then
        the outage begins, said once. A database that answers now (a statement timeout, a deadlock,
        a blip already over) is no outage: the job's failure is an attempt like any other."""
        if self.since is not None:
            return True
        if self.answers():
            return False
        self.since = time.monotonic()
        logger.warning("the database is not available (%s: %s): job %s goes back to its queue as it was, its "
                       "retries untouched, and this worker takes no job until the database answers, asking it "
                       "again after %g s, then at most every %g s", type(exc).__name__, reason_of(exc), job_id,
                       self.first_ask, self.most_ask)
        return True

    def wait(self, beat: Callable[[], None]) -> None:
        """Until the database answers again, if an outage began: beat() before each wait (the worker's
        heartbeat, which keeps it alive in RQ's eyes and honours a stop)."""
        if self.since is None:
            return
        delay = self.first_ask
        while True:
            beat()
            time.sleep(delay)  # RQ's stop handler raises StopRequested here (the worker is not busy)
            if self.answers():
                break
            delay = min(delay * 2, self.most_ask)
        lasted, self.since = time.monotonic() - self.since, None
        logger.info("the database answers again after %.1f s away; this worker takes jobs again", lasted)
