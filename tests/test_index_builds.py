"""An upgrade's index builds on PostgreSQL: concurrent (writes go on), one process at a time, and mended
where a build died half-way."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from peewee import OperationalError

from notifier import keys, schema
from notifier.db import bind, database
from notifier.models import SchemaVersion, Status
from tests.conftest import PG_ADMIN_URL
from tests.helpers import make_notification

ROWS = 5000
_SIXTEEN, _EIGHTEEN = ("notifications_key_lower_to_seq",), ("notifications_key_unsent_seq", "digest_created_at")


@pytest.fixture
def own_db(pg_settings):
    """(db, url, an API key) of a database of these tests' own, at this version, dropped after the test: the
    rows they fill and delete leave the shared one's indexes bloated, which changes other tests' plans."""
    url = pg_settings.database_url + "_builds"
    name = url.rsplit("/", 1)[1]
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    db = bind(url)
    try:
        schema.upgrade(db)
        with database.connection_context():
            key, _ = keys.create("builds")
        yield db, url, key
    finally:
        db.close_all()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _indexes(pg_url: str) -> dict[str, tuple[str, bool]]:
    """Every index of the schema: its definition as PostgreSQL prints it, and whether it is valid."""
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public'")
        return {name: (definition, valid) for name, definition, valid in cur.fetchall()}


def _fill(execute, key, rows: int = ROWS) -> None:
    """rows notifications of key, in the statuses the partial indexes pick from; execute: a connection's."""
    execute(
        'INSERT INTO "notifications" ("id", "api_key_id", "to", "subject", "text", "priority", "status", '
        '"attempts", "callback_attempts", "created_at", "updated_at") '
        "SELECT gen_random_uuid()::text, %s, 'user' || g || '@Example.com', 'Hi', 'Hello', 'default', "
        "(ARRAY['sent', 'failed', 'queued', 'expired', 'cancelled'])[1 + g %% 5], 0, 0, now(), now() "
        "FROM generate_series(1, %s) g", (key.id, rows))


def _rewind(db, version: int) -> None:
    """The schema as that version left it (as far as what the upgrade to SCHEMA_VERSION does)."""
    names = (_EIGHTEEN if version < 18 else ()) + (_SIXTEEN if version < 16 else ())
    for name in names:
        db.execute_sql(f'DROP INDEX "{name}"')
    if version < 17:
        db.execute_sql('ALTER TABLE "notifications" DROP COLUMN "erased_at"')
    SchemaVersion.update(version=version).execute()


def _version() -> int:
    with database.connection_context():
        return SchemaVersion.select().first().version


def _upgrading(db, outcome: list) -> threading.Thread:
    def run() -> None:
        try:
            outcome.append(schema.upgrade(db))
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for_a_build_waiting(pg_url: str, thread: threading.Thread) -> str:
    """The statement of the upgrade's build once it waits for a lock (here: for the claim in flight)."""
    deadline = time.monotonic() + 10
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        while True:
            cur.execute("SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query ILIKE 'CREATE %%INDEX%%'")
            row = cur.fetchone()
            conn.rollback()
            if row:
                return row[0]
            assert thread.is_alive() and time.monotonic() < deadline, "the upgrade never waited to build"
            time.sleep(0.02)


def _at_17_with_a_claim_in_flight(own_db) -> tuple[dict, object]:
    """The indexes of this version; then a filled table at version 17, and a worker's claim not yet
    committed (an open transaction that wrote to notifications: a build waits for it)."""
    pg_db, pg_url, key = own_db
    queued = make_notification(key, status=Status.QUEUED)
    expected = _indexes(pg_url)
    with database.connection_context():
        _fill(pg_db.execute_sql, key)
        _rewind(pg_db, 17)
    claim = psycopg2.connect(pg_url)
    with claim.cursor() as cur:
        cur.execute('UPDATE "notifications" SET "status" = %s WHERE "id" = %s', ("sending", queued.id))
    return expected, claim


def test_an_upgrade_from_version_15_builds_the_same_indexes_valid_over_a_filled_table(own_db, caplog):
    pg_db, pg_url, key = own_db
    expected = _indexes(pg_url)
    with database.connection_context():
        _fill(pg_db.execute_sql, key)
        _rewind(pg_db, 15)
    assert not set(_SIXTEEN + _EIGHTEEN) & set(_indexes(pg_url))
    caplog.set_level("INFO", logger="notifier.index_builds")
    assert schema.upgrade(pg_db) == schema.SCHEMA_VERSION == 18
    assert _indexes(pg_url) == expected
    assert all(valid for _, valid in expected.values())
    assert _version() == 18
    for name in _SIXTEEN + _EIGHTEEN:
        assert f"building index {name} (concurrently" in caplog.text
    with database.connection_context():  # the pooled session has its limit back, and no lock of the upgrade's
        assert pg_db.execute_sql("SHOW statement_timeout").fetchone()[0] == "30s"
        assert not pg_db.execute_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]


def test_sends_are_accepted_and_claimed_while_an_upgrade_builds_an_index(own_db):
    pg_db, pg_url, key = own_db
    # A plain CREATE INDEX waits for the claim in flight, and every insert and claim queued behind its
    # SHARE lock waits too (lock_timeout turns that wait into an error here: so it did before).
    queued = make_notification(key, status=Status.QUEUED)
    _, claim = _at_17_with_a_claim_in_flight(own_db)
    other = psycopg2.connect(pg_url)
    try:
        outcome: list = []
        upgrading = _upgrading(pg_db, outcome)
        assert "CONCURRENTLY" in _wait_for_a_build_waiting(pg_url, upgrading)
        with other.cursor() as cur:  # the API accepting a send, a worker claiming another
            cur.execute("SET lock_timeout = '2s'")
            _fill(cur.execute, key, rows=1)
            cur.execute('UPDATE "notifications" SET "status" = %s WHERE "id" = %s', ("sending", queued.id))
            assert cur.rowcount == 1
        other.commit()
        assert upgrading.is_alive() and _version() == 17  # the build is still on, the version not recorded
        claim.commit()
        upgrading.join(timeout=30)
        assert outcome == [18]
    finally:
        claim.close()
        other.close()
    indexes = _indexes(pg_url)
    assert all(indexes[name][1] for name in _EIGHTEEN)
    with database.connection_context():
        assert pg_db.execute_sql('SELECT count(*) FROM "notifications"').fetchone()[0] == ROWS + 3


def test_a_second_process_waits_for_the_first_ones_build_without_recording_the_version(own_db, caplog):
    pg_db, pg_url, _ = own_db
    caplog.set_level("INFO", logger="notifier.index_builds")
    expected, claim = _at_17_with_a_claim_in_flight(own_db)
    try:
        first: list = []
        second: list = []
        building = _upgrading(pg_db, first)
        _wait_for_a_build_waiting(pg_url, building)
        waiting = _upgrading(pg_db, second)
        deadline = time.monotonic() + 5
        while "waiting for another process's schema upgrade" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1)  # (deadlock_timeout: a deadlock between the two would be found and broken by now)
        assert building.is_alive() and waiting.is_alive() and _version() == 17
        claim.commit()
        building.join(timeout=30)
        waiting.join(timeout=30)
        assert (first, second) == ([18], [18])
    finally:
        claim.close()
    assert _indexes(pg_url) == expected


def test_an_index_a_build_left_invalid_is_built_again(own_db, caplog):
    pg_db, pg_url, key = own_db
    # What CREATE INDEX CONCURRENTLY leaves when it fails (here: a unique build over duplicates; a
    # process killed or a deadlock during the build does the same): an INVALID index under the name,
    # which IF NOT EXISTS would take for the index and the planner would never use.
    expected = _indexes(pg_url)
    with database.connection_context():
        _fill(pg_db.execute_sql, key, rows=50)
        _rewind(pg_db, 17)
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.UniqueViolation):
        cur.execute('CREATE UNIQUE INDEX CONCURRENTLY "notifications_key_unsent_seq" ON "notifications" ("api_key_id")')
    conn.close()
    assert _indexes(pg_url)["notifications_key_unsent_seq"][1] is False
    assert schema.upgrade(pg_db) == 18
    assert _indexes(pg_url) == expected
    assert "index notifications_key_unsent_seq was left invalid" in caplog.text


def test_an_upgrade_whose_build_was_killed_is_finished_by_the_next_one(own_db, caplog):
    # The upgrading process's session ends during a concurrent build (the process killed, the connection
    # cut): the build leaves an INVALID index, the version stays, the lock goes with the session.
    pg_db, pg_url, _ = own_db
    expected, claim = _at_17_with_a_claim_in_flight(own_db)
    try:
        outcome: list = []
        upgrading = _upgrading(pg_db, outcome)
        building = _wait_for_a_build_waiting(pg_url, upgrading)
        with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s", (building,))
        upgrading.join(timeout=10)
    finally:
        claim.commit()
        claim.close()
    assert len(outcome) == 1 and isinstance(outcome[0], OperationalError), outcome  # as a lost connection is
    assert _version() == 17
    left = [name for name, (_, valid) in _indexes(pg_url).items() if not valid]
    assert len(left) == 1 and left[0] in _EIGHTEEN
    assert schema.upgrade(pg_db) == 18
    assert _indexes(pg_url) == expected
    assert f"index {left[0]} was left invalid" in caplog.text
