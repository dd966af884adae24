"""Consent through the API, in process on real PostgreSQL and Redis: preferences, what a send becomes
for each of them, business events, the suppression list and literal sends with a category.

Where a test sends, an in-process worker then runs every queued job, and the test checks the final
status of each notification and exactly how many messages the test SMTP server received.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import timedelta
from urllib.parse import quote, urlparse

import psycopg2
import pytest
from itsdangerous import URLSafeSerializer
from peewee import OperationalError
from rq import Queue
from rq_scheduler import Scheduler

from app import create_app
from notifier import consent, keys, store, unsubscribe
from notifier.db import bind, database
from notifier.jobs import Deliverer
from notifier.mail import MemoryMailer
from notifier.models import ApiKey, DeliveryMode, Notification, Preference, UserProfile, utcnow
from notifier.queues import CALLBACK_QUEUE, QUEUES_BY_PRIORITY, callback_job_id_for
from notifier.reconciler import reconcile
from notifier.runtime import make_renderer
from notifier.schema import upgrade
from tests.conftest import PG_ADMIN_URL
from tests.helpers import (
    LITERAL,
    VERIFICATION,
    concurrently,
    eventually,
    notification_count,
    reload,
    run_worker_until_idle,
)

pytestmark = pytest.mark.integration

DEFAULTS = {"transactional": "immediate", "product": "immediate", "marketing": "immediate", "updates": "immediate"}
SIGNUP = {"type": "user.signup", "user": {"id": "u-evt", "email": "eve@example.com", "name": "Eve"},
          "data": {"code": "777111"}}
ORDER = {"order_id": "A-1001", "items": [{"name": "Tea", "quantity": 2, "price": "4.50"}], "total": "9.00"}


def _error(response, status: int, code: str = "validation_error") -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    return error


def _prefs(client, headers, user_id: str = "u1") -> dict:
    response = client.get(f"/api/users/{user_id}/preferences", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _put(client, headers, changes: dict, user_id: str = "u1"):
    return client.put(f"/api/users/{user_id}/preferences", json=changes, headers=headers)


def test_what_get_answers_can_be_put_back_as_it_is(client, headers):
    # Its user_id and transactional were refused (422): a read-modify-write client could not save.
    assert _put(client, headers, {"categories": {"marketing": "weekly"}, "timezone": "Europe/Berlin"},
                user_id="email:Ann@Example.com").status_code == 200
    shown = _prefs(client, headers, "email:ann@example.com")
    shown["categories"]["product"] = "daily"

    saved = _put(client, headers, shown, user_id="email:ANN@example.com")

    assert saved.status_code == 200, saved.get_data(as_text=True)
    assert saved.get_json() == shown == _prefs(client, headers, "email:ann@example.com")


@pytest.mark.parametrize(("stored", "shown"), [("posix/Europe/Berlin", "Europe/Berlin"),
                                              ("right/Asia/Tokyo", "Asia/Tokyo"), ("localtime", "UTC")])
def test_a_time_zone_stored_before_names_were_checked_is_shown_as_what_it_means(client, headers, stored, shown):
    # Stored by a version that took any name ZoneInfo opened: GET showed it and a PUT of it was 422.
    assert _put(client, headers, {"timezone": "Europe/Paris"}).status_code == 200
    UserProfile.update(timezone=stored).where(UserProfile.user_key == "u1").execute()
    answered = _prefs(client, headers, "u1")
    assert answered["timezone"] == shown
    assert consent.zone(stored).key == shown
    assert _put(client, headers, answered).status_code == 200


def test_quiet_hours_stored_before_they_were_checked_are_shown_as_times_of_day(client, headers):
    # Versions that took " 7:00" stored it as given: GET showed it, and a PUT of what GET showed was 422.
    assert _put(client, headers, {"quiet_hours": {"start": "22:00", "end": "07:00"}}).status_code == 200
    UserProfile.update(quiet_start=" 7:00", quiet_end="8:30 ").where(UserProfile.user_key == "u1").execute()
    answered = _prefs(client, headers, "u1")
    assert answered["quiet_hours"] == {"start": "07:00", "end": "08:30"}
    assert _put(client, headers, answered).status_code == 200


def _send(client, headers, payload: dict, path: str = "/api/notifications/send") -> dict:
    response = client.post(path, json=payload, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def _detail(client, headers, notification_id: str) -> dict:
    response = client.get(f"/api/notifications/{notification_id}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _welcome(user_id: str = "u1", **extra) -> dict:
    return {"to": "ann@example.com", "template": "welcome", "data": {"name": "Ann"}, "user_id": user_id, **extra}


def _nothing_queued(redis_conn) -> bool:
    """No job on any notifier queue and nothing waiting in rq-scheduler."""
    queued = sum(Queue(name, connection=redis_conn).count for name in QUEUES_BY_PRIORITY)
    return queued == 0 and Scheduler(connection=redis_conn).count() == 0


# --- preferences --------------------------------------------------------------------------------------


def test_unknown_user_has_default_preferences(client, headers, smtp):
    assert _prefs(client, headers, "nobody") == {"user_id": "nobody", "timezone": "UTC", "quiet_hours": None,
                                                 "categories": DEFAULTS}
    assert notification_count() == 0
    assert smtp.count() == 0


def test_partial_preference_changes_merge_with_what_was_set(client, headers, smtp):
    assert _put(client, headers, {"categories": {"marketing": "off"}}).status_code == 200
    assert _put(client, headers, {"timezone": "Europe/Berlin"}).status_code == 200
    assert _put(client, headers, {"quiet_hours": {"start": "22:00", "end": "07:00"}}).status_code == 200
    response = _put(client, headers, {"categories": {"product": "weekly"}})
    assert response.status_code == 200
    expected = {"user_id": "u1", "timezone": "Europe/Berlin", "quiet_hours": {"start": "22:00", "end": "07:00"},
                "categories": {**DEFAULTS, "marketing": "off", "product": "weekly"}}
    assert response.get_json() == expected
    assert _prefs(client, headers) == expected

    cleared = _put(client, headers, {"quiet_hours": None}).get_json()
    assert cleared == {**expected, "quiet_hours": None}
    assert notification_count() == 0
    assert smtp.count() == 0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        # In the zone database, but no place's time: each host's own clock, and placeholders.
        ({"timezone": "localtime"}, "timezone"),
        ({"timezone": "posixrules"}, "timezone"),
        ({"timezone": "Factory"}, "timezone"),
        # The database's copies of each zone: right/ counts leap seconds (its clock ~27 s off).
        ({"timezone": "right/UTC"}, "timezone"),
        ({"timezone": "posix/Europe/Berlin"}, "timezone"),
        # Not zones, though the zone database has files by these names' paths: a folder of zones, and
        # a name longer than a file name may be (both an OSError from zoneinfo, a 500 once).
        ({"timezone": "America"}, "timezone"),
        ({"timezone": "Europe/" + "x" * 300}, "timezone"),
        ({"categories": {"product": "hourly"}}, "categories"),
        ({"categories": {"transactional": "off"}}, "categories"),
        ({"categories": {"gossip": "off"}}, "categories"),
        ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "7:00 ", "end": "22:00"}}, "quiet_hours"),  # stored and echoed as given
        ({"quiet_hours": {"start": " 7:00", "end": "22:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": " 7:00", "end": "07:00"}}, "quiet_hours"),  # an empty window, stored as one
        ({"quiet_hours": {"start": "22:00", "end": "\t7:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "07:00", "end": "07:00"}}, "quiet_hours"),  # meant no quiet hours at all
        # Digits of other scripts: superscripts and circled ones (which int() refuses) were a 500, and
        # others were stored as given ("٠٧:٠٠" beside "07:00" was an empty window, the check passed).
        ({"quiet_hours": {"start": "²²:00", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "①②:00", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "\u0660\u0667:\u0660\u0660", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "22:00", "end": "\uff10\uff17:\uff10\uff10"}}, "quiet_hours"),
        ({"colour": "blue"}, "colour"),
        ({"user_id": "u2"}, "user_id"),  # another user's, in u1's path
    ],
)
def test_invalid_preferences_are_422_and_change_nothing(client, headers, smtp, changes, field):
    assert _put(client, headers, {"categories": {"marketing": "daily"}}).status_code == 200
    before = _prefs(client, headers)
    error = _error(_put(client, headers, changes), 422)
    assert field in error["details"]
    assert _prefs(client, headers) == before
    assert notification_count() == 0
    assert smtp.count() == 0


def test_each_api_key_has_its_own_preferences(client, headers, other_key, smtp):
    other = {"X-API-Key": other_key[1]}
    assert _put(client, headers, {"categories": {"product": "off"}, "timezone": "Asia/Tokyo"}).status_code == 200
    assert _prefs(client, other) == {"user_id": "u1", "timezone": "UTC", "quiet_hours": None, "categories": DEFAULTS}
    assert _put(client, other, {"categories": {"updates": "daily"}}).status_code == 200
    assert _prefs(client, headers)["categories"] == {**DEFAULTS, "product": "off"}
    assert notification_count() == 0
    assert smtp.count() == 0


def test_a_change_whose_answer_cannot_be_read_is_503_and_changes_nothing(client, headers, monkeypatch):
    # The answer was read after the change had committed: a database lost in between answered 503
    # with the change made.
    assert _put(client, headers, {"categories": {"marketing": "daily"}}).status_code == 200
    before = _prefs(client, headers)

    def lost(*args):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(consent, "preferences", lost)
    changes = {"timezone": "Asia/Tokyo", "quiet_hours": {"start": "22:00", "end": "07:00"},
               "categories": {"marketing": "off", "product": "weekly"}}
    _error(_put(client, headers, changes), 503, "service_unavailable")
    monkeypatch.undo()
    assert _prefs(client, headers) == before


def test_first_preferences_of_a_new_user_sent_at_once_are_all_stored(app, headers, smtp):
    for user_id in ("new-1", "new-2", "new-3"):  # a few rounds: each race is over in milliseconds
        changes = {"timezone": "Europe/Paris", "quiet_hours": {"start": "23:00", "end": "06:00"},
                   "categories": {"marketing": "off"}}

        def put(user_id=user_id, changes=changes):
            response = app.test_client().put(f"/api/users/{user_id}/preferences", json=changes, headers=headers)
            return response.status_code, response.get_json()

        results = concurrently(8, put)

        assert all(isinstance(r, tuple) for r in results), results
        assert [status for status, _ in results] == [200] * 8, results
        assert {body["timezone"] for _, body in results} == {"Europe/Paris"}
        with database.connection_context():
            assert UserProfile.select().where(UserProfile.user_key == user_id).count() == 1
            assert Preference.select().where(Preference.user_key == user_id).count() == 1


def test_preferences_listing_categories_in_other_orders_at_once_all_succeed(app, headers, smtp):
    # Each request locks a row per category in turn: in the body's order, two requests in other
    # orders deadlocked and one got a 503 "database unavailable".
    forward = {"marketing": "off", "product": "daily", "updates": "weekly"}
    backward = dict(reversed(list(forward.items())))
    for round_ in range(6):
        user_id = f"order-{round_}"
        assert _put(app.test_client(), headers, {"categories": forward}, user_id=user_id).status_code == 200

        def put(n, user_id=user_id):
            body = {"categories": forward if n % 2 else backward}
            return app.test_client().put(f"/api/users/{user_id}/preferences", json=body, headers=headers).status_code

        calls = iter(range(8))
        assert concurrently(8, lambda calls=calls: put(next(calls))) == [200] * 8


@pytest.mark.parametrize("user_id", ["org/7", "/lead", "trail/", "a//b", "x/preferences", "x/stats"])
def test_a_user_id_with_slashes_has_its_own_preferences_and_stats(client, headers, deliverer, smtp, redis_conn,
                                                                   user_id):
    assert _send(client, headers, _welcome(user_id))["status"] == "queued"
    for in_path in (quote(user_id, safe=""), user_id):  # a "/" written as %2F, and as it is
        changed = _put(client, headers, {"categories": {"product": "off"}}, user_id=in_path)
        assert changed.status_code == 200, changed.get_data(as_text=True)
        assert changed.get_json()["user_id"] == user_id
        assert _prefs(client, headers, in_path)["categories"]["product"] == "off"
        stats = client.get(f"/api/notifications/user/{in_path}/stats", headers=headers)
        assert stats.status_code == 200, stats.get_data(as_text=True)
        assert (stats.get_json()["user_id"], stats.get_json()["total"]) == (user_id, 1)

    assert _send(client, headers, _welcome(user_id))["status"] == "suppressed"  # the same user's preferences
    with database.connection_context():
        assert [p.user_key for p in Preference.select()] == [user_id]


@pytest.mark.parametrize("user_id", ["a\nb", "trailing\n", "\r\n"])
def test_a_user_id_with_a_line_break_is_found_by_its_path_as_a_body_gives_it(client, headers, user_id):
    # A body takes such an id, and the path's pattern matched no line break: 404, an unknown route.
    assert _send(client, headers, _welcome(user_id))["status"] == "queued"
    in_path = quote(user_id, safe="")
    changed = _put(client, headers, {"categories": {"product": "off"}}, user_id=in_path)
    assert changed.status_code == 200, changed.get_data(as_text=True)
    assert _prefs(client, headers, in_path) == changed.get_json() and changed.get_json()["user_id"] == user_id
    stats = client.get(f"/api/notifications/user/{in_path}/stats", headers=headers)
    assert stats.status_code == 200 and stats.get_json()["total"] == 1
    assert _send(client, headers, _welcome(user_id))["status"] == "suppressed"


# --- what a send becomes ------------------------------------------------------------------------------


def test_send_for_a_category_turned_off_is_suppressed_and_owes_its_callback(client, headers, deliverer, smtp,
                                                                             redis_conn):
    assert _put(client, headers, {"categories": {"product": "off"}}).status_code == 200
    accepted = _send(client, headers, _welcome(callback_url="http://127.0.0.1:9/hook"))
    assert accepted["status"] == "suppressed"
    detail = _detail(client, headers, accepted["id"])
    assert (detail["status"], detail["category"], detail["callback_status"]) == ("suppressed", "product", "pending")
    assert [e["status"] for e in detail["history"]] == ["suppressed"]
    assert "product" in detail["history"][0]["reason"]
    assert Queue(CALLBACK_QUEUE, connection=redis_conn).job_ids == [callback_job_id_for(accepted["id"])]
    assert all(Queue(name, connection=redis_conn).count == 0 for name in QUEUES_BY_PRIORITY[:3])

    run_worker_until_idle(redis_conn)
    detail = _detail(client, headers, accepted["id"])
    assert (detail["status"], detail["attempts"], detail["sent_at"]) == ("suppressed", 0, None)
    assert smtp.count() == 0


def test_what_changed_after_acceptance_is_what_the_job_reads(client, headers, api_key, deliverer, smtp, redis_conn):
    # The job reads the notification and its recipient's consent in one statement (on PostgreSQL):
    # a suppression of the address in any case, or the user's category turned off, since it was
    # accepted stops it; another user's or another address's does not, nor a transactional send's.
    to_suppress = _send(client, headers, _welcome("u1", to="Ann.Other@Example.COM"))
    to_turn_off = _send(client, headers, _welcome("u2", to="bea@example.com"))
    untouched = _send(client, headers, _welcome("u3", to="cid@example.com"))
    transactional = _send(client, headers, {"to": "dee@example.com", "subject": "Code", "text": "1234",
                                            "user_id": "u2", "category": "transactional"})
    assert {n["status"] for n in (to_suppress, to_turn_off, untouched, transactional)} == {"queued"}
    with database.connection_context():
        consent.suppress(api_key[0].id, "ann.other@example.com", "bounced")
    assert _put(client, headers, {"categories": {"product": "off"}}, user_id="u2").status_code == 200

    run_worker_until_idle(redis_conn)
    assert reload(to_suppress["id"]).status == "suppressed"
    assert "suppression list" in _detail(client, headers, to_suppress["id"])["history"][-1]["reason"]
    assert reload(to_turn_off["id"]).status == "suppressed"
    assert (reload(untouched["id"]).status, reload(transactional["id"]).status) == ("sent", "sent")
    assert sorted(m.message["To"] for m in smtp.messages) == ["cid@example.com", "dee@example.com"]


@pytest.fixture
def turkish_db(pg_url):
    """A database of its own whose collation is Turkish (ICU), where PostgreSQL's lower('I') is 'ı'."""
    name = pg_url.rsplit("/", 1)[1] + "_tr"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f"CREATE DATABASE \"{name}\" LOCALE_PROVIDER icu ICU_LOCALE 'tr-TR' LOCALE 'C.UTF-8' "
                    "TEMPLATE template0")
    db = bind(pg_url.rsplit("/", 1)[0] + "/" + name)
    upgrade(db)
    try:
        yield db
    finally:
        db.close_all()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_a_job_finds_a_suppression_whatever_the_databases_locale(turkish_db, pg_settings):
    # Addresses are matched lower-cased as Python lower-cases them (the suppression list holds them
    # so): a database whose locale lower-cases "I" to a dotless "ı" must not let a job send to
    # ALICE@EXAMPLE.COM after alice@example.com was suppressed.
    mailer = MemoryMailer("notifier@example.com")
    deliverer = Deliverer(pg_settings, mailer, make_renderer(pg_settings))
    with database.connection_context():
        key, _ = keys.create("turkish-service")
        made = [store.create_notification(key, {"to": to, "subject": "Hi", "text": "Hello", "category": "product",
                                                 "user_key": "u1"}) for to in ("ALICE@EXAMPLE.COM", "Bob@Example.com")]
        consent.suppress(key.id, "alice@example.com", "bounced")
    assert [deliverer.deliver(n.id) for n in made] == ["suppressed", "sent"]
    assert [m["To"] for m in mailer.sent] == ["Bob@Example.com"]


def test_send_for_a_daily_category_is_held_for_the_digest(client, headers, deliverer, smtp, redis_conn):
    assert _put(client, headers, {"categories": {"product": "daily"}}).status_code == 200
    accepted = _send(client, headers, _welcome())
    assert accepted["status"] == "held"
    assert _nothing_queued(redis_conn)

    run_worker_until_idle(redis_conn)
    detail = _detail(client, headers, accepted["id"])
    assert (detail["status"], detail["digest_id"]) == ("held", None)
    assert "daily" in detail["history"][0]["reason"] and "digest" in detail["history"][0]["reason"]
    assert smtp.count() == 0


def _quiet_around_now() -> tuple[dict, str]:
    """Quiet hours from an hour ago to an hour from now (UTC), and when they end as the API writes it."""
    now = utcnow().replace(second=0, microsecond=0)
    start, end = now - timedelta(hours=1), now + timedelta(hours=1)
    return {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}, end.isoformat() + "Z"


def test_quiet_hours_covering_now_schedule_the_send_for_their_end(client, headers, deliverer, smtp, redis_conn):
    quiet, ends = _quiet_around_now()
    assert _put(client, headers, {"timezone": "UTC", "quiet_hours": quiet}).status_code == 200
    accepted = _send(client, headers, _welcome())
    assert accepted["status"] == "scheduled"

    run_worker_until_idle(redis_conn)
    detail = _detail(client, headers, accepted["id"])
    assert (detail["status"], detail["send_at"]) == ("scheduled", ends)
    assert "quiet hours" in detail["history"][0]["reason"]
    assert [job.id for job in Scheduler(connection=redis_conn).get_jobs()] == [f"release-{accepted['id']}"]
    assert smtp.count() == 0


def test_transactional_mail_ignores_off_daily_and_quiet_hours(client, headers, deliverer, smtp, redis_conn):
    quiet, _ = _quiet_around_now()
    changes = {"categories": {"product": "off", "marketing": "daily", "updates": "weekly"}, "quiet_hours": quiet}
    assert _put(client, headers, changes).status_code == 200
    sent = [
        _send(client, headers, {**VERIFICATION, "to": "ann@example.com"}, "/api/notifications/send-verification"),
        _send(client, headers, {**LITERAL, "to": "ann@example.com", "user_id": "u1"}),
        _send(client, headers, {**LITERAL, "to": "ann@example.com", "user_id": "u1", "category": "transactional"}),
    ]
    assert [a["status"] for a in sent] == ["queued"] * 3

    run_worker_until_idle(redis_conn)
    for accepted in sent:
        detail = _detail(client, headers, accepted["id"])
        assert (detail["status"], detail["category"]) == ("sent", "transactional")
    assert smtp.count() == 3
    assert all("List-Unsubscribe" not in m.message for m in smtp.messages)


# --- events -------------------------------------------------------------------------------------------


def test_unknown_event_type_is_422_and_stores_nothing(client, headers, deliverer, smtp, redis_conn):
    error = _error(client.post("/api/events", json={**SIGNUP, "type": "user.exploded"}, headers=headers), 422)
    assert "type" in error["details"]
    run_worker_until_idle(redis_conn)
    assert notification_count() == 0
    assert _nothing_queued(redis_conn)
    assert smtp.count() == 0


def test_signup_without_code_or_url_is_422_and_stores_neither_notification(client, headers, deliverer, smtp,
                                                                            redis_conn):
    response = client.post("/api/events", json={**SIGNUP, "data": {}}, headers=headers)
    error = _error(response, 422)
    assert "data" in error["details"]
    run_worker_until_idle(redis_conn)
    assert notification_count() == 0
    assert _nothing_queued(redis_conn)
    assert smtp.count() == 0


def test_rejected_event_does_not_change_the_users_timezone(client, headers, deliverer, smtp, redis_conn):
    user = {**SIGNUP["user"], "timezone": "Asia/Tokyo"}
    _error(client.post("/api/events", json={**SIGNUP, "user": user, "data": {}}, headers=headers), 422)
    run_worker_until_idle(redis_conn)
    assert _prefs(client, headers, "u-evt")["timezone"] == "UTC"  # a rejected request stores nothing
    with database.connection_context():
        assert UserProfile.select().count() == 0
    assert notification_count() == 0
    assert smtp.count() == 0


@pytest.mark.parametrize("timezone", ["Etc", "Europe/" + "x" * 300])
def test_an_events_timezone_that_names_no_zone_file_is_422(client, headers, smtp, timezone):
    user = {**SIGNUP["user"], "timezone": timezone}
    error = _error(client.post("/api/events", json={**SIGNUP, "user": user}, headers=headers), 422)
    assert "timezone" in error["details"]["user"]
    with database.connection_context():
        assert UserProfile.select().count() == 0
    assert notification_count() == 0


def test_event_idempotency_key_replays_both_notifications(client, headers, deliverer, smtp, redis_conn):
    keyed = {**headers, "Idempotency-Key": "signup-u-evt"}
    first = client.post("/api/events", json=SIGNUP, headers=keyed)
    assert first.status_code == 202, first.get_data(as_text=True)
    again = client.post("/api/events", json=SIGNUP, headers=keyed)
    assert again.status_code == 202, again.get_data(as_text=True)
    made, replayed = first.get_json()["notifications"], again.get_json()["notifications"]
    assert [n["id"] for n in replayed] == [n["id"] for n in made]
    assert [n["template"] for n in replayed] == ["verification", "welcome"]
    assert [n["replayed"] for n in made] == [False, False]
    assert [n["replayed"] for n in replayed] == [True, True]
    assert notification_count() == 2

    run_worker_until_idle(redis_conn)
    verification, welcome = (_detail(client, headers, n["id"]) for n in made)
    assert (verification["status"], verification["attempts"]) == ("sent", 1)
    assert welcome["status"] == "scheduled"  # WELCOME_DELAY_SECONDS ahead
    assert smtp.count() == 1
    assert smtp.messages[0].message["X-Notification-ID"] == verification["id"]


def test_event_user_timezone_is_stored_in_the_profile(client, headers, deliverer, smtp, redis_conn):
    event = {"type": "password.reset_requested", "user": {"id": "u-tz", "email": "tz@example.com",
                                                          "timezone": "America/New_York"},
             "data": {"reset_url": "https://app.example.com/reset/abc"}}
    response = client.post("/api/events", json=event, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    (made,) = response.get_json()["notifications"]
    assert (made["template"], made["priority"], made["status"]) == ("password_reset", "high", "queued")
    assert _prefs(client, headers, "u-tz")["timezone"] == "America/New_York"

    run_worker_until_idle(redis_conn)
    assert _detail(client, headers, made["id"])["status"] == "sent"
    assert smtp.count() == 1
    assert "https://app.example.com/reset/abc" in smtp.messages[0].message.get_body(("plain",)).get_content()


def test_order_placed_creates_an_order_confirmation(client, headers, deliverer, smtp, redis_conn):
    event = {"type": "order.placed", "user": {"id": "u-shop", "email": "shop@example.com", "name": "Sam"},
             "data": ORDER, "metadata": {"source": "checkout"}}
    response = client.post("/api/events", json=event, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    (made,) = response.get_json()["notifications"]
    assert (made["template"], made["priority"], made["status"]) == ("order_confirmation", "default", "queued")

    run_worker_until_idle(redis_conn)
    detail = _detail(client, headers, made["id"])
    assert (detail["status"], detail["category"], detail["user_id"]) == ("sent", "transactional", "u-shop")
    assert detail["metadata"] == {"event": "order.placed", "source": "checkout"}
    assert smtp.count() == 1
    assert smtp.messages[0].message["Subject"] == "Order A-1001 confirmed"
    assert notification_count() == 1


# --- suppressions and literal categories --------------------------------------------------------------


def test_suppression_list_is_empty_and_deleting_an_unknown_address_is_404(client, headers, smtp):
    response = client.get("/api/suppressions", headers=headers)
    assert (response.status_code, response.get_json()) == (200, {"data": [], "next": None})
    _error(client.delete("/api/suppressions/nobody@example.com", headers=headers), 404, "not_found")
    assert notification_count() == 0
    assert smtp.count() == 0


def test_literal_send_with_a_category_follows_preferences(client, headers, deliverer, smtp, redis_conn):
    literal = {**LITERAL, "user_id": "u-lit", "category": "marketing"}
    statuses = []
    for mode in ("off", "daily", "immediate"):
        assert _put(client, headers, {"categories": {"marketing": mode}}, "u-lit").status_code == 200
        statuses.append(_send(client, headers, literal))
    assert [a["status"] for a in statuses] == ["suppressed", "held", "queued"]

    run_worker_until_idle(redis_conn)
    final = [_detail(client, headers, a["id"]) for a in statuses]
    assert [(d["status"], d["category"]) for d in final] == [
        ("suppressed", "marketing"), ("held", "marketing"), ("sent", "marketing")]
    assert smtp.count() == 1
    message = smtp.messages[0].message
    assert message["X-Notification-ID"] == statuses[2]["id"]
    assert message["List-Unsubscribe"].startswith("<http") and "/unsubscribe/" in message["List-Unsubscribe"]


def test_a_literal_send_that_can_be_unsubscribed_from_shows_the_link_in_each_part(
        client, headers, deliverer, smtp, redis_conn):
    # The List-Unsubscribe header alone: no visible way out of marketing mail written by the caller.
    body = {"to": "lit@example.com", "user_id": "u-lit", "category": "marketing", "subject": "Sale",
            "text": "Half price this week.", "html": "<html><body><p>Half price this week.</p></body></html>"}
    _send(client, headers, body)
    _send(client, headers, {**body, "category": "transactional"})
    run_worker_until_idle(redis_conn)

    marketing, transactional = sorted(smtp.messages, key=lambda m: "List-Unsubscribe" not in m.message)
    link = marketing.message["List-Unsubscribe"].strip("<>")
    text = marketing.message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    html = marketing.message.get_body(("html",)).get_content()
    assert text == f"Half price this week.\n\n--\nUnsubscribe: {link}\n"
    assert html.startswith("<html><body><p>Half price this week.</p><p ") and html.rstrip().endswith("</body></html>")
    assert f'href="{link}"' in html and ">Unsubscribe</a>" in html
    assert transactional.message.get_body(("plain",)).get_content().rstrip() == "Half price this week."
    assert "Unsubscribe" not in transactional.message.get_body(("html",)).get_content()


def test_category_together_with_a_template_is_422(client, headers, deliverer, smtp, redis_conn):
    error = _error(client.post("/api/notifications/send", json={**_welcome(), "category": "marketing"},
                               headers=headers), 422)
    assert error["details"] == {"category": ["not allowed with template"]}
    run_worker_until_idle(redis_conn)
    assert notification_count() == 0
    assert smtp.count() == 0


# --- unsubscribe links in mail already sent ----------------------------------------------------------


def _unsubscribe_path(message) -> str:
    match = re.fullmatch(r"<https?://[^/>]+(/unsubscribe/[^>]+)>", message["List-Unsubscribe"])
    assert match, message["List-Unsubscribe"]
    return match.group(1)


def test_an_unsubscribe_link_outlives_the_key_that_sent_it(client, headers, api_key, other_key, deliverer, smtp,
                                                           redis_conn, pg_settings):
    theirs = {"X-API-Key": other_key[1]}
    _send(client, headers, _welcome("u-gone"))
    later = _send(client, headers, _welcome("u-gone", delay_seconds=3600))["id"]
    run_worker_until_idle(redis_conn)
    (received,) = smtp.messages
    path = _unsubscribe_path(received.message)
    with database.connection_context():
        assert keys.revoke(api_key[0].name)
    assert eventually(lambda: client.get("/api/users/u-gone/preferences", headers=headers).status_code == 401)

    page = client.get(path)
    # It posts back to the URL the browser opened: a proxy's path prefix stays (request.path lost it).
    assert page.status_code == 200 and '<form method="post">' in page.get_data(as_text=True)
    assert "action=" not in page.get_data(as_text=True)
    done = client.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200 and "unsubscribed" in done.get_data(as_text=True)

    # Written to the list of the service that sent the mail, and to no one else's.
    with database.connection_context():
        assert consent.mode_for(api_key[0].id, "u-gone", "product") == DeliveryMode.OFF
    assert _prefs(client, theirs, "u-gone")["categories"] == DEFAULTS
    # Revoking a key stops its requests, not the mail it queued before: that mail is checked
    # against the list the link wrote to.
    with database.connection_context():
        Notification.update(send_at=utcnow() - timedelta(hours=1)).where(Notification.id == later).execute()
        assert reconcile(pg_settings, redis_conn).released == 1
    run_worker_until_idle(redis_conn)
    assert reload(later).status == "suppressed"
    # Still unforgeable: one character off is refused, revoked key or not. Not the last one: its low
    # bits are base64's padding, so 1 time in 16 the changed token decoded to the same signature.
    forged = path[:-5] + ("A" if path[-5] != "A" else "B") + path[-4:]
    _error(client.post(forged), 400, "invalid_token")
    assert smtp.count() == 1


def test_an_unsubscribe_link_of_a_deleted_key_writes_nothing_and_still_answers(client, pg_settings, smtp):
    with database.connection_context():
        gone, _ = keys.create("deleted-service")
        path = urlparse(unsubscribe.link(pg_settings, gone.id, "u-del", "marketing")).path
        ApiKey.delete().where(ApiKey.id == gone.id).execute()

    assert client.get(path).status_code == 200
    done = client.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200, done.get_data(as_text=True)
    with database.connection_context():
        assert Preference.select().count() == 0
    assert smtp.count() == 0


BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_a_browser_opening_a_link_cut_short_gets_a_page_saying_so(client, pg_settings, api_key):
    # A person whose mail client cut the link got a JSON error envelope in their browser.
    path = urlparse(unsubscribe.link(pg_settings, api_key[0].id, "u-cut", "marketing")).path
    for response in (client.get(path[:-20], headers={"Accept": BROWSER}),
                     client.post(path[:-20], headers={"Accept": BROWSER}, data={})):
        assert response.status_code == 400 and response.mimetype == "text/html"
        page = response.get_data(as_text=True)
        assert "<h1" in page and "This link does not work" in page and "<form" not in page
    # A program asking for JSON, or for nothing in particular (a mail client's one-click POST), gets the envelope.
    _error(client.get(path[:-20], headers={"Accept": "application/json"}), 400, "invalid_token")
    _error(client.post(path[:-20], data="List-Unsubscribe=One-Click",
                       content_type="application/x-www-form-urlencoded"), 400, "invalid_token")
    with database.connection_context():
        assert Preference.select().count() == 0
    assert client.get(path, headers={"Accept": BROWSER}).status_code == 200


def test_a_link_made_before_secret_key_was_rotated_unsubscribes_through_the_api(pg_settings, pg_db, redis_conn,
                                                                                api_key, smtp):
    old = replace(pg_settings, secret_key="the secret before")
    path = urlparse(unsubscribe.link(old, api_key[0].id, "u-rot", "marketing")).path
    rotated = create_app(replace(pg_settings, secret_key="the secret now", secret_key_fallbacks=(old.secret_key,)),
                         redis=redis_conn).test_client()
    done = rotated.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200, done.get_data(as_text=True)
    with database.connection_context():
        assert consent.mode_for(api_key[0].id, "u-rot", "marketing") == DeliveryMode.OFF
    without = create_app(replace(pg_settings, secret_key="the secret now"), redis=redis_conn).test_client()
    _error(without.post(path), 400, "invalid_token")


OWN_KEY = object()  # the test's API key id


class _AsWritten:
    """An itsdangerous serializer that signs a JSON text as it is, for claims json.dumps never writes."""

    # itsdangerous asks it to dump {} to learn whether it writes text (then its tokens are str too).
    dumps = staticmethod(lambda claims, **kwargs: claims if isinstance(claims, str) else json.dumps(claims))
    loads = staticmethod(json.loads)


@pytest.mark.parametrize("claims", [
    {"k": "7", "u": "u1", "c": "marketing"},  # PostgreSQL refused the id: a 500
    {"k": True, "u": "u1", "c": "marketing"},
    {"k": None, "u": "u1", "c": "marketing"},
    {"u": "u1", "c": "marketing"},
    {"k": OWN_KEY, "u": ["u1"], "c": "marketing"},
    {"k": OWN_KEY, "u": "", "c": "marketing"},
    {"k": OWN_KEY, "u": "u" * 331, "c": "marketing"},  # longer than the column: a 500
    {"k": OWN_KEY, "u": "nul\x00", "c": "marketing"},  # a 500
    {"k": OWN_KEY, "u": "u1", "c": "m" * 33},  # a 500
    {"k": OWN_KEY, "u": "u1", "c": "transactional"},  # written, and shown as transactional "off"
    {"k": OWN_KEY, "u": "u1", "c": "gossip"},
    ["k", 1],
    # Signed as written (JSON no dict serializes to): an unpaired surrogate, which PostgreSQL refused
    # as the POST wrote it (a 500), and a number past what Python's parser reads (itsdangerous's
    # BadPayload, not a BadSignature: a 500 on GET and POST).
    '{"k": OWN_KEY, "u": "\\ud800", "c": "marketing"}',
    '{"k": 1' + "0" * 5000 + ', "u": "u1", "c": "marketing"}',
])
@pytest.mark.parametrize("form", ["encrypted", "signed"])  # signed: a readable link made before 2026-12-03
def test_a_signed_token_that_notifier_never_makes_is_refused_and_writes_nothing(client, pg_settings, api_key, claims,
                                                                                 form):
    # Only a holder of SECRET_KEY can sign one, but while it is unset the development secret signs them:
    # the claims are held to what make_token() writes, as a request body would be.
    if isinstance(claims, dict) and claims.get("k") is OWN_KEY:
        claims = {**claims, "k": api_key[0].id}
    if isinstance(claims, str):
        claims = claims.replace("OWN_KEY", str(api_key[0].id))
    if form == "encrypted":
        text = claims if isinstance(claims, str) else json.dumps(claims)
        token = unsubscribe._fernet(pg_settings.signing_key).encrypt(text.encode("utf-8", "surrogatepass")).decode()
    else:
        serializer = URLSafeSerializer(pg_settings.signing_key, salt=unsubscribe.SALT,
                                       serializer=_AsWritten if isinstance(claims, str) else None)
        token = serializer.dumps(claims)
    path = f"/unsubscribe/{token}"
    _error(client.get(path), 400, "invalid_token")
    _error(client.post(path), 400, "invalid_token")
    with database.connection_context():
        assert Preference.select().count() == 0


@pytest.mark.parametrize("path, payload", [
    ("/api/notifications/send", {**LITERAL, "user_id": "email:ann@example.com", "category": "marketing"}),
    ("/api/notifications/send-verification", {**VERIFICATION, "user_id": "email:ann@example.com"}),
    ("/api/events", {**SIGNUP, "user": {**SIGNUP["user"], "id": "email:ann@example.com"}}),
])
def test_a_user_id_that_names_an_addresss_preferences_is_422(client, headers, smtp, path, payload):
    # Mail sent with no user id follows the preferences of "email:<address>": a user given that id (by a
    # caller that lets people choose theirs) would turn that address's mail off with its unsubscribe, and
    # share its digests, which go to whichever address came last.
    error = _error(client.post(path, json=payload, headers=headers), 422)
    assert "email:" in str(error["details"])
    assert notification_count() == 0


def test_an_addresss_preferences_are_the_same_whatever_the_case_its_path_writes_it_in(
        client, headers, deliverer, smtp, redis_conn):
    # Mail sent with no user id follows the preferences of its address lower-cased: a path naming the
    # address in another case names those, not preferences no mail ever reads.
    assert _put(client, headers, {"categories": {"marketing": "off"}}, "email:Ann@Example.COM").status_code == 200
    assert _prefs(client, headers, "email:ann@example.com")["categories"]["marketing"] == "off"
    assert _prefs(client, headers, "email:ANN@example.com")["user_id"] == "email:ann@example.com"
    sent = _send(client, headers, {**LITERAL, "to": "Ann@Example.com", "category": "marketing"})
    assert sent["status"] == "suppressed"
    # A user id is the caller's own and kept as it is.
    assert _put(client, headers, {"categories": {"marketing": "off"}}, "Ann").status_code == 200
    assert _prefs(client, headers, "ann")["categories"]["marketing"] == "immediate"


def test_the_preferences_of_an_address_as_long_as_smtp_allows_are_read_and_set_by_its_path(client, headers, smtp):
    # The path's limit of 200 characters (a user id's) refused "email:" and any address over 194: mail to
    # it followed preferences no request could read or set.
    address = "a" * 64 + "@" + ("b" * 62 + ".") * 2 + "c" * 59 + ".com"
    assert len(address) == 254
    assert _put(client, headers, {"categories": {"marketing": "off"}}, f"email:{address}").status_code == 200
    assert _prefs(client, headers, f"email:{address}")["categories"]["marketing"] == "off"
    assert _send(client, headers, {**LITERAL, "to": address, "category": "marketing"})["status"] == "suppressed"
    _error(client.get(f"/api/users/email:{address}x/preferences", headers=headers), 422)
    _error(client.get("/api/users/email:/preferences", headers=headers), 422)


def test_an_addresss_own_preferences_are_read_and_set_by_its_path(client, headers, deliverer, smtp, redis_conn):
    assert _put(client, headers, {"categories": {"marketing": "off"}}, "email:ann@example.com").status_code == 200
    assert _prefs(client, headers, "email:ann@example.com")["categories"]["marketing"] == "off"
    sent = _send(client, headers, {**LITERAL, "to": "Ann@Example.com", "category": "marketing"})
    assert sent["status"] == "suppressed"


@pytest.mark.parametrize("user_id", ["email:x", "email:ann@", "email:@example.com", "email:ann example@x.com",
                                     "email:änn@example.com", "email:" + "a" * 65 + "@example.com"])
def test_a_path_naming_an_address_that_is_not_one_is_422(client, headers, user_id):
    # Stored under "email:x", preferences no mail ever reads (mail goes only to addresses a send takes).
    error = _error(_put(client, headers, {"categories": {"marketing": "off"}}, user_id), 422)
    assert "user_id" in error["details"]
    _error(client.get(f"/api/users/{user_id}/preferences", headers=headers), 422)
    _error(client.get(f"/api/notifications/user/{user_id}/stats", headers=headers), 422)
    with database.connection_context():
        assert Preference.select().count() == 0
