"""Status callbacks: a signed POST to the caller once a notification is final, retried, never blocking mail."""

from __future__ import annotations

import base64
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import psycopg2
import pytest
from peewee import OperationalError
from rq import Queue
from rq.timeouts import JobTimeoutException

from app import create_app
from notifier import callbacks, jobs, keys, queues, store
from notifier.config import Settings
from notifier.db import database
from notifier.errors import PermanentDeliveryError
from notifier.models import Notification, Status, utcnow
from notifier.queues import CALLBACK_QUEUE, callback_job_id_for, enqueue_callback
from notifier.reconciler import reconcile
from tests.helpers import (
    LITERAL,
    eventually,
    installed_deliverer,
    make_notification,
    reload,
    run_worker_until_idle,
)
from tests.operators import collect_metrics, value

pytestmark = pytest.mark.integration

SEND = "/api/notifications/send"


def _send(api, headers, **payload) -> str:
    response = api.post(SEND, json={**LITERAL, **payload}, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


def _callback_events(notification_id: str) -> list[str]:
    with database.connection_context():
        return [e.reason for e in store.history(store.get(notification_id)) if e.kind == "callback"]


def _last_reason(notification_id: str) -> str:
    with database.connection_context():
        return store.history(store.get(notification_id))[-1].reason


def test_sent_notification_posts_one_signed_callback(api, headers, api_key, live_deliverer, receiver, smtp,
                                                     redis_conn):
    metadata = {"order": "A-17", "attempt": 2}
    notification_id = _send(api, headers, callback_url=receiver.url, metadata=metadata)

    run_worker_until_idle(redis_conn)

    assert receiver.count() == 1
    (call,) = receiver.calls
    event = call.json
    assert event["id"] == notification_id
    assert event["event"] == "notification.sent"
    assert event["status"] == "sent"
    assert event["attempts"] == 1
    assert event["error"] is None
    assert event["metadata"] == metadata
    assert event["sent_at"] is not None
    assert call.headers["Content-Type"] == "application/json"
    assert call.headers[callbacks.EVENT_ID_HEADER] == f"{notification_id}:sent"
    secret = api_key[0].callback_secret
    signature = call.headers[callbacks.SIGNATURE_HEADER]
    assert callbacks.verify(secret, call.body, signature)
    assert not callbacks.verify(secret, call.body.replace(b'"sent"', b'"failed"', 1), signature)
    assert not callbacks.verify("whsec_someone-else", call.body, signature)

    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "delivered", 1)
    assert _callback_events(notification_id) == ["callback delivered: HTTP 200"]
    history = api.get(f"/api/notifications/{notification_id}", headers=headers).get_json()["history"]
    assert [e["kind"] for e in history] == ["status", "status", "status", "callback"]
    assert smtp.count() == 1


def test_a_rotated_callback_secret_signs_with_both_until_the_rotation_ends(api, headers, api_key, live_deliverer,
                                                                        receiver, smtp, redis_conn):
    old = api_key[0].callback_secret
    with database.connection_context():
        new = keys.rotate_callback_secret(api_key[0].name)
    during = _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)
    with database.connection_context():
        assert keys.end_callback_rotation(api_key[0].name)
    after = _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)

    signed_during, signed_after = receiver.calls
    assert signed_during.json["id"] == during and signed_after.json["id"] == after
    header = signed_during.headers[callbacks.SIGNATURE_HEADER]
    assert header.count("v1=") == 2
    # A receiver still on the old secret and one already on the new both take it: none is dropped.
    assert callbacks.verify(old, signed_during.body, header) and callbacks.verify(new, signed_during.body, header)
    header = signed_after.headers[callbacks.SIGNATURE_HEADER]
    assert header.count("v1=") == 1
    assert callbacks.verify(new, signed_after.body, header) and not callbacks.verify(old, signed_after.body, header)


def test_verify_takes_any_v1_and_nothing_else():
    now = int(time.time())
    body = b'{"id":"n"}'
    rotating = callbacks.sign("whsec_new", body, now, "whsec_old")
    assert callbacks.verify("whsec_old", body, rotating) and callbacks.verify("whsec_new", body, rotating)
    assert not callbacks.verify("whsec_other", body, rotating)
    assert not callbacks.verify("whsec_new", body, rotating.replace("v1=", "v0=", 1).replace("v1=", "v2=", 1))
    assert not callbacks.verify("whsec_new", body, f"t={now},{rotating}")  # two timestamps: which one?
    assert not callbacks.verify("whsec_new", body, rotating.replace(f"t={now}", f"t={now - 3600}"))


def test_callback_is_retried_on_503_and_429_until_delivered(api, headers, live_deliverer, receiver, smtp,
                                                            redis_conn):
    receiver.codes.extend([503, 429])
    notification_id = _send(api, headers, callback_url=receiver.url)

    run_worker_until_idle(redis_conn)

    assert receiver.count() == 3
    event_ids = {call.headers[callbacks.EVENT_ID_HEADER] for call in receiver.calls}
    assert event_ids == {f"{notification_id}:sent"}  # the same event on every retry
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "delivered", 3)
    assert _callback_events(notification_id) == [
        "callback attempt 1 failed: HTTP 503",
        "callback attempt 2 failed: HTTP 429",
        "callback delivered: HTTP 200",
    ]
    assert smtp.count() == 1


def test_callback_gives_up_after_max_attempts_without_touching_the_email(
    api, headers, live_deliverer, receiver, smtp, redis_conn, fast_settings
):
    receiver.always = 500
    notification_id = _send(api, headers, callback_url=receiver.url)

    run_worker_until_idle(redis_conn)

    assert fast_settings.max_callback_attempts == 4
    assert receiver.count() == 4
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "gave_up", 4)
    assert notification.sent_at is not None
    reasons = _callback_events(notification_id)
    assert len(reasons) == 4
    assert _last_reason(notification_id) == "callback attempt 4 failed: HTTP 500; giving up"
    failed = Queue(CALLBACK_QUEUE, connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [callback_job_id_for(notification_id)]
    assert smtp.count() == 1


def test_callback_refused_with_410_is_not_retried(api, headers, live_deliverer, receiver, smtp, redis_conn):
    receiver.always = 410
    notification_id = _send(api, headers, callback_url=receiver.url)

    run_worker_until_idle(redis_conn)

    assert receiver.count() == 1
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "gave_up", 1)
    assert _callback_events(notification_id) == ["callback attempt 1 failed: HTTP 410; giving up"]
    assert smtp.count() == 1


def test_failed_notification_posts_a_failed_callback(api, headers, api_key, live_deliverer, receiver, smtp,
                                                     redis_conn):
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url, metadata={"k": "v"})

    run_worker_until_idle(redis_conn)

    (call,) = receiver.calls
    event = call.json
    assert (event["id"], event["status"], event["event"]) == (notification_id, "failed", "notification.failed")
    assert "550" in event["error"] and "rejected by policy" in event["error"]
    assert event["sent_at"] is None and event["metadata"] == {"k": "v"}
    assert call.headers[callbacks.EVENT_ID_HEADER] == f"{notification_id}:failed"
    assert callbacks.verify(api_key[0].callback_secret, call.body, call.headers[callbacks.SIGNATURE_HEADER])
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status) == ("failed", "delivered")
    assert smtp.count() == 0


def test_cancelled_notification_posts_a_cancelled_callback(api, headers, live_deliverer, receiver, smtp, redis_conn):
    notification_id = _send(api, headers, callback_url=receiver.url, delay_seconds=60)

    assert api.post(f"/api/notifications/{notification_id}/cancel", headers=headers).status_code == 200
    run_worker_until_idle(redis_conn)

    (call,) = receiver.calls
    assert (call.json["id"], call.json["status"]) == (notification_id, "cancelled")
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status) == ("cancelled", "delivered")
    assert smtp.count() == 0


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "ftp://example.com/hook", "javascript:alert(1)",
                                 # Accepted once, then failed every attempt (urllib refused the port).
                                 "http://example.com:99999/hook", "https://example.com:0/hook",
                                 # A port of more digits than int() reads (4,300) was a 500.
                                 "http://example.com:" + "1" * 4301 + "/hook"])
def test_callback_url_must_be_http(api, headers, live_deliverer, receiver, smtp, redis_conn, url):
    response = api.post(SEND, json={**LITERAL, "callback_url": url}, headers=headers)

    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "validation_error" and "callback_url" in error["details"]
    with database.connection_context():
        assert Notification.select().count() == 0
    run_worker_until_idle(redis_conn)
    assert receiver.count() == 0
    assert smtp.count() == 0


def test_slow_callback_never_holds_up_the_email(pg_settings, pg_db, headers, receiver, smtp, redis_conn):
    # One slow attempt, then a retry parked an hour away, so the burst worker ends after the timeout.
    slow = replace(pg_settings, callback_timeout=1.0, callback_retry_intervals=(3600,))
    api = create_app(slow, redis=redis_conn).test_client()
    receiver.delay = 3.0
    with installed_deliverer(slow, redis_conn):
        notification_id = _send(api, headers, callback_url=receiver.url)
        run_worker_until_idle(redis_conn)

    assert len(smtp.wait_for(1)) == 1
    notification = reload(notification_id)
    assert notification.status == "sent"
    assert notification.sent_at is not None
    assert receiver.count() == 1
    assert not receiver.answered.is_set()  # the receiver is still busy with the callback
    with database.connection_context():
        history = store.history(notification)
    sent_event = next(e for e in history if e.to_status == Status.SENT and e.kind == "status")
    (timed_out,) = [e for e in history if e.kind == "callback"]
    assert sent_event.at <= timed_out.at
    assert "timed out" in timed_out.reason.lower() or "timeout" in timed_out.reason.lower()
    assert (notification.callback_status, notification.callback_attempts) == ("pending", 1)
    scheduled = Queue(CALLBACK_QUEUE, connection=redis_conn).scheduled_job_registry
    assert scheduled.get_job_ids() == [callback_job_id_for(notification_id)]
    assert smtp.count() == 1


def test_reconciler_requeues_a_callback_whose_job_vanished(api_key, fast_settings, live_deliverer, receiver, smtp,
                                                           redis_conn):
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow())
    enqueue_callback(redis_conn, fast_settings, notification.id)
    redis_conn.flushdb()  # Redis restarted empty: the callback job is gone, PostgreSQL still owes it

    with database.connection_context():
        assert reconcile(fast_settings, redis_conn).callbacks == 0  # within the grace period: hands off
        Notification.update(
            updated_at=utcnow() - timedelta(seconds=fast_settings.reconcile_grace_seconds + 30)
        ).where(Notification.id == notification.id).execute()
        assert reconcile(fast_settings, redis_conn).callbacks == 1
    run_worker_until_idle(redis_conn)

    (call,) = receiver.calls
    assert (call.json["id"], call.json["status"]) == (notification.id, "sent")
    delivered = reload(notification.id)
    assert (delivered.status, delivered.callback_status, delivered.callback_attempts) == ("sent", "delivered", 1)
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn).callbacks == 0  # nothing owed any more
    assert smtp.count() == 0


def test_a_callback_retry_redis_lost_goes_when_it_was_due_not_at_once(api_key, fast_settings, live_deliverer,
                                                                     receiver, smtp, redis_conn):
    # Queued at once, a flush spent the attempts left within seconds: the last gave up 3 s after
    # the one before, while the receiver was still down, and never came back.
    settings = replace(fast_settings, callback_retry_intervals=(2, 600, 1800))
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow(), callback_attempts=2)
    with database.connection_context():
        store.record(notification.id, kind="callback", reason="callback attempt 2 failed: HTTP 500")
        Notification.update(updated_at=utcnow() - timedelta(seconds=settings.reconcile_grace_seconds + 30)).where(
            Notification.id == notification.id).execute()
    redis_conn.flushdb()  # the retry waiting in RQ's scheduled registry is gone

    with database.connection_context():
        assert reconcile(settings, redis_conn).callbacks == 1
        assert reconcile(settings, redis_conn).callbacks == 0  # waiting for its time: not lost
    run_worker_until_idle(redis_conn)

    assert receiver.calls == []
    scheduled = Queue(CALLBACK_QUEUE, connection=redis_conn).scheduled_job_registry
    (job_id,) = scheduled.get_job_ids()
    due = datetime.fromtimestamp(scheduled.get_scheduled_time(job_id).timestamp(), UTC).replace(tzinfo=None)
    assert job_id == f"callback-{notification.id}" and abs((due - utcnow()).total_seconds() - 600) < 30


def test_a_callback_requeued_while_its_job_is_posting_it_is_posted_once(api_key, fast_settings, live_deliverer,
                                                                          receiver, redis_conn):
    # Redis restarted empty (or was flushed) while a worker was in the middle of posting a retry: the
    # reconciler found the callback's job gone and queued it again, and another worker posted the
    # same event while the first was still waiting for the receiver's answer.
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow(), callback_attempts=1)
    with database.connection_context():  # sent a while ago: its first attempt failed, this is the retry
        Notification.update(updated_at=utcnow() - timedelta(minutes=5)).where(
            Notification.id == notification.id).execute()
    second = {}

    def redis_lost_meanwhile():
        redis_conn.flushdb()
        with database.connection_context():
            assert reconcile(fast_settings, redis_conn).callbacks == 1  # its job is gone: queued again
        second["outcome"] = live_deliverer.send_callback(notification.id)  # another worker runs it

    receiver.before_answer = redis_lost_meanwhile
    assert live_deliverer.send_callback(notification.id) == "delivered"

    assert second["outcome"] == "skipped"
    assert receiver.count() == 1
    delivered = reload(notification.id)
    assert (delivered.callback_status, delivered.callback_attempts) == ("delivered", 2)
    assert _callback_events(notification.id) == ["callback delivered: HTTP 200"]


def _callback_lock_free(pg_url: str, notification: Notification) -> bool:
    """Whether another session could take the lock a job posting this callback holds (callbacks.turn)."""
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)",
                        (callbacks._CALLBACK_LOCK_CLASS, notification.seq & 0x7FFFFFFF))
            return cur.fetchone()[0]
    finally:
        conn.close()  # and the lock taken here goes with the session


def _session_ended(pg_url: str, pid: int) -> bool:
    """Whether the PostgreSQL session served by server process pid has ended (and its locks with it)."""
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return cur.fetchone()[0] == 0
    finally:
        conn.close()


@pytest.mark.parametrize("cut", ["job limit as the lock is taken", "release cancelled"])
def test_a_callback_lock_cut_short_does_not_stay_on_a_pooled_connection(cut, api_key, pg_url, live_deliverer,
                                                                         receiver, monkeypatch):
    # RQ's job limit is a SIGALRM that raises wherever the job is: right after the server took the lock,
    # before the job knew it had it. Or the release fails while the session lives on (cancelled).
    # Either way the pooled connection went back to the pool still holding the lock, and every other
    # worker skipped this callback as "being posted" for as long as that connection lived.
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                      attempts=1, sent_at=utcnow())
    db = database.obj
    real = db.execute_sql
    holder = []  # the server process of the session that took the lock

    def execute_sql(sql, params=None):
        if cut == "release cancelled" and "pg_advisory_unlock" in sql:
            raise OperationalError("canceling statement due to user request")
        cursor = real(sql, params)
        if "pg_try_advisory_lock" in sql:
            holder.append(cursor.connection.get_backend_pid())
            if cut == "job limit as the lock is taken":
                raise JobTimeoutException("Task exceeded maximum timeout value (25 seconds)")
        return cursor

    monkeypatch.setattr(db, "execute_sql", execute_sql)
    if cut == "release cancelled":
        assert live_deliverer.send_callback(notification.id) == "delivered"
    else:
        with pytest.raises(JobTimeoutException):
            live_deliverer.send_callback(notification.id)
    monkeypatch.undo()

    # A closed connection's server process ends, and lets go of the lock, a moment after the close.
    assert eventually(lambda: _session_ended(pg_url, holder[0]), timeout=10), "the session lives on, in the pool"
    assert _callback_lock_free(pg_url, notification)


def test_requeued_dead_letter_posts_failed_then_sent(api, headers, live_deliverer, receiver, smtp, redis_conn):
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).callback_status == "delivered"

    assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
    run_worker_until_idle(redis_conn)

    assert [c.json["status"] for c in receiver.calls] == ["failed", "sent"]
    assert [c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls] == [
        f"{notification_id}:failed", f"{notification_id}:sent:2"
    ]
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "delivered", 1)
    assert smtp.count() == 1


def test_a_notification_that_fails_again_posts_a_new_event_id(api, headers, live_deliverer, receiver, smtp,
                                                           redis_conn):
    # A receiver drops duplicates by Notifier-Event-Id, as the README tells it to: the second `failed`
    # (requeued, failed again) carried the first one's id and was dropped as a retry of it.
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)
    smtp.replies.append("550 5.7.1 rejected again")
    receiver.codes.append(503)  # the second event's retry keeps its id
    assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
    run_worker_until_idle(redis_conn)

    assert [c.json["status"] for c in receiver.calls] == ["failed", "failed", "failed"]
    assert "rejected again" in receiver.calls[-1].json["error"]
    assert [c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls] == [
        f"{notification_id}:failed", f"{notification_id}:failed:2", f"{notification_id}:failed:2"]
    assert reload(notification_id).callback_status == "delivered"


def test_an_answer_to_an_event_before_the_same_status_again_leaves_the_new_one_owed(
        api, headers, live_deliverer, receiver, smtp, redis_conn):
    # The first `failed` event is being posted when the notification is requeued and fails again: the
    # receiver's 2xx to the first says nothing of the second, though both are `failed`.
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)

    def requeued_and_failed_again_meanwhile():
        smtp.replies.append("550 5.7.1 rejected again")
        assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
        with pytest.raises(PermanentDeliveryError):
            jobs.deliver(notification_id)

    receiver.before_answer = requeued_and_failed_again_meanwhile
    run_worker_until_idle(redis_conn)
    run_worker_until_idle(redis_conn)  # whatever the first run queued last

    assert [c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls] == [
        f"{notification_id}:failed", f"{notification_id}:failed:2"]
    assert "rejected again" in receiver.calls[-1].json["error"]
    assert reload(notification_id).callback_status == "delivered"
    assert _callback_events(notification_id) == [
        "callback delivered: HTTP 200, to the failed event: the notification is failed again",
        "callback delivered: HTTP 200",
    ]


def test_an_event_read_before_the_notification_ended_again_is_not_posted_nor_counted(
        fast_settings, api, headers, live_deliverer, receiver, smtp, redis_conn):
    # The job read the `failed` notification, then it was requeued and failed again before the job
    # counted its attempt: that count belongs to the new event (which could give up an attempt early),
    # and the old event is owed no more. The job is retried and posts the new one.
    from notifier import callback_job

    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)
    with pytest.raises(PermanentDeliveryError):
        jobs.deliver(notification_id)
    read_before = reload(notification_id)
    smtp.replies.append("550 5.7.1 rejected again")
    assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
    with pytest.raises(PermanentDeliveryError):
        jobs.deliver(notification_id)

    with pytest.raises(callbacks.CallbackRetry, match="moved on before its failed event was posted"):
        callback_job._post(fast_settings, read_before)

    assert receiver.calls == [] and reload(notification_id).callback_attempts == 0
    run_worker_until_idle(redis_conn)
    assert [c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls] == [f"{notification_id}:failed:2"]


def test_an_answer_to_an_earlier_event_leaves_the_one_owed_since_owed(api, headers, live_deliverer, receiver, smtp,
                                                                      redis_conn):
    # The `failed` event is being posted when an operator requeues the notification and it is sent
    # at once: the receiver's 2xx to `failed` says nothing of the `sent` event owed since.
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)

    def requeued_and_sent_meanwhile():
        assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
        assert jobs.deliver(notification_id) == "sent"

    receiver.before_answer = requeued_and_sent_meanwhile
    run_worker_until_idle(redis_conn)
    run_worker_until_idle(redis_conn)  # whatever the first run queued last

    assert [c.json["status"] for c in receiver.calls] == ["failed", "sent"]
    assert (reload(notification_id).status, reload(notification_id).callback_status) == ("sent", "delivered")
    assert smtp.count() == 1



def test_an_event_owed_while_another_worker_posts_the_one_before_goes_out_without_the_reconciler(
        api, headers, live_deliverer, receiver, smtp, redis_conn):
    # Two workers: the `sent` event's job, taken by the second while the first still posts `failed`,
    # finds the callback held and skips. The first then recorded the receiver's 2xx as "callback
    # delivered" under the `sent` status, and the `sent` event waited for the reconciler's next pass.
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(api, headers, callback_url=receiver.url)

    def requeued_and_sent_and_its_callback_skipped_meanwhile():
        assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
        assert jobs.deliver(notification_id) == "sent"
        Queue(CALLBACK_QUEUE, connection=redis_conn).remove(callback_job_id_for(notification_id))
        assert jobs.send_callback(notification_id) == "skipped"  # the other worker: a session of its own

    receiver.before_answer = requeued_and_sent_and_its_callback_skipped_meanwhile
    run_worker_until_idle(redis_conn)

    assert [c.json["status"] for c in receiver.calls] == ["failed", "sent"]
    assert (reload(notification_id).status, reload(notification_id).callback_status) == ("sent", "delivered")
    assert _callback_events(notification_id) == [
        "callback delivered: HTTP 200, to the failed event: the notification is sent now",
        "callback delivered: HTTP 200",
    ]
    samples = collect_metrics(redis_conn)  # two events, each taken by the receiver: nothing retried
    assert value(samples, "notifier_callbacks_total", outcome="delivered") == 2
    assert value(samples, "notifier_callbacks_total", outcome="retried") == 0

def test_requeued_dead_letter_never_posts_a_non_final_callback(pg_settings, pg_db, headers, receiver, smtp,
                                                               redis_conn):
    # The "failed" callback is still waiting for its retry (an hour away) when an operator requeues.
    patient = replace(pg_settings, callback_retry_intervals=(3600,))
    api = create_app(patient, redis=redis_conn).test_client()
    receiver.codes.append(503)
    smtp.replies.append("550 5.7.1 message rejected by policy")
    with installed_deliverer(patient, redis_conn):
        notification_id = _send(api, headers, callback_url=receiver.url)
        run_worker_until_idle(redis_conn)
        assert reload(notification_id).callback_status == "pending"
        assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202

        jobs.send_callback(notification_id)  # the callback's retry fires while the notification is queued
        run_worker_until_idle(redis_conn)

    statuses = [c.json["status"] for c in receiver.calls]
    assert set(statuses) <= {"failed", "sent"}, statuses
    assert statuses[-1] == "sent"
    assert not any(c.headers[callbacks.EVENT_ID_HEADER].endswith(":queued") for c in receiver.calls)
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status) == ("sent", "delivered")
    assert smtp.count() == 1


def _read_request(conn: socket.socket) -> bytes:
    # The whole of it: urllib sends the body after the head, and a socket closed with it unread answers
    # with a reset, which the client may see before the answer.
    request = b""
    while b"\r\n\r\n" not in request and (chunk := conn.recv(65536)):
        request += chunk
    head = request.partition(b"\r\n\r\n")[0].lower()
    length = int(head.partition(b"content-length:")[2].split(b"\r\n")[0] or 0)
    while len(request.partition(b"\r\n\r\n")[2]) < length and (chunk := conn.recv(65536)):
        request += chunk
    return request


def _serve_once(answer: bytes) -> tuple[str, threading.Thread, list[bytes]]:
    """A server that answers every request with the raw bytes given; what it read."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def run():
        with listener:
            listener.settimeout(10)
            try:
                while True:
                    conn, _ = listener.accept()
                    with conn:
                        seen.append(_read_request(conn))
                        conn.sendall(answer)
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/hooks", thread, seen


def test_an_endpoint_that_does_not_speak_http_is_retried_not_an_error_of_ours():
    url, _, _ = _serve_once(b"HELLO NOT HTTP\r\n\r\n")
    with pytest.raises(callbacks.CallbackRetry, match="BadStatusLine"):
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)


@pytest.mark.parametrize("informational", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n",
])
def test_an_informational_answer_before_the_final_one_is_read_past(informational):
    # http.client skips only a 100 Continue: a 103 Early Hints (from the receiver or a proxy before it)
    # was taken for the answer, and the delivered event given up as "HTTP 103".
    url, _, seen = _serve_once(informational + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert callbacks.post(url, b"{}", "secret", "n:sent", timeout=5) == 200
    assert len(seen) == 1


def test_an_informational_answer_with_no_final_one_in_time_is_retried_not_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def hint_then_hold():
        with listener:
            conn, _ = listener.accept()
            with conn:
                _read_request(conn)
                conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
                done.wait(10)  # no final answer: the client's read times out first

    thread = threading.Thread(target=hint_then_hold, daemon=True)
    thread.start()
    try:
        with pytest.raises(callbacks.CallbackRetry, match="timed out"):
            callbacks.post(f"http://127.0.0.1:{listener.getsockname()[1]}/hooks", b"{}", "secret", "n:sent",
                           timeout=0.5)
    finally:
        done.set()
        thread.join()


def _logged(exc: BaseException) -> str:
    """The exception as RQ writes a failed job to the worker's log: the whole chain, causes included."""
    return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("answer", [b"\x00\xffZQ-BODY not http\r\n\r\n", b"ZQ-BODY without a status line",
                                    b"HTTP/7.0\x00ZQ 200 OK\r\n\r\n"])
def test_an_answer_that_is_not_http_is_named_never_quoted(answer):
    # http.client's error is the receiver's first line itself: up to 64 KB of whatever it sent (its body,
    # when it answered with no status line) went into the history and the worker's log, and a NUL in it
    # could not be stored at all.
    url, _, _ = _serve_once(answer)
    with pytest.raises(callbacks.CallbackRetry) as retried:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert str(retried.value) in ("BadStatusLine: the answer is not HTTP", "UnknownProtocol: the answer is not HTTP")
    assert "ZQ" not in _logged(retried.value) and "\x00" not in _logged(retried.value)


@pytest.mark.parametrize("status", [b"500", b"404", b"302"])
def test_the_reason_phrase_of_an_answer_never_reaches_the_log(status):
    # The receiver writes it: urllib's HTTPError quotes it, and RQ logged it as the cause of ours.
    url, _, _ = _serve_once(b"HTTP/1.1 " + status + b" ZQ\x1b[2J\x00" + b"Q" * 60000
                            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    with pytest.raises((callbacks.CallbackRetry, callbacks.CallbackRejected)) as failed:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert str(failed.value).startswith(f"HTTP {status.decode()}")
    assert "ZQ" not in _logged(failed.value) and "\x1b" not in _logged(failed.value)


def test_an_answer_with_a_nul_byte_is_recorded_as_a_failed_attempt(api, headers, live_deliverer, smtp, redis_conn,
                                                                   fast_settings):
    url, _, _ = _serve_once(b"\x00 not http\r\n\r\n")
    notification_id = _send(api, headers, callback_url=url)

    run_worker_until_idle(redis_conn)

    reasons = _callback_events(notification_id)
    assert len(reasons) == fast_settings.max_callback_attempts
    assert reasons[-1].endswith("BadStatusLine: the answer is not HTTP; giving up")
    assert reload(notification_id).callback_status == "gave_up"


def test_a_callback_url_with_a_path_beyond_ascii_is_sent_percent_encoded():
    # The API takes such a URL (an IRI, as a browser does), but http.client refuses to write it in the
    # request line: every attempt failed with UnicodeEncodeError, and no retry could have mended it.
    url, _, seen = _serve_once(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert callbacks.post(url + "/caf\u00e9?who=\u00fc&token=t%C3%A9", b"{}", "secret", "n:sent", timeout=5) == 204
    assert seen[0].split(b"\r\n")[0] == b"POST /hooks/caf%C3%A9?who=%C3%BC&token=t%C3%A9 HTTP/1.1"


@pytest.mark.parametrize("host, sent", [("\u043f\u0440\u0438\u043c\u0435\u0440.example", b"xn--e1afmkfd.example"),
                                        ("b\u00fccher.example", b"xn--bcher-kva.example"),
                                        # IDNA 2008, as browsers write it: Python's codec (2003) made it
                                        # fass.example, another domain.
                                        ("fa\u00df.example", b"xn--fa-hia.example"),
                                        # What browsers take though IDNA 2008 refuses it.
                                        ("my_host.\u0442\u0435\u0441\u0442", b"my_host.xn--e1aybc"),
                                        ("\u2603.net", b"xn--n3h.net")])
def test_a_callback_to_a_host_beyond_ascii_names_it_as_idna(monkeypatch, host, sent):
    # urllib sets Host from the host as written, and http.client writes it as Latin-1: a Cyrillic host
    # failed every attempt with UnicodeEncodeError (then gave up), a Latin-1 one went out as Latin-1.
    url, _, seen = _serve_once(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    port = url.split(":")[2].split("/")[0]
    resolve = socket.getaddrinfo
    asked = []
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda name, *args, **kwargs: asked.append(name) or resolve("127.0.0.1", *args, **kwargs))
    assert callbacks.post(url.replace("127.0.0.1", host), b"{}", "secret", "n:sent", timeout=5) == 204
    assert f"Host: {sent.decode()}:{port}".encode() in seen[0]
    assert asked[0] == sent.decode()  # the name resolved, not the one written


def test_a_stored_callback_host_with_no_idna_form_gives_up_at_once():
    with pytest.raises(callbacks.CallbackRejected, match="not a domain name"):
        callbacks.post("http://a..\u0431.example/hook", b"{}", "secret", "n:sent", timeout=5)


def test_a_redirect_is_not_followed_and_gives_up_saying_so():
    url, _, seen = _serve_once(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
    with pytest.raises(callbacks.CallbackRejected, match="redirect"):
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert [request.split(b" ", 2)[:2] for request in seen] == [[b"POST", b"/hooks"]]  # no GET of the target


@pytest.mark.parametrize("location, named", [
    # An http-to-https redirect repeats the callback URL's token, and a Location may hold a password.
    ("https://hookuser:ZQ-PASS@hooks.example/cb?token=ZQ-TOKEN#ZQ-FRAGMENT", "'https://hooks.example/cb'"),
    # urllib refuses a scheme other than http(s) or ftp with an error of its own quoting the whole
    # Location, before any redirect handler of ours is asked: it reached the worker's log as the cause.
    ("hooks://hookuser:ZQ-PASS@hooks.example/cb?token=ZQ-TOKEN", "'hooks://hooks.example/cb'"),
])
def test_a_redirect_is_named_without_the_credentials_or_query_it_carries(location, named):
    # The reason goes to the history, and to the worker's log through RQ's line for the failed job.
    url, _, _ = _serve_once(f"HTTP/1.1 301 Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n"
                            "Connection: close\r\n\r\n".encode())
    with pytest.raises(callbacks.CallbackRejected) as refused:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert named in str(refused.value)
    assert "ZQ" not in _logged(refused.value) and "hookuser" not in _logged(refused.value)


def test_credentials_in_a_callback_url_are_sent_as_basic_auth_and_never_quoted(receiver):
    # urllib takes user:password@ for part of the host and what follows the ":" for the port: every
    # attempt failed with an InvalidURL error quoting the password, in the history and the worker's log.
    url = receiver.url.replace("http://", "http://hook%40svc:ZQ(pass),word@")
    receiver.codes.append(500)
    with pytest.raises(callbacks.CallbackRetry) as retried:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert str(retried.value) == "HTTP 500"
    assert callbacks.post(url, b"{}", "secret", "n:sent", timeout=5) == 200
    expected = "Basic " + base64.b64encode(b"hook@svc:ZQ(pass),word").decode()
    assert [call.headers.get("Authorization") for call in receiver.calls] == [expected, expected]


def test_a_callback_job_past_the_last_attempt_gives_up_without_posting(api_key, fast_settings, live_deliverer,
                                                                      receiver, redis_conn):
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow(),
                                     callback_attempts=fast_settings.max_callback_attempts)
    assert live_deliverer.send_callback(notification.id) == "gave up"
    assert receiver.count() == 0
    assert reload(notification.id).callback_status == "gave_up"
    assert "giving up" in _callback_events(notification.id)[-1]


def test_a_receiver_that_trickles_its_answer_is_one_recorded_attempt_within_the_job_limit(
        api_key, pg_settings, receiver, redis_conn):
    # Each read gets a byte before CALLBACK_TIMEOUT, so only the job's own limit ends the attempt.
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                try:
                    while not stop.wait(0.3):
                        conn.sendall(b"X")
                except OSError:
                    pass  # the notifier hung up at its limit, as it should

    threading.Thread(target=trickle, daemon=True).start()
    settings = replace(pg_settings, callback_timeout=1.0, callback_retry_intervals=())
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hooks"
    notification = make_notification(api_key[0], Status.SENT, callback_url=url, callback_status="pending",
                                     attempts=1, sent_at=utcnow())
    with installed_deliverer(settings, redis_conn):
        enqueue_callback(redis_conn, settings, notification.id)
        try:
            run_worker_until_idle(redis_conn)
        finally:
            stop.set()
    assert reload(notification.id).callback_status == "gave_up"
    assert _callback_events(notification.id) == [
        "callback attempt 1 failed: no whole answer within 7 s; giving up"]


def test_a_callback_answered_2xx_is_not_posted_again_when_the_job_limit_runs_out_while_recording(
        api_key, pg_settings, pg_url, receiver, redis_conn):
    # The receiver answers 200 at once; then another session holds the notification's row until the
    # job's time limit has long run out, and the worker's database connection is dropped (a failover)
    # while it waits: the answer is in, only recording it takes that long.
    settings = replace(pg_settings, callback_timeout=0.5, callback_retry_intervals=(0, 0, 0))
    limit = queues.callback_job_timeout(settings)
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow())
    table = Notification._meta.table_name
    locker = psycopg2.connect(pg_url)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    dropped: list[int] = []

    def lock_the_row():
        with locker.cursor() as cur:
            cur.execute(f'SELECT 1 FROM "{table}" WHERE "id" = %s FOR UPDATE', (notification.id,))
        threading.Thread(target=hold_the_row_past_the_limit, daemon=True).start()

    def hold_the_row_past_the_limit():
        deadline = time.monotonic() + limit + 1.0
        with admin.cursor() as cur:
            while time.monotonic() < deadline and not dropped:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND query LIKE %s AND datname = current_database()", (f'UPDATE "{table}"%',))
                dropped.extend(pid for (pid,) in cur.fetchall())
                time.sleep(0.05)
            time.sleep(max(0.0, deadline - time.monotonic()))
            for pid in dropped:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        locker.rollback()

    receiver.before_answer = lock_the_row
    try:
        with installed_deliverer(settings, redis_conn):
            enqueue_callback(redis_conn, settings, notification.id)
            started = time.monotonic()
            run_worker_until_idle(redis_conn)
    finally:
        locker.close()
        admin.close()

    assert dropped, "the worker never waited on the row: the test did not test anything"
    assert time.monotonic() - started > limit  # the recording outlasted the job's limit
    assert receiver.count() == 1
    delivered = reload(notification.id)
    assert (delivered.callback_status, delivered.callback_attempts) == ("delivered", 1)
    assert _callback_events(notification.id) == ["callback delivered: HTTP 200"]
    callback_queue = Queue(CALLBACK_QUEUE, connection=redis_conn)
    assert callback_queue.failed_job_registry.get_job_ids() == []


def test_a_callback_answered_2xx_is_not_posted_again_when_postgresql_restarts_while_recording(
        api_key, pg_settings, receiver, redis_conn, database_outage):
    # The receiver answers 200; meanwhile PostgreSQL restarts: the worker's connection is cut and, for a
    # second and a half, no new one is taken (a chaos run's `pg_ctl restart`: "the database system is
    # shutting down", then refused). The job failed on its record and RQ retried it: the event went again
    # (3 of 1,166 callbacks in bench/pgchaos.py --commits), or, as here, the retries met the database still
    # away and the answered event was left `pending`, its answer unrecorded.
    settings = replace(pg_settings, callback_retry_intervals=(0, 0, 0))
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                      attempts=1, sent_at=utcnow())
    begin, end = database_outage

    def restart():
        begin()
        threading.Timer(1.5, end).start()

    receiver.before_answer = restart
    try:
        with installed_deliverer(settings, redis_conn):
            enqueue_callback(redis_conn, settings, notification.id)
            run_worker_until_idle(redis_conn)
    finally:
        time.sleep(1.6)  # the timer's end() has run: the fixture's own ends no outage it could overlap

    assert receiver.count() == 1
    delivered = reload(notification.id)
    assert (delivered.callback_status, delivered.callback_attempts) == ("delivered", 1)
    assert _callback_events(notification.id) == ["callback delivered: HTTP 200"]


@pytest.mark.parametrize("forged", ["t={t},v1=\u00e9", "t={t},v1=\udc80", "t={t},v1=\u0663\u0663", "t=\u0661{t},v1=00"])
def test_verify_answers_false_for_a_forged_header_beyond_ascii(forged):
    # A receiver calls verify() with whatever header arrived: one beyond ASCII made compare_digest raise
    # TypeError, a 500 at the receiver instead of a refused event.
    header = forged.format(t=int(time.time()))

    assert callbacks.verify("whsec_secret", b"{}", header) is False


def test_verify_answers_false_for_a_timestamp_too_long_to_be_a_number():
    # ASCII digits all, but more than Python converts (4,300 digits): int() raised ValueError out of
    # verify(), a 500 at the receiver instead of a refused event.
    assert callbacks.verify("whsec_secret", b"{}", "t=" + "1" * 5000 + ",v1=00") is False


def test_a_callback_url_with_a_port_beyond_65535_is_refused(api, headers, live_deliverer, receiver, smtp, redis_conn):
    # glibc's getaddrinfo takes a numeric port modulo 65536: `:<port + 65536>` was accepted, and the
    # signed event went to <port>, another service than the one the caller named.
    port = int(receiver.url.split(":")[2].split("/")[0])
    for url in (receiver.url.replace(f":{port}/", f":{port + 65536}/"), receiver.url.replace(f":{port}/", ":0/")):
        response = api.post(SEND, json={**LITERAL, "callback_url": url}, headers=headers)
        assert response.status_code == 422, response.get_data(as_text=True)
        refused = response.get_json()["error"]["details"]
        assert refused == {"callback_url": ["the port must be a number from 1 to 65535"]}
    run_worker_until_idle(redis_conn)
    assert receiver.count() == 0


@pytest.mark.parametrize("port", ["\u00b2", "\u0663", "1\u00b9"])
def test_a_callback_url_whose_port_is_not_ascii_digits_is_a_422_not_a_500(api, headers, port):
    # str.isdigit() is true of a superscript two, which int() refuses.
    response = api.post(SEND, json={**LITERAL, "callback_url": f"http://hooks.example:{port}/cb"}, headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert "callback_url" in response.get_json()["error"]["details"]


def test_a_stored_callback_url_with_a_port_beyond_65535_is_never_posted_elsewhere(receiver):
    # One stored before the API refused it: given up at once, never sent to the port it wraps around to.
    port = int(receiver.url.split(":")[2].split("/")[0])
    with pytest.raises(callbacks.CallbackRejected, match="port"):
        callbacks.post(receiver.url.replace(f":{port}/", f":{port + 65536}/"), b"{}", "secret", "n:sent", timeout=5)
    assert receiver.count() == 0


def test_the_password_of_a_callback_url_is_never_shown_back(api, headers, live_deliverer, receiver, smtp, redis_conn):
    # The API answers GET and lists to anyone holding the key, and callers log those answers: the
    # password was echoed in full, though it is kept out of every log and the history.
    url = receiver.url.replace("http://", "http://hook%40svc:ZQ-PASS@") + "?x=1"
    notification_id = _send(api, headers, callback_url=url)
    run_worker_until_idle(redis_conn)

    shown = api.get(f"/api/notifications/{notification_id}", headers=headers).get_json()
    listed = api.get("/api/notifications", headers=headers).get_json()["data"]
    assert shown["callback_url"] == receiver.url.replace("http://", "http://hook%40svc:***@") + "?x=1"
    assert [n["callback_url"] for n in listed] == [shown["callback_url"]]
    assert shown["callback_status"] == "delivered"  # the password itself was still sent
    assert receiver.calls[0].headers["Authorization"] == "Basic " + base64.b64encode(b"hook@svc:ZQ-PASS").decode()


@pytest.mark.parametrize("control", ["\x01", "\x1b", "\x7f"])
def test_a_callback_url_with_a_control_character_is_refused(api, headers, live_deliverer, receiver, smtp, redis_conn,
                                                            control):
    # marshmallow's Url field takes them (they are not whitespace); http.client refuses them in the
    # request line, quoting the whole path and query (a token) into the history and the worker's log.
    response = api.post(SEND, json={**LITERAL, "callback_url": f"{receiver.url}{control}?token=ZQ"}, headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["error"]["details"] == {"callback_url": ["must not contain control characters"]}


def test_a_stored_callback_url_that_cannot_be_sent_gives_up_without_quoting_it(receiver):
    # One stored before the API refused it: no attempt can ever pass, and its token must not be quoted.
    url = f"{receiver.url}\x01?token=ZQ-TOKEN"
    with pytest.raises(callbacks.CallbackRejected) as refused:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert str(refused.value) == "InvalidURL: the callback URL cannot be written in a request"
    assert "ZQ" not in _logged(refused.value)
    assert receiver.count() == 0


def test_a_redirect_to_a_huge_target_is_named_cut_short():
    # The receiver writes the Location: up to 64 KB of it went into the history and the worker's log.
    url, _, _ = _serve_once(b"HTTP/1.1 302 Found\r\nLocation: http://hooks.example/" + b"A" * 60000
                            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    with pytest.raises(callbacks.CallbackRejected) as refused:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert "'http://hooks.example/AAA" in str(refused.value) and len(str(refused.value)) < 400


def test_each_callback_attempt_is_counted_by_how_it_ended(api, headers, live_deliverer, receiver, smtp, redis_conn):
    receiver.codes.extend([503, 429, 200, 410])
    _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)  # 503 and 429 retried, then 200
    _send(api, headers, callback_url=receiver.url)
    run_worker_until_idle(redis_conn)  # 410: given up at once

    samples = collect_metrics(redis_conn)
    assert value(samples, "notifier_callbacks_total", outcome="retried") == 2
    assert value(samples, "notifier_callbacks_total", outcome="delivered") == 1
    assert value(samples, "notifier_callbacks_total", outcome="gave_up") == 1


# marshmallow's Url takes a host of any Unicode letters, those NFKC turns into "/", "?", "#", "@" or ":"
# too, and brackets holding no IPv6 address; urllib refuses to take such a URL apart (ValueError).
UNSPLITTABLE_HOSTS = ["hooks\uff0fexample.com", "hooks.exa\u2100mple.com", "[1:2:3]"]


@pytest.mark.parametrize("host", UNSPLITTABLE_HOSTS)
def test_a_callback_url_urllib_cannot_take_apart_is_a_422(api, headers, redis_conn, host):
    # Accepted, its notification's GET (and the list holding it) was a 500, and every attempt failed
    # with urllib's ValueError, which quotes the URL's password, into the worker's log.
    response = api.post(SEND, json={**LITERAL, "callback_url": f"http://hook:ZQ-PASS@{host}/cb"}, headers=headers)
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["error"]["details"] == {"callback_url": ["is not a URL a request can be sent to"]}
    with database.connection_context():
        assert Notification.select().count() == 0


@pytest.mark.parametrize("host", UNSPLITTABLE_HOSTS)
def test_a_stored_callback_url_urllib_cannot_take_apart_is_shown_masked_and_given_up(api, headers, api_key, host):
    # One stored before the API refused it: shown without its password, given up without quoting it.
    url = f"http://hook:ZQ-PASS@{host}/cb"
    notification = make_notification(api_key[0], Status.SENT, callback_url=url, callback_status="pending")

    shown = api.get(f"/api/notifications/{notification.id}", headers=headers)
    listed = api.get("/api/notifications", headers=headers)
    assert (shown.status_code, listed.status_code) == (200, 200), shown.get_data(as_text=True)
    assert shown.get_json()["callback_url"] == f"http://hook:***@{host}/cb"
    assert [n["callback_url"] for n in listed.get_json()["data"]] == [shown.get_json()["callback_url"]]

    with pytest.raises(callbacks.CallbackRejected) as refused:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert str(refused.value) == "the callback URL cannot be taken apart into host and path"
    assert "ZQ" not in _logged(refused.value)


@pytest.mark.parametrize("location", ["http://[hooks.example/cb", "http://[1:2:3]/cb?token=ZQ-TOKEN"])
def test_a_redirect_to_a_location_urllib_cannot_take_apart_gives_up_as_any_redirect(location):
    # Naming the target raised urllib's ValueError inside the handler of the 3xx: not a refusal but an
    # error of ours, retried to the last attempt with none of them recorded, and logged with the
    # receiver's HTTPError (its reason phrase, up to 64 KB) as the context.
    url, _, _ = _serve_once(f"HTTP/1.1 302 ZQ-REASON\r\nLocation: {location}\r\nContent-Length: 0\r\n"
                            "Connection: close\r\n\r\n".encode())
    with pytest.raises(callbacks.CallbackRejected, match="do not follow redirects") as refused:
        callbacks.post(url, b"{}", "secret", "n:sent", timeout=5)
    assert "ZQ" not in _logged(refused.value)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8080/hook",
                                 "http://0.0.0.0:8080/hook", "http://[::ffff:a9fe:a9fe]/",
                                 "https://user:pw@[::]/hook",
                                 # What the resolver reads as an IPv4 address (inet_aton: decimal, octal,
                                 # hex, fewer than four parts) is a literal address too: they were taken,
                                 # and every attempt then gave up at the worker.
                                 "http://2852039166/", "http://0251.0376.0251.0376/", "http://0xa9fea9fe/",
                                 "http://169.254.43518/", "http://0:8080/hook",
                                 "http://100.100.100.200/latest/meta-data/", "http://[64:ff9b::a9fe:a9fe]/",
                                 # What the resolver reads as one after IDNA's NFKC: they were taken.
                                 "http://\u2460\u2465\u2468.\u2461\u2464\u2463.\u2460\u2465\u2468.\u2461\u2464\u2463/",
                                 "http://169\u3002254\u3002169\u3002254/",
                                 "http://\uff11\uff16\uff19\uff0e\uff12\uff15\uff14\uff0e\uff11\uff16\uff19\uff0e"
                                 "\uff12\uff15\uff14/"])
def test_a_callback_url_at_a_denied_address_is_a_422(api, headers, url):
    response = api.post(SEND, json={**LITERAL, "callback_url": url}, headers=headers)

    assert response.status_code == 422, response.get_data(as_text=True)
    assert "CALLBACK_DENY_NETWORKS" in response.get_json()["error"]["details"]["callback_url"][0]
    assert "pw" not in response.get_data(as_text=True)


def test_a_callback_url_whose_host_has_no_idna_form_is_a_422(api, headers):
    for url in ("http://a..\u0431.example/hook", "http://" + "\u044f" * 70 + ".example/hook"):
        response = api.post(SEND, json={**LITERAL, "callback_url": url}, headers=headers)
        assert response.status_code == 422, response.get_data(as_text=True)
        assert "not a domain name" in str(response.get_json()["error"]["details"]["callback_url"])


@pytest.mark.parametrize("url", ["http://10.1.2.3/hook", "http://192.168.0.7:8080/hook", "http://127.0.0.1/hook",
                                 "http://[::1]/hook", "http://[fd12::1]/hook", "http://hooks.internal/hook"])
def test_private_and_loopback_callback_urls_are_taken_by_default(api, headers, url):
    assert api.post(SEND, json={**LITERAL, "callback_url": url}, headers=headers).status_code == 202


def test_a_host_that_resolves_into_a_denied_network_gives_up_without_connecting(pg_settings, pg_db, headers, receiver,
                                                                               smtp, redis_conn):
    # "localhost" is resolved by the system (/etc/hosts) to the receiver's 127.0.0.1: with loopback
    # denied, the name must be refused as the address would be, on the address connected to.
    denied = replace(pg_settings, callback_deny_networks=(ip_network("127.0.0.0/8"), ip_network("::1/128")))
    api = create_app(denied, redis=redis_conn).test_client()
    url = receiver.url.replace("127.0.0.1", "localhost")
    with installed_deliverer(denied, redis_conn):
        notification_id = _send(api, headers, callback_url=url)  # a name: the API cannot know where it leads
        run_worker_until_idle(redis_conn)

    assert receiver.count() == 0
    notification = reload(notification_id)
    assert (notification.status, notification.callback_status, notification.callback_attempts) == (
        "sent", "gave_up", 1)
    (reason,) = _callback_events(notification_id)
    assert reason.startswith("callback attempt 1 failed: 'localhost' is at 127.0.0.1, in 127.0.0.0/8, "
                             "which callbacks may not reach (CALLBACK_DENY_NETWORKS)"), reason
    assert reason.endswith("; giving up")


def test_a_host_that_resolves_to_an_allowed_address_is_posted(receiver):
    url = receiver.url.replace("127.0.0.1", "localhost")

    assert callbacks.post(url, b"{}", "secret", "n:sent", timeout=5,
                          deny_networks=Settings().callback_deny_networks) == 200
    assert receiver.count() == 1


@pytest.fixture
def tls_receiver(tmp_path, monkeypatch):
    """A real HTTPS server on 127.0.0.1 answering 200, with a self-signed certificate whose only name is
    given (DNS:localhost or IP:127.0.0.1), trusted by the process (SSL_CERT_FILE) while the test runs."""
    assert shutil.which("openssl"), "the openssl command makes the certificate (.ci/run installs it)"
    made = {}

    def start(subject_alt_name: str) -> int:
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=notifier-test", "-addext", f"subjectAltName={subject_alt_name}"],
                       check=True, capture_output=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        class Answer(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made["server"] = server
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by OpenSSL as each connection's context is made
        return server.server_address[1]

    yield start
    if "server" in made:
        made["server"].shutdown()


@pytest.mark.parametrize(("subject_alt_name", "host", "verified"), [
    ("DNS:localhost", "localhost", True), ("DNS:localhost", "127.0.0.1", False),
    # The connection is made to the address the check resolved, but the certificate must still name
    # the host of the URL: one naming only the address it resolved to is another server's.
    ("IP:127.0.0.1", "localhost", False), ("IP:127.0.0.1", "127.0.0.1", True)])
def test_https_callbacks_verify_the_certificate_against_the_urls_host(tls_receiver, subject_alt_name, host,
                                                                      verified):
    url = f"https://{host}:{tls_receiver(subject_alt_name)}/hook"
    deny = Settings().callback_deny_networks
    if verified:
        assert callbacks.post(url, b"{}", "secret", "n:sent", timeout=5, deny_networks=deny) == 200
    else:
        with pytest.raises(callbacks.CallbackRetry, match="CERTIFICATE_VERIFY_FAILED"):
            callbacks.post(url, b"{}", "secret", "n:sent", timeout=5, deny_networks=deny)


def test_a_stored_callback_url_at_the_metadata_address_is_refused_before_connecting():
    # Stored before the API refused it (or the setting changed since): no connection is tried at all.
    started = time.monotonic()
    with pytest.raises(callbacks.CallbackRejected, match="169.254.169.254 is in 169.254.0.0/16"):
        callbacks.post("http://169.254.169.254/latest/meta-data/", b"{}", "secret", "n:sent", timeout=5,
                       deny_networks=Settings().callback_deny_networks)
    assert time.monotonic() - started < 1


def test_a_slow_dns_lookup_ends_at_the_callback_timeout(monkeypatch, receiver):
    # The system resolver, held up: getaddrinfo has no timeout of its own, and CALLBACK_TIMEOUT bounded
    # only the connection and the reads after it.
    resolve = socket.getaddrinfo

    def slow_resolver(host, *args, **kwargs):
        if host == "slow.example":
            time.sleep(3)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    started = time.monotonic()
    with pytest.raises(callbacks.CallbackRetry, match="resolving 'slow.example' took over 0.5 s"):
        callbacks.post("http://slow.example/hook", b"{}", "secret", "n:sent", timeout=0.5)
    assert time.monotonic() - started < 1.5
