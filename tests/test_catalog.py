"""GET /api/templates and POST /api/templates/<name>/preview: what a send would put in the email."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from rq import Queue

from app import create_app
from notifier.config import Settings
from notifier.errors import ConfigError
from notifier.queues import QUEUE_NAMES
from notifier.rendering import MAX_PART_CHARS
from tests.helpers import installed_deliverer, notification_count, run_worker_until_idle

pytestmark = pytest.mark.integration

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
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


@pytest.mark.parametrize("body, preview, send", [
    # Its own link, shown through `link` as the layout shows it: every send was refused ("a link in
    # the data has no scheme", the check rendered it without the link), while its preview showed it.
    ('<p>News</p><a href="{{ unsubscribe_url|link }}">Stop these</a>', 200, 202),
    # Failing only beside the link: accepted, then failed for good at its first attempt.
    ("<p>News</p>{% if unsubscribe_url %}{{ 1 / 0 }}{% endif %}", 422, 422),
])
def test_a_send_is_checked_with_the_unsubscribe_link_its_email_has(pg_settings, pg_db, redis_conn, headers, smtp,
                                                                    tmp_path, body, preview, send):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "news.subject.txt").write_text("News")
    (tmp_path / "email" / "news.html").write_text(body)
    settings = replace(pg_settings, templates_dir=str(tmp_path))
    client = create_app(settings, redis=redis_conn).test_client()

    assert client.post("/api/templates/news/preview", json={"data": {}}, headers=headers).status_code == preview
    sent = client.post("/api/notifications/send", headers=headers, json={"to": "ada@example.com", "template": "news"})
    assert sent.status_code == send, sent.get_data(as_text=True)
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)
    if send == 202:
        (received,) = smtp.wait_for(1)
        link = received.message["List-Unsubscribe"].strip("<>")
        assert f'href="{link}"' in received.message.get_body(("html",)).get_content()
    else:
        assert notification_count() == 0 and smtp.count() == 0


def test_a_send_near_the_size_bound_is_checked_with_a_link_as_long_as_its_emails(pg_settings, pg_db, redis_conn,
                                                                                 headers, smtp, tmp_path):
    # The check's placeholder token was about a hundred characters shorter than the real one: a template
    # within that margin of MAX_PART_CHARS was accepted, then failed for good at its first attempt.
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "news.subject.txt").write_text("News")
    (tmp_path / "email" / "news.txt").write_text("{{ 'p' * pad }}{{ unsubscribe_url }}")
    settings = replace(pg_settings, templates_dir=str(tmp_path))
    client = create_app(settings, redis=redis_conn).test_client()
    around = len(_preview(client, headers, "news", {"pad": 0})["text"])
    pad = MAX_PART_CHARS - around - 10
    assert len(_preview(client, headers, "news", {"pad": pad})["text"]) <= MAX_PART_CHARS  # the preview's own link

    sent = client.post("/api/notifications/send", headers=headers,
                       json={"to": "ada@example.com", "user_id": "u-1", "template": "news", "data": {"pad": pad}})

    assert sent.status_code == 422 and "1000000" in sent.get_data(as_text=True).replace(",", "")
    _nothing_stored_or_queued(redis_conn, smtp)
    fits = client.post("/api/notifications/send", headers=headers,
                       json={"to": "ada@example.com", "user_id": "u-1", "template": "news", "data": {"pad": pad - 200}})
    assert fits.status_code == 202
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert smtp.wait_for(1)


def test_a_placeholder_tokens_length_is_a_real_tokens(sqlite_settings):
    from notifier import unsubscribe

    for key_id in (1, 9, 10, 123456789):
        for user_key in ("u", "user:" + "u" * 11, "email:ann@example.com", "user:Zoë 😀", "user:" + "é" * 250):
            for category in ("product", "marketing"):
                assert unsubscribe.token_length(key_id, user_key, category) == len(
                    unsubscribe.make_token(sqlite_settings, key_id, user_key, category))


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


def test_template_categories_put_an_operators_own_templates_where_they_belong(pg_settings, pg_db, redis_conn,
                                                                               headers, smtp, tmp_path):
    # An own template was `product` unless notifier/rules.py was edited: an invoice could be turned
    # off by a user, held for a digest, and carried an unsubscribe link.
    shutil.copytree(TEMPLATES, tmp_path, dirs_exist_ok=True)
    for name in ("invoice", "news", "tips"):
        (tmp_path / "email" / f"{name}.subject.txt").write_text(name.capitalize())
        (tmp_path / "email" / f"{name}.txt").write_text(f"Your {name}, {{{{ name }}}}.")
    settings = replace(pg_settings, templates_dir=str(tmp_path), template_categories=Settings.from_env(
        {"TEMPLATE_CATEGORIES": "invoice=transactional, news = marketing,welcome=marketing"}).template_categories)
    client = create_app(settings, redis=redis_conn).test_client()

    listed = {t["name"]: t["category"] for t in client.get("/api/templates", headers=headers).get_json()["data"]}
    assert {n: listed[n] for n in ("invoice", "news", "tips", "welcome", "verification")} == {
        "invoice": "transactional", "news": "marketing", "tips": "product", "welcome": "marketing",
        "verification": "transactional"}
    off = {"categories": {"product": "off", "marketing": "off"}}
    assert client.put("/api/users/u1/preferences", json=off, headers=headers).status_code == 200

    statuses = {}
    for name in ("invoice", "news", "tips", "welcome"):
        sent = client.post("/api/notifications/send", headers=headers,
                           json={"to": "ada@example.com", "user_id": "u1", "template": name, "data": {"name": "Ada"}})
        assert sent.status_code == 202, sent.get_data(as_text=True)
        statuses[name] = sent.get_json()["status"]
    assert statuses == {"invoice": "queued", "news": "suppressed", "tips": "suppressed", "welcome": "suppressed"}
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    assert received.message["Subject"] == "Invoice" and received.message["List-Unsubscribe"] is None
    assert "unsubscribe" not in received.message.get_content().lower()  # transactional: no footer link
    preview = client.post("/api/templates/invoice/preview", json={"data": {"name": "Ada"}}, headers=headers)
    assert preview.get_json()["category"] == "transactional"


@pytest.mark.parametrize("raw, said", [
    ("invoice", "TEMPLATE=CATEGORY"), ("invoice=billing", "one of transactional"), ("=transactional", "pairs"),
    ("Invoice=transactional", "pairs"), ("digest=transactional", "cannot name the digest"),
    ("invoice=transactional,invoice=marketing", "names 'invoice' twice"),
    ("invoice=transactional,invoice=transactional", "names 'invoice' twice"),  # as the README says
])
def test_template_categories_that_are_wrong_are_refused_at_start(raw, said):
    with pytest.raises(ConfigError, match="TEMPLATE_CATEGORIES") as refused:
        Settings.from_env({"TEMPLATE_CATEGORIES": raw})
    assert said in str(refused.value)


def test_template_categories_are_none_unless_given():
    assert Settings.from_env({}).template_categories == ()
    assert Settings.from_env({"TEMPLATE_CATEGORIES": " , "}).template_categories == ()


def test_a_templates_dir_without_what_notifier_sends_itself_is_warned_of_at_start(pg_settings, pg_db, redis_conn,
                                                                                  tmp_path, caplog):
    # A folder of an operator's own templates alone: every digest failed into the dead-letter queue
    # with its items, and each event and send-verification was a 422, with nothing said at start.
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "invoice.subject.txt").write_text("Invoice")
    (tmp_path / "email" / "invoice.txt").write_text("Yours")
    settings = replace(pg_settings, templates_dir=str(tmp_path),
                       template_categories=(("invoice", "transactional"), ("invoise", "marketing")))
    with caplog.at_level("WARNING", logger="notifier"):
        create_app(settings, redis=redis_conn)

    (lacking,) = [r.getMessage() for r in caplog.records if "lacks templates" in r.getMessage()]
    for said in ("digest (every digest)", "welcome (the event user.signup)", "verification (send-verification)",
                 "password_reset (the event password.reset_requested)", "order_confirmation (the event order.placed)"):
        assert said in lacking
    (typo,) = [r.getMessage() for r in caplog.records if "TEMPLATE_CATEGORIES names" in r.getMessage()]
    assert typo.endswith(": invoise")


def test_the_shipped_templates_lack_nothing(pg_settings, pg_db, redis_conn, caplog):
    with caplog.at_level("WARNING", logger="notifier"):
        create_app(pg_settings, redis=redis_conn)
    assert not [r for r in caplog.records if "templates" in r.getMessage()]


def test_a_send_of_a_template_whose_layout_is_missing_is_a_422_naming_it(pg_settings, pg_db, redis_conn, headers,
                                                                         tmp_path):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "note.subject.txt").write_text("Note")
    (tmp_path / "email" / "note.html").write_text('{% extends "email/_layout.html" %}')
    client = create_app(replace(pg_settings, templates_dir=str(tmp_path)), redis=redis_conn).test_client()

    for path, body in (("/api/templates/note/preview", {}),
                       ("/api/notifications/send", {"to": "ada@example.com", "template": "note"})):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 422
        assert response.get_json()["error"]["details"] == {
            "template": ["template 'note': email/_layout.html is missing"]}
    assert notification_count() == 0
