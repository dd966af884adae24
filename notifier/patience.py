"""How long a process waits for PostgreSQL to answer: a server that stalls sends no error of its own."""

from __future__ import annotations

import math
import select
import threading
import time
from contextlib import closing, contextmanager

import psycopg2
from psycopg2.extensions import POLL_OK, POLL_READ, STATUS_SETUP, parse_dsn


class Patience:
    """How long a process waits for PostgreSQL to answer before it calls the database unavailable.

    A server that stalls (hung, or a network path that drops everything while the kernel at the far
    end still acknowledges) sends no error and resets nothing; libpq then waits forever for an
    answer, and no kernel timeout ends it. A request on a pooled connection hung until the server
    came back, holding the pool's lock so every other thread of the process hung behind it, and a
    job hung past its time limit (libpq waits out the signal that is RQ's limit). So every wait goes
    through wait_for_answer: a connection must be made within connect_timeout, and a statement whose
    answer is PROBE_AFTER late has the server asked whether it still answers (a new connection,
    within connect_timeout) - a statement waiting for a lock is slow, not stalled, and its server
    answers the probe."""

    def __init__(self, connect_timeout: float):
        self.connect_timeout = connect_timeout
        self.params: dict | None = None  # psycopg2.connect's, for the probe (None: no probe)
        self._probing = threading.Lock()
        self._silent_at = -float("inf")
        self._answered_at: dict[tuple[str, str], float] = {}

    def server_answers(self, server: tuple[str, str]) -> bool:
        """Whether a new connection to server (host, port: the one a waiting connection is on) can be
        made within connect_timeout; the answer is kept for connect_timeout, so one thread asks for
        all of the process's waiting ones."""
        if self.params is None:
            return True
        with self._probing:
            now = time.monotonic()
            if now - self._answered_at.get(server, -float("inf")) < self.connect_timeout:
                return True
            if self.silent_lately():
                return False
            try:
                psycopg2.connect(**self._params_for(server)).close()
                answered = True
            except psycopg2.OperationalError as exc:
                answered = "FATAL" in str(exc)  # the server's own refusal (too many clients): it answers
            if answered:
                self._answered_at[server] = time.monotonic()
            else:
                self.silent()
            return answered

    def _params_for(self, server: tuple[str, str]) -> dict:
        # That server alone: of a URL's several hosts, the first that answers may be another one, whose
        # answer says nothing of this one's, and whose session of the same pid is someone else's.
        host, port = server
        hosts_only = ("hostaddr", "target_session_attrs", "load_balance_hosts")
        return {**{k: v for k, v in self.params.items() if k not in hosts_only}, "host": host, "port": port}

    def cancel(self, backend_pid: int, server: tuple[str, str]) -> None:
        """Ask server, on a new connection, to cancel the statement its session backend_pid is
        running. Best effort: a statement that ends meanwhile is not undone, and a failure is let go.
        The session must be of this database and role: behind a pooler backend_pid is the pooler's
        own number, which must not cancel someone else's statement."""
        if self.params is None:
            return
        try:
            with closing(psycopg2.connect(**self._params_for(server))) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                            "AND datname = current_database() AND usename = current_user", (backend_pid,))
        except psycopg2.Error:
            pass

    def silent(self) -> None:
        """Note that the server took no new connection within connect_timeout just now."""
        self._silent_at = time.monotonic()

    def silent_lately(self) -> bool:
        """Whether the server took no new connection within connect_timeout, less than connect_timeout
        ago: a connection tried now fails at once instead. The pool makes its connections one at a
        time (under its lock), so a process's threads, each waiting its turn to wait connect_timeout,
        took turns times connect_timeout to be told the database is unavailable."""
        return time.monotonic() - self._silent_at < self.connect_timeout


# A statement that needs no lock answers within milliseconds; one this late may be stalled.
PROBE_AFTER = 1.0
_deadline = threading.local()


@contextmanager
def answer_within(seconds: float):
    """Every wait for PostgreSQL inside (a connection taken from the pool, made, or a statement) ends
    within seconds of entering, with an OperationalError if the server has not answered by then: for
    a check that must itself answer on time, such as a readiness probe."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = time.monotonic() + seconds if previous is None else min(previous, time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.at = previous


def answer_deadline() -> float | None:
    """When the innermost answer_within() of this thread runs out (time.monotonic()); None outside one."""
    return getattr(_deadline, "at", None)


def wait_for_answer(conn) -> None:
    """psycopg2's wait callback (set_wait_callback): wait for conn as libpq would, but within the
    limits of its Patience (see Patience), and of answer_within(). Past them the connection is closed
    (psycopg2 does that to a connection whose wait failed) and OperationalError raised. Waiting in
    Python also lets a signal's handler raise (RQ's job time limit), which libpq's own wait ignores.
    A connection made elsewhere (psycopg2.connect) waits as long as libpq would: its connect_timeout."""
    patience = getattr(conn, "patience", None)
    connecting = conn.status == STATUS_SETUP
    started = time.monotonic()
    connect_timeout = patience.connect_timeout if patience else float(parse_dsn(conn.dsn).get("connect_timeout", 0))
    connect_by = started + connect_timeout if connecting and connect_timeout > 0 else None
    limit = min((t for t in (connect_by, getattr(_deadline, "at", None)) if t is not None), default=None)
    probe_at = started + PROBE_AFTER if patience and not connecting else None
    if connecting and patience and patience.silent_lately():
        raise psycopg2.OperationalError(f"PostgreSQL took no new connection within {connect_timeout:g} s "
                                        "a moment ago")
    try:
        while (state := conn.poll()) != POLL_OK:
            waiting = select.poll()  # not select.select, which refuses descriptors past 1023
            waiting.register(conn.fileno(), select.POLLIN if state == POLL_READ else select.POLLOUT)
            while True:
                now = time.monotonic()
                if limit is not None and now >= limit:
                    what = "a connection" if connecting else "an answer"
                    if patience and connect_by is not None and now >= connect_by:
                        patience.silent()
                    raise psycopg2.OperationalError(f"PostgreSQL did not give {what} within {now - started:.1f} s")
                if probe_at is not None and now >= probe_at:
                    if not patience.server_answers(_server_of(conn)):
                        raise psycopg2.OperationalError(
                            f"PostgreSQL did not answer for {now - started:.1f} s, nor take a new connection within "
                            f"{patience.connect_timeout:g} s")
                    probe_at = time.monotonic() + max(PROBE_AFTER, patience.connect_timeout)
                pending = [t for t in (limit, probe_at) if t is not None]
                timeout = max(0, math.ceil((min(pending) - now) * 1000)) if pending else None
                if waiting.poll(timeout):
                    break
    except psycopg2.Error:
        raise
    except BaseException:
        # A signal's handler raised mid-statement (RQ's job limit, a stop). psycopg2 closes the
        # connection, but PostgreSQL goes on with the statement, and one waiting for a lock commits
        # once it has it: a claim then left the notification `sending` with nobody sending it, for the
        # reconciler to take for a lost send (failed, "delivery is unknown", on the last attempt).
        if patience is not None and not connecting:
            patience.cancel(conn.info.backend_pid, _server_of(conn))
        raise


def _server_of(conn) -> tuple[str, str]:
    """The host (or socket directory) and port conn is connected to."""
    return conn.info.host, str(conn.info.port)
