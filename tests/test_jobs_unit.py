"""The delivery job over SQLite, the MemoryMailer and (for the RQ cases) fakeredis with a SimpleWorker."""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import time

import pytest
from rq import Queue
from rq.timeouts import JobTimeoutException

from notifier import jobs, keys, metrics, queues, receipts, store
from notifier.config import Settings
from notifier.db import database
from notifier.errors import PermanentDeliveryError, RetriesExhausted, TransientDeliveryError
from notifier.jobs import Deliverer
from notifier.mail import MemoryMailer, message_id_for
from notifier.models import Status
from notifier.queues import QUEUE_NAMES, connect_redis, enqueue_delivery, job_id_for
from notifier.rendering import TemplateRenderError
from notifier.runtime import make_renderer
from tests.helpers import make_notification, reload, run_worker_until_idle
from tests.operators import collect_metrics, value


def smtp_reply(code: int) -> smtplib.SMTPResponseException:
    return smtplib.SMTPResponseException(code, b"scripted reply")


@pytest.fixture
def owner(sqlite_db):
    key, _ = keys.create("jobs-test")
    return key


def statuses(notification_id: str) -> list[str]:
    """The to_status of every history event, oldest first."""
    return [event.to_status for event in store.history(reload(notification_id))]


def failed_job_ids(connection, priority: str = "default") -> list[str]:
    return Queue(QUEUE_NAMES[priority], connection=connection).failed_job_registry.get_job_ids()


def test_delivered_notification_ends_sent_with_its_history(memory_deliverer, owner):
    notification = make_notification(owner)

    assert memory_deliverer.deliver(notification.id) == "sent"

    sent = reload(notification.id)
    assert sent.status == Status.SENT
    assert sent.attempts == 1
    assert sent.sent_at is not None
    assert sent.last_error is None
    assert sent.message_id == message_id_for(notification.id, "notifier@example.com")
    history = store.history(sent)
    assert [(e.from_status, e.to_status) for e in history] == [
        (None, "queued"),
        ("queued", "sending"),
        ("sending", "sent"),
    ]
    assert history[-1].smtp_code == 250
    assert len(memory_deliverer.mailer.sent) == 1
    assert memory_deliverer.mailer.sent[0]["To"] == "carol@example.com"


def test_template_notification_is_rendered_before_sending(memory_deliverer, owner):
    notification = make_notification(
        owner, subject=None, text=None, template="password_reset", data={"reset_url": "https://e.x/r?t=1"}
    )

    memory_deliverer.deliver(notification.id)

    (message,) = memory_deliverer.mailer.sent
    assert message["Subject"] == "Reset your password"
    assert "https://e.x/r?t=1" in message.get_body(("plain",)).get_content()


def test_job_delivered_twice_sends_once(memory_deliverer, owner):
    notification = make_notification(owner)

    assert memory_deliverer.deliver(notification.id) == "sent"
    assert memory_deliverer.deliver(notification.id) == "skipped"

    assert len(memory_deliverer.mailer.sent) == 1
    assert reload(notification.id).attempts == 1
    assert statuses(notification.id) == ["queued", "sending", "sent"]


@pytest.mark.parametrize("status", [Status.CANCELLED, Status.SCHEDULED, Status.FAILED])
def test_notification_not_waiting_to_be_sent_is_skipped(memory_deliverer, owner, status):
    notification = make_notification(owner, status)

    assert memory_deliverer.deliver(notification.id) == "skipped"
    assert memory_deliverer.mailer.sent == []


def test_unknown_notification_is_skipped(memory_deliverer):
    assert memory_deliverer.deliver("00000000-0000-0000-0000-000000000000") == "skipped"


def test_transient_failure_records_retrying_and_reraises(memory_deliverer, owner):
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(451)]

    with pytest.raises(TransientDeliveryError):
        memory_deliverer.deliver(notification.id)

    retrying = reload(notification.id)
    assert retrying.status == Status.RETRYING
    assert retrying.attempts == 1
    assert "451" in retrying.last_error
    assert store.history(retrying)[-1].smtp_code == 451
    assert memory_deliverer.mailer.sent == []


def test_retrying_notification_is_sent_on_the_next_attempt(memory_deliverer, owner):
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(451)]
    with pytest.raises(TransientDeliveryError):
        memory_deliverer.deliver(notification.id)

    assert memory_deliverer.deliver(notification.id) == "sent"

    sent = reload(notification.id)
    assert sent.attempts == 2
    assert sent.last_error is None
    assert statuses(notification.id) == ["queued", "sending", "retrying", "sending", "sent"]


def test_permanent_failure_records_failed_and_reraises(memory_deliverer, owner):
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(550)]

    with pytest.raises(PermanentDeliveryError) as caught:
        memory_deliverer.deliver(notification.id)

    assert caught.value.smtp_code == 550
    failed = reload(notification.id)
    assert failed.status == Status.FAILED
    assert "550" in failed.last_error
    assert statuses(notification.id) == ["queued", "sending", "failed"]


def test_template_that_cannot_render_fails_permanently_without_sending(memory_deliverer, owner):
    notification = make_notification(owner, subject=None, text=None, template="password_reset", data={})

    with pytest.raises(TemplateRenderError):
        memory_deliverer.deliver(notification.id)

    assert reload(notification.id).status == Status.FAILED
    assert memory_deliverer.mailer.sent == []


def test_transient_failure_on_the_last_attempt_fails_with_retries_exhausted(memory_deliverer, owner):
    max_attempts = memory_deliverer.settings.max_attempts
    notification = make_notification(owner, Status.RETRYING, attempts=max_attempts - 1)
    memory_deliverer.mailer.failures = [smtp_reply(451)]

    with pytest.raises(RetriesExhausted) as caught:
        memory_deliverer.deliver(notification.id)

    assert caught.value.smtp_code == 451
    failed = reload(notification.id)
    assert failed.status == Status.FAILED
    assert failed.attempts == max_attempts
    assert "451" in failed.last_error
    assert str(max_attempts) in failed.last_error


def test_rq_retries_transient_failures_until_sent(memory_deliverer, owner, fake_redis):
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(451), smtp_reply(451)]

    enqueue_delivery(fake_redis, memory_deliverer.settings, notification.id, "default")
    run_worker_until_idle(fake_redis)

    sent = reload(notification.id)
    assert sent.status == Status.SENT
    assert sent.attempts == 3
    assert len(memory_deliverer.mailer.sent) == 1
    assert statuses(notification.id) == ["queued", "sending", "retrying", "sending", "retrying", "sending", "sent"]
    assert failed_job_ids(fake_redis) == []


def test_permanent_smtp_error_is_not_retried(memory_deliverer, owner, fake_redis):
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(550), smtp_reply(550), smtp_reply(550)]

    enqueue_delivery(fake_redis, memory_deliverer.settings, notification.id, "default")
    run_worker_until_idle(fake_redis)

    failed = reload(notification.id)
    assert failed.status == Status.FAILED
    assert failed.attempts == 1
    assert len(memory_deliverer.mailer.failures) == 2
    assert failed_job_ids(fake_redis) == [job_id_for(notification.id)]


def test_transient_failures_beyond_the_retry_schedule_end_in_the_failed_registry(memory_deliverer, owner, fake_redis):
    max_attempts = memory_deliverer.settings.max_attempts
    notification = make_notification(owner)
    memory_deliverer.mailer.failures = [smtp_reply(451) for _ in range(max_attempts + 1)]

    enqueue_delivery(fake_redis, memory_deliverer.settings, notification.id, "default")
    run_worker_until_idle(fake_redis)

    failed = reload(notification.id)
    assert failed.status == Status.FAILED
    assert failed.attempts == max_attempts
    assert len(memory_deliverer.mailer.failures) == 1
    assert failed_job_ids(fake_redis) == [job_id_for(notification.id)]


def test_high_priority_notification_is_delivered_from_its_own_queue(memory_deliverer, owner, fake_redis):
    notification = make_notification(owner, priority="high")

    job = enqueue_delivery(fake_redis, memory_deliverer.settings, notification.id, "high")
    run_worker_until_idle(fake_redis)

    assert job.origin == QUEUE_NAMES["high"]
    assert reload(notification.id).status == Status.SENT


def test_a_shared_job_on_sqlite_sends_each_once_and_records_each(memory_deliverer, owner):
    ids = [make_notification(owner, to=f"user{n}@example.com").id for n in range(3)]
    cancelled = make_notification(owner, to="gone@example.com")
    with database.connection_context():
        store.transition(cancelled.id, Status.CANCELLED, reason="test")

    assert memory_deliverer.deliver_many([*ids, cancelled.id, "no-such-id"]) == {"sent": 3, "skipped": 2}
    assert sorted(m["To"] for m in memory_deliverer.mailer.sent) == [f"user{n}@example.com" for n in range(3)]
    for notification_id in ids:
        row = reload(notification_id)
        assert (row.status, row.attempts, row.sent_at is not None) == ("sent", 1, True)
    assert memory_deliverer.deliver_many(ids) == {"skipped": 3}
    assert len(memory_deliverer.mailer.sent) == 3


def test_share_jobs_fills_jobs_per_priority_and_skips_what_is_not_queued():
    settings = Settings(batch_job_size=2)
    items = [(Status.QUEUED, {"priority": "low"}), (Status.SCHEDULED, {"priority": "low"}),
             (Status.QUEUED, {"priority": "high"}), (Status.QUEUED, {"priority": "low"}),
             (Status.QUEUED, {"priority": "low"}), (Status.SUPPRESSED, {})]
    shared = queues.share_jobs(settings, items)
    jobs_of = [fields.get("job_id") for fields in shared]
    assert jobs_of[1] is None and jobs_of[5] is None
    assert jobs_of[0] == jobs_of[3] != jobs_of[4]  # two low ones fill a job; the third starts another
    assert jobs_of[2] not in (jobs_of[0], jobs_of[4])  # another priority, another job
    assert all(j.startswith("notifications-") for j in (jobs_of[0], jobs_of[2], jobs_of[4]))
    assert queues.share_jobs(Settings(batch_job_size=1), items) == [fields for _, fields in items]


@pytest.mark.parametrize("last", [False, True])
def test_a_send_cut_off_by_the_job_limit_is_retried_or_on_the_last_attempt_failed(memory_deliverer, owner, last):
    # RQ's own exception goes on up (the job stops), after the attempt is recorded like any other
    # that may pass: `retrying`, or `failed` with what it gave up after.
    from rq.timeouts import JobTimeoutException

    def cut_off(email):
        raise JobTimeoutException("Task exceeded maximum timeout value (120 seconds)")

    max_attempts = memory_deliverer.settings.max_attempts
    notification = make_notification(owner, Status.RETRYING, attempts=max_attempts - 1 if last else 0)
    memory_deliverer.mailer.send = cut_off

    with pytest.raises(JobTimeoutException):
        memory_deliverer.deliver(notification.id)

    row = reload(notification.id)
    assert row.status == (Status.FAILED if last else Status.RETRYING)
    assert "JobTimeoutException" in row.last_error
    assert (f"gave up after {max_attempts} attempts" in row.last_error) is last


@pytest.mark.parametrize("stop", ["job-limit", "cold-shutdown"])
def test_the_job_limit_landing_as_the_sent_record_is_written_still_records_it(memory_deliverer, owner, monkeypatch,
                                                                            caplog, stop):
    # RQ's limit is one SIGALRM, raised as soon as Python runs again: after a PREPARE that waited on a
    # lock (a migration's), before the UPDATE it prepared. The server has the email: left `sending`, it
    # was recovered by the reconciler and sent again. RQ's cold shutdown (a second SIGTERM) raises
    # SystemExit the same way.
    from rq.timeouts import JobTimeoutException

    stopping = JobTimeoutException if stop == "job-limit" else SystemExit
    notification = make_notification(owner, Status.QUEUED)
    transition, calls = store.transition, []

    def cut_off_once(notification_id, target, **kwargs):
        calls.append(target)
        if target == Status.SENT and calls.count(Status.SENT) == 1:
            raise stopping("stopped")
        return transition(notification_id, target, **kwargs)

    monkeypatch.setattr(store, "transition", cut_off_once)
    caplog.set_level("INFO", logger="notifier.jobs")
    with pytest.raises(stopping):
        memory_deliverer.deliver(notification.id)

    assert reload(notification.id).status == Status.SENT  # the job still stops, with its email recorded
    assert len(memory_deliverer.mailer.sent) == 1
    # and with what follows the record done: its callback queued, its count, its line
    assert f"notification {notification.id} sent (attempt 1)" in caplog.messages


@pytest.fixture
def frozen_redis():
    """A Redis that takes connections and commands and answers nothing (frozen, failing over)."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield connect_redis(f"redis://127.0.0.1:{server.getsockname()[1]}/0")
    finally:
        server.close()


def _deliverer_on(settings, redis) -> Deliverer:
    # As a worker has it: its counts (and the receipts it deletes) go with its next heartbeat.
    return Deliverer(settings, MemoryMailer("notifier@example.com"), make_renderer(settings), redis,
                     counts=metrics.Deferred(redis))


def test_a_frozen_redis_holds_the_sent_record_only_as_long_as_a_receipt_may_take(sqlite_settings, owner,
                                                                                 frozen_redis):
    deliverer = _deliverer_on(sqlite_settings, frozen_redis)
    notification = make_notification(owner, Status.QUEUED)
    began = time.monotonic()

    assert deliverer.deliver(notification.id) == "sent"

    assert reload(notification.id).status == Status.SENT
    assert time.monotonic() - began < 5  # KEEP_TIMEOUT_SECONDS, not the worker's Redis timeout (10 s)


@pytest.mark.parametrize("job", ["deliver", "deliver_many"])
def test_the_job_limit_landing_while_the_receipt_is_kept_still_records_the_sent(sqlite_settings, owner,
                                                                                frozen_redis, job):
    # The receipt's round trip comes between the server's 250 and the record: RQ's limit (one SIGALRM)
    # landing there left an email the server took `sending`, to be recovered and sent again. A shared
    # job holds the record for its next claim: held before the round trip, it is written on the way out.
    deliverer = _deliverer_on(sqlite_settings, frozen_redis)
    notification = make_notification(owner, Status.QUEUED)

    def limit(signum, frame):
        raise JobTimeoutException("JOB_TIMEOUT")

    previous = signal.signal(signal.SIGALRM, limit)
    signal.setitimer(signal.ITIMER_REAL, receipts.KEEP_TIMEOUT_SECONDS / 2)  # the send itself takes microseconds
    try:
        with pytest.raises(JobTimeoutException):
            if job == "deliver":
                deliverer.deliver(notification.id)
            else:
                deliverer.deliver_many([notification.id])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert len(deliverer.mailer.sent) == 1
    assert reload(notification.id).status == Status.SENT


def _recorded_meanwhile(monkeypatch, meanwhile):
    """Make the worker's first `sent` record find the row moved on by meanwhile(notification_id)."""
    transition, calls = store.transition, []

    def first_record_loses(notification_id, target, **kwargs):
        calls.append(target)
        if target == Status.SENT and calls.count(Status.SENT) == 1:
            meanwhile(notification_id)
        return transition(notification_id, target, **kwargs)

    monkeypatch.setattr(store, "transition", first_record_loses)


def test_a_receipt_recorded_by_the_reconciler_meanwhile_is_counted_once_and_called_back_once(
        sqlite_settings, owner, fake_redis, monkeypatch):
    # The worker's record waits on a lock past SENDING_TIMEOUT; the reconciler records the receipt kept
    # at the 250 (same sent_at), then RQ's limit cuts the worker off and it writes again: that record
    # is not the worker's, so neither is the count or the callback.
    deliverer = Deliverer(sqlite_settings, MemoryMailer("notifier@example.com"), make_renderer(sqlite_settings),
                          fake_redis)
    notification = make_notification(owner, Status.QUEUED, callback_url="https://example.com/hooks")

    def reconciler_then_limit(notification_id):
        kept = receipts.find(fake_redis, [notification_id])[notification_id]
        assert receipts.record(fake_redis, sqlite_settings, store.get(notification_id), kept, fake_redis)
        raise JobTimeoutException("JOB_TIMEOUT")

    _recorded_meanwhile(monkeypatch, reconciler_then_limit)
    with pytest.raises(JobTimeoutException):
        deliverer.deliver(notification.id)

    assert reload(notification.id).status == Status.SENT
    assert statuses(notification.id)[-1] == "sent" and store.history(reload(notification.id))[-1].reason == (
        receipts.LATE_REASON)
    samples = collect_metrics(fake_redis)
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 1  # one answer, counted by its recorder
    assert Queue(queues.CALLBACK_QUEUE, connection=fake_redis).count == 1


def test_a_record_that_lost_to_a_recovery_leaves_its_receipt_and_counts_only_the_reply(sqlite_settings, owner,
                                                                                      fake_redis, monkeypatch):
    # Taken for lost while its worker sent it (the receipt came too late for that pass): the email went
    # out, and the receipt says so to whoever finds the notification `sending` again; deleting it could
    # delete the receipt of the attempt that comes next, under the same key.
    deliverer = _deliverer_on(sqlite_settings, fake_redis)
    notification = make_notification(owner, Status.QUEUED)

    def recovered(notification_id):
        assert store.transition(notification_id, Status.RETRYING, reason="recovered", sources=(Status.SENDING,))

    _recorded_meanwhile(monkeypatch, recovered)
    assert deliverer.deliver(notification.id) == "sent"
    deliverer._counts.flush()

    assert reload(notification.id).status == Status.RETRYING
    assert list(receipts.find(fake_redis, [notification.id])) == [notification.id]
    samples = collect_metrics(fake_redis)
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") is None  # no series
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 1


class _CommitThenStop:
    """The database proxy, but its first transaction commits and then RQ's limit lands, before the
    code after it runs: a commit made whose answer the job never acted on."""

    def __init__(self, database):
        self._database, self._stopped = database, False

    def __getattr__(self, name):
        return getattr(self._database, name)

    @contextlib.contextmanager
    def atomic(self):
        with self._database.atomic():
            yield
        if not self._stopped:
            self._stopped = True
            raise JobTimeoutException("JOB_TIMEOUT")


def test_a_held_record_committed_as_the_job_limit_lands_is_counted_and_called_back_as_the_jobs_own(
        sqlite_settings, owner, fake_redis, monkeypatch):
    # A shared job writes an email's `sent` record with the next claim. RQ's limit landing just after
    # that commit left the record held; written again on the way out, it found the row moved on and
    # was taken for another process's: never counted, its callback left to the reconciler.
    deliverer = _deliverer_on(sqlite_settings, fake_redis)
    first = make_notification(owner, Status.QUEUED, callback_url="https://example.com/hooks")
    second = make_notification(owner, Status.QUEUED, to="dave@example.com")
    monkeypatch.setattr(jobs, "database", _CommitThenStop(jobs.database))
    # More than 10 ms between the two emails (a loaded machine) and the check for higher-priority
    # work wrote the held record alone, before the claim: the case under test never came (a flake).
    monkeypatch.setattr(jobs, "MAKE_WAY_CHECK_SECONDS", 3600)

    with pytest.raises(JobTimeoutException):
        deliverer.deliver_many([first.id, second.id])
    deliverer._counts.flush()

    assert (reload(first.id).status, reload(second.id).status) == (Status.SENT, Status.SENDING)
    samples = collect_metrics(fake_redis)
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 1
    assert Queue(queues.CALLBACK_QUEUE, connection=fake_redis).count == 1
