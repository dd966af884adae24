"""DATABASE_STATEMENT_TIMEOUT: a statement stuck behind a lock is cancelled, and says so, instead of
holding a request thread or a worker for as long as the lock lasts; schema upgrades are exempt."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg2
import pytest
from peewee import OperationalError

from app import create_app
from notifier import schema
from notifier.config import ConfigError, Settings
from notifier.db import bind, connect, database
from notifier.models import Status, utcnow
from tests.helpers import installed_deliverer, make_notification, reload, tcp_options

LITERAL = {"to": "carol@example.com", "subject": "Hi", "text": "Hello"}


def _session(pg_url: str):
    conn = psycopg2.connect(pg_url)
    conn.autocommit = False
    return conn


def test_a_request_stuck_behind_a_row_lock_answers_503_at_the_timeout(pg_settings, pg_db, redis_conn, pg_url,
                                                                       api_key):
    app = create_app(replace(pg_settings, database_statement_timeout=0.5), redis=redis_conn)
    client, headers = app.test_client(), {"X-API-Key": api_key[1]}
    created = client.post("/api/notifications/send", json=LITERAL, headers=headers)
    assert created.status_code == 202
    locker = _session(pg_url)
    try:
        with locker.cursor() as cur:  # another session holds the row, as a stuck transaction would
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (created.json["id"],))
        started = time.monotonic()
        response = client.post(f"/api/notifications/{created.json['id']}/cancel", headers=headers)
        waited = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()
    assert response.status_code == 503, response.json
    assert response.json["error"]["code"] == "service_unavailable"
    assert 0.4 < waited < 5
    # Once the lock is gone the same request goes through: nothing was half-written.
    assert client.post(f"/api/notifications/{created.json['id']}/cancel", headers=headers).status_code == 200


def test_a_schema_upgrade_waits_for_another_one_past_the_timeout(pg_settings, pg_db, pg_url):
    db = bind(pg_settings.database_url, statement_timeout=0.2)
    holder = _session(pg_url)
    with holder.cursor() as cur:  # another process upgrading: it holds the upgrade's lock for a second
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (schema._LOCK_ID,))
    threading.Timer(1.0, holder.rollback).start()
    started = time.monotonic()
    try:
        assert schema.upgrade(db) == schema.SCHEMA_VERSION
    finally:
        holder.rollback()
        holder.close()
    assert time.monotonic() - started > 0.9
    with database.connection_context():  # and the limit is back for everything after it
        assert database.execute_sql("SHOW statement_timeout").fetchone()[0] == "200ms"


def test_the_setting():
    assert Settings.from_env({}).database_statement_timeout == 30
    assert Settings.from_env({"DATABASE_STATEMENT_TIMEOUT": "2.5"}).database_statement_timeout == 2.5
    assert Settings.from_env({"DATABASE_STATEMENT_TIMEOUT": "0"}).database_statement_timeout == 0  # no limit
    for bad in ("-1", "nan", "inf", "86401", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"DATABASE_STATEMENT_TIMEOUT": bad})


def test_no_limit_is_asked_for_at_0(pg_url):
    # Behind PgBouncer, which refuses a connection whose startup options it does not know (and would
    # not apply them to the server sessions it shares): the limit must be possible to turn off.
    db = connect(pg_url, statement_timeout=0)
    assert "options" not in db.connect_params
    with db.connection_context():
        assert db.execute_sql("SHOW statement_timeout").fetchone()[0] == "0"
    db.close_all()


def test_the_limit_keeps_what_pgoptions_asks_for(pg_url, monkeypatch):
    # libpq reads PGOPTIONS only when it is given no options: the limit's must not replace it.
    monkeypatch.setenv("PGOPTIONS", "-c search_path=review3_elsewhere,public")
    db = connect(pg_url, statement_timeout=2)
    with db.connection_context():
        assert db.execute_sql("SHOW search_path").fetchone()[0] == "review3_elsewhere,public"
        assert db.execute_sql("SHOW statement_timeout").fetchone()[0] == "2s"
    db.close_all()


def test_a_connection_to_a_server_gone_silent_gives_up_in_seconds_not_hours(pg_url):
    # A server whose host vanished (powered off, a partition) sends no reset: with the kernel's
    # defaults a request waited a quarter of an hour for unacknowledged data, an idle pooled
    # connection two hours for its first keepalive probe. What the kernel is told, on the live socket:
    db = connect(pg_url)
    with db.connection_context():
        assert tcp_options(db.connection()) == (1, 10, 5, 3, 10_000)
    db.close_all()
    # The URL's own values win.
    db = connect(f"{pg_url}?keepalives_idle=60&tcp_user_timeout=30000")
    with db.connection_context():
        assert tcp_options(db.connection()) == (1, 60, 5, 3, 30_000)
    db.close_all()


def test_a_url_may_set_libpqs_connect_timeout_too(pg_url):
    # It was passed to peewee twice, the URL's and our own: TypeError, and no process started.
    db = connect(f"{pg_url}?connect_timeout=12")
    with db.connection_context():
        assert db.connection().get_dsn_parameters()["connect_timeout"] == "12"
    db.close_all()


def test_a_callback_answered_2xx_is_recorded_though_a_lock_holds_its_row_past_the_timeout(
        pg_settings, pg_db, pg_url, api_key, redis_conn, receiver):
    # Once the receiver has answered 2xx nothing may fail the job (callback_job._limit_until_answered): RQ would
    # retry it and the receiver would get the event twice. A statement cancelled at the limit while it
    # waits for the row (a long transaction holding it, as the limit is there for) is such a failure.
    db = bind(pg_settings.database_url, statement_timeout=0.5)
    notification = make_notification(api_key[0], Status.SENT, callback_url=receiver.url, callback_status="pending",
                                     attempts=1, sent_at=utcnow())
    locker = _session(pg_url)
    released = threading.Event()

    def release():
        locker.rollback()
        released.set()

    def row_held_across_the_answer():  # for three times the limit
        with locker.cursor() as cur:
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (notification.id,))
        threading.Timer(1.5, release).start()

    receiver.before_answer = row_held_across_the_answer
    try:
        with installed_deliverer(pg_settings, redis_conn) as deliverer:
            try:
                outcome = deliverer.send_callback(notification.id)
            except OperationalError as exc:
                outcome = f"failed: {exc}"  # a job that fails is retried by RQ
            assert released.wait(5)
            retried = deliverer.send_callback(notification.id)  # that retry (or any duplicate job)
    finally:
        released.wait(5)
        locker.close()
        db.close_all()
    assert (outcome, retried) == ("delivered", "skipped")
    assert receiver.count() == 1
    row = reload(notification.id)
    assert (row.callback_status, row.callback_attempts) == ("delivered", 1)
