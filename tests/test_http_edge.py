"""The API's HTTP edge as clients in other languages and proxies reach it: headers on every answer,
what a body may be encoded as, how a path is read, and what gunicorn answers before the app does."""

from __future__ import annotations

import gzip
import json
import socket

import pytest

from notifier.api import headers as answer_headers
from tests.helpers import LITERAL, notification_count, run_worker_until_idle
from tests.test_hostile_input import _gunicorn, _raw_http

pytestmark = pytest.mark.integration

SEND = "/api/notifications/send"
PROTECTIONS = {"Cache-Control": "no-store", **answer_headers.PROTECTIONS}


def _refused(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"code", "message", "details"} and error["code"] == code
    return error


# --- headers on every answer ------------------------------------------------------------------------


def test_every_answer_is_not_to_be_stored_nor_framed(client, headers):
    # GET answers hold addresses and user ids, and X-API-Key is no credential to a shared cache: one
    # that kept GET /api/notifications (no Cache-Control) would hand it to the next caller of that URL.
    notification_id = client.post(SEND, json=LITERAL, headers=headers).get_json()["id"]
    answers = [client.get(f"/api/notifications/{notification_id}", headers=headers),
               client.get("/api/notifications", headers=headers),
               client.get("/api/users/u1/preferences", headers=headers),
               client.get("/api/notifications"),  # 401
               client.get("/no/such/route"),
               client.options("/api/health"),
               # The unsubscribe page: a form a framing site could have a reader click.
               client.get("/unsubscribe/not-a-token", headers={"Accept": "text/html"})]
    for response in answers:
        for name, value in PROTECTIONS.items():
            assert response.headers.get(name) == value, (response.request.path, name)


def test_mail_links_and_location_never_come_from_the_host_header(client, headers, deliverer, smtp, redis_conn,
                                                                pg_settings):
    spoofed = {**headers, "Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http",
               "X-Forwarded-Prefix": "/evil", "Forwarded": "host=evil.example;proto=http"}
    response = client.post(SEND, json={"to": "ada@example.com", "template": "welcome", "user_id": "u-host",
                                       "data": {"name": "Ada"}}, headers=spoofed)
    assert response.status_code == 202
    assert response.headers["Location"] == f"/api/notifications/{response.get_json()['id']}"
    run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    assert received.message["List-Unsubscribe"].startswith(f"<{pg_settings.public_base_url}/unsubscribe/")
    assert "evil" not in received.message.as_string()


# --- bodies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"to": "ada@example.com", "to": "eve@example.com", "subject": "s", "text": "t"}',
    b'{"to": "ada@example.com", "subject": "s", "text": "t", "metadata": {"a": 1, "a": 2}}',
])
def test_a_json_object_naming_a_key_twice_is_400(client, headers, raw):
    # The last "to" was taken, where a parser in front (a filter, a signature check) may read the first.
    error = _refused(client.post(SEND, data=raw, headers=headers, content_type="application/json"), 400,
                     "malformed_json")
    assert "twice" in error["message"]
    assert notification_count() == 0


@pytest.mark.parametrize("coding", ["gzip", "br", "identity, gzip"])
def test_a_compressed_body_is_415(client, headers, coding):
    body = gzip.compress(json.dumps(LITERAL).encode()) if "gzip" in coding else json.dumps(LITERAL).encode()
    response = client.post(SEND, data=body, headers={**headers, "Content-Encoding": coding},
                           content_type="application/json")
    _refused(response, 415, "unsupported_media_type")
    assert response.headers["Accept-Encoding"] == "identity"
    assert notification_count() == 0


def test_the_openapi_document_names_the_415_of_routes_with_a_body(client):
    paths = client.get("/api/openapi.json").get_json()["paths"]
    assert "415" in paths[SEND]["post"]["responses"]
    assert "RateLimit-Remaining" not in paths[SEND]["post"]["responses"]["415"].get("headers", {})
    assert "415" not in paths["/api/templates"]["get"]["responses"]


def test_a_body_said_to_be_identity_coded_is_read_and_so_is_no_body_with_a_coding(client, headers):
    response = client.post(SEND, json=LITERAL, headers={**headers, "Content-Encoding": "identity"})
    assert response.status_code == 202
    assert client.get("/api/health", headers={"Content-Encoding": "gzip"}).status_code == 200


# --- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, query", [("/api/users/\xff/preferences", ""), ("/api/users/\xc0\xaf", ""),
                                         ("/api/notifications", "user_id=%C0"), ("/api/notifications", "to=%ff"),
                                         # a byte as is, as a server that passes them on writes it (WSGI: Latin-1)
                                         ("/api/notifications", "user_id=\xff")])
def test_a_path_or_query_that_is_not_utf8_is_400(client, headers, path, query):
    # werkzeug read each byte that is not UTF-8 as U+FFFD: /api/users/%ff and /api/users/%fe named one
    # user, "\ufffd", and a DELETE of either erased that user's mail.
    method = client.delete if path.startswith("/api/users/\xc0") else client.get
    response = method("/", headers=headers, environ_overrides={"PATH_INFO": path, "QUERY_STRING": query})
    _refused(response, 400, "bad_request")


def test_a_path_the_development_server_decoded_is_still_refused_when_it_was_not_utf8(client, headers):
    # `python app.py` (make run) decodes the escapes itself, each byte that is not UTF-8 as U+FFFD, so
    # PATH_INFO held a valid "\ufffd" and /api/users/%ff/preferences was that user's: the README says 400.
    for method, path in (("get", "/api/users/%ff/preferences"), ("delete", "/api/users/%fe")):
        response = getattr(client, method)("/", headers=headers, environ_overrides={
            "PATH_INFO": path.replace("%ff", "\ufffd").replace("%fe", "\ufffd").encode().decode("latin-1"),
            "RAW_URI": path, "REQUEST_URI": path})
        _refused(response, 400, "bad_request")
    # The escapes of UTF-8 in the request line as sent are read as the character they write.
    response = client.get("/", headers=headers, environ_overrides={
        "PATH_INFO": "/api/users/\u00fc/preferences".encode().decode("latin-1"),
        "RAW_URI": "/api/users/%C3%BC/preferences"})
    assert response.status_code == 200 and response.get_json()["user_id"] == "\u00fc"


def test_a_user_id_in_utf8_is_read_as_written(client, headers):
    response = client.get("/api/notifications/user/%C3%BC/stats", headers=headers)
    assert response.status_code == 200 and response.get_json()["user_id"] == "ü"


# --- methods ----------------------------------------------------------------------------------------


def test_options_on_preferences_offers_what_a_405_there_allows(client, headers):
    # /<user_id> matches u1/preferences too, so OPTIONS offered DELETE, which is 405 there.
    allowed = client.options("/api/users/u1/preferences", headers=headers).headers["Allow"]
    refused = client.delete("/api/users/u1/preferences", headers=headers)
    assert refused.status_code == 405
    assert set(allowed.split(", ")) == set(refused.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "PUT"}
    assert "DELETE" in client.options("/api/users/u1", headers=headers).headers["Allow"]


def test_options_on_a_user_called_preferences_offers_what_that_path_takes(client, headers):
    # /api/users/preferences is the user "preferences", whom DELETE erases; it has no preferences route.
    allowed = client.options("/api/users/preferences", headers=headers).headers["Allow"]
    assert set(allowed.split(", ")) == {"DELETE", "OPTIONS"}
    assert client.delete("/api/users/preferences", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/api/notifications/send", "/api/notifications/batch",
                                  "/api/notifications/send-verification"])
def test_a_get_of_a_post_only_route_is_405_before_the_api_key_is_looked_at(client, headers, path):
    # It was taken for GET /api/notifications/<id>: 401 without a key, and with one a 405 that counted
    # against the key's rate and said so. The README: a 405 is answered before the key, without RateLimit.
    for given in ({}, headers):
        response = client.get(path, headers=given)
        _refused(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == "OPTIONS, POST"
        assert "RateLimit-Limit" not in response.headers
    assert client.get(path.upper().replace("/API/NOTIFICATIONS", "/api/notifications"), headers=headers
                      ).status_code == 404  # SEND is no notification's id either, and no route


# --- under gunicorn ---------------------------------------------------------------------------------


def test_gunicorn_refusals_carry_the_answer_headers_and_odd_codings_are_refused(pg_settings, api_key, tmp_path):
    key = api_key[1].encode()
    with _gunicorn(pg_settings, tmp_path) as (port, log):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            head = sock.recv(65536).partition(b"\r\n\r\n")[0].decode() + "\r\n"
        assert head.startswith("HTTP/1.1 431 ")
        for name, value in PROTECTIONS.items():
            assert f"\r\n{name}: {value}\r\n" in head, name

        # gunicorn hands a `gzip, chunked` body on still compressed: it was "not valid UTF-8".
        body = gzip.compress(json.dumps(LITERAL).encode())
        status, answer = _raw_http(port, b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                         b"Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n"
                                         b"X-API-Key: " + key, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert (status, json.loads(answer)["error"]["code"]) == (501, "not_implemented")

        # A body over MAX_BODY_BYTES announced with `Expect: 100-continue`: gunicorn said 100 before the
        # app could refuse it, so the client sent it all for nothing.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nX-API-Key: "
                         + key + b"\r\nContent-Length: %d\r\n\r\n" % (pg_settings.max_body_bytes + 1))
            first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 413 "), first
        # Within the limit, the client is still told to go on, and its body is read.
        payload = json.dumps(LITERAL).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nX-API-Key: "
                         + key + b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(payload))
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(payload)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 202 "), answer
        assert "Traceback" not in log.read_text()
    assert notification_count() == 1


def test_a_request_without_a_host_or_naming_no_host_is_400(pg_settings, pg_db, tmp_path):
    # RFC 9112 3.2 asks a 400 of both; they were answered 200.
    with _gunicorn(pg_settings, tmp_path) as (port, _):
        for request in (b"GET /api/notifications HTTP/1.1\r\nConnection: close",
                        b"GET /api/health HTTP/1.1\r\nHost: a b/c@d\r\nConnection: close"):
            status, answer = _raw_http(port, request)
            assert (status, json.loads(answer)["error"]["code"]) == (400, "bad_request"), request
        for request in (b"GET /api/health HTTP/1.0",
                        # A load balancer's bare health check (HAProxy's `option httpchk ... HTTP/1.1`).
                        b"GET /api/health HTTP/1.1\r\nConnection: close",
                        b"GET /api/ready HTTP/1.1\r\nConnection: close",
                        b"GET /api/health HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close",
                        b"GET /api/health HTTP/1.1\r\nHost: api.example.com\r\nConnection: close"):
            assert _raw_http(port, request)[0] == 200, request


def test_a_chunked_body_that_stops_short_is_not_said_to_miss_its_content_length(pg_settings, api_key, tmp_path):
    # A chunk announced and never sent: the refusal spoke of a Content-Length the request did not have.
    with _gunicorn(pg_settings, tmp_path, CLIENT_TIMEOUT="1") as (port, _):
        status, answer = _raw_http(port, b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                         b"Transfer-Encoding: chunked\r\nX-API-Key: " + api_key[1].encode(),
                                   b"100000\r\n{}")
    error = json.loads(answer)["error"]
    assert (status, error["code"]) == (400, "bad_request")
    assert "before its last chunk" in error["message"] and "Content-Length" not in error["message"]
