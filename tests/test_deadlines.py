"""Deadlines, delayed sends and cancelling: a message is sent in its window or not at all."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
from peewee import OperationalError
from rq.job import Job
from rq_scheduler import Scheduler

from notifier import jobs, store
from notifier.db import database
from notifier.models import Notification, Status, utcnow
from notifier.queues import dispatch, failure_ttl, job_id_for, queue_for, release_job_id_for
from notifier.reconciler import reconcile
from tests.helpers import (
    LITERAL,
    VERIFICATION,
    installed_deliverer,
    make_notification,
    notification_count,
    reload,
    run_worker_until_idle,
)

pytestmark = pytest.mark.integration

SEND = "/api/notifications/send"
DEADLINE_REASON = "deadline passed before it could be sent"


@pytest.fixture
def live_deliverer(pg_settings, pg_db, redis_conn):
    """A Deliverer with Redis, so a release can hand the notification to its queue."""
    with installed_deliverer(pg_settings, redis_conn) as deliverer:
        yield deliverer


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=None)


def _send(client, headers, path=SEND, **payload) -> dict:
    response = client.post(path, json=payload, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def _detail(client, headers, notification_id) -> dict:
    return client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()


def test_notification_past_its_deadline_is_expired_not_sent(client, headers, live_deliverer, smtp, redis_conn):
    by_ttl = _send(client, headers, **LITERAL, ttl_seconds=1)
    by_time = _send(client, headers, **LITERAL, expires_at=_iso(utcnow() + timedelta(seconds=1)))
    assert by_ttl["status"] == by_time["status"] == "queued"
    deadlines = [_parse(_detail(client, headers, n["id"])["expires_at"]) for n in (by_ttl, by_time)]
    time.sleep(max(0.0, (max(deadlines) - utcnow()).total_seconds()) + 0.05)

    run_worker_until_idle(redis_conn)

    for accepted in (by_ttl, by_time):
        detail = _detail(client, headers, accepted["id"])
        assert detail["status"] == "expired"
        assert detail["sent_at"] is None
        last = detail["history"][-1]
        assert last["status"] == "expired" and "deadline" in last["reason"]
    assert smtp.count() == 0


def test_reconciler_expires_overdue_notifications_without_a_worker(api_key, pg_settings, live_deliverer, smtp,
                                                                    redis_conn):
    now = utcnow()
    past = now - timedelta(seconds=1)
    queued = make_notification(api_key[0], Status.QUEUED, to="queued@example.com", expires_at=past)
    retrying = make_notification(api_key[0], Status.RETRYING, to="retrying@example.com", expires_at=past,
                                 attempts=1, last_error="451 busy")
    scheduled = make_notification(api_key[0], Status.SCHEDULED, to="scheduled@example.com", expires_at=past,
                                  send_at=now - timedelta(seconds=5))
    in_time = make_notification(api_key[0], Status.QUEUED, to="in-time@example.com",
                                expires_at=now + timedelta(hours=1))
    for row in (queued, retrying, scheduled, in_time):
        dispatch(redis_conn, pg_settings, row)  # their jobs are waiting in Redis, as after a backlog

    with database.connection_context():
        report = reconcile(pg_settings, redis_conn)

    assert report.expired == 3
    assert smtp.count() == 0
    for row, was in ((queued, "queued"), (retrying, "retrying"), (scheduled, "scheduled")):
        expired = reload(row.id)
        assert expired.status == "expired"
        with database.connection_context():
            last = store.history(expired)[-1]
        assert (last.from_status, last.to_status, last.reason) == (was, "expired", DEADLINE_REASON)
    assert reload(in_time.id).status == "queued"

    run_worker_until_idle(redis_conn)  # the expired ones' jobs find nothing to claim
    assert [reload(r.id).status for r in (queued, retrying, scheduled, in_time)] == [
        "expired", "expired", "expired", "sent"
    ]
    assert reload(retrying.id).attempts == 1
    assert [m.rcpt_tos for m in smtp.wait_for(1)] == [["in-time@example.com"]]
    assert smtp.count() == 1


def test_verification_gets_a_default_deadline(client, headers, live_deliverer, smtp, redis_conn, pg_settings):
    accepted = _send(client, headers, "/api/notifications/send-verification", **VERIFICATION)

    detail = _detail(client, headers, accepted["id"])
    lifetime = _parse(detail["expires_at"]) - _parse(detail["created_at"])
    assert pg_settings.verification_ttl_seconds == 3600
    assert abs(lifetime.total_seconds() - 3600) < 2
    run_worker_until_idle(redis_conn)
    assert reload(accepted["id"]).status == "sent"
    assert smtp.count() == 1


def test_verification_keeps_a_deadline_the_caller_gives(client, headers, live_deliverer, smtp, redis_conn):
    accepted = _send(client, headers, "/api/notifications/send-verification", **VERIFICATION, ttl_seconds=60)

    detail = _detail(client, headers, accepted["id"])
    lifetime = _parse(detail["expires_at"]) - _parse(detail["created_at"])
    assert abs(lifetime.total_seconds() - 60) < 2
    run_worker_until_idle(redis_conn)
    assert reload(accepted["id"]).status == "sent"
    assert smtp.count() == 1


def _in(**delta) -> str:
    return _iso(utcnow() + timedelta(**delta))


@pytest.mark.parametrize(
    ("timing", "field"),
    [
        pytest.param(lambda: {"expires_at": _in(seconds=-60)}, "expires_at", id="expires_at-in-the-past"),
        pytest.param(lambda: {"expires_at": _in(hours=1), "ttl_seconds": 60}, "ttl_seconds",
                     id="expires_at-and-ttl_seconds"),
        pytest.param(lambda: {"send_at": _in(hours=2), "expires_at": _in(hours=1)}, "expires_at",
                     id="send_at-after-expires_at"),
        pytest.param(lambda: {"delay_seconds": 7200, "ttl_seconds": 3600}, "ttl_seconds",
                     id="delay-longer-than-ttl"),
        pytest.param(lambda: {"send_at": _in(days=91)}, "send_at", id="send_at-beyond-the-horizon"),
        pytest.param(lambda: {"delay_seconds": 91 * 86400}, "delay_seconds", id="delay-beyond-the-horizon"),
        pytest.param(lambda: {"delay_seconds": 10**12}, None, id="delay-beyond-any-calendar"),
        pytest.param(lambda: {"send_at": "2030-01-01T09:00:00"}, "send_at", id="send_at-without-offset"),
        pytest.param(lambda: {"send_at": _in(hours=1), "delay_seconds": 60}, "delay_seconds",
                     id="send_at-and-delay_seconds"),
    ],
)
def test_impossible_timing_is_refused(client, headers, live_deliverer, smtp, redis_conn, timing, field):
    response = client.post(SEND, json={**LITERAL, **timing()}, headers=headers)

    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    if field is not None:
        assert field in error["details"]
    assert notification_count() == 0
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0


def test_send_at_at_the_horizon_is_accepted(client, headers, live_deliverer, smtp, redis_conn):
    accepted = _send(client, headers, **LITERAL, send_at=_in(days=89))

    assert accepted["status"] == "scheduled"
    run_worker_until_idle(redis_conn)
    assert reload(accepted["id"]).status == "scheduled"
    assert smtp.count() == 0


def test_delayed_send_waits_for_its_release_then_is_sent(client, headers, live_deliverer, smtp, redis_conn):
    accepted = _send(client, headers, **LITERAL, delay_seconds=2)

    assert accepted["status"] == "scheduled"
    notification_id = accepted["id"]
    detail = _detail(client, headers, notification_id)
    assert abs((_parse(detail["send_at"]) - _parse(detail["created_at"])).total_seconds() - 2) < 1
    scheduler = Scheduler(connection=redis_conn)
    assert release_job_id_for(notification_id) in scheduler
    ((job, at),) = scheduler.get_jobs(with_times=True)
    assert list(job.args) == [notification_id]
    assert abs((at.replace(tzinfo=None) - _parse(detail["send_at"])).total_seconds()) < 1
    run_worker_until_idle(redis_conn)  # nothing is on a delivery queue before the release
    assert reload(notification_id).status == "scheduled"
    assert smtp.count() == 0

    # Run by hand before its time, the release puts itself back instead of sending early.
    assert jobs.release(notification_id) == "early"
    assert reload(notification_id).status == "scheduled"
    time.sleep(max(0.0, (_parse(detail["send_at"]) - utcnow())
                   .total_seconds()) + 0.05)
    assert jobs.release(notification_id) == "released"

    assert reload(notification_id).status == "queued"
    assert jobs.release(notification_id) == "skipped"  # a second release is harmless
    run_worker_until_idle(redis_conn)
    sent = reload(notification_id)
    assert (sent.status, sent.attempts) == ("sent", 1)
    statuses = [e["status"] for e in _detail(client, headers, notification_id)["history"]]
    assert statuses == ["scheduled", "queued", "sending", "sent"]
    assert len(smtp.wait_for(1)) == 1
    assert smtp.count() == 1


@pytest.mark.parametrize("finished_job_ttl", [0, 1])  # 0: RQ deletes a finished job at once
def test_a_release_woken_early_by_the_worker_still_releases_at_its_time(api_key, pg_settings, pg_db, smtp,
                                                                       redis_conn, finished_job_ttl):
    settings = replace(pg_settings, finished_job_ttl=finished_job_ttl)
    row = make_notification(api_key[0], Status.SCHEDULED, send_at=utcnow() + timedelta(seconds=2))
    scheduler = Scheduler(connection=redis_conn)
    with installed_deliverer(settings, redis_conn):
        dispatch(redis_conn, settings, row)
        (job,) = scheduler.get_jobs()
        scheduler.enqueue_job(job)  # moved on early, as by a scheduler whose clock runs ahead of the worker's
        run_worker_until_idle(redis_conn)
        assert reload(row.id).status == "scheduled"
        assert smtp.count() == 0
        assert scheduler.count() == 1  # put back for its time

        # Past its time, and past FINISHED_JOB_TTL of the early job: rq-scheduler's own poll moves it on.
        time.sleep(max(0.0, (row.send_at - utcnow()).total_seconds()) + 1.2)
        scheduler.enqueue_jobs()
        run_worker_until_idle(redis_conn)

    sent = reload(row.id)
    assert (sent.status, sent.attempts) == ("sent", 1)
    assert smtp.count() == 1


def test_a_delayed_send_just_accepted_is_not_taken_for_one_whose_release_redis_lost(api_key, pg_settings, pg_db,
                                                                                    redis_conn):
    # Found by a run-through: a batch writes its releases one by one after its commit, and a pass
    # meanwhile counted hundreds not written yet as lost (`rescheduled`, a metric to alert on).
    settings = replace(pg_settings, reconcile_interval=30, reconcile_grace_seconds=30)
    make_notification(api_key[0], Status.SCHEDULED, send_at=utcnow() + timedelta(seconds=45))  # after the next pass
    with database.connection_context():
        assert reconcile(settings, redis_conn).rescheduled == 0
    # One due before the next pass is looked at however young: left to that pass, it would go late.
    make_notification(api_key[0], Status.SCHEDULED, send_at=utcnow() + timedelta(seconds=5))
    with database.connection_context():
        assert reconcile(settings, redis_conn).rescheduled == 1


def test_a_release_woken_early_is_not_taken_for_one_redis_lost(api_key, pg_settings, pg_db, smtp, redis_conn):
    # The early release puts itself back under a new id; the reconciler looked for the first one only,
    # finished by then, and scheduled a second release, counted as one Redis had lost.
    settings = replace(pg_settings, reconcile_interval=30, reconcile_grace_seconds=30)
    row = make_notification(api_key[0], Status.SCHEDULED, send_at=utcnow() + timedelta(seconds=20))
    scheduler = Scheduler(connection=redis_conn)
    with installed_deliverer(settings, redis_conn):
        dispatch(redis_conn, settings, row)
        (job,) = scheduler.get_jobs()
        scheduler.enqueue_job(job)  # moved on early
        run_worker_until_idle(redis_conn)
    (again,) = scheduler.get_jobs()
    assert again.id != job.id

    with database.connection_context():
        Notification.update(updated_at=utcnow() - timedelta(seconds=11)).execute()  # past the writing of releases
        assert reconcile(settings, redis_conn).rescheduled == 0
    assert [j.id for j in scheduler.get_jobs()] == [again.id]
    assert (reload(row.id).status, smtp.count()) == ("scheduled", 0)


@pytest.mark.parametrize("scheduled_before_the_ttl_was_saved", [False, True])
def test_a_release_that_fails_stays_in_the_failed_registry_for_the_dead_letter_ttl_not_a_year(
        client, headers, live_deliverer, redis_conn, pg_settings, database_outage, scheduled_before_the_ttl_was_saved):
    notification_id = _send(client, headers, **LITERAL, delay_seconds=60)["id"]
    scheduler = Scheduler(connection=redis_conn)
    (job,) = scheduler.get_jobs()
    if scheduled_before_the_ttl_was_saved:  # as every release job in Redis before it was (jobs.release)
        redis_conn.hdel(job.key, "failure_ttl")
        job = Job.fetch(job.id, connection=redis_conn)
    scheduler.enqueue_job(job)  # due now
    begin, end = database_outage
    begin()
    try:
        run_worker_until_idle(redis_conn)  # the release cannot read the database: the job fails
    finally:
        end()
    registry = queue_for("default", redis_conn).failed_job_registry  # the release's queue is its send's
    expires = redis_conn.zscore(registry.key, release_job_id_for(notification_id))
    assert expires is not None
    assert abs(expires - (time.time() + failure_ttl(pg_settings))) < 60  # RQ's default: a year
    assert reload(notification_id).status == "scheduled"  # the reconciler releases it in time


def test_a_delayed_send_whose_release_redis_lost_is_released_at_its_time_not_a_pass_late(
        api_key, pg_settings, pg_db, smtp, redis_conn):
    # Found by flushing the Redis of a running stack while 20 delayed sends waited: each went out only
    # once a reconciler pass found it overdue, RECONCILE_GRACE_SECONDS and up to a RECONCILE_INTERVAL
    # late (4-9 s at 5 s and 3 s; a minute at the defaults).
    settings = replace(pg_settings, reconcile_interval=30, reconcile_grace_seconds=30)
    scheduler = Scheduler(connection=redis_conn)
    soon, later = (make_notification(api_key[0], Status.SCHEDULED, send_at=utcnow() + timedelta(seconds=seconds))
                   for seconds in (1.5, 3600))
    for row in (soon, later):
        dispatch(redis_conn, settings, row)
    with database.connection_context():  # accepted a while before Redis lost them: its release was written
        Notification.update(updated_at=utcnow() - timedelta(seconds=11)).execute()
    redis_conn.flushdb()

    with database.connection_context():
        report = reconcile(settings, redis_conn)
    assert [job.id for job in scheduler.get_jobs()] == [release_job_id_for(soon.id)]
    assert report.rescheduled == 1
    with database.connection_context():
        assert reconcile(settings, redis_conn).rescheduled == 0  # scheduled once, not once a pass
    with installed_deliverer(settings, redis_conn):
        scheduler.enqueue_jobs()
        run_worker_until_idle(redis_conn)
        assert (reload(soon.id).status, smtp.count()) == ("scheduled", 0)  # never early
        time.sleep(max(0.0, (soon.send_at - utcnow()).total_seconds()) + 1.1)
        scheduler.enqueue_jobs()
        run_worker_until_idle(redis_conn)

    assert reload(soon.id).status == "sent"
    assert reload(later.id).status == "scheduled"  # a later pass schedules it, once it is due soon
    assert smtp.count() == 1


def test_the_releases_of_low_priority_sends_never_hold_up_a_high_priority_email(api_key, pg_settings, pg_db, smtp,
                                                                              redis_conn):
    # Found on the real stack: 2,000 low-priority sends due at one moment, then an urgent send each
    # 0.3 s; the urgent ones took up to 5.9 s, queued on the high queue behind 2,000 release jobs
    # that every release went to, whatever its send's priority.
    scheduler = Scheduler(connection=redis_conn)
    campaign = [make_notification(api_key[0], Status.SCHEDULED, priority="low", to=f"c{n}@example.com",
                                  send_at=utcnow() + timedelta(seconds=1)) for n in range(3)]
    for row in campaign:
        dispatch(redis_conn, pg_settings, row)
    time.sleep(max(0.0, (campaign[0].send_at - utcnow()).total_seconds()) + 1.1)
    scheduler.enqueue_jobs()  # due: rq-scheduler moves each release job onto its queue
    urgent = make_notification(api_key[0], priority="high", to="urgent@example.com")
    dispatch(redis_conn, pg_settings, urgent)

    assert queue_for("high", redis_conn).job_ids == [job_id_for(urgent.id)]
    assert sorted(queue_for("low", redis_conn).job_ids) == sorted(release_job_id_for(row.id) for row in campaign)
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    received = [m.message["To"] for m in smtp.messages]
    assert received[0] == "urgent@example.com"
    assert sorted(received[1:]) == sorted(row.to for row in campaign)


def test_cancelled_scheduled_notification_stays_cancelled_after_release(client, headers, live_deliverer, smtp,
                                                                        redis_conn):
    notification_id = _send(client, headers, **LITERAL, delay_seconds=60)["id"]

    response = client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "cancelled"
    assert body["history"][-1]["reason"] == "cancelled by the caller"
    assert jobs.release(notification_id) == "skipped"
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "cancelled"
    assert smtp.count() == 0


def test_a_cancel_racing_the_release_cancels_the_released_notification(client, headers, live_deliverer, smtp,
                                                                      redis_conn, pg_url):
    # Found with 300 delayed sends cancelled around their due moment on the real stack: the cancel read
    # the row `scheduled`, the release committed `queued` while the cancel's update waited for the row,
    # and the update, guarded by `scheduled`, changed nothing: 409 "a queued notification cannot be
    # cancelled", for a notification that was queued, and it was sent.
    notification_id = _send(client, headers, **LITERAL, delay_seconds=60)["id"]
    table = Notification._meta.table_name
    releaser = psycopg2.connect(pg_url)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    answers = []
    try:
        with releaser.cursor() as cur:  # the release's own update, not yet committed
            cur.execute(f'UPDATE "{table}" SET "status" = %s WHERE "id" = %s', ("queued", notification_id))
        canceller = threading.Thread(target=lambda: answers.append(
            client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)))
        canceller.start()
        deadline = time.monotonic() + 10
        waiting = 0
        with admin.cursor() as cur:
            while not waiting and time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()")
                (waiting,) = cur.fetchone()
                time.sleep(0.01)
        releaser.commit()
        canceller.join(timeout=10)
    finally:
        releaser.close()
        admin.close()

    assert waiting, "the cancel never waited on the release: the test did not test anything"
    assert answers[0].status_code == 200, answers[0].get_data(as_text=True)
    assert answers[0].get_json()["status"] == "cancelled"
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "cancelled"
    assert smtp.count() == 0


def test_cancelled_queued_notification_is_not_sent(client, headers, live_deliverer, smtp, redis_conn):
    notification_id = _send(client, headers, **LITERAL)["id"]

    response = client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)

    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    run_worker_until_idle(redis_conn)
    cancelled = reload(notification_id)
    assert (cancelled.status, cancelled.attempts) == ("cancelled", 0)
    assert smtp.count() == 0


def test_a_cancel_whose_answer_cannot_be_read_is_503_and_cancels_nothing(client, headers, live_deliverer, smtp,
                                                                        redis_conn, monkeypatch):
    # The answer was read after the cancel had committed: a database lost in between answered 503 with
    # the notification cancelled, and the retry a 409 "a cancelled notification cannot be cancelled".
    notification_id = _send(client, headers, **LITERAL)["id"]

    def lost(*args):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store, "get", lost)
    response = client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)
    monkeypatch.undo()

    assert response.status_code == 503 and response.get_json()["error"]["code"] == "service_unavailable"
    assert reload(notification_id).status == "queued"
    again = client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)
    assert again.status_code == 200 and again.get_json()["status"] == "cancelled"
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0


def test_cancelling_a_sent_notification_is_a_conflict(client, headers, live_deliverer, smtp, redis_conn):
    notification_id = _send(client, headers, **LITERAL)["id"]
    run_worker_until_idle(redis_conn)

    response = client.post(f"/api/notifications/{notification_id}/cancel", headers=headers)

    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "not_cancellable"
    assert error["details"] == {"status": "sent"}
    assert reload(notification_id).status == "sent"
    assert smtp.count() == 1


def test_cancelling_another_keys_or_an_unknown_notification_is_not_found(client, headers, other_key,
                                                                         live_deliverer, smtp, redis_conn):
    notification_id = _send(client, headers, **LITERAL, delay_seconds=60)["id"]

    theirs = client.post(f"/api/notifications/{notification_id}/cancel", headers={"X-API-Key": other_key[1]})
    unknown = client.post(f"/api/notifications/{uuid.uuid4()}/cancel", headers=headers)

    assert theirs.status_code == unknown.status_code == 404
    assert reload(notification_id).status == "scheduled"
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0
