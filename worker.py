"""Entry point: an RQ worker on every priority queue, highest first, with RQ's scheduler for retries."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket

from redis.exceptions import RedisError
from rq import SimpleWorker

from notifier import jobs
from notifier.errors import PermanentDeliveryError
from notifier.queues import all_queues, connect_redis
from notifier.resilience import run_until_stopped
from notifier.runtime import build_deliverer, configure_logging, load_settings

logger = logging.getLogger("notifier.worker")


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
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


class NotifierWorker(SimpleWorker):
    """SimpleWorker: sending is I/O, and not forking per job keeps the SMTP and database connections
    warm. It remembers whether it was asked to stop, so a loop that ends for any other reason (Redis
    went away) can be told apart and started again."""

    stopping = False

    def request_stop(self, signum, frame):
        self.stopping = True
        super().request_stop(signum, frame)


def make_worker(connection, name: str | None = None) -> NotifierWorker:
    """A worker on all notifier queues, highest priority first, callbacks last."""
    return NotifierWorker(
        all_queues(connection),
        connection=connection,
        name=name,
        exception_handlers=[stop_retrying_permanent_failures],
    )


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    parent = os.getpid()
    os.register_at_fork(after_in_child=lambda: _die_with_parent(parent))
    connection = connect_redis(settings.redis_url)
    jobs.install(build_deliverer(settings, redis=connection))
    name = f"notifier-{socket.gethostname()}-{os.getpid()}"
    logger.info("worker %s starting", name)

    def run_once(generation: int) -> bool:
        worker = make_worker(connection, name=f"{name}-{generation}" if generation else name)
        try:
            worker.work(with_scheduler=True, logging_level=settings.log_level)
        except RedisError:
            # Asked to stop while Redis went away too (Ctrl-C on the whole stack): stop, do not wait.
            if worker.stopping:
                return True
            raise
        return worker.stopping

    run_until_stopped(connection, run_once, "worker")


if __name__ == "__main__":
    main()
