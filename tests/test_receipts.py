"""Sent receipts, on real PostgreSQL and Redis: an email the SMTP server took while the database was
away is recorded `sent` by whoever finds its receipt, and never sent again.

The whole story with real processes and a real outage is in tests/test_faults.py."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import timedelta

import pytest
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job

from notifier import jobs, metrics, queues, receipts, store
from notifier.db import database
from notifier.jobs import SentNotRecorded
from notifier.mail import SmtpMailer
from notifier.models import Notification, Status, utcnow
from notifier.queues import connect_redis
from notifier.receipts import LATE_REASON, Receipt
from notifier.reconciler import RECOVERED_REASON, reconcile
from notifier.runtime import make_renderer
from tests.helpers import held_reply, installed_deliverer, make_notification, reload
from tests.operators import collect_metrics, value
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(fast_settings):
    return replace(fast_settings, sending_timeout=60, reconcile_grace_seconds=10)


def _left_sending(api_key, **fields) -> Notification:
    """A notification its worker claimed two minutes ago and never recorded (attempt 1 of several)."""
    notification = make_notification(api_key[0], status=Status.SENDING, **fields)
    then = utcnow() - timedelta(seconds=120)
    with database.connection_context():
        Notification.update(updated_at=then, created_at=then, attempts=1).where(
            Notification.seq == notification.seq).execute()
    return reload(notification.id)


def _receipt(notification: Notification) -> Receipt:
    return Receipt(notification.id, 250, "250 OK captured as 7", f"<{notification.id}@example.com>",
                   utcnow() - timedelta(seconds=90))


def _events(notification_id: str):
    with database.connection_context():
        return store.history(reload(notification_id))


def test_the_reconciler_records_a_kept_receipt_as_sent_instead_of_sending_again(settings, api_key, redis_conn):
    stuck = _left_sending(api_key, callback_url="https://example.com/hooks")
    receipt = _receipt(stuck)
    assert receipts.keep(redis_conn, receipt)

    report = reconcile(settings, redis_conn)

    assert (report.recorded_late, report.recovered) == (1, 0)
    row = reload(stuck.id)
    assert (row.status, row.attempts, row.message_id, row.last_error) == (Status.SENT, 1, receipt.message_id, None)
    assert row.sent_at == receipt.sent_at  # when the server took it, not when the record was written
    last = _events(stuck.id)[-1]
    assert (last.from_status, last.to_status, last.reason) == ("sending", "sent", LATE_REASON)
    assert (last.smtp_code, last.smtp_reply) == (250, receipt.smtp_reply)
    assert receipts.find(redis_conn, [stuck.id]) == {}
    # Its callback is owed as for any sent notification; no delivery job is queued.
    assert Queue(queues.CALLBACK_QUEUE, connection=redis_conn).job_ids == [queues.callback_job_id_for(stuck.id)]
    assert Queue(queues.QUEUE_NAMES["default"], connection=redis_conn).job_ids == []
    samples = collect_metrics(redis_conn)
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert value(samples, "notifier_delivery_seconds_sum", priority="default") == pytest.approx(30, abs=1)
    assert value(samples, "notifier_reconciler_actions_total", action="recorded_late") == 1
    assert value(samples, "notifier_reconciler_actions_total", action="recovered") == 0

    again = reconcile(settings, redis_conn)
    assert (again.recorded_late, again.recovered) == (0, 0)
    assert value(collect_metrics(redis_conn), "notifier_notifications_sent_total", priority="default",
                 template="-") == 1


def _file_failed(redis_conn, job_id: str) -> None:
    """A job of that id in the default queue's failed registry, as RQ files one that gave up."""
    queue = Queue(queues.QUEUE_NAMES["default"], connection=redis_conn)
    job = queue.create_job(queues.DELIVER_JOB, args=("-",), job_id=job_id)
    job.save()
    queue.failed_job_registry.add(job, ttl=3600, exc_string="SentNotRecorded")


def test_recording_a_receipt_takes_the_job_it_names_and_no_other_out_of_the_failed_registry(settings, api_key,
                                                                                          redis_conn):
    # Its own job sent the email and gave up on the record; a failed job of its batch that the receipt
    # does not name failed for a reason of its own.
    stuck = _left_sending(api_key, job_id="notifications-batch")
    own = queues.job_id_for(stuck.id)
    for job_id in (own, "notifications-batch"):
        _file_failed(redis_conn, job_id)
    assert receipts.keep(redis_conn, replace(_receipt(stuck), job_id=own))

    assert reconcile(settings, redis_conn).recorded_late == 1

    assert reload(stuck.id).status == Status.SENT
    failed = Queue(queues.QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == ["notifications-batch"]
    assert Job.exists(own, connection=redis_conn)  # out of the list, not deleted: RQ may be running it again


def test_a_receipt_kept_before_receipts_named_their_job_is_recorded_and_leaves_the_registry_alone(
        settings, api_key, redis_conn):
    stuck = _left_sending(api_key)
    _file_failed(redis_conn, queues.job_id_for(stuck.id))
    receipt = _receipt(stuck)
    redis_conn.set(f"{receipts.KEY_PREFIX}{stuck.id}", json.dumps(
        {"smtp_code": 250, "smtp_reply": receipt.smtp_reply, "message_id": receipt.message_id,
         "sent_at": receipt.sent_at.isoformat()}))

    assert reconcile(settings, redis_conn).recorded_late == 1

    assert reload(stuck.id).status == Status.SENT
    failed = Queue(queues.QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [queues.job_id_for(stuck.id)]


def test_a_stuck_send_without_a_receipt_is_still_recovered(settings, api_key, redis_conn):
    with_receipt, without = _left_sending(api_key), _left_sending(api_key, to="dave@example.com")
    receipts.keep(redis_conn, _receipt(with_receipt))
    report = reconcile(settings, redis_conn)
    assert (report.recorded_late, report.recovered) == (1, 1)
    assert reload(with_receipt.id).status == Status.SENT
    assert (reload(without.id).status, _events(without.id)[-1].reason) == (Status.RETRYING, RECOVERED_REASON)


def test_with_redis_away_the_reconciler_does_not_recover_what_may_have_a_receipt(settings, api_key):
    stuck = _left_sending(api_key)
    away = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisError):
        reconcile(settings, away)
    assert reload(stuck.id).status == Status.SENDING


def test_a_job_for_a_notification_left_sending_records_its_receipt_and_sends_nothing(live_deliverer, api_key,
                                                                                     redis_conn, smtp):
    stuck = _left_sending(api_key)
    receipts.keep(redis_conn, _receipt(stuck))
    assert jobs.deliver(stuck.id) == "recorded late"  # the retry of the job that gave up on its record
    assert smtp.count() == 0
    assert (reload(stuck.id).status, _events(stuck.id)[-1].reason) == (Status.SENT, LATE_REASON)
    assert jobs.deliver(stuck.id) == "skipped"
    assert value(collect_metrics(redis_conn), "notifier_notifications_sent_total", priority="default",
                 template="-") == 1


def test_a_job_for_a_notification_another_worker_is_sending_leaves_it_alone(live_deliverer, api_key, smtp):
    busy = _left_sending(api_key)
    assert jobs.deliver(busy.id) == "skipped"
    assert reload(busy.id).status == Status.SENDING
    assert smtp.count() == 0


def _deliver_in_background(notification_id: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = jobs.deliver(notification_id)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_database_blip_shorter_than_the_worker_waits_is_recorded_in_time_and_leaves_no_receipt(
        live_deliverer, api_key, redis_conn, smtp, database_outage):
    begin, end = database_outage
    notification = make_notification(api_key[0])
    mid_data, away = held_reply(smtp)
    thread, outcome = _deliver_in_background(notification.id)
    assert mid_data.wait(5)
    begin()
    away.set()
    # The server has it and the record failed once: the receipt is kept at once, not after all retries.
    wait_until(lambda: redis_conn.exists(f"{receipts.KEY_PREFIX}{notification.id}"), timeout=10, interval=0.05)
    end()
    thread.join(timeout=20)

    assert outcome == {"result": "sent"}
    assert _events(notification.id)[-1].reason == "accepted by SMTP server"
    assert receipts.find(redis_conn, [notification.id]) == {}
    assert smtp.count() == 1


def test_with_redis_away_too_the_worker_says_nothing_was_kept(fast_settings, api_key, smtp, database_outage):
    # The one case left where recovery may send an email twice: no receipt to find.
    begin, end = database_outage
    notification = make_notification(api_key[0])
    away = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
    with installed_deliverer(fast_settings, away):
        mid_data, database_away = held_reply(smtp)
        thread, outcome = _deliver_in_background(notification.id)
        assert mid_data.wait(5)
        begin()
        database_away.set()
        thread.join(timeout=30)
    end()
    assert isinstance(outcome["error"], SentNotRecorded)
    assert "no receipt could be kept" in str(outcome["error"])
    assert reload(notification.id).status == Status.SENDING
    assert smtp.count() == 1


def test_each_sent_email_keeps_its_receipt_until_the_workers_next_heartbeat(fast_settings, api_key, redis_conn,
                                                                           smtp):
    # Kept as the server answers, so a worker killed before its `sent` record leaves one to find
    # (tests/test_faults.py kills one there); once the record is written, deleted with the counts the
    # worker sends with its next heartbeat, not in a round trip of its own.
    counts = metrics.Deferred(redis_conn)
    mailer = SmtpMailer(fast_settings)
    deliverer = jobs.Deliverer(fast_settings, mailer, make_renderer(fast_settings), redis_conn, counts=counts)
    alone, *batch = (make_notification(api_key[0], to=f"u{n}@example.com") for n in range(3))
    try:
        assert deliverer.deliver(alone.id) == "sent"
        assert deliverer.deliver_many([n.id for n in batch]) == {"sent": 2}
    finally:
        mailer.close()
    kept = receipts.find(redis_conn, [alone.id, *(n.id for n in batch)])
    assert sorted(kept) == sorted([alone.id, *(n.id for n in batch)])
    assert {r.message_id for r in kept.values()} == {reload(i).message_id for i in kept}
    assert {r.sent_at for r in kept.values()} == {reload(i).sent_at for i in kept}  # the record's own time

    counts.flush()

    assert receipts.find(redis_conn, [alone.id, *(n.id for n in batch)]) == {}
    assert value(collect_metrics(redis_conn), "notifier_notifications_sent_total", priority="default",
                 template="-") == 3
    assert smtp.count() == 3
