"""A real worker.py through a PostgreSQL that goes silent (tests/cutproxy.py): it takes no job while the
database is away, uses up no retry, says so once, and sends every notification once it answers."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import psycopg2
import pytest
from peewee import OperationalError
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus, get_current_job

from notifier import jobs, queues
from notifier.db import bind
from notifier.jobs import Deliverer
from notifier.mail import SmtpMailer
from notifier.models import Status
from notifier.outage import DatabaseOutage, database_answers
from notifier.runtime import make_renderer
from tests.helpers import held_reply, make_notification, reload
from tests.processes import wait_until

pytestmark = pytest.mark.integration

# Longer than the retries' intervals below: a worker that went on taking jobs would have used them all up.
RETRIES_WOULD_BE_USED_UP_SECONDS = 3


@pytest.fixture
def outage_stack(stacks, pg_settings, proxy):
    """A worker whose PostgreSQL is behind the proxy (the test's own connections are not); retries after
    1 s, twice."""
    settings = replace(pg_settings, retry_intervals=(1, 1),
                       database_url=proxy.url(pg_settings.database_url.rsplit("/", 1)[1]))
    return stacks(settings), settings


def _lines(stack) -> list[dict]:
    return [json.loads(line) for line in stack.log("worker").splitlines() if line.startswith("{")]


def _paused(stack) -> bool:
    return any("takes no job until the database answers" in line["message"] for line in _lines(stack))


def _queue(redis_conn) -> Queue:
    return Queue(queues.QUEUE_NAMES["default"], connection=redis_conn)


def test_a_worker_takes_no_job_while_the_database_is_away_and_sends_each_once_it_answers(
        outage_stack, api_key, redis_conn, smtp, proxy):
    stack, settings = outage_stack
    stack.start("worker")
    proxy.stall()  # silent: no error, no reset, as a network partition
    ids = [make_notification(api_key[0], to=f"user{n}@example.com").id for n in range(5)]
    for notification_id in ids:
        queues.enqueue_delivery(redis_conn, settings, notification_id, "default")
    wait_until(lambda: _paused(stack) or _queue(redis_conn).failed_job_registry.count, timeout=20)
    time.sleep(RETRIES_WOULD_BE_USED_UP_SECONDS)

    # Before, each job failed at once, logged an ERROR, and was retried until its retries ran out.
    assert _queue(redis_conn).failed_job_registry.count == 0
    jobs = [Job.fetch(queues.job_id_for(i), connection=redis_conn) for i in ids]
    assert [(job.get_status(), job.retries_left) for job in jobs] == [(JobStatus.QUEUED, 2)] * 5
    assert sorted(_queue(redis_conn).job_ids) == sorted(job.id for job in jobs)  # in the queue, untouched
    assert [w.get_state() for w in Worker.all(connection=redis_conn)] == ["suspended"]  # alive, and says why
    lines = _lines(stack)
    assert [line for line in lines if line["level"] == "ERROR"] == []
    assert [line["level"] for line in lines if "database is not available" in line["message"]] == ["WARNING"]
    assert smtp.messages == []

    proxy.resume()
    wait_until(lambda: all(reload(i).status == Status.SENT for i in ids), timeout=20, interval=0.2)
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == [f"user{n}@example.com" for n in range(5)]
    assert {reload(i).attempts for i in ids} == {1}
    assert any(line["level"] == "INFO" and "the database answers again after" in line["message"]
               for line in _lines(stack))
    assert [line for line in _lines(stack) if line["level"] == "ERROR"] == []


def test_a_job_whose_email_went_out_as_the_database_went_away_goes_back_as_it_was_and_is_recorded_once(
        outage_stack, api_key, redis_conn, smtp, proxy):
    stack, settings = outage_stack
    stack.start("worker")
    mid_data, away = held_reply(smtp)
    notification_id = make_notification(api_key[0], to="user1@example.com").id
    queues.enqueue_delivery(redis_conn, settings, notification_id, "default")
    assert mid_data.wait(15)
    proxy.stall()
    away.set()  # the server takes the email; its `sent` record waits for the database, then gives up
    wait_until(lambda: _paused(stack) or _queue(redis_conn).failed_job_registry.count, timeout=25)
    time.sleep(RETRIES_WOULD_BE_USED_UP_SECONDS)

    job = Job.fetch(queues.job_id_for(notification_id), connection=redis_conn)
    assert (job.get_status(), job.retries_left) == (JobStatus.QUEUED, 2)  # back as it was, not a retry
    assert _queue(redis_conn).failed_job_registry.count == 0

    proxy.resume()
    detail = wait_until(lambda: (n := reload(notification_id)).status == Status.SENT and n, timeout=20,
                        interval=0.2)
    assert detail.attempts == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["user1@example.com"]]  # recorded from its receipt, not sent again
    assert _queue(redis_conn).failed_job_registry.count == 0


def _shared_job_meeting_the_outage(stack, settings, api_key, redis_conn, smtp, proxy) -> tuple[str, list[str]]:
    """A worker's shared job of three emails, the database stalled while the second is at DATA; then
    the second goes out, and its `sent` record (and the third's claim) wait for the database."""
    stack.start("worker")
    mid_data, away = held_reply(smtp, n=2)
    ids = [make_notification(api_key[0], to=f"user{n}@example.com").id for n in range(3)]
    job_id = queues.new_shared_job_id()
    queues.enqueue_shared(redis_conn, settings, job_id, ids, "default")
    assert mid_data.wait(15)
    proxy.stall()
    away.set()
    return job_id, ids


def test_a_shared_job_that_meets_the_database_away_goes_back_whole_and_sends_each_email_once(
        outage_stack, api_key, redis_conn, smtp, proxy):
    # Before, the shared job ended on its ERROR ("a shared job stopped"), the worker went on to the next
    # job, and what it had not sent waited for the reconciler.
    stack, settings = outage_stack
    job_id, ids = _shared_job_meeting_the_outage(stack, settings, api_key, redis_conn, smtp, proxy)
    wait_until(lambda: _paused(stack) or "a shared job stopped" in stack.log("worker"), timeout=25)
    job = Job.fetch(job_id, connection=redis_conn)
    wait_until(lambda: job.get_status(refresh=True) != JobStatus.STARTED, timeout=10)  # the job has ended

    assert job.get_status() == JobStatus.QUEUED
    assert _queue(redis_conn).job_ids == [job_id]
    proxy.resume()
    wait_until(lambda: all(reload(i).status == Status.SENT for i in ids), timeout=20, interval=0.2)
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == [f"user{n}@example.com" for n in range(3)]
    assert {reload(i).attempts for i in ids} == {1}
    assert [line for line in _lines(stack) if line["level"] == "ERROR"] == []


def test_a_worker_waiting_for_the_database_stops_on_sigterm_and_leaves_the_job_queued(
        outage_stack, api_key, redis_conn, smtp, proxy):
    stack, settings = outage_stack
    stack.start("worker")
    proxy.stall()
    notification_id = make_notification(api_key[0]).id
    queues.enqueue_delivery(redis_conn, settings, notification_id, "default")
    wait_until(lambda: _paused(stack), timeout=20)
    assert stack.stop("worker") == 0
    assert Worker.all(connection=redis_conn) == []  # said goodbye to RQ: not left for its TTL to expire
    job = Job.fetch(queues.job_id_for(notification_id), connection=redis_conn)
    assert (job.get_status(), job.retries_left) == (JobStatus.QUEUED, 2)
    assert _queue(redis_conn).job_ids == [job.id]  # for the next worker


def deadlocked() -> None:
    """A job that fails as a deadlock or a statement timeout does: on a database that answers."""
    raise OperationalError("deadlock detected")


def test_a_job_that_fails_on_a_database_that_answers_uses_a_retry_as_before(pg_settings, pg_db, redis_conn):
    from worker import make_worker

    job = _queue(redis_conn).enqueue(deadlocked, retry=Retry(max=1))
    outage = DatabaseOutage(lambda: database_answers(pg_settings.database_connect_timeout))
    make_worker(redis_conn, outage=outage).work(burst=True, with_scheduler=False)
    job.refresh()
    assert (job.get_status(), job.retries_left) == (JobStatus.FAILED, 0)  # tried twice: no pause, no put-back
    assert outage.since is None


def test_a_periodic_job_still_waiting_in_its_queue_is_not_queued_again(pg_settings, pg_db, redis_conn):
    # While the database is away every worker waits and takes no job, and rq-scheduler went on pushing
    # each periodic job onto its queue whenever it came due: after an hour away, 120 reconciler passes
    # and 120 of the digests' on the high queue, run one after another ahead of the mail.
    from rq_scheduler import Scheduler

    from scheduler import NotifierScheduler, periodic_jobs

    poll = NotifierScheduler(pg_settings, connection=redis_conn, interval=1)
    poll.register_periodic_jobs()
    poll.enqueue_jobs()  # due at once: each goes to its queue, and no worker takes it
    for job_id, *_ in periodic_jobs(pg_settings):
        redis_conn.zadd(Scheduler.scheduled_jobs_key, {job_id: 0})  # due again
    poll.enqueue_jobs()

    for job_id, _, interval, queue in periodic_jobs(pg_settings):
        assert Queue(queue, connection=redis_conn).job_ids.count(job_id) == 1
        assert redis_conn.zscore(Scheduler.scheduled_jobs_key, job_id) > time.time() + interval - 5  # next pass


RUNS_KEY = "test:outage:runs"


def away_and_counted() -> None:
    """A job that fails as the database away does, counting its runs."""
    get_current_job().connection.incr(RUNS_KEY)
    raise OperationalError("server closed the connection unexpectedly")


def test_a_job_asked_to_stop_is_not_put_back_by_the_outage(pg_settings, pg_db, redis_conn):
    # RQ's stop-job command on a SimpleWorker only notes the job (it cannot cut it off): RQ then marks it
    # `stopped` as it fails, and never runs it again. Put back for the outage, it ran again.
    from worker import make_worker

    job = _queue(redis_conn).enqueue(away_and_counted, retry=Retry(max=1))
    asked = []
    outage = DatabaseOutage(lambda: bool(asked.append(1)) or len(asked) > 1, first_ask=0)
    worker = make_worker(redis_conn, outage=outage)
    worker._stopped_job_id = job.id  # what the command leaves (rq.command.handle_stop_job_command)
    worker.work(burst=True, with_scheduler=False)
    job.refresh()
    assert job.get_status() == JobStatus.STOPPED
    assert int(redis_conn.get(RUNS_KEY)) == 1


def test_a_shared_job_put_back_leaves_an_email_it_had_left_retrying_to_its_retry(stacks, pg_settings, proxy, api_key,
                                                                                redis_conn, smtp):
    # The first run of a batch's shared job had one email refused for now (451): `retrying`, its retry
    # job due RETRY_INTERVALS later. Put back whole for the outage, the job ran again as soon as the
    # database answered and sent that email at once, its retry interval not waited and one of its
    # attempts spent: a greylisting server asks for the wait, and a flapping database took an attempt
    # each time.
    settings = replace(pg_settings, retry_intervals=(60, 60),
                       database_url=proxy.url(pg_settings.database_url.rsplit("/", 1)[1]))
    stack = stacks(settings)
    smtp.replies.append("451 4.7.1 try again later")  # the first email's DATA
    job_id, ids = _shared_job_meeting_the_outage(stack, settings, api_key, redis_conn, smtp, proxy)
    wait_until(lambda: _paused(stack), timeout=25)
    proxy.resume()
    wait_until(lambda: all(reload(i).status == Status.SENT for i in ids[1:]), timeout=20, interval=0.2)
    wait_until(lambda: Job.fetch(job_id, connection=redis_conn).get_status() == JobStatus.FINISHED, timeout=10)

    first = reload(ids[0])
    assert (first.status, first.attempts) == (Status.RETRYING, 1)  # its retry job sends it, when due
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == ["user1@example.com", "user2@example.com"]
    retry = Job.fetch(queues.job_id_for(ids[0]), connection=redis_conn)
    assert retry.get_status() == JobStatus.SCHEDULED


def test_a_shared_job_that_fails_on_a_database_that_answers_ends_and_leaves_the_rest_to_the_reconciler(
        pg_settings, pg_db, pg_url, redis_conn, smtp, api_key):
    # A statement timeout is no outage: in a worker that waits for the database too, the shared job is
    # not put back whole (the README said it was); it ends, and the reconciler hands on what it had not sent.
    from worker import make_worker

    db = bind(pg_settings.database_url, statement_timeout=0.5)
    ids = [make_notification(api_key[0], to=f"user{n}@example.com").id for n in range(3)]
    outage = DatabaseOutage(lambda: database_answers(pg_settings.database_connect_timeout))
    mailer = SmtpMailer(pg_settings)
    jobs.install(Deliverer(pg_settings, mailer, make_renderer(pg_settings), redis_conn, outage=outage))
    locker = psycopg2.connect(pg_url)  # another session holds the second row: its claim times out
    try:
        with locker.cursor() as cur:
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (ids[1],))
        job_id = queues.new_shared_job_id()
        queues.enqueue_shared(redis_conn, pg_settings, job_id, ids, "default")
        make_worker(redis_conn, outage=outage).work(burst=True, with_scheduler=False)
    finally:
        locker.rollback()
        locker.close()
        jobs.install(None)
        mailer.close()
    try:
        assert Job.fetch(job_id, connection=redis_conn).get_status() == JobStatus.FINISHED  # not put back
        assert _queue(redis_conn).job_ids == []
        assert outage.since is None  # no pause
        assert [reload(i).status for i in ids] == [Status.SENT, Status.QUEUED, Status.QUEUED]
    finally:
        db.close_all()
