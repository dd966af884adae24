"""GET /api/templates and POST /api/templates/<name>/preview: what a send would put in the email."""

from __future__ import annotations

import pytest
from rq import Queue

from notifier.queues import QUEUE_NAMES
from tests.helpers import notification_count, run_worker_until_idle

pytestmark = pytest.mark.integration

ORDER = {"order_id": "A-1001", "name": "Ada", "items": [{"name": "Mug", "quantity": 2, "price": "9.50"}],
         "total": "19.00", "order_url": "https://shop.example/orders/A-1001"}


def _preview(client, headers, name, data, status=200):
    response = client.post(f"/api/templates/{name}/preview", json={"data": data}, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def _nothing_stored_or_queued(redis_conn, smtp):
    assert notification_count() == 0
    assert all(Queue(name, connection=redis_conn).count == 0 for name in QUEUE_NAMES)
    assert smtp.count() == 0


def test_the_templates_a_send_may_name_are_listed_with_their_categories(client, headers):
    response = client.get("/api/templates", headers=headers)

    assert response.status_code == 200
    listed = {t["name"]: t["category"] for t in response.get_json()["data"]}
    assert listed == {"order_confirmation": "transactional", "password_reset": "transactional",
                      "verification": "transactional", "welcome": "product"}  # never the digest
    assert "RateLimit-Remaining" in response.headers


def test_a_preview_is_what_the_send_puts_in_the_email(client, headers, deliverer, smtp, redis_conn):
    shown = _preview(client, headers, "order_confirmation", ORDER)
    assert shown["template"] == "order_confirmation" and shown["category"] == "transactional"
    assert "A-1001" in shown["subject"] and "Mug" in shown["text"] and "Mug" in shown["html"]
    assert "unsubscribe" not in shown["html"].lower()  # transactional: no footer link
    _nothing_stored_or_queued(redis_conn, smtp)

    sent = client.post("/api/notifications/send", headers=headers,
                       json={"to": "ada@example.com", "template": "order_confirmation", "data": ORDER})
    assert sent.status_code == 202
    run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    text, html = (part.get_content().replace("\r\n", "\n") for part in received.message.iter_parts())
    assert (received.message["Subject"], text, html) == (shown["subject"], shown["text"], shown["html"])


def test_a_preview_of_mail_a_user_can_unsubscribe_from_shows_where_the_link_goes(client, headers, pg_settings,
                                                                                  redis_conn, smtp):
    shown = _preview(client, headers, "welcome", {"name": "Ada"})

    link = f"{pg_settings.public_base_url}/unsubscribe/preview"
    assert shown["category"] == "product"
    assert link in shown["html"] and link in shown["text"]
    _nothing_stored_or_queued(redis_conn, smtp)
    # It leads nowhere: the page for a link that is not valid, never anyone's preferences.
    assert client.get("/unsubscribe/preview").status_code in (400, 404)
    assert client.post("/unsubscribe/preview").status_code in (400, 404)


@pytest.mark.parametrize("name, data, field", [
    ("order_confirmation", {"order_id": "A-1"}, "data"),  # items and total missing
    ("password_reset", {"reset_url": "/reset/1"}, "data"),  # a link without a scheme
    ("password_reset", {"reset_url": "javascript:alert(1)"}, "data"),
    ("welcome", {"unsubscribe_url": "https://evil.example/"}, "data"),  # notifier's own variable
])
def test_a_preview_refuses_what_a_send_refuses(client, headers, redis_conn, smtp, name, data, field):
    error = _preview(client, headers, name, data, status=422)["error"]
    assert error["code"] == "validation_error" and field in error["details"]
    send = client.post("/api/notifications/send", headers=headers,
                       json={"to": "ada@example.com", "template": name, "data": data})
    assert send.status_code == 422 and send.get_json()["error"]["details"] == error["details"]
    _nothing_stored_or_queued(redis_conn, smtp)


@pytest.mark.parametrize("name", ["digest", "no_such_template", "..%2Fverification", "_layout"])
def test_a_preview_of_a_template_a_send_cannot_name_is_not_found(client, headers, name):
    error = _preview(client, headers, name, {}, status=404)["error"]
    assert error["code"] == "not_found"


@pytest.mark.parametrize("body, status", [({"data": "x"}, 422), ({"data": {}, "to": "ada@example.com"}, 422),
                                          ([], 400), ({"data": {"a": "\ud800"}}, 422)])
def test_a_preview_body_that_is_wrong_is_refused_as_a_sends_is(client, headers, body, status):
    response = client.post("/api/templates/welcome/preview", json=body, headers=headers)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == {400: "malformed_json", 422: "validation_error"}[status]


def test_templates_need_an_api_key(client):
    assert client.get("/api/templates").status_code == 401
    assert client.post("/api/templates/welcome/preview", json={}).status_code == 401
