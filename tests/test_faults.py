"""Faults, with real processes: every accepted notification ends final, with the right number of emails.

Each test kills or cuts off one real part (a worker, Redis, the SMTP server, PostgreSQL's connections)
and then checks the final status of every notification and exactly what the SMTP server received.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from datetime import timedelta

import psycopg2
import pytest
from redis import Redis
from redis import exceptions as redis_exceptions
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq_scheduler import Scheduler

from app import create_app
from bench.procs import children
from notifier import queues, receipts, reconciler
from notifier.db import bind, database
from notifier.devmail import CaptureHandler, start
from notifier.models import Notification, SchemaVersion, Status, utcnow
from notifier.queues import QUEUE_NAMES, release_job_id_for
from notifier.ratelimit import Limiter, parse_rate
from notifier.runtime import warn_about_redis_eviction
from notifier.schema import SCHEMA_VERSION, upgrade
from notifier.tally import Tally
from tests.conftest import PG_ADMIN_URL
from tests.helpers import LITERAL, drop_connections, held_reply, installed_deliverer, run_worker_until_idle
from tests.operators import collect_metrics, value
from tests.processes import (
    Stack,
    cli,
    env_for,
    expire_killed_worker,
    free_port,
    request,
    spawn,
    wait_jobs_settled,
    wait_reconciler_passes,
    wait_until,
)

pytestmark = pytest.mark.integration

# Short clocks, so recovery happens within a test's patience.
FAST = {"RECONCILE_INTERVAL": 1, "RECONCILE_GRACE_SECONDS": 1, "SENDING_TIMEOUT": 2}


@pytest.fixture
def make_stack(stacks, pg_settings):
    def make(settings=None, **env) -> Stack:
        return stacks(settings or replace(pg_settings, retry_intervals=(1, 1, 1)), **(FAST | env))

    return make


def _to(n: int) -> dict:
    return {**LITERAL, "to": f"user{n}@example.com"}


def _recipients(handler: CaptureHandler) -> list[str]:
    return sorted(m.rcpt_tos[0] for m in handler.messages)


def test_worker_sigkill_mid_send_is_recovered_and_sent_once(make_stack, smtp, redis_conn):
    stack = make_stack().start("api", "worker", "scheduler")
    mid_data, killed = held_reply(smtp)
    notification_id = stack.send(_to(1))
    assert mid_data.wait(15)
    worker = stack.procs["worker"].pid
    stack.stop("worker", signal.SIGKILL)  # mid-DATA: the server never answered, so it keeps nothing
    killed.set()
    time.sleep(2.5)  # past SENDING_TIMEOUT
    cli(["reconcile"], stack.env)
    assert stack.get(notification_id)["status"] == "sending"  # its worker's RQ key says it may be at it
    expire_killed_worker(redis_conn, worker)
    stack.start("worker2")

    detail = stack.wait_status(notification_id, "sent", timeout=40)
    assert detail["attempts"] == 2
    assert any("worker was lost mid-send" in (e["reason"] or "") for e in detail["history"])
    assert _recipients(smtp) == ["user1@example.com"]
    # The operator sees it too: the one reconciler action that may have sent a message twice.
    assert value(collect_metrics(redis_conn), "notifier_reconciler_actions_total", action="recovered") == 1


def test_worker_sigkill_after_the_servers_250_is_recorded_sent_from_its_receipt_not_sent_again(
        make_stack, pg_settings, smtp, redis_conn):
    # Killed between the server's 250 and the `sent` record (a few milliseconds; held open here by a
    # lock on the row), the worker left the notification `sending` with nothing to say the server
    # had it: the reconciler recovered it and it went out twice (8 of 10 kills in a soak's drain).
    stack = make_stack().start("api", "worker")
    locker = psycopg2.connect(pg_settings.database_url)

    def lock_the_row():  # as the server answers: the worker's record waits for it
        with locker.cursor() as cur:
            cur.execute("SELECT 1 FROM notifications WHERE status = 'sending' FOR UPDATE")

    smtp.before_reply = lock_the_row
    try:
        notification_id = stack.send(_to(1))
        wait_until(lambda: receipts.find(redis_conn, [notification_id]))
        with locker.cursor() as cur:
            wait_until(lambda: cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()") or cur.fetchone()[0])
            stack.stop("worker", signal.SIGKILL)
            # The machine is gone with it: so is the record its connection was waiting to make.
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()")
    finally:
        smtp.before_reply = None
        locker.close()
    assert stack.get(notification_id)["status"] == "sending"
    time.sleep(2.5)  # past SENDING_TIMEOUT

    cli(["reconcile"], stack.env)  # its worker's RQ key still says it may be at it: the receipt says done

    detail = stack.get(notification_id)
    assert (detail["status"], detail["attempts"]) == ("sent", 1), _reasons(detail)
    assert _reasons(detail)[-1] == receipts.LATE_REASON
    assert _recipients(smtp) == ["user1@example.com"]
    samples = collect_metrics(redis_conn)
    assert value(samples, "notifier_reconciler_actions_total", action="recorded_late") == 1
    assert value(samples, "notifier_reconciler_actions_total", action="recovered") == 0
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert receipts.find(redis_conn, [notification_id]) == {}


def test_a_send_slower_than_sending_timeout_is_left_to_its_live_worker_and_sent_once(make_stack, smtp, redis_conn):
    # SENDING_TIMEOUT (2 s) below the time the server takes to answer DATA (4 s), as when an operator
    # sets it below JOB_TIMEOUT: the reconciler (every second) finds the row `sending` past it while
    # its worker, alive, is still waiting for the answer. Taking it back then sent the email twice.
    # Two workers: the reconciler's job runs on a worker too, the one not sending.
    stack = make_stack().start("api", "worker", "worker2", "scheduler")
    smtp.delay = 4.0
    notification_id = stack.send(_to(1))
    stack.wait_status(notification_id, "sent", "failed", timeout=60)
    # Two whole passes since: one that took it back mid-send has counted it, and left its history line.
    wait_reconciler_passes(redis_conn, 2)
    detail = stack.get(notification_id)
    assert _recipients(smtp) == ["user1@example.com"]
    assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert not any(r.startswith("recovered:") for r in _reasons(detail)), _reasons(detail)
    assert value(collect_metrics(redis_conn), "notifier_reconciler_actions_total", action="recovered") == 0


def test_a_slow_send_whose_redis_restarts_mid_send_is_left_to_its_live_worker_and_sent_once(make_stack, pg_settings,
                                                                                              smtp, redis_conn):
    # Found by a chaos soak: Redis restarted empty (no persistence) while a worker waited for a slow
    # server's answer. RQ's record that the worker lives and runs the job went with it, so the
    # reconciler took the row, `sending` past SENDING_TIMEOUT, for one whose worker was lost: it went
    # out a second time, its history saying the worker was lost. The row was claimed before Redis's
    # memory began (queues.REMEMBERS_SINCE_KEY): it is left until its job's time limit has passed.
    stack = make_stack().start("api", "worker")
    arrived, release = held_reply(smtp)
    notification_id = stack.send(_to(1))
    assert arrived.wait(20)
    redis_conn.flushdb()  # what a restart without persistence leaves
    time.sleep(2.5)  # past SENDING_TIMEOUT (2 s) since the claim
    settings = replace(pg_settings, sending_timeout=2)
    try:
        report = reconciler.reconcile(settings, redis_conn)
    finally:
        release.set()
    assert report.recovered == 0
    detail = stack.wait_status(notification_id, "sent", "failed", timeout=30)
    assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert _recipients(smtp) == ["user1@example.com"]
    # Once the job's limit (JOB_TIMEOUT) and the minute a killed worker's key outlives it have passed,
    # a row still `sending` is taken back as before: no live worker can be at it any more.
    stuck = stack.send(_to(2))
    stack.wait_status(stuck, "sent", timeout=30)
    Notification.update(status=Status.SENDING.value).where(Notification.id == stuck).execute()
    later = utcnow() + timedelta(seconds=pg_settings.job_timeout + 61)
    redis_conn.flushdb()
    assert reconciler.reconcile(settings, redis_conn, now=later).recovered == 1


def test_a_slow_send_of_a_shared_job_that_outlived_a_redis_restart_is_left_to_its_live_worker_and_sent_once(
        make_stack, pg_settings, smtp, redis_conn):
    # A batch's shared job claims its emails one at a time, long after it started. Redis restarted
    # empty while it ran: what showed the job running went with it (a job inside SimpleWorker sends no
    # heartbeat; its keep-alive only renews keys), and an email it claimed after Redis's memory began
    # looked claimed by a lost worker once past SENDING_TIMEOUT: taken back mid-send, sent twice.
    stack = make_stack().start("api", "worker")
    first, let_first_go = held_reply(smtp)
    status, body = request("POST", f"{stack.base}/api/notifications/batch", stack.key,
                           {"notifications": [_to(1), _to(2)]})
    assert status == 202, body
    ids = [r["id"] for r in body["results"]]
    assert first.wait(20)
    redis_conn.flushdb()  # what a restart without persistence leaves, while the job is at its first email
    settings = replace(pg_settings, sending_timeout=2)
    time.sleep(2.5)
    second, let_second_go = held_reply(smtp)  # in place before the first's answer lets the job go on
    try:
        # The first, claimed before Redis's memory began, is left; the pass notes when that began.
        assert reconciler.reconcile(settings, redis_conn).recovered == 0
        let_first_go.set()
        assert second.wait(20)  # the second, claimed after, is mid-DATA
        time.sleep(2.5)  # past SENDING_TIMEOUT since its claim
        report = reconciler.reconcile(settings, redis_conn)
    finally:
        let_first_go.set()
        let_second_go.set()
    assert report.recovered == 0
    for notification_id in ids:
        detail = stack.wait_status(notification_id, "sent", "failed", timeout=30)
        assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com"]


def test_the_job_limit_landing_while_the_sent_record_waits_on_a_table_lock_sends_once(make_stack, pg_settings, smtp,
                                                                                        monkeypatch, redis_conn):
    # A migration (or VACUUM FULL) holds the table as the server answers 250: the worker's first `sent`
    # record on its connection waits in its PREPARE, and RQ's limit (one SIGALRM) raises as that
    # returns, before the UPDATE. The email stayed `sending`, was recovered and went out again.
    stack = make_stack(JOB_TIMEOUT=2).start("api", "worker")
    locked = threading.Event()

    def migrate():
        with psycopg2.connect(pg_settings.database_url) as conn, conn.cursor() as cur:
            cur.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
            locked.set()
            time.sleep(3.5)  # past the job's 2 s limit

    original = smtp.handle_DATA

    async def answer_as_the_lock_is_taken(server, session, envelope):
        reply = await original(server, session, envelope)
        threading.Thread(target=migrate, daemon=True).start()
        await asyncio.get_running_loop().run_in_executor(None, locked.wait)
        return reply

    monkeypatch.setattr(smtp, "handle_DATA", answer_as_the_lock_is_taken)
    notification_id = stack.send(_to(1))
    detail = stack.wait_status(notification_id, "sent", timeout=20)
    monkeypatch.setattr(smtp, "handle_DATA", original)
    stack.start("scheduler")
    # Its claim is older than SENDING_TIMEOUT (2 s) already: the table was held 3.5 s after it. So a
    # pass from now on recovers it if any would; two, for one that overlapped the scheduler's start.
    wait_reconciler_passes(redis_conn, 2)
    detail = stack.get(notification_id)
    assert (detail["status"], detail["attempts"]) == ("sent", 1), _reasons(detail)
    assert _recipients(smtp) == ["user1@example.com"]


def test_worker_sigterm_finishes_the_send_and_loses_nothing(make_stack, smtp):
    stack = make_stack().start("api", "worker")
    mid_data, stopping = held_reply(smtp)
    first = stack.send(_to(1))
    assert mid_data.wait(15)
    later = [stack.send(_to(n)) for n in (2, 3)]
    worker = stack.procs.pop("worker")
    worker.send_signal(signal.SIGTERM)  # once: a second one is a cold shutdown
    stopping.set()
    assert worker.wait(timeout=30) == 0
    assert stack.get(first)["status"] == "sent"
    stack.start("worker2")
    for notification_id in later:
        stack.wait_status(notification_id, "sent")
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com", "user3@example.com"]


def test_a_release_job_abandoned_by_a_killed_worker_leaves_the_failed_registry_after_the_dead_letter_ttl(
        make_stack, pg_settings, redis_conn):
    stack = make_stack(DEAD_LETTER_TTL_DAYS=3).start("api")
    notification_id = stack.send({**_to(1), "delay_seconds": 1})
    release_id = release_job_id_for(notification_id)
    scheduler = Scheduler(connection=redis_conn)
    (job,) = scheduler.get_jobs()
    locker = psycopg2.connect(pg_settings.database_url)
    try:
        with locker.cursor() as cur:  # the release waits for the row, so the worker dies inside it
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (notification_id,))
        time.sleep(2)  # past its send time: a release woken early only schedules itself again
        scheduler.enqueue_job(job)  # moved onto its queue as rq-scheduler moves it
        stack.start("worker")
        wait_until(lambda: Job.fetch(release_id, connection=redis_conn).get_status() == JobStatus.STARTED)
        stack.stop("worker", signal.SIGKILL)
    finally:
        locker.close()
    queue = Queue(QUEUE_NAMES["default"], connection=redis_conn)  # the release's queue is its send's

    # RQ's maintenance, as it runs once the dead worker's heartbeat has long run out.
    queue.started_job_registry.cleanup(timestamp=time.time() + 86400)

    expires = redis_conn.zscore(queue.failed_job_registry.key, release_id)
    assert expires is not None, "the abandoned release job is not in the failed registry"
    assert abs(expires - (time.time() + 3 * 86400)) < 60, f"kept {(expires - time.time()) / 86400:.0f} days"


def test_redis_flushed_with_work_queued_retrying_and_scheduled(make_stack, smtp, redis_conn):
    stack = make_stack(RETRY_INTERVALS="3,3").start("api", "worker")
    smtp.replies.append("451 4.3.0 busy")
    retrying = stack.send(_to(1))
    stack.wait_status(retrying, "retrying")
    stack.stop("worker")
    queued = [stack.send(_to(n)) for n in (2, 3)]
    scheduled = stack.send({**_to(4), "delay_seconds": 2})
    assert stack.get(scheduled)["status"] == "scheduled"

    redis_conn.flushdb()  # Redis restarted empty: every job, retry and schedule is gone

    stack.start("worker2", "scheduler")
    for notification_id in [retrying, *queued, scheduled]:
        stack.wait_status(notification_id, "sent", timeout=40)
    assert _recipients(smtp) == [f"user{n}@example.com" for n in (1, 2, 3, 4)]


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server this test may stop and start again (empty, like a restart without disk)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed"
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    state = {"proc": None}

    def up():
        state["proc"] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(lambda: _pings(port), timeout=10)

    def down():
        state["proc"].kill()
        state["proc"].wait()

    def hang(hung: bool):  # a stopped process: connections stay open, nothing answers
        state["proc"].send_signal(signal.SIGSTOP if hung else signal.SIGCONT)

    up()
    own = _OwnRedis(f"redis://127.0.0.1:{port}/0", up, down)
    own.hang = hang
    yield own
    if state["proc"].poll() is None:
        hang(False)
        down()


class _OwnRedis(tuple):
    """(url, up, down), and hang(True/False) beside them."""

    def __new__(cls, *parts):
        return super().__new__(cls, parts)


def _pings(port: int) -> bool:
    try:
        return Redis(port=port, socket_connect_timeout=0.2).ping()
    except Exception:  # noqa: BLE001
        return False


def test_redis_down_at_request_time_then_back(make_stack, pg_settings, smtp, own_redis):
    url, up, down = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url, retry_intervals=(1, 1))).start("api", "worker", "scheduler")
    before = stack.send(_to(1))
    stack.wait_status(before, "sent")

    down()
    during = [stack.send(_to(n)) for n in (2, 3)]  # accepted: stored, to be queued when Redis returns
    assert all(stack.get(n)["status"] == "queued" for n in during)
    time.sleep(1)
    up()  # back, but empty

    for notification_id in during:
        stack.wait_status(notification_id, "sent", timeout=45)
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com", "user3@example.com"]
    assert "Traceback" not in stack.log("scheduler").split("Redis is back")[-1]


def test_a_retry_due_after_redis_restarts_empty_under_an_idle_worker_fires_on_time(
        make_stack, pg_settings, smtp, own_redis):
    # RQ's scheduler (the one that fires retries) is a child of the worker, and it dies with the
    # connection when Redis goes away; the worker itself waits Redis out in its dequeue loop and
    # only looked for a dead scheduler at its maintenance, every 10 minutes. Meanwhile every retry
    # the reconciler put back (and every new one) waited in RQ's scheduled registry.
    url, up, down = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url, retry_intervals=(5, 5))).start("api", "worker", "scheduler")
    smtp.replies.append("451 4.3.0 busy")
    notification_id = stack.send(_to(1))
    stack.wait_status(notification_id, "retrying")
    worker = stack.procs["worker"].pid
    wait_until(lambda: _waiting_for_a_job(stack, worker) and children(worker, live=True), interval=0.02)
    down()
    wait_until(lambda: not children(worker, live=True), interval=0.05)  # its scheduler died with the connection
    up()  # back, but empty: the reconciler puts the retry back, due 5 s after the failed attempt

    stack.wait_status(notification_id, "sent", timeout=30)
    assert _recipients(smtp) == ["user1@example.com"]
    # RQ's scheduler logs why it died, then re-raises: multiprocessing wrote the traceback a second
    # time, raw, to stderr ("Process Scheduler:"), plain text among the JSON lines and past the masks.
    assert [line for line in stack.log("worker").splitlines() if not _is_json(line)] == []


def test_workers_and_the_scheduler_carry_on_within_5_s_of_redis_answering_after_a_long_outage(
        make_stack, pg_settings, smtp, own_redis):
    # A chaos soak (bench/redischaos.py) found them idle 7 s after Redis answered again, after an outage
    # of 8 s: RQ's dequeue loop waited Redis out with a backoff growing to 60 s, and run_until_stopped
    # with one growing to 10 s. Meanwhile nothing was sent, no retry fired (RQ's scheduler, which the
    # worker starts again) and nothing was released (scheduler.py's poll and its reconciler).
    from scheduler import RECONCILE_JOB_ID

    url, up, down = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url)).start("api", "worker", "scheduler")
    stack.wait_status(stack.send(_to(1)), "sent")
    redis = Redis.from_url(url)
    wait_until(lambda: redis.exists("rq:scheduler-lock:notifier.high", f"rq:job:{RECONCILE_JOB_ID}") == 2)
    down()
    time.sleep(20)  # either backoff is past 8 s by now
    up()  # back, but empty
    answered = time.monotonic()

    wait_until(lambda: redis.exists(f"rq:job:{RECONCILE_JOB_ID}"), timeout=30, interval=0.05)
    scheduler_back = time.monotonic() - answered  # scheduler.py registered its periodic jobs again
    wait_until(lambda: redis.exists("rq:scheduler-lock:notifier.high"), timeout=60, interval=0.05)
    worker_back = time.monotonic() - answered  # the worker started RQ's scheduler again
    assert (scheduler_back < 3, worker_back < 5.5) == (True, True), (scheduler_back, worker_back)
    stack.wait_status(stack.send(_to(2)), "sent", timeout=10)


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _waiting_for_a_job(stack: Stack, pid: int) -> bool:
    """Whether the RQ worker of pid is back in its loop that waits for a job (its state in RQ: idle)."""
    redis = Redis.from_url(stack.env["REDIS_URL"])
    try:
        return any(worker.pid == pid and worker.get_state() == "idle" for worker in Worker.all(connection=redis))
    finally:
        redis.close()


def test_a_scheduler_that_died_under_an_idle_worker_is_started_again(make_stack, pg_settings, smtp):
    # RQ's scheduler (it fires retries) dead while its worker waits for a job, as after a Redis outage
    # of 3 to 6 s: the worker's look at it (keep_scheduler, at most every 5 s) came just before Redis
    # answered again, and the worker then waited for a job. It looks only at its heartbeats, and an
    # idle RQ worker sends one per wait for a job, every 405 s.
    stack = make_stack(replace(pg_settings, retry_intervals=(8, 8))).start("api", "worker")
    worker = stack.procs["worker"].pid
    smtp.replies.append("451 4.3.0 busy")
    notification_id = stack.send(_to(1))
    stack.wait_status(notification_id, "retrying")  # its retry waits 8 s in RQ's scheduled registry
    (scheduler,) = wait_until(lambda: children(worker, live=True), timeout=10)
    wait_until(lambda: _waiting_for_a_job(stack, worker), interval=0.02)
    os.kill(scheduler, signal.SIGKILL)

    stack.wait_status(notification_id, "sent", timeout=30)
    assert _recipients(smtp) == ["user1@example.com"]


def test_a_burst_worker_with_the_scheduler_starts_no_scheduler_process(redis_conn, monkeypatch):
    # `rq worker --burst --with-scheduler`: RQ moves what is due once and starts no scheduler process;
    # the heartbeat's keep_scheduler took that for a dead one and started one for the run.
    from rq.scheduler import RQScheduler

    from worker import make_worker

    started = []
    monkeypatch.setattr(RQScheduler, "start", lambda scheduler: started.append(scheduler))
    make_worker(redis_conn, name="burst").work(burst=True, with_scheduler=True)
    assert started == []


def test_the_thread_that_hears_a_workers_commands_waits_out_a_redis_that_does_not_answer(redis_conn, caplog):
    # In a partition (Redis silent: nothing refused, nothing reset) the thread's reconnect timed out;
    # RQ waits out a ConnectionError there, but redis-py's TimeoutError is none, so the thread died
    # with a traceback on stderr, and the worker heard no shutdown or stop-job command again.
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from rq.command import send_command

    from worker import make_worker

    caplog.set_level("INFO", logger="rq.worker")
    worker = make_worker(redis_conn, name="partitioned")
    worker.subscribe()
    try:
        try:
            raise RedisTimeoutError("Timeout connecting to server")
        except RedisTimeoutError as exc:  # as the thread calls it
            worker.pubsub_thread.exception_handler(exc, worker.pubsub, worker.pubsub_thread)
        assert worker.pubsub_thread.is_alive()
        send_command(redis_conn, worker.name, "stop-job", job_id="none-such")
        assert wait_until(lambda: "Not working on job none-such" in caplog.text, timeout=10)  # it still hears them
    finally:
        worker.unsubscribe()


def test_smtp_server_down_for_a_while_then_up(make_stack, pg_settings):
    handler = CaptureHandler()
    port = free_port()
    settings = replace(pg_settings, smtp_port=port, retry_intervals=(1, 1, 1, 1, 1))
    stack = make_stack(settings).start("api", "worker")
    notification_id = stack.send(_to(1))
    detail = stack.wait_status(notification_id, "retrying")
    assert "connection" in detail["last_error"].lower()

    controller = start(handler, port=port)
    try:
        detail = stack.wait_status(notification_id, "sent", timeout=30)
    finally:
        controller.stop()
    assert detail["attempts"] >= 2
    assert _recipients(handler) == ["user1@example.com"]


def test_api_and_worker_reconnect_after_postgresql_drops_them(make_stack, pg_settings, smtp):
    stack = make_stack().start("api", "worker")
    first = stack.send(_to(1))
    stack.wait_status(first, "sent")

    assert drop_connections(pg_settings.database_url.rsplit("/", 1)[1]) >= 2

    def accepted():
        try:
            return stack.send(_to(2))
        except AssertionError:  # a 503 while the pool notices; callers retry, and so do we
            return None

    second = wait_until(accepted, timeout=15, interval=0.2)
    stack.wait_status(second, "sent", timeout=30)
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com"]


def test_a_send_while_redis_hangs_is_answered_in_seconds_and_delivered_once_it_answers(make_stack, pg_settings, smtp,
                                                                                       own_redis):
    # A hung Redis (a failover, a stopped process) answers nothing and closes nothing: the rate limit
    # waited 5 s for it and the job's enqueue 10 s more, for each send, holding an API thread each time.
    url, _, _ = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url)).start("api", "worker", "scheduler")
    stack.wait_status(stack.send(_to(1)), "sent")
    own_redis.hang(True)
    started = time.monotonic()
    during = stack.send(_to(2))  # stored, and accepted: queued now or by the reconciler later
    waited = time.monotonic() - started
    own_redis.hang(False)
    assert waited < 8, waited  # 15 s before; 2.5 s now (0.5 for the limit, 2 for the enqueue)
    stack.wait_status(during, "sent", timeout=60)
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com"]


def test_a_worker_sigtermed_as_it_starts_stops_cleanly_and_frees_the_scheduler(make_stack, pg_settings, own_redis,
                                                                               tmp_path):
    # RQ installs its stop handlers only after registering the worker and starting its scheduler, which
    # takes the scheduler's locks. A rolling deploy stopping a worker it had just started killed it in
    # between: it died of the signal, and its registration and the locks outlived it by a minute, so
    # every retry (fired by the scheduler) waited that long. Redis hung holds the worker in that window.
    url, _, _ = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url))
    own_redis.hang(True)
    try:
        worker = spawn(["worker.py"], stack.env, str(tmp_path / "worker.log"))
        wait_until(lambda: "starting" in (tmp_path / "worker.log").read_text(errors="replace"), timeout=30)
        time.sleep(0.3)  # on its way to Redis, which answers nothing
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)
    finally:
        own_redis.hang(False)
    assert worker.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text(errors="replace")
    redis = Redis.from_url(url)
    assert not redis.smembers("rq:workers"), "the worker is still registered"
    assert not list(redis.scan_iter("rq:scheduler-lock:*")), "the scheduler's locks outlived the worker"
    assert "Traceback" not in (tmp_path / "worker.log").read_text(errors="replace")


def _fill(redis: Redis) -> None:
    """Fill Redis (noeviction) until it refuses writes; deleting the `filler:*` keys makes room again."""
    redis.config_set("maxmemory-policy", "noeviction")
    redis.config_set("maxmemory", redis.info("memory")["used_memory"] + 512 * 1024)
    with pytest.raises(redis_exceptions.OutOfMemoryError):
        for n in range(10_000):
            redis.set(f"filler:{n}", "x" * 4096)
    # Full, and kept so: a few KB freed meanwhile (a finished job's result expiring) would otherwise
    # let the next write through. The fillers hold about 512 KB, so deleting them makes room again.
    redis.config_set("maxmemory", redis.info("memory")["used_memory"] - 256 * 1024)


def test_redis_out_of_memory_at_request_time_then_room_again(make_stack, pg_settings, smtp, own_redis):
    url, _, _ = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url)).start("api", "worker", "scheduler")
    before = stack.send(_to(1))
    stack.wait_status(before, "sent")

    redis = Redis.from_url(url)
    _fill(redis)
    during = stack.send(_to(2))  # accepted and stored: Redis refuses its job
    assert stack.get(during)["status"] == "queued"
    # Its job never reached a queue (RQ may have written the job's hash before Redis refused more).
    assert redis.lpos("rq:queue:notifier.default", f"notification-{during}") is None

    for key in redis.scan_iter("filler:*", count=1000):
        redis.delete(key)
    stack.wait_status(during, "sent", timeout=30)  # the reconciler queued it once Redis had room
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com"]


def test_worker_and_scheduler_exit_on_sigterm_even_when_redis_dies_at_the_same_moment(
        make_stack, pg_settings, own_redis):
    # Ctrl-C on a whole stack: before the fix they waited for that Redis forever, and when a new one
    # came up on the same port they took its jobs.
    url, _, down = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url)).start("worker", "scheduler")
    redis = Redis.from_url(url)
    try:  # the worker is registered; the scheduler holds its lock once it is polling
        # A bound, not a speed: a scheduler starting beside a busy machine's other work (a make run's
        # install) once took over the default 20 s to poll.
        wait_until(lambda: redis.exists(Scheduler.scheduler_lock_key), timeout=60, interval=0.02)
    finally:
        redis.close()
    worker, scheduler = stack.procs["worker"], stack.procs["scheduler"]
    down()
    worker.send_signal(signal.SIGTERM)
    scheduler.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) is not None
    assert scheduler.wait(timeout=20) is not None


def test_a_reconnect_inside_a_connection_context_leaves_it_cleanly(pg_settings, pg_db):
    # peewee forgets its open contexts when the connection closes; leaving this one used to raise
    # IndexError after the work inside it was done (a delivery job failed with its email sent).
    with database.connection_context():
        assert database.execute_sql("SELECT 1").fetchone() == (1,)
        assert drop_connections(pg_settings.database_url.rsplit("/", 1)[1]) >= 1
        assert database.execute_sql("SELECT 2").fetchone() == (2,)  # the pool reconnected
        database.close()  # as a job does to give up a connection broken mid-transaction
        assert database.execute_sql("SELECT 3").fetchone() == (3,)
    assert database.is_closed()
    assert not database.obj._in_use  # the connection went back to the pool, none left checked out


def _pool_holding(n: int) -> None:
    """Leave n idle connections in the pool, as n requests served at once leave them."""
    all_in = threading.Barrier(n)

    def request() -> None:
        with database.connection_context():
            database.execute_sql("SELECT 1")
            all_in.wait(10)  # each holds its own connection until all have one

    threads = [threading.Thread(target=request) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


@pytest.mark.parametrize("first", ["send", "get"])
def test_keyed_requests_right_after_postgresql_ends_the_idle_connections_are_answered(client, headers, pg_settings,
                                                                                       first):
    # Found by a chaos soak: pg_terminate_backend on the API's idle connections, then a 503. The
    # pool hands out a connection that came back under a second ago unpinged; the first statement's
    # reconnect drew the next one, as dead, and the request failed. Each took two dead connections.
    sent = client.post("/api/notifications/send", json=_to(1), headers=headers)  # the key cache listens
    assert sent.status_code == 202
    location = sent.headers["Location"]
    _pool_holding(4)
    assert drop_connections(pg_settings.database_url.rsplit("/", 1)[1]) >= 5  # the pool's and the cache's

    def send(n: int, **extra):
        return client.post("/api/notifications/send", json=_to(n), headers={**headers, **extra}).status_code

    def get():
        return client.get(location, headers=headers).status_code

    if first == "send":
        answers = [send(2), get(), send(3, **{"Idempotency-Key": "after-the-drop"}), get()]
        assert answers == [202, 200, 202, 200]
    else:
        answers = [get(), send(2), get(), send(3, **{"Idempotency-Key": "after-the-drop"})]
        assert answers == [200, 202, 200, 202]


def test_a_connection_context_survives_a_close_inside_it_on_sqlite(sqlite_db):
    with database.connection_context():
        database.close()
        assert database.execute_sql("SELECT 1").fetchone() == (1,)
    assert database.is_closed()


@pytest.fixture
def empty_database(pg_settings):
    """A PostgreSQL database with no schema at all, dropped after the test."""
    name = pg_settings.database_url.rsplit("/", 1)[1] + "_empty"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    yield replace(pg_settings, database_url=pg_settings.database_url.rsplit("/", 1)[0] + "/" + name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_processes_creating_the_schema_at_once_all_succeed(empty_database, tmp_path):
    env = env_for(empty_database)
    procs = [spawn(["-m", "notifier", "db", "upgrade"], env, str(tmp_path / f"upgrade{n}.log")) for n in range(4)]
    codes = [proc.wait(timeout=60) for proc in procs]
    assert codes == [0, 0, 0, 0], [(tmp_path / f"upgrade{n}.log").read_text() for n in range(4)]


def test_the_schema_upgrade_survives_a_dropped_connection(empty_database):
    db = bind(empty_database.database_url)
    try:
        db.connect()
        db.execute_sql("SELECT 1")
        db.close()  # back to the pool, where PostgreSQL then drops it
        assert drop_connections(empty_database.database_url.rsplit("/", 1)[1]) >= 1
        assert upgrade(db) == SCHEMA_VERSION
        with db.connection_context():
            assert SchemaVersion.get().version == SCHEMA_VERSION
    finally:
        db.close_all()


def _detail(stack: Stack, notification_id: str) -> dict | None:
    """The notification as the API shows it; None while the API still answers 503 (its pool
    reconnecting after the outage)."""
    status, body = request("GET", f"{stack.base}/api/notifications/{notification_id}", stack.key)
    return body if status == 200 else None


def _accepted(stack: Stack, payload: dict) -> str:
    def send():
        try:
            return stack.send(payload)
        except AssertionError:  # a 503 while the API's pool reconnects; callers retry, and so do we
            return None

    return wait_until(send, timeout=15, interval=0.2)


def _reasons(detail: dict) -> list[str]:
    return [e["reason"] or "" for e in detail["history"]]


def test_an_email_the_server_took_while_postgresql_was_away_for_longer_than_the_worker_waits_is_sent_once(
        make_stack, smtp, redis_conn, database_outage):
    # The failover case: the database goes away mid-send and stays away past the worker's own retries
    # of the `sent` record (0 + 0.5 + 1 + 2 + 4 s). Before sent receipts, recovery sent it again.
    begin, end = database_outage
    stack = make_stack(RETRY_INTERVALS="1").start("api", "worker")  # one retry of the job
    mid_data, away = held_reply(smtp)
    notification_id = stack.send(_to(1))
    assert mid_data.wait(15)
    begin()
    away.set()
    assert len(smtp.wait_for(1, timeout=10)) == 1  # the server took it while the database was away
    # The worker has given up on the `sent` record before the database comes back: the job goes back to
    # its queue as it was (before, it used up its retry, then failed into the dead-letter queue, for
    # the reconciler to find the notification stuck in `sending`), and the worker waits for the database.
    job = f"rq:job:notification-{notification_id}"
    wait_until(lambda: "takes no job until the database answers" in stack.log("worker"), timeout=40, interval=0.2)
    assert (redis_conn.hget(job, "status"), redis_conn.hget(job, "retries_left")) == (b"queued", b"1")
    end()
    failed = Queue("notifier.default", connection=redis_conn).failed_job_registry
    # The dead letters are the notifications the database says failed: this one never was.
    listed = wait_until(lambda: (r := request("GET", f"{stack.base}/api/dead-letters", stack.key))[0] == 200 and r,
                        timeout=15)  # 503 while the API's pool reconnects
    assert listed == (200, {"data": [], "next": None})

    cli(["reconcile"], stack.env)  # SENDING_TIMEOUT is 2 s here: it may record it first, from the receipt
    detail = wait_until(lambda: (d := _detail(stack, notification_id)) and d["status"] != "sending" and d,
                        timeout=30)
    wait_jobs_settled(redis_conn)  # a second send, had anything queued one, is at the server now
    assert failed.get_job_ids() == []  # no failure on show for an email that went out
    assert _recipients(smtp) == ["user1@example.com"]
    detail = _detail(stack, notification_id)
    assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert any("recorded late" in r for r in _reasons(detail)), _reasons(detail)
    assert not any(r.startswith("recovered:") for r in _reasons(detail))
    samples = collect_metrics(redis_conn)
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert value(samples, "notifier_reconciler_actions_total", action="recovered") == 0


def test_periodic_jobs_that_meet_postgresql_away_are_skipped_not_filed_as_failed(pg_settings, pg_db, redis_conn,
                                                                               database_outage, caplog):
    # Each pass of an outage (every RECONCILE_INTERVAL) failed into RQ's failed registry, rq-dashboard's
    # Failed list, for DEAD_LETTER_TTL_DAYS, with nothing there to redo: the next pass does the work.
    begin, end = database_outage
    queue = Queue("notifier.low", connection=redis_conn)
    with installed_deliverer(pg_settings, redis_conn):
        queued = [queue.enqueue(f"notifier.jobs.{name}") for name in ("reconcile", "flush_digests", "purge")]
        begin()
        run_worker_until_idle(redis_conn)
        end()
    assert queue.failed_job_registry.count == 0
    assert all(job.get_status(refresh=True) == JobStatus.FINISHED for job in queued)
    skipped = [r for r in caplog.records if "skipped on a database error (OperationalError: " in r.getMessage()]
    assert [(r.levelname, r.getMessage().split()[2]) for r in skipped] == [
        ("ERROR", "reconcile"), ("ERROR", "flush_digests"), ("ERROR", "purge")]
    # What the database said, first line only: a statement timeout or a deadlock reads as what it is.
    assert all(r.getMessage().split("OperationalError: ", 1)[1].split(")")[0] for r in skipped)


def test_a_batch_email_the_server_took_while_postgresql_was_away_is_recorded_by_the_worker_once_it_answers(
        make_stack, smtp, redis_conn, database_outage):
    # A shared job holds each `sent` record to write with the next claim: the claim is what fails here.
    begin, end = database_outage
    stack = make_stack(RETRY_INTERVALS="1").start("api", "worker")
    mid_data, away = held_reply(smtp)
    status, body = request("POST", f"{stack.base}/api/notifications/batch", stack.key,
                           {"notifications": [_to(1), _to(2)]})
    assert status == 202, body
    first, second = (r["id"] for r in body["results"])
    assert mid_data.wait(15)
    begin()
    away.set()
    assert len(smtp.wait_for(1, timeout=10)) == 1
    # It gave up: the shared job goes back to its queue whole, and the worker waits for the database.
    wait_until(lambda: "takes no job until the database answers" in stack.log("worker"), timeout=40, interval=0.2)
    end()

    # The job runs again once the database answers: it records what it sent first, from its receipt, and
    # sends the one it never reached (before, the job ended there and the reconciler handed that one on).
    stack.wait_status(second, "sent", timeout=30)
    later = _accepted(stack, _to(3))
    stack.wait_status(later, "sent", timeout=30)
    detail = _detail(stack, first)
    assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert any("recorded late" in r for r in _reasons(detail)), _reasons(detail)
    # The shared job that kept the receipt never failed: nothing in rq-dashboard's Failed list.
    assert Queue("notifier.default", connection=redis_conn).failed_job_registry.count == 0
    assert _detail(stack, second)["attempts"] == 1
    wait_jobs_settled(redis_conn)  # a second send of any of them, had one been queued, is at the server now
    assert _recipients(smtp) == ["user1@example.com", "user2@example.com", "user3@example.com"]
    assert value(collect_metrics(redis_conn), "notifier_notifications_sent_total", priority="default",
                 template="-") == 3


def test_a_worker_while_redis_is_out_of_memory_neither_spins_nor_dies_of_a_sigterm(make_stack, pg_settings,
                                                                                  own_redis):
    # An out-of-memory Redis answers PING and refuses every write: RQ's loop ended at once and the
    # worker started it again at once, hundreds of times a second, two lines each. A SIGTERM then met
    # the last loop's RQ handler, which raised StopRequested into the next one's start: exit 1, traceback.
    # Then it waited for a PING, which such a Redis answers: "Redis is back" and "lost Redis" every
    # second, the scheduler's too, for as long as it lasted. Each says it lost Redis once, and why.
    url, _, _ = own_redis
    stack = make_stack(replace(pg_settings, redis_url=url)).start("worker", "scheduler")
    redis = Redis.from_url(url)
    wait_until(lambda: redis.smembers("rq:workers"), timeout=30)
    _fill(redis)
    for name in ("worker", "scheduler"):  # the worker's next heartbeat, 5 s; the scheduler's next poll
        said = f"{name} lost Redis (OutOfMemoryError: command not allowed when used memory"
        wait_until(lambda n=name, said=said: said in stack.log(n), timeout=30)
    time.sleep(4)
    for name in ("worker", "scheduler"):
        assert stack.log(name).count("lost Redis") == 1, stack.log(name)[-3000:]
        assert f"restarting the {name}" not in stack.log(name)
    worker = stack.procs["worker"]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, stack.log("worker")[-3000:]
    assert "Traceback" not in stack.log("worker")


def test_ready_says_redis_is_unavailable_while_it_is_out_of_memory(pg_settings, pg_db, own_redis):
    # It asked for a PING, which a Redis out of memory answers while it refuses every job: ready, "ok".
    url, _, _ = own_redis
    redis = Redis.from_url(url)
    client = create_app(replace(pg_settings, redis_url=url), redis=redis).test_client()
    assert client.get("/api/ready").status_code == 200
    _fill(redis)
    answer = client.get("/api/ready")
    assert answer.status_code == 503
    assert answer.get_json()["error"]["details"] == {"database": "ok", "redis": "unavailable: OutOfMemoryError"}
    for key in redis.scan_iter("filler:*", count=1000):
        redis.delete(key)
    assert client.get("/api/ready").status_code == 200


def test_the_rate_limit_says_once_that_it_lets_requests_through_while_redis_is_out_of_memory(own_redis, caplog):
    # Every request in the 2 s after the first logged its own line, "Redis did not answer just now", of a
    # Redis that had answered at once that it was out of memory.
    url, _, _ = own_redis
    _fill(Redis.from_url(url))
    limiter = Limiter(url)
    assert all(limiter.hit(parse_rate("1/minute"), "key", str(n)).allowed for n in range(5))
    lines = [r.getMessage() for r in caplog.records if "rate limit not enforced" in r.getMessage()]
    assert lines == ["rate limit not enforced, Redis unavailable: OutOfMemoryError (nor for the next 2 s)"]


def _refuse_writes(redis: Redis, refusal: str) -> None:
    """Have Redis refuse every write, as it does out of memory (noeviction), as a read-only replica, or
    with MISCONF (a snapshot it could not write, under stop-writes-on-bgsave-error)."""
    if refusal == "OutOfMemoryError":
        _fill(redis)
    elif refusal == "ReadOnlyError":
        redis.replicaof("127.0.0.1", free_port())  # a master nobody answers for: no sync, the data stays
    else:
        # The snapshot's file name taken by a directory: every snapshot fails.
        snapshot = os.path.join(redis.config_get("dir")["dir"], redis.config_get("dbfilename")["dbfilename"])
        os.makedirs(os.path.join(snapshot, "x"))
        redis.config_set("stop-writes-on-bgsave-error", "yes")
        redis.config_set("save", "3600 1")  # Redis refuses writes for a failed snapshot only while it saves
        redis.bgsave()
        wait_until(lambda: redis.info("persistence")["rdb_last_bgsave_status"] == "err", timeout=10)


def _take_writes(redis: Redis, refusal: str) -> None:
    """Undo _refuse_writes."""
    if refusal == "OutOfMemoryError":
        redis.config_set("maxmemory", 0)  # room for all (the fillers' 512 KB would hold ~200 jobs, not 300)
    elif refusal == "ReadOnlyError":
        redis.replicaof("NO", "ONE")
    else:
        redis.config_set("save", "")


@pytest.mark.parametrize("refusal", ["OutOfMemoryError", "ReadOnlyError", "ResponseError"])  # the last: MISCONF
def test_sends_redis_refuses_are_logged_once_per_interval_with_their_count_and_counted_accepted_once_it_has_room(
        pg_settings, pg_db, api_key, own_redis, caplog, monkeypatch, refusal):
    # Each send stored while Redis refused its job logged a line of its own, hundreds a second under load,
    # and its acceptance count went with the refused pipeline, never to be counted.
    url, _, _ = own_redis
    redis = Redis.from_url(url)
    settings = replace(pg_settings, redis_url=url, reconcile_grace_seconds=0)
    client = create_app(settings, redis=redis).test_client()
    monkeypatch.setattr(queues, "_not_queued", Tally(queues.NOT_QUEUED_LOG_SECONDS))  # as a new process has it
    hdrs = {"X-API-Key": api_key[1]}

    def send(n: int) -> dict:
        answer = client.post("/api/notifications/send", json=_to(n), headers=hdrs)
        assert answer.status_code == 202
        return answer.get_json()

    assert send(0)["status"] == "queued"
    _refuse_writes(redis, refusal)
    caplog.set_level("WARNING", logger="notifier.queues")
    started, refused = time.monotonic(), []
    while time.monotonic() - started < 2.5 * queues.NOT_QUEUED_LOG_SECONDS:
        refused.append(send(len(refused) + 1)["id"])
    during = [r for r in caplog.records if "stored but not queued" in r.getMessage()]
    _take_writes(redis, refusal)
    time.sleep(queues.NOT_QUEUED_LOG_SECONDS)  # the next line is due
    after = send(len(refused) + 1)  # Redis has room: queued at once, and the last of the count said

    assert len(refused) > 20 and len(during) == 3  # at 0, 2 and 4 s, not one per send
    # (created is wall-clock time, the interval monotonic: a few ms apart)
    assert all(b.created - a.created > queues.NOT_QUEUED_LOG_SECONDS - 0.05 for a, b in itertools.pairwise(during))
    lines = [r.getMessage() for r in caplog.records if "stored but not queued" in r.getMessage()]
    assert len(lines) == 4
    assert lines[0] == f"notification {refused[0]} stored but not queued: {refusal}"
    for line in lines[1:3]:
        assert re.fullmatch(r"\d+ notifications stored but not queued since the last such line \(this process says "
                            r"so at most every 2 s\), the latest notification [-0-9a-f]{36}: " + refusal, line)
    assert re.fullmatch(r"\d+ notifications stored but not queued since the last such line; Redis takes jobs again, "
                        r"and the reconciler queues them", lines[3])
    assert 1 + sum(int(line.split()[0]) for line in lines[1:]) == len(refused)  # each in exactly one line
    # The accepted count of every send Redis refused went with the first pipeline it took.
    assert value(collect_metrics(redis), "notifier_notifications_accepted_total", priority="default",
                 template="-") == len(refused) + 2
    with database.connection_context():  # the reconciler queues every one of them (README: Failure modes)
        assert reconciler.reconcile(settings, redis).requeued == len(refused)
    assert {f"notification-{n}" for n in [*refused, after["id"]]} <= {
        j.decode() for j in redis.lrange("rq:queue:notifier.default", 0, -1)}


def test_the_rate_limit_takes_misconf_for_redis_refusing_writes_not_for_a_rate_it_refused(own_redis, caplog):
    # MISCONF is a plain ResponseError, as Redis's refusal of a rate's numbers is: each request logged an
    # ERROR blaming a key's rate, for as long as snapshots failed.
    url, _, _ = own_redis
    _refuse_writes(Redis.from_url(url), "ResponseError")
    limiter = Limiter(url)
    assert all(limiter.hit(parse_rate("1/minute"), "key", str(n)).allowed for n in range(5))
    assert all(limiter.allows(parse_rate("1/minute"), "recipient", "1", str(n)) for n in range(5))
    assert [r.getMessage() for r in caplog.records if r.name == "notifier.ratelimit"] == [
        "rate limit not enforced, Redis unavailable: ResponseError (nor for the next 2 s)"]


def test_a_worker_and_the_scheduler_warn_of_a_redis_that_evicts_keys(make_stack, pg_settings, own_redis):
    # allkeys-lru, many a managed Redis's default, deletes queued jobs, sent receipts and live workers'
    # keys once it fills: said by nobody, so the operator learnt of it from late and duplicate mail.
    url, _, _ = own_redis
    Redis.from_url(url).config_set("maxmemory-policy", "allkeys-lru")
    stack = make_stack(replace(pg_settings, redis_url=url)).start("worker", "scheduler")
    for name in ("worker", "scheduler"):
        wait_until(lambda n=name: "maxmemory-policy is allkeys-lru" in stack.log(n), timeout=30)


def test_a_redis_that_never_evicts_is_not_warned_of(own_redis, caplog):
    redis = Redis.from_url(url := own_redis[0])
    warn_about_redis_eviction(redis)
    redis.config_set("maxmemory-policy", "volatile-lru")  # a sent receipt has a TTL: it is evicted too
    warn_about_redis_eviction(Redis.from_url(url))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["Redis's maxmemory-policy is volatile-lru"]
