"""Digests on real parts, in process: PostgreSQL, Redis, an RQ worker, the test SMTP server and a callback
endpoint. What becomes of a digest's items when the digest fails or waits, and what a user who switches
back to `immediate` receives.

Each test makes its digests with digests.flush_due at a chosen time (the periodic job's own function),
runs every queued job with an in-process worker, then checks every notification's status, what the
SMTP server received, and which callbacks the caller got.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timedelta

import psycopg2
import pytest
from peewee import OperationalError
from rq_scheduler import Scheduler

from app import create_app
from notifier import callbacks, deadletters, digests, queues, runtime, store
from notifier.db import bind, database
from notifier.errors import NotFound, TransientDeliveryError
from notifier.models import Notification, utcnow
from notifier.reconciler import reconcile
from notifier.runtime import make_renderer
from tests.helpers import reload, run_worker_until_idle

pytestmark = pytest.mark.integration

USER = "u-digest"


def _call(api, headers, method: str, path: str, body: dict | None = None, status: int = 200) -> dict:
    response = api.open(path, method=method, json=body, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_json()


def _prefs(api, headers, changes: dict) -> None:
    _call(api, headers, "PUT", f"/api/users/{USER}/preferences", changes)


def _held(api, headers, names: list[str], callback_url: str | None = None, **extra) -> list[str]:
    """Welcome emails for USER, each held for the digest; their ids."""
    ids = []
    for name in names:
        payload = {"to": "dora@example.com", "user_id": USER, "template": "welcome", "data": {"name": name}, **extra}
        if callback_url:
            payload["callback_url"] = callback_url
        accepted = _call(api, headers, "POST", "/api/notifications/send", payload, status=202)
        assert accepted["status"] == "held"
        ids.append(accepted["id"])
    return ids


def _detail(api, headers, notification_id: str) -> dict:
    return _call(api, headers, "GET", f"/api/notifications/{notification_id}")


def _status_lines(detail: dict) -> list[dict]:
    return [e for e in detail["history"] if e["kind"] == "status"]


def _digests(api, headers) -> list[dict]:
    return _call(api, headers, "GET", "/api/notifications?template=digest")["data"]


def _next_window_closed(settings) -> datetime:
    """A moment just after the next digest time (UTC) and its grace: the window then is due."""
    return digests.boundary_after(utcnow(), "UTC", settings.digest_time) + timedelta(
        seconds=settings.digest_grace_seconds + 1)


def _flush(settings, redis_conn, now: datetime) -> int:
    with database.connection_context():
        return digests.flush_due(settings, redis_conn, make_renderer(settings), now=now)


def _daily_digest(api, headers, settings, redis_conn, receiver) -> tuple[dict, list[str]]:
    """A daily digest of two items that each want a callback, made and queued: (digest, item ids)."""
    _prefs(api, headers, {"categories": {"product": "daily"}})
    items = _held(api, headers, ["Ann", "Ben"], callback_url=receiver.url)
    assert _flush(settings, redis_conn, _next_window_closed(settings)) == 1
    (digest,) = _digests(api, headers)
    return digest, items


def _events(receiver) -> dict[str, str]:
    """The callbacks the caller received: notification id -> event."""
    return {call.json["id"]: call.json["event"] for call in receiver.calls}


# --- what a digest's items say ------------------------------------------------------------------------


def test_items_of_a_digest_the_server_refused_end_failed_and_their_callbacks_say_so(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, items = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    for item in items:
        # Taken into the digest, but nothing has gone out yet: not final, and no callback owed.
        detail = _detail(api, headers, item)
        assert (detail["status"], detail["digest_id"], detail["callback_status"]) == ("in_digest", digest["id"], None)
        refused = _call(api, headers, "POST", f"/api/notifications/{item}/cancel", status=409)["error"]
        assert refused["details"] == {"status": "in_digest", "digest_id": digest["id"]}  # the one to cancel

    smtp.rcpt_replies.append("550 5.1.1 mailbox unavailable")
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    assert _detail(api, headers, digest["id"])["status"] == "failed"
    for item in items:
        detail = _detail(api, headers, item)
        assert (detail["status"], detail["digest_id"], detail["sent_at"]) == ("failed", digest["id"], None)
        last = _status_lines(detail)[-1]
        assert last["status"] == "failed" and last["smtp_code"] == 550
        assert last["reason"].startswith(f"digest {digest['id']} failed: ") and "5.1.1" in last["reason"]
        assert detail["last_error"] == last["reason"]
        assert [e["status"] for e in _status_lines(detail)] == ["held", "in_digest", "failed"]
        assert detail["callback_status"] == "delivered"
    # The worker queued the items' callbacks when the digest failed: the reconciler never had to.
    assert _events(receiver) == {item: "notification.failed" for item in items}
    assert {call.headers[callbacks.EVENT_ID_HEADER] for call in receiver.calls} == {f"{i}:failed" for i in items}
    assert all("5.1.1" in call.json["error"] for call in receiver.calls)


def test_items_of_a_digest_requeued_and_failed_again_post_new_event_ids(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    # Their second `failed` event carried the first one's id: a receiver dropping duplicates by
    # Notifier-Event-Id, as the README says to, dropped it.
    digest, items = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    smtp.replies.extend(["451 4.4.1 busy"] * fast_settings.max_attempts)
    run_worker_until_idle(redis_conn)
    _call(api, headers, "POST", f"/api/dead-letters/{digest['id']}/requeue", status=202)
    smtp.replies.extend(["451 4.4.1 still busy"] * fast_settings.max_attempts)
    run_worker_until_idle(redis_conn)

    assert [call.json["event"] for call in receiver.calls] == ["notification.failed"] * 4
    first, second = receiver.calls[:2], receiver.calls[2:]
    assert {call.headers[callbacks.EVENT_ID_HEADER] for call in first} == {f"{i}:failed" for i in items}
    assert {call.headers[callbacks.EVENT_ID_HEADER] for call in second} == {f"{i}:failed:2" for i in items}
    assert all("still busy" in call.json["error"] for call in second)


def test_a_digest_in_the_dead_letter_queue_fails_its_items_until_it_is_requeued_and_sent(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, items = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    smtp.replies.extend(["451 4.4.1 still busy"] * fast_settings.max_attempts)
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    assert _detail(api, headers, digest["id"])["status"] == "failed"
    assert {_detail(api, headers, item)["status"] for item in items} == {"failed"}
    assert "still busy" in _detail(api, headers, items[0])["last_error"]
    assert _events(receiver) == {item: "notification.failed" for item in items}
    # The digest is the dead letter, listed and counted once; its items are not dead letters of their own.
    assert [e["id"] for e in _call(api, headers, "GET", "/api/dead-letters")["data"]] == [digest["id"]]
    assert deadletters.count() == 1

    # An item alone cannot be requeued: sent by itself and again in its digest, it would go out twice.
    refused = _call(api, headers, "POST", f"/api/dead-letters/{items[0]}/requeue", status=409)
    assert refused["error"]["code"] == "not_requeueable" and digest["id"] in refused["error"]["message"]
    with pytest.raises(NotFound, match=f"failed with digest {digest['id']}, which is the dead letter"):
        deadletters.show(None, items[0])  # what `dlq show` prints: it showed the item as a dead letter

    # Requeueing the digest takes its items back into it, and the digest's success is theirs.
    _call(api, headers, "POST", f"/api/dead-letters/{digest['id']}/requeue", status=202)
    assert {_detail(api, headers, item)["status"] for item in items} == {"in_digest"}
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == digest["id"]
    sent = _detail(api, headers, digest["id"])
    assert sent["status"] == "sent"
    for item in items:
        detail = _detail(api, headers, item)
        assert (detail["status"], detail["sent_at"], detail["last_error"]) == ("digested", sent["sent_at"], None)
        lines = _status_lines(detail)
        assert [e["status"] for e in lines] == ["held", "in_digest", "failed", "in_digest", "digested"]
        assert lines[-1]["reason"] == f"digest {digest['id']} sent: accepted by SMTP server"
        assert lines[-2]["reason"] == f"digest {digest['id']} queued: requeued from the dead-letter queue"
    events = [call.json["event"] for call in receiver.calls]
    assert events == ["notification.failed"] * 2 + ["notification.digested"] * 2
    assert _events(receiver) == {item: "notification.digested" for item in items}
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1


# --- deadlines ----------------------------------------------------------------------------------------


def _deadline_passed(item_id: str) -> None:
    """The item's deadline passes now. The worker reads the real clock, so the deadline moves instead."""
    with database.connection_context():
        Notification.update(expires_at=utcnow() - timedelta(seconds=1)).where(Notification.id == item_id).execute()


def _texts(received) -> str:
    return "".join(received.message.get_body((part,)).get_content() for part in ("plain", "html"))


def _sent_without(api, headers, smtp, receiver, digest_id: str, late: str, kept: str, reason: str) -> dict:
    """The one digest mail went out with Ben's item (kept) and without Ann's (late), which ended
    `expired` for reason, as its last status line says, each with its own callback; late's detail."""
    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == digest_id
    assert "1 update today" in _texts(received) and "Ben" in _texts(received) and "Ann" not in _texts(received)
    detail = _detail(api, headers, late)
    assert (detail["status"], detail["sent_at"]) == ("expired", None)
    assert _status_lines(detail)[-1]["reason"] == reason
    assert _detail(api, headers, kept)["status"] == "digested"
    assert _events(receiver) == {late: "notification.expired", kept: "notification.digested"}
    return detail


def test_a_held_item_past_its_deadline_when_the_digest_is_made_is_expired_not_taken(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    _prefs(api, headers, {"categories": {"product": "daily"}})
    made_at = _next_window_closed(fast_settings)
    deadline = (made_at - timedelta(seconds=30)).isoformat() + "Z"  # still ahead now: the API takes it
    (late,) = _held(api, headers, ["Ann"], callback_url=receiver.url, expires_at=deadline)
    (kept,) = _held(api, headers, ["Ben"], callback_url=receiver.url)
    assert _flush(fast_settings, redis_conn, made_at) == 1
    run_worker_until_idle(redis_conn)

    (digest,) = _digests(api, headers)
    detail = _sent_without(api, headers, smtp, receiver, digest["id"], late, kept,
                           "deadline passed while it was held for a digest")
    assert detail["digest_id"] is None
    assert [e["status"] for e in _status_lines(detail)] == ["held", "expired"]


def test_a_pass_before_any_window_ends_looks_at_no_user_alone_yet_expires_what_is_held(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver, monkeypatch):
    # Users holding mail for tomorrow's digest: every pass until then looked at each of them, seven
    # round trips apiece, to make nothing. Now one query finds that none is due, whatever their number.
    users = [f"u-held-{n}" for n in range(12)]
    items = {}
    for user in users:
        _call(api, headers, "PUT", f"/api/users/{user}/preferences", {"categories": {"product": "daily"}})
        accepted = _call(api, headers, "POST", "/api/notifications/send", {
            "to": f"{user}@example.com", "user_id": user, "template": "welcome", "data": {"name": "Ann"},
            "callback_url": receiver.url}, status=202)
        assert accepted["status"] == "held"
        items[user] = accepted["id"]
    late = items[users[0]]
    _deadline_passed(late)  # its deadline, at least, is no later than the next window's end

    seen, real = [], database.obj.execute_sql
    monkeypatch.setattr(database.obj, "execute_sql", lambda sql, *a, **k: seen.append(sql) or real(sql, *a, **k))
    assert _flush(fast_settings, redis_conn, utcnow()) == 0
    monkeypatch.undo()
    assert len(seen) < 10, seen  # the groups, then the one expiry (its select, update, history, reads)
    run_worker_until_idle(redis_conn)  # no reconciler pass: the digest pass expired it, and queued its callback

    assert _detail(api, headers, late)["status"] == "expired"
    assert _events(receiver) == {late: "notification.expired"}
    assert {_detail(api, headers, items[user])["status"] for user in users[1:]} == {"held"}
    # Once the window ends, each user's digest is made as before.
    assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == len(users) - 1


def test_an_item_whose_deadline_passes_before_its_digest_goes_out_is_left_out_of_it(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, (late, kept) = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    _deadline_passed(late)
    run_worker_until_idle(redis_conn)

    detail = _sent_without(api, headers, smtp, receiver, digest["id"], late, kept,
                           f"deadline passed before digest {digest['id']} was sent")
    assert _detail(api, headers, digest["id"])["status"] == "sent"
    assert len(reload(digest["id"]).data["items"]) == 1  # it holds what went out
    assert detail["digest_id"] == digest["id"]
    assert [e["status"] for e in _status_lines(detail)] == ["held", "in_digest", "expired"]


def test_an_item_left_out_of_its_digest_has_its_callback_queued_once(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, (late, kept) = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    _deadline_passed(late)

    # The digest's job alone, as a worker runs it: the callback queued for the item it left out has
    # not run yet when the digest goes out and queues what its items are owed. A second job would
    # post again at once, whatever the callback's retry interval said, if the first one failed.
    with database.connection_context():
        assert live_deliverer.deliver(digest["id"]) == "sent"

    waiting = redis_conn.lrange(f"rq:queue:{queues.CALLBACK_QUEUE}", 0, -1)
    assert sorted(waiting) == sorted(queues.callback_job_id_for(i).encode() for i in (late, kept))
    run_worker_until_idle(redis_conn)
    assert [(call.json["id"], call.json["event"]) for call in receiver.calls] == [
        (late, "notification.expired"), (kept, "notification.digested")]


def test_a_digest_whose_late_items_cannot_be_left_out_yet_is_retried_not_left_sending(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver, pg_url):
    digest, (late, kept) = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    _deadline_passed(late)
    bind(fast_settings.database_url, statement_timeout=0.5)
    locker = psycopg2.connect(pg_url)
    try:
        with locker.cursor() as cur:  # a long transaction holds the late item's row
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (late,))
        with database.connection_context(), pytest.raises(OperationalError):  # RQ retries it
            live_deliverer.deliver(digest["id"])
    finally:
        locker.rollback()
        locker.close()

    # A failed attempt like any other: retrying, not `sending` until SENDING_TIMEOUT and then taken
    # for a worker lost mid-send ("may have been sent already": nothing was).
    detail = _detail(api, headers, digest["id"])
    assert (detail["status"], detail["attempts"]) == ("retrying", 1)
    assert "OperationalError" in detail["last_error"]
    assert {_detail(api, headers, item)["status"] for item in (late, kept)} == {"in_digest"}
    assert smtp.count() == 0

    with database.connection_context():
        assert live_deliverer.deliver(digest["id"]) == "sent"
    run_worker_until_idle(redis_conn)  # the callbacks (the digest's own job finds it sent)
    _sent_without(api, headers, smtp, receiver, digest["id"], late, kept,
                  f"deadline passed before digest {digest['id']} was sent")


def test_a_digest_whose_every_item_expired_before_it_went_out_is_not_sent(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, items = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    for item in items:
        _deadline_passed(item)
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    expired = _detail(api, headers, digest["id"])
    assert expired["status"] == "expired" and expired["sent_at"] is None
    assert "deadline" in _status_lines(expired)[-1]["reason"]
    for item in items:
        detail = _detail(api, headers, item)
        assert [e["status"] for e in _status_lines(detail)] == ["held", "in_digest", "expired"]
        assert _status_lines(detail)[-1]["reason"].startswith(f"digest {digest['id']} expired: ")
    assert _events(receiver) == {item: "notification.expired" for item in items}
    assert _call(api, headers, "GET", "/api/dead-letters")["data"] == []  # not a failure: nothing to requeue


def test_a_requeued_digest_goes_out_without_the_items_whose_deadline_passed_meanwhile(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, (late, kept) = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    smtp.replies.extend(["451 4.4.1 still busy"] * fast_settings.max_attempts)
    run_worker_until_idle(redis_conn)
    assert {_detail(api, headers, item)["status"] for item in (late, kept)} == {"failed"}

    _deadline_passed(late)  # while the digest waited in the dead-letter queue
    _call(api, headers, "POST", f"/api/dead-letters/{digest['id']}/requeue", status=202)
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    assert "Ben" in _texts(received) and "Ann" not in _texts(received)
    assert [e["status"] for e in _status_lines(_detail(api, headers, late))] == [
        "held", "in_digest", "failed", "in_digest", "expired"]
    assert _detail(api, headers, kept)["status"] == "digested"
    assert [call.json["event"] for call in receiver.calls] == ["notification.failed"] * 2 + [
        "notification.expired", "notification.digested"]


# --- quiet hours --------------------------------------------------------------------------------------


def test_a_digest_made_in_quiet_hours_waits_for_their_end(api, headers, live_deliverer, fast_settings, smtp,
                                                          redis_conn):
    # The window closes at DIGEST_TIME UTC, inside the user's quiet hours (from an hour before to an
    # hour after it). DIGEST_TIME is half a day from now: the worker, which sends at the real time,
    # looks at quiet hours again, and they must not hold then.
    window = (utcnow() + timedelta(hours=12)).replace(second=0, microsecond=0)
    settings = replace(fast_settings, digest_time=window.strftime("%H:%M"))
    quiet = {"start": (window - timedelta(hours=1)).strftime("%H:%M"),
             "end": (window + timedelta(hours=1)).strftime("%H:%M")}
    _prefs(api, headers, {"categories": {"product": "daily"}, "timezone": "UTC", "quiet_hours": quiet})
    items = _held(api, headers, ["Ann", "Ben"])
    made_at = _next_window_closed(settings)
    assert _flush(settings, redis_conn, made_at) == 1
    (digest,) = _digests(api, headers)
    quiet_end = digests.boundary_at_or_before(made_at, "UTC", settings.digest_time) + timedelta(hours=1)

    detail = _detail(api, headers, digest["id"])
    assert (detail["status"], detail["send_at"]) == ("scheduled", quiet_end.isoformat() + "Z")
    assert "quiet hours" in detail["history"][0]["reason"]
    assert [job.id for job in Scheduler(connection=redis_conn).get_jobs()] == [f"release-{digest['id']}"]
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0
    assert {_detail(api, headers, item)["status"] for item in items} == {"in_digest"}

    # Once they are over it goes out (the reconciler's pass at that time releases what is due).
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=quiet_end + timedelta(minutes=5)).released == 1
    run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == digest["id"]
    assert {_detail(api, headers, item)["status"] for item in items} == {"digested"}


def _quiet_around_now() -> dict:
    now = utcnow()
    return {"start": (now - timedelta(hours=1)).strftime("%H:%M"), "end": (now + timedelta(hours=1)).strftime("%H:%M")}


def _quiet_end(quiet: dict) -> datetime:
    end = datetime.combine(utcnow().date(), datetime.strptime(quiet["end"], "%H:%M").time())
    return end if end > utcnow() else end + timedelta(days=1)


def test_mail_that_waited_into_the_users_quiet_hours_waits_for_their_end_once_a_worker_takes_it(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    # Accepted outside quiet hours, but the worker comes to it inside them (a backlog, a retry, quiet
    # hours set meanwhile): it waits for their end, its attempts kept, and then goes out once.
    accepted = _call(api, headers, "POST", "/api/notifications/send",
                     {"to": "dora@example.com", "user_id": USER, "template": "welcome", "data": {"name": "Ann"}},
                     status=202)
    assert accepted["status"] == "queued"
    quiet = _quiet_around_now()
    _prefs(api, headers, {"timezone": "UTC", "quiet_hours": quiet})
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    detail = _detail(api, headers, accepted["id"])
    assert (detail["status"], detail["send_at"], detail["attempts"]) == (
        "scheduled", _quiet_end(quiet).isoformat() + "Z", 0)
    assert _status_lines(detail)[-1]["reason"] == "waiting for the user's quiet hours to end"
    (release,) = Scheduler(connection=redis_conn).get_jobs()
    assert list(release.args) == [accepted["id"]]

    # Once they are over (quiet hours turned off here, as the worker sends at the real time), it goes out.
    _goes_out_after(api, headers, fast_settings, redis_conn, smtp, quiet, accepted["id"])
    assert _detail(api, headers, accepted["id"])["status"] == "sent"
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1


def _goes_out_after(api, headers, settings, redis_conn, smtp, quiet, notification_id: str) -> None:
    """Quiet hours over (turned off, as the worker sends at the real time): the reconciler's pass after
    their end releases the notification put off for them, and it goes out once."""
    _prefs(api, headers, {"quiet_hours": None})
    with database.connection_context():
        assert reconcile(settings, redis_conn, now=_quiet_end(quiet) + timedelta(minutes=5)).released == 1
    run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == notification_id


def test_mail_put_off_for_quiet_hours_is_not_taken_for_a_release_redis_lost(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    # The worker schedules the release under a new id; the reconciler's pass just before the end looked
    # for the notification's first release job, found none, counted a release Redis had lost
    # (`rescheduled`) and scheduled a second release of every mail put off for quiet hours.
    accepted = _call(api, headers, "POST", "/api/notifications/send",
                     {"to": "dora@example.com", "user_id": USER, "template": "welcome", "data": {"name": "Ann"}},
                     status=202)
    quiet = _quiet_around_now()
    _prefs(api, headers, {"timezone": "UTC", "quiet_hours": quiet})
    run_worker_until_idle(redis_conn)
    scheduler = Scheduler(connection=redis_conn)
    (release,) = scheduler.get_jobs()
    assert list(release.args) == [accepted["id"]] and reload(accepted["id"]).job_id == release.id
    assert release.origin == queues.QUEUE_NAMES["default"]  # its own priority's queue (84f0767, cb1f524)

    with database.connection_context():
        report = reconcile(fast_settings, redis_conn, now=_quiet_end(quiet) - timedelta(seconds=5))
    assert report.rescheduled == 0
    assert [job.id for job in scheduler.get_jobs()] == [release.id]

    # Once Redis has lost it, the pass schedules it again, under the id the row records.
    redis_conn.flushdb()
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=_quiet_end(quiet) - timedelta(seconds=5)).rescheduled == 1
        assert reconcile(fast_settings, redis_conn, now=_quiet_end(quiet) - timedelta(seconds=4)).rescheduled == 0
    assert [job.id for job in scheduler.get_jobs()] == [release.id]
    assert smtp.count() == 0


def test_a_batchs_shared_job_puts_off_each_email_in_quiet_hours_and_sends_the_others(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    # The deferral inside a shared job (deliver_many): each optional email waits, a transactional one
    # beside them goes out, and each goes out once after the end.
    item = {"to": "dora@example.com", "user_id": USER, "subject": "Hi", "text": "Hello"}
    batch = [{**item, "category": "product"} for _ in range(3)] + [item]
    ids = [r["id"] for r in _call(api, headers, "POST", "/api/notifications/batch", {"notifications": batch},
                                  status=202)["results"]]
    (shared,) = {reload(i).job_id for i in ids}
    assert shared.startswith("notifications-")  # one job for the four
    quiet = _quiet_around_now()
    _prefs(api, headers, {"timezone": "UTC", "quiet_hours": quiet})
    run_worker_until_idle(redis_conn)

    assert [reload(i).status for i in ids] == ["scheduled"] * 3 + ["sent"]
    releases = {job.args[0]: job for job in Scheduler(connection=redis_conn).get_jobs()}
    assert set(releases) == set(ids[:3])
    assert all(reload(i).job_id == releases[i].id and reload(i).attempts == 0 for i in ids[:3])

    _prefs(api, headers, {"quiet_hours": None})
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=_quiet_end(quiet) + timedelta(minutes=5)).released == 3
    run_worker_until_idle(redis_conn)
    assert {reload(i).status for i in ids} == {"sent"}
    assert smtp.count() == 4


def test_a_retry_that_comes_in_quiet_hours_waits_for_their_end_its_attempts_kept(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    accepted = _call(api, headers, "POST", "/api/notifications/send",
                     {"to": "dora@example.com", "user_id": USER, "category": "product", "subject": "Hi",
                      "text": "Hello"}, status=202)
    smtp.replies.append("451 4.3.0 try again later")
    with database.connection_context(), pytest.raises(TransientDeliveryError):
        live_deliverer.deliver(accepted["id"])
    assert (reload(accepted["id"]).status, reload(accepted["id"]).attempts) == ("retrying", 1)

    quiet = _quiet_around_now()
    _prefs(api, headers, {"timezone": "UTC", "quiet_hours": quiet})
    with database.connection_context():
        assert live_deliverer.deliver(accepted["id"]) == "deferred"  # the retry, inside them
    assert (reload(accepted["id"]).status, reload(accepted["id"]).attempts) == ("scheduled", 1)

    _prefs(api, headers, {"quiet_hours": None})
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=_quiet_end(quiet) + timedelta(minutes=5)).released == 1
    run_worker_until_idle(redis_conn)
    sent = reload(accepted["id"])
    assert (sent.status, sent.attempts) == ("sent", 2)
    assert smtp.count() == 1


def test_a_digest_requeued_from_the_dead_letter_queue_in_quiet_hours_waits_for_their_end(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    digest, items = _daily_digest(api, headers, fast_settings, redis_conn, receiver)
    smtp.replies.append("554 5.7.1 not now")
    run_worker_until_idle(redis_conn)
    assert _detail(api, headers, digest["id"])["status"] == "failed"

    quiet = _quiet_around_now()
    _prefs(api, headers, {"timezone": "UTC", "quiet_hours": quiet})
    _call(api, headers, "POST", f"/api/dead-letters/{digest['id']}/requeue", status=202)
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    detail = _detail(api, headers, digest["id"])
    assert (detail["status"], detail["send_at"]) == ("scheduled", _quiet_end(quiet).isoformat() + "Z")
    assert {_detail(api, headers, item)["status"] for item in items} == {"in_digest"}

    _goes_out_after(api, headers, fast_settings, redis_conn, smtp, quiet, digest["id"])
    assert {_detail(api, headers, item)["status"] for item in items} == {"digested"}


def test_held_items_of_a_category_turned_off_owe_their_callbacks_at_once(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    _prefs(api, headers, {"categories": {"product": "daily"}})
    items = _held(api, headers, ["Ann", "Ben"], callback_url=receiver.url)
    _prefs(api, headers, {"categories": {"product": "off"}})

    assert _flush(fast_settings, redis_conn, utcnow()) == 0
    run_worker_until_idle(redis_conn)  # no reconciler pass: the digest pass queued the callbacks

    assert {_detail(api, headers, item)["status"] for item in items} == {"suppressed"}
    assert _events(receiver) == {item: "notification.suppressed" for item in items}
    assert smtp.count() == 0


# --- back to immediate --------------------------------------------------------------------------------


def test_switching_back_to_immediate_sends_each_held_item_as_itself_once(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, receiver):
    _prefs(api, headers, {"categories": {"product": "daily"}})
    items = _held(api, headers, ["Ann", "Ben"], callback_url=receiver.url)
    _prefs(api, headers, {"categories": {"product": "immediate"}})

    assert _flush(fast_settings, redis_conn, utcnow()) == 0  # no digest made
    assert _flush(fast_settings, redis_conn, utcnow()) == 0  # and a second pass releases nothing again
    run_worker_until_idle(redis_conn)

    assert _digests(api, headers) == []
    received = smtp.wait_for(2)
    assert len(received) == 2
    assert sorted(m.message["X-Notification-ID"] for m in received) == sorted(items)
    assert {m.message["Subject"] for m in received} == {"Welcome to Acme"}
    texts = [m.message.get_body(("plain",)).get_content() for m in received]
    assert sorted(name for name in ("Ann", "Ben") for text in texts if f"Hi {name}," in text) == ["Ann", "Ben"]
    for item in items:
        detail = _detail(api, headers, item)
        assert (detail["status"], detail["digest_id"], detail["attempts"]) == ("sent", None, 1)
        assert "switched product email to immediate" in _status_lines(detail)[1]["reason"]
    assert _events(receiver) == {item: "notification.sent" for item in items}

    assert _flush(fast_settings, redis_conn, utcnow() + timedelta(days=1)) == 0
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 2


def test_held_items_released_in_quiet_hours_wait_for_their_end(api, headers, live_deliverer, fast_settings, smtp,
                                                               redis_conn):
    now = utcnow().replace(second=0, microsecond=0)
    quiet = {"start": (now - timedelta(hours=1)).strftime("%H:%M"), "end": (now + timedelta(hours=1)).strftime("%H:%M")}
    _prefs(api, headers, {"categories": {"product": "weekly"}, "timezone": "UTC", "quiet_hours": quiet})
    items = _held(api, headers, ["Ann"])
    _prefs(api, headers, {"categories": {"product": "immediate"}})

    assert _flush(fast_settings, redis_conn, utcnow()) == 0
    run_worker_until_idle(redis_conn)

    detail = _detail(api, headers, items[0])
    assert (detail["status"], detail["send_at"]) == ("scheduled", (now + timedelta(hours=1)).isoformat() + "Z")
    assert "quiet hours" in detail["history"][-1]["reason"]
    assert [job.id for job in Scheduler(connection=redis_conn).get_jobs()] == [f"release-{items[0]}"]
    assert smtp.count() == 0


# --- a requested send time ----------------------------------------------------------------------------


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.removesuffix("Z"))


def _literal(api, headers, subject: str, **timing) -> dict:
    """A literal `updates` send for USER, expected held; its detail."""
    payload = {"to": "dora@example.com", "user_id": USER, "subject": subject, "text": f"{subject} text",
               "category": "updates", **timing}
    accepted = _call(api, headers, "POST", "/api/notifications/send", payload, status=202)
    assert accepted["status"] == "held"
    return _detail(api, headers, accepted["id"])


def _window_closed(settings, end: datetime) -> datetime:
    return end + timedelta(seconds=settings.digest_grace_seconds + 1)


@pytest.mark.parametrize("later", [{"send_at": "5 days"}, {"delay_seconds": 86400}], ids=["send_at", "delay"])
def test_a_held_item_asked_for_later_goes_into_the_digest_of_the_window_it_falls_due_in(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, later):
    _prefs(api, headers, {"categories": {"updates": "daily"}})
    asked = utcnow().replace(microsecond=0) + timedelta(days=5, minutes=7)
    if "send_at" in later:
        later = {"send_at": asked.isoformat() + "Z"}
    now_item = _literal(api, headers, "Now")
    later_item = _literal(api, headers, "Later", **later)
    send_at = _at(later_item["send_at"])  # kept as asked, not dropped for the digest
    if "delay_seconds" in later:
        assert abs(send_at - (_at(later_item["created_at"]) + timedelta(days=1))) < timedelta(seconds=2)
    else:
        assert send_at == asked
    time_zone, clock = "UTC", fast_settings.digest_time

    # Today's digest takes only what is due by its window's end.
    assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == 1
    run_worker_until_idle(redis_conn)
    (first,) = _digests(api, headers)
    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == first["id"]
    body = received.message.get_body(("plain",)).get_content()
    assert "Now text" in body and "Later" not in body
    assert _detail(api, headers, now_item["id"])["status"] == "digested"
    detail = _detail(api, headers, later_item["id"])
    assert (detail["status"], detail["digest_id"], _at(detail["send_at"])) == ("held", None, send_at)

    # The last window that ends before its send time takes nothing; the one it falls due in takes it.
    assert _flush(fast_settings, redis_conn,
                  _window_closed(fast_settings, digests.boundary_at_or_before(send_at, time_zone, clock))) == 0
    assert _detail(api, headers, later_item["id"])["status"] == "held"
    due_end = digests.boundary_after(send_at, time_zone, clock)
    assert _flush(fast_settings, redis_conn, _window_closed(fast_settings, due_end)) == 1
    run_worker_until_idle(redis_conn)
    second = next(d for d in _digests(api, headers) if d["id"] != first["id"])
    assert smtp.wait_for(2)[1].message["X-Notification-ID"] == second["id"]
    assert "Later text" in smtp.messages[1].message.get_body(("plain",)).get_content()
    detail = _detail(api, headers, later_item["id"])
    assert (detail["status"], detail["digest_id"]) == ("digested", second["id"])
    assert len(_digests(api, headers)) == 2
    assert smtp.count() == 2


def test_a_held_item_released_to_immediate_still_waits_for_its_own_send_at(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    _prefs(api, headers, {"categories": {"updates": "weekly"}})
    item = _literal(api, headers, "Later", delay_seconds=7200)
    send_at = _at(item["send_at"])
    assert send_at > utcnow() + timedelta(minutes=110)
    _prefs(api, headers, {"categories": {"updates": "immediate"}})

    assert _flush(fast_settings, redis_conn, utcnow()) == 0
    run_worker_until_idle(redis_conn)

    detail = _detail(api, headers, item["id"])
    assert (detail["status"], _at(detail["send_at"])) == ("scheduled", send_at)
    assert "switched updates email to immediate" in _status_lines(detail)[-1]["reason"]
    ((job, at),) = Scheduler(connection=redis_conn).get_jobs(with_times=True)
    assert job.id == f"release-{item['id']}" and send_at <= at <= send_at + timedelta(seconds=1)
    assert smtp.count() == 0

    # At its time, and not before, it goes out as itself.
    with database.connection_context():
        assert reconcile(fast_settings, redis_conn, now=send_at - timedelta(minutes=5)).released == 0
        assert reconcile(fast_settings, redis_conn, now=send_at + timedelta(minutes=5)).released == 1
    run_worker_until_idle(redis_conn)
    (received,) = smtp.wait_for(1)
    assert received.message["X-Notification-ID"] == item["id"] and received.message["Subject"] == "Later"
    assert _detail(api, headers, item["id"])["status"] == "sent"


@pytest.mark.parametrize("version", [6, 8])  # 7 and 8 moved no items: 9 does, whichever came before
def test_the_upgrade_moves_items_of_digests_made_before_version_7(pg_db, api_key, version):
    # Before version 7 an item was `digested` as soon as its digest was made, sent or not, and its
    # callback (if it asked for one) said so.
    from notifier.models import Notification, SchemaVersion
    from notifier.schema import upgrade
    from tests.helpers import make_notification

    owner = api_key[0]
    made = {}
    for status in ("queued", "failed", "sent"):
        digest = make_notification(owner, template="digest", data={"items": [], "period": "daily"})
        items = [make_notification(owner, to=f"{status}{n}@example.com", callback_url="https://example.com/hook")
                 for n in range(2)]
        with database.connection_context():
            Notification.update(status=status, sent_at=datetime(2026, 1, 2) if status == "sent" else None).where(
                Notification.id == digest.id).execute()
            Notification.update(status="digested", digest_id=digest.id, callback_status="delivered").where(
                Notification.id.in_([i.id for i in items])).execute()
        made[status] = [i.id for i in items]
    with database.connection_context():
        SchemaVersion.update(version=version).execute()
    upgrade(pg_db)

    for item in map(reload, made["queued"]):  # its digest may still fail: its callback is owed when it ends
        assert (item.status, item.callback_status) == ("in_digest", None)
    for item in map(reload, made["failed"]):  # the caller hears of it
        assert (item.status, item.callback_status, item.last_error) == (
            "failed", "pending", "schema upgrade: its digest was failed")
    for item in map(reload, made["sent"]):
        assert (item.status, item.sent_at, item.callback_status) == ("digested", datetime(2026, 1, 2), "delivered")
    with database.connection_context():
        # In order: the backref's rows come in whatever order PostgreSQL reads them (a flake under load).
        lines = [(e.from_status, e.to_status) for e in store.history(reload(made["failed"][0])) if e.kind == "status"]
    assert lines[-1] == ("digested", "failed")


# --- many groups, big groups --------------------------------------------------------------------------


def _held_for(api, headers, user: str, count: int) -> list[str]:
    _call(api, headers, "PUT", f"/api/users/{user}/preferences", {"categories": {"product": "daily"}})
    ids = []
    for i in range(count):
        payload = {"to": f"{user}@example.com", "user_id": user, "template": "welcome", "data": {"name": f"N{i}"}}
        accepted = _call(api, headers, "POST", "/api/notifications/send", payload, status=202)
        assert accepted["status"] == "held"
        ids.append(accepted["id"])
    return ids


def test_a_group_whose_digest_keeps_failing_does_not_stop_the_others(api, headers, fast_settings, redis_conn,
                                                                    pg_url, caplog):
    stuck, fine = _held_for(api, headers, "u-stuck", 2), _held_for(api, headers, "u-fine", 2)
    limited = bind(fast_settings.database_url, statement_timeout=0.5)
    locker = psycopg2.connect(pg_url)
    try:
        with locker.cursor() as cur:  # a transaction stuck on one of u-stuck's items, whichever comes first
            cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (stuck[0],))
        assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == 1
        locker.rollback()
        assert {_detail(api, headers, i)["status"] for i in fine} == {"in_digest"}
        assert {_detail(api, headers, i)["status"] for i in stuck} == {"held"}  # nothing half-made
        assert [d["to"] for d in _digests(api, headers)] == ["u-fine@example.com"]
        assert "product digest for key" in caplog.text and "was cancelled" in caplog.text
        # Once the lock is gone, the next pass makes it.
        assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == 1
        assert {_detail(api, headers, i)["status"] for i in stuck} == {"in_digest"}
    finally:
        locker.rollback()
        locker.close()
        limited.close_all()


def test_a_digest_lists_at_most_digest_max_items_and_says_how_many_more_it_took(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    items = _held_for(api, headers, USER, 3)
    settings = replace(fast_settings, digest_max_items=2)
    assert _flush(settings, redis_conn, _next_window_closed(settings)) == 1
    run_worker_until_idle(redis_conn)

    assert {_detail(api, headers, i)["status"] for i in items} == {"digested"}  # each of the three
    (digest,) = _digests(api, headers)
    assert (digest["status"], digest["to"]) == ("sent", f"{USER}@example.com")
    (sent,) = smtp.messages
    text = sent.message.get_body(("plain",)).get_content()
    assert "3 updates today" in text and "Hi N0," in text and "Hi N1," in text and "Hi N2," not in text
    assert "And 1 more." in text and "And 1 more." in sent.message.get_body(("html",)).get_content()
    # Each item is its template's own words: the layout's footer is the digest's, once.
    assert text.count("This email was sent by") == 1
    assert sent.message.get_body(("html",)).get_content().count("This email was sent by") == 1


def test_a_user_whose_mail_went_to_two_addresses_gets_a_digest_at_each_of_its_own_items(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn):
    # One digest of a user's window went to the newest address with every item in it: the work
    # address's mail (or one person's of an organisation's user id) read at another.
    _prefs(api, headers, {"categories": {"product": "daily"}})
    work = _held(api, headers, ["Work"], to="ann@work.example")
    home = _held(api, headers, ["Home"], to="Ann@Home.example")
    html_only = {"to": "ann@home.example", "user_id": USER, "category": "product", "subject": "Invoice ready",
                 "html": "<p>Your invoice is <a href='https://e.x/inv/7'>here</a>.</p>"}
    home.append(_call(api, headers, "POST", "/api/notifications/send", html_only, status=202)["id"])

    assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == 2
    run_worker_until_idle(redis_conn)

    received = {sent.rcpt_tos[0].lower(): sent.message.get_body(("plain",)).get_content() for sent in smtp.messages}
    assert set(received) == {"ann@work.example", "ann@home.example"}
    assert "Hi Work," in received["ann@work.example"] and "Home" not in received["ann@work.example"]
    assert "Hi Home," in received["ann@home.example"] and "Work" not in received["ann@home.example"]
    # A send of html alone shows its words, as its own text part would have.
    assert "Your invoice is here <https://e.x/inv/7>." in received["ann@home.example"]
    for item_id, address in [(i, "ann@work.example") for i in work] + [(i, "ann@home.example") for i in home]:
        item = _detail(api, headers, item_id)
        assert item["status"] == "digested" and _detail(api, headers, item["digest_id"])["to"].lower() == address


def test_a_long_item_is_cut_at_the_end_of_a_word_never_inside_a_link():
    text = "word " * 98 + "https://example.com/reset?token=" + "x" * 40
    shown = digests._shortened(text)
    assert shown.endswith("word…") and "https" not in shown and len(shown) <= digests.ITEM_TEXT_CHARS
    assert digests._shortened("short text") == "short text"
    assert digests._shortened("x" * 600) == "…"  # one word longer than all: none of it, not half a link


def test_the_unique_index_of_one_digest_per_window_made_again_by_an_older_process_is_dropped(
        api, headers, live_deliverer, fast_settings, smtp, redis_conn, pg_db):
    # A version-14 process starting after the upgrade makes it again: the window's first address
    # took the one digest, and the other address's items stayed held while the first had any.
    pg_db.execute_sql('CREATE UNIQUE INDEX "digest_api_key_id_user_key_category_window_end" ON "digests" '
                      '("api_key_id", "user_key", "category", "window_end")')
    try:
        _prefs(api, headers, {"categories": {"product": "daily"}})
        _held(api, headers, ["Work"], to="ann@work.example")
        home = _held(api, headers, ["Home"], to="ann@home.example")

        assert _flush(fast_settings, redis_conn, _next_window_closed(fast_settings)) == 2
        assert _detail(api, headers, home[0])["status"] == "in_digest"
        indexes = {row[0] for row in pg_db.execute_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'digests'")}
        assert "digest_api_key_id_user_key_category_window_end" not in indexes
    finally:  # the schema outlives the test: the next test of this database must not find it
        pg_db.execute_sql('DROP INDEX IF EXISTS "digest_api_key_id_user_key_category_window_end"')


def test_an_item_whose_template_was_removed_is_listed_by_name_and_logged(
        pg_db, redis_conn, fast_settings, headers, smtp, tmp_path, caplog):
    # Removed (or broken) after it was held: the digest lists it by its template's name alone, which
    # its reader cannot act on. That went unsaid; the operator hears of it now.
    templates = tmp_path / "templates"
    shutil.copytree(runtime.DEFAULT_TEMPLATES_DIR, templates)
    (templates / "email" / "promo.subject.txt").write_text("Half price")
    (templates / "email" / "promo.txt").write_text("Half price on {{ thing }}")
    settings = replace(fast_settings, templates_dir=str(templates))
    api = create_app(settings, redis=redis_conn).test_client()
    _prefs(api, headers, {"categories": {"product": "daily"}})
    payload = {"to": "dora@example.com", "user_id": USER, "template": "promo", "data": {"thing": "tea"}}
    item = _call(api, headers, "POST", "/api/notifications/send", payload, status=202)["id"]
    for part in ("subject.txt", "txt"):
        (templates / "email" / f"promo.{part}").unlink()

    assert _flush(settings, redis_conn, _next_window_closed(settings)) == 1

    (digest,) = _digests(api, headers)
    assert f"notification {item}: template 'promo' cannot be shown in its digest" in caplog.text
    assert "tea" not in caplog.text
    assert digest["status"] == "queued"
