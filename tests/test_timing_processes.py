"""Timing and consent on real processes: app.py, worker.py and scheduler.py against the test SMTP server.

Each test checks the final status of every notification it made and exactly how many messages the
SMTP server received: delayed sends, the signup event's two emails, two schedulers at once, one-click
unsubscribe, the suppression list and daily digests.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from rq_scheduler import Scheduler

from notifier import digests
from notifier.db import database
from notifier.models import Digest, utcnow
from notifier.runtime import make_renderer
from notifier.unsubscribe import make_token, read_token
from tests.helpers import LITERAL, VERIFICATION, wait_for_arrivals
from tests.processes import Stack, cli, http, request, wait_jobs_settled, wait_until

pytestmark = pytest.mark.integration

SECRET = "timing-processes-secret"
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def make_stack(stacks, pg_settings):
    """Stacks whose unsubscribe links point at their own API."""

    def make(**env) -> Stack:
        defaults = {"SECRET_KEY": SECRET, "BRAND_NAME": pg_settings.brand_name, "RECONCILE_INTERVAL": 2}
        stack = stacks(replace(pg_settings, retry_intervals=(1, 1)), **(defaults | env))
        stack.env["PUBLIC_BASE_URL"] = stack.base
        return stack

    return make


def _at(text: str) -> datetime:
    """An API timestamp ("...Z") as an aware datetime."""
    return datetime.fromisoformat(text)


def _history_time(detail: dict, status: str) -> datetime:
    (line,) = [e for e in detail["history"] if e["status"] == status]
    return _at(line["at"])


def _api(stack: Stack, method: str, path: str, body: dict | None = None, key: str | None = None):
    return request(method, f"{stack.base}{path}", key or stack.key, body)


def _accepted(stack: Stack, payload: dict, path: str = "/api/notifications/send") -> dict:
    status, body = _api(stack, "POST", path, payload)
    assert status == 202, body
    return body


def _welcome(user_id: str, name: str, to: str = "ann@example.com", **extra) -> dict:
    return {"to": to, "template": "welcome", "data": {"name": name}, "user_id": user_id, **extra}


def _just_before_a_whole_second() -> None:
    """Sleep until the clock reads x.95 s: a send time asked for now has the largest fraction of a
    second it can have, so any rounding of it to whole seconds shows up as an early send."""
    time.sleep((0.95 - time.time() % 1) % 1)


def _recipients(smtp) -> list[str]:
    return sorted(m.rcpt_tos[0] for m in smtp.messages)


# --- delayed sends ------------------------------------------------------------------------------------


def test_delayed_send_arrives_no_earlier_than_asked_and_once(make_stack, smtp):
    stack = make_stack().start("api", "worker", "scheduler")
    _just_before_a_whole_second()
    asked = datetime.now(UTC)
    posted = time.time()
    accepted = _accepted(stack, {**LITERAL, "delay_seconds": 2})
    assert accepted["status"] == "scheduled"

    (arrived,) = wait_for_arrivals(smtp, 1, timeout=20)
    detail = stack.wait_status(accepted["id"], "sent")
    # The claim comes before the SMTP conversation, so it bounds the arrival from below; the poll
    # that first saw the message bounds it from above.
    assert _history_time(detail, "sending") >= asked + timedelta(seconds=2)
    assert 2.0 <= arrived - posted < 2.0 + 5.0
    assert _at(detail["sent_at"]) - _at(detail["created_at"]) >= timedelta(seconds=2)
    assert [e["status"] for e in detail["history"]] == ["scheduled", "queued", "sending", "sent"]
    assert detail["attempts"] == 1

    time.sleep(1.5)  # a duplicate release or delivery would land by now
    assert smtp.count() == 1
    assert smtp.messages[0].message["X-Notification-ID"] == accepted["id"]
    assert stack.get(accepted["id"])["status"] == "sent"


def test_cancelled_delayed_send_never_arrives(make_stack, smtp):
    stack = make_stack().start("api", "worker", "scheduler")
    accepted = _accepted(stack, {**LITERAL, "delay_seconds": 2})
    status, cancelled = _api(stack, "POST", f"/api/notifications/{accepted['id']}/cancel")
    assert (status, cancelled["status"]) == (200, "cancelled")

    time.sleep(2 + 3)  # past its send time, with the scheduler and the worker running
    detail = stack.get(accepted["id"])
    assert detail["status"] == "cancelled"
    assert [e["status"] for e in detail["history"]] == ["scheduled", "cancelled"]
    assert detail["attempts"] == 0 and detail["sent_at"] is None
    assert smtp.count() == 0


# --- events -------------------------------------------------------------------------------------------


DELAY = 4


def test_signup_event_sends_verification_at_once_then_welcome_after_the_delay(make_stack, smtp):
    # A delay long enough that a busy machine (a parallel suite) still sends the verification before it.
    stack = make_stack(WELCOME_DELAY_SECONDS=DELAY).start("api", "worker", "scheduler")
    event = {"type": "user.signup", "user": {"id": "u-signup", "email": "ada@example.com", "name": "Ada"},
             "data": {"code": "424242"}}
    _just_before_a_whole_second()
    posted = time.time()
    status, body = _api(stack, "POST", "/api/events", event)
    assert status == 202, body
    assert body["event"] == "user.signup"
    verification, welcome = body["notifications"]
    assert (verification["template"], verification["priority"], verification["status"]) == (
        "verification", "high", "queued")
    assert (welcome["template"], welcome["priority"], welcome["status"]) == ("welcome", "low", "scheduled")
    assert verification["send_at"] is None
    assert _at(welcome["send_at"]) >= datetime.fromtimestamp(posted, UTC) + timedelta(seconds=DELAY)
    assert not verification["replayed"] and not welcome["replayed"]

    first, second = wait_for_arrivals(smtp, 2, timeout=20)
    assert first - posted < DELAY  # high priority, at once
    assert second - posted >= DELAY
    sent_verification = stack.wait_status(verification["id"], "sent")
    sent_welcome = stack.wait_status(welcome["id"], "sent")
    assert _history_time(sent_welcome, "sending") >= _at(welcome["send_at"])
    assert _at(sent_verification["sent_at"]) < _at(sent_welcome["sent_at"])

    time.sleep(1)
    assert smtp.count() == 2
    subjects = [m.message["Subject"] for m in smtp.messages]
    assert subjects == ["Verify your email address", "Welcome to Acme"]
    assert [m.message["X-Notification-ID"] for m in smtp.messages] == [verification["id"], welcome["id"]]
    assert "424242" in smtp.messages[0].message.get_body(("plain",)).get_content()
    assert _recipients(smtp) == ["ada@example.com", "ada@example.com"]


# --- more than one scheduler --------------------------------------------------------------------------


def _periodic_job_ids(redis_conn) -> list[str]:
    return [job.id for job in Scheduler(connection=redis_conn).get_jobs()]


def _assert_each_sent_once(stack: Stack, smtp, ids: list[str], recipients: list[str]) -> None:
    for notification_id in ids:
        detail = stack.wait_status(notification_id, "sent", timeout=30)
        assert detail["attempts"] == 1
        assert [e["status"] for e in detail["history"]] == ["scheduled", "queued", "sending", "sent"]
    assert _recipients(smtp) == sorted(recipients)


def test_two_schedulers_and_a_restart_release_each_delayed_send_once(make_stack, smtp, redis_conn):
    stack = make_stack().start("api", "worker", "scheduler", "scheduler2")
    first_batch = [f"first{n}@example.com" for n in range(10)]
    first_ids = [_accepted(stack, {**LITERAL, "to": to, "delay_seconds": 1 + n % 3})["id"]
                 for n, to in enumerate(first_batch)]
    _assert_each_sent_once(stack, smtp, first_ids, first_batch)

    second_batch = [f"second{n}@example.com" for n in range(10)]
    second_ids = [_accepted(stack, {**LITERAL, "to": to, "delay_seconds": 1 + n % 3})["id"]
                  for n, to in enumerate(second_batch)]
    time.sleep(1)  # some of the second batch are due now, the rest during the restart
    stack.stop("scheduler")
    stack.start("scheduler3")
    _assert_each_sent_once(stack, smtp, second_ids, first_batch + second_batch)

    time.sleep(1.5)  # a second release of anything would have been sent by now
    assert smtp.count() == 20
    assert len({m.message["X-Notification-ID"] for m in smtp.messages}) == 20
    ids = _periodic_job_ids(redis_conn)
    assert ids.count("notifier-reconcile") == 1
    assert ids.count("notifier-digests") == 1
    assert ids.count("notifier-purge") == 1


# --- one-click unsubscribe ----------------------------------------------------------------------------


def _preferences(stack: Stack, user_id: str) -> dict:
    status, body = _api(stack, "GET", f"/api/users/{user_id}/preferences")
    assert status == 200, body
    return body["categories"]


def test_one_click_unsubscribe_stops_later_product_mail_but_not_transactional(make_stack, smtp, pg_settings,
                                                                               redis_conn):
    stack = make_stack().start("api", "worker", "scheduler")
    first = _accepted(stack, _welcome("u-unsub", "Ann"))
    stack.wait_status(first["id"], "sent")
    (received,) = smtp.wait_for(1)
    message = received.message
    match = re.fullmatch(r"<(http[^>]+/unsubscribe/([^>]+))>", message["List-Unsubscribe"])
    assert match, message["List-Unsubscribe"]
    url, token = match.groups()
    assert url.startswith(f"{stack.base}/unsubscribe/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert url in message.get_body(("plain",)).get_content()
    # A welcome already waiting when the user unsubscribes must not go out either.
    waiting = _accepted(stack, _welcome("u-unsub", "Ann", delay_seconds=2))
    assert waiting["status"] == "scheduled"

    # A link scanner's GET only shows the question.
    assert _preferences(stack, "u-unsub")["product"] == "immediate"
    status, _, page = http("GET", url)
    assert status == 200
    assert '<form method="post"' in page and "product" in page
    assert _preferences(stack, "u-unsub")["product"] == "immediate"

    # The mail client's one-click POST: no API key, the token is the credential.
    status, _, page = http("POST", url, ONE_CLICK, FORM)
    assert status == 200, page
    assert "unsubscribed" in page
    assert _preferences(stack, "u-unsub") == {"transactional": "immediate", "product": "off",
                                              "marketing": "immediate", "updates": "immediate"}

    second = _accepted(stack, _welcome("u-unsub", "Ann"))
    assert second["status"] == "suppressed"
    detail = stack.get(second["id"])
    assert detail["status"] == "suppressed"
    assert "product" in detail["history"][-1]["reason"]
    verification = _accepted(stack, {**VERIFICATION, "to": "ann@example.com", "user_id": "u-unsub"},
                             "/api/notifications/send-verification")
    stack.wait_status(verification["id"], "sent")
    held_back = stack.wait_status(waiting["id"], "suppressed", timeout=20)
    assert "product" in held_back["history"][-1]["reason"]

    wait_jobs_settled(redis_conn)  # anything still on its way to the server is there now
    assert stack.get(first["id"])["status"] == "sent"
    assert stack.get(second["id"])["status"] == "suppressed"
    assert smtp.count() == 2
    assert [m.message["X-Notification-ID"] for m in smtp.messages] == [first["id"], verification["id"]]
    assert "List-Unsubscribe" not in smtp.messages[1].message  # transactional mail has no such link

    # A tampered token, and a genuine-looking one signed by another deployment, are both refused.
    key_id, user_key, category = read_token(replace(pg_settings, secret_key=SECRET), token)
    assert (user_key, category) == ("u-unsub", "product")
    tampered = ("A" if token[0] != "A" else "B") + token[1:]
    foreign = make_token(replace(pg_settings, secret_key="another deployment"), key_id, "u-unsub", "marketing")
    for bad in (tampered, foreign):
        for status, _, text in (http("GET", f"{stack.base}/unsubscribe/{bad}"),
                                http("POST", f"{stack.base}/unsubscribe/{bad}", ONE_CLICK, FORM)):
            assert status == 400, text
            assert '"invalid_token"' in text
    assert _preferences(stack, "u-unsub")["marketing"] == "immediate"
    assert smtp.count() == 2


# --- the suppression list -----------------------------------------------------------------------------


def test_a_suppressed_address_never_reaches_the_smtp_server_until_removed(make_stack, smtp, redis_conn):
    stack = make_stack().start("api", "worker", "scheduler")
    other = cli(["keys", "create", f"other-{stack.port}"], stack.env).strip().splitlines()[-1]
    address = "gone@example.com"
    smtp.rcpt_replies.append("550 5.1.1 mailbox unavailable")
    bounced = _accepted(stack, {**LITERAL, "to": address})
    detail = stack.wait_status(bounced["id"], "failed")
    assert "5.1.1" in detail["last_error"]

    status, listed = _api(stack, "GET", "/api/suppressions")
    assert status == 200
    assert [s["email"] for s in listed["data"]] == [address]
    assert "5.1.1 mailbox unavailable" in listed["data"][0]["reason"]

    # Another key neither sees this key's list nor can change it.
    assert _api(stack, "GET", "/api/suppressions", key=other) == (200, {"data": [], "next": None})
    status, body = _api(stack, "DELETE", f"/api/suppressions/{address}", key=other)
    assert (status, body["error"]["code"]) == (404, "not_found")

    stopped = _accepted(stack, {**VERIFICATION, "to": address}, "/api/notifications/send-verification")
    assert stopped["status"] == "suppressed"
    assert "suppression list" in stack.get(stopped["id"])["history"][-1]["reason"]
    wait_jobs_settled(redis_conn)  # anything still on its way to the server is there now
    assert smtp.count() == 0

    status, body = _api(stack, "DELETE", f"/api/suppressions/{address}")
    assert (status, body) == (200, {"email": address, "suppressed": False})
    assert _api(stack, "GET", "/api/suppressions") == (200, {"data": [], "next": None})
    delivered = _accepted(stack, {**LITERAL, "to": address})
    stack.wait_status(delivered["id"], "sent")

    wait_jobs_settled(redis_conn)
    assert stack.get(bounced["id"])["status"] == "failed"
    assert stack.get(stopped["id"])["status"] == "suppressed"
    assert smtp.count() == 1
    assert smtp.messages[0].message["X-Notification-ID"] == delivered["id"]


# --- digests ------------------------------------------------------------------------------------------


def _digest_notifications(stack: Stack) -> list[dict]:
    status, body = _api(stack, "GET", "/api/notifications?template=digest")
    assert status == 200, body
    return body["data"]


def test_daily_digest_collects_held_items_into_one_message_per_window(make_stack, smtp, pg_settings, redis_conn):
    stack = make_stack().start("api", "worker", "scheduler")
    status, prefs = _api(stack, "PUT", "/api/users/u-digest/preferences", {"categories": {"product": "daily"}})
    assert (status, prefs["categories"]["product"]) == (200, "daily")
    names = ["Ann", "Ben", "Cat"]
    items = [_accepted(stack, _welcome("u-digest", name, to="dora@example.com")) for name in names]
    assert [item["status"] for item in items] == ["held"] * 3

    renderer = make_renderer(pg_settings)
    now = digests.boundary_after(utcnow(), "UTC", pg_settings.digest_time) + timedelta(
        seconds=pg_settings.digest_grace_seconds + 1)
    with database.connection_context():
        assert digests.flush_due(pg_settings, redis_conn, renderer, now=now) == 1
        assert digests.flush_due(pg_settings, redis_conn, renderer, now=now) == 0  # that window is done
    (digest,) = _digest_notifications(stack)
    stack.wait_status(digest["id"], "sent")
    (received,) = smtp.wait_for(1)
    text = received.message.get_body(("plain",)).get_content()
    for number, name in enumerate(names, start=1):
        assert f"{number}. Welcome to Acme" in text
        assert f"Hi {name}," in text
    assert "3 updates" in text
    assert received.message["X-Notification-ID"] == digest["id"]
    assert received.rcpt_tos == ["dora@example.com"]
    for item in items:
        detail = stack.get(item["id"])
        assert (detail["status"], detail["digest_id"]) == ("digested", digest["id"])

    # An item that arrives after the flush waits for the next window, even when asked again at once.
    late = _accepted(stack, _welcome("u-digest", "Dan", to="dora@example.com"))
    assert late["status"] == "held"
    with database.connection_context():
        assert digests.flush_due(pg_settings, redis_conn, renderer, now=now) == 0
        assert stack.get(late["id"])["status"] == "held"
        assert digests.flush_due(pg_settings, redis_conn, renderer, now=now + timedelta(days=1)) == 1
        assert Digest.select().count() == 2
    second = next(d for d in _digest_notifications(stack) if d["id"] != digest["id"])
    stack.wait_status(second["id"], "sent")
    wait_until(lambda: smtp.count() >= 2, timeout=10)
    wait_jobs_settled(redis_conn)  # a third message, had a digest been sent twice, is at the server now
    assert smtp.count() == 2
    later_text = smtp.messages[1].message.get_body(("plain",)).get_content()
    assert "Hi Dan," in later_text and "1 update " in later_text
    detail = stack.get(late["id"])
    assert (detail["status"], detail["digest_id"]) == ("digested", second["id"])
    for item in items:
        assert stack.get(item["id"])["digest_id"] == digest["id"]
    assert stack.get(digest["id"])["status"] == "sent"
