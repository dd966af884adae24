"""Queue names, the Redis connection, and handing a notification to the queue for its priority."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue, Retry

from notifier.config import Settings
from notifier.models import Priority

logger = logging.getLogger(__name__)

QUEUE_NAMES: dict[Priority, str] = {
    Priority.HIGH: "notifier.high",
    Priority.DEFAULT: "notifier.default",
    Priority.LOW: "notifier.low",
}
# Workers listen in this order, so a high-priority email never waits behind a low-priority backlog.
QUEUES_BY_PRIORITY: tuple[str, ...] = tuple(QUEUE_NAMES[p] for p in (Priority.HIGH, Priority.DEFAULT, Priority.LOW))

DELIVER_JOB = "notifier.jobs.deliver"


def connect_redis(url: str) -> Redis:
    """A Redis client for url; short timeouts so a dead Redis fails a request instead of hanging it."""
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


def queue_for(priority: str, connection: Redis) -> Queue:
    """The RQ queue that carries notifications of this priority."""
    return Queue(QUEUE_NAMES[Priority(priority)], connection=connection)


def all_queues(connection: Redis) -> list[Queue]:
    """Every notifier queue, highest priority first."""
    return [Queue(name, connection=connection) for name in QUEUES_BY_PRIORITY]


def job_id_for(notification_id: str) -> str:
    """One RQ job id per notification: enqueueing it again replaces the job instead of adding one."""
    return f"notification-{notification_id}"


def retry_policy(settings: Settings, attempts_made: int) -> Retry | None:
    """RQ's retries for a notification that has already been tried attempts_made times."""
    remaining = settings.retry_intervals[attempts_made:]
    return Retry(max=len(remaining), interval=list(remaining)) if remaining else None


def enqueue_delivery(
    connection: Redis, settings: Settings, notification_id: str, priority: str, attempts_made: int = 0
):
    """Put a delivery job for the notification on its priority queue; raises if Redis is unreachable."""
    return queue_for(priority, connection).enqueue(
        DELIVER_JOB,
        notification_id,
        job_id=job_id_for(notification_id),
        retry=retry_policy(settings, attempts_made),
        job_timeout=settings.job_timeout,
        result_ttl=3600,
        failure_ttl=365 * 24 * 3600,
        description=f"deliver notification {notification_id}",
    )
