"""Out of room: a full disk, no file descriptors left, no database connections left.

Each case must answer the caller with what to do (a 503 to retry, a transient SMTP reply) and name the
cause to the operator, never a 500 or a permanent failure. Redis out of memory is in test_faults.py.
"""

from __future__ import annotations

import errno
import os
import resource
import smtplib
import subprocess
import sys

import pytest
from peewee import OperationalError

from bench.procs import children
from notifier.db import database
from tests.conftest import REDIS_URL
from tests.helpers import LITERAL, concurrently
from tests.processes import env_for, free_port, http, spawn, stop, wait_for_http, wait_until


def test_a_full_sqlite_disk_is_named_as_such_not_as_a_failed_rollback(sqlite_db):
    # SQLite ends the transaction itself when it finds no room; atomic()'s ROLLBACK then raised "cannot
    # rollback - no transaction is active" in its place, and every job on a full disk said so.
    with database.connection_context():
        database.execute_sql("CREATE TABLE filler (v TEXT)")
        pages = database.execute_sql("PRAGMA page_count").fetchone()[0]
        database.execute_sql(f"PRAGMA max_page_count = {pages + 2}")  # this connection's disk as good as full
        with pytest.raises(OperationalError) as refused:
            for _ in range(100):
                with database.atomic():
                    database.execute_sql("INSERT INTO filler VALUES (?)", ("x" * 3000,))
    assert str(refused.value) == "database or disk is full"


def test_a_capture_server_out_of_room_answers_a_transient_452_and_keeps_no_part_of_the_message(tmp_path):
    # aiosmtpd answered 500 to the OSError, a permanent refusal that failed the notification for good,
    # and left an empty .eml behind. A file size limit fails the write as a full disk does.
    port = free_port()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    server = subprocess.Popen([sys.executable, "-m", "notifier.devmail", "--port", str(port), "--dir", str(tmp_path)],
                              preexec_fn=small_files, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(port), timeout=15)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            body = "Subject: hi\r\n\r\n" + ("x" * 70 + "\r\n") * 30  # over the 512 bytes a file may hold
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("notifier@example.com", ["ada@example.com"], body)
        assert refused.value.smtp_code == 452
        assert list(tmp_path.iterdir()) == []
    finally:
        server.kill()
        server.wait()


def _answers(port: int) -> bool:
    try:
        smtplib.SMTP("127.0.0.1", port, timeout=1).quit()
        return True
    except OSError:
        return False


def test_a_database_that_refuses_connections_is_a_503_and_the_log_says_why(client, headers, database_outage, caplog):
    # The log said `database unavailable: OperationalError` and no more: too many connections for the
    # role, a database not accepting them, a wrong password all read alike.
    begin, _ = database_outage
    begin()
    answer = client.post("/api/notifications/send", json=LITERAL, headers=headers)
    assert answer.status_code == 503
    assert answer.get_json()["error"]["code"] == "service_unavailable"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("database unavailable")]
    assert lines and "is not currently accepting connections" in lines[0]


def test_a_process_out_of_file_descriptors_answers_503_not_500(app, caplog):
    # Under a low `ulimit -n`, an open() in a request (a library reading its own metadata as it connects)
    # raised OSError: a 500 `internal_error` with a traceback, where a retry shortly passes.
    @app.get("/api/exhausted")
    def exhausted():
        raise OSError(errno.EMFILE, "Too many open files")

    answer = app.test_client().get("/api/exhausted")
    assert answer.status_code == 503
    assert answer.get_json()["error"] == {"code": "service_unavailable", "details": None,
                                          "message": "the service is out of resources; try again shortly"}
    assert "out of resources: OSError: Too many open files" in caplog.text
    assert "unhandled error" not in caplog.text


def test_other_operating_system_errors_are_still_a_500(app, caplog):
    @app.get("/api/broken")
    def broken():
        raise OSError(errno.ENOENT, "No such file or directory")

    assert app.test_client().get("/api/broken").status_code == 500
    assert "unhandled error" in caplog.text


def test_gunicorn_out_of_file_descriptors_keeps_its_worker_and_answers_every_client(pg_settings, pg_db, redis_conn,
                                                                                    tmp_path):
    # gthread let an accept() that found no descriptor left end the worker: gunicorn started another and
    # every connection the first held was reset, unanswered, the answers to sends it had stored among
    # them. Those it did accept, it closed unanswered when its wait for their first bytes took a
    # descriptor of its own (`Socket error processing request.`). At `ulimit -n 64`, 60 clients at once
    # had 181 of 400 sends reset; now each waits for a descriptor to free, and is answered.
    port, log = free_port(), tmp_path / "gunicorn.log"
    api = spawn(["-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "app:create_app()"],
                env_for(pg_settings), str(log))
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health")
        [worker] = children(api.pid, live=True)
        spare = 3  # descriptors beyond those it holds now: fewer than the clients below
        limit = len(os.listdir(f"/proc/{worker}/fd")) + spare
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        statuses = concurrently(40, lambda: http("GET", f"http://127.0.0.1:{port}/api/health")[0])
        assert statuses == [200] * 40
        assert children(api.pid, live=True) == [worker]
        text = log.read_text()
        assert text.count("out of file descriptors (Too many open files") == 1
        assert "Exception in worker process" not in text and "Socket error processing request" not in text
    finally:
        stop(api)


_CONNECT_WITH_NO_DESCRIPTOR_LEFT = """
import os, resource, sys
from notifier.queues import connect_redis
redis = connect_redis(sys.argv[1])
held = redis.connection_pool.get_connection()  # busy, as in a request of another thread: ping needs one more
lowest = os.open(os.devnull, os.O_RDONLY)  # the descriptor the next open() would get
os.close(lowest)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    redis.ping()
except Exception as exc:
    print(type(exc).__module__, type(exc).__name__)
"""


def test_a_redis_connection_out_of_file_descriptors_fails_as_redis_not_as_an_oserror(redis_conn):
    # redis-py read its package's version from disk for every connection it made: out of descriptors
    # that open() raised a bare OSError, which the send took for no Redis error, so a send already
    # stored answered 503 (106 of 1,000 at `ulimit -n 64`): a retry without a key would send it twice.
    done = subprocess.run([sys.executable, "-c", _CONNECT_WITH_NO_DESCRIPTOR_LEFT, REDIS_URL], capture_output=True,
                          text=True, timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.strip() == "redis.exceptions ConnectionError", done.stderr[-2000:]
