"""Plain functions the tests share: factories and a worker run to completion."""

from __future__ import annotations

from notifier import store
from notifier.db import database
from notifier.models import ApiKey, Notification, Status

VERIFICATION = {"to": "ada@example.com", "user_id": "u1", "code": "123456", "name": "Ada"}
LITERAL = {"to": "bob@example.com", "subject": "Hello", "text": "Plain body", "html": "<p>HTML body</p>"}


def make_notification(api_key: ApiKey, status: Status = Status.QUEUED, **fields) -> Notification:
    """Store a literal notification directly (no API), in the given status."""
    values = {"to": "carol@example.com", "subject": "Hi", "text": "Hello", "priority": "default"} | fields
    with database.connection_context():
        return store.create_notification(api_key, values, status=status)


def reload(notification_id: str) -> Notification:
    with database.connection_context():
        return store.get(notification_id)


def run_worker_until_idle(connection) -> None:
    """Run an in-process worker in burst mode: every queued job, including immediate retries."""
    from worker import make_worker

    make_worker(connection).work(burst=True, with_scheduler=False)


def notification_count() -> int:
    """How many notifications the database holds, whoever owns them."""
    with database.connection_context():
        return Notification.select().count()


def installed_deliverer(settings, redis):
    """Install a Deliverer on real SMTP that also queues callbacks and releases (it has Redis).

    A context manager: `with installed_deliverer(settings, redis_conn) as deliverer: ...`; on exit the
    mailer is closed and no deliverer is installed."""
    from contextlib import contextmanager

    from notifier import jobs
    from notifier.jobs import Deliverer
    from notifier.mail import SmtpMailer
    from notifier.runtime import make_renderer

    @contextmanager
    def _installed():
        mailer = SmtpMailer(settings)
        deliverer = Deliverer(settings, mailer, make_renderer(settings), redis)
        jobs.install(deliverer)
        try:
            yield deliverer
        finally:
            mailer.close()
            jobs.install(None)

    return _installed()
