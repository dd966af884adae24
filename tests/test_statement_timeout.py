"""DATABASE_STATEMENT_TIMEOUT: a statement stuck behind a lock is cancelled, and says so, instead of
holding a request thread or a worker for as long as the lock lasts; schema upgrades are exempt."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg2
import pytest

from app import create_app
from notifier import schema
from notifier.config import ConfigError, Settings
from notifier.db import bind, database

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
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"DATABASE_STATEMENT_TIMEOUT": bad})
