"""DATABASE_URL is read as libpq reads it, by every connection notifier makes: several hosts for a
failover pair, a percent-encoded user name or password, libpq's own query parameters."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg2.extensions import parse_dsn

from app import create_app
from notifier import store
from notifier.config import ConfigError, Settings
from notifier.db import connect, database


def _with_netloc(url: str, netloc: str, query: str = "") -> str:
    return urlunsplit(urlsplit(url)._replace(netloc=netloc, query=query))


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"


def _user(url: str) -> str:
    return urlsplit(url).username or "postgres"


def _connected_user(url: str) -> str:
    db = connect(Settings.from_env({"DATABASE_URL": url}).database_url)
    try:
        with db.connection_context():
            return db.execute_sql("SELECT current_user").fetchone()[0]
    finally:
        db.close_all()


def test_several_hosts_connect_to_the_first_that_answers(pg_url):
    # Port 1 refuses at once, as a failed primary's host does; libpq goes on to the next host.
    url = _with_netloc(pg_url, f"{_user(pg_url)}@127.0.0.1:1,{_host_port(pg_url)}",
                       "target_session_attrs=read-write")
    assert _connected_user(url) == _user(pg_url)


def test_a_percent_encoded_user_name_is_decoded(pg_url):
    # peewee's db_url passed "p%6Fstgres" on as it stood: no such role, and the database never answered.
    user = _user(pg_url)
    encoded = "".join(f"%{ord(c):02X}" if i == 1 else c for i, c in enumerate(user))
    url = _with_netloc(pg_url, f"{encoded}:s%2Fcret%40@{_host_port(pg_url)}")
    assert _connected_user(url) == user


def test_the_api_sends_through_several_hosts(pg_settings, pg_db, redis_conn, api_key, pg_url):
    # The pooled connections and the API key cache's listening one alike.
    url = _with_netloc(pg_url, f"{_user(pg_url)}@127.0.0.1:1,{_host_port(pg_url)}")
    app = create_app(replace(pg_settings, database_url=Settings.from_env({"DATABASE_URL": url}).database_url),
                     redis=redis_conn)
    response = app.test_client().post("/api/notifications/send", headers={"X-API-Key": api_key[1]},
                                      json={"to": "dora@example.com", "subject": "Hi", "text": "Hello"})
    assert response.status_code == 202, response.json
    with database.connection_context():
        assert store.get(response.json["id"]).status == "queued"


@pytest.mark.parametrize("url", [
    "postgresql://notifier:secret@db1:5432,db2:5432/notifier?target_session_attrs=read-write",
    "postgresql://notifier:s%2Fc%23r%3Fet@db/notifier?sslmode=require&connect_timeout=3",
    "postgres:///notifier?host=/var/run/postgresql",
    "postgresql://db1,db2:6543/notifier",
])
def test_what_libpq_reads_is_accepted(url):
    assert Settings.from_env({"DATABASE_URL": url}).database_url == url


def _refusal(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"DATABASE_URL": url})
    assert caught.value.setting == "DATABASE_URL"
    assert "ZQ" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("url", [
    "postgresql://notifier:ZQ/pass@db:5432/notifier",
    "postgresql://notifier:ZQpass@db1:5432,db2:ZQ/notifier",
    "postgresql://notifier:ZQpass@db:99999/notifier",
    "postgresql://notifier:ZQpass@db:\u00b2\u00b3/notifier",
    # libpq ends the user part at the first "@" (urllib, and peewee, at the last): the password's end
    # would be a host name to look up, logged with every try.
    "postgresql://notifier:ZQ@pass@db:5432/notifier",
])
def test_a_port_that_is_not_one_is_refused_without_quoting_the_password(url):
    assert "percent-encode" in _refusal(url)


def test_a_query_parameter_of_peewees_is_named():
    # peewee's own (stale_timeout, max_connections) went to peewee before; libpq refuses them, and
    # the pool's size and timeouts have settings of their own.
    assert "stale_timeout" in _refusal("postgresql://notifier:ZQpass@db/notifier?stale_timeout=30")


@pytest.mark.parametrize("url", ["postgresql://u:ZQ/x?ZQsecret=1@db/notifier",
                                 "postgresql://u:ZQ/x?ZQsec%72et=1@db/notifier"])
def test_a_query_parameter_that_may_be_the_passwords_end_is_not_quoted(url):
    assert "query parameter libpq does not know" in _refusal(url)


@pytest.mark.parametrize("timeout", ["0", "abc", "2.5", "601"])
def test_a_connect_timeout_in_the_url_is_held_to_database_connect_timeouts_bounds(timeout):
    # libpq's 0 waits for ever; Patience took the URL's value as its own limit, so a stalled server
    # was waited for without end (and "abc" stopped connect() with a ValueError).
    assert "connect_timeout" in _refusal(f"postgresql://notifier:ZQpass@db/notifier?connect_timeout={timeout}")


def test_a_url_without_a_database_is_refused():
    assert "names no database" in _refusal("postgresql://notifier:ZQpass@db:5432")


@pytest.mark.parametrize("password", ["ZQ#pass", "ZQ?pass"])
def test_a_hash_or_question_mark_in_the_password_is_read_as_libpq_reads_it(password):
    # libpq takes the user part up to the last "@": the password is whole, as psql would send it.
    url = f"postgresql://notifier:{password}@db:5432/notifier"
    assert parse_dsn(Settings.from_env({"DATABASE_URL": url}).database_url)["password"] == password
