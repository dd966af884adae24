"""The API's key cache on the real PostgreSQL: every change to api_keys, however made, empties it."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from notifier import keycache, keys
from notifier.db import database
from notifier.keycache import KeyCache
from tests.helpers import eventually, tcp_options

pytestmark = pytest.mark.integration


class CountingLoad:
    """keys' own loader, counting how often the cache had to ask the database."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prefix):
        self.calls += 1
        return keys._by_prefix(prefix)


@pytest.fixture
def cache(pg_settings, pg_db):
    made = KeyCache(pg_settings.database_url)
    yield made
    made.close()


def _prefix(plaintext: str) -> str:
    return plaintext.split("_", 2)[1]


def test_an_unchanged_key_is_read_from_the_database_once(cache, api_key):
    load = CountingLoad()
    with database.connection_context():
        cache.lookup(_prefix(api_key[1]), lambda p: None)  # the first lookup starts listening
        for _ in range(5):
            assert cache.lookup(_prefix(api_key[1]), load).id == api_key[0].id
        assert keys.authenticate(api_key[1], cache).id == api_key[0].id
    assert load.calls == 1


def test_a_revoke_empties_the_cache(cache, api_key):
    load = CountingLoad()
    with database.connection_context():
        for _ in range(3):
            assert cache.lookup(_prefix(api_key[1]), load) is not None
        assert load.calls == 2  # cached from the second lookup on
        keys.revoke(api_key[0].name)
        assert eventually(lambda: keys.authenticate(api_key[1], cache) is None)


def test_a_change_typed_by_hand_empties_the_cache_too(cache, api_key, pg_settings):
    load = CountingLoad()
    with database.connection_context():
        for _ in range(3):
            cache.lookup(_prefix(api_key[1]), load)
    assert load.calls == 2
    other = psycopg2.connect(pg_settings.database_url)
    with other, other.cursor() as cur:
        cur.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (api_key[0].id,))
    other.close()
    with database.connection_context():
        assert eventually(lambda: cache.lookup(_prefix(api_key[1]), load).revoked_at is not None)
        assert keys.authenticate(api_key[1], cache) is None
    assert load.calls >= 3


def test_a_change_heard_while_loading_is_not_cached(cache, api_key, other_key):
    other, other_load = _prefix(other_key[1]), CountingLoad()

    def load_then_revoke(prefix):
        found = keys._by_prefix(prefix)
        keys.revoke(api_key[0].name)  # lands between the read and the caching...
        calls = other_load.calls
        # ...and another request's lookup hears of it meanwhile (the cache drops the other key too).
        assert eventually(lambda: cache.lookup(other, other_load) is not None and other_load.calls > calls)
        return found

    with database.connection_context():
        cache.lookup(other, other_load)  # listening from here on
        cache.lookup(other, other_load)  # the other key is cached
        assert cache.lookup(_prefix(api_key[1]), load_then_revoke).revoked_at is None  # the stale read
        assert keys.authenticate(api_key[1], cache) is None  # at once: it was never cached


def _end_listening_session(pg_settings) -> None:
    """What a PostgreSQL restart does to the cache's listening connection: its session ends, and the
    server's goodbye is on the cache's socket when this returns (the server process has exited)."""
    admin = psycopg2.connect(pg_settings.database_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                    "WHERE application_name = 'notifier-api-keycache' AND datname = current_database()")
        assert all(ended for (ended,) in cur.fetchall()), "the listening session outlived 10 s"
    admin.close()


def test_a_lost_listening_connection_turns_the_cache_off_until_it_is_back(cache, api_key, pg_settings, monkeypatch):
    monkeypatch.setattr(keycache, "RECONNECT_SECONDS", 0.2)
    load = CountingLoad()
    prefix = _prefix(api_key[1])
    with database.connection_context():
        cache.lookup(prefix, load)
        cache.lookup(prefix, load)
        assert load.calls == 2  # the first started listening, the second is kept
        cache.lookup(prefix, load)
        assert load.calls == 2
        _end_listening_session(pg_settings)
        # While it is down every lookup asks the database, so a change then cannot be missed.
        # The cache notices once the closed socket reaches it; from then on it asks the database.
        assert eventually(lambda: cache.lookup(prefix, load) is not None and load.calls >= 3)
        calls = load.calls
        cache.lookup(prefix, load)
        assert load.calls == calls + 1
        time.sleep(0.3)
        cache.lookup(prefix, load)  # starts listening again
        cache.lookup(prefix, load)  # listening: this one is kept
        calls = load.calls
        cache.lookup(prefix, load)
        assert load.calls == calls


def test_a_key_revoked_after_the_listening_connection_died_is_never_served_from_the_cache(
        cache, api_key, pg_settings):
    load = CountingLoad()
    prefix = _prefix(api_key[1])
    with database.connection_context():
        cache.lookup(prefix, load)
        cache.lookup(prefix, load)  # cached from here on
        _end_listening_session(pg_settings)  # the revocation's NOTIFY will never be on the cache's socket
        keys.revoke(api_key[0].name)
        assert keys.authenticate(api_key[1], cache) is None


def test_the_listening_connection_finds_a_server_gone_silent_as_the_pool_does(pg_settings, pg_db, api_key):
    # Its keepalives found a silent server in 60 s, MAX_AGE_SECONDS, so a key revoked meanwhile was
    # served from the cache (its NOTIFY lost) as long as a partition lasted, up to that minute.
    for url, told in ((pg_settings.database_url, (1, 10, 5, 3, 10_000)),
                      (f"{pg_settings.database_url}?keepalives_idle=60", (1, 60, 5, 3, 10_000))):
        made = KeyCache(url)
        try:
            with database.connection_context():
                made.lookup(_prefix(api_key[1]), CountingLoad())  # starts listening
            assert tcp_options(made._conn) == told  # the URL's own values win
        finally:
            made.close()


def test_no_database_to_listen_on_means_no_cache_and_no_error(api_key, monkeypatch):
    cache = KeyCache("postgresql://nobody@127.0.0.1:1/none")
    load = CountingLoad()
    with database.connection_context():
        assert cache.lookup(_prefix(api_key[1]), load).id == api_key[0].id
        assert cache.lookup(_prefix(api_key[1]), load).id == api_key[0].id
    assert load.calls == 2


def test_a_server_that_stalls_before_answering_listen_holds_the_request_no_longer_than_the_connect_timeout(
        api_key, pg_settings, proxy):
    # The connection is made; the LISTEN gets no answer. The request that came to listen hung for as
    # long as the stall lasted.
    cache = KeyCache(proxy.url(pg_settings.database_url.rsplit("/", 1)[1]), 1.0)
    proxy.stall(at=b"LISTEN")
    load = CountingLoad()
    found = []

    def request():
        with database.connection_context():  # the test's own database, not behind the proxy
            found.append(cache.lookup(_prefix(api_key[1]), load))

    started = time.monotonic()
    thread = threading.Thread(target=request, daemon=True)  # a hang fails the test, not the run
    thread.start()
    thread.join(10)
    waited = time.monotonic() - started
    proxy.resume()
    thread.join(10)
    cache.close()
    assert waited < 2.0
    assert [key.id for key in found] == [api_key[0].id]
    assert load.calls == 1


def test_the_api_answers_401_once_a_key_is_revoked_elsewhere(client, headers, api_key, pg_settings):
    assert client.get("/api/notifications", headers=headers).status_code == 200
    other = psycopg2.connect(pg_settings.database_url)
    with other, other.cursor() as cur:
        cur.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (api_key[0].id,))
    other.close()
    assert eventually(lambda: client.get("/api/notifications", headers=headers).status_code == 401)
