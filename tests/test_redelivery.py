"""Status callbacks posted again on request, by the caller (POST .../redeliver-callback) or an operator
(`python -m notifier callbacks redeliver`): the same event, a fresh set of attempts."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from datetime import timedelta

import pytest
from rq import Queue
from rq.job import Job

from app import create_app
from notifier import callbacks, jobs
from notifier.db import database
from notifier.models import utcnow
from notifier.queues import CALLBACK_QUEUE, callback_job_id_for
from notifier.reconciler import reconcile
from tests.helpers import LITERAL, installed_deliverer, make_notification, reload, run_worker_until_idle
from tests.processes import cli, env_for

pytestmark = pytest.mark.integration

SEND = "/api/notifications/send"


def _redeliver_path(notification_id: str) -> str:
    return f"/api/notifications/{notification_id}/redeliver-callback"


def _given_up(api, headers, receiver, redis_conn) -> str:
    """A sent notification whose callback gave up: the receiver refused it for good."""
    receiver.always = 410
    response = api.post(SEND, json={**LITERAL, "callback_url": receiver.url}, headers=headers)
    assert response.status_code == 202
    run_worker_until_idle(redis_conn)
    assert reload(response.get_json()["id"]).callback_status == "gave_up"
    receiver.always = 200
    return response.get_json()["id"]


def test_a_callback_that_gave_up_goes_again_as_the_same_event(api, headers, api_key, live_deliverer, receiver, smtp,
                                                              redis_conn):
    notification_id = _given_up(api, headers, receiver, redis_conn)
    failed = Queue(CALLBACK_QUEUE, connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [callback_job_id_for(notification_id)]

    response = api.post(_redeliver_path(notification_id), headers=headers)
    assert response.status_code == 202, response.get_json()
    assert (response.get_json()["callback_status"], response.get_json()["status"]) == ("pending", "sent")
    assert failed.get_job_ids() == []  # queued again: not listed as failed meanwhile
    run_worker_until_idle(redis_conn)

    first, again = receiver.calls
    assert again.body == first.body
    assert again.headers[callbacks.EVENT_ID_HEADER] == first.headers[callbacks.EVENT_ID_HEADER] == \
        f"{notification_id}:sent"
    assert callbacks.verify(api_key[0].callback_secret, again.body, again.headers[callbacks.SIGNATURE_HEADER])
    row = reload(notification_id)
    assert (row.callback_status, row.callback_attempts) == ("delivered", 1)
    reasons = [e["reason"] for e in api.get(f"/api/notifications/{notification_id}", headers=headers)
               .get_json()["history"] if e["kind"] == "callback"]
    assert reasons == ["callback attempt 1 failed: HTTP 410; giving up",
                       "callback to be posted again, as the caller asked", "callback delivered: HTTP 200"]
    assert smtp.count() == 1  # the email is not sent again


def test_a_delivered_callback_goes_again_and_a_pending_one_is_left_to_go(api, headers, live_deliverer, receiver,
                                                                         smtp, redis_conn):
    response = api.post(SEND, json={**LITERAL, "callback_url": receiver.url}, headers=headers)
    notification_id = response.get_json()["id"]
    run_worker_until_idle(redis_conn)
    assert receiver.count() == 1
    assert api.post(_redeliver_path(notification_id), headers=headers).status_code == 202
    # Asked twice before it went: one more event, not two.
    assert api.post(_redeliver_path(notification_id), headers=headers).status_code == 202
    run_worker_until_idle(redis_conn)
    assert receiver.count() == 2
    assert reload(notification_id).callback_status == "delivered"


def test_what_cannot_be_posted_again_is_refused(api, headers, api_key, other_key, live_deliverer, receiver,
                                                redis_conn):
    without = api.post(SEND, json=LITERAL, headers=headers).get_json()["id"]
    run_worker_until_idle(redis_conn)
    answer = api.post(_redeliver_path(without), headers=headers)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (409, "no_callback")

    waiting = make_notification(api_key[0], callback_url=receiver.url)  # queued, never handed to Redis
    answer = api.post(_redeliver_path(waiting.id), headers=headers)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (409, "not_final")
    assert answer.get_json()["error"]["details"] == {"status": "queued"}

    notification_id = _given_up(api, headers, receiver, redis_conn)
    theirs = {"X-API-Key": other_key[1]}
    assert api.post(_redeliver_path(notification_id), headers=theirs).status_code == 404
    assert api.post(_redeliver_path("no-such-id"), headers=headers).status_code == 404
    assert reload(notification_id).callback_status == "gave_up"
    assert receiver.count() == 1  # its refusal, and nothing since


def test_an_operator_posts_every_callback_that_gave_up_again(api, headers, api_key, other_key, live_deliverer,
                                                             receiver, smtp, redis_conn, pg_settings):
    mine = [_given_up(api, headers, receiver, redis_conn) for _ in range(2)]
    theirs = _given_up(api, {"X-API-Key": other_key[1]}, receiver, redis_conn)
    env = env_for(pg_settings)

    assert "1 callback(s) go again" in cli(["callbacks", "redeliver", "--gave-up", "--key", other_key[0].name], env)
    later = (utcnow() + timedelta(minutes=1)).isoformat() + "+00:00"
    assert "0 callback(s) go again" in cli(["callbacks", "redeliver", "--gave-up", "--since", later], env)
    assert "2 callback(s) go again" in cli(["callbacks", "redeliver", "--gave-up"], env)
    assert "0 callback(s) go again" in cli(["callbacks", "redeliver", "--gave-up"], env)
    run_worker_until_idle(redis_conn)

    with database.connection_context():
        assert {reload(i).callback_status for i in [*mine, theirs]} == {"delivered"}
    assert receiver.count() == 6  # three refusals, then each event once
    assert sorted(c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls[3:]) == \
        sorted(f"{i}:sent" for i in [*mine, theirs])
    assert smtp.count() == 3


def test_the_command_says_what_it_cannot_do(api, headers, live_deliverer, receiver, redis_conn, pg_settings):
    import subprocess
    import sys

    from tests.processes import ROOT

    env = env_for(pg_settings)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "notifier", "callbacks", "redeliver", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    without = api.post(SEND, json=LITERAL, headers=headers).get_json()["id"]
    done = run(without)
    assert done.returncode == 1 and "has no callback_url" in done.stderr
    assert run().returncode == 2 and run(without, "--gave-up").returncode == 2
    assert run("--gave-up", "--since", "yesterday").returncode == 2
    assert run("--gave-up", "--since", "2026-12-02T10:00:00").returncode == 2  # no offset
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"):  # past the ends in UTC
        done = run("--gave-up", "--since", edge)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert run("--gave-up", "--key", "nobody").returncode == 1
    notification_id = _given_up(api, headers, receiver, redis_conn)
    env = env_for(replace(pg_settings, redis_url="redis://127.0.0.1:1/0"))  # nothing answers there
    done = run(notification_id)  # pending in the database: the reconciler queues it, so exit 0
    assert done.returncode == 0 and "Redis not answering; the reconciler queues it" in done.stdout, done.stdout
    assert reload(notification_id).callback_status == "pending"
    env = env_for(pg_settings)
    notification_id = _given_up(api, headers, receiver, redis_conn)
    done = run(notification_id)
    assert done.returncode == 0 and done.stdout.strip() == f"the callback of {notification_id} goes again"


def test_a_redelivery_then_a_reconciler_pass_queues_one_job_with_no_expiry(api, headers, live_deliverer, receiver,
                                                                         redis_conn, fast_settings):
    # The reconciler found the row pending (and old: a redelivery leaves updated_at as it was) and its
    # last job finished or failed: it queued a second job under the same id, two posts at once. The
    # new job also kept the old one's expiry (a finished job's minute, a failed one's 30 days).
    response = api.post(SEND, json={**LITERAL, "callback_url": receiver.url}, headers=headers)
    notification_id = response.get_json()["id"]
    run_worker_until_idle(redis_conn)  # delivered: its job finished, kept FINISHED_JOB_TTL
    key = Job.key_for(callback_job_id_for(notification_id))
    assert redis_conn.ttl(key) > 0
    assert api.post(_redeliver_path(notification_id), headers=headers).status_code == 202
    assert redis_conn.ttl(key) == -1
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=utcnow() + timedelta(hours=1)).callbacks == 0
    queued = Queue(CALLBACK_QUEUE, connection=redis_conn).get_job_ids()
    assert queued == [callback_job_id_for(notification_id)]
    run_worker_until_idle(redis_conn)
    assert receiver.count() == 2


def test_a_redelivered_dead_letter_requeued_before_its_callback_went_posts_the_new_event_once(
        pg_settings, pg_db, headers, receiver, smtp, redis_conn):
    # The `sent` record queued the callback job again beside the one the redelivery had queued: two
    # jobs under one id, the second posting at once after the first failed, whatever the interval.
    patient = replace(pg_settings, callback_retry_intervals=(3600,))
    api = create_app(patient, redis=redis_conn).test_client()
    receiver.always = 410
    smtp.replies.append("550 5.7.1 message rejected by policy")
    with installed_deliverer(patient, redis_conn):
        notification_id = api.post(SEND, json={**LITERAL, "callback_url": receiver.url},
                                   headers=headers).get_json()["id"]
        run_worker_until_idle(redis_conn)
        assert (reload(notification_id).status, reload(notification_id).callback_status) == ("failed", "gave_up")
        receiver.always, receiver.codes = 200, deque([503])
        assert api.post(_redeliver_path(notification_id), headers=headers).status_code == 202  # its job waits
        assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
        run_worker_until_idle(redis_conn)  # sent now; the job that waited posts what is owed then

    assert [c.headers[callbacks.EVENT_ID_HEADER] for c in receiver.calls] == [
        f"{notification_id}:failed", f"{notification_id}:sent:2"]  # and its retry an hour later
    row = reload(notification_id)
    assert (row.status, row.callback_status, row.callback_attempts) == ("sent", "pending", 1)
    assert smtp.count() == 1


def test_a_new_event_owed_while_the_old_one_is_being_posted_goes_at_once_with_a_full_set_of_retries(
        pg_settings, pg_db, headers, receiver, smtp, redis_conn):
    # The final transition found the old event's job running and queued no other: that job posted the
    # new event at the old one's next retry (10 s here, up to half an hour), with what it had left.
    settings = replace(pg_settings, callback_retry_intervals=(10, 60, 300, 1800))
    api = create_app(settings, redis=redis_conn).test_client()
    smtp.replies.append("550 5.7.1 message rejected by policy")
    with installed_deliverer(settings, redis_conn):
        notification_id = api.post(SEND, json={**LITERAL, "callback_url": receiver.url},
                                   headers=headers).get_json()["id"]

        def requeued_and_sent_meanwhile():
            assert api.post(f"/api/dead-letters/{notification_id}/requeue", headers=headers).status_code == 202
            assert jobs.deliver(notification_id) == "sent"

        receiver.before_answer = requeued_and_sent_meanwhile
        run_worker_until_idle(redis_conn)

    assert [c.json["status"] for c in receiver.calls] == ["failed", "sent"]
    assert reload(notification_id).callback_status == "delivered"
    assert smtp.count() == 1


def test_a_callback_job_lost_off_its_queue_is_queued_again_by_the_reconciler(api, headers, live_deliverer, receiver,
                                                                           redis_conn, fast_settings):
    # A worker killed between taking the job off its queue and marking it started left it `queued` in
    # no queue; the reconciler saw it missing, but the look before queueing took `queued` for live.
    receiver.always = 410
    notification_id = _given_up(api, headers, receiver, redis_conn)
    assert api.post(_redeliver_path(notification_id), headers=headers).status_code == 202
    redis_conn.lrem(Queue(CALLBACK_QUEUE, connection=redis_conn).key, 0, callback_job_id_for(notification_id))
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=utcnow() + timedelta(hours=1)).callbacks == 1
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).callback_status == "delivered"
