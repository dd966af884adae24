"""POST /api/notifications/batch: each item accepted or refused on its own, stored in bulk, queued in
one pipeline, idempotent per item and per batch."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import replace

import psycopg2
import pytest
from rq import Queue

from app import create_app
from notifier.consent import suppress
from notifier.db import database
from notifier.models import Event, Notification
from notifier.queues import QUEUE_NAMES
from tests.conftest import PG_ADMIN_URL
from tests.helpers import LITERAL, concurrently, run_worker_until_idle
from tests.processes import wait_until

pytestmark = pytest.mark.integration


def _item(n: int, **extra) -> dict:
    return {**LITERAL, "to": f"user{n}@example.com", **extra}


def _rows() -> tuple[int, int]:
    with database.connection_context():
        return Notification.select().count(), Event.select().count()


def test_valid_items_are_accepted_even_when_others_fail(client, headers, redis_conn, smtp, deliverer):
    items = [_item(0), {"to": "not-an-email", "subject": "x", "text": "y"}, _item(2, priority="high"), "nope",
             {"to": "a@example.com", "template": "no_such_template"}, _item(5, priority="low")]
    response = client.post("/api/notifications/batch", json={"notifications": items}, headers=headers)
    assert response.status_code == 202
    body = response.get_json()
    assert (body["accepted"], body["rejected"]) == (3, 3)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(6))
    assert [("id" in r) for r in results] == [True, False, True, False, False, True]
    assert "to" in results[1]["error"]["details"]
    assert results[4]["error"]["code"] == "validation_error" and "template" in results[4]["error"]["details"]
    assert _rows() == (3, 3)
    assert [Queue(QUEUE_NAMES[p], connection=redis_conn).count for p in ("high", "default", "low")] == [1, 1, 1]

    run_worker_until_idle(redis_conn)
    assert sorted(m.rcpt_tos[0] for m in smtp.wait_for(3)) == ["user0@example.com", "user2@example.com",
                                                               "user5@example.com"]
    for result in results:
        if "id" in result:
            assert client.get(f"/api/notifications/{result['id']}", headers=headers).get_json()["status"] == "sent"


def test_a_batch_with_nothing_valid_is_422(client, headers):
    response = client.post("/api/notifications/batch", json={"notifications": [{"to": "x"}]}, headers=headers)
    assert response.status_code == 422
    assert response.get_json()["error"]["details"]["results"][0]["index"] == 0
    assert client.post("/api/notifications/batch", json={"notifications": []}, headers=headers).status_code == 422
    assert _rows() == (0, 0)


def test_batches_over_the_limit_are_422(pg_settings, pg_db, redis_conn, headers):
    client = create_app(replace(pg_settings, batch_max=3), redis=redis_conn).test_client()
    response = client.post("/api/notifications/batch", json={"notifications": [_item(n) for n in range(4)]},
                           headers=headers)
    assert response.status_code == 422
    assert _rows() == (0, 0)


def test_batch_and_item_idempotency_keys_replay_without_new_rows(client, headers, redis_conn):
    items = [_item(0), _item(1, idempotency_key="own-key"), _item(2)]
    first = client.post("/api/notifications/batch", json={"notifications": items},
                        headers={**headers, "Idempotency-Key": "batch-1"}).get_json()
    again = client.post("/api/notifications/batch", json={"notifications": items},
                        headers={**headers, "Idempotency-Key": "batch-1"}).get_json()
    assert [r["id"] for r in again["results"]] == [r["id"] for r in first["results"]]
    assert [r["replayed"] for r in again["results"]] == [True, True, True]
    assert _rows() == (3, 3)
    # The item's own key is honoured outside the batch too, and a changed payload under it is refused.
    single = client.post("/api/notifications/send", json=_item(1, idempotency_key="own-key"), headers=headers)
    assert single.get_json()["id"] == first["results"][1]["id"]
    changed = client.post("/api/notifications/batch", json={"notifications": [_item(9, idempotency_key="own-key")]},
                          headers=headers)
    assert changed.status_code == 422
    assert changed.get_json()["error"]["details"]["results"][0]["error"]["code"] == "idempotency_key_reused"


def test_a_keyed_batch_looks_its_keys_up_once_not_item_by_item(client, headers, redis_conn, caplog):
    # One query per new item, under the batch's lock: 1,000 keyed items took 2 s where 0.4 s without.
    items = [_item(n, idempotency_key=f"k-{n}") for n in range(50)]
    caplog.set_level(logging.DEBUG, logger="peewee")
    accepted = client.post("/api/notifications/batch", json={"notifications": items},
                           headers={**headers, "Idempotency-Key": "keyed-batch"})
    assert accepted.status_code == 202 and accepted.get_json()["accepted"] == 50
    statements = [r for r in caplog.records if r.name == "peewee"]
    assert len(statements) < 20, [str(r.msg)[:80] for r in statements]


def test_a_key_given_twice_in_a_batch_is_one_notification_and_the_batch_replays(client, headers, redis_conn):
    twice = [_item(0, idempotency_key="twice"), _item(0, idempotency_key="twice"), _item(1)]
    first = client.post("/api/notifications/batch", json={"notifications": twice}, headers=headers)
    assert first.status_code == 202
    results = first.get_json()["results"]
    assert results[1]["id"] == results[0]["id"] and [r["replayed"] for r in results] == [False, True, False]
    assert _rows() == (2, 2)
    # The same batch again, and the item alone, are replays of what the first stored.
    again = client.post("/api/notifications/batch", json={"notifications": twice}, headers=headers)
    assert again.status_code == 202
    assert [r.get("replayed") for r in again.get_json()["results"]] == [True, True, False]
    single = client.post("/api/notifications/send", json=_item(0, idempotency_key="twice"), headers=headers)
    assert single.status_code == 202 and single.get_json()["id"] == results[0]["id"]
    assert _rows() == (3, 3)  # the third item of the batch had no key: sent again, as asked


@pytest.fixture
def refused_recipient(pg_db):
    """An address whose notification PostgreSQL refuses to store, cancelling the insert as a statement
    timeout would: a request that meets the database failing part way."""
    with database.connection_context():
        database.execute_sql(
            "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.\"to\" = 'refused@example.com' THEN RAISE EXCEPTION 'refused' USING ERRCODE = 'query_canceled'; "
            "END IF; RETURN NEW; END $$")
        database.execute_sql("CREATE TRIGGER test_refuse BEFORE INSERT ON notifications FOR EACH ROW "
                             "EXECUTE FUNCTION test_refuse()")
    yield "refused@example.com"
    with database.connection_context():
        database.execute_sql("DROP TRIGGER IF EXISTS test_refuse ON notifications")
        database.execute_sql("DROP FUNCTION IF EXISTS test_refuse()")


def test_a_database_failure_after_a_key_given_twice_stores_none_of_the_batch(client, headers, redis_conn,
                                                                              refused_recipient):
    # A key given twice sends the batch down the one-at-a-time path. A failure there answered 503 with
    # the items before it stored and queued, so the caller's retry sent an item without a key twice.
    items = [_item(0, idempotency_key="twice"), _item(0, idempotency_key="twice"), _item(1),
             _item(2, to=refused_recipient), _item(3)]
    response = client.post("/api/notifications/batch", json={"notifications": items}, headers=headers)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert _rows() == (0, 0)
    assert [Queue(name, connection=redis_conn).count for name in QUEUE_NAMES.values()] == [0, 0, 0]


def test_a_null_item_is_refused_alone(client, headers, redis_conn):
    response = client.post("/api/notifications/batch", json={"notifications": [_item(0), None]}, headers=headers)
    assert response.status_code == 202
    results = response.get_json()["results"]
    assert "id" in results[0] and results[1]["error"]["code"] == "validation_error"
    assert _rows() == (1, 1)


def test_an_item_holding_a_nul_or_a_lone_surrogate_is_refused_alone(client, headers, redis_conn):
    # Text no column can hold is invalid like any other field: it refused the whole batch, with no
    # index saying which item was at fault.
    items = [_item(0), {**_item(1), "text": "nul \x00 here"}, {**_item(2), "subject": "\ud800 lone"}]
    body = json.dumps({"notifications": items})  # as escapes, the only way JSON carries either
    response = client.post("/api/notifications/batch", data=body, headers=headers, content_type="application/json")
    assert response.status_code == 202, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert "id" in results[0]
    assert results[1]["error"]["details"] == {"text": ["must not contain NUL characters"]}
    assert results[2]["error"]["details"] == {"subject": ["must be valid Unicode text (no unpaired surrogates)"]}
    assert _rows() == (1, 1)


def test_consent_applies_to_every_item(client, headers, api_key, redis_conn, smtp, deliverer):
    with database.connection_context():
        suppress(api_key[0].id, "user1@example.com", "550 5.1.1 no such user")
    body = client.post("/api/notifications/batch", json={"notifications": [_item(0), _item(1), _item(2)]},
                       headers=headers).get_json()
    assert [r["status"] for r in body["results"]] == ["queued", "suppressed", "queued"]
    run_worker_until_idle(redis_conn)
    assert sorted(m.rcpt_tos[0] for m in smtp.wait_for(2)) == ["user0@example.com", "user2@example.com"]


def test_a_batch_waits_for_the_one_before_it_then_gets_503_not_a_stuck_thread(app, client, headers, monkeypatch):
    from notifier.api import notifications

    monkeypatch.setattr(notifications, "BATCH_WAIT_SECONDS", 0.05)
    slot = app.extensions["notifier"]["batch_slot"]
    slot.acquire()  # another batch of this process is in progress, and stuck
    try:
        response = client.post("/api/notifications/batch", json={"notifications": [LITERAL]}, headers=headers)
    finally:
        slot.release()
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "service_unavailable"
    with database.connection_context():
        assert Notification.select().count() == 0
    again = client.post("/api/notifications/batch", json={"notifications": [LITERAL]}, headers=headers)
    assert again.status_code == 202


def _insert_keyed_row(cursor, api_key_id: int, key: str) -> str:
    """What another request's insert under key does, in cursor's open transaction; the row's id."""
    cursor.execute(
        'INSERT INTO notifications (id, api_key_id, "to", priority, category, status, attempts, callback_attempts, '
        "created_at, updated_at, idempotency_key, idempotency_scope, request_hash) VALUES (gen_random_uuid()::text, "
        "%s, 'other@example.com', 'default', 'transactional', 'queued', 0, 0, now(), now(), %s, 'send', 'other') "
        "RETURNING id", (api_key_id, key))
    return cursor.fetchone()[0]


# This test's own trigger: the batch's insert of an item under key K waits while the test holds K's gate
# (an advisory lock), and holds nothing once past it.
_GATES = """
CREATE FUNCTION wait_at_key_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.request_hash <> 'other' AND NEW.idempotency_key IS NOT NULL THEN
        PERFORM pg_advisory_lock_shared(hashtext(NEW.idempotency_key));
        PERFORM pg_advisory_unlock_shared(hashtext(NEW.idempotency_key));
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER wait_at_key_gate BEFORE INSERT ON notifications FOR EACH ROW EXECUTE FUNCTION wait_at_key_gate();
"""


def test_a_batch_deadlocked_by_another_holding_its_keys_in_the_other_order_is_answered(
        app, api_key, headers, pg_settings, redis_conn):
    # Found by holding keys of a batch in another transaction while it inserted: two batches that
    # share item keys in opposite orders each wait for the other, PostgreSQL cancels one to end the
    # deadlock, and that one was answered 503 "the database is unavailable".
    # PostgreSQL cancels the session that finds the deadlock, one whose wait began deadlock_timeout
    # ago, and the batch tries again at once. So that it is the batch, however slow this test is, the
    # other waits first and never looks, and the batch, held at dl-2 until then, closes the circle;
    # and the batch's second try at dl-1 waits at its gate until the other has it.
    name = pg_settings.database_url.rsplit("/", 1)[1]
    gates = psycopg2.connect(pg_settings.database_url)
    gates.autocommit = True
    other = psycopg2.connect(pg_settings.database_url)  # another batch, its items in the other order
    watcher = psycopg2.connect(PG_ADMIN_URL)
    watcher.autocommit = True

    def gate(action: str, key: str) -> None:
        with gates.cursor() as cur:
            cur.execute(f"SELECT pg_advisory_{action}(hashtext(%s))", (key,))

    def waits(condition: str, *params) -> bool:
        with watcher.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND {condition}", (name, *params))
            return cur.fetchone()[0] > 0

    answer, taken = {}, {}

    def other_takes_dl1():
        with other.cursor() as cur:
            taken["first"] = _insert_keyed_row(cur, api_key[0].id, "dl-1")
        other.commit()

    try:
        with gates.cursor() as cur:
            cur.execute(_GATES)
        gate("lock", "dl-2")
        with other.cursor() as cur:
            cur.execute("SET deadlock_timeout = '1h'")
            cur.execute("SET statement_timeout = '60s'")  # were the batch never to find the deadlock either
            second = _insert_keyed_row(cur, api_key[0].id, "dl-2")
        items = [_item(0, idempotency_key="dl-1"), _item(1, idempotency_key="dl-2"), _item(2)]
        batch = threading.Thread(target=lambda: answer.update(response=app.test_client().post(
            "/api/notifications/batch", json={"notifications": items}, headers=headers)))
        batch.start()
        wait_until(lambda: waits("wait_event = 'advisory'"), interval=0.01)  # holding dl-1, at dl-2's gate
        gate("lock", "dl-1")
        inserting = threading.Thread(target=other_takes_dl1)
        inserting.start()
        wait_until(lambda: waits("pid = %s AND wait_event_type = 'Lock'", other.get_backend_pid()), interval=0.01)
        gate("unlock", "dl-2")  # the batch waits for the other's dl-2: the deadlock
        inserting.join(timeout=30)  # the batch was cancelled, and the other has dl-1
        gate("unlock", "dl-1")
        batch.join(timeout=30)
    finally:
        other.close()
        watcher.close()
        with gates.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
            cur.execute("DROP TRIGGER IF EXISTS wait_at_key_gate ON notifications")
            cur.execute("DROP FUNCTION IF EXISTS wait_at_key_gate()")
        gates.close()

    response = answer["response"]
    assert response.status_code == 202, response.get_json()
    results = response.get_json()["results"]
    assert [r.get("error", {}).get("code") for r in results] == ["idempotency_key_reused"] * 2 + [None]
    assert [r["error"]["details"]["id"] for r in results[:2]] == [taken["first"], second]
    assert _rows()[0] == 3  # the other's two and the batch's keyless item, once


def test_a_batch_repeated_at_once_under_one_key_is_decided_once_by_the_recipient_cap(pg_settings, pg_db, redis_conn,
                                                                                     headers):
    # Found by sending one batch of a marketing email four times at once under one key, to four API
    # processes (one takes a batch at a time) with RECIPIENT_CAP=1/hour: each was put to the cap before
    # any stored it, and the row kept, whichever inserted first, was `suppressed` in some rounds.
    apps = [create_app(replace(pg_settings, recipient_cap="1/hour"), redis=redis_conn) for _ in range(4)]
    kept = []
    for round_ in range(8):
        item = {**LITERAL, "to": f"capped{round_}@example.com", "category": "marketing"}
        picks = itertools.count()

        def post(item=item, key=f"capped-batch-{round_}", picks=picks):
            client = apps[next(picks) % len(apps)].test_client()
            response = client.post("/api/notifications/batch", json={"notifications": [item]},
                                   headers={**headers, "Idempotency-Key": key})
            return response.status_code, response.get_json()["results"][0]["id"]

        results = concurrently(4, post)
        kept.append(_the_one_kept(results))
    assert kept == ["queued"] * 8


def _the_one_kept(results: list) -> str:
    """The status of the one notification that requests made at once were all answered with."""
    assert all(isinstance(r, tuple) and r[0] == 202 for r in results), results
    (notification_id,) = {notification_id for _, notification_id in results}
    with database.connection_context():
        return Notification.get(Notification.id == notification_id).status


def test_a_send_and_a_batch_item_under_one_key_at_once_are_decided_once_by_the_recipient_cap(pg_settings, pg_db,
                                                                                             redis_conn, headers):
    # Found by a run-through: a send and a one-item batch under one key, at once, took different locks
    # (the key's, the batch's), so each was put to the cap (RECIPIENT_CAP=1/hour: one allowed, one refused)
    # and the row kept was whichever inserted first: `suppressed` in some rounds, the allowed one lost.
    apps = [create_app(replace(pg_settings, recipient_cap="1/hour"), redis=redis_conn) for _ in range(2)]
    kept = []
    for round_ in range(8):
        item = {**LITERAL, "to": f"mixed{round_}@example.com", "category": "marketing",
                "idempotency_key": f"mixed-{round_}"}
        calls = itertools.count()

        def post(item=item, calls=calls):
            if next(calls) % 2:
                response = apps[0].test_client().post("/api/notifications/send", json=item, headers=headers)
                return response.status_code, response.get_json()["id"]
            batch = {"notifications": [item, {**LITERAL, "to": "other@example.com"}]}
            response = apps[1].test_client().post("/api/notifications/batch", json=batch, headers=headers)
            return response.status_code, response.get_json()["results"][0]["id"]

        results = concurrently(4, post)
        kept.append(_the_one_kept(results))
    assert kept == ["queued"] * 8


def test_a_key_given_twice_in_a_batch_counts_once_against_the_recipient_cap(pg_settings, pg_db, redis_conn, headers):
    # Found by a run-through: both items were put to the cap, though the second is the first's replay.
    client = create_app(replace(pg_settings, recipient_cap="2/hour"), redis=redis_conn).test_client()
    item = {**LITERAL, "to": "twice@example.com", "category": "marketing", "idempotency_key": "dup"}
    other = {**item, "subject": "another"}  # the same key for another request: 409, and no count either
    body = client.post("/api/notifications/batch", json={"notifications": [item, item, other]},
                       headers=headers).get_json()
    assert [r.get("replayed") for r in body["results"]] == [False, True, None]
    assert body["results"][0]["id"] == body["results"][1]["id"]
    assert body["results"][2]["error"]["code"] == "idempotency_key_reused"
    second = {**LITERAL, "to": "twice@example.com", "category": "marketing", "subject": "later"}
    assert client.post("/api/notifications/send", json=second, headers=headers).get_json()["status"] == "queued"


def test_a_batch_and_an_event_are_answered_in_about_3_s_while_redis_hangs(pg_settings, pg_db, redis_conn, headers):
    # Found by a run-through: each item's recipient cap waited its own 0.5 s for a silent Redis (a batch
    # of 40 marketing items took 23 s, 1,000 would take 500 s), and an event handed each of its
    # notifications over on its own, 2 s each.
    from tests.cutproxy import CutProxy

    kwargs = redis_conn.connection_pool.connection_kwargs
    proxy = CutProxy(kwargs.get("port", 6379))
    settings = replace(pg_settings, redis_url=f"redis://127.0.0.1:{proxy.port}/{kwargs.get('db', 0)}",
                       recipient_cap="100/hour")
    client = create_app(settings).test_client()
    items = [{**LITERAL, "to": f"m{n}@example.com", "category": "marketing"} for n in range(20)]
    event = {"type": "user.signup", "user": {"id": "hung-1", "email": "hung@example.com"}, "data": {"code": "123456"}}
    first = client.post("/api/notifications/batch", json={"notifications": items[:1]}, headers=headers)
    assert first.status_code == 202
    proxy.stall()
    try:
        for path, body in (("/api/notifications/batch", {"notifications": items}), ("/api/events", event)):
            started = time.monotonic()
            response = client.post(path, json=body, headers=headers)
            took = time.monotonic() - started
            assert response.status_code == 202 and took < 4.5, (path, response.status_code, took)
    finally:
        proxy.resume()
    with database.connection_context():
        assert Notification.select().where(Notification.status == "queued").count() >= 21  # stored, to be queued


def _client_whose_redis_stalls_after_one_send(pg_settings, redis_conn, headers):
    """An API reaching Redis through a proxy, which stalls (takes bytes, answers nothing) after one send."""
    from tests.cutproxy import CutProxy

    kwargs = redis_conn.connection_pool.connection_kwargs
    proxy = CutProxy(kwargs.get("port", 6379))
    settings = replace(pg_settings, redis_url=f"redis://127.0.0.1:{proxy.port}/{kwargs.get('db', 0)}")
    client = create_app(settings).test_client()
    assert client.post("/api/notifications/send", json=LITERAL, headers=headers).status_code == 202
    proxy.stall()
    return client, proxy


def test_while_redis_hangs_only_one_send_in_two_seconds_waits_for_it(pg_settings, pg_db, redis_conn, headers):
    # Found in a partition (Redis's packets dropped, nothing refused): each send waited its own 2 s to
    # queue its job, so an API process took a few sends a second, and clients, /api/ready among them,
    # queued behind those. After one wait the process asks for only REDIS_PROBE_SECONDS for REDIS_AWAY_SECONDS;
    # the reconciler queues what it stored, as it queues the one that waited.
    from notifier import service

    client, proxy = _client_whose_redis_stalls_after_one_send(pg_settings, redis_conn, headers)
    try:
        took = []
        for body in (LITERAL, LITERAL, LITERAL, {"notifications": [LITERAL] * 3}):
            path = "/api/notifications/batch" if "notifications" in body else "/api/notifications/send"
            started = time.monotonic()
            assert client.post(path, json=body, headers=headers).status_code == 202
            took.append(time.monotonic() - started)
    finally:
        proxy.resume()
    # The first may wait its 2.5 s; the rest ask Redis only briefly (each waited its own 2 s before).
    assert took[0] < 4.5 and max(took[1:]) < 1.5, took
    time.sleep(service.REDIS_AWAY_SECONDS)
    assert client.post("/api/notifications/send", json=LITERAL, headers=headers).status_code == 202
    queue = Queue(QUEUE_NAMES["default"], connection=redis_conn)
    assert len(queue) >= 2  # asked again once the moment passed: the first send's job and this one's
    with database.connection_context():
        assert Notification.select().count() == 8


def test_a_send_just_after_a_redis_blip_is_queued_at_once(pg_settings, pg_db, redis_conn, headers):
    # One request met a Redis that did not answer for a moment (a failover, a fork's stall); Redis answers
    # again at once. A high-priority send (a login code) accepted in the next 2 s should be queued, not wait
    # for the reconciler's next pass after its grace (helper 4: with REDIS_AWAY_SECONDS it waited 30-60 s).
    client, proxy = _client_whose_redis_stalls_after_one_send(pg_settings, redis_conn, headers)
    try:
        assert client.post("/api/notifications/send", json=LITERAL, headers=headers).status_code == 202
    finally:
        proxy.resume()
    urgent = client.post("/api/notifications/send", json=dict(LITERAL, priority="high"), headers=headers)
    assert urgent.status_code == 202
    assert len(Queue(QUEUE_NAMES["high"], connection=redis_conn)) == 1
