"""Retention (RETENTION_DAYS): what ended long ago is deleted with its history; nothing else is."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import timedelta

import pytest
from rq import Queue

from notifier import retention, store
from notifier.db import database
from notifier.models import CallbackStatus, Digest, Event, Notification, Status, utcnow
from scheduler import PURGE_JOB_ID, periodic_jobs
from tests.helpers import make_notification, run_worker_until_idle
from tests.operators import collect_metrics, value
from tests.processes import ROOT, cli, env_for

NOW = utcnow()
DAY = timedelta(days=1)


@pytest.fixture(params=["pg", "sqlite"])
def owner(request):
    """A stored API key on PostgreSQL and on SQLite, with settings keeping 30 days."""
    from notifier import keys

    db_fixture, settings_fixture = ("pg_db", "pg_settings") if request.param == "pg" else ("sqlite_db",
                                                                                         "sqlite_settings")
    request.getfixturevalue(db_fixture)
    settings = replace(request.getfixturevalue(settings_fixture), retention_days=30, dead_letter_ttl_days=60)
    with database.connection_context():
        key, _ = keys.create("retention")
    return key, settings


def _ended(key, status: Status, ended_days_ago: float, **fields) -> str:
    """A notification in status since that long ago, with a history line besides the first."""
    notification = make_notification(key, status=status, **fields)
    with database.connection_context():
        store.record(notification.id, kind="callback", reason="test")
        at = NOW - ended_days_ago * DAY
        Notification.update(created_at=at - DAY, updated_at=at).where(Notification.id == notification.id).execute()
    return notification.id


def _kept() -> set[str]:
    with database.connection_context():
        return {n.id for n in Notification.select(Notification.id)}


def _history_of_missing_rows() -> int:
    with database.connection_context():
        return Event.select().where(Event.notification.not_in(Notification.select(Notification.seq))).count()


def test_what_ended_before_the_cutoff_goes_with_its_history_and_nothing_else_does(owner):
    key, settings = owner
    gone = [_ended(key, Status.SENT, 31), _ended(key, Status.SUPPRESSED, 45), _ended(key, Status.CANCELLED, 31),
            _ended(key, Status.FAILED, 61)]
    kept = [
        _ended(key, Status.SENT, 29),  # inside the 30 days
        _ended(key, Status.QUEUED, 400),  # still waiting, however old
        _ended(key, Status.SCHEDULED, 400, send_at=NOW + DAY),
        _ended(key, Status.FAILED, 45),  # a dead letter `dlq requeue` may still be asked for
        _ended(key, Status.SENT, 90, idempotency_key="k1"),  # its key not yet forgotten: a retry replays
    ]
    owed = _ended(key, Status.SENT, 90, callback_url="https://example.com/cb")
    with database.connection_context():
        Notification.update(callback_status=CallbackStatus.PENDING.value).where(Notification.id == owed).execute()
        history = Event.select().count()
        lines_gone = Event.select().join(Notification).where(Notification.id.in_(gone)).count()

    with database.connection_context():
        for notification_id, made in ((gone[0], NOW - 40 * DAY), (kept[0], NOW - 40 * DAY), (gone[1], NOW)):
            Digest.create(api_key=key, user_key=notification_id, category="marketing", window_end=made, created_at=made,
                          notification_id=notification_id, items=1)

    with database.connection_context():
        assert retention.purge(settings, now=NOW) == len(gone)

    with database.connection_context():
        assert {d.notification_id for d in Digest.select()} == {kept[0], gone[1]}  # gone[1]'s window is recent
    assert _kept() == {*kept, owed}
    assert _history_of_missing_rows() == 0
    with database.connection_context():
        assert lines_gone >= 2 * len(gone) and Event.select().count() == history - lines_gone
    with database.connection_context():
        assert retention.purge(settings, now=NOW) == 0  # nothing left to do


def test_the_walk_goes_past_pages_of_what_stays(owner, monkeypatch):
    # Old mail still waiting fills the first pages; what may go lies behind it, and a page made after
    # the cutoff ends the walk.
    key, settings = owner
    monkeypatch.setattr(retention, "PAGE", 3)
    waiting = [_ended(key, Status.QUEUED, 100) for _ in range(7)]
    gone = [_ended(key, Status.SENT, 50) for _ in range(5)]
    recent = [_ended(key, Status.SENT, 1) for _ in range(4)]

    with database.connection_context():
        assert retention.purge(settings, now=NOW) == len(gone)

    assert _kept() == {*waiting, *recent}


def test_retention_0_keeps_everything(owner):
    key, settings = owner
    ancient = _ended(key, Status.SENT, 5000)

    with database.connection_context():
        assert retention.purge(replace(settings, retention_days=0), now=NOW) == 0

    assert _kept() == {ancient}


def test_a_worker_runs_the_periodic_purge_with_its_own_retention(api_key, pg_settings, redis_conn, monkeypatch):
    from notifier import jobs
    from notifier.jobs import Deliverer
    from notifier.mail import MemoryMailer
    from notifier.runtime import make_renderer

    settings = replace(pg_settings, retention_days=7)
    old, new = _ended(api_key[0], Status.SENT, 8), _ended(api_key[0], Status.SENT, 6)
    jobs.install(Deliverer(settings, MemoryMailer(), make_renderer(settings), redis=redis_conn))
    try:
        (queue,) = {q for job_id, _, _, q in periodic_jobs(settings) if job_id == PURGE_JOB_ID}
        assert queue == "notifier.low"  # never ahead of waiting mail
        job = Queue(queue, connection=redis_conn).enqueue("notifier.jobs.purge")
        run_worker_until_idle(redis_conn)
    finally:
        jobs.install(None)

    job.refresh()
    assert job.is_finished and job.return_value() == 1
    assert _kept() == {new} and old not in _kept()
    assert value(collect_metrics(redis_conn), "notifier_notifications_purged_total") == 1


def test_the_purge_command_deletes_what_retention_no_longer_keeps(api_key, pg_settings, redis_conn):
    old, new = _ended(api_key[0], Status.SENT, 8), _ended(api_key[0], Status.EXPIRED, 2)

    out = cli(["purge"], env_for(pg_settings, RETENTION_DAYS=7))

    assert "deleted 1 notification(s) that ended over 7 days ago" in out
    assert _kept() == {new} and old not in _kept()
    # Counted as the periodic purge's deletions are: the metric is of what retention deleted, however run.
    assert value(collect_metrics(redis_conn), "notifier_notifications_purged_total") == 1


def test_the_purge_command_refuses_to_run_without_retention(api_key, pg_settings):
    kept = _ended(api_key[0], Status.SENT, 800)
    done = subprocess.run([sys.executable, "-m", "notifier", "purge"], env=env_for(pg_settings, RETENTION_DAYS=0),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert done.returncode == 1 and "RETENTION_DAYS is 0" in done.stderr
    assert _kept() == {kept}
