"""Structured logs: one JSON object per line, the request and notification ids, and nothing secret."""

from __future__ import annotations

import json
import logging
import signal
import smtplib
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from datetime import timedelta
from traceback import format_exception

import fakeredis
import pytest
from peewee import IntegrityError
from rq import Queue
from rq.job import Job

from app import create_app
from notifier import keys, logs, queues
from notifier.api.tracing import request_id_from
from notifier.callbacks import CallbackRejected, CallbackRetry
from notifier.config import Settings
from notifier.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from notifier.models import Notification, Status, utcnow
from notifier.queues import QUEUE_NAMES
from notifier.rendering import TemplateRenderError
from tests.helpers import LITERAL, VERIFICATION, make_notification, reload
from tests.processes import Stack, env_for, free_port, spawn, stop, wait_for_http, wait_until


@pytest.fixture
def captured(capsys):
    """The lines the process writes to stderr, as JSON configured for every process; but for those of
    the session's SMTP server (aiosmtpd's mail.log), whose thread logs whenever a connection an
    earlier test left open ends."""
    logs.configure("INFO", "json")
    return lambda: [line for line in capsys.readouterr().err.splitlines()
                    if line and '"logger": "mail.log"' not in line]


def test_a_line_is_one_json_object_with_the_fields(captured):
    with logs.bound(notification_id="n-1"):
        logging.getLogger("notifier.jobs").warning("attempt %s failed", 2)

    (line,) = captured()
    record = json.loads(line)
    assert record["level"] == "WARNING"
    assert record["logger"] == "notifier.jobs"
    assert record["message"] == "attempt 2 failed"
    assert record["notification_id"] == "n-1"
    assert record["ts"].endswith("Z")
    assert "request_id" not in record and "exc_info" not in record


def test_exceptions_are_one_string_field(captured):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("notifier.api").exception("unhandled error")

    record = json.loads(captured()[0])
    assert record["exc_info"].startswith("Traceback") and "ValueError: boom" in record["exc_info"]


def test_a_traceback_logged_while_a_job_runs_masks_what_a_server_wrote_of_its_recipient(captured):
    reply = "550 5.1.1 no such user GRACE.HOPPER"  # the traceback shows the line that raised it, not this
    try:
        raise RuntimeError(reply)
    except RuntimeError:
        with logs.concealing():
            logs.conceal_recipient("grace.hopper@example.com")
            logging.getLogger("notifier.jobs").warning("after sending notification %s", "n-1", exc_info=True)

    record = json.loads(captured()[0])
    assert "RuntimeError: 550 5.1.1 no such user g***" in record["exc_info"]
    assert "hopper" not in record["exc_info"].lower()


def test_addresses_keys_and_secrets_are_masked_everywhere_in_the_line(captured):
    key = "nfy_0123456789ab_Zx-_9secretsecretsecretsecretsecretsecre"
    try:
        raise RuntimeError("550 <grace.hopper@example.com> unknown")
    except RuntimeError:
        logging.getLogger("rq.worker").exception(
            "sending to %s with %s, secret %s, db %s", "ada.lovelace@example.com", key, "whsec_abcDEF-123_x",
            "postgresql://notifier:hunter2@db:5432/notifier", extra={"arguments": ["bob@example.org"]})

    line = captured()[0]
    for secret in ("ada.lovelace@", "grace.hopper@", "bob@example.org", "Zx-_9secret", "abcDEF-123", "hunter2"):
        assert secret not in line
    record = json.loads(line)
    assert "a***@example.com" in record["message"] and "nfy_0123456789ab_[redacted]" in record["message"]
    assert "whsec_[redacted]" in record["message"]
    assert "g***@example.com" in record["exc_info"]
    assert record["arguments"] == ["b***@example.org"]


def test_text_format_is_for_people(capsys):
    logs.configure("INFO", "text")
    try:
        with logs.bound(request_id="r-1"):
            logging.getLogger("notifier.api").info("to %s", "ada@example.com")
    finally:
        logs.configure("INFO", "json")
    (err,) = [line for line in capsys.readouterr().err.splitlines() if " notifier.api " in line]
    assert err.endswith("INFO notifier.api [request_id=r-1] to a***@example.com")


def test_log_format_is_json_unless_told_text():
    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"LOG_FORMAT": "TEXT"}).log_format == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        Settings.from_env({"LOG_FORMAT": "xml"})


@pytest.mark.parametrize("header, kept", [
    ("abc-123_DEF.9", True), ("x" * 128, True), ("x" * 129, False), ("", False), ("has space", False),
    ("semi;colon", False), ("ünïcode", False),
    # Well-formed, but a secret a caller put in the wrong header: logged whole, on every line.
    ("nfy_0123456789ab_Zx-_9secretsecretsecretsecretsecretsecre", False), ("whsec_abcDEF-123_x", False),
    ("nfy_is-a-prefix", True),
    # A key or secret run on from a word (a prefix of the caller's own): the patterns wanted a word
    # boundary before "nfy_" and "whsec_", so these were kept, and logged whole on every line.
    ("req_nfy_0123456789ab_Zx-_9secretsecretsecretsecretsecretsecre", False),
    ("req1nfy_0123456789ab_Zx-_9secretsecretsecretsecretsecretsecre", False), ("trace_whsec_abcDEF-123_x", False),
])
def test_a_callers_request_id_is_kept_only_when_well_formed(header, kept):
    found = request_id_from(header)
    assert (found == header) is kept
    if not kept:
        assert len(found) == 32 and int(found, 16) >= 0


def test_every_response_carries_the_request_id_even_errors(sqlite_settings, sqlite_db):
    app = create_app(sqlite_settings, redis=fakeredis.FakeRedis())

    @app.get("/api/explode")
    def explode():
        raise RuntimeError("boom")

    client = app.test_client()
    for method, path, status in (("GET", "/api/health", 200), ("GET", "/api/notifications", 401),
                                 ("GET", "/nowhere", 404), ("DELETE", "/api/health", 405),
                                 ("GET", "/api/explode", 500)):
        response = client.open(path, method=method, headers={"X-Request-ID": "req-42"})
        assert response.status_code == status
        assert response.headers["X-Request-ID"] == "req-42"
    generated = client.get("/api/health").headers["X-Request-ID"]
    assert len(generated) == 32


@pytest.mark.parametrize("wrap", ["{}", "req_{}", "req-{}.2", "X{}"])
def test_an_api_key_given_as_the_request_id_is_neither_logged_nor_echoed(sqlite_settings, sqlite_db, capsys, wrap):
    key = f"{keys.KEY_PREFIX}_0123456789ab_Zx-_9secretsecretsecretsecretsecretsecre"
    client = create_app(sqlite_settings, redis=fakeredis.FakeRedis()).test_client()
    response = client.get("/api/notifications", headers={"X-Request-ID": wrap.format(key)})
    assert response.status_code == 401
    assert len(response.headers["X-Request-ID"]) == 32
    err = capsys.readouterr().err
    assert "Zx-_9secret" not in err and response.headers["X-Request-ID"] in err
    # Whoever logs it: a key run on from a word is masked in any line, not only refused as an id.
    logging.getLogger("notifier.api").warning("id %s", wrap.format(key))
    assert "Zx-_9secret" not in capsys.readouterr().err


def test_an_api_without_secret_key_warns_that_unsubscribe_links_can_be_forged(sqlite_settings, sqlite_db, capsys):
    # The development secret is public: with it, anyone signs a link that unsubscribes any user of
    # any key. Nothing said so while a deployment ran on it.
    create_app(sqlite_settings, redis=fakeredis.FakeRedis())
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "SECRET_KEY" in line]
    assert line["level"] == "WARNING" and "forge" in line["message"]

    create_app(replace(sqlite_settings, secret_key="s3cret-of-this-deployment"), redis=fakeredis.FakeRedis())
    assert "SECRET_KEY" not in capsys.readouterr().err


@pytest.mark.parametrize("base, warned", [
    ("http://notify.example.com", True), ("http://10.0.0.5:5000", True), ("https://notify.example.com", False),
    ("http://127.0.0.1:5000", False), ("http://localhost:5000", False), ("http://[::1]:5000", False),
])
def test_a_plain_http_public_base_url_others_reach_is_warned_of_at_start(sqlite_settings, sqlite_db, capsys, base,
                                                                         warned):
    # RFC 8058 one-click unsubscribe needs an https link: over http no inbox shows its button, and
    # nothing said so (development on this machine is left alone).
    create_app(replace(sqlite_settings, secret_key="s3cret", public_base_url=base), redis=fakeredis.FakeRedis())
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "PUBLIC_BASE_URL" in line]
    assert [line["level"] for line in lines] == (["WARNING"] if warned else [])


@pytest.mark.integration
def test_real_processes_log_json_with_ids_and_never_the_address_or_key(pg_settings, pg_db, redis_conn, smtp,
                                                                      tmp_path):
    stack = Stack(replace(pg_settings), tmp_path).start("api", "worker")
    try:
        req = urllib.request.Request(f"{stack.base}/api/notifications/send-verification", method="POST",
                                     data=json.dumps(VERIFICATION | {"to": "ada.lovelace@example.com"}).encode(),
                                     headers={"X-API-Key": stack.key, "X-Request-ID": "trace-1",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as response:
            assert response.headers["X-Request-ID"] == "trace-1"
            notification_id = json.loads(response.read())["id"]
        stack.wait_status(notification_id, "sent")
        wait_until(lambda: f"notification {notification_id} sent" in stack.log("worker"))
    finally:
        stack.close()

    api = [json.loads(line) for line in stack.log("api").splitlines() if line.startswith("{")]
    worker = [json.loads(line) for line in stack.log("worker").splitlines() if line.startswith("{")]
    access = [r for r in api if r["logger"] == "notifier.api.access" and r.get("request_id") == "trace-1"]
    assert access and access[0]["status"] == 202 and access[0]["path"] == "/api/notifications/send-verification"
    sent = [r for r in worker if r.get("notification_id") == notification_id and r["logger"] == "notifier.jobs"]
    # The worker's line names the request that caused it, so one id follows the email end to end.
    assert sent and all(r.get("request_id") == "trace-1" for r in sent)
    assert any(r["logger"].startswith("rq.") and r.get("request_id") == "trace-1" for r in worker), (
        "RQ's own lines are JSON too, with the request id while the job runs")
    for name in ("api", "worker"):
        text = stack.log(name)
        assert "ada.lovelace@example.com" not in text
        assert stack.key not in text
        assert "123456" not in text  # the verification code, part of the body
        # Every line on stderr is JSON (Flask's start-up banner goes to stdout, merged into this file).
        assert all(json.loads(line) for line in text.splitlines() if line and not line.startswith(" * "))


@pytest.mark.integration
def test_under_gunicorn_each_request_is_logged_once_without_its_token_or_query(pg_settings, pg_db, tmp_path):
    # Production runs the API under gunicorn with gunicorn.conf.py. gunicorn's own access line holds
    # the raw request line: an unsubscribe link's token, and query strings that may hold addresses.
    port = free_port()
    log = tmp_path / "gunicorn.log"
    api = spawn(["-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "app:create_app()"],
                env_for(pg_settings, LOG_LEVEL="INFO", LOG_FORMAT="json"), str(log))
    token = "c2VjcmV0LXVuc3Vic2NyaWJlLXRva2Vu.c2lnbmF0dXJl"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health")
        for path in (f"/unsubscribe/{token}", "/api/notifications?to=grace.hopper@example.com"):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            except urllib.error.HTTPError as refused:
                assert refused.code in (400, 401)
    finally:
        stop(api)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if "access" in line["logger"]]
    # wait_for_http may ask for /api/health more than once (a loaded machine answers it late).
    assert {line["logger"] for line in access} == {"notifier.api.access"}
    assert [line.get("path") for line in access if line.get("path") != "/api/health"] == [
        "/unsubscribe/<token>", "/api/notifications",
    ]
    text = log.read_text()
    assert token not in text and "grace" not in text


def test_jobs_queued_while_serving_a_request_carry_its_id(sqlite_settings, sqlite_db):
    owner = keys.create("trace-test")[0]
    redis = fakeredis.FakeRedis()
    now_one, shared = make_notification(owner), make_notification(owner, to="dan@example.com")
    Notification.update(job_id="shared-1").where(Notification.seq == shared.seq).execute()
    later = make_notification(owner, status=Status.SCHEDULED, send_at=utcnow() + timedelta(hours=1))
    with logs.bound(request_id="req-7"):
        queues.dispatch_many(redis, sqlite_settings, [now_one, reload(shared.id), later])
    untraced = make_notification(owner, to="erin@example.com")
    queues.dispatch_many(redis, sqlite_settings, [untraced])

    def meta(job_id):
        return Job.fetch(job_id, connection=redis).meta

    assert meta(queues.job_id_for(now_one.id)) == {"request_id": "req-7"}
    assert meta("shared-1") == {"request_id": "req-7"}
    assert meta(queues.release_job_id_for(later.id)) == {"request_id": "req-7"}
    assert meta(queues.job_id_for(untraced.id)) == {"request_id": None}
    # Queued again under the same job id with no request (the reconciler, `dlq requeue`): the old
    # request's id does not stay on the new job.
    queues.dispatch_many(redis, sqlite_settings, [now_one])
    assert meta(queues.job_id_for(now_one.id)) == {"request_id": None}


def test_sql_at_debug_shows_the_statement_never_its_values(sqlite_settings, sqlite_db, capsys):
    # peewee logs every statement with its parameters at DEBUG: a digest's data (its items' subjects
    # and texts), a history line's SMTP reply, anything a statement writes.
    owner = keys.create("sql-debug")[0]
    notification = make_notification(owner)
    logs.configure("DEBUG", "json")
    try:
        Notification.update(data={"items": [{"text": "ZQ-BODY-TEXT"}]}).where(
            Notification.seq == notification.seq).execute()
    finally:
        logs.configure("INFO", "json")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    sql = [line for line in lines if line["logger"] == "peewee"]
    assert sql and 'UPDATE "notifications"' in sql[0]["message"]
    assert not any("ZQ-BODY-TEXT" in json.dumps(line) for line in lines)


def test_an_unsubscribe_token_is_never_logged_whatever_the_route_made_of_it(sqlite_settings, sqlite_db, capsys):
    # The access line names a matched route by its pattern; a method the route does not take (405)
    # matches none, and gunicorn's own lines (its DEBUG request line, a malformed request line) know
    # no routes at all.
    token = "eyJrIjoxLCJ1IjoiWlEtVVNFUiJ9.ZQ-SIGNATURE"
    app = create_app(sqlite_settings, redis=fakeredis.FakeRedis())
    client = app.test_client()
    assert client.delete(f"/unsubscribe/{token}").status_code == 405
    assert client.get(f"/unsubscribe/{token}/more").status_code == 404
    logging.getLogger("gunicorn.error").warning(
        "Invalid request from ip=127.0.0.1: Invalid HTTP request line: 'GET /unsubscribe/%s\\x01 HTTP/1.1'", token)
    logging.getLogger("gunicorn.error").info("GET https://notify.example/unsubscribe/%s?x=1", token)
    err = capsys.readouterr().err
    assert "ZQ-SIGNATURE" not in err and "eyJrIjoxLCJ1" not in err
    paths = [json.loads(line).get("path") for line in err.splitlines() if '"notifier.api.access"' in line]
    assert paths == ["/unsubscribe/<token>", "/unsubscribe/<token>/more"]
    assert "/unsubscribe/<token>\\\\x01 HTTP/1.1" in err and "/unsubscribe/<token>?x=1" in err


def _worker_lines(settings, redis_conn, capsys) -> list[dict]:
    """The lines an in-process worker logs as it runs every job queued; not those of aiosmtpd, the
    test's mail server, which logs in this process too ("mail.log")."""
    from tests.helpers import installed_deliverer, run_worker_until_idle

    capsys.readouterr()
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] != "mail.log"]


@pytest.mark.integration
def test_a_recipient_echoed_by_the_mail_server_is_masked_in_every_form(client, headers, pg_settings, redis_conn,
                                                                         smtp, capsys):
    # A refusal may quote the address with characters the address pattern stops at ("=", "/"), or
    # the mailbox alone, in any case. The worker's line and RQ's line for the failed job both hold it.
    smtp.rcpt_replies.extend(["550 5.1.1 <grace=hopper/navy@example.com>: no such user grace=hopper/navy",
                              "550 5.1.1 mailbox ADA.LOVELACE does not exist"])
    for to in ("grace=hopper/navy@example.com", "ada.lovelace@example.com"):
        response = client.post("/api/notifications/send", headers=headers,
                               json={"to": to, "subject": "Hello", "text": "Hi"})
        assert response.status_code == 202
    lines = _worker_lines(pg_settings, redis_conn, capsys)
    failed = [line["message"] for line in lines if line["logger"] == "notifier.jobs" and "failed" in line["message"]]
    assert len(failed) == 2 and "g***@example.com" in failed[0] and "mailbox a*** does not exist" in failed[1]
    rq_failed = [line for line in lines if line["logger"] == "rq.worker" and " failed: " in line["message"]]
    assert len(rq_failed) == 2 and "no such user g***" in rq_failed[0]["message"]
    text = json.dumps(lines).lower()
    assert "hopper" not in text and "lovelace" not in text


@pytest.mark.integration
def test_a_recipient_whose_mailbox_is_a_common_word_leaves_the_job_lines_readable(client, headers, pg_settings,
                                                                                  redis_conn, smtp, capsys):
    # A job masks its recipient's mailbox alone only where a mail server's words can be (a log call's
    # arguments, an exception's text): "notification@" and "sent@" hid those words in every line of it.
    smtp.rcpt_replies.append("550 5.1.1 no such user SENT")
    ids = []
    for to in ("sent@example.com", "notification@example.com"):
        response = client.post("/api/notifications/send", headers=headers,
                               json={"to": to, "subject": "Hello", "text": "Hi"})
        assert response.status_code == 202
        ids.append(response.get_json()["id"])
    messages = [line["message"] for line in _worker_lines(pg_settings, redis_conn, capsys)]
    assert f"notification {ids[1]} sent (attempt 1)" in messages
    refused = [m for m in messages if "no such user" in m]
    # Ours ("... failed (final): ...") and the worker's about RQ's job, which quotes the refusal.
    assert any(m.startswith(f"notification {ids[0]} attempt 1 failed") for m in refused)
    assert any(m.startswith(f"job notification-{ids[0]} failed: PermanentDeliveryError") for m in refused)
    assert all("no such user s***" in m and "no such user sent" not in m.lower() for m in refused)


@pytest.mark.integration
def test_a_failed_job_is_logged_at_the_level_of_what_it_means_with_its_notification(client, headers, pg_settings,
                                                                                   redis_conn, smtp, capsys):
    # RQ logged each failure at ERROR, its traceback in the message and no notification_id: every
    # 451 retried paged whoever alerts on errors. A retry or a bounce is a WARNING; retries run out
    # (an outage outlasted them) and anything unexpected are errors, the latter with its traceback.
    attempts = pg_settings.max_attempts
    smtp.replies.extend(["451 4.4.1 still busy"] * attempts)
    busy = client.post("/api/notifications/send", headers=headers, json={**LITERAL, "to": "busy@example.com"})
    lines = _worker_lines(pg_settings, redis_conn, capsys)
    smtp.rcpt_replies.append("550 5.1.1 no such user")
    bounced = client.post("/api/notifications/send", headers=headers, json={**LITERAL, "to": "gone@example.com"})
    lines += _worker_lines(pg_settings, redis_conn, capsys)
    broken = f"notification-{uuid.uuid4()}"
    Queue(QUEUE_NAMES["default"], connection=redis_conn).enqueue("notifier.jobs.no_such_job", job_id=broken)
    lines += _worker_lines(pg_settings, redis_conn, capsys)

    failed = [line for line in lines if line["logger"] == "rq.worker" and " failed: " in line["message"]]
    busy_id, bounced_id = busy.get_json()["id"], bounced.get_json()["id"]
    assert [(line["level"], line.get("notification_id")) for line in failed] == (
        [("WARNING", busy_id)] * (attempts - 1) + [("ERROR", busy_id), ("WARNING", bounced_id),
                                                   ("ERROR", broken.removeprefix("notification-"))])
    assert all(line["message"].endswith("; RQ retries it") for line in failed[:attempts - 1])
    exhausted = failed[attempts - 1]["message"]
    assert "RetriesExhausted" in exhausted and "dead-letter queue" in exhausted
    assert all("exc_info" not in line and "Traceback" not in line["message"] for line in failed[:-1])
    assert failed[-1]["exc_info"].startswith("Traceback") and "no_such_job" in failed[-1]["exc_info"]


@pytest.mark.integration
def test_a_batch_item_that_fails_for_good_is_logged_as_its_own_failed_job(client, headers, pg_settings,
                                                                            redis_conn, smtp, capsys):
    # A batch's shared job files an item that failed for good as its own failed job, but logged no
    # line for it: a refused message (an operator's to mend) sent in a batch was a WARNING alone,
    # never the ERROR the same email sent alone is, so an alert on ERROR missed it.
    smtp.rcpt_replies.append("550 5.1.1 no such user")
    smtp.replies.append("554 5.7.1 message refused by policy")
    response = client.post("/api/notifications/batch", headers=headers, json={"notifications": [
        {**LITERAL, "to": "gone@example.com"}, {**LITERAL, "to": "blocked@example.com"},
        {**LITERAL, "to": "fine@example.com"}]})
    assert response.status_code == 202
    bounced_id, refused_id, _ = [item["id"] for item in response.get_json()["results"]]
    failed = [line for line in _worker_lines(pg_settings, redis_conn, capsys)
              if line["logger"] == "rq.worker" and " failed: " in line["message"]]
    assert [(line["level"], line.get("notification_id")) for line in failed] == [
        ("WARNING", bounced_id), ("ERROR", refused_id)]
    assert failed[1]["message"] == (f"job notification-{refused_id} failed: PermanentDeliveryError: SMTP error: 554 "
                                    "5.7.1 message refused by policy; to the failed registry (the dead-letter queue)")


def _gave_up(cause: Exception) -> Exception:
    from notifier.callback_job import CallbackGaveUp

    try:
        raise CallbackGaveUp(str(cause)) from cause
    except CallbackGaveUp as gave_up:
        return gave_up


@pytest.mark.parametrize("exc, retried, level", [
    (TransientDeliveryError("451 busy", 451), True, "WARNING"),
    (TransientDeliveryError("451 busy", 451), False, "ERROR"),  # a shared job's, out of retries
    (PermanentDeliveryError("550 no such user", 550, address_rejected=True), False, "WARNING"),
    (PermanentDeliveryError("550 sender refused", 550), False, "ERROR"),  # ours to mend
    (TemplateRenderError("template 'welcome': 'name' is undefined"), False, "ERROR"),  # a broken deploy
    (RuntimeError("a bug"), True, "ERROR"),
    (_gave_up(CallbackRetry("HTTP 503")), False, "ERROR"),  # the endpoint down past every retry
    (_gave_up(CallbackRejected("HTTP 410")), False, "WARNING"),  # refused: the caller's answer
    (CallbackRetry("HTTP 503"), True, "WARNING"),
])
def test_a_job_failure_is_an_error_where_an_operator_must_act(exc, retried, level):
    from notifier.failed_jobs import failure_level

    assert logging.getLevelName(failure_level(exc, retried)) == level


def test_rqs_loop_ending_on_redis_gone_is_a_warning_without_a_traceback(captured):
    # Every Redis restart logged an ERROR with a traceback, for an outage the worker waits out.
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker import RedisAwayIsAWarning

    rq = logging.getLogger("rq.worker.test-filter")
    rq.addFilter(RedisAwayIsAWarning())
    for error in (RedisConnectionError("Error 111 connecting"), RuntimeError("a bug")):
        try:
            raise error
        except (RedisConnectionError, RuntimeError):
            rq.error("Worker %s: found an unhandled exception, quitting...", "w-1", exc_info=True)

    rq.error("Worker %s: Redis connection timeout, quitting...", "w-1")  # RQ's own, for a hung Redis

    away, bug, hung = (json.loads(line) for line in captured())
    assert (away["level"], away["message"]) == ("WARNING", "Worker w-1: Redis went away (ConnectionError); "
                                                           "waiting for it to carry on")
    assert "exc_info" not in away
    assert bug["level"] == "ERROR" and "RuntimeError: a bug" in bug["exc_info"]
    assert (hung["level"], hung["message"]) == ("WARNING", "Worker w-1: Redis went away (TimeoutError); "
                                                           "waiting for it to carry on")


def test_rqs_retries_while_redis_is_away_are_warnings(captured):
    # A chaos soak (bench/redischaos.py) found every Redis restart still logging ERRORs: RQ's dequeue loop
    # and its pubsub thread, retrying the connection, and RQ's scheduler dying with Redis (a traceback
    # in its message), though the worker waits the outage out and starts that scheduler again.
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from rq.scheduler import run as run_rq_scheduler

    from worker import QuietScheduler, RedisAwayIsAWarning

    rq = logging.getLogger("rq.worker.test-filter")
    rq.addFilter(RedisAwayIsAWarning())
    rq.error("Worker %s: could not connect to Redis instance: %s retrying in %d seconds...", "w-1",
             RedisConnectionError("Error 111 connecting to 127.0.0.1:6426. Connection refused."), 2)
    gone = Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_rq_scheduler(QuietScheduler(["notifier.default"], connection=gone))  # what its process runs
    finally:
        for sig, handler in handlers.items():  # RQ's scheduler installs its own
            signal.signal(sig, handler)

    lines = [json.loads(line) for line in captured()]
    assert [line["level"] for line in lines if line["level"] not in ("INFO", "DEBUG")] == ["WARNING", "WARNING"]
    retrying, stopped = (line for line in lines if line["level"] == "WARNING")
    assert retrying["message"] == ("Worker w-1: could not connect to Redis instance: Error 111 connecting to "
                                   "127.0.0.1:6426. Connection refused. retrying in 2 seconds...")
    assert stopped["message"] == ("RQ scheduler stopped: Redis went away (ConnectionError); its worker starts it "
                                  "again once Redis answers")
    assert not any("Traceback" in json.dumps(line) for line in lines)


def test_rqs_retries_during_one_outage_are_one_line_a_minute_and_the_next_outage_is_told_again(captured,
                                                                                                 redis_conn):
    # RQ's dequeue loop tries Redis every second (REDIS_POLL_SECONDS): a ten-minute outage was 600
    # lines a worker. The worker's heartbeat, on every turn of that loop, says when Redis answers.
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker import REDIS_AWAY, make_worker

    rq = logging.getLogger("rq.worker.test-throttle")
    rq.addFilter(REDIS_AWAY)
    refused = RedisConnectionError("Error 111 connecting to 127.0.0.1:6426. Connection refused.")
    try:
        for _ in range(5):
            rq.error("Worker %s: could not connect to Redis instance: %s retrying in %d seconds...", "w-1", refused, 1)
        assert len(captured()) == 1
        make_worker(redis_conn).heartbeat()  # Redis answers
        rq.error("Worker %s: could not connect to Redis instance: %s retrying in %d seconds...", "w-1", refused, 1)
        assert [json.loads(line)["level"] for line in captured()] == ["WARNING"]
    finally:
        rq.removeFilter(REDIS_AWAY)
        REDIS_AWAY.answered()


def test_the_mailbox_alone_is_masked_in_what_a_server_wrote_not_in_the_words_of_the_log_call(captured):
    # A shared job's recipients whose mailboxes are words of our lines, RQ's, and a traceback's code.
    try:
        sent = "no such user"
        raise RuntimeError(f"550 5.1.1 {sent} SENT")  # the traceback shows this line: code, not the server's
    except RuntimeError:
        traceback = "".join(format_exception(*sys.exc_info()))
        with logs.concealing():
            for address in ("notification@example.com", "sent@example.com", "default@example.com", "job@example.com"):
                logs.conceal_recipient(address)
            jobs, rq = logging.getLogger("notifier.jobs"), logging.getLogger("rq.worker")
            jobs.info("notification %s sent (attempt %s)", "n-1", 1)
            rq.info("Worker %s: %s: %s (%s)", "w-1", "notifier.default", "Job OK", "j-1")
            jobs.warning("notification %s attempt %s failed (%s): %s", "n-2", 1, "final", "550 no such user Sent")
            jobs.warning("after sending notification %s", "n-3", exc_info=True)
            rq.error("Worker %s: job %s: exception raised while executing (%s)\n%s", "w-1", "j-2",
                     "notifier.jobs.deliver", traceback, extra={"queue": "notifier.default"})
            jobs.warning("%(reply)s to sent@example.com", {"reply": "550 sent"})

    ours, rq_ok, refused, with_exc, rq_failed, named = (json.loads(line) for line in captured())
    assert ours["message"] == "notification n-1 sent (attempt 1)"
    assert rq_ok["message"] == "Worker w-1: notifier.default: Job OK (j-1)"
    assert refused["message"] == "notification n-2 attempt 1 failed (final): 550 no such user s***"
    for text in (with_exc["exc_info"], rq_failed["message"]):
        assert 'raise RuntimeError(f"550 5.1.1 {sent} SENT")' in text
        assert "RuntimeError: 550 5.1.1 no such user s***" in text and "user SENT" not in text
    assert rq_failed["message"].startswith("Worker w-1: job j-2: exception raised while executing "
                                           "(notifier.jobs.deliver)\nTraceback")
    assert rq_failed["queue"] == "notifier.default"
    assert named["message"] == "550 s*** to s***@example.com"


@pytest.mark.integration
def test_a_refusal_quoting_the_subject_the_link_and_the_code_logs_none_of_them(client, headers, pg_settings,
                                                                             redis_conn, smtp, capsys):
    # A content filter's refusal of a verification email, quoting its subject, its link (with the
    # token) and its code: the worker's line and RQ's line for the failed job both held them whole.

    link = "https://app.example/verify?token=zq-s3cr3t-t0ken"
    smtp.replies.append(f"554 5.7.1 'Verify your email address' refused: URL {link} listed, code 714253")
    response = client.post("/api/notifications/send-verification", headers=headers,
                           json={"to": "ann@example.com", "user_id": "u1", "code": "714253",
                                 "verification_url": link, "name": "final"})
    assert response.status_code == 202
    notification_id = response.get_json()["id"]
    lines = _worker_lines(pg_settings, redis_conn, capsys)
    refused = [line["message"] for line in lines if "refused" in line["message"]]
    assert len(refused) == 2  # ours, and RQ's traceback of the failed job
    # Our line's own words stay, though the data holds one of them ("final" was an argument, masked).
    assert refused[0].startswith(f"notification {notification_id} attempt 1 failed (final): SMTP error: 554")
    assert all("554 5.7.1 '[content]' refused: URL [content] listed, code [content]" in m for m in refused)
    text = json.dumps(lines)
    assert "s3cr3t" not in text and "714253" not in text and "Verify your email address" not in text
    detail = client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()
    assert link in detail["history"][-1]["smtp_reply"]  # the record keeps the server's words whole


@pytest.mark.integration
def test_a_refusal_quoting_a_link_or_a_code_from_inside_a_line_of_the_body_logs_neither(client, headers, pg_settings,
                                                                                       redis_conn, smtp, capsys):
    # A URL blocklist names the link alone, token and all, out of a line of a literal email's body.
    link = "https://app.example/r?t=zq-lit-t0ken"
    smtp.replies.append(f"554 5.7.1 URL {link} is listed; see also code 90210")
    response = client.post("/api/notifications/send", headers=headers, json={
        "to": "ann@example.com", "subject": "Hi", "text": f"Reset here: {link} (or type 90210).",
        "html": f'<p>Reset <a href="{link}">here</a>.</p>'})
    assert response.status_code == 202
    lines = _worker_lines(pg_settings, redis_conn, capsys)
    refused = [line["message"] for line in lines if "is listed" in line["message"]]
    assert len(refused) == 2 and all("URL [content] is listed; see also code [content]" in m for m in refused)
    assert "zq-lit-t0ken" not in json.dumps(lines) and "90210" not in json.dumps(lines)


def test_what_a_server_quotes_of_the_email_being_sent_is_masked_in_its_words_only(captured):
    # A refusal may quote the subject, a link with its token, or a code: the email's content, which
    # never goes in a log. It is masked where the server's words can be, as a mailbox alone is; the
    # log call's own words and a traceback's code keep theirs, and the next email's content replaces it.
    subject, link = "Reset your password", "https://app.example/reset?token=zq-s3cr3t-t0ken"
    try:
        raise RuntimeError(f"554 5.7.1 URL {link} blocked")
    except RuntimeError:
        traceback = "".join(format_exception(*sys.exc_info()))
    with logs.concealing():
        logs.conceal_recipient("ann@example.com")
        logs.conceal_content([subject, link, "987654", "Hi", "Reset"])
        jobs, rq = logging.getLogger("notifier.jobs"), logging.getLogger("rq.worker")
        jobs.warning("notification %s attempt %s failed (%s): %s", "n-1", 1, "final",
                     f"550 5.7.1 message '{subject.upper()}' with code 987654 refused. Hi")
        rq.error("Worker %s: job %s: exception raised while executing (%s)\n%s", "w-1", "j-1",
                 "notifier.jobs.deliver", traceback)
        jobs.info("Reset counters for %s", "n-1")  # the call's own words, though "Reset" is content
        logs.conceal_content(["Your order has shipped"])
        jobs.warning("notification %s attempt %s failed (%s): %s", "n-2", 1, "final",
                     "550 'your order has shipped' and 'reset your password' refused")

    refused, rq_failed, own, next_one = (json.loads(line) for line in captured())
    assert refused["message"] == ("notification n-1 attempt 1 failed (final): "
                                  "550 5.7.1 message '[content]' with code [content] refused. Hi")
    assert link not in rq_failed["message"] and "RuntimeError: 554 5.7.1 URL [content] blocked" in rq_failed["message"]
    assert own["message"] == "Reset counters for n-1"
    assert next_one["message"].endswith("550 '[content]' and 'reset your password' refused")


def test_what_a_server_quotes_of_an_email_beyond_ascii_is_masked_as_written_and_as_bytes(captured):
    # A form is the text lower-cased, matched ignoring case in ASCII only: a subject opening with a
    # capital beyond it ("Élection", "Überweisung", "Подтвердите", "İstanbul") quoted as written was
    # logged whole. smtplib holds a reply as bytes, and its exception in RQ's traceback shows "é" as
    # "\\xc3\\xa9": that was logged whole even in lower case.
    subjects = ["Élection du bureau: résultats", "Überweisung bestätigt", "Подтвердите адрес", "İstanbul teslimatı"]
    try:
        raise smtplib.SMTPDataError(554, f"5.7.1 '{subjects[0]}' / '{subjects[1].lower()}' refused".encode())
    except smtplib.SMTPDataError:
        traceback = "".join(format_exception(*sys.exc_info()))
    with logs.concealing():
        logs.conceal_recipient("ann@example.com")
        logs.conceal_content(subjects)
        logging.getLogger("notifier.jobs").warning("notification %s failed: %s", "n-1",
                                                   "554 " + " / ".join(f"'{s}'" for s in subjects) + " refused")
        logging.getLogger("rq.worker").error("Worker %s: job %s: exception raised while executing (%s)\n%s", "w-1",
                                             "j-1", "notifier.jobs.deliver", traceback)
        logs.conceal_content(["Οδός κλειστή"])  # lower-cased with a final "ς", which "Σ" is too
        logging.getLogger("notifier.jobs").warning("550 %s", "'ΟΔΌΣ ΚΛΕΙΣΤΉ', 'οδός κλειστή' and ſupport")

    ours, rq, other = (json.loads(line)["message"] for line in captured())
    assert ours == "notification n-1 failed: 554 '[content]' / '[content]' / '[content]' / '[content]' refused"
    assert "(554, b\"5.7.1 '[content]' / '[content]' refused\")" in rq
    assert "\\x" not in rq and "lection" not in rq and "berweisung" not in rq
    assert other == "550 '[content]', '[content]' and ſupport"


@pytest.mark.parametrize("in_path, logged, hidden", [
    # "=" is common in the local part of forwarding and bounce addresses (SRS, VERP), which hold
    # another address: masked from the "=" on, the line kept the part before it.
    ("list-bounces+grace=navy.mil@example.com", "l***@example.com", "grace"),
    # A send took user@[192.0.2.1] once (marshmallow's Email does), and rows and a server's answers
    # may still hold one: the pattern wanted a domain name
    # after the "@", and the mailbox showed whole.
    ("grace.hopper@[192.0.2.1]", "g***@[192.0.2.1]", "hopper"),
    # A quoted local part, which a send took too: the quote ended the run, which had to be followed
    # by the "@", so neither it nor the mailbox was masked.
    ('"grace.hopper"@example.com', '"***@example.com', "hopper"),
    ('%22grace.hopper%22@example.com', '"***@example.com', "hopper"),
    # A quoted local part holds what an unquoted one may not (a space, a comma, parentheses, an "@"):
    # the run stopped there, and the mask took only what followed ('"grace h***@example.com').
    ('"grace hopper"@example.com', '"***@example.com', "hopper"),
    ('%22grace%20hopper%22@example.com', '"***@example.com', "hopper"),
    ('"grace,hopper"@example.com', '"***@example.com', "hopper"),
    ('"grace(hopper)"@example.com', '"***@example.com', "hopper"),
    ('"grace@hopper"@example.com', '"***@example.com', "hopper"),
    # A "/", which a send takes in a local part, ended the log's pattern: "sales.private/t***@example.com".
    ("sales.private/team-lead@example.com", "s***@example.com", "private"),
])
def test_an_address_is_masked_whole_whatever_its_form(sqlite_settings, sqlite_db, capsys, in_path, logged, hidden):
    app = create_app(sqlite_settings, redis=fakeredis.FakeRedis())
    key = keys.create("forms")[1]
    response = app.test_client().delete(f"/api/suppressions/{in_path}", headers={"X-API-Key": key})
    assert response.status_code in (204, 404)
    logging.getLogger("notifier.jobs").warning("refused: %s, %s", "ada=lovelace@example.com",
                                               "<ada.lovelace@[IPv6:2001:db8::1]>")
    logging.getLogger("gunicorn.error").warning("DELETE /api/suppressions/%s", "%22ada.lovelace%22@example.com")
    logging.getLogger("gunicorn.error").warning("DELETE /api/suppressions/%s", "%22ada%20lovelace%22%40example.com")
    err = capsys.readouterr().err
    assert hidden not in err and "lovelace" not in err
    access = [json.loads(line) for line in err.splitlines() if '"notifier.api.access"' in line]
    assert access[0]["path"] == f"/api/suppressions/{logged}"
    assert "refused: a***@example.com, <a***@[IPv6:2001:db8::1]>" in err
    assert err.count("DELETE /api/suppressions/%***@example.com") == 2


def test_an_address_as_a_user_id_in_a_path_is_masked_whole(sqlite_settings, sqlite_db, capsys):
    app = create_app(sqlite_settings, redis=fakeredis.FakeRedis())
    key = keys.create("user-paths")[1]
    client = app.test_client()
    for path in ("/api/users/email:sales.private/lead@example.com/preferences",
                 "/api/notifications/user/email:sales.private/lead@example.com/stats", "/api/users/org/7/preferences"):
        assert client.get(path, headers={"X-API-Key": key}).status_code == 200
    # No route matched: a 405 (the method), a 404 (the path's end). Masked from after the routes' words.
    assert client.post("/api/suppressions/sales.private/lead@example.com",
                       headers={"X-API-Key": key}).status_code == 405
    # Any path under /api/users names a user (an id may hold "/"), one DELETE erases: GET is the wrong method.
    assert client.get("/api/users/email:sales.private/lead@example.com/prefs",
                      headers={"X-API-Key": key}).status_code == 405
    assert client.get("/api/notifications/user/email:sales.private/lead@example.com/x",
                      headers={"X-API-Key": key}).status_code == 404
    # A local part made of the routes' own words: masked too.
    assert client.post("/api/suppressions/users/preferences/private@example.com",
                       headers={"X-API-Key": key}).status_code == 405
    assert client.get("/api/nothing/users/private/x@example.com").status_code == 404
    err = capsys.readouterr().err
    assert "private" not in err
    assert [json.loads(line)["path"] for line in err.splitlines() if '"notifier.api.access"' in line] == [
        "/api/users/email:s***@example.com/preferences", "/api/notifications/user/email:s***@example.com/stats",
        "/api/users/org/7/preferences", "/api/suppressions/s***@example.com",
        "/api/users/email:s***@example.com/prefs", "/api/notifications/u***@example.com/x",
        "/api/suppressions/u***@example.com",
        "/api/nothing/u***@example.com"]


def test_a_reply_holding_what_folds_to_a_recipient_only_beyond_ascii_is_still_logged(captured):
    # The mail server's words are not ours: ignoring case beyond ASCII, "ſ" is an "s", but its lower
    # case is not, so the job's mask for it was not found and the worker's log call raised KeyError.
    with logs.concealing():
        logs.conceal_recipient("support@example.com")
        logging.getLogger("notifier.jobs").warning("550 %s", "<support@example.com> ſupport, SUPPORT")

    (line,) = captured()
    assert json.loads(line)["message"] == "550 <s***@example.com> ſupport, s***"


def test_a_shared_job_of_many_recipients_each_echoed_keeps_its_lines_cheap():
    # BATCH_JOB_SIZE may be 1,000. The pattern of every recipient so far was made again after each
    # new one, as soon as a line (a refusal) held one: quadratic, 25 ms an email at 1,000.
    addresses = [f"user{n:04d}.name@example.com" for n in range(400)]
    started = time.perf_counter()
    with logs.concealing():
        for address in addresses:
            logs.conceal_recipient(address)
            assert logs.redact(f"550 5.1.1 <{address}>: mailbox {address.split('@')[0]} unknown") == (
                "550 5.1.1 <u***@example.com>: mailbox u*** unknown")
    assert time.perf_counter() - started < 2.0  # 5 s before, about 0.1 s now: a bound on the kind, not a speed goal


@pytest.mark.parametrize("line, logged", [
    # A quoted local part right after a character an address may hold (a repr's quote, a "key="): the
    # run began before the quote, took it as one of its characters and stopped at the space.
    ("""refused: '"ada lovelace"@example.com'""", "refused: '***@example.com'"),
    ("""to="ada lovelace"@example.com queued""", "t***@example.com queued"),
    ("""GET /s?address=%22ada%20lovelace%22%40example.com HTTP/1.1""", "GET /s***@example.com HTTP/1.1"),
    # A quoted address is still an address in quotes, not a quoted local part.
    ("""to "ada.lovelace@example.com" and 'ada.lovelace@example.org'""",
     """to "***@example.com" and '***@example.org'"""),
])
def test_a_quoted_local_part_is_masked_whole_whatever_stands_before_it(line, logged):
    assert logs.redact(line) == logged


@pytest.mark.parametrize("line", ['x"a"' * 25_000, '"a b"' * 20_000, 'a"' + "b" * 100_000, 'a"\\"' * 30_000,
                                  "a%22" * 30_000])
def test_a_long_line_of_quotes_is_redacted_in_time_linear_in_its_length(line):
    started = time.perf_counter()
    logs.redact(line + "@")
    assert time.perf_counter() - started < 1.0  # about 20 ms: a bound on the kind, not a speed goal


@pytest.mark.parametrize("line", ["authorization:" + " " * 20_000, "Authorization: '" + "\t" * 20_000,
                                  "authorization " * 5_000, "Authorization Basic " + " " * 20_000,
                                  "'Authorization" + " " * 20_000, "'authorization '" * 5_000,
                                  "'Authorization" + "\\t" * 10_000, "Authorization Basic" + "\\t" * 10_000,
                                  "'Authorization'" + " ," * 10_000, "'authorization', \"" * 5_000])
def test_a_long_line_naming_authorization_is_redacted_in_time_linear_in_its_length(line):
    started = time.perf_counter()
    assert logs.redact(line) == line
    assert time.perf_counter() - started < 1.0  # 41 s for 16,000 blanks once: a bound on the kind, not a speed goal


@pytest.mark.parametrize("line", ["Authorization: Digest " + "a*=b'" * 10_000, "Authorization: a = \\" * 10_000,
                                  'Authorization: Digest a=\\"' + "\\x" * 10_000,
                                  "Authorization: Digest " + "u*=x''y, " * 10_000])
def test_a_long_line_of_digest_parameters_is_redacted_in_time_linear_in_its_length(line):
    started = time.perf_counter()
    logs.redact(line)
    assert time.perf_counter() - started < 1.0  # a bound on the kind, not a speed goal


@pytest.mark.parametrize("run", ["a=", "a", "k=v&", "a.", "nfy_"])
def test_a_long_line_is_redacted_in_time_linear_in_its_length(run):
    # Each logging thread redacts its own lines, the formatter's part under the handler's lock: a run
    # of address characters with no address in it (a query string, a token) was tried again from each
    # of its characters, seconds for this 20 KB line and over a minute for 100 KB.
    line = run * (20_000 // len(run)) + "@ x://" + run * (20_000 // len(run))
    started = time.perf_counter()
    assert logs.redact(line) == line
    assert time.perf_counter() - started < 1.0  # seconds before; about 1 ms now: a bound on the kind, not a speed goal


@pytest.mark.integration
def test_a_database_error_shows_which_constraint_not_the_row(pg_db, captured):
    # PostgreSQL's DETAIL quotes the values: a NOT NULL violation the whole row, body and template
    # data included (an older release writing to a newer schema), a unique violation the key.
    owner = keys.create("detail")[0]
    with pytest.raises(IntegrityError) as refused, pg_db.atomic():
        pg_db.execute_sql('INSERT INTO notifications (id, api_key_id, "to", subject, text, data, priority, '
                          "attempts, callback_attempts, created_at, updated_at) VALUES "
                          "('n-1', %s, 'ada.lovelace@example.com', 'ZQ-SUBJECT', 'ZQ-BODY', '{\"code\": \"ZQ-CODE\"}', "
                          "'default', 0, 0, now(), now())", [owner.id])
    with pytest.raises(IntegrityError) as duplicate, pg_db.atomic():
        pg_db.execute_sql("INSERT INTO api_keys (name, prefix, key_hash, callback_secret, created_at) "
                          "VALUES (%s, 'ZQ-PREFIX', 'h', 's', now())", [owner.name])
    for error in (refused.value, duplicate.value):
        try:
            raise RuntimeError("unhandled") from error
        except RuntimeError:
            logging.getLogger("notifier.api").exception("unhandled error")

    first, second = (json.loads(line) for line in captured())
    assert "violates not-null constraint" in first["exc_info"] and "Failing row contains (…)" in first["exc_info"]
    assert 'violates unique constraint "apikey_name"' in second["exc_info"]
    assert "Key (name)=(…)" in second["exc_info"]
    assert "ZQ" not in first["exc_info"] + second["exc_info"] and "detail)" not in second["exc_info"]



@pytest.mark.parametrize("where", ["filter", "format"])
def test_rq_stopping_a_job_while_it_logs_a_line_stops_the_job(capsys, monkeypatch, where):
    # RQ's time limit is SIGALRM raising JobTimeoutException wherever the job is, a log line among
    # those places (its message read by the filter, its formatting, its write to stderr). Taken for
    # the line's own failure (the filter's fallback, logging's handleError), it was swallowed and the
    # job went on, with no limit left at all.
    from rq.timeouts import JobTimeoutException

    def interrupted(*args, **kwargs):
        raise JobTimeoutException("Task exceeded maximum timeout value (1 seconds)")

    # Our handler alone: pytest's own capture handler would fail the line itself.
    monkeypatch.setattr(logging.getLogger(), "handlers", [logs.make_handler("json")])
    if where == "filter":
        monkeypatch.setattr(logging.LogRecord, "getMessage", interrupted)
    else:
        monkeypatch.setattr(logs.JsonFormatter, "format", interrupted)
    with pytest.raises(JobTimeoutException):
        logging.getLogger("notifier.jobs").warning("notification %s attempt %s failed", "n-1", 1)
    monkeypatch.undo()
    assert "Logging error" not in capsys.readouterr().err


def test_what_a_server_quotes_of_a_subject_or_line_naming_an_address_is_masked_too(captured):
    # "Not an address" was read as "holding no @": a subject or a line of the body that names an
    # address ("Invoice 2291 for ann@example.com is overdue") was never looked for, and a refusal
    # quoting it logged all of it but the address. A bare address is still left to the address
    # pattern (and to the recipient's own masks).
    with logs.concealing():
        logs.conceal_recipient("ann@example.com")
        logs.conceal_content(["Invoice 2291 for ann@example.com is overdue", "Questions? Write to help@acme.example",
                              "bob@example.com"])
        logs.conceal_recipient("bob@example.com")  # a later recipient of the same shared job
        logging.getLogger("notifier.jobs").warning(
            "notification %s failed: %s", "n-1",
            "554 5.7.1 'INVOICE 2291 FOR ANN@EXAMPLE.COM IS OVERDUE' refused; "
            "'Questions? Write to help@acme.example'; <bob=example.com@relay.example>")
        logs.conceal_content(["Your statement"])
        logging.getLogger("notifier.jobs").warning("550 %s", "<bob=example.com@relay.example>")

    first, second = (json.loads(line)["message"] for line in captured())
    assert first == ("notification n-1 failed: 554 5.7.1 '[content]' refused; '[content]'; "
                     "<b***@relay.example>")
    assert "nvoice" not in first and "Questions" not in first
    assert second == "550 <b***@relay.example>"  # the recipient's masks outlive the content's


@pytest.mark.parametrize("line, redacted", [
    ("Authorization: Basic b3BzOnB3ZA==", "Authorization: Basic [redacted]"),
    ("Authorization: b3BzOnB3ZA==", "Authorization: [redacted]"),
    # A scheme of the caller's own: only the scheme's name was masked, the credentials left whole.
    ("Authorization: ApiKey ZQ-s3cr3t", "Authorization: ApiKey [redacted]"),
    ("'authorization': 'Token-v2 ZQ-s3cr3t'", "'authorization': 'Token-v2 [redacted]'"),
    # The header as WSGI names it ("\bauthorization" never matched after HTTP_).
    ("{'HTTP_AUTHORIZATION': 'Basic b3BzOnB3ZA=='}", "{'HTTP_AUTHORIZATION': 'Basic [redacted]'}"),
    ("authorization failed for user 7", "authorization failed for user 7"),
    # gunicorn's refusal of a header line without its colon quotes the line: only Basic, Bearer,
    # Digest, Token and Negotiate were known there, so another scheme's credentials, or credentials
    # with no scheme, were logged whole.
    ("Invalid HTTP Header: 'Authorization ApiKey ZQ-s3cr3t'", "Invalid HTTP Header: 'Authorization ApiKey [redacted]'"),
    ("Invalid HTTP Header: 'Authorization ZQ-s3cr3t'", "Invalid HTTP Header: 'Authorization [redacted]'"),
    ("Invalid HTTP header name: 'authorization  ApiKey ZQ-s3cr3t'",
     "Invalid HTTP header name: 'authorization  ApiKey [redacted]'"),
    ("Invalid HTTP Header: 'Proxy-Authorization ApiKey ZQ-s3cr3t'",
     "Invalid HTTP Header: 'Proxy-Authorization ApiKey [redacted]'"),
    ("the 'Authorization' header is missing", "the 'Authorization' header is missing"),
    # A tab between them, as gunicorn's repr() of the refused line writes it (a backslash, then "t").
    ("Invalid HTTP Header: 'Authorization\\tBasic b3BzOnB3ZA=='",
     "Invalid HTTP Header: 'Authorization\\tBasic [redacted]'"),
    ("Invalid HTTP Header: 'Authorization\\tZQ-s3cr3t'", "Invalid HTTP Header: 'Authorization\\t[redacted]'"),
    # Digest's credentials are a list of parameters: only the first was masked, the response logged.
    ('Authorization: Digest username="ops", realm="x, y", nonce="abc", response="6629fae4" (stale)',
     "Authorization: Digest [redacted] (stale)"),
    ("Authorization: Digest username=ops,response=6629fae4", "Authorization: Digest [redacted]"),
    # RFC 7616's extended username, blanks around "=", and quotes escaped (as JSON writes them).
    ("Authorization: Digest realm=\"x\", username*=UTF-8''J%C3%A4s, response=\"6629fae4\"",
     "Authorization: Digest [redacted]"),
    ('Authorization: Digest username = "ops", response = "6629fae4"', "Authorization: Digest [redacted]"),
    ('{"h": "Authorization: Digest username=\\"ops\\", response=\\"6629fae4\\""}',
     '{"h": "Authorization: Digest [redacted]"}'),
    ("[(b'authorization', b'Basic b3BzOnB3ZA==')]", "[(b'authorization', b'Basic [redacted]')]"),
    # A request's headers as pairs in a repr: the name's quote and a comma stood before the credentials.
    ('headers=[("Authorization", "Basic b3BzOnB3ZA=="), ("Host", "x")]',
     'headers=[("Authorization", "Basic [redacted]"), ("Host", "x")]'),
    ("[('Proxy-Authorization', 'ZQ-s3cr3t')]", "[('Proxy-Authorization', '[redacted]')]"),
    ('the "authorization", then the rest', 'the "authorization", then the rest'),
])
def test_an_authorization_headers_credentials_are_masked_whatever_its_scheme(line, redacted):
    assert logs.redact(line) == redacted
