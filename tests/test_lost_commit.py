"""A connection lost as a send's commit went out: the answer says what the database holds.

The server committed, the answer was lost with the connection. The API answered 503 ("nothing is
stored, retrying is safe") while the notification was stored, and the reconciler then queued and
sent it: a caller retrying the 503 without an idempotency key got the email twice. Found by a
chaos run (a proxy dropping PostgreSQL connections under load): 22 emails went out for requests
answered 503.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from app import create_app
from notifier.db import database
from notifier.models import Notification
from notifier.queues import QUEUE_NAMES
from tests.helpers import LITERAL, VERIFICATION

pytestmark = pytest.mark.integration

INSERT = b'INSERT INTO "notifications"'


@pytest.fixture
def cut_client(pg_settings, pg_db, redis_conn, proxy):
    """The API on a database connection that goes through the proxy (statements as text, to be seen)."""
    name = pg_settings.database_url.rsplit("/", 1)[1]
    settings = replace(pg_settings, database_url=proxy.url(name), database_prepare=False)
    application = create_app(settings, redis=redis_conn)
    application.config["TESTING"] = True
    yield application.test_client()
    database.close_all()


def _stored() -> list[str]:
    with database.connection_context():
        return [n.id for n in Notification.select(Notification.id)]


def _queued(redis_conn) -> int:
    return sum(redis_conn.llen(f"rq:queue:{name}") for name in QUEUE_NAMES.values())


@pytest.mark.parametrize(("path", "body", "extra", "marker"), [
    ("/api/notifications/send", LITERAL, {}, INSERT),  # one statement: the insert is its own commit
    ("/api/notifications/send", LITERAL, {"Idempotency-Key": "k1"}, b"COMMIT"),  # the key's transaction
    ("/api/notifications/send-verification", VERIFICATION, {}, INSERT),
])
def test_a_send_whose_commit_answer_was_lost_is_answered_202_and_queued(
        cut_client, headers, proxy, redis_conn, path, body, extra, marker):
    proxy.cut_answer_to(marker)
    response = cut_client.post(path, json=body, headers=headers | extra)
    assert proxy.cuts == 1
    assert response.status_code == 202, response.get_json()
    assert _stored() == [response.get_json()["id"]]
    assert _queued(redis_conn) == 1


@pytest.mark.parametrize(("extra", "marker"), [({}, INSERT), ({"Idempotency-Key": "b1"}, b"COMMIT")])
def test_a_batch_whose_commit_answer_was_lost_is_answered_202_with_every_item(
        cut_client, headers, proxy, redis_conn, extra, marker):
    items = [{**LITERAL, "to": f"user{i}@example.com"} for i in range(3)]
    proxy.cut_answer_to(marker)
    response = cut_client.post("/api/notifications/batch", json={"notifications": items}, headers=headers | extra)
    assert proxy.cuts == 1
    assert response.status_code == 202, response.get_json()
    ids = [r["id"] for r in response.get_json()["results"]]
    assert sorted(_stored()) == sorted(ids) and len(ids) == 3
    assert not any(r["replayed"] for r in response.get_json()["results"])
    assert _queued(redis_conn) == 1  # one shared job


def test_an_event_whose_commit_answer_was_lost_is_answered_202(cut_client, headers, proxy):
    event = {"type": "order.placed", "user": {"id": "u1", "email": "ada@example.com"},
             "data": {"order_id": "A-1", "items": [{"name": "Mug", "quantity": 1, "price": "9.50"}], "total": "9.50"}}
    proxy.cut_answer_to(b"COMMIT")
    response = cut_client.post("/api/events", json=event, headers=headers)
    assert proxy.cuts == 1
    assert response.status_code == 202, response.get_json()
    assert _stored() == [n["id"] for n in response.get_json()["notifications"]]


@pytest.mark.parametrize("marker", [INSERT, b"COMMIT"])
def test_a_connection_lost_before_the_commit_reached_the_server_is_503_and_stores_nothing(
        cut_client, headers, proxy, redis_conn, marker):
    proxy.cut_answer_to(marker, before_reply=True)
    response = cut_client.post("/api/notifications/send", json=LITERAL, headers=headers | {"Idempotency-Key": "k2"})
    assert proxy.cuts == 1
    assert response.status_code == 503
    assert _stored() == []
    assert _queued(redis_conn) == 0


@pytest.mark.parametrize(("path", "extra"), [("/api/notifications/send", {"Idempotency-Key": "k3"}),
                                            ("/api/notifications/batch", {})])
def test_a_commit_that_reaches_the_server_after_the_client_gave_up_is_waited_for(
        cut_client, headers, proxy, redis_conn, path, extra):
    # The COMMIT is still on its way when the connection is lost: read at once, the rows were not there
    # yet, the answer was 503 "nothing stored", and the commit landed half a second later, for the
    # reconciler to send (an unkeyed batch retried: every email twice).
    body = LITERAL if path.endswith("send") else {"notifications": [{**LITERAL, "to": f"u{i}@example.com"}
                                                                    for i in range(201)]}  # two chunks: a COMMIT
    proxy.cut_answer_to(b"COMMIT", late=0.3)
    response = cut_client.post(path, json=body, headers=headers | extra)
    assert proxy.cuts == 1
    assert response.status_code == 202, response.get_json()
    answer = response.get_json()
    answered = [answer["id"]] if path.endswith("send") else [r["id"] for r in answer["results"]]
    assert sorted(_stored()) == sorted(answered)
    assert _queued(redis_conn) >= 1
