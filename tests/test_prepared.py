"""PostgreSQL connections prepare the statements of the send and delivery paths (notifier.db.prepared)."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from peewee import DatabaseError
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from notifier import consent, store
from notifier.config import Settings
from notifier.db import bind, database, prepared
from notifier.models import Status
from tests.helpers import drop_connections

FIELDS = {"to": "carol@example.com", "subject": "Hi", "text": "Hello", "priority": "default"}


def _prepared_here() -> list[str]:
    """The statements this connection prepared, as PostgreSQL has them."""
    return [row[0] for row in database.execute_sql(
        "SELECT statement FROM pg_prepared_statements WHERE name LIKE 'notifier_%%'").fetchall()]


def _one_delivery(key) -> None:
    """What the API and a worker run for one email: the API's consent, insert and read of the row;
    the worker's read of the row with its consent, claim and sent."""
    consent.prefetch(key.id, [(FIELDS["to"], None, "transactional")])
    made = store.create_notification(key, dict(FIELDS))
    store.get(made.id)
    current, _ = consent.sending(made.id)
    assert store.claim(current.id, known=current)
    current.status = Status.SENDING.value
    assert store.transition(current.id, Status.SENT, sources=(Status.SENDING,), known=current, reason="sent")


def test_the_send_and_delivery_statements_are_prepared_once_per_connection(pg_db, api_key):
    key = api_key[0]
    with database.connection_context():
        _one_delivery(key)
        first = _prepared_here()
        _one_delivery(key)
        again = _prepared_here()
        assert store.get(store.create_notification(key, dict(FIELDS)).id).status == Status.QUEUED
    kinds = " ".join(first)
    assert 'INSERT INTO "notifications"' in kinds  # the single send's insert, with its history line
    assert 'FROM "notifications" WHERE "id" = $1' in kinds
    assert 'FROM "suppressions"' in kinds
    assert "LEFT JOIN LATERAL" in kinds  # the worker's read
    assert kinds.count('UPDATE "notifications"') == 2  # the claim and the `sent` record
    assert sorted(again) == sorted(first)  # run again, nothing new is prepared


def test_a_new_connection_after_a_restart_prepares_them_again(pg_db, api_key):
    key = api_key[0]
    with database.connection_context():
        _one_delivery(key)
        before = store.create_notification(key, dict(FIELDS))
    drop_connections(database.obj.database)
    with database.connection_context():
        # A read first, as a job does: the pool reconnects on it, a prepared statement of the new session.
        assert store.get(before.id).status == Status.QUEUED
        _one_delivery(key)
        assert len(_prepared_here()) >= 4


def test_database_prepare_off_prepares_nothing(pg_settings, api_key):
    assert Settings.from_env({"DATABASE_PREPARE": "off"}).database_prepare is False
    assert Settings.from_env({}).database_prepare is True
    bind(pg_settings.database_url, prepare=False)
    with database.connection_context():
        _one_delivery(api_key[0])
        assert _prepared_here() == []


def test_a_job_timeout_that_lands_on_a_prepare_leaves_the_connection_usable(pg_db, pg_url, api_key):
    # RQ's limit on a job is SIGALRM raising JobTimeoutException wherever the worker is (SimpleWorker:
    # the same process, the same pooled connections, for the next job). Here it falls due while the
    # connection's first PREPARE waits on a lock (a schema upgrade's ALTER TABLE, say): PostgreSQL
    # makes the statement once the lock goes, whether the exception is raised as psycopg2 returns or
    # (notifier.patience waits in Python) during the wait, the connection then closed under it.
    made = store.create_notification(api_key[0], dict(FIELDS))
    drop_connections(database.obj.database)  # a fresh connection, that has prepared nothing yet
    locker = psycopg2.connect(pg_url)
    with locker.cursor() as cur:
        cur.execute('LOCK TABLE "notifications" IN ACCESS EXCLUSIVE MODE')
    release = threading.Timer(2.0, locker.rollback)
    release.start()
    try:
        with pytest.raises(JobTimeoutException), database.connection_context():
            database.execute_sql("SELECT 1")
            with UnixSignalDeathPenalty(1, JobTimeoutException):
                store.get(made.id)
    finally:
        release.join()
        time.sleep(0.5)
        locker.close()
    # The next job, on the same pooled connection.
    with database.connection_context():
        assert store.get(made.id).status == Status.QUEUED


def test_a_connection_whose_record_and_session_disagree_mends_itself(pg_db, api_key):
    made = store.create_notification(api_key[0], dict(FIELDS))
    with database.connection_context():
        assert store.get(made.id).status == Status.QUEUED
        connection = database.connection()
        # The session forgot its statements (DISCARD ALL, a pooler): one failure, then prepared anew.
        database.execute_sql("DEALLOCATE ALL")
        with pytest.raises(DatabaseError, match="does not exist"):
            store.get(made.id)
        assert store.get(made.id).status == Status.QUEUED
        # The connection forgot what the session has: it records it and runs the statement.
        connection.prepared.clear()
        assert store.get(made.id).status == Status.QUEUED


def test_a_prepared_statement_reads_its_percent_signs_as_psycopg2_does(pg_db):
    # psycopg2 reads %% as one % and %s as a parameter: `%%s` is a per cent sign and an s.
    sql = prepared("SELECT %s::int %% 3, 'a%%s' || %s::text")
    with database.connection_context():
        assert database.execute_sql(sql, [7, "b"]).fetchone() == (1, "a%sb")
        assert database.execute_sql(sql, [8, "c"]).fetchone() == (2, "a%sc")  # executed, not prepared again
