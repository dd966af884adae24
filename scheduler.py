"""Entry point: rq-scheduler, which moves delayed and periodic jobs onto the queues when they are due."""

from __future__ import annotations

import logging

from rq_scheduler import Scheduler

from notifier.queues import connect_redis
from notifier.runtime import configure_logging, load_settings, open_database

logger = logging.getLogger("notifier.scheduler")

POLL_SECONDS = 1


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    open_database(settings)
    connection = connect_redis(settings.redis_url)
    scheduler = Scheduler(connection=connection, interval=POLL_SECONDS)
    logger.info("scheduler starting, polling every %ss", POLL_SECONDS)
    scheduler.run()


if __name__ == "__main__":
    main()
