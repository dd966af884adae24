"""The API's cache of API keys, kept honest by PostgreSQL.

Every keyed request used to read its key from the database: a round trip, and on the accept path as
costly as the insert. A trigger on api_keys (see schema) sends a NOTIFY for every change - a key
made, rotated or revoked by the CLI, or an UPDATE typed by hand - and the cache LISTENs on a
connection of its own. Before each lookup it reads whatever notifications have arrived, which is a
non-blocking read of that connection's socket, not a round trip; any change empties the cache. So a
revoked key stops working as soon as the notification arrives (well under a millisecond on one
host), and whenever the listening connection is down the cache is not used at all. (Behind a pooler in
transaction mode, such as PgBouncer's, LISTEN hears nothing: point DATABASE_URL at PostgreSQL itself.)"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from functools import partial

import psycopg2
from psycopg2.extensions import parse_dsn

from notifier.db import NotifierConnection, tcp_liveness
from notifier.models import ApiKey
from notifier.patience import Patience, answer_within

logger = logging.getLogger(__name__)

CHANNEL = "notifier_api_keys"
# A backstop for a listening connection that died without the socket noticing (no FIN reached us).
MAX_AGE_SECONDS = 60.0
RECONNECT_SECONDS = 5.0
_MAX_POLLS = 8


class KeyCache:
    """Keys by public prefix, for one process; thread-safe."""

    def __init__(self, database_url: str, connect_timeout: float = 5.0, patience: Patience | None = None):
        """patience: the process's pool's (notifier.db.patience_of): a server it found silent moments ago
        is not waited for again here, and one silent here is silent for the pool too."""
        self._url = database_url
        self._connect_timeout = connect_timeout
        self._patience = patience
        self._lock = threading.Lock()
        self._connecting = threading.Lock()
        self._conn = None
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._generation = 0
        self._keys: dict[str, tuple[float, ApiKey]] = {}

    def lookup(self, prefix: str, load: Callable[[str], ApiKey | None]) -> ApiKey | None:
        """The key with this prefix: from the cache, or load(prefix), kept when nothing changed meanwhile."""
        with self._lock:
            listening = self._listening()
            entry = self._keys.get(prefix) if listening else None
            generation = self._generation
        if not listening:
            self._connect()  # outside the lock: a slow connect holds up no other request
        if entry is not None and time.monotonic() - entry[0] < MAX_AGE_SECONDS:
            return entry[1]
        key = load(prefix)
        if listening and key is not None:
            with self._lock:
                # A change that arrived while loading may concern this very key: keep it only if not.
                if self._generation == generation:
                    self._keys[prefix] = (time.monotonic(), key)
        return key

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _listening(self) -> bool:
        """Whether the cache may be used: LISTENing, with every notification so far applied."""
        if self._pid != os.getpid():
            # A forked child shares the parent's socket: leave it to the parent, listen afresh.
            self._conn, self._pid = None, os.getpid()
            self._forget()
        if self._conn is None:
            return False
        try:
            # Until the socket holds nothing more: a server ending the session sends its reason first,
            # which one poll() takes without a word, and only the next read meets the closed socket.
            # (Bounded: a steady stream of notifications must not hold the request.)
            self._conn.poll()
            waiting = select.poll()  # not select.select, which refuses descriptors past 1023
            waiting.register(self._conn.fileno(), select.POLLIN)
            for _ in range(_MAX_POLLS):
                if not waiting.poll(0):
                    break
                self._conn.poll()
        except psycopg2.Error as exc:
            logger.warning("API key cache off until PostgreSQL is back: %s", type(exc).__name__)
            self._drop()
            return False
        if self._conn.notifies:
            del self._conn.notifies[:]
            self._forget()
        return True

    def _connect(self) -> None:
        """Start listening, unless another thread is at it or the last try was moments ago."""
        if time.monotonic() < self._retry_at or not self._connecting.acquire(blocking=False):
            return
        try:
            # libpq's connect_timeout is whole seconds. A server gone silent is found as the pool's
            # connections find it (25 s), not at MAX_AGE_SECONDS: until then a revoked key was served.
            # Through the pool's Patience: during an outage (a partition, a stalled server) the request
            # that came to listen waited its connect timeout here, every RECONNECT_SECONDS, and then as
            # long again for its own connection (4 s, not 2, at the defaults). Now a server the pool
            # found silent lately fails this at once, and one found silent here fails the request's own
            # connection at once.
            made = {} if self._patience is None else {
                "connection_factory": partial(NotifierConnection, patience=self._patience)}
            conn = psycopg2.connect(self._url, connect_timeout=max(1, math.ceil(self._connect_timeout)),
                                    application_name="notifier-api-keycache",
                                    **tcp_liveness(parse_dsn(self._url)), **made)
            conn.autocommit = True
            # The connect is bounded by its timeout, its one statement is not (a connection made without
            # the pool's Patience has none to probe the server with): a server that stalled right after taking the
            # connection held the request that came to listen for as long as the stall lasted.
            with answer_within(self._connect_timeout), conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
        except psycopg2.Error as exc:
            logger.warning("API key cache off, cannot listen: %s", type(exc).__name__)
            self._retry_at = time.monotonic() + RECONNECT_SECONDS
            return
        finally:
            self._connecting.release()
        with self._lock:
            if self._conn is not None or self._pid != os.getpid():
                conn.close()
                return
            # Whatever was cached before this LISTEN may have changed unheard.
            self._conn = conn
            self._forget()

    def _forget(self) -> None:
        self._keys.clear()
        self._generation += 1

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._forget()
        self._retry_at = time.monotonic() + RECONNECT_SECONDS
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass
