"""The real entry points as separate processes: app.py, worker.py, scheduler.py and the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import psycopg2
import pytest
from rq_scheduler import Scheduler

from scheduler import periodic_jobs
from tests.conftest import PG_ADMIN_URL, _pg_database_name
from tests.helpers import LITERAL, VERIFICATION, held_reply, reload
from tests.processes import ROOT, Stack, cli, env_for, free_port, request, spawn, stop, wait_for_http, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(pg_settings, pg_db, redis_conn, smtp, tmp_path):
    """API and worker processes on PostgreSQL, Redis and the test SMTP server; retries after 1 s."""
    running = Stack(replace(pg_settings, retry_intervals=(1, 1)), tmp_path).start("api", "worker")
    yield running
    running.close()


def _status(stack, notification_id):
    return stack.get(notification_id)


def test_api_and_worker_processes_deliver_and_retry_a_451(stack, smtp):
    smtp.replies.append("451 4.7.1 greylisted")
    status, accepted = request("POST", f"{stack.base}/api/notifications/send-verification", stack.key,
                               VERIFICATION)
    assert status == 202
    detail = wait_until(lambda: (d := _status(stack, accepted["id"]))["status"] == "sent" and d, timeout=30)
    assert detail["attempts"] == 2
    statuses = [e["status"] for e in detail["history"]]
    assert statuses == ["queued", "sending", "retrying", "sending", "sent"]
    # RQ's scheduler in the worker fired the retry after the configured interval, not at once.
    retried_at, resent_at = detail["history"][2]["at"], detail["history"][3]["at"]
    assert retried_at < resent_at
    assert len(smtp.wait_for(1)) == 1
    assert smtp.messages[0].message["X-Notification-ID"] == accepted["id"]
    # Every line the API wrote is a JSON object (LOG_FORMAT's default): Flask's dev-server banner was
    # two plain lines among them.
    stack.stop("api")
    lines = stack.log("api").splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines), lines[:3]


def test_worker_finishes_its_current_send_on_sigterm(stack, smtp):
    mid_data, stopping = held_reply(smtp)
    status, accepted = request("POST", f"{stack.base}/api/notifications/send", stack.key, LITERAL)
    assert status == 202
    assert mid_data.wait(10)
    worker = stack.procs["worker"]
    worker.send_signal(signal.SIGTERM)
    stopping.set()
    assert worker.wait(timeout=30) == 0
    assert _status(stack, accepted["id"])["status"] == "sent"
    assert smtp.count() == 1


@contextmanager
def _sigterm_mid_batch(stack, smtp, redis_conn, items: list[dict]):
    """A batch of items accepted (one shared job), and its worker SIGTERMed while the mail server holds
    its first email's reply: yields (the worker's process, the ids) once RQ has noted the stop; the
    reply is given as the block ends."""
    mid_data, stopping = held_reply(smtp)
    status, body = request("POST", f"{stack.base}/api/notifications/batch", stack.key, {"notifications": items})
    assert status == 202, body
    try:
        assert mid_data.wait(20)
        worker = stack.procs["worker"]
        worker.send_signal(signal.SIGTERM)
        key = f"rq:worker:notifier-{socket.gethostname()}-{worker.pid}"
        wait_until(lambda: redis_conn.hget(key, "shutdown_requested_date"), timeout=10, interval=0.02)
        yield worker, [r["id"] for r in body["results"]]
    finally:
        stopping.set()


def test_worker_sigterm_mid_batch_sends_the_email_it_is_sending_and_hands_the_rest_on(stack, smtp, redis_conn):
    # A batch's emails share one job (BATCH_JOB_SIZE of them). A warm shutdown waited for the whole
    # job, with a slow mail server longer than a deploy's grace period, whose SIGKILL then landed mid-send.
    items = [{**LITERAL, "to": f"user{n}@example.com"} for n in range(6)]
    with _sigterm_mid_batch(stack, smtp, redis_conn, items) as (worker, ids):
        pass
    assert worker.wait(timeout=30) == 0
    assert smtp.count() == 1
    assert [_status(stack, i)["status"] for i in ids] == ["sent"] + ["queued"] * 5
    assert "5 unsent emails of the job handed on" in stack.log("worker")

    stack.procs.pop("worker")
    stack.start("worker")
    for notification_id in ids:
        detail = stack.wait_status(notification_id, "sent", "failed", timeout=30)
        assert (detail["status"], detail["attempts"]) == ("sent", 1)
    assert sorted(m.rcpt_tos[0] for m in smtp.wait_for(6)) == sorted(item["to"] for item in items)


def test_a_second_sigterm_mid_send_is_a_cold_shutdown_logged_as_a_warning_not_an_error(stack, smtp, redis_conn):
    # RQ's cold shutdown (a second SIGTERM, a second Ctrl-C of make run) raises SystemExit in the job:
    # the operator's own doing, whose email cut off the reconciler recovers and whose rest it hands on.
    # It was logged as a bug: an ERROR with a traceback, paging whoever alerts on errors.
    items = [{**LITERAL, "to": f"user{n}@example.com"} for n in range(3)]
    with _sigterm_mid_batch(stack, smtp, redis_conn, items) as (worker, ids):
        time.sleep(1.1)  # RQ ignores a second signal within a second of the first
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0
    assert [_status(stack, i)["status"] for i in ids] == ["sending", "queued", "queued"]
    lines = [json.loads(line) for line in stack.log("worker").splitlines() if line.startswith("{")]
    failed = [line for line in lines if "failed: SystemExit" in line["message"]]
    assert failed, lines[-5:]
    assert all(line["level"] == "WARNING" and "exc_info" not in line for line in failed), failed
    assert all(line["message"].endswith("; a cold shutdown; the reconciler takes back what it had not sent")
               for line in failed), failed


def test_a_scheduler_beside_another_stands_by_without_a_warning(stack, redis_conn):
    # Several schedulers may run at once; a poll that finds another's poll holding rq-scheduler's lock
    # skips its turn. rq-scheduler said so as a WARNING, each time: an alert on WARNING fired for it.
    redis_conn.set("rq:scheduler_lock", "another scheduler's poll", ex=60)
    stack.start("scheduler")
    wait_until(lambda: "periodic job" in stack.log("scheduler"), timeout=30)
    time.sleep(2.5)  # two polls and more, each finding the lock taken
    assert "Lock already taken" not in stack.log("scheduler")
    assert not [line for line in stack.log("scheduler").splitlines() if '"level": "WARNING"' in line]


def test_keys_cli_lists_and_revokes(stack):
    env = stack.env
    name = f"stack-{stack.port}"
    assert name in cli(["keys", "list"], env)
    cli(["keys", "revoke", name], env)
    status, body = request("GET", f"{stack.base}/api/notifications", stack.key)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert "revoked" in cli(["keys", "list"], env)


def test_db_upgrade_is_idempotent(stack):
    for _ in range(2):
        assert "schema at version" in cli(["db", "upgrade"], stack.env)


def test_scheduler_starts_and_runs_cleanly(stack, pg_settings, redis_conn, tmp_path):
    scheduler = spawn(["scheduler.py"], stack.env, str(tmp_path / "scheduler.log"))
    periodic = [f"rq:job:{job_id}" for job_id, *_ in periodic_jobs(pg_settings)]

    def polled() -> bool:
        # Its periodic jobs are registered due at once: its first whole poll hands each to its queue
        # (RQ's enqueued_at), then gives up rq-scheduler's lock.
        return scheduler.poll() is not None or (
            all(redis_conn.hget(key, "enqueued_at") for key in periodic)
            and not redis_conn.exists(Scheduler.scheduler_lock_key))

    wait_until(polled, timeout=30, interval=0.02)
    assert scheduler.poll() is None, (tmp_path / "scheduler.log").read_text()
    assert stop(scheduler, signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Traceback" not in (tmp_path / "scheduler.log").read_text()


def test_embedded_sqlite_default_takes_writes_from_api_and_worker_at_once(pg_settings, redis_conn, smtp, tmp_path):
    # make run's shape: API, worker and scheduler all writing one SQLite file, requests in parallel.
    from concurrent.futures import ThreadPoolExecutor

    settings = replace(pg_settings, database_url=f"sqlite:///{tmp_path}/notifier.db", retry_intervals=(1,))
    stack = Stack(settings, tmp_path).start("api", "worker", "scheduler")

    def signup(n):
        return request("POST", f"{stack.base}/api/events", stack.key, {
            "type": "user.signup", "user": {"id": f"u{n}", "email": f"user{n}@example.com"},
            "data": {"code": "123456"}})

    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(signup, range(30)))
        assert [status for status, _ in answers] == [202] * 30, [b for s, b in answers if s != 202][:2]
        for _, body in answers:
            stack.wait_status(body["notifications"][0]["id"], "sent")
        assert len(smtp.wait_for(30)) == 30
    finally:
        stack.close()


def test_make_run_replaces_a_lost_dev_key_whose_notifications_remain(sqlite_settings, sqlite_db, tmp_path,
                                                                     monkeypatch):
    # `make run` keeps its key in var/; when that file is gone (or holds a dead key), a new `dev` key
    # is made. The old one was deleted, which its notifications' foreign key refuses: make run
    # stopped with a traceback on any database that had sent mail.
    from notifier import dev, keys
    from notifier.models import ApiKey
    from tests.helpers import make_notification
    from tests.processes import env_for

    old = keys.create("dev")[0]
    kept = make_notification(old)
    monkeypatch.setattr(dev, "DEV_KEY_FILE", str(tmp_path / "dev-api-key"))
    (tmp_path / "dev-api-key").write_text("nfy_dead_key\n")  # left by an earlier run, world-readable
    os.chmod(tmp_path / "dev-api-key", 0o644)
    plaintext = dev._dev_key(env_for(sqlite_settings))

    assert keys.authenticate(plaintext).name == "dev"
    renamed = ApiKey.get_by_id(old.id)
    assert renamed.name.startswith("dev-until-") and renamed.revoked_at is not None
    assert reload(kept.id).api_key_id == old.id
    assert (tmp_path / "dev-api-key").read_text().strip() == plaintext
    # A live key, like the operator password and the secret key beside it: its owner's alone.
    assert os.stat(tmp_path / "dev-api-key").st_mode & 0o777 == 0o600


def test_make_run_signs_links_with_a_secret_of_its_own_kept_across_runs(tmp_path):
    # Without SECRET_KEY the API signs unsubscribe links with the development secret in this
    # repository (and warns): make run gives its stack a random one, generated once into var/.
    from notifier import dev

    path = str(tmp_path / "secret-key")
    first = dev._kept_secret(path, 32)
    assert len(first) >= 40 and dev._kept_secret(path, 32) == first
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.fixture
def late_database(pg_settings):
    """Settings naming a PostgreSQL database that does not exist yet, and a function that makes it."""
    name = f"{_pg_database_name()}_late"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True

    def create():
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    yield replace(pg_settings, database_url=f"postgresql://postgres@127.0.0.1:5432/{name}"), create
    drop()
    admin.close()


def test_api_worker_and_scheduler_started_before_their_database_wait_for_it(late_database, redis_conn, smtp,
                                                                            tmp_path):
    # A deploy starting everything at once, or a database restarting: the processes wait for it,
    # saying why, instead of exiting with a traceback; the one-off command fails at once.
    settings, create_database = late_database
    port = free_port()
    env = env_for(settings, PORT=port)
    args = {"api": ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()", "-b", f"127.0.0.1:{port}",
                    "--workers", "1"],
            "worker": ["worker.py"], "scheduler": ["scheduler.py"], "waiting": ["worker.py"]}
    procs = {name: spawn(argv, env, str(tmp_path / f"{name}.log")) for name, argv in args.items()}
    try:
        waiting = "the database is not available (OperationalError: "
        wait_until(lambda: all(waiting in (tmp_path / f"{name}.log").read_text() for name in procs), timeout=30)
        failed = subprocess.run([sys.executable, "-m", "notifier", "keys", "create", "late"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert failed.returncode != 0
        assert stop(procs.pop("waiting"), signal.SIGTERM) == 0  # asked to stop while it waits: it stops

        create_database()
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=30)
        key = cli(["keys", "create", "late"], env).strip().splitlines()[-1]
        status, accepted = request("POST", f"http://127.0.0.1:{port}/api/notifications/send", key, LITERAL)
        assert status == 202
        assert len(smtp.wait_for(1)) == 1
        assert smtp.messages[0].message["X-Notification-ID"] == accepted["id"]
        for name in list(procs):
            assert stop(procs.pop(name), signal.SIGTERM) == 0, name
    finally:
        for proc in procs.values():
            stop(proc, signal.SIGKILL)
    for name in args:
        log = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in log, log
    assert "the database is available again" in (tmp_path / "worker.log").read_text()
    # No SECRET_KEY here: the API, which checks unsubscribe links, and the worker, which signs them, say so.
    for name in ("api", "worker"):
        assert "SECRET_KEY is not set" in (tmp_path / f"{name}.log").read_text(), name


def test_a_command_without_its_database_says_so_in_one_line(pg_settings):
    # The README: a one-off command fails at once. It did, with two chained tracebacks of ~90 lines.
    absent = replace(pg_settings, database_url=pg_settings.database_url.rsplit("/", 1)[0] + "/notifier_absent_h1")
    for args in (["keys", "list"], ["dlq", "list"], ["db", "upgrade"]):
        done = subprocess.run([sys.executable, "-m", "notifier", *args], env=env_for(absent), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, args
        assert "the database is not available (OperationalError: " in done.stderr, done.stderr
        assert "notifier_absent_h1" in done.stderr and "Traceback" not in done.stderr


def _blocked_in(thread_id: int) -> set[int]:
    status = open(f"/proc/self/task/{thread_id}/status").read()
    mask = int(status.split("SigBlk:", 1)[1].split()[0], 16)
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}


def test_only_a_workers_main_thread_takes_its_stop_signals(redis_conn):
    # RQ's command listener runs in a thread of its own. Given SIGTERM or Ctrl-C by the kernel, it left
    # the handler (which Python runs in the main thread) waiting until the main thread's wait for a job
    # returned: make run took 5 s to stop, one time in two.
    from worker import make_worker

    worker = make_worker(redis_conn)
    worker.subscribe()
    try:
        listener = _blocked_in(worker.pubsub_thread.native_id)
        assert {signal.SIGINT, signal.SIGTERM} <= listener
        assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        worker.unsubscribe()


def test_a_stop_heard_as_a_workers_loop_ends_is_honoured_after_its_goodbye_not_raised_into_it(redis_conn):
    # RQ's warm-stop handler stays in place through the teardown after its loop: a SIGTERM heard then
    # raised StopRequested into it, cutting short register_death (the worker stayed registered for a
    # minute) and out of work() past the worker's main, which ended with a traceback.
    from worker import make_worker

    class SignalledAsItSaysGoodbye(type(make_worker(redis_conn))):
        def register_death(self):
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right here, in this thread
            super().register_death()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = make_worker(redis_conn)
    worker.__class__ = SignalledAsItSaysGoodbye
    try:
        worker.work(burst=True)  # nothing queued: the loop ends at once
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert worker.stopping
    assert not redis_conn.smembers("rq:workers"), "the worker is still registered"
