"""Plain functions the tests share: factories and a worker run to completion."""

from __future__ import annotations

import itertools
import os
import socket
import threading

import psycopg2

from notifier import store
from notifier.db import database
from notifier.models import ApiKey, Notification, Status
from tests.conftest import PG_ADMIN_URL

VERIFICATION = {"to": "ada@example.com", "user_id": "u1", "code": "123456", "name": "Ada"}
LITERAL = {"to": "bob@example.com", "subject": "Hello", "text": "Plain body", "html": "<p>HTML body</p>"}


def make_notification(api_key: ApiKey, status: Status = Status.QUEUED, **fields) -> Notification:
    """Store a literal notification directly (no API), in the given status."""
    values = {"to": "carol@example.com", "subject": "Hi", "text": "Hello", "priority": "default"} | fields
    with database.connection_context():
        return store.create_notification(api_key, values, status=status)


def reload(notification_id: str) -> Notification:
    with database.connection_context():
        return store.get(notification_id)


def run_worker_until_idle(connection) -> None:
    """Run an in-process worker in burst mode: every queued job, including immediate retries."""
    from worker import make_worker

    make_worker(connection).work(burst=True, with_scheduler=False)


def notification_count() -> int:
    """How many notifications the database holds, whoever owns them."""
    with database.connection_context():
        return Notification.select().count()


def installed_deliverer(settings, redis):
    """Install a Deliverer on real SMTP that also queues callbacks and releases (it has Redis).

    A context manager: `with installed_deliverer(settings, redis_conn) as deliverer: ...`; on exit the
    mailer is closed and no deliverer is installed."""
    from contextlib import contextmanager

    from notifier import jobs
    from notifier.jobs import Deliverer
    from notifier.mail import SmtpMailer
    from notifier.runtime import make_renderer

    @contextmanager
    def _installed():
        mailer = SmtpMailer(settings)
        deliverer = Deliverer(settings, mailer, make_renderer(settings), redis)
        jobs.install(deliverer)
        try:
            yield deliverer
        finally:
            mailer.close()
            jobs.install(None)

    return _installed()


def wait_for_arrivals(smtp, n: int, timeout: float = 20.0) -> list[float]:
    """Watch the test SMTP server until it holds n messages; when each was first seen (time.time()).

    The server keeps no times of its own, so this polls its count every few milliseconds: each time
    is at most a poll later than the real arrival, which makes it a fair upper bound for "no later
    than" checks. For "no earlier than", compare with the notification's `sending` history line."""
    import time

    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        count = smtp.count()
        now = time.time()
        seen.extend(now for _ in range(count - len(seen)))
        time.sleep(0.005)
    return seen


def eventually(predicate, timeout: float = 2.0) -> bool:
    """Whether predicate() comes true within timeout: for what another connection tells the API
    (a key revoked elsewhere reaches its cache as a PostgreSQL notification, milliseconds later)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def drop_connections(database: str) -> int:
    """What clients see when PostgreSQL restarts: every connection to the database is cut."""
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> "
            "pg_backend_pid()",
            (database,),
        )
        (count,) = cur.fetchone()
    admin.close()
    return count


def allow_connections(database: str, allowed: bool) -> None:
    """Let PostgreSQL take new connections to the database, or refuse them as while it restarts (the
    ones it has are cut too)."""
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
    admin.close()
    if not allowed:
        drop_connections(database)


def concurrently(n: int, call):
    """Run call() in n threads released at the same instant; return their results in order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def held_reply(smtp, n: int = 1) -> tuple[threading.Event, threading.Event]:
    """Hold the test SMTP server's answer to the nth DATA until the test lets it go: (arrived, release).

    Between the two the client is waiting for that answer, so what the test does then (kill the
    worker, take the database away) happens mid-DATA however slow the machine, where a slow server
    (`smtp.delay`) only made it likely."""
    arrived, release, replies = threading.Event(), threading.Event(), itertools.count(1)

    def hold() -> None:
        if next(replies) == n:
            arrived.set()
            release.wait(30)

    smtp.before_reply = hold
    return arrived, release


def tcp_options(conn) -> tuple[int, int, int, int, int]:
    """What the kernel was told about a psycopg2 connection's socket: SO_KEEPALIVE, then TCP_KEEPIDLE,
    TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                *(sock.getsockopt(socket.IPPROTO_TCP, option) for option in (
                    socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)))
    finally:
        sock.close()
