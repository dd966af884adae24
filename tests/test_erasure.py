"""Erasing a user (DELETE /api/users/<user_id>) on real parts, in process: PostgreSQL, Redis, an RQ worker,
the test SMTP server and a callback endpoint. What each status becomes, that nothing is sent afterwards by
any path that could send it (its job, its release, the reconciler, a digest pass, a requeue), that a
retried request still replays and sends nothing, and that nobody else's mail is touched.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import fakeredis
import psycopg2
import pytest

from notifier import deadletters, digests, erasure, queues, releases, store
from notifier.db import database
from notifier.errors import Conflict
from notifier.models import (
    CallbackStatus,
    Digest,
    Event,
    Notification,
    Preference,
    Status,
    Suppression,
    UserProfile,
    utcnow,
)
from notifier.reconciler import reconcile
from notifier.runtime import make_renderer
from tests.helpers import make_notification, reload, run_worker_until_idle

pytestmark = pytest.mark.integration

ANN = "ann@example.com"


def _call(api, headers, method: str, path: str, body: dict | None = None, status: int = 200, **kwargs):
    response = api.open(path, method=method, json=body, headers=headers, **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    return response


def _send(api, headers, user_id: str | None = "u1", to: str = ANN, key: str | None = None, **extra) -> dict:
    payload = {"to": to, "template": "welcome", "data": {"name": "Ann Example"}, **extra}
    if user_id is not None:
        payload["user_id"] = user_id
    sent_headers = headers | ({"Idempotency-Key": key} if key else {})
    return _call(api, sent_headers, "POST", "/api/notifications/send", payload, status=202).get_json()


def _erase(api, headers, user_id: str = "u1", status: int = 200):
    return _call(api, headers, "DELETE", f"/api/users/{user_id}", status=status)


def _owner(headers):
    from notifier import keys

    with database.connection_context():
        return keys.authenticate(headers["X-API-Key"])


def _personal_data_left(*needles: str) -> list[str]:
    """Every stored value (but the suppression list's) that holds one of needles."""
    found = []
    with database.connection_context():
        for model in (Notification, Event, Digest, Preference, UserProfile):
            for row in model.select().dicts():
                text = json.dumps(row, default=str)
                found += [f"{model.__name__}: {text}" for needle in needles if needle.lower() in text.lower()]
    return found


def _flush(settings, redis_conn, now) -> int:
    with database.connection_context():
        return digests.flush_due(settings, redis_conn, make_renderer(settings), now=now)


def _window_closed(settings):
    return digests.boundary_after(utcnow(), "UTC", settings.digest_time) + timedelta(
        seconds=settings.digest_grace_seconds + 1)


# --- each status ------------------------------------------------------------------------------------------


def test_queued_mail_is_cancelled_and_its_job_sends_nothing(api, headers, live_deliverer, smtp, redis_conn):
    plain = _send(api, headers)
    keyed = _send(api, headers, key="k-queued")

    answer = _erase(api, headers).get_json()

    assert answer == {"user_id": "u1", "cancelled": 2, "tombstoned": 1, "deleted": 1, "digests": 0,
                      "preferences": 0, "profile": 0}
    run_worker_until_idle(redis_conn)  # both jobs are still in Redis
    assert smtp.count() == 0
    assert reload(plain["id"]) is None
    stone = _call(api, headers, "GET", f"/api/notifications/{keyed['id']}").get_json()
    assert (stone["status"], stone["to"], stone["user_id"], stone["subject"], stone["metadata"]) == (
        "cancelled", "", None, None, None)
    assert stone["erased_at"] is not None
    assert [(line["kind"], line["from_status"], line["status"], line["reason"]) for line in stone["history"]] == [
        ("erasure", "cancelled", "cancelled", "erased at the user's request")]
    assert _personal_data_left(ANN, "Ann Example", "u1") == []


def test_a_delayed_send_is_never_released_by_the_scheduler_or_the_reconciler(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    later = _send(api, headers, key="k-later", delay_seconds=60)
    assert later["status"] == "scheduled"

    assert _erase(api, headers).get_json()["cancelled"] == 1

    future = utcnow() + timedelta(minutes=5)
    with database.connection_context():
        releases.release_due(redis_conn, fast_settings, future)
        assert live_deliverer.release(later["id"]) == "skipped"  # the release job itself, were it run
        report = reconcile(fast_settings, redis_conn, now=future)
    run_worker_until_idle(redis_conn)
    assert (report.released, report.requeued) == (0, 0)
    assert smtp.count() == 0
    assert reload(later["id"]).status == "cancelled"


def test_retrying_mail_is_cancelled_and_its_retry_sends_nothing(
        api, headers, api_key, live_deliverer, fast_settings, smtp, redis_conn):
    retrying = make_notification(api_key[0], Status.RETRYING, user_id="u1", user_key="u1", to=ANN, attempts=1)
    queues.dispatch(redis_conn, fast_settings, retrying)

    assert _erase(api, headers).get_json()["cancelled"] == 1

    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0
    assert reload(retrying.id) is None


def test_held_mail_and_a_digest_waiting_to_go_are_cancelled_and_no_digest_pass_sends_them(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    _call(api, headers, "PUT", "/api/users/u1/preferences",
          {"categories": {"product": "daily"}, "timezone": "Europe/Berlin",
           "quiet_hours": {"start": "23:00", "end": "06:00"}})
    taken = [_send(api, headers, callback_url=receiver.url)["id"] for _ in range(2)]
    assert _flush(fast_settings, redis_conn, _window_closed(fast_settings)) == 1  # a digest queued, items in it
    still_held = _send(api, headers)["id"]

    answer = _erase(api, headers).get_json()

    # The digest, its two items and the item still held; the items owe their callbacks (tombstones).
    assert answer["cancelled"] == 4 and answer["tombstoned"] == 2 and answer["deleted"] == 2
    assert (answer["digests"], answer["preferences"], answer["profile"]) == (1, 1, 1)
    assert _flush(fast_settings, redis_conn, _window_closed(fast_settings) + timedelta(days=2)) == 0
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0
    assert reload(still_held) is None
    assert {reload(i).status for i in taken} == {"cancelled"}
    events = [call.json for call in receiver.calls]
    assert sorted(e["id"] for e in events) == sorted(taken)
    assert all((e["event"], e["metadata"], e["error"]) == ("notification.cancelled", None, None) for e in events)
    assert _call(api, headers, "GET", "/api/users/u1/preferences").get_json()["timezone"] == "UTC"
    assert _personal_data_left(ANN, "Ann Example", "u1") == []


# --- in flight: 409, nothing changed -------------------------------------------------------------------------


def test_mail_being_sent_is_409_with_retry_after_and_nothing_changes(api, headers, api_key, smtp, redis_conn):
    waiting = _send(api, headers)
    _call(api, headers, "PUT", "/api/users/u1/preferences", {"categories": {"marketing": "off"}})
    sending = make_notification(api_key[0], Status.SENDING, user_id="u1", user_key="u1", to=ANN)

    response = _erase(api, headers, status=409)

    error = response.get_json()["error"]
    assert error["code"] == "in_flight"
    assert error["details"] == {"in_flight": [sending.id], "count": 1}
    assert int(response.headers["Retry-After"]) > 0
    assert reload(waiting["id"]).status == "queued" and reload(waiting["id"]).to == ANN
    with database.connection_context():
        assert Preference.select().count() == 1

    with database.connection_context():  # the send ends: the retry goes through
        assert store.transition(sending.id, Status.SENT, reason="accepted by SMTP server", sources=(Status.SENDING,))
    assert _erase(api, headers).get_json()["cancelled"] == 1


def test_an_item_in_a_digest_being_sent_is_409(api, headers, api_key, live_deliverer, fast_settings, smtp,
                                               redis_conn):
    _call(api, headers, "PUT", "/api/users/u1/preferences", {"categories": {"product": "daily"}})
    item = _send(api, headers)["id"]
    assert _flush(fast_settings, redis_conn, _window_closed(fast_settings)) == 1
    digest = reload(item).digest_id
    with database.connection_context():
        assert store.claim(digest)

    error = _erase(api, headers, status=409).get_json()["error"]

    assert set(error["details"]["in_flight"]) == {digest, item}
    assert reload(item).status == "in_digest"


def test_a_claim_that_beats_the_cancel_rolls_the_whole_erasure_back(api, headers, api_key, smtp, redis_conn,
                                                                     fast_settings, monkeypatch):
    # A worker (another connection) claims the user's mail between the first look for mail in flight and
    # the cancel, which then does not move it.
    first, second = _send(api, headers), _send(api, headers, key="k2")
    real = erasure._cancel

    def claimed_first(whose):
        monkeypatch.setattr(erasure, "_cancel", real)  # once
        worker = psycopg2.connect(fast_settings.database_url)
        worker.autocommit = True
        with worker.cursor() as cur:
            cur.execute("UPDATE notifications SET status = 'sending' WHERE id = %s AND status = 'queued'",
                        (second["id"],))
            assert cur.rowcount == 1
        worker.close()
        return real(whose)

    monkeypatch.setattr(erasure, "_cancel", claimed_first)
    error = _erase(api, headers, status=409).get_json()["error"]

    assert error["details"]["in_flight"] == [second["id"]]
    assert reload(first["id"]).status == "queued"  # its cancel was rolled back with the rest


# --- idempotency, others' mail, forms of the user id ------------------------------------------------------


def test_a_replay_after_erasure_returns_the_original_id_and_sends_nothing(
        api, headers, live_deliverer, smtp, redis_conn):
    sent = _send(api, headers, key="signup-1", metadata={"crm": "Ann Example"})
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1

    assert _erase(api, headers).get_json()["tombstoned"] == 1

    payload = {"to": ANN, "template": "welcome", "data": {"name": "Ann Example"}, "user_id": "u1",
               "metadata": {"crm": "Ann Example"}}
    replay = _call(api, headers | {"Idempotency-Key": "signup-1"}, "POST", "/api/notifications/send", payload,
                   status=202)
    assert replay.get_json()["id"] == sent["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    other = dict(payload, data={"name": "Someone else"})
    assert _call(api, headers | {"Idempotency-Key": "signup-1"}, "POST", "/api/notifications/send", other,
                 status=409).get_json()["error"]["code"] == "idempotency_key_reused"
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1
    stone = _call(api, headers, "GET", f"/api/notifications/{sent['id']}").get_json()
    assert (stone["status"], stone["to"], stone["message_id"] is not None) == ("sent", "", True)
    assert _personal_data_left(ANN, "Ann Example") == []


def test_another_users_and_another_keys_mail_is_untouched(api, headers, other_key, live_deliverer, smtp,
                                                          redis_conn):
    mine = _send(api, headers)["id"]
    theirs = _send(api, headers, user_id="u2", to="bob@example.com")["id"]
    no_user = _send(api, headers, user_id=None)["id"]  # to the same address, with no user id: another user
    other_headers = {"X-API-Key": other_key[1]}
    other_keys = _send(api, other_headers)["id"]  # the same user id under another key
    _call(api, other_headers, "PUT", "/api/users/u1/preferences", {"timezone": "Asia/Tokyo"})

    assert _erase(api, headers).get_json()["cancelled"] == 1

    run_worker_until_idle(redis_conn)
    assert reload(mine) is None
    assert {reload(i).status for i in (theirs, no_user, other_keys)} == {"sent"}
    assert sorted(to for m in smtp.messages for to in m.rcpt_tos) == sorted([ANN, ANN, "bob@example.com"])
    assert _call(api, other_headers, "GET", "/api/users/u1/preferences").get_json()["timezone"] == "Asia/Tokyo"


def test_the_email_form_erases_mail_sent_to_the_address_with_no_user_id(api, headers, live_deliverer, smtp,
                                                                        redis_conn):
    no_user = _send(api, headers, user_id=None, to="Ann@Example.com", key="addr-1")["id"]
    with_user = _send(api, headers)["id"]
    _call(api, headers, "PUT", "/api/users/email:ann@example.com/preferences", {"categories": {"updates": "off"}})

    answer = _erase(api, headers, "email:ANN@example.com").get_json()

    assert answer == {"user_id": "email:ann@example.com", "cancelled": 1, "tombstoned": 1, "deleted": 0,
                      "digests": 0, "preferences": 1, "profile": 0}
    run_worker_until_idle(redis_conn)
    assert reload(no_user).status == "cancelled"
    assert reload(with_user).status == "sent"
    assert smtp.count() == 1
    stats = _call(api, headers, "GET", "/api/notifications/user/email:ann@example.com/stats").get_json()
    assert stats["total"] == 0


def test_erasing_an_unknown_user_or_twice_is_200_with_zeros(api, headers, smtp, redis_conn):
    _send(api, headers)
    assert _erase(api, headers).get_json()["cancelled"] == 1
    zeros = {"cancelled": 0, "tombstoned": 0, "deleted": 0, "digests": 0, "preferences": 0, "profile": 0}
    assert _erase(api, headers).get_json() == {"user_id": "u1", **zeros}
    assert _erase(api, headers, "nobody").get_json() == {"user_id": "nobody", **zeros}
    assert _erase(api, headers, "org%2F7").get_json() == {"user_id": "org/7", **zeros}
    assert _call(api, headers, "DELETE", "/api/users/email:x", status=422).get_json()["error"]["code"] == \
        "validation_error"


def test_a_delete_of_a_users_preferences_is_405_and_erases_nothing(api, headers, smtp, redis_conn):
    # Not a route: it read as erasing a user called "u1/preferences", and answered 200 with zeros.
    _call(api, headers, "PUT", "/api/users/u1/preferences", {"timezone": "Asia/Tokyo"})
    refused = _call(api, headers, "DELETE", "/api/users/u1/preferences", status=405)
    assert set(refused.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "PUT"}
    assert refused.get_json()["error"]["code"] == "method_not_allowed"
    assert _call(api, headers, "GET", "/api/users/u1/preferences").get_json()["timezone"] == "Asia/Tokyo"


# --- what is kept, and what never sends a tombstone ---------------------------------------------------------


def test_suppressions_are_kept_and_a_failed_tombstone_is_never_requeued_or_sent(
        api, headers, api_key, live_deliverer, fast_settings, smtp, redis_conn):
    smtp.rcpt_replies.append(f"550 5.1.1 <{ANN}>: no such user")
    failed = _send(api, headers, key="k-failed")["id"]
    run_worker_until_idle(redis_conn)
    detail = reload(failed)
    assert detail.status == "failed" and ANN in detail.last_error

    _erase(api, headers)

    with database.connection_context():
        assert Suppression.select().where(Suppression.email == ANN).count() == 1  # kept, by design
        with pytest.raises(Conflict) as refused:
            deadletters.requeue(redis_conn, fast_settings, failed)
    assert refused.value.code == "erased"
    assert _call(api, headers, "GET", "/api/dead-letters").get_json()["data"] == []  # no longer a dead letter
    assert _personal_data_left(ANN, "Ann Example") == []
    # A requeue that read the row before it was erased moves it all the same: the worker cancels it.
    with database.connection_context():
        assert store.transition(failed, Status.QUEUED, reason="requeued", sources=(Status.FAILED,))
        queues.dispatch(redis_conn, fast_settings, store.get(failed))
    run_worker_until_idle(redis_conn)
    assert reload(failed).status == "cancelled"
    assert smtp.count() == 0


def test_a_reconciler_pass_after_erasure_requeues_nothing(api, headers, live_deliverer, fast_settings, smtp,
                                                          redis_conn):
    queued = _send(api, headers, key="k-lost")["id"]
    redis_conn.flushdb()  # its job lost

    _erase(api, headers)

    with database.connection_context():
        report = reconcile(fast_settings, redis_conn, now=utcnow() + timedelta(minutes=5))
    run_worker_until_idle(redis_conn)
    assert report.requeued == 0
    assert smtp.count() == 0
    assert reload(queued).status == "cancelled"


def test_a_user_with_more_mail_than_a_page_is_erased_whole(api, headers, api_key, smtp, redis_conn, monkeypatch,
                                                          caplog):
    monkeypatch.setattr(erasure, "PAGE", 3)
    ids = [make_notification(api_key[0], status, user_id="u1", user_key="u1", to=ANN,
                             idempotency_key=f"k{i}" if i % 3 == 0 else None).id
           for i, status in enumerate([Status.QUEUED, Status.SENT, Status.HELD, Status.SCHEDULED, Status.FAILED,
                                       Status.SUPPRESSED, Status.RETRYING, Status.EXPIRED, Status.QUEUED,
                                       Status.SENT, Status.CANCELLED])]
    caplog.set_level(logging.INFO, logger="notifier.erasure")

    answer = _erase(api, headers).get_json()

    assert (answer["cancelled"], answer["tombstoned"], answer["deleted"]) == (5, 4, 7)
    assert _personal_data_left(ANN, "u1") == []
    assert sum(1 for i in ids if reload(i) is not None) == 4
    assert "erasure for key" in caplog.text and "u1" not in caplog.text and ANN not in caplog.text


def test_erasure_on_sqlite(sqlite_settings, sqlite_db):
    from notifier import keys

    key, _ = keys.create("sqlite-service")
    gone = make_notification(key, Status.SENT, user_id="u1", user_key="u1", to=ANN)
    kept = make_notification(key, Status.QUEUED, user_id="u1", user_key="u1", to=ANN, idempotency_key="k",
                             idempotency_scope="send", callback_url="http://127.0.0.1:9/x")
    other = make_notification(key, Status.QUEUED, user_id="u2", user_key="u2", to=ANN)

    done = erasure.erase(fakeredis.FakeRedis(), sqlite_settings, key, "u1")

    assert (done.cancelled, done.tombstoned, done.deleted) == (1, 1, 1)
    assert reload(gone.id) is None
    stone = reload(kept.id)
    assert (stone.status, stone.to, stone.user_id, stone.callback_status) == (
        "cancelled", "", None, CallbackStatus.PENDING.value)
    assert reload(other.id).to == ANN


def test_a_send_accepted_while_the_erasure_runs_is_kept_whole_and_sent(api, headers, live_deliverer, smtp,
                                                                        redis_conn, monkeypatch):
    import threading

    _send(api, headers)
    real = erasure._erase_rows
    accepted = {}

    def send_meanwhile(whose, cancelled, done):
        # Another request, on its own connection, commits a send for the same user mid-erasure.
        thread = threading.Thread(target=lambda: accepted.update(_send(api, headers, key="during")))
        thread.start()
        thread.join(10)
        return real(whose, cancelled, done)

    monkeypatch.setattr(erasure, "_erase_rows", send_meanwhile)
    answer = _erase(api, headers).get_json()

    assert (answer["cancelled"], answer["deleted"]) == (1, 1)
    kept = reload(accepted["id"])
    assert (kept.status, kept.to, kept.user_id, kept.data, kept.erased_at) == (
        "queued", ANN, "u1", {"name": "Ann Example"}, None)
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1 and reload(accepted["id"]).status == "sent"


def test_the_document_describes_the_erasure_and_its_retry_after(api):
    spec = api.get("/api/openapi.json").get_json()
    erase = spec["paths"]["/api/users/{user_id}"]["delete"]
    assert erase["responses"]["409"]["headers"]["Retry-After"] == {"$ref": "#/components/headers/Retry-After"}
    assert {"200", "409", "422"} <= set(erase["responses"])
    assert "erased_at" in spec["components"]["schemas"]["NotificationDetail"]["properties"]


def test_a_dead_letter_requeued_while_the_erasure_runs_is_not_sent_and_not_kept(
        api, headers, api_key, live_deliverer, smtp, redis_conn, monkeypatch):
    # helper 4: an operator's requeue (failed -> queued) that commits after the cancel step and before its
    # row's page is erased left the row whole (`queued` is not final) and it was sent after a 200: no order
    # of the two explains that (requeued first, the erasure cancels it; erased first, the requeue is refused).
    import threading

    failed = make_notification(api_key[0], Status.FAILED, user_id="u1", user_key="u1", to=ANN,
                               subject="Hi Ann Example").id
    real = erasure._erase_rows
    requeued = {}

    def requeue_meanwhile(whose, cancelled, done):
        def requeue():
            response = api.post(f"/api/dead-letters/{failed}/requeue", headers=headers)
            requeued["status"] = response.status_code
        threads.append(threading.Thread(target=requeue))
        threads[0].start()
        threads[0].join(1)  # now it waits for the erasure (before, it committed at once)
        return real(whose, cancelled, done)

    threads = []
    monkeypatch.setattr(erasure, "_erase_rows", requeue_meanwhile)
    _erase(api, headers)
    threads[0].join(10)
    assert requeued["status"] == 404  # erased first: the row is gone
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0, requeued
    assert _personal_data_left(ANN, "Ann Example") == [], requeued
