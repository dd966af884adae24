"""Access and limits: per-key rate limits (also across API processes), rotation, revocation, the
per-recipient cap, and one key never reaching another's data on any route."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg2
import pytest

from app import create_app
from notifier import keys
from notifier.db import database
from notifier.models import ApiKey, Status
from notifier.ratelimit import Limiter, parse_rate
from tests.helpers import LITERAL, eventually, make_notification, run_worker_until_idle
from tests.processes import Stack, cli, request

pytestmark = pytest.mark.integration

WELCOME = {"to": "ann@example.com", "template": "welcome", "user_id": "u1"}
VERIFY = {"to": "ann@example.com", "user_id": "u1", "code": "123456"}


def _key(name: str, rate: str | None = None) -> str:
    with database.connection_context():
        return keys.create(name, rate_limit=rate)[1]


def test_rate_limit_per_key_with_headers_and_429(client, pg_db):
    slow, other = _key("slow", "3/minute"), _key("other", "3/minute")
    answers = [client.get("/api/notifications", headers={"X-API-Key": slow}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["RateLimit-Limit"] == "3" for a in answers)
    refused = answers[-1]
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert 0 < int(refused.headers["RateLimit-Reset"]) <= 60
    # One key's limit is its own.
    assert client.get("/api/notifications", headers={"X-API-Key": other}).status_code == 200


def test_default_rate_limit_applies_to_keys_without_their_own(pg_settings, pg_db, redis_conn):
    key = _key("default-rate")
    client = create_app(replace(pg_settings, rate_limit="2/minute"), redis=redis_conn).test_client()
    codes = [client.get("/api/notifications", headers={"X-API-Key": key}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.parametrize("stored", ["0/second", "fast", "2/minute;20/day", "1/99999999999999999999 seconds",
                                    "99999999999999999999/second"])
def test_a_rate_stored_before_rates_were_bounded_gives_way_to_rate_limit(pg_settings, pg_db, redis_conn, stored):
    # Each did something else: 429 forever, a 500 on every request, only its first rate, a window of
    # 10^20 s, and no limit at all (Redis refused its numbers).
    key = _key(f"legacy-{stored}")
    with database.connection_context():
        ApiKey.update(rate_limit=stored).where(ApiKey.name == f"legacy-{stored}").execute()
    client = create_app(replace(pg_settings, rate_limit="2/minute"), redis=redis_conn).test_client()
    answers = [client.get("/api/notifications", headers={"X-API-Key": key}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["RateLimit-Limit"] == "2"


def test_rate_limit_holds_across_two_api_processes(pg_settings, pg_db, redis_conn, smtp, tmp_path):
    first = Stack(pg_settings, tmp_path).start("api")
    second = Stack(pg_settings, tmp_path)
    second.start("api2")
    try:
        key = cli(["keys", "create", "shared", "--rate", "6/minute"], first.env).strip().splitlines()[-1]
        codes = []
        for i in range(10):
            base = first.base if i % 2 == 0 else second.base
            codes.append(request("GET", f"{base}/api/notifications", key)[0])
        assert codes.count(200) == 6 and codes.count(429) == 4
        assert codes[:6] == [200] * 6
    finally:
        first.close()
        second.close()


def test_an_operator_changes_a_keys_rate_and_the_running_api_takes_it(pg_settings, pg_db, redis_conn, tmp_path):
    stack = Stack(pg_settings, tmp_path).start("api")
    try:
        key = cli(["keys", "create", "busy", "--rate", "2/minute"], stack.env).strip().splitlines()[-1]
        assert [request("GET", f"{stack.base}/api/notifications", key)[0] for _ in range(3)] == [200, 200, 429]

        assert "'busy' now takes 5/minute" in cli(["keys", "rate", "busy", "5/minute"], stack.env)
        assert eventually(lambda: request("GET", f"{stack.base}/api/notifications", key)[0] == 200)
        assert "\t5/minute\t" in cli(["keys", "list"], stack.env)

        # One stored before rates were bounded: `keys list` says so and how to mend it.
        with database.connection_context():
            ApiKey.update(rate_limit="1/99999999999999999999 seconds").where(ApiKey.name == "busy").execute()
        assert "(out of bounds: RATE_LIMIT applies instead; `keys rate busy RATE` changes it)" in cli(
            ["keys", "list"], stack.env)
        assert "RATE_LIMIT" in cli(["keys", "rate", "busy", "--default"], stack.env)
        assert "\tdefault rate\t" in cli(["keys", "list"], stack.env)
    finally:
        stack.close()


def test_rotation_keeps_the_old_secret_until_it_is_revoked(client, pg_db):
    old = _key("rotating")
    with database.connection_context():
        new = keys.rotate("rotating")
    created = client.post("/api/notifications/send", json=LITERAL, headers={"X-API-Key": old}).get_json()
    # Same service, same notifications, whichever secret asks.
    assert client.get(f"/api/notifications/{created['id']}", headers={"X-API-Key": new}).status_code == 200
    with database.connection_context():
        assert keys.revoke("rotating", old_only=True)
    assert eventually(lambda: client.get("/api/notifications", headers={"X-API-Key": old}).status_code == 401)
    assert client.get("/api/notifications", headers={"X-API-Key": new}).status_code == 200
    with database.connection_context():
        assert keys.revoke("rotating")
    assert eventually(lambda: client.get("/api/notifications", headers={"X-API-Key": new}).status_code == 401)


def test_a_revoke_made_while_a_rotation_waits_for_the_row_stays_made(pg_db, pg_url):
    # rotate() read the key, then saved every column: a revoke committed in between was written
    # back as not revoked, and both secrets worked again.
    old = _key("racing")
    holder = psycopg2.connect(pg_url)
    rotated = {}
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM api_keys WHERE name = 'racing' FOR UPDATE")

        def rotate():
            with database.connection_context():
                rotated["it"] = keys.rotate("racing")

        thread = threading.Thread(target=rotate)
        thread.start()
        time.sleep(0.5)  # the rotation waits for the row
        with holder.cursor() as cur:
            cur.execute("UPDATE api_keys SET revoked_at = now() WHERE name = 'racing' AND revoked_at IS NULL")
        holder.commit()
        thread.join(10)
    finally:
        holder.close()
    assert rotated == {"it": None}  # no live key left to rotate
    with database.connection_context():
        assert keys.authenticate(old) is None
        assert ApiKey.get(ApiKey.name == "racing").revoked_at is not None


def test_recipient_cap_stops_non_transactional_floods_only(pg_settings, pg_db, redis_conn, api_key, smtp, deliverer):
    client = create_app(replace(pg_settings, recipient_cap="2/hour"), redis=redis_conn).test_client()
    hdrs = {"X-API-Key": api_key[1]}
    welcome = [client.post("/api/notifications/send", json=WELCOME, headers=hdrs).get_json() for _ in range(3)]
    assert [w["status"] for w in welcome] == ["queued", "queued", "suppressed"]
    capped = client.get(f"/api/notifications/{welcome[2]['id']}", headers=hdrs).get_json()
    assert "recipient cap" in capped["history"][-1]["reason"]
    verify = [client.post("/api/notifications/send-verification", json=VERIFY, headers=hdrs).get_json()
              for _ in range(4)]
    assert {v["status"] for v in verify} == {"queued"}
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 6


def test_the_recipient_cap_holds_across_api_processes_without_keeping_the_address_in_redis(pg_settings, pg_db,
                                                                                           redis_conn, api_key):
    # Its counters were named by the address, lower-cased: kept in Redis for the whole window, after the
    # user's erasure too, for anyone reading Redis to see. Now a keyed hash names them.
    settings = replace(pg_settings, recipient_cap="3/hour", secret_key="s1")
    one, two = (create_app(settings, redis=redis_conn).test_client() for _ in range(2))
    hdrs = {"X-API-Key": api_key[1]}

    def send(client, to: str) -> str:
        return client.post("/api/notifications/send", json={**WELCOME, "to": to}, headers=hdrs).get_json()["status"]

    # Two API processes count into one window, whatever the letter case.
    sent = [send(client, to) for client, to in ((one, "Ann.Smith@Example.com"), (two, "ann.smith@example.com"),
                                                 (one, "ANN.SMITH@example.com"), (two, "ann.smith@EXAMPLE.com"),
                                                 (one, "ann.smith@example.com"))]
    assert sent == ["queued", "queued", "queued", "suppressed", "suppressed"]
    # One started later (a restart) finds the same window while SECRET_KEY stays ...
    assert send(create_app(settings, redis=redis_conn).test_client(), "ann.smith@example.com") == "suppressed"
    # ... and a new SECRET_KEY starts a new one (README: the cap's window restarts with a rotation).
    rotated = replace(settings, secret_key="s2", secret_key_fallbacks=("s1",))
    assert send(create_app(rotated, redis=redis_conn).test_client(), "ann.smith@example.com") == "queued"

    names = [key.decode() for key in redis_conn.scan_iter(count=1000)]
    assert [name for name in names if "ann" in name.lower() or "example.com" in name.lower()] == []
    counters = [name for name in names if "/recipient/" in name]
    assert len(counters) == 2  # one per SECRET_KEY
    for name in counters:  # and nothing of the address in what they hold either
        assert not any(b"ann" in item.lower() for item in redis_conn.lrange(name, 0, -1))


def test_no_route_lets_one_key_reach_another_keys_data(client, headers, api_key, other_key, redis_conn, smtp,
                                                       deliverer):
    theirs = {"X-API-Key": other_key[1]}
    mine = client.post("/api/notifications/send", json={**LITERAL, "user_id": "u7"}, headers=headers).get_json()
    failed = make_notification(api_key[0], status=Status.FAILED, user_id="u7")
    assert client.put("/api/users/u7/preferences", json={"categories": {"product": "off"}},
                      headers=headers).status_code == 200
    from notifier.consent import suppress

    with database.connection_context():
        suppress(api_key[0].id, "gone@example.com", "550 5.1.1 no such user")

    assert client.get(f"/api/notifications/{mine['id']}", headers=theirs).status_code == 404
    assert client.post(f"/api/notifications/{mine['id']}/cancel", headers=theirs).status_code == 404
    assert client.get("/api/notifications", headers=theirs).get_json()["data"] == []
    assert client.get("/api/notifications/user/u7/stats", headers=theirs).get_json()["total"] == 0
    assert client.get("/api/dead-letters", headers=theirs).get_json()["data"] == []
    assert client.post(f"/api/dead-letters/{failed.id}/requeue", headers=theirs).status_code == 404
    assert client.get("/api/users/u7/preferences", headers=theirs).get_json()["categories"]["product"] == "immediate"
    assert client.get("/api/suppressions", headers=theirs).get_json()["data"] == []
    assert client.delete("/api/suppressions/gone@example.com", headers=theirs).status_code == 404
    # ... and all of it is still there for its owner.
    assert client.get(f"/api/notifications/{mine['id']}", headers=headers).status_code == 200
    assert len(client.get("/api/suppressions", headers=headers).get_json()["data"]) == 1


def test_a_rate_redis_refuses_is_logged_as_refused_not_as_redis_away(pg_settings, redis_conn, caplog):
    # A key's rate stored before rates were bounded: Redis answers the check with an error.
    verdict = Limiter(pg_settings.redis_url).hit(parse_rate("1/99999999999999999999 seconds"), "absurd")
    assert verdict.allowed
    assert "Redis refused its check: ResponseError" in caplog.text and "unreachable" not in caplog.text


def test_a_unix_socket_redis_url_is_one_the_limits_take(tmp_path):
    # limits names it redis+unix://: the API did not start with the REDIS_URL the workers took.
    limiter = Limiter(f"unix://{tmp_path}/no-redis.sock?db=0")
    assert limiter.hit(parse_rate("1/second"), "unix").allowed  # no Redis there: given way, not a crash


def test_one_slow_reply_to_another_limit_does_not_unlock_an_operator_guesser(pg_settings, redis_conn):
    # Found by a review: one Redis timeout anywhere in the process (here a recipient cap's) had every
    # limit given way for 2 s, and a strict one asked only this process's own, empty, window.
    from redis.exceptions import TimeoutError as RedisTimeout

    limiter = Limiter(pg_settings.redis_url)
    failures = parse_rate("2/minute")
    for _ in range(2):
        limiter.hit(failures, "operator-auth", "198.51.100.0", strict=True)
    assert not limiter.check(failures, "operator-auth", "198.51.100.0", strict=True).allowed
    real = limiter._limiter.hit

    def slow_once(*args, **kwargs):
        limiter._limiter.hit = real
        raise RedisTimeout("Timeout reading from socket")

    limiter._limiter.hit = slow_once
    assert limiter.allows(parse_rate("20/hour"), "recipient", "1", "someone@example.com")  # given way
    assert limiter.allows(parse_rate("1/hour"), "recipient", "1", "someone@example.com")  # not asked for 2 s
    assert not limiter.check(failures, "operator-auth", "198.51.100.0", strict=True).allowed
