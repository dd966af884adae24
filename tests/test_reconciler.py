"""The reconciler, on SQLite and fakeredis: what it puts back, and what it leaves alone."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import timedelta

import pytest
from peewee import OperationalError
from rq import Queue

from notifier import keys, queues, store
from notifier.models import Notification, Status, utcnow
from notifier.reconciler import RECOVERED_REASON, Report, reconcile
from tests.helpers import make_notification, reload
from tests.operators import collect_metrics, value
from worker import make_worker


@pytest.fixture
def owner(sqlite_db):
    return keys.create("reconciler-test")[0]


@pytest.fixture
def settings(sqlite_settings):
    return replace(sqlite_settings, reconcile_grace_seconds=10, sending_timeout=60, retry_intervals=(5, 5))


def _age(notification, seconds: int, **fields) -> None:
    then = utcnow() - timedelta(seconds=seconds)
    Notification.update(updated_at=then, created_at=then, **fields).where(
        Notification.seq == notification.seq).execute()


def _queued_ids(redis, priority="default"):
    return Queue(queues.QUEUE_NAMES[priority], connection=redis).job_ids


def test_worker_consumes_every_queue_highest_first(fake_redis):
    names = make_worker(fake_redis).queue_names()
    assert names == list(queues.QUEUES_BY_PRIORITY)
    assert set(queues.QUEUE_NAMES.values()) | {queues.CALLBACK_QUEUE} == set(names)
    assert names.index(queues.QUEUE_NAMES["high"]) < names.index(queues.QUEUE_NAMES["low"])
    assert names[-1] == queues.CALLBACK_QUEUE


def test_a_queued_notification_whose_job_vanished_is_requeued(owner, settings, fake_redis):
    lost = make_notification(owner)
    _age(lost, 60)
    report = reconcile(settings, fake_redis)
    assert report.requeued == 1
    assert _queued_ids(fake_redis) == [queues.job_id_for(lost.id)]
    assert "re-enqueued by the reconciler" in [e.reason for e in reload(lost.id).events][-1]


def test_work_still_in_redis_or_too_young_is_left_alone(owner, settings, fake_redis):
    present = make_notification(owner)
    _age(present, 60)
    queues.enqueue_delivery(fake_redis, settings, present.id, "default")
    make_notification(owner)  # just accepted: its enqueue may still be on its way
    assert reconcile(settings, fake_redis).requeued == 0
    assert _queued_ids(fake_redis) == [queues.job_id_for(present.id)]


def test_a_job_marked_queued_but_in_no_queue_list_is_requeued(owner, settings, fake_redis):
    lost = make_notification(owner)
    _age(lost, 60)
    queues.enqueue_delivery(fake_redis, settings, lost.id, "default")
    fake_redis.lrem(f"rq:queue:{queues.QUEUE_NAMES['default']}", 0, queues.job_id_for(lost.id))  # lost in BLPOP
    assert reconcile(settings, fake_redis).requeued == 1
    assert _queued_ids(fake_redis) == [queues.job_id_for(lost.id)]


def test_a_lost_retry_is_scheduled_for_its_due_time(owner, settings, fake_redis):
    retrying = make_notification(owner, status=Status.RETRYING)
    _age(retrying, 12, attempts=1)  # due 5 s after its last attempt: already due
    waiting = make_notification(owner, status=Status.RETRYING, to="later@example.com")
    Notification.update(attempts=1).where(Notification.seq == waiting.seq).execute()
    assert reconcile(replace(settings, reconcile_grace_seconds=0), fake_redis).requeued == 2
    assert _queued_ids(fake_redis) == [queues.job_id_for(retrying.id)]
    scheduled = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).scheduled_job_registry
    assert scheduled.get_job_ids() == [queues.job_id_for(waiting.id)]


def test_a_notification_stuck_in_sending_is_recovered_to_retrying(owner, settings, fake_redis):
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=1)
    report = reconcile(settings, fake_redis)
    assert report.recovered == 1
    row = reload(stuck.id)
    assert row.status == Status.RETRYING
    assert [e.reason for e in row.events][-1] == RECOVERED_REASON
    assert _queued_ids(fake_redis) == [queues.job_id_for(stuck.id)]


def test_each_pass_is_counted_for_metrics_by_action(owner, settings, fake_redis):
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=1)
    lost = make_notification(owner, to="lost@example.com")
    _age(lost, 60)
    reconcile(settings, fake_redis)
    reconcile(settings, fake_redis)  # nothing left to do: counts nothing
    samples = collect_metrics(fake_redis)
    counted = {labels[0][1]: v for (name, labels), v in samples.items()
               if name == "notifier_reconciler_actions_total"}
    # The recovered row was re-queued in the same pass; the lost job is the one `requeued` counts.
    assert counted == {"expired": 0, "released": 0, "recovered": 1, "requeued": 1, "callbacks": 0,
                       "keys_forgotten": 0}
    assert set(counted) == set(asdict(Report()))


def test_stuck_on_the_final_attempt_fails_with_a_reason(owner, settings, fake_redis):
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=settings.max_attempts)
    reconcile(settings, fake_redis)
    row = reload(stuck.id)
    assert row.status == Status.FAILED
    assert "final attempt" in row.last_error


def test_a_recent_send_is_not_taken_from_its_worker(owner, settings, fake_redis):
    busy = make_notification(owner, status=Status.SENDING)
    _age(busy, 30, attempts=1)
    assert reconcile(settings, fake_redis).recovered == 0
    assert reload(busy.id).status == Status.SENDING


def test_overdue_deadlines_expire(owner, settings, fake_redis):
    late = [make_notification(owner, status=s, expires_at=utcnow() - timedelta(seconds=1))
            for s in (Status.QUEUED, Status.RETRYING, Status.SCHEDULED)]
    on_time = make_notification(owner, expires_at=utcnow() + timedelta(hours=1))
    assert reconcile(settings, fake_redis).expired == 3
    assert {reload(n.id).status for n in late} == {Status.EXPIRED}
    assert reload(on_time.id).status == Status.QUEUED


def test_overdue_scheduled_notifications_are_released(owner, settings, fake_redis):
    due = make_notification(owner, status=Status.SCHEDULED, send_at=utcnow() - timedelta(seconds=60))
    later = make_notification(owner, status=Status.SCHEDULED, send_at=utcnow() + timedelta(hours=1))
    assert reconcile(settings, fake_redis).released == 1
    assert reload(due.id).status == Status.QUEUED
    assert reload(later.id).status == Status.SCHEDULED
    assert _queued_ids(fake_redis) == [queues.job_id_for(due.id)]


def test_old_idempotency_keys_are_forgotten(owner, settings, fake_redis):
    old = make_notification(owner, status=Status.SENT, idempotency_key="k1", request_hash="h")
    _age(old, 8 * 86400)
    fresh = make_notification(owner, status=Status.SENT, idempotency_key="k2", request_hash="h")
    assert reconcile(settings, fake_redis).keys_forgotten == 1
    assert reload(old.id).idempotency_key is None
    assert reload(fresh.id).idempotency_key == "k2"


def test_a_pass_that_fails_half_way_still_counts_what_it_did(owner, settings, fake_redis, monkeypatch):
    first, second = (make_notification(owner, status=Status.SENDING, to=f"u{n}@example.com") for n in (1, 2))
    for row in (first, second):
        _age(row, 120, attempts=1)
    moves = []
    transition = store.transition

    def fail_on_the_second(*args, **kwargs):  # an injected fault: the database goes away mid-pass
        moves.append(args[0])
        if len(moves) == 2:
            raise OperationalError("server closed the connection unexpectedly")
        return transition(*args, **kwargs)

    monkeypatch.setattr(store, "transition", fail_on_the_second)
    with pytest.raises(OperationalError):
        reconcile(settings, fake_redis)
    assert [reload(r.id).status for r in (first, second)] == [Status.RETRYING, Status.SENDING]
    assert value(collect_metrics(fake_redis), "notifier_reconciler_actions_total", action="recovered") == 1
