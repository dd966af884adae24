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
