"""The schema upgrade's index builds on PostgreSQL, made without holding up writes to their tables.

A plain CREATE INDEX takes a SHARE lock on its table for the whole build: every send accepted and every
claim waited for it (about 5 s per 1.8 million notifications). CREATE INDEX CONCURRENTLY takes a lock
that writes pass, but it cannot run inside a transaction, so it cannot be under the upgrade's
transaction lock either: one process at a time builds under a lock of the session's instead."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from peewee import DatabaseError, InterfaceError

from notifier.db import discard_connection, execute_once

logger = logging.getLogger(__name__)

# Not the transaction lock's (schema._LOCK_ID): a process of an older release takes that one inside a
# transaction, whose snapshot a concurrent build waits for, while the build's process would hold it: a
# deadlock. A process waiting for this one asks again every POLL_SECONDS, outside any transaction.
_BUILD_LOCK_ID = 0x6E6F7462  # an arbitrary constant: "notb"
POLL_SECONDS = 0.5


@contextmanager
def one_at_a_time(db) -> Iterator[Callable[[], None]]:
    """Make the block the only upgrade of this release running, with no statement timeout; yield a
    function that raises if the session holding that turn is no longer this connection's."""
    # pg_advisory_lock would wait inside its statement, holding a snapshot that the other process's
    # concurrent build waits for while it holds the lock: a deadlock. A try, then a sleep outside any
    # transaction, holds nothing the build waits for. (With the pool's reconnect: a session that died
    # holds no lock.)
    told = False
    while True:
        got, backend = db.execute_sql("SELECT pg_try_advisory_lock(%s), pg_backend_pid()",
                                      (_BUILD_LOCK_ID,)).fetchone()
        if got:
            break
        if not told:
            logger.info("waiting for another process's schema upgrade to end")
            told = True
        time.sleep(POLL_SECONDS)

    def check() -> None:
        # The server's own pid: behind a pooler, the client's is the pooler's.
        if _run(db, "SELECT pg_backend_pid()").fetchone()[0] != backend:
            raise InterfaceError("the database session holding the schema upgrade's lock is no longer this "
                                 "connection's (a reconnect, or a pooler in transaction mode such as PgBouncer's: "
                                 "run `python -m notifier db upgrade` against PostgreSQL itself)")

    try:
        check()
        # A build reads a whole table and waits for every transaction older than it: neither is a stuck
        # statement, so DATABASE_STATEMENT_TIMEOUT does not apply (RESET: the session's own, after).
        _run(db, "SET statement_timeout = 0")
        yield check
    finally:
        try:
            _run(db, "RESET statement_timeout")
            _run(db, "SELECT pg_advisory_unlock(%s)", [_BUILD_LOCK_ID])
        except (DatabaseError, InterfaceError):
            # Pooled, the connection would keep the lock, and every process starting would wait for it.
            discard_connection(db)


def build_missing(db, models, check: Callable[[], None]) -> None:
    """Build CONCURRENTLY each index of models that PostgreSQL lacks, or holds INVALID: what a build that
    died half-way leaves (a crash, a cancel, a deadlock), which queries never use but writes keep up."""
    for name, invalid, sql, params in _pending(db, models):
        check()
        if invalid:
            logger.warning("index %s was left invalid by a build that did not end: building it again", name)
            _run(db, f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
        logger.info("building index %s (concurrently: writes go on)", name)
        _run(db, sql, params)


def require_valid(db, models) -> None:
    """Raise unless every index of models is there and valid: the version is recorded only then."""
    pending = [name for name, *_ in _pending(db, models)]
    if pending:
        raise DatabaseError(f"indexes missing or invalid after their build: {', '.join(pending)}")


def _pending(db, models) -> list[tuple[str, bool, str, list]]:
    """(name, invalid, its CREATE INDEX CONCURRENTLY, parameters) of each index of models not valid."""
    valid = dict(_run(db, "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                          "JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE n.nspname = current_schema()").fetchall())
    pending = []
    for model in models:
        for index in model._meta.fields_to_index():
            if valid.get(index._name):
                continue
            # peewee's own statement, as create_tables makes it: the same name and definition.
            sql, params = db.get_sql_context().sql(model._schema._create_index(index, safe=True)).query()
            concurrent, made = re.subn(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", sql)
            if not made:
                raise ValueError(f"not a CREATE INDEX statement: {sql}")
            pending.append((index._name, index._name in valid, concurrent, list(params)))
    return pending


def _run(db, sql: str, params: list | None = None):
    # Never run again on a new connection (ReconnectMixin's way outside a transaction): the new session
    # would not hold the lock, and a build it started again would race another process's.
    return execute_once(db, sql, params or [])
