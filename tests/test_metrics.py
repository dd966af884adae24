"""Prometheus metrics at /metrics: kept in Redis, so every API and worker process counts into one total."""

from __future__ import annotations

import signal
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace

import pytest
from rq import Queue
from rq.exceptions import StopRequested
from rq.timeouts import JobTimeoutException

from notifier import metrics, queues
from notifier.jobs import Deliverer
from notifier.mail import SmtpMailer
from notifier.models import Status, utcnow
from notifier.queues import QUEUES_BY_PRIORITY, connect_redis
from notifier.reconciler import reconcile
from notifier.runtime import make_renderer
from tests.helpers import (
    LITERAL,
    VERIFICATION,
    eventually,
    installed_deliverer,
    make_notification,
    reload,
    run_worker_until_idle,
)
from tests.operators import (
    CHALLENGE,
    OPERATOR,
    collect_metrics,
    operator_client,
    scrape,
    scrape_url,
    total,
    value,
    with_operator,
)
from tests.processes import Stack, free_port, request, spawn, stop, wait_for_http

SEND = "/api/notifications/send"
VERIFY = "/api/notifications/send-verification"


@pytest.fixture
def ops(pg_settings, pg_db, redis_conn):
    """A client of the API with the test operator configured."""
    return operator_client(pg_settings, redis_conn)


def _accept(client, headers, path=SEND, payload=LITERAL) -> str:
    response = client.post(path, json=payload, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


def _work(settings, redis_conn) -> None:
    """Run an in-process worker whose deliverer has Redis, so it counts what it does."""
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)


def test_metrics_without_operator_credentials_are_401(ops, api_key):
    for kwargs in ({}, {"auth": (OPERATOR[0], "wrong")}, {"headers": {"X-API-Key": api_key[1]}}):
        response = ops.get("/metrics", **kwargs)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        assert response.get_json()["error"]["code"] == "unauthorized"


def test_metrics_are_closed_when_no_operator_is_configured(client):
    assert client.get("/metrics", auth=OPERATOR).status_code == 401


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=abc", "text/plain; version=1.x"])
def test_an_accept_header_naming_a_version_nobody_can_read_gets_the_plain_text_format(ops, accept):
    # prometheus_client compared the unreadable version with a number: a TypeError, a 500.
    response = ops.get("/metrics", auth=OPERATOR, headers={"Accept": accept})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "notifier_notifications_accepted_total" in response.get_data(as_text=True)


def test_a_known_run_is_counted_exactly(ops, headers, pg_settings, redis_conn, smtp):
    # The high-priority verification is sent first and gets the scripted 550; the two literal sends pass.
    smtp.replies.append("550 5.7.1 message rejected by policy")
    refused = _accept(ops, headers, VERIFY, VERIFICATION)
    delivered = [_accept(ops, headers), _accept(ops, headers)]
    _work(pg_settings, redis_conn)
    assert reload(refused).status == Status.FAILED
    assert {reload(n).status for n in delivered} == {Status.SENT}

    samples = scrape(ops)
    assert value(samples, "notifier_notifications_accepted_total", priority="high", template="verification") == 1
    assert value(samples, "notifier_notifications_accepted_total", priority="default", template="-") == 2
    assert total(samples, "notifier_notifications_accepted_total") == 3
    assert total(samples, "notifier_notifications_sent_total") == 2
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 2
    assert total(samples, "notifier_notifications_failed_total") == 1
    assert value(samples, "notifier_notifications_failed_total", priority="high", template="verification") == 1
    assert total(samples, "notifier_notifications_retried_total") == 0
    assert total(samples, "notifier_notifications_expired_total") == 0
    assert value(samples, "notifier_delivery_seconds_count", priority="default") == 2
    assert value(samples, "notifier_delivery_seconds_count", priority="high") == 0
    assert value(samples, "notifier_delivery_seconds_bucket", priority="default", le="+Inf") == 2
    assert 0 < value(samples, "notifier_delivery_seconds_sum", priority="default") < 60
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 2
    assert value(samples, "notifier_smtp_replies_total", **{"class": "5xx"}) == 1
    assert value(samples, "notifier_smtp_replies_total", **{"class": "4xx"}) == 0
    assert value(samples, "notifier_dead_letters") == 1
    assert all(value(samples, "notifier_queue_depth", queue=name) == 0 for name in QUEUES_BY_PRIORITY)


def test_queue_depth_is_what_waits_in_each_queue(ops, headers, redis_conn):
    for _ in range(2):
        _accept(ops, headers, VERIFY, VERIFICATION)
    _accept(ops, headers)
    _accept(ops, headers, payload={**LITERAL, "priority": "low"})

    samples = scrape(ops)
    expected = {"notifier.high": 2, "notifier.default": 1, "notifier.low": 1, "notifier.callbacks": 0}
    assert {name: value(samples, "notifier_queue_depth", queue=name) for name in QUEUES_BY_PRIORITY} == expected
    assert {name: Queue(name, connection=redis_conn).count for name in QUEUES_BY_PRIORITY} == expected
    assert total(samples, "notifier_notifications_accepted_total") == 4
    assert total(samples, "notifier_notifications_sent_total") == 0


def test_a_transient_failure_counts_a_retry_and_its_4xx(ops, headers, pg_settings, redis_conn, smtp):
    smtp.replies.append("451 4.3.0 try again later")
    notification_id = _accept(ops, headers)
    _work(pg_settings, redis_conn)
    assert reload(notification_id).status == Status.SENT

    samples = scrape(ops)
    assert value(samples, "notifier_notifications_retried_total", priority="default", template="-") == 1
    assert total(samples, "notifier_notifications_sent_total") == 1
    assert total(samples, "notifier_notifications_failed_total") == 0
    assert value(samples, "notifier_smtp_replies_total", **{"class": "4xx"}) == 1
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 1


def test_a_notification_past_its_deadline_counts_as_expired(ops, api_key, pg_settings, redis_conn, smtp):
    late = make_notification(api_key[0], expires_at=utcnow() - timedelta(seconds=1), priority="low")
    queues.enqueue_delivery(redis_conn, pg_settings, late.id, "low")
    _work(pg_settings, redis_conn)
    assert reload(late.id).status == Status.EXPIRED

    # One the reconciler's pass finds past its deadline before any worker does counts the same way.
    waiting = make_notification(api_key[0], expires_at=utcnow() - timedelta(seconds=1), priority="low")
    assert reconcile(pg_settings, redis_conn).expired == 1
    assert reload(waiting.id).status == Status.EXPIRED

    samples = scrape(ops)
    assert value(samples, "notifier_notifications_expired_total", priority="low", template="-") == 2
    assert total(samples, "notifier_notifications_sent_total") == 0
    assert smtp.count() == 0
    # And its help says so: "a worker found" was left behind when the reconciler's expiries joined it.
    text = ops.get("/metrics", auth=OPERATOR).get_data(as_text=True)
    (help_line,) = [line for line in text.splitlines()
                    if line.startswith("# HELP notifier_notifications_expired_total")]
    assert "reconciler" in help_line


def test_replays_are_not_counted_as_accepted(ops, headers):
    payload = {**LITERAL, "idempotency_key": "order-42"}
    first, again = _accept(ops, headers, payload=payload), _accept(ops, headers, payload=payload)
    assert first == again

    assert total(scrape(ops), "notifier_notifications_accepted_total") == 1


def test_a_batch_counts_each_notification_it_accepted_and_only_those(ops, headers):
    items = [{**LITERAL, "to": f"user{n}@example.com"} for n in range(3)] + [{"to": "nope"}]
    items.append({**LITERAL, "to": "vip@example.com", "priority": "high"})
    response = ops.post("/api/notifications/batch", json={"notifications": items}, headers=headers)
    assert response.status_code == 202 and response.get_json()["accepted"] == 4

    samples = scrape(ops)
    assert value(samples, "notifier_notifications_accepted_total", priority="default", template="-") == 3
    assert value(samples, "notifier_notifications_accepted_total", priority="high", template="-") == 1
    assert total(samples, "notifier_notifications_accepted_total") == 4


def test_delivery_goes_on_when_metrics_cannot_be_written(api_key, pg_settings, redis_conn, smtp):
    # Nothing listens on port 1: every metric write fails, and the email is sent and recorded all the same.
    notification = make_notification(api_key[0])
    mailer = SmtpMailer(pg_settings)
    deliverer = Deliverer(pg_settings, mailer, make_renderer(pg_settings), connect_redis("redis://127.0.0.1:1/0"))
    try:
        assert deliverer.deliver(notification.id) == "sent"
    finally:
        mailer.close()
    assert reload(notification.id).status == Status.SENT
    assert smtp.count() == 1


def test_histogram_buckets_are_cumulative(fake_redis):
    def sent_ago(seconds: float, priority: str = "default"):
        notification = SimpleNamespace(priority=priority, template=None,
                                       created_at=utcnow() - timedelta(seconds=seconds))
        metrics.sent(fake_redis, notification, 250)

    for seconds in (0.3, 0.3, 7, 5000):
        sent_ago(seconds)
    sent_ago(0.3, "high")

    samples = collect_metrics(fake_redis)
    bucket = {le: value(samples, "notifier_delivery_seconds_bucket", priority="default", le=le)
              for le in ("0.25", "0.5", "5.0", "10.0", "3600.0", "+Inf")}
    assert bucket == {"0.25": 0, "0.5": 2, "5.0": 2, "10.0": 3, "3600.0": 3, "+Inf": 4}
    assert value(samples, "notifier_delivery_seconds_count", priority="default") == 4
    assert value(samples, "notifier_delivery_seconds_sum", priority="default") == pytest.approx(5007.6, abs=1)
    assert value(samples, "notifier_delivery_seconds_count", priority="high") == 1
    assert value(samples, "notifier_smtp_replies_total", **{"class": "2xx"}) == 5


def test_reply_classes():
    assert [metrics.reply_class(code) for code in (250, 451, 550, None, 0, 999)] == [
        "2xx", "4xx", "5xx", "none", "none", "none"]


def test_fields_no_version_writes_are_left_out_of_the_scrape(fake_redis, caplog):
    metrics.sent(fake_redis, SimpleNamespace(priority="default", template=None, created_at=utcnow()), 250)
    metrics.reconciled(fake_redis, {"recovered": 2})
    for metric in ("notifier_notifications_sent_total", "notifier_reconciler_actions_total",
                   "notifier_delivery_seconds:buckets", "notifier_delivery_seconds:sum", "notifier_smtp_replies_total"):
        fake_redis.hset(f"notifier:metrics:{metric}", mapping={"[]": 1, "not json": 1, '"recovered"': 1, "[1]": 1,
                                                               '["high","welcome"]': "x", '["a","b","c"]': 1})
    fake_redis.hset("notifier:metrics:notifier_delivery_seconds:buckets", mapping={'["default"]': 1,
                                                                                   '["default","abc"]': 1})
    samples = collect_metrics(fake_redis)  # one odd field (a hand edit, corruption) must not fail it
    assert value(samples, "notifier_notifications_sent_total", priority="default", template="-") == 1
    assert value(samples, "notifier_reconciler_actions_total", action="recovered") == 2
    assert total(samples, "notifier_reconciler_actions_total") == 2
    assert total(samples, "notifier_notifications_sent_total") == 1
    assert value(samples, "notifier_delivery_seconds_count", priority="default") == 1
    assert "not understood" in caplog.text


@pytest.mark.parametrize("stop", [JobTimeoutException, StopRequested])
def test_rq_stopping_a_job_passes_through_a_metrics_write(fake_redis, stop):
    # A write's failure is dropped so that counting never fails a delivery; RQ's time limit or stop
    # landing in one is not a failure of counting, and swallowed the job would run on without a limit.
    def build(pipe):
        raise stop("JOB_TIMEOUT ran out")

    with pytest.raises(stop):
        metrics._write(fake_redis, build)


def test_writes_without_redis_do_nothing():
    metrics.expired(None, SimpleNamespace(priority="high", template="welcome"))


@pytest.mark.integration
def test_every_api_process_scrapes_the_same_totals(pg_settings, pg_db, redis_conn, smtp, tmp_path):
    settings = with_operator(replace(pg_settings, retry_intervals=(1, 1)))
    stack = Stack(settings, tmp_path, OPERATOR_USERNAME=OPERATOR[0], OPERATOR_PASSWORD=OPERATOR[1])
    second = None
    try:
        stack.start("api")
        port = free_port()
        second_base = f"http://127.0.0.1:{port}"
        second = spawn(["app.py"], {**stack.env, "PORT": str(port)}, str(tmp_path / "api2.log"))
        wait_for_http(f"{second_base}/api/health")

        # Accepted by two processes, sent by a third; the SMTP server refuses the first message it gets.
        smtp.replies.append("550 5.7.1 message rejected by policy")
        ids = [stack.send(LITERAL) for _ in range(2)]
        for _ in range(2):
            status, body = request("POST", f"{second_base}{SEND}", stack.key, LITERAL)
            assert status == 202, body
            ids.append(body["id"])
        stack.start("worker")
        outcomes = sorted(stack.wait_status(n, "sent", "failed")["status"] for n in ids)
        assert outcomes == ["failed", "sent", "sent", "sent"]

        # A worker sends its counts with the heartbeat right after each job: a moment after the status.
        assert eventually(lambda: total(scrape_url(stack.base), "notifier_notifications_sent_total") == 3)
        one, two = scrape_url(stack.base), scrape_url(second_base)
        assert one == two
        assert total(one, "notifier_notifications_accepted_total") == 4
        assert total(one, "notifier_notifications_sent_total") == 3
        assert total(one, "notifier_notifications_failed_total") == 1
        assert value(one, "notifier_delivery_seconds_count", priority="default") == 3
        assert value(one, "notifier_smtp_replies_total", **{"class": "5xx"}) == 1
        assert value(one, "notifier_dead_letters") == 1
    finally:
        if second is not None:
            stop(second, signal.SIGKILL)
        stack.close()


def test_a_workers_counts_ride_its_next_heartbeat(redis_conn):
    from worker import make_worker

    counts = metrics.Deferred(redis_conn)
    worker = make_worker(redis_conn, name="counting", counts=counts)
    counts.add(lambda pipe: pipe.hincrby("test:counted", "n", 2))
    assert redis_conn.hget("test:counted", "n") is None  # kept until the worker next talks to Redis

    worker.heartbeat()

    assert redis_conn.hget("test:counted", "n") == b"2"
    assert redis_conn.hget(worker.key, "last_heartbeat")  # and the heartbeat itself went too
    assert redis_conn.ttl(worker.key) > 0


def test_a_count_that_fails_never_fails_the_heartbeat(redis_conn):
    from worker import make_worker

    redis_conn.set("test:not-a-hash", "x")
    counts = metrics.Deferred(redis_conn)
    worker = make_worker(redis_conn, name="counting", counts=counts)
    counts.add(lambda pipe: pipe.hincrby("test:not-a-hash", "n", 1))  # WRONGTYPE
    counts.add(lambda pipe: pipe.hincrby("test:counted", "n", 1))

    worker.heartbeat()

    assert redis_conn.hget("test:counted", "n") == b"1"
    assert redis_conn.hget(worker.key, "last_heartbeat")


def test_a_stop_signal_while_counting_still_stops_the_worker(redis_conn):
    from rq.exceptions import StopRequested

    from worker import make_worker

    def stop_arrives(pipe):
        raise StopRequested()  # what RQ's SIGTERM handler raises, wherever the worker is

    counts = metrics.Deferred(redis_conn)
    worker = make_worker(redis_conn, name="stopping", counts=counts)
    counts.add(stop_arrives)
    with pytest.raises(StopRequested):
        worker.heartbeat()


def test_a_stop_that_was_swallowed_takes_effect_at_the_next_heartbeat(redis_conn):
    from rq.exceptions import StopRequested

    from worker import make_worker

    worker = make_worker(redis_conn, name="stopping")
    worker.heartbeat()  # not asked to stop: an ordinary heartbeat
    worker.stopping = True  # asked, but the StopRequested RQ raised was caught somewhere
    with pytest.raises(StopRequested):
        worker.heartbeat()


def test_a_worker_that_outlives_a_redis_restart_registers_again(redis_conn):
    # Redis restarted empty (no persistence) while the worker waited in its dequeue loop: RQ's
    # registry of workers was gone, and the reconciler, which reads live workers there, took every
    # job the worker then ran for a lost one; a send slower than SENDING_TIMEOUT was recovered and
    # sent a second time while the first was still in flight. The next heartbeat puts it back.
    from rq import Worker

    from notifier.reconciler import _running
    from worker import make_worker

    worker = make_worker(redis_conn, name="survivor")
    worker.register_birth()
    redis_conn.flushdb()  # what a restart without persistence leaves

    worker.heartbeat()

    assert redis_conn.sismember(Worker.redis_workers_keys, worker.key)
    assert redis_conn.hget(worker.key, "birth") and redis_conn.hget(worker.key, "pid")
    assert redis_conn.ttl(worker.key) > 0
    # A job it now starts is seen running by the reconciler, so its send is left to it.
    _, executions = queues.worker_keys(worker.name)
    redis_conn.sadd(executions, "notification-x:execution-1")
    names = [key.decode().removeprefix(Worker.redis_worker_namespace_prefix)
             for key in redis_conn.smembers(Worker.redis_workers_keys)]
    assert "notification-x" in _running(redis_conn, names)


def test_a_worker_never_born_or_stopping_is_not_registered_by_its_heartbeat(redis_conn):
    from rq import Worker

    from worker import make_worker

    bare = make_worker(redis_conn, name="bare")
    bare.heartbeat()
    stopping = make_worker(redis_conn, name="stopping")
    stopping.register_birth()
    redis_conn.flushdb()
    stopping._stop_requested = True
    stopping.heartbeat()

    assert not redis_conn.smembers(Worker.redis_workers_keys)
