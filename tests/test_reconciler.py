"""The reconciler, on SQLite and fakeredis: what it puts back, and what it leaves alone."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import timedelta

import pytest
from peewee import OperationalError
from rq import Queue
from rq.job import Job

from notifier import keys, queues, reconciler, store
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


def test_work_that_moved_on_while_the_pass_turned_to_redis_is_left_alone(owner, settings, fake_redis, monkeypatch):
    # The page is read before Redis is, and a job that ran in between is no longer live work either: a
    # pass held up there for a second (a warm shutdown stops RQ's scheduler in its signal handler) put
    # back a hundred notifications already sent, and cleared the job_id of one a shared job was sending.
    lost, sent, claimed = (make_notification(owner, to=f"u{n}@example.com") for n in range(3))
    for row in (lost, sent, claimed):
        _age(row, 60)
    shared_job = queues.new_shared_job_id()
    missing_jobs = reconciler._missing_jobs

    def workers_get_on_meanwhile(*args, **kwargs):  # the interleaving: workers run while the pass waits
        if reload(sent.id).status == Status.QUEUED:
            store.claim(sent.id)
            store.transition(sent.id, Status.SENT, reason="accepted by SMTP server", sources=(Status.SENDING,))
            store.claim(claimed.id, job_id=shared_job)
        return missing_jobs(*args, **kwargs)

    monkeypatch.setattr(reconciler, "_missing_jobs", workers_get_on_meanwhile)
    assert reconcile(settings, fake_redis).requeued == 1
    assert _queued_ids(fake_redis) == [queues.job_id_for(lost.id)]
    assert not any("re-enqueued" in (e.reason or "") for e in reload(sent.id).events)
    assert (reload(claimed.id).status, reload(claimed.id).job_id) == (Status.SENDING, shared_job)


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


def test_a_send_claimed_before_redis_lost_its_memory_waits_for_its_job_limit(owner, settings, fake_redis):
    # Redis restarted empty, flushed, or failed over: whether the claiming worker lives and still runs
    # the job is not known, so the row is taken back only when no live worker can still be at it.
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=1)  # past SENDING_TIMEOUT (60 s), within JOB_TIMEOUT + 60 s (180 s)
    fake_redis.flushdb()
    assert reconcile(settings, fake_redis).recovered == 0
    assert reload(stuck.id).status == Status.SENDING
    assert fake_redis.exists(queues.REMEMBERS_SINCE_KEY)  # the pass noted when Redis's memory began
    later = utcnow() + timedelta(seconds=61)
    assert reconcile(settings, fake_redis, now=later).recovered == 1


def test_a_workers_heartbeat_notes_when_redis_began_to_remember(fake_redis):
    fake_redis.flushdb()
    worker = make_worker(fake_redis, name="marker")
    worker.register_birth()
    worker.heartbeat()
    noted = queues.remembers_since(fake_redis.get(queues.REMEMBERS_SINCE_KEY))
    assert abs((noted - utcnow()).total_seconds()) < 60
    worker.heartbeat()  # noted once: a later heartbeat does not move it
    assert queues.remembers_since(fake_redis.get(queues.REMEMBERS_SINCE_KEY)) == noted


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
    assert counted == {"expired": 0, "released": 0, "rescheduled": 0, "recovered": 1, "recorded_late": 0, "requeued": 1,
                       "callbacks": 0, "keys_forgotten": 0}
    assert set(counted) == set(asdict(Report()))


def test_stuck_on_the_final_attempt_fails_with_a_reason(owner, settings, fake_redis):
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=settings.max_attempts)
    reconcile(settings, fake_redis)
    row = reload(stuck.id)
    assert row.status == Status.FAILED
    assert "final attempt" in row.last_error


def test_a_send_failed_on_its_final_attempt_is_counted_failed(owner, settings, fake_redis):
    # Counted accepted by the API, it was counted as nothing after: sent, failed and expired did not add up.
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=settings.max_attempts)
    reconcile(settings, fake_redis)
    reconcile(settings, fake_redis)  # once
    assert value(collect_metrics(fake_redis), "notifier_notifications_failed_total", priority="default",
                 template="-") == 1


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
    (job,) = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).jobs  # as scheduler.py releases
    assert (job.args[0], job.id) == ([due.id], reload(due.id).job_id)


def test_overdue_scheduled_notifications_come_back_in_shared_jobs_most_urgent_first(owner, settings, fake_redis):
    # A schedule Redis lost, once overdue: a job each took the workers longer than the sends.
    overdue = utcnow() - timedelta(seconds=60)
    low = [make_notification(owner, status=Status.SCHEDULED, priority="low", to=f"l{n}@example.com",
                             send_at=overdue) for n in range(30)]
    high = make_notification(owner, status=Status.SCHEDULED, priority="high", send_at=overdue)
    assert reconcile(settings, fake_redis).released == 31
    low_jobs = Queue(queues.QUEUE_NAMES["low"], connection=fake_redis).jobs
    assert sorted(len(job.args[0]) for job in low_jobs) == [5, 25]
    assert sorted(i for job in low_jobs for i in job.args[0]) == sorted(n.id for n in low)
    assert [job.args[0] for job in Queue(queues.QUEUE_NAMES["high"], connection=fake_redis).jobs] == [[high.id]]


def test_old_idempotency_keys_are_forgotten(owner, settings, fake_redis):
    old = make_notification(owner, status=Status.SENT, idempotency_key="k1", request_hash="h")
    _age(old, 8 * 86400)
    fresh = make_notification(owner, status=Status.SENT, idempotency_key="k2", request_hash="h")
    assert reconcile(settings, fake_redis).keys_forgotten == 1
    assert reload(old.id).idempotency_key is None
    assert reload(fresh.id).idempotency_key == "k2"


def test_old_idempotency_keys_are_forgotten_a_page_at_a_time(owner, settings, fake_redis, monkeypatch):
    rows = [make_notification(owner, status=Status.SENT, idempotency_key=f"k{n}", request_hash="h") for n in range(7)]
    for row in rows:
        _age(row, 8 * 86400)
    monkeypatch.setattr(reconciler, "BATCH", 2)
    monkeypatch.setattr(reconciler, "MAX_PAGES", 3)
    assert reconcile(settings, fake_redis).keys_forgotten == 6  # three pages of two: the rest waits
    assert sum(reload(r.id).idempotency_key is None for r in rows) == 6
    assert reconcile(settings, fake_redis).keys_forgotten == 1
    assert all(reload(r.id).idempotency_key is None for r in rows)


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


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of 2 rows, at most 3 a step: the paging of a big backlog, on a few rows."""
    monkeypatch.setattr(reconciler, "BATCH", 2)
    monkeypatch.setattr(reconciler, "MAX_PAGES", 3)


def test_work_redis_lost_comes_back_a_page_after_another_in_one_pass(owner, settings, fake_redis, small_pages):
    lost = [make_notification(owner, to=f"u{n}@example.com") for n in range(7)]
    for row in lost:
        _age(row, 60)
    # Three pages of two in this pass (a pass stays bounded); the seventh once those have gone out.
    assert reconcile(settings, fake_redis).requeued == 6
    assert sorted(_queued_ids(fake_redis)) == sorted(queues.job_id_for(n.id) for n in lost[:6])
    assert reconcile(settings, fake_redis).requeued == 0
    for row in lost[:6]:
        store.transition(row.id, Status.CANCELLED, reason="test")
    assert reconcile(settings, fake_redis).requeued == 1


def test_a_pass_past_half_its_interval_takes_no_more_pages(owner, settings, fake_redis, small_pages):
    lost = [make_notification(owner, to=f"u{n}@example.com") for n in range(5)]
    for row in lost:
        _age(row, 60)
    # rq-scheduler queues the next pass when the interval is up: this one may not run into it.
    assert reconcile(replace(settings, reconcile_interval=0), fake_redis).requeued == 2
    assert reconcile(settings, fake_redis).requeued == 0  # the first two are queued; the rest wait behind
    assert {reload(n.id).status for n in lost} == {Status.QUEUED}


def test_a_page_whose_jobs_are_all_in_redis_ends_the_requeue_step(owner, settings, fake_redis, small_pages):
    waiting = [make_notification(owner, to=f"u{n}@example.com") for n in range(4)]
    for row in waiting:
        _age(row, 60)
    for row in waiting[:2]:
        queues.enqueue_delivery(fake_redis, settings, row.id, "default")
    # A backlog waiting its turn costs one page a pass; what lies behind it comes as the backlog drains.
    assert reconcile(settings, fake_redis).requeued == 0
    store.transition(waiting[0].id, Status.CANCELLED, reason="test")
    store.transition(waiting[1].id, Status.CANCELLED, reason="test")
    assert reconcile(settings, fake_redis).requeued == 2


def test_an_urgent_email_lost_behind_a_waiting_backlog_of_less_urgent_ones_comes_back_at_once(
        owner, settings, fake_redis, small_pages):
    # A Redis failover loses the newest writes: here a password reset accepted after a bulk send.
    backlog = [make_notification(owner, to=f"u{n}@example.com", priority="low") for n in range(4)]
    urgent = make_notification(owner, to="ada@example.com", priority="high")
    for row in (*backlog, urgent):
        _age(row, 60)
    for row in backlog:
        queues.enqueue_delivery(fake_redis, settings, row.id, "low")
    # The backlog is where it should be (one page a pass), and the urgent one does not wait for it.
    assert reconcile(settings, fake_redis).requeued == 1
    assert _queued_ids(fake_redis, "high") == [queues.job_id_for(urgent.id)]


def test_lost_retries_behind_waiting_ones_are_requeued_in_the_same_pass(owner, settings, fake_redis, small_pages):
    retrying = [make_notification(owner, status=Status.RETRYING, to=f"u{n}@example.com") for n in range(4)]
    for row in retrying:
        _age(row, 60, attempts=1)
    later = utcnow() + timedelta(hours=1)
    for row in retrying[:2]:  # the last retry interval: their jobs wait an hour in the scheduled registry
        queues.enqueue_delivery(fake_redis, settings, row.id, "default", attempts_made=1, at=later)
    assert reconcile(settings, fake_redis).requeued == 2
    scheduled = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).scheduled_job_registry
    assert sorted(scheduled.get_job_ids()) == sorted(queues.job_id_for(n.id) for n in retrying[:2])
    assert sorted(_queued_ids(fake_redis)) == sorted(queues.job_id_for(n.id) for n in retrying[2:])  # due: now


def test_moves_go_on_page_after_page(owner, settings, fake_redis, small_pages):
    overdue = [make_notification(owner, status=Status.SCHEDULED, to=f"u{n}@example.com",
                                 send_at=utcnow() - timedelta(seconds=60)) for n in range(5)]
    late = [make_notification(owner, to=f"l{n}@example.com", expires_at=utcnow() - timedelta(seconds=1))
            for n in range(5)]
    stuck = [make_notification(owner, status=Status.SENDING, to=f"s{n}@example.com") for n in range(5)]
    for row in stuck:
        _age(row, 120, attempts=1)
    report = reconcile(settings, fake_redis)
    assert (report.released, report.expired, report.recovered) == (5, 5, 5)
    assert {reload(n.id).status for n in overdue} == {Status.QUEUED}
    assert {reload(n.id).status for n in late} == {Status.EXPIRED}
    assert {reload(n.id).status for n in stuck} == {Status.RETRYING}


def test_callbacks_redis_lost_come_back_page_after_page(owner, settings, fake_redis, small_pages):
    owed = [make_notification(owner, status=Status.SENT, to=f"u{n}@example.com", callback_url="https://example.com/cb",
                              callback_status="pending") for n in range(5)]
    for row in owed:
        _age(row, 60)
    assert reconcile(settings, fake_redis).callbacks == 5



def test_lost_callbacks_behind_ones_waiting_for_their_retry_are_queued_in_the_same_pass(owner, settings, fake_redis,
                                                                                       small_pages):
    # A Redis failover loses the newest writes. The oldest owed callbacks wait in RQ's scheduled
    # registry for their retry (half an hour for the last, while a receiver is down): a first page of
    # them ended the step, and a callback Redis lost behind them waited until they had all given up.
    owed = [make_notification(owner, status=Status.SENT, to=f"u{n}@example.com", callback_url="https://example.com/cb",
                              callback_status="pending", callback_attempts=3) for n in range(4)]
    for row in owed:
        _age(row, 60)
    later = utcnow() + timedelta(minutes=30)
    for row in owed[:2]:
        Queue(queues.CALLBACK_QUEUE, connection=fake_redis).enqueue_at(
            later, queues.CALLBACK_JOB, row.id, job_id=queues.callback_job_id_for(row.id))
    assert reconcile(settings, fake_redis).callbacks == 2
    assert sorted(Queue(queues.CALLBACK_QUEUE, connection=fake_redis).job_ids) == sorted(
        queues.callback_job_id_for(n.id) for n in owed[2:])


def test_a_page_of_callbacks_waiting_in_their_queue_ends_the_callback_step(owner, settings, fake_redis, small_pages):
    owed = [make_notification(owner, status=Status.SENT, to=f"u{n}@example.com", callback_url="https://example.com/cb",
                              callback_status="pending") for n in range(4)]
    for row in owed:
        _age(row, 60)
    for row in owed[:2]:
        queues.enqueue_callback(fake_redis, settings, row.id)
    # A backlog waiting its turn costs one page a pass (each page deeper would look further down a long
    # queue); what lies behind it comes as the backlog drains.
    assert reconcile(settings, fake_redis).callbacks == 0

def _started(redis, job, name: str = "notifier-host-1"):
    """A live worker of that name that has started job: what RQ writes as it starts one."""
    worker = make_worker(redis, name=name)
    worker.register_birth()
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    return worker


def _started_own_job(redis, settings, notification):
    return _started(redis, queues.enqueue_delivery(redis, settings, notification.id, "default"))


def test_a_send_its_live_worker_is_still_running_is_left_to_it(owner, settings, fake_redis):
    slow = make_notification(owner, status=Status.SENDING)
    _age(slow, 120, attempts=1)  # past SENDING_TIMEOUT, as when the mail server takes its time
    _started_own_job(fake_redis, settings, slow)
    assert reconcile(settings, fake_redis).recovered == 0
    assert reload(slow.id).status == Status.SENDING


def test_a_send_is_left_to_its_live_worker_though_a_second_run_of_its_job_finished_meanwhile(owner, settings,
                                                                                            fake_redis):
    # One job id queued twice (the reconciler handed on a job a worker had taken from its queue but
    # not yet started): the second run, on another worker, found the notification claimed, skipped
    # it and wrote `finished` over the job's `started`, while the first was still sending.
    slow = make_notification(owner, status=Status.SENDING)
    _age(slow, 120, attempts=1)
    job = queues.enqueue_delivery(fake_redis, settings, slow.id, "default")
    _started(fake_redis, job)
    other = _started(fake_redis, Job.fetch(job.id, connection=fake_redis), name="notifier-host-2")
    fake_redis.hset(job.key, mapping={"status": "finished", "worker_name": other.name})
    fake_redis.delete(other.executions_key)
    assert reconcile(settings, fake_redis).recovered == 0
    assert reload(slow.id).status == Status.SENDING


def _registered_death(redis, worker) -> None:
    worker.register_death()


def _key_expired(redis, worker) -> None:
    redis.delete(worker.key)  # killed outright: its last heartbeat's TTL ran out


def _on_another_job(redis, worker) -> None:
    redis.delete(worker.executions_key)
    redis.sadd(worker.executions_key, "notification-other:1")


@pytest.mark.parametrize("gone", [_registered_death, _key_expired, _on_another_job])
def test_a_send_whose_worker_is_gone_or_elsewhere_is_recovered(owner, settings, fake_redis, gone):
    stuck = make_notification(owner, status=Status.SENDING)
    _age(stuck, 120, attempts=1)
    gone(fake_redis, _started_own_job(fake_redis, settings, stuck))
    assert reconcile(settings, fake_redis).recovered == 1
    assert reload(stuck.id).status == Status.RETRYING


def _callback_started(redis, settings, notification):
    return _started(redis, queues.enqueue_callback(redis, settings, notification.id, 1))


@pytest.mark.parametrize("gone", [_registered_death, _key_expired, _on_another_job])
def test_a_callback_whose_worker_is_gone_is_queued_again(owner, settings, fake_redis, gone):
    # A worker killed mid-callback left its job `started`; RQ's maintenance, every 10 minutes per
    # worker, was all that would ever retry it.
    owed = make_notification(owner, status=Status.SENT, callback_url="http://127.0.0.1:9/hook",
                             callback_status="pending", callback_attempts=1)
    _age(owed, 120)
    gone(fake_redis, _callback_started(fake_redis, settings, owed))
    assert reconcile(settings, fake_redis).callbacks == 1
    assert queues.callback_job_id_for(owed.id) in Queue(queues.CALLBACK_QUEUE, connection=fake_redis).job_ids


def test_a_callback_its_live_worker_is_posting_is_left_to_it(owner, settings, fake_redis):
    owed = make_notification(owner, status=Status.SENT, callback_url="http://127.0.0.1:9/hook",
                             callback_status="pending", callback_attempts=1)
    _age(owed, 120)
    _callback_started(fake_redis, settings, owed)
    assert reconcile(settings, fake_redis).callbacks == 0


def test_a_member_of_a_shared_job_is_left_while_its_live_worker_runs_the_job(owner, settings, fake_redis):
    job = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).enqueue(
        queues.DELIVER_MANY_JOB, ["a", "b"], job_id="notifications-shared")
    sending = make_notification(owner, status=Status.SENDING, job_id=job.id)
    alone = make_notification(owner, status=Status.SENDING, to="dave@example.com")  # its own job, not running
    for row in (sending, alone):
        _age(row, 120, attempts=1)
    _started(fake_redis, job)
    assert reconcile(settings, fake_redis).recovered == 1
    assert (reload(sending.id).status, reload(alone.id).status) == (Status.SENDING, Status.RETRYING)


def test_a_send_of_a_shared_job_redis_lost_waits_for_its_job_limit(owner, settings, fake_redis):
    # A shared job claims its emails one at a time, long after it started: one it claimed after Redis
    # lost its memory (claimed after queues.REMEMBERS_SINCE_KEY) is still its live worker's, unseen.
    lost = make_notification(owner, status=Status.SENDING, job_id="notifications-lost")
    _age(lost, 120, attempts=1)  # past SENDING_TIMEOUT (60 s), within JOB_TIMEOUT + 60 s (180 s)
    assert reconcile(settings, fake_redis).recovered == 0
    assert reload(lost.id).status == Status.SENDING
    later = utcnow() + timedelta(seconds=61)  # no live worker can still be at it
    assert reconcile(settings, fake_redis, now=later).recovered == 1
    assert reload(lost.id).status == Status.RETRYING


def test_a_send_of_a_shared_job_redis_holds_whose_worker_is_gone_is_recovered(owner, settings, fake_redis):
    job = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).enqueue(
        queues.DELIVER_MANY_JOB, ["a", "b"], job_id="notifications-shared")
    stuck = make_notification(owner, status=Status.SENDING, job_id=job.id)
    _age(stuck, 120, attempts=1)
    _key_expired(fake_redis, _started(fake_redis, job))
    assert reconcile(settings, fake_redis).recovered == 1
    assert reload(stuck.id).status == Status.RETRYING


def test_a_page_redis_lost_is_requeued_at_once_on_postgres_leaving_what_moved_on_or_is_held(pg_db, pg_url, pg_settings,
                                                                                             redis_conn, monkeypatch):
    # On PostgreSQL a page is taken in one statement (the rows still as read), queued in one Redis round
    # trip and given its history lines in one statement: what a row at a time did, races included. A
    # row another transaction holds (an erasure cancelling its user's mail, which may yet roll back) is
    # passed over, not waited for, and comes back on the next pass if it is still owed.
    import psycopg2

    settings = replace(pg_settings, reconcile_grace_seconds=10, sending_timeout=60, retry_intervals=(5, 3600))
    with pg_db.connection_context():
        owner = keys.create("reconciler-pg")[0]
        lost, sent, claimed, held = (make_notification(owner, to=f"u{n}@example.com") for n in range(4))
        retry = make_notification(owner, status=Status.RETRYING, to="retry@example.com")
        for row in (lost, sent, claimed, held):
            _age(row, 60)
        _age(retry, 60, attempts=2)  # its next attempt is due an hour after its last
    shared_job = queues.new_shared_job_id()
    missing_jobs = reconciler._missing_jobs
    eraser = psycopg2.connect(pg_url)

    def others_get_on_meanwhile(*args, **kwargs):
        if reload(sent.id).status == Status.QUEUED:
            store.claim(sent.id)
            store.transition(sent.id, Status.SENT, reason="accepted by SMTP server", sources=(Status.SENDING,))
            store.claim(claimed.id, job_id=shared_job)
            with eraser.cursor() as cur:  # left open: the row stays locked while the pass runs
                cur.execute("UPDATE notifications SET status = 'cancelled' WHERE seq = %s", (held.seq,))
        return missing_jobs(*args, **kwargs)

    monkeypatch.setattr(reconciler, "_missing_jobs", others_get_on_meanwhile)
    try:
        with pg_db.connection_context():
            assert reconcile(settings, redis_conn).requeued == 2
            assert _queued_ids(redis_conn) == [queues.job_id_for(lost.id)]
            scheduled = Queue(queues.QUEUE_NAMES["default"], connection=redis_conn).scheduled_job_registry
            assert scheduled.get_job_ids() == [queues.job_id_for(retry.id)]
            for row in (lost, retry):
                assert [e.reason for e in reload(row.id).events].count(reconciler.REQUEUED_REASON) == 1
            for row in (sent, claimed, held):
                assert reconciler.REQUEUED_REASON not in [e.reason for e in reload(row.id).events]
            assert (reload(claimed.id).status, reload(claimed.id).job_id) == (Status.SENDING, shared_job)
        eraser.rollback()  # the erasure gave up (InFlight, say): the row is still owed
        with pg_db.connection_context():
            assert reconcile(settings, redis_conn).requeued == 1
            assert _queued_ids(redis_conn) == [queues.job_id_for(lost.id), queues.job_id_for(held.id)]
            assert [e.reason for e in reload(held.id).events].count(reconciler.REQUEUED_REASON) == 1
    finally:
        eraser.close()


def test_a_page_of_retries_some_due_and_some_not_is_requeued_whole(owner, settings, fake_redis):
    # A retry whose next attempt is an hour off goes to RQ's scheduled registry (enqueue_at), one that is
    # due to its queue (enqueue). On one pipeline RQ's enqueue starts a MULTI, which redis-py refuses
    # once commands are queued: a page with a scheduled retry before a due one raised RedisError every
    # pass, after clearing their job_ids, and neither was ever sent.
    settings = replace(settings, retry_intervals=(5, 3600))
    later, due = (make_notification(owner, status=Status.RETRYING, to=f"r{n}@example.com") for n in range(2))
    _age(later, 60, attempts=2)
    _age(due, 60, attempts=1)
    assert reconcile(settings, fake_redis).requeued == 2
    assert _queued_ids(fake_redis) == [queues.job_id_for(due.id)]
    scheduled = Queue(queues.QUEUE_NAMES["default"], connection=fake_redis).scheduled_job_registry
    assert scheduled.get_job_ids() == [queues.job_id_for(later.id)]


def test_a_requeued_row_erased_before_its_history_line_does_not_fail_the_pass(owner, settings, fake_redis,
                                                                              monkeypatch):
    # Between the job going on its queue and the history line a worker may send the row and an erasure
    # delete it: the line, written for the row as the pass read it, failed on its foreign key, and
    # with it the rest of the pass.
    lost, erased = (make_notification(owner, to=f"u{n}@example.com") for n in range(2))
    for row in (lost, erased):
        _age(row, 60)
    enqueue = queues.enqueue_delivery

    def sent_and_erased_meanwhile(*args, **kwargs):
        Notification.delete().where(Notification.seq == erased.seq).execute()
        return enqueue(*args, **kwargs)

    monkeypatch.setattr(queues, "enqueue_delivery", sent_and_erased_meanwhile)
    assert reconcile(settings, fake_redis).requeued == 2
    assert [e.reason for e in reload(lost.id).events].count(reconciler.REQUEUED_REASON) == 1
