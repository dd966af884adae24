"""Fixtures: real PostgreSQL, Redis and SMTP for integration tests; SQLite and fakeredis for unit tests."""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import psycopg2
import pytest
from redis import Redis

from app import create_app
from notifier import jobs, keys, queues
from notifier.config import Settings
from notifier.db import bind, database
from notifier.devmail import CaptureHandler, start
from notifier.jobs import Deliverer
from notifier.mail import MemoryMailer, SmtpMailer
from notifier.models import MODELS
from notifier.runtime import make_renderer
from notifier.schema import upgrade

PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
# pytest-xdist's worker (gw0, gw1, ...), or "" in a run without it.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _redis_url() -> str:
    # One Redis database per pytest-xdist worker, counting down from TEST_REDIS_URL's (15 by default):
    # each test flushes its own database, and RQ's registries of workers and jobs live in it.
    url = urlsplit(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    number = int(url.path.strip("/") or 0)  # as redis-py reads it: no database is database 0
    db = number - (int(XDIST_WORKER[2:]) if XDIST_WORKER else 0)
    if db < 0:
        raise pytest.UsageError(f"too many pytest-xdist workers for TEST_REDIS_URL's database {number}")
    return urlunsplit(url._replace(path=f"/{db}"))


REDIS_URL = _redis_url()


def _pg_database_name() -> str:
    # One database per run (TEST_DB_SUFFIX) and per pytest-xdist worker, so parallel runs never collide.
    suffix = (os.environ.get("TEST_DB_SUFFIX") or "main") + XDIST_WORKER
    return f"notifier_test_{re.sub(r'[^a-z0-9]', '', suffix.lower())}"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh PostgreSQL database for this test session."""
    name = _pg_database_name()
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def smtp_server():
    """A real SMTP server (aiosmtpd) in this process, for the whole session."""
    handler = CaptureHandler()
    controller = start(handler)
    yield handler, controller
    controller.stop()


@pytest.fixture
def smtp(smtp_server) -> CaptureHandler:
    """The SMTP server's handler, emptied for this test."""
    handler, _ = smtp_server
    handler.messages.clear()
    handler.replies.clear()
    handler.mail_replies.clear()
    handler.rcpt_replies.clear()
    handler.delay = 0.0
    handler.before_reply = None
    yield handler
    handler.replies.clear()
    handler.delay = 0.0
    handler.before_reply = None


@pytest.fixture
def proxy():
    """A CutProxy in front of the real PostgreSQL (tests/cutproxy.py): it cuts or stalls on demand."""
    from tests.cutproxy import CutProxy

    p = CutProxy(5432)
    yield p
    p.close()


@pytest.fixture
def redis_conn():
    """The real Redis, on a database of its own, flushed around each test."""
    conn = Redis.from_url(REDIS_URL)
    conn.flushdb()
    _up_for_a_day(conn)
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture
def fake_redis():
    return _up_for_a_day(fakeredis.FakeRedis())


def _up_for_a_day(conn):
    """conn as a Redis that has remembered the running jobs for a day (queues.REMEMBERS_SINCE_KEY), as
    one that has not restarted lately: the reconciler may take back what a test claimed minutes ago."""
    conn.set(queues.REMEMBERS_SINCE_KEY, f"{time.time() - 86400:.3f}")
    return conn


def _settings(**overrides) -> Settings:
    base = Settings(
        retry_intervals=(0, 0, 0),
        mail_from="notifier@example.com",
        smtp_timeout=5,
        brand_name="Acme",
    )
    return replace(base, **overrides)


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    return _settings(database_url=f"sqlite:///{tmp_path}/notifier.db", redis_url="redis://fake/0")


@pytest.fixture
def pg_settings(pg_url, smtp_server) -> Settings:
    _, controller = smtp_server
    return _settings(database_url=pg_url, redis_url=REDIS_URL, smtp_host="127.0.0.1", smtp_port=controller.port)


def _bind_clean(url: str):
    db = bind(url)
    upgrade(db)
    with db.connection_context():
        for model in reversed(MODELS):
            if model.__name__ != "SchemaVersion":
                model.delete().execute()
    return db


@pytest.fixture
def sqlite_db(sqlite_settings):
    """The database proxy bound to a new SQLite file (unit tests)."""
    db = _bind_clean(sqlite_settings.database_url)
    db.connect(reuse_if_open=True)
    yield db
    db.close()


@pytest.fixture
def pg_db(pg_settings):
    """The database proxy bound to the real PostgreSQL test database, emptied before the test."""
    db = _bind_clean(pg_settings.database_url)
    yield db
    if not db.is_closed():
        db.close()
    db.close_all()


@pytest.fixture
def api_key(pg_db):
    """A live API key: (model, plaintext)."""
    with database.connection_context():
        return keys.create("test-service")


@pytest.fixture
def other_key(pg_db):
    with database.connection_context():
        return keys.create("other-service")


@pytest.fixture
def app(pg_settings, pg_db, redis_conn):
    """The API on real PostgreSQL and Redis."""
    application = create_app(pg_settings, redis=redis_conn)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def headers(api_key):
    return {"X-API-Key": api_key[1]}


@pytest.fixture
def deliverer(pg_settings, pg_db):
    """A Deliverer sending over real SMTP to the test server, installed for in-process workers."""
    mailer = SmtpMailer(pg_settings)
    instance = Deliverer(pg_settings, mailer, make_renderer(pg_settings))
    jobs.install(instance)
    yield instance
    mailer.close()
    jobs.install(None)


@pytest.fixture
def fast_settings(pg_settings) -> Settings:
    """pg_settings with callbacks retried at once, so a burst worker runs every attempt."""
    return replace(pg_settings, callback_retry_intervals=(0, 0, 0))


@pytest.fixture
def api(fast_settings, pg_db, redis_conn):
    """A test client of the API on fast_settings."""
    application = create_app(fast_settings, redis=redis_conn)
    application.config["TESTING"] = True
    return application.test_client()


@pytest.fixture
def live_deliverer(fast_settings, pg_db, redis_conn):
    """A Deliverer on fast_settings with Redis, so reaching a final state queues the callbacks owed."""
    from tests.helpers import installed_deliverer

    with installed_deliverer(fast_settings, redis_conn) as deliverer:
        yield deliverer


@pytest.fixture
def memory_deliverer(sqlite_settings, sqlite_db):
    """A Deliverer with the in-memory mailer, for unit tests."""
    instance = Deliverer(sqlite_settings, MemoryMailer("notifier@example.com"), make_renderer(sqlite_settings))
    jobs.install(instance)
    yield instance
    jobs.install(None)


@pytest.fixture
def receiver():
    """A caller's callback endpoint (tests/receiver.Receiver), running for this test."""
    from tests.receiver import Receiver

    instance = Receiver()
    instance.start()
    yield instance
    instance.close()


@pytest.fixture
def stacks(pg_settings, pg_db, redis_conn, smtp, tmp_path):
    """Make real app.py/worker.py/scheduler.py stacks (tests/processes.Stack); all killed afterwards."""
    from tests.processes import Stack

    made = []

    def make(settings, **env) -> Stack:
        made.append(Stack(settings, tmp_path, **env))
        return made[-1]

    yield make
    for stack in made:
        stack.close()


@pytest.fixture
def database_outage(pg_settings):
    """(begin, end) of an outage of this test's own database, as in a failover that takes a while:
    begin() refuses new connections and cuts the open ones, end() lets clients connect again. The
    database is given back after the test whatever happened."""
    from tests.helpers import allow_connections

    name = pg_settings.database_url.rsplit("/", 1)[1]
    yield lambda: allow_connections(name, False), lambda: allow_connections(name, True)
    allow_connections(name, True)


# The fixtures that reach a real service: a test that uses one, however indirectly, is an integration
# test whether or not its module says so, and `make unit` (-m "not integration") leaves it out.
_REAL_SERVICES = frozenset({"pg_url", "redis_conn", "smtp_server", "database_outage"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _REAL_SERVICES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
