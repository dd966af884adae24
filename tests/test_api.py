"""The HTTP API on real PostgreSQL and Redis: acceptance, reading back, auth and every error code."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from rq import Queue

from app import create_app
from notifier.db import database
from notifier.models import Event, Notification
from notifier.queues import QUEUE_NAMES, job_id_for
from tests.helpers import LITERAL, VERIFICATION, eventually, make_notification

pytestmark = pytest.mark.integration


def _count_rows() -> tuple[int, int]:
    with database.connection_context():
        return Notification.select().count(), Event.select().count()


def _assert_envelope(response, status: int, code: str):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def test_send_is_accepted_stored_and_queued_on_its_priority(client, headers, redis_conn):
    response = client.post("/api/notifications/send", json={**LITERAL, "priority": "low", "metadata": {"k": "v"}},
                           headers=headers)
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued"
    assert response.headers["Location"] == f"/api/notifications/{body['id']}"
    queue = Queue(QUEUE_NAMES["low"], connection=redis_conn)
    assert queue.job_ids == [job_id_for(body["id"])]

    detail = client.get(response.headers["Location"], headers=headers).get_json()
    assert detail["priority"] == "low"
    assert detail["metadata"] == {"k": "v"}
    assert detail["attempts"] == 0
    assert [event["status"] for event in detail["history"]] == ["queued"]
    for field in ("status", "template", "last_error", "created_at", "updated_at", "sent_at"):
        assert field in detail


def test_send_verification_uses_the_verification_template_at_high_priority(client, headers, redis_conn):
    response = client.post("/api/notifications/send-verification", json=VERIFICATION, headers=headers)
    assert response.status_code == 202
    detail = client.get(response.headers["Location"], headers=headers).get_json()
    assert (detail["template"], detail["priority"], detail["user_id"]) == ("verification", "high", "u1")
    assert Queue(QUEUE_NAMES["high"], connection=redis_conn).count == 1


@pytest.mark.parametrize("timing", [{"delay_seconds": 4000},
                                    {"send_at": (datetime.now(UTC) + timedelta(hours=2)).isoformat()}])
def test_a_verification_sent_later_than_its_implied_deadline_names_the_send_time(client, headers, timing):
    # The 422 named ttl_seconds, a field the request never sent.
    response = client.post("/api/notifications/send-verification", json={**VERIFICATION, **timing}, headers=headers)
    assert response.status_code == 422
    ((field, (problem,)),) = response.get_json()["error"]["details"].items()
    assert field == next(iter(timing)) and "VERIFICATION_TTL_SECONDS" in problem
    own = client.post("/api/notifications/send-verification", json={**VERIFICATION, **timing, "ttl_seconds": 1},
                      headers=headers)
    assert own.status_code == 422 and set(own.get_json()["error"]["details"]) == {"ttl_seconds"}


def test_template_send_with_data(client, headers):
    payload = {"to": "ann@example.com", "template": "password_reset", "data": {"reset_url": "https://x.test/r"}}
    assert client.post("/api/notifications/send", json=payload, headers=headers).status_code == 202


@pytest.mark.parametrize("key", [None, "", "nfy_nope_nope", "garbage"])
def test_missing_or_wrong_key_is_401(client, key):
    hdrs = {} if key is None else {"X-API-Key": key}
    _assert_envelope(client.post("/api/notifications/send", json=LITERAL, headers=hdrs), 401, "unauthorized")
    _assert_envelope(client.get("/api/notifications", headers=hdrs), 401, "unauthorized")


@pytest.mark.parametrize("blanks", [" {} ", "{}\t"])
def test_blanks_around_the_key_are_not_part_of_it(client, api_key, blanks):
    # gunicorn drops them (RFC 9110 5.5) and Flask's development server did not: 200 under one, 401 under the other.
    assert client.get("/api/notifications", headers={"X-API-Key": blanks.format(api_key[1])}).status_code == 200
    _assert_envelope(client.get("/api/notifications", headers={"X-API-Key": "  "}), 401, "unauthorized")


def test_revoked_key_is_401_as_soon_as_the_api_hears_of_it(client, headers, api_key):
    from notifier import keys

    assert client.get("/api/notifications", headers=headers).status_code == 200
    with database.connection_context():
        keys.revoke(api_key[0].name)
    assert eventually(lambda: client.get("/api/notifications", headers=headers).status_code == 401, timeout=1.0)
    _assert_envelope(client.get("/api/notifications", headers=headers), 401, "unauthorized")


def test_malformed_json_is_400_and_writes_nothing(client, headers):
    response = client.post("/api/notifications/send", data='{"to": ', headers=headers,
                           content_type="application/json")
    _assert_envelope(response, 400, "malformed_json")
    _assert_envelope(client.post("/api/notifications/send", data="[1,2]", headers=headers), 400, "malformed_json")
    _assert_envelope(client.post("/api/notifications/send", data=b"\xff\xfe{", headers=headers), 400,
                     "malformed_json")
    assert _count_rows() == (0, 0)


def test_invalid_payload_is_422_naming_each_bad_field(client, headers):
    response = client.post("/api/notifications/send", json={"to": "not-an-email", "template": "welcome",
                                                            "priority": "urgent", "colour": "red"},
                           headers=headers)
    error = _assert_envelope(response, 422, "validation_error")
    assert set(error["details"]) == {"to", "priority", "colour"}
    assert _count_rows() == (0, 0)


@pytest.mark.parametrize("to", ["\u00fc@example.com", "ada@ex\u00e4mple.com"])
def test_a_non_ascii_address_is_422_not_a_send_that_can_never_go(client, headers, to):
    response = client.post("/api/notifications/send", json={"to": to, "subject": "s", "text": "t"}, headers=headers)
    error = _assert_envelope(response, 422, "validation_error")
    assert "ASCII" in error["details"]["to"][0]
    assert _count_rows() == (0, 0)


@pytest.mark.parametrize("to, accepted", [
    ("a" * 64 + "@example.com", True), ("a" * 65 + "@example.com", False),
    ("a@" + ("b" * 63 + ".") * 4 + "io", False), ("a@" + ("b" * 60 + ".") * 3 + "b" * 58 + ".io", True),
])
def test_an_address_beyond_smtps_lengths_is_422_not_a_send_every_strict_server_refuses(client, headers, to,
                                                                                     accepted):
    response = client.post("/api/notifications/send", json={"to": to, "subject": "s", "text": "t"}, headers=headers)
    if accepted:
        assert response.status_code == 202, response.get_json()
        return
    error = _assert_envelope(response, 422, "validation_error")
    assert "RFC 5321" in error["details"]["to"][0]
    assert _count_rows() == (0, 0)


def test_unknown_template_is_422_at_request_time(client, headers):
    error = _assert_envelope(
        client.post("/api/notifications/send", json={"to": "a@example.com", "template": "nope"}, headers=headers),
        422, "validation_error")
    assert "template" in error["details"]
    assert _count_rows() == (0, 0)


def test_template_missing_required_data_is_422(client, headers):
    payload = {"to": "a@example.com", "template": "password_reset", "data": {}}
    error = _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 422,
                             "validation_error")
    assert "reset_url" in json.dumps(error["details"])


def test_header_injection_in_subject_is_refused(client, headers):
    payload = {**LITERAL, "subject": "Hi\r\nBcc: victim@example.com"}
    error = _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 422,
                             "validation_error")
    assert "subject" in error["details"]


@pytest.mark.parametrize("subject", ["ctrl \u0007 bell", "esc \u001b[31m", "c1 \u0085", "   ", "\t"])
def test_a_subject_that_is_blank_or_holds_a_control_character_is_refused(client, headers, subject):
    # Both were sent: a BEL or ESC raw in the header, or "Subject: " with nothing after it.
    error = _assert_envelope(client.post("/api/notifications/send", json={**LITERAL, "subject": subject},
                                         headers=headers), 422, "validation_error")
    assert "subject" in error["details"]
    assert _count_rows() == (0, 0)


def test_oversized_body_is_413(client, headers):
    payload = {**LITERAL, "text": "x" * (300 * 1024)}
    _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 413, "payload_too_large")
    assert _count_rows() == (0, 0)


def test_unknown_route_is_404_and_wrong_method_is_405(client, headers):
    _assert_envelope(client.get("/api/nothing-here", headers=headers), 404, "not_found")
    # A GET of a POST-only route is not a request for a notification of that id, and no other method
    # is allowed there (werkzeug named GET, /<notification_id>'s, in a DELETE's Allow).
    for path in ("send", "batch", "send-verification"):
        for method in ("GET", "DELETE", "PUT", "PATCH"):
            response = client.open(f"/api/notifications/{path}", method=method, headers=headers)
            _assert_envelope(response, 405, "method_not_allowed")
            assert response.headers["Allow"] == "OPTIONS, POST", (method, path)


def test_options_of_a_post_only_route_allows_post_alone(client, headers):
    # Flask's own answer also named GET and HEAD, which /<notification_id> takes and which are 405 here.
    for path in ("send", "batch", "send-verification"):
        response = client.options(f"/api/notifications/{path}", headers=headers)
        assert response.status_code == 204
        assert response.headers["Allow"] == "OPTIONS, POST", path
    assert set(client.options("/api/notifications/abc", headers=headers).headers["Allow"].split(", ")) == {
        "GET", "HEAD", "OPTIONS"}


def test_a_path_with_a_double_slash_is_404_in_the_envelope_not_a_redirect(client, headers):
    # werkzeug would answer 308 to the merged path, with an HTML body, and a POST would be made twice.
    for path in ("/api//notifications", "/api/notifications//send"):
        _assert_envelope(client.get(path, headers=headers), 404, "not_found")
        _assert_envelope(client.post(path, json=LITERAL, headers=headers), 404, "not_found")
    assert _count_rows() == (0, 0)


def test_slashes_at_the_start_of_a_path_count_as_one(client, headers):
    # What gunicorn and the development server hand on for `POST //api/notifications/send`: werkzeug
    # routes it as /api/notifications/send, without a redirect. (The test client cannot send that path
    # itself: it reads "//api" as a host name, and so this case used to pass as a 404 of /notifications/send.)
    response = client.post("/", json=LITERAL, headers=headers,
                           environ_overrides={"PATH_INFO": "//api/notifications/send"})
    assert response.status_code == 202
    assert _count_rows()[0] == 1


def test_a_verification_url_over_2000_characters_is_422(client, headers):
    payload = {"to": "ann@example.com", "user_id": "u1",
               "verification_url": "https://app.example.com/verify?t=" + "a" * 2000}
    _assert_envelope(client.post("/api/notifications/send-verification", json=payload, headers=headers), 422,
                     "validation_error")
    assert _count_rows() == (0, 0)


def test_other_keys_notification_is_404(client, headers, other_key):
    created = client.post("/api/notifications/send", json=LITERAL, headers=headers).get_json()
    _assert_envelope(client.get(f"/api/notifications/{created['id']}", headers={"X-API-Key": other_key[1]}), 404,
                     "not_found")
    _assert_envelope(client.get("/api/notifications/00000000-0000-0000-0000-000000000000", headers=headers), 404,
                     "not_found")
    listed = client.get("/api/notifications", headers={"X-API-Key": other_key[1]}).get_json()
    assert listed["data"] == []


def test_a_notification_id_in_capitals_names_the_same_notification(client, headers):
    # Some callers' UUID types print capitals; a UUID's hex digits are the same id in either case.
    created = client.post("/api/notifications/send", json=LITERAL, headers=headers).get_json()
    shouted = created["id"].upper()

    shown = client.get(f"/api/notifications/{shouted}", headers=headers)
    assert shown.status_code == 200 and shown.get_json()["id"] == created["id"]
    cancelled = client.post(f"/api/notifications/{shouted}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    _assert_envelope(client.post(f"/api/dead-letters/{shouted}/requeue", headers=headers), 409, "not_requeueable")


def test_list_is_newest_first_paginated_and_stable_under_inserts(client, headers, api_key):
    ids = [make_notification(api_key[0], user_id=f"u{i % 2}").id for i in range(7)]
    page1 = client.get("/api/notifications?limit=3", headers=headers).get_json()
    assert [n["id"] for n in page1["data"]] == ids[::-1][:3]
    # A notification arriving between pages must not shift what the next page holds.
    make_notification(api_key[0])
    page2 = client.get(f"/api/notifications?limit=3&cursor={page1['next']}", headers=headers).get_json()
    assert [n["id"] for n in page2["data"]] == ids[::-1][3:6]
    page3 = client.get(f"/api/notifications?limit=3&cursor={page2['next']}", headers=headers).get_json()
    assert [n["id"] for n in page3["data"]] == ids[::-1][6:]
    assert page3["next"] is None


def test_list_filters(client, headers, api_key):
    make_notification(api_key[0], user_id="u1", priority="high", to="x@example.com")
    make_notification(api_key[0], user_id="u2", template="welcome", data={})
    rows = client.get("/api/notifications?user_id=u1&priority=high&to=x@example.com&status=queued",
                      headers=headers).get_json()["data"]
    assert len(rows) == 1
    assert len(client.get("/api/notifications?template=welcome", headers=headers).get_json()["data"]) == 1
    assert client.get("/api/notifications?created_after=2000-01-01T00:00:00Z&created_before=2000-01-02T00:00:00Z",
                      headers=headers).get_json()["data"] == []


def test_the_address_filter_takes_any_case(client, headers, api_key):
    # As suppressions do: the address a caller searches for is the one it sent to, in whatever case.
    sent = make_notification(api_key[0], to="Ann.Lee@Example.com")
    for query in ("ann.lee@example.com", "ANN.LEE@EXAMPLE.COM", "Ann.Lee@Example.com"):
        rows = client.get("/api/notifications", query_string={"to": query}, headers=headers).get_json()["data"]
        assert [row["id"] for row in rows] == [sent.id]


@pytest.mark.parametrize("query", ["limit=0", "limit=100000", "status=lost", "cursor=%%%", "created_after=yesterday",
                                   "colour=red", "status=queued&status=failed", "limit=5&limit=5",
                                   # int() reads these as 10, 5 and 5: not the integer the document names.
                                   "limit=1_0", "limit=%205", "limit=%D9%A5", "limit=5.0"])
def test_bad_list_queries_are_422(client, headers, query):
    _assert_envelope(client.get(f"/api/notifications?{query}", headers=headers), 422, "validation_error")


def test_a_list_cursor_we_did_not_write_is_422_even_when_it_reads_as_ours(client, headers, api_key):
    for _ in range(3):
        make_notification(api_key[0])
    ours = client.get("/api/notifications?limit=1", headers=headers).get_json()["next"]
    assert client.get("/api/notifications", query_string={"cursor": ours}, headers=headers).status_code == 200
    seq = base64.urlsafe_b64decode(ours + "=" * (-len(ours) % 4)).decode()
    arabic = "".join(chr(ord("\u0660") + int(d)) for d in seq)  # what int() reads as the same number
    others = [f"0{seq}", f"+{seq}", f" {seq}", f"{seq}\n", f"0_{seq}", arabic]
    spellings = [base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") for text in others]
    spellings += [f"{ours}==", f"{ours[:1]}!{ours[1:]}"]  # base64 skips padding past the end, and a "!"
    for cursor in spellings:
        error = _assert_envelope(client.get("/api/notifications", query_string={"cursor": cursor}, headers=headers),
                                 422, "validation_error")
        assert error["details"] == {"cursor": ["not a cursor from this API"]}, cursor


def test_user_stats_count_per_status(client, headers, api_key):
    for _ in range(3):
        make_notification(api_key[0], user_id="u9")
    make_notification(api_key[0], user_id="someone-else")
    stats = client.get("/api/notifications/user/u9/stats", headers=headers).get_json()
    assert stats["total"] == 3
    assert stats["by_status"]["queued"] == 3
    assert stats["by_status"]["sent"] == 0


def test_user_stats_of_an_address_count_what_was_sent_to_it_with_no_user_id(client, headers):
    for to in ("NoId@Example.com", "noid@example.com"):
        assert client.post("/api/notifications/send", json={**LITERAL, "to": to}, headers=headers).status_code == 202
    with_id = {**LITERAL, "to": "noid@example.com", "user_id": "u7"}  # u7's, not the address's
    assert client.post("/api/notifications/send", json=with_id, headers=headers).status_code == 202

    stats = client.get("/api/notifications/user/email:NOID@example.com/stats", headers=headers).get_json()
    assert (stats["user_id"], stats["total"], stats["by_status"]["queued"]) == ("email:noid@example.com", 2, 2)


def test_health_needs_no_key_and_ready_checks_dependencies(client):
    assert client.get("/api/health").get_json() == {"status": "ok"}
    ready = client.get("/api/ready")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok"}


def test_ready_is_503_naming_redis_when_redis_is_down(pg_settings, pg_db):
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    response = create_app(pg_settings, redis=dead).test_client().get("/api/ready")
    error = _assert_envelope(response, 503, "not_ready")
    assert "redis" in error["message"] and "database" not in error["message"]


def test_send_is_accepted_while_redis_is_down_and_stays_queued(pg_settings, pg_db, api_key):
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    client = create_app(pg_settings, redis=dead).test_client()
    response = client.post("/api/notifications/send", json=LITERAL, headers={"X-API-Key": api_key[1]})
    assert response.status_code == 202
    assert client.get(response.headers["Location"], headers={"X-API-Key": api_key[1]}).get_json()["status"] == "queued"


def test_template_data_of_the_wrong_shape_is_422(client, headers):
    payload = {"to": "a@example.com", "template": "order_confirmation", "data": {"order_id": "A-1", "items": 5,
                                                                                 "total": "1"}}
    error = _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 422,
                             "validation_error")
    assert "data" in error["details"]
    assert _count_rows() == (0, 0)


def test_the_digest_template_is_not_sent_by_callers(client, headers):
    # The README: the digest is "made by notifier from held notifications, not sent by callers". With data
    # that rendered, a caller's send of it was stored and went out as a digest of nothing.
    data = {"items": [{"subject": "Buy now"}], "period": "daily"}
    for route, body in (("send", {"to": "a@example.com", "template": "digest", "data": data}),
                        ("batch", {"notifications": [{"to": "a@example.com", "template": "digest", "data": data}]})):
        error = _assert_envelope(client.post(f"/api/notifications/{route}", json=body, headers=headers), 422,
                                 "validation_error")
        assert "digest" in json.dumps(error["details"])
    unknown = client.post("/api/notifications/send", json={"to": "a@example.com", "template": "nope"}, headers=headers)
    assert "digest" not in unknown.get_json()["error"]["details"]["template"][0]
    assert _count_rows() == (0, 0)


@pytest.mark.parametrize("path, payload", [
    ("/api/notifications/send", {**LITERAL, "delay_seconds": "60"}),
    ("/api/notifications/send", {**LITERAL, "ttl_seconds": "3600"}),
    ("/api/notifications/send", {**LITERAL, "delay_seconds": "6e1"}),
    ("/api/notifications/send-verification", {**VERIFICATION, "ttl_seconds": "60"}),
    ("/api/notifications/batch", {"notifications": [{**LITERAL, "delay_seconds": "60"}]}),
])
def test_a_number_given_as_a_string_is_422(client, headers, path, payload):
    # The document says integer; marshmallow's Integer took any string int() takes ("60", " 60"), so a
    # caller's bug (a number formatted as text) was accepted here and refused by any stricter server.
    error = _assert_envelope(client.post(path, json=payload, headers=headers), 422, "validation_error")
    assert "seconds" in json.dumps(error["details"])
    assert _count_rows() == (0, 0)


def test_a_whole_number_of_seconds_written_as_a_float_is_still_taken(client, headers):
    response = client.post("/api/notifications/send", json={**LITERAL, "delay_seconds": 60.0}, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)


@pytest.mark.parametrize("path", [
    "/api/notifications/send", "/api/notifications/abc", "/api/notifications", "/api/events",
    "/api/users/u1/preferences", "/api/suppressions", "/api/dead-letters", "/api/health", "/api/openapi.json",
    "/unsubscribe/some-token",
])
def test_options_answers_204_with_allow_and_no_body(client, headers, path):
    # Flask's own answer was 200 with an empty text/html body: neither the JSON envelope nor nothing.
    response = client.options(path, headers=headers)
    assert response.status_code == 204, response.get_data(as_text=True)
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers
    assert "OPTIONS" in response.headers["Allow"].split(", ")


def test_a_template_that_raises_as_it_renders_is_422_not_500(pg_settings, pg_db, redis_conn, headers, tmp_path):
    # An operator's template dividing by a value of the data, or looping over range(10 ** 6): a 500
    # that named nothing, until the sandbox's errors were the template's.
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "share.subject.txt").write_text("Your share")
    (tmp_path / "email" / "share.txt").write_text("{{ total / people }} each")
    settings = replace(pg_settings, templates_dir=str(tmp_path))
    client = create_app(settings, redis=redis_conn).test_client()

    payload = {"to": "a@example.com", "template": "share", "data": {"total": 10, "people": 0}}
    error = _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 422,
                             "validation_error")
    assert "ZeroDivisionError" in json.dumps(error["details"])
    assert _count_rows() == (0, 0)


@pytest.mark.parametrize("name, files, why", [
    ("receipt", ["receipt.html"], "email/receipt.subject.txt is missing"),
    ("receipt", ["receipt.subject.txt"], "email/receipt.txt and email/receipt.html are both missing"),
    ("Receipt", ["Receipt.subject.txt", "Receipt.txt"], "lower-case letters, digits and _"),
    ("receipt", [], None),
])
def test_a_template_an_operator_left_incomplete_is_422_saying_what_it_lacks(pg_settings, pg_db, redis_conn, headers,
                                                                             tmp_path, name, files, why):
    (tmp_path / "email").mkdir()
    for file in files:
        (tmp_path / "email" / file).write_text("Receipt")
    client = create_app(replace(pg_settings, templates_dir=str(tmp_path)), redis=redis_conn).test_client()

    payload = {"to": "a@example.com", "template": name, "data": {}}
    error = _assert_envelope(client.post("/api/notifications/send", json=payload, headers=headers), 422,
                             "validation_error")
    (message,) = error["details"]["template"]
    assert message.startswith(f"no template named {name!r}")
    assert (why in message) if why else ("(" not in message.split(";")[0])
