"""Delayed sends due at one moment: scheduler.py releases them together (notifier.releases)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from rq.job import Job
from rq_scheduler import Scheduler

import scheduler
from notifier import jobs, keys, logs, releases, store
from notifier.db import database
from notifier.models import Status, utcnow
from notifier.queues import dispatch_many, notification_of_release, queue_for, release_job_id_for
from scheduler import NotifierScheduler
from tests.helpers import installed_deliverer, make_notification, reload, run_worker_until_idle

pytestmark = pytest.mark.integration


def _scheduled(settings, redis_conn, api_key, count: int, *, send_at=None, request_id: str | None = None,
               **fields):
    """count delayed sends, their releases scheduled as the API schedules them (due: send_at past)."""
    send_at = send_at or utcnow() - timedelta(seconds=1)
    rows = [make_notification(api_key, Status.SCHEDULED, send_at=send_at, to=f"r{n}-{fields.get('priority', 'd')}"
                              "@example.com", **fields) for n in range(count)]
    with logs.bound(request_id=request_id):
        dispatch_many(redis_conn, settings, rows)
    return rows


def _poll(settings, redis_conn) -> None:
    """One poll of scheduler.py's rq-scheduler (under its lock, as its loop runs it)."""
    NotifierScheduler(settings, connection=redis_conn, interval=1).enqueue_jobs()


def _release_entries(redis_conn) -> list[str]:
    return [j.decode() for j in redis_conn.zrange(Scheduler.scheduled_jobs_key, 0, -1) if j.startswith(b"release-")]


def _delivery_jobs(redis_conn, priority: str) -> list[Job]:
    queue = queue_for(priority, redis_conn)
    return [job for job in queue.jobs if not job.id.startswith("notifier-")]  # not the periodic jobs


def test_sends_due_together_go_out_in_shared_jobs_from_one_poll_without_a_release_job_each(
        pg_settings, pg_db, api_key, redis_conn, smtp):
    # Measured on a real stack (2 workers, a loaded 2-core machine): 1,000 sends due at one second went
    # out over 28-45 s and 5,000 over four minutes, rq-scheduler moving each release job alone and a
    # worker running it before the delivery job it queued.
    rows = _scheduled(pg_settings, redis_conn, api_key[0], 60)
    assert len(_release_entries(redis_conn)) == 60

    _poll(pg_settings, redis_conn)

    assert _release_entries(redis_conn) == []
    assert not redis_conn.keys("rq:job:release-*")  # never run, not kept
    jobs = _delivery_jobs(redis_conn, "default")
    assert sorted(len(job.args[0]) for job in jobs) == [10, 25, 25]  # BATCH_JOB_SIZE a job, as a batch's
    assert sorted(i for job in jobs for i in job.args[0]) == sorted(r.id for r in rows)
    for row in rows:
        current = reload(row.id)
        assert current.status == "queued"
    with database.connection_context():
        assert [(e.from_status, e.to_status, e.reason) for e in store.history(reload(rows[0].id))][-1] == (
            "scheduled", "queued", releases.REASON)

    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert {reload(r.id).status for r in rows} == {"sent"}
    assert sorted(m.message["To"] for m in smtp.messages) == sorted(r.to for r in rows)


def test_a_high_priority_send_due_with_a_low_priority_campaign_goes_first(pg_settings, pg_db, api_key, redis_conn,
                                                                          smtp, monkeypatch):
    monkeypatch.setattr(releases, "PAGE", 10)  # the campaign takes several pages
    campaign = _scheduled(pg_settings, redis_conn, api_key[0], 30, priority="low")
    # The newest entry, the last rq-scheduler would read.
    urgent = _scheduled(pg_settings, redis_conn, api_key[0], 1, priority="high")[0]

    _poll(pg_settings, redis_conn)

    (job,) = _delivery_jobs(redis_conn, "high")
    assert job.args[0] == [urgent.id]
    assert sum(len(job.args[0]) for job in _delivery_jobs(redis_conn, "low")) == 30
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    received = [m.message["To"] for m in smtp.messages]
    assert received[0] == urgent.to
    assert sorted(received[1:]) == sorted(r.to for r in campaign)


def test_a_send_cancelled_before_its_release_stays_cancelled_and_its_entry_goes(pg_settings, pg_db, api_key,
                                                                                redis_conn, smtp):
    kept, cancelled = _scheduled(pg_settings, redis_conn, api_key[0], 2)
    with database.connection_context():
        assert store.transition(cancelled.id, Status.CANCELLED, reason="cancelled by the caller")

    _poll(pg_settings, redis_conn)

    assert _release_entries(redis_conn) == []
    assert not redis_conn.exists(f"rq:job:{release_job_id_for(cancelled.id)}")
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert (reload(kept.id).status, reload(cancelled.id).status) == ("sent", "cancelled")
    assert [m.message["To"] for m in smtp.messages] == [kept.to]


def test_a_send_cancelled_once_released_is_not_sent(pg_settings, pg_db, api_key, redis_conn, smtp):
    (row,) = _scheduled(pg_settings, redis_conn, api_key[0], 1)
    _poll(pg_settings, redis_conn)
    with database.connection_context():
        assert store.transition(row.id, Status.CANCELLED, reason="cancelled by the caller",
                                sources=(Status.SCHEDULED, Status.QUEUED))
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert reload(row.id).status == "cancelled"
    assert smtp.count() == 0


def test_an_entry_due_before_its_send_time_is_left_to_its_release_job_which_puts_it_back(
        pg_settings, pg_db, api_key, redis_conn, smtp):
    # A clock step: rq-scheduler finds the entry due while the send's time is still ahead.
    (row,) = _scheduled(pg_settings, redis_conn, api_key[0], 1, send_at=utcnow() + timedelta(seconds=60))
    redis_conn.zadd(Scheduler.scheduled_jobs_key, {release_job_id_for(row.id): time.time() - 1})

    _poll(pg_settings, redis_conn)

    assert reload(row.id).status == "scheduled"
    assert queue_for("default", redis_conn).job_ids == [release_job_id_for(row.id)]  # moved as it always was
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    (again,) = _release_entries(redis_conn)
    assert again != release_job_id_for(row.id)
    assert abs(redis_conn.zscore(Scheduler.scheduled_jobs_key, again) - time.time() - 60) < 3
    assert (reload(row.id).status, smtp.count()) == ("scheduled", 0)


def test_sends_due_while_the_database_is_away_wait_in_the_schedule_and_go_at_the_next_poll(
        pg_settings, pg_db, api_key, redis_conn, smtp, database_outage):
    rows = _scheduled(pg_settings, redis_conn, api_key[0], 3)
    begin, end = database_outage
    begin()
    try:
        _poll(pg_settings, redis_conn)  # says so and carries on
        assert len(_release_entries(redis_conn)) == 3
        assert _delivery_jobs(redis_conn, "default") == []  # not moved as jobs that would fail
    finally:
        end()
    _poll(pg_settings, redis_conn)
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert {reload(r.id).status for r in rows} == {"sent"}


class _Lines(logging.Handler):
    """The lines logged, each with the request and notification ids bound as it was written."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str | None, str | None]] = []

    def emit(self, record):
        self.lines.append((record.getMessage(), logs.request_id.get(), logs.notification_id.get()))


def test_sends_released_together_share_jobs_and_each_keeps_the_id_of_its_request(pg_settings, pg_db, api_key,
                                                                                  redis_conn, smtp, caplog):
    first = _scheduled(pg_settings, redis_conn, api_key[0], 2, request_id="req-1")
    second = _scheduled(pg_settings, redis_conn, api_key[0], 1, request_id="req-2")
    untraced = _scheduled(pg_settings, redis_conn, api_key[0], 1)

    _poll(pg_settings, redis_conn)

    (job,) = _delivery_jobs(redis_conn, "default")  # one job: sends made one request each still share
    assert job.meta == {"request_id": None, "request_ids": {**{r.id: "req-1" for r in first}, second[0].id: "req-2"}}
    lines = _Lines()
    caplog.set_level(logging.INFO, logger="notifier.jobs")
    logging.getLogger("notifier.jobs").addHandler(lines)
    try:
        with installed_deliverer(pg_settings, redis_conn):
            run_worker_until_idle(redis_conn)
    finally:
        logging.getLogger("notifier.jobs").removeHandler(lines)
    sent = {nid: rid for message, rid, nid in lines.lines if message.endswith("sent (attempt 1)")}
    assert sent == {**{r.id: "req-1" for r in first}, second[0].id: "req-2", untraced[0].id: None}


def test_sends_of_one_request_released_together_name_it_as_a_batch_does(pg_settings, pg_db, api_key, redis_conn):
    rows = _scheduled(pg_settings, redis_conn, api_key[0], 2, request_id="req-1")
    _poll(pg_settings, redis_conn)
    (job,) = _delivery_jobs(redis_conn, "default")
    assert (sorted(job.args[0]), job.meta) == (sorted(r.id for r in rows), {"request_id": "req-1"})


def test_released_sends_on_sqlite(sqlite_settings, sqlite_db, redis_conn):
    # make run's database: the same moves, without PostgreSQL's one statement.
    owner = keys.create("sqlite-releases")[0]
    rows = _scheduled(sqlite_settings, redis_conn, owner, 3)
    NotifierScheduler(sqlite_settings, connection=redis_conn, interval=1).enqueue_jobs()
    (job,) = _delivery_jobs(redis_conn, "default")
    assert sorted(job.args[0]) == sorted(r.id for r in rows)
    assert {reload(r.id).status for r in rows} == {"queued"}
    assert {reload(r.id).job_id for r in rows} == {job.id}
    assert _release_entries(redis_conn) == []


def test_each_release_entry_names_its_notification():
    notification_id = "0b9826a9-0859-41c4-a427-fa3602925117"
    assert notification_of_release(release_job_id_for(notification_id)) == notification_id
    assert notification_of_release(release_job_id_for(notification_id, again=True)) == notification_id
    assert notification_of_release("notifier-reconcile") is None
    assert notification_of_release("release-short") is None


def test_a_scheduler_killed_holding_its_lock_holds_up_releases_for_seconds_not_eleven(pg_settings, pg_db, api_key,
                                                                                     redis_conn):
    # rq-scheduler's lock lives the poll interval and 10 s: a scheduler SIGKILLed mid-poll held up
    # every release, its restarted self's too, for 11 s.
    NotifierScheduler(pg_settings, connection=redis_conn, interval=1).acquire_lock()  # then killed
    assert 0 < redis_conn.ttl(Scheduler.scheduler_lock_key) <= scheduler.LOCK_SECONDS
    restarted = NotifierScheduler(pg_settings, connection=redis_conn, interval=1)
    assert not restarted.acquire_lock()
    time.sleep(scheduler.LOCK_SECONDS + 0.1)
    assert restarted.acquire_lock()


def test_a_poll_keeps_its_lock_while_it_releases(pg_settings, pg_db, api_key, redis_conn, monkeypatch):
    monkeypatch.setattr(releases, "PAGE", 1)
    _scheduled(pg_settings, redis_conn, api_key[0], 2)
    polling = NotifierScheduler(pg_settings, connection=redis_conn, interval=1)
    assert polling.acquire_lock()
    time.sleep(scheduler.LOCK_SECONDS - 1)
    polling.enqueue_jobs()
    assert redis_conn.pttl(Scheduler.scheduler_lock_key) > (scheduler.LOCK_SECONDS - 0.5) * 1000  # renewed


def test_the_rest_of_a_released_job_that_makes_way_keeps_each_ones_request_id(pg_settings, pg_db, api_key,
                                                                              redis_conn, smtp, caplog, monkeypatch):
    monkeypatch.setattr(jobs, "MAKE_WAY_CHECK_SECONDS", 0)  # look before every email after the first
    first = _scheduled(pg_settings, redis_conn, api_key[0], 2, request_id="req-1", priority="low")
    second = _scheduled(pg_settings, redis_conn, api_key[0], 2, request_id="req-2", priority="low")
    _poll(pg_settings, redis_conn)
    urgent = make_notification(api_key[0], priority="high", to="urgent@example.com")
    dispatch_many(redis_conn, pg_settings, [urgent])
    # The worker takes the urgent job first: run the campaign's job alone until it makes way.
    (job,) = _delivery_jobs(redis_conn, "low")
    lines = _Lines()
    caplog.set_level(logging.INFO, logger="notifier.jobs")
    logging.getLogger("notifier.jobs").addHandler(lines)
    try:
        with installed_deliverer(pg_settings, redis_conn):
            queue_for("low", redis_conn).remove(job.id)
            assert job.perform()["made way"] == 3
            run_worker_until_idle(redis_conn)
    finally:
        logging.getLogger("notifier.jobs").removeHandler(lines)
    sent = {nid: rid for message, rid, nid in lines.lines if message.endswith("sent (attempt 1)")}
    assert sent == {**{r.id: "req-1" for r in first}, **{r.id: "req-2" for r in second}, urgent.id: None}


def test_the_scheduler_says_once_that_the_database_went_and_once_that_it_came_back(
        pg_settings, pg_db, api_key, redis_conn, caplog):
    # It logged a warning every poll, a second apart, for as long as the database was away.
    from notifier.db import bind
    from tests.processes import free_port

    rows = _scheduled(pg_settings, redis_conn, api_key[0], 1)
    polling = NotifierScheduler(pg_settings, connection=redis_conn, interval=1)
    caplog.set_level(logging.INFO, logger="notifier.scheduler")
    bind(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    for _ in range(3):
        polling.enqueue_jobs()
    bind(pg_settings.database_url)
    for _ in range(2):
        polling.enqueue_jobs()
    said = [r.getMessage() for r in caplog.records
            if r.name == "notifier.scheduler" and "periodic" not in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("delayed notifications not released: the database is not available (OperationalError")
    assert said[1] == "the database is available again; delayed notifications are released"
    assert reload(rows[0].id).status == Status.QUEUED
