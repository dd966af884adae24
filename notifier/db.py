"""The database proxy, bound to a real database at start-up; nothing connects at import."""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from urllib.parse import urlparse

from peewee import (
    DatabaseProxy,
    InterfaceError,
    OperationalError,
    PostgresqlDatabase,
    SqliteDatabase,
    __exception_wrapper__,
    _savepoint,
)
from playhouse.pool import PooledPostgresqlDatabase
from playhouse.shortcuts import ReconnectMixin
from psycopg2 import Error as PsycopgError
from psycopg2.errors import DuplicatePreparedStatement, InvalidSqlStatementName, QueryCanceled
from psycopg2.extensions import (
    TRANSACTION_STATUS_IDLE,
    TRANSACTION_STATUS_INERROR,
    TransactionRollbackError,
    parse_dsn,
    set_wait_callback,
)
from psycopg2.extensions import connection as PsycopgConnection
from psycopg2.extensions import cursor as PsycopgCursor

from notifier.config import Settings
from notifier.patience import Patience, answer_deadline, wait_for_answer

logger = logging.getLogger(__name__)

# Errors that the database unreachable or restarting produces; the API answers 503 for these.
UNAVAILABLE_ERRORS = (OperationalError, InterfaceError)
# Seconds before each try of a write a worker must not lose once the outside world has acted on it (an
# email's `sent` record, a callback answer's record): a restart or failover ridden out, 7.5 s in all.
RECONNECT_DELAYS = (0, 0.5, 1, 2, 4)


class KeepsContexts:
    """Closing or opening the connection inside connection_context() keeps the open contexts.

    peewee forgets them on close() and connect(), so a reconnect inside one (ReconnectMixin's, after
    a server restart, or a close() that gives up a broken connection) made leaving it fail with
    IndexError, after the work inside it was done: a delivery job then failed with every email sent."""

    def close(self):
        contexts = self._state.ctx
        try:
            return super().close()
        finally:
            self._state.ctx = contexts

    def connect(self, reuse_if_open=False):
        contexts = self._state.ctx
        try:
            return super().connect(reuse_if_open)
        finally:
            self._state.ctx = contexts


class SqliteDb(KeepsContexts, SqliteDatabase):
    """SQLite, keeping open contexts across a close (see KeepsContexts)."""

    def rollback(self):
        # SQLite ends the transaction itself when a write finds the disk full (SQLITE_FULL) or fails to
        # reach it (SQLITE_IOERR). atomic()'s ROLLBACK then raised "cannot rollback - no transaction is
        # active" in place of "database or disk is full": a job's error and its log named a wrong cause.
        if not self.is_closed() and not self.connection().in_transaction:
            return None
        return super().rollback()


class _Savepoint(_savepoint):
    """A nested atomic()'s savepoint, whose ROLLBACK TO SAVEPOINT is skipped on a connection psycopg2
    closed under us, as PostgresDatabase.rollback's ROLLBACK is."""

    def rollback(self, begin=True):
        closed_under_us = getattr(self.db, "closed_under_us", None)  # PostgreSQL's only
        if closed_under_us is not None and closed_under_us():
            return None
        return super().rollback(begin)


class _Proxy(DatabaseProxy):
    def savepoint(self):
        # The proxy makes the savepoints of `database.atomic()` itself, not the database behind it.
        return _Savepoint(self)


# The models' database, bound at start (bind) to the one DATABASE_URL names.
database = _Proxy()


class PostgresDatabase(KeepsContexts, ReconnectMixin, PooledPostgresqlDatabase):
    """Pooled PostgreSQL that reconnects once when the server restarted under us."""

    reconnect_errors = (
        (OperationalError, "server closed the connection"),
        (OperationalError, "terminating connection"),
        (OperationalError, "connection to server"),
        (OperationalError, "SSL connection has been closed"),
        (InterfaceError, "connection already closed"),
    )
    # The pool pings a connection (SELECT 1) each time it hands it out: a round trip per job or
    # request. One that came back to the pool moments ago was alive then, so it is handed out
    # unpinged; a server restart in that moment is caught by the reconnect on the first statement.
    ping_after_seconds = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._returned_at: dict[int, float] = {}
        self._handing_out = threading.Lock()

    def connect(self, reuse_if_open=False):
        # peewee hands out connections (pinging pooled ones, making new ones) one thread at a time, under
        # a lock that no limit of ours bounds: behind a thread waiting on a silent server every other
        # thread of the process waited, /api/ready too, past the answer_within() it promises. So the
        # wait for that turn ends with the deadline, where there is one.
        if reuse_if_open and not self.is_closed():
            return False  # this thread's connection, open already: nothing to hand out, no turn to wait for
        at = answer_deadline()
        if not self._handing_out.acquire(timeout=-1 if at is None else max(0.0, at - time.monotonic())):
            raise OperationalError("PostgreSQL gave this process no connection in time: another thread is "
                                   "waiting for one")
        try:
            return super().connect(reuse_if_open)
        finally:
            self._handing_out.release()

    def rollback(self):
        if self.closed_under_us():
            # psycopg2 closed it: a signal's handler raised while it waited (patience's wait callback:
            # RQ's time limit, a stop), and the server ends the transaction with the session. The
            # ROLLBACK raised InterfaceError in place of that exception as atomic() ended: a job's limit
            # was taken for the database gone, and a shared job went on past it.
            return None
        return super().rollback()

    def savepoint(self):
        return _Savepoint(self)  # a nested atomic()'s: the same, for its ROLLBACK TO SAVEPOINT

    def closed_under_us(self) -> bool:
        conn = self._state.conn
        return conn is not None and bool(conn.closed)

    def _close(self, conn, close_conn=False):
        if conn.closed:
            self._found_dead()
        elif not close_conn:
            self._returned_at[id(conn)] = time.monotonic()
        super()._close(conn, close_conn)

    def _is_closed(self, conn):
        returned_at = self._returned_at.pop(id(conn), None)
        if (returned_at is not None and time.monotonic() - returned_at < self.ping_after_seconds
                and not conn.closed and conn.get_transaction_status() == TRANSACTION_STATUS_IDLE):
            return False
        patience = getattr(conn, "patience", None)
        if patience is not None and patience.silent_lately():
            # The server took no new connection moments ago: a ping now would wait its second for an
            # answer before the probe gave up, under the pool's lock, and so would the next idle
            # connection's (in a partition every thread of a process waited up to 6.8 s behind the pings).
            # Dropped unpinged, as a new connection now fails at once.
            with suppress(PsycopgError):
                conn.close()
            self._found_dead()
            return True
        if super()._is_closed(conn):
            self._found_dead()
            return True
        return False

    def _found_dead(self) -> None:
        # A connection died under us (a restart, pg_terminate_backend), and whatever ended it most
        # likely ended the idle ones beside it too: each came back moments ago, so it would be handed
        # out unpinged. The reconnect's one retry then drew another dead one from the pool, and the
        # request answered 503 (one per two idle connections the pool held). Ping each first. (A
        # thread handing back a dead connection psycopg2 has not noticed yet, just after, can still
        # have one drawn unpinged: the price of not pinging one returned under a second ago.)
        self._returned_at.clear()


# The statements run for every request and every email, by their SQL text: each connection prepares
# one the first time it runs it (PREPARE), then only executes it. PostgreSQL parses and plans a
# statement anew every time it is sent as text, which for these cost about as much as running them:
# pgbench ran the four statements of one delivery 1.8 times as fast prepared, and in `make bench`
# PostgreSQL's CPU per email and per accepted send fell by a third.
_PREPARED: dict[str, str] = {}
_NAMES = itertools.count(1)


_PLACEHOLDER = re.compile("%[%s]")


def prepared(sql: str) -> str:
    """Mark sql (psycopg2's %s parameters, %% for a per cent sign) as one to prepare on PostgreSQL; return it.
    Only for statements whose parameters PostgreSQL can type from where they stand."""
    if sql not in _PREPARED:
        _PREPARED.setdefault(sql, f"notifier_{next(_NAMES)}")
    return sql


class PreparingCursor(PsycopgCursor):
    """Runs a statement marked prepared() as EXECUTE of the connection's prepared copy."""

    def execute(self, query, vars=None):
        # A named (server-side) cursor is psycopg2's DECLARE ... FOR the query, which cannot be an EXECUTE.
        name = _PREPARED.get(query) if isinstance(query, str) and self.name is None else None
        if name is None:
            return super().execute(query, vars)
        known = self.connection.prepared
        if name not in known:
            # A prepared statement outlives the transaction it was made in, even one rolled back: it
            # is recorded as soon as PREPARE has answered.
            numbers = itertools.count(1)
            try:
                # As psycopg2 reads the statement: %% is one per cent sign, %s the next parameter.
                super().execute(f"PREPARE {name} AS " + _PLACEHOLDER.sub(
                    lambda m: "%" if m.group() == "%%" else f"${next(numbers)}", query))
            except DuplicatePreparedStatement:
                # The session has it although this connection did not record it (below): record it now.
                known.add(name)
                if self.connection.info.transaction_status == TRANSACTION_STATUS_INERROR:
                    raise
            except BaseException:
                # An exception raised in Python as psycopg2 returned (RQ's job limit is a SIGALRM that
                # raises JobTimeoutException wherever the worker is, a PREPARE waiting on a lock its
                # likeliest place) comes after PostgreSQL made the statement. Unrecorded, every later
                # run of it on this pooled connection failed: "prepared statement ... already exists".
                if self.statusmessage == "PREPARE":
                    known.add(name)
                raise
            known.add(name)
        try:
            if not vars:
                return super().execute(f"EXECUTE {name}")
            return super().execute(f"EXECUTE {name} ({', '.join(['%s'] * len(vars))})", vars)
        except InvalidSqlStatementName:
            known.discard(name)  # the session lost it (DISCARD ALL, a pooler): prepare it again next time
            raise


class NotifierConnection(PsycopgConnection):
    """A psycopg2 connection that waits for the server within patience's limits (see wait_for_answer),
    and, when prepare, prepares the statements marked prepared(), remembering which (the server
    forgets them with the connection)."""

    def __init__(self, *args, patience: Patience, prepare: bool = False, **kwargs):
        # Before connecting: the connection is made inside super().__init__, through wait_for_answer.
        self.patience = patience
        self.prepared: set[str] = set()
        super().__init__(*args, **kwargs)
        if prepare:
            self.cursor_factory = PreparingCursor


_TCP_LIVENESS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                 "tcp_user_timeout": 10_000}


def tcp_liveness(given: Mapping[str, object]) -> dict[str, int]:
    """What a PostgreSQL connection is told about a server gone silent (see connect), less what its
    URL's own parameters (given) already say: those win."""
    return {name: value for name, value in _TCP_LIVENESS.items() if name not in given}


def connect(url: str, pool_size: int = Settings.database_pool_size, prepare: bool = Settings.database_prepare,
            statement_timeout: float = Settings.database_statement_timeout,
            connect_timeout: float = Settings.database_connect_timeout):
    """Make (but do not open) a peewee database for a DATABASE_URL; pool_size: PostgreSQL connections
    per process at most; prepare: whether PostgreSQL connections prepare the statements marked
    prepared() (off behind a pooler that hands one session's statements to another, such as
    PgBouncer in transaction mode); statement_timeout: seconds a PostgreSQL statement may run (0: no
    limit is asked for); connect_timeout: seconds to make a connection, and for a silent server to
    show it still answers (see Patience)."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        path = url.split("sqlite:///", 1)[1] if url.startswith("sqlite:///") else ":memory:"
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # API, worker and scheduler write to one file. A transaction that reads and then writes after
        # another process committed fails at once (SQLITE_BUSY_SNAPSHOT), whatever busy_timeout says;
        # beginning IMMEDIATE takes the write lock up front, so writers queue up instead.
        return SqliteDb(
            path,
            pragmas={"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1, "synchronous": "full"},
            timeout=10,
            lock_type="IMMEDIATE",
        )
    # libpq's own reading of the URL, as KeyCache's connection and psql have it: several hosts, a
    # percent-encoded user or password (peewee's db_url passed "%40" on as it stood), its parameters.
    params = parse_dsn(url)
    if statement_timeout > 0:
        # Set when the session starts (libpq's options), so a reconnected session has it too; kept after
        # any options the URL gives. Options given to libpq replace PGOPTIONS, which it otherwise reads
        # (a search_path set there, say): those are kept too when the URL gives none.
        limit = f"-c statement_timeout={max(1, round(statement_timeout * 1000))}"
        given = params.get("options") or os.environ.get("PGOPTIONS", "").strip()
        params["options"] = f"{given} {limit}" if given else limit
    # A server that vanished without a word (its host powered off, a network partition: no reset
    # comes back) held a request or a job for as long as the kernel kept retrying, a quarter of an
    # hour, and an idle pooled connection two hours: the kernel's defaults. These make the kernel give
    # up on a connection whose data is not acknowledged within 10 s, or whose silence keepalive
    # probes find dead within 25 s. (One whose kernel still acknowledges, and that answers nothing,
    # is Patience's.) A URL's own values win.
    params.update(tcp_liveness(params))
    # libpq's connect_timeout is not applied to a connection made in steps (wait_for_answer's), so it
    # is Patience's limit: a URL's own (?connect_timeout=10) wins there like the rest.
    patience = Patience(float(params.get("connect_timeout") or connect_timeout))
    params["connection_factory"] = partial(NotifierConnection, patience=patience, prepare=prepare)
    name = params.pop("dbname")  # Settings made sure there is one
    patience.params = {**params, "database": name, "connection_factory": partial(NotifierConnection,
                                                                                   patience=patience)}
    set_wait_callback(wait_for_answer)
    db = PostgresDatabase(
        name,
        max_connections=pool_size,
        stale_timeout=300,
        timeout=10,
        **params,
    )
    db.patience = patience
    return db


def patience_of(db) -> Patience | None:
    """The Patience of db's connections (db: a database connect() made, or the proxy bound to one);
    None for SQLite."""
    return getattr(getattr(db, "obj", db), "patience", None)


def execute_once(db, sql: str, params: list):
    """db.execute_sql, except that a connection lost meanwhile is an error rather than a reason to run
    the statement again: for an insert whose commit may have reached the server before its answer
    was lost (the reconnecting pool would insert it twice)."""
    with __exception_wrapper__:
        cursor = db.cursor()
        cursor.execute(sql, params)
    return cursor


def past_statement_timeout(run):
    """run() again each time PostgreSQL cancels it (DATABASE_STATEMENT_TIMEOUT, or an operator's
    pg_cancel_backend), and return what it returns: for a write that must be made however long a lock
    holds it up. Only for what is safe to run again after a cancel (nothing of it was written)."""
    while True:
        try:
            return run()
        except OperationalError as exc:
            if not cancelled(exc):
                raise
            logger.warning("a statement was cancelled (%s); running it again", str(exc).splitlines()[0])


def cancelled(exc: BaseException) -> bool:
    """Whether exc is PostgreSQL cancelling a statement (DATABASE_STATEMENT_TIMEOUT, an operator's
    pg_cancel_backend): an OperationalError like a lost connection, but the database is there."""
    cause = getattr(exc, "orig", None) or exc.__context__  # what psycopg2 raised, under peewee's
    return isinstance(exc, QueryCanceled) or isinstance(cause, QueryCanceled)


def deadlocked(exc: BaseException) -> bool:
    """Whether exc is PostgreSQL rolling a transaction back to break a deadlock (or a serialization
    failure): nothing of it was written, and running it again is safe."""
    cause = getattr(exc, "orig", None) or exc.__context__  # what psycopg2 raised, under peewee's
    return isinstance(exc, TransactionRollbackError) or isinstance(cause, TransactionRollbackError)


def discard_connection(db) -> None:
    """Close the calling thread's database connection for good, not back into the pool."""
    manual_close = getattr(getattr(db, "obj", db), "manual_close", None)
    with suppress(*UNAVAILABLE_ERRORS):  # closing a broken connection may fail; it is gone either way
        if manual_close is not None:
            manual_close()
        else:
            db.close()


def is_postgres(db) -> bool:
    """Whether db (or the database behind the proxy) is PostgreSQL, for the statements only it has."""
    return isinstance(getattr(db, "obj", db), PostgresqlDatabase)


def bind(url: str, pool_size: int = Settings.database_pool_size, prepare: bool = Settings.database_prepare,
         statement_timeout: float = Settings.database_statement_timeout,
         connect_timeout: float = Settings.database_connect_timeout):
    """Point the shared proxy at the database named by url and return it."""
    db = connect(url, pool_size, prepare, statement_timeout, connect_timeout)
    database.initialize(db)
    return db


_SQL: dict[tuple, str] = {}


def in_values(column: str, values: list) -> tuple[str, list]:
    """SQL for "column is one of values" and its parameters: `= ANY(array)` on PostgreSQL (one
    parameter, so one statement text for any count), `IN (...)` elsewhere."""
    param = database.param
    if is_postgres(database):
        return f'"{column}" = ANY({param})', [values]
    return f'"{column}" IN ({", ".join([param] * len(values))})', list(values)


def select_one(model, where: str, *params):
    """The first row of model matching where, a fixed SQL condition with a {} per parameter.

    On the per-request and per-email paths (API key, suppression, preference, a notification read
    by id) building the query with peewee's builder, or reading its row through peewee's cursor
    wrapper (which matches the columns to fields anew for every query), cost more than running it:
    the SQL is written once per database kind, and the row read with the fields' own converters."""
    param = database.param
    key = (model, where, param)
    sql = _SQL.get(key)
    if sql is None:
        condition = where.format(*([param] * where.count("{}")))
        table = model._meta.table_name
        sql = _SQL[key] = prepared(f'SELECT {column_list(model)} FROM "{table}" WHERE {condition} LIMIT 1')
    row = database.execute_sql(sql, params).fetchone()
    return None if row is None else instance_of(model, row)


def column_list(model, table: str | None = None) -> str:
    """Every column of model, in the order instance_of() reads them (table: an alias to qualify them with)."""
    prefix = f'{table}.' if table else ""
    return ", ".join(f'{prefix}"{f.column_name}"' for f in model._meta.sorted_fields)


def instance_of(model, row):
    """The model instance from a row whose first columns are column_list(model)'s, read with the
    fields' own converters (a longer row's other columns are left for the caller)."""
    return model_from(model, {name: None if value is None else read(value)
                              for (name, read), value in zip(_readers(model), row, strict=False)})


def _readers(model) -> tuple:
    readers = _READERS.get(model)
    if readers is None:
        readers = _READERS[model] = tuple((f.name, f.python_value) for f in model._meta.sorted_fields)
    return readers


_READERS: dict = {}


def model_from(model, data: dict):
    """The instance of model holding data (every field's value by name, as Python values): what
    model(**data) makes, without a descriptor call per field. Foreign keys hold the related id; a
    caller that has the related object may put it in __rel__ as peewee's descriptors would."""
    instance = model(__no_default__=1)
    instance.__data__ = data
    return instance
