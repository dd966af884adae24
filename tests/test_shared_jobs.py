"""A batch's notifications travel BATCH_JOB_SIZE to a job: delivered one by one as deliver() does, and
each one that fails, or that its lost job never reached, goes on alone without being sent twice."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace

import pytest
from peewee import OperationalError
from rq import Queue, get_current_job
from rq.job import Job

from notifier import consent, deadletters, jobs, logs, queues, receipts
from notifier.db import database
from notifier.models import Event, Notification
from notifier.reconciler import reconcile
from tests.helpers import (
    LITERAL,
    drop_connections,
    held_reply,
    installed_deliverer,
    run_worker_until_idle,
)
from tests.operators import collect_metrics, total
from tests.processes import expire_killed_worker, request

pytestmark = pytest.mark.integration

BATCH = "/api/notifications/batch"


def _items(count: int, **extra) -> list[dict]:
    return [{**LITERAL, "to": f"user{n}@example.com", **extra} for n in range(count)]


def _rows() -> list[Notification]:
    with database.connection_context():
        return list(Notification.select().order_by(Notification.seq))


def _recipients(smtp) -> list[str]:
    return sorted(m.rcpt_tos[0] for m in smtp.messages)


@pytest.fixture
def chunked(pg_settings, pg_db, redis_conn):
    """The API with jobs of 4 notifications, and a deliverer that can queue follow-up jobs."""
    from app import create_app

    settings = replace(pg_settings, batch_job_size=4, retry_intervals=(0, 0, 0))
    app = create_app(settings, redis=redis_conn)
    app.config["TESTING"] = True
    with installed_deliverer(settings, redis_conn) as deliverer:
        yield settings, app.test_client(), deliverer


def _post(client, headers, items) -> list[str]:
    response = client.post(BATCH, json={"notifications": items}, headers=headers)
    assert response.status_code == 202, response.get_json()
    return [r["id"] for r in response.get_json()["results"]]


def test_a_batch_goes_in_jobs_of_batch_job_size_per_priority_and_each_is_sent_once(chunked, headers, redis_conn,
                                                                                    smtp):
    _, client, _ = chunked
    ids = _post(client, headers, _items(9) + _items(2, priority="high"))
    default, high = (Queue(queues.QUEUE_NAMES[p], connection=redis_conn) for p in ("default", "high"))
    assert (default.count, high.count) == (3, 1)  # 9 -> 4 + 4 + 1; 2 high -> one job of their own priority
    rows = _rows()
    by_job: dict[str, list[str]] = {}
    for row in rows:
        by_job.setdefault(row.job_id, []).append(row.id)
    assert sorted(len(members) for members in by_job.values()) == [1, 2, 4, 4]
    for job_id, members in by_job.items():
        assert Job.fetch(job_id, connection=redis_conn).args == (members,)

    run_worker_until_idle(redis_conn)
    smtp.wait_for(11)
    assert _recipients(smtp) == sorted([f"user{n}@example.com" for n in range(9)] + ["user0@example.com",
                                                                                    "user1@example.com"])
    assert {row.status for row in _rows()} == {"sent"}
    assert len({m.message["X-Notification-ID"] for m in smtp.messages}) == len(ids) == 11


def test_one_that_fails_for_now_retries_in_a_job_of_its_own(chunked, headers, redis_conn, smtp):
    _, client, _ = chunked
    smtp.replies.append("451 4.3.0 try again later")  # the first of the job fails once
    ids = _post(client, headers, _items(4))
    run_worker_until_idle(redis_conn)  # the shared job, then the retry (due at once: interval 0)
    smtp.wait_for(4)
    rows = {row.id: row for row in _rows()}
    assert {row.status for row in rows.values()} == {"sent"}
    retried = rows[ids[0]]
    assert retried.attempts == 2 and retried.job_id is None
    assert [r.attempts for i, r in rows.items() if i != ids[0]] == [1, 1, 1]
    assert _recipients(smtp) == [f"user{n}@example.com" for n in range(4)]


def test_one_that_fails_for_good_lands_in_the_dead_letter_queue_and_the_rest_go(chunked, headers, redis_conn, smtp):
    settings, client, _ = chunked
    smtp.replies.append("550 5.7.1 message rejected by policy")  # the first of the job
    ids = _post(client, headers, _items(4))
    run_worker_until_idle(redis_conn)
    smtp.wait_for(3)
    statuses = {row.id: row.status for row in _rows()}
    assert [statuses[i] for i in ids] == ["failed", "sent", "sent", "sent"]
    failed = queues.queue_for("default", redis_conn).failed_job_registry
    assert failed.get_job_ids() == [queues.job_id_for(ids[0])]
    assert "550" in Job.fetch(queues.job_id_for(ids[0]), connection=redis_conn).latest_result().exc_string
    with database.connection_context():
        [entry], _ = deadletters.list_dead(redis_conn)
        assert entry.id == ids[0] and entry.in_failed_registry and "rejected by policy" in entry.reason
        # Requeued from the dead-letter queue, it goes alone and is sent.
        deadletters.requeue(redis_conn, settings, ids[0])
    run_worker_until_idle(redis_conn)
    smtp.wait_for(4)
    assert {row.status for row in _rows()} == {"sent"}
    assert failed.get_job_ids() == []


def test_the_reconciler_hands_on_each_notification_of_a_lost_shared_job_alone(chunked, headers, redis_conn, smtp):
    settings, client, _ = chunked
    ids = _post(client, headers, _items(6))
    redis_conn.flushdb()  # the shared jobs are gone
    with database.connection_context():
        report = reconcile(replace(settings, reconcile_grace_seconds=0), redis_conn)
    assert report.requeued == 6
    assert {row.job_id for row in _rows()} == {None}
    assert queues.queue_for("default", redis_conn).count == 6
    with database.connection_context():
        # A second pass finds each one's own job and queues nothing more.
        assert reconcile(replace(settings, reconcile_grace_seconds=0), redis_conn).requeued == 0
    run_worker_until_idle(redis_conn)
    smtp.wait_for(6)
    assert _recipients(smtp) == [f"user{n}@example.com" for n in range(6)]
    with database.connection_context():
        reasons = [e.reason for e in Event.select().where(Event.reason.contains("re-enqueued"))]
    assert len(reasons) == len(ids)


def test_a_shared_job_that_already_ran_sends_nothing_twice(chunked, headers, redis_conn, smtp):
    _, client, _ = chunked
    ids = _post(client, headers, _items(3))
    run_worker_until_idle(redis_conn)
    smtp.wait_for(3)
    assert jobs.deliver_many(ids) == {"skipped": 3}
    assert len(smtp.messages) == 3


def test_a_worker_killed_inside_a_shared_job_loses_nothing_and_sends_each_at_most_once_more(stacks, pg_settings,
                                                                                            smtp, redis_conn):
    settings = replace(pg_settings, retry_intervals=(1, 1, 1))
    stack = stacks(settings, BATCH_JOB_SIZE=10, RECONCILE_INTERVAL=1, RECONCILE_GRACE_SECONDS=1,
                   SENDING_TIMEOUT=2).start("api", "worker", "scheduler")
    mid_data, killed = held_reply(smtp, 2)
    status, body = request("POST", f"{stack.base}{BATCH}", stack.key, {"notifications": _items(10)})
    assert status == 202, body
    ids = [r["id"] for r in body["results"]]
    assert mid_data.wait(30)
    stack.wait_status(ids[0], "sent", timeout=20)
    worker = stack.procs["worker"].pid
    stack.stop("worker", signal.SIGKILL)  # one sent, one mid-DATA, the rest not reached
    killed.set()
    expire_killed_worker(redis_conn, worker)
    stack.start("worker2")
    for notification_id in ids:
        stack.wait_status(notification_id, "sent", timeout=40)
    received = _recipients(smtp)
    # Every one arrived, and none twice: the one cut off mid-DATA was never taken by the server.
    assert received == sorted(f"user{n}@example.com" for n in range(10))


def test_a_shared_job_slower_than_sending_timeout_sends_each_of_its_emails_once(stacks, pg_settings, smtp):
    # Each answer to DATA takes longer than SENDING_TIMEOUT, and the shared job as a whole much longer:
    # the reconciler hands the members it has not reached on alone, and must not take back the one
    # its live worker is sending, whichever job it was handed to.
    settings = replace(pg_settings, retry_intervals=(1, 1, 1))
    stack = stacks(settings, RECONCILE_INTERVAL=1, RECONCILE_GRACE_SECONDS=1,
                   SENDING_TIMEOUT=2).start("api", "worker", "worker2", "scheduler")  # one free for the reconciler
    smtp.delay = 3.0
    status, body = request("POST", f"{stack.base}{BATCH}", stack.key, {"notifications": _items(3)})
    assert status == 202, body
    ids = [r["id"] for r in body["results"]]
    details = [stack.wait_status(notification_id, "sent", "failed", timeout=90) for notification_id in ids]
    time.sleep(3)  # passes enough to recover one and send it again, had one been taken back
    details = [stack.get(notification_id) for notification_id in ids]
    assert _recipients(smtp) == [f"user{n}@example.com" for n in range(3)]
    assert [(d["status"], d["attempts"]) for d in details] == [("sent", 1)] * 3
    assert not any((e["reason"] or "").startswith("recovered:") for d in details for e in d["history"])


def test_a_claim_names_the_shared_job_that_made_it_even_for_one_handed_on_alone(chunked, headers, redis_conn, smtp):
    _, client, _ = chunked
    ids = _post(client, headers, _items(2))
    [shared_job] = queues.queue_for("default", redis_conn).get_job_ids()
    with database.connection_context():  # handed on alone by the reconciler while the job ran slowly
        Notification.update(job_id=None).where(Notification.id == ids[1]).execute()
    run_worker_until_idle(redis_conn)  # the shared job reaches it first all the same
    smtp.wait_for(2)
    # The reconciler asks Redis about the job that is sending a notification, not the one it was handed to.
    assert [(row.status, row.job_id) for row in _rows()] == [("sent", shared_job)] * 2


@pytest.mark.parametrize("make_way_check", [3600.0, 0.0],
                         ids=["written-with-the-next-claim", "written-before-make-way"])
def test_a_failure_after_one_is_recorded_never_strands_the_next_claimed_one(chunked, headers, redis_conn, smtp,
                                                                          monkeypatch, make_way_check):
    # The held `sent` record is written with the next claim, or alone before the job asks Redis
    # whether to make way (every MAKE_WAY_CHECK_SECONDS): either way what follows it must go on.
    monkeypatch.setattr(jobs, "MAKE_WAY_CHECK_SECONDS", make_way_check)
    _, client, deliverer = chunked
    ids = _post(client, headers, _items(3, callback_url="http://127.0.0.1:9/hook"))
    real, calls = deliverer.after_final, []

    def flaky(notification_id):  # the database blips while the first email's callback is queued
        calls.append(notification_id)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real(notification_id)

    monkeypatch.setattr(deliverer, "after_final", flaky)
    run_worker_until_idle(redis_conn)
    smtp.wait_for(3)
    assert {row.status for row in _rows()} == {"sent"}
    assert _recipients(smtp) == [f"user{n}@example.com" for n in range(3)]
    assert {row.callback_status for row in _rows()} == {"pending"}  # owed; the reconciler queues the lost one
    assert calls[0] == ids[0]


def test_a_shared_job_makes_way_for_more_urgent_work_and_its_rest_follows(chunked, headers, redis_conn, smtp):
    _, client, _ = chunked
    ids = _post(client, headers, _items(4, priority="low"))
    low = queues.queue_for("low", redis_conn)
    [shared_job] = low.get_job_ids()
    low.empty()  # this test runs the shared job itself, as a worker would
    urgent = client.post("/api/notifications/send", json={**LITERAL, "to": "urgent@example.com", "priority": "high"},
                         headers=headers).get_json()["id"]
    smtp.delay = 0.02  # each send outlasts the 10 ms between looks at the higher queues

    assert jobs.deliver_many(ids) == {"sent": 1, "made way": 3}
    rows = {row.id: row for row in _rows()}
    [rest_job] = low.get_job_ids()
    assert rest_job != shared_job and Job.fetch(rest_job, connection=redis_conn).args == (ids[1:],)
    assert {rows[i].job_id for i in ids[1:]} == {rest_job}
    smtp.delay = 0.0

    run_worker_until_idle(redis_conn)
    smtp.wait_for(5)
    order = [m.rcpt_tos[0] for m in smtp.messages]
    assert order[:2] == ["user0@example.com", "urgent@example.com"]  # the urgent one went next
    assert sorted(order[2:]) == ["user1@example.com", "user2@example.com", "user3@example.com"]
    assert {row.status for row in _rows()} == {"sent"} and urgent in {row.id for row in _rows()}


def test_an_address_that_bounces_is_not_tried_again_later_in_the_same_job(chunked, headers, redis_conn, smtp):
    _, client, _ = chunked
    same = {**LITERAL, "to": "gone@example.com"}
    smtp.rcpt_replies.append("550 5.1.1 mailbox unavailable")
    ids = _post(client, headers, [same, _items(1)[0], same])
    run_worker_until_idle(redis_conn)
    smtp.wait_for(1)
    statuses = {row.id: row.status for row in _rows()}
    assert [statuses[i] for i in ids] == ["failed", "sent", "suppressed"]
    assert _recipients(smtp) == ["user0@example.com"]


def test_an_unsubscribe_while_a_shared_job_runs_stops_its_later_emails(chunked, headers, api_key, redis_conn, smtp,
                                                                       monkeypatch):
    _, client, deliverer = chunked
    deliverer.consent_max_age = 0  # what a job past CONSENT_MAX_AGE_SECONDS does before each email
    news = {**LITERAL, "category": "marketing", "user_id": "u-1", "to": "u1@example.com"}
    ids = _post(client, headers, [news, news, _items(1, category="marketing")[0]])

    # The recipient unsubscribes while the first email is with the mail server (the test server's
    # DATA handler, wrapped: nothing of notifier's is replaced).
    original = smtp.handle_DATA

    async def unsubscribe_during_the_first(server, session, envelope):
        if smtp.count() == 0:
            with database.connection_context():
                consent.set_mode(api_key[0], consent.user_key_for("u-1", "u1@example.com"), "marketing", "off")
        return await original(server, session, envelope)

    monkeypatch.setattr(smtp, "handle_DATA", unsubscribe_during_the_first)
    run_worker_until_idle(redis_conn)
    statuses = {row.id: row.status for row in _rows()}
    assert [statuses[i] for i in ids] == ["sent", "suppressed", "sent"]
    assert _recipients(smtp) == ["u1@example.com", "user0@example.com"]


def test_postgresql_dropping_the_worker_mid_job_still_ends_the_job_well(chunked, headers, pg_settings, redis_conn,
                                                                          smtp, monkeypatch):
    _, client, _ = chunked
    ids = _post(client, headers, _items(3))
    original = smtp.handle_DATA

    async def restart_postgresql_during_the_first(server, session, envelope):
        if smtp.count() == 0:
            assert drop_connections(pg_settings.database_url.rsplit("/", 1)[1]) >= 1
        return await original(server, session, envelope)

    monkeypatch.setattr(smtp, "handle_DATA", restart_postgresql_during_the_first)
    run_worker_until_idle(redis_conn)
    assert {row.id: row.status for row in _rows()} == dict.fromkeys(ids, "sent")
    assert _recipients(smtp) == ["user0@example.com", "user1@example.com", "user2@example.com"]
    # The job itself ended well: nothing in RQ's failed registry (it used to fail on leaving its
    # database context, after every email was sent and recorded).
    assert queues.queue_for("default", redis_conn).failed_job_registry.count == 0


def test_a_shared_job_that_meets_postgresql_away_ends_and_leaves_its_emails_to_the_reconciler(
        chunked, headers, redis_conn, smtp, capsys, database_outage):
    # A shared job has no RQ retry: failed on a database away (a restart, a failover), it sat in RQ's
    # failed registry, rq-dashboard's Failed list, for DEAD_LETTER_TTL_DAYS, though the reconciler sent
    # every email of it (found by a PostgreSQL chaos run).
    settings, client, _ = chunked
    ids = _post(client, headers, _items(3))
    begin, end = database_outage
    capsys.readouterr()
    begin()
    run_worker_until_idle(redis_conn)
    end()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert queues.queue_for("default", redis_conn).failed_job_registry.count == 0
    assert [line["level"] for line in lines if "a shared job stopped" in line["message"]] == ["ERROR"]
    assert smtp.count() == 0

    with database.connection_context():
        assert reconcile(replace(settings, reconcile_grace_seconds=0), redis_conn).requeued == 3
    run_worker_until_idle(redis_conn)
    assert {row.id: (row.status, row.attempts) for row in _rows()} == dict.fromkeys(ids, ("sent", 1))
    assert _recipients(smtp) == ["user0@example.com", "user1@example.com", "user2@example.com"]


def test_a_shared_job_records_each_sent_email_before_it_asks_redis_for_more_urgent_work(chunked, headers, redis_conn,
                                                                                      smtp, monkeypatch):
    # Redis may take up to its socket timeout to answer (frozen, failing over): a worker killed while
    # it waits, with the last email's `sent` record still held for the next claim, sent it again.
    _, client, _ = chunked
    ids = _post(client, headers, _items(3, priority="low"))
    queues.queue_for("low", redis_conn).empty()  # this test runs the shared job itself
    smtp.delay = 0.02  # each send outlasts the 10 ms between looks at the higher queues
    seen, ask = [], queues.waiting_above

    def looking(connection, priority):
        with database.connection_context():
            seen.append(sorted(row.status for row in Notification.select().where(Notification.id.in_(ids))))
        return ask(connection, priority)

    monkeypatch.setattr(queues, "waiting_above", looking)
    assert jobs.deliver_many(ids) == {"sent": 3}
    assert seen == [["queued", "queued", "sent"], ["queued", "sent", "sent"]]


def test_a_consent_re_read_that_fails_goes_on_with_what_is_held(chunked, headers, redis_conn, smtp, monkeypatch):
    _, client, deliverer = chunked
    deliverer.consent_max_age = 0
    ids = _post(client, headers, _items(3, category="marketing"))
    calls = []
    read = jobs._lookups_by_key

    def blip_on_the_first_re_read(rows):  # an injected fault: the database fails once, mid-job
        calls.append(len(rows))
        if len(calls) == 2:
            raise OperationalError("server closed the connection unexpectedly")
        return read(rows)

    monkeypatch.setattr(jobs, "_lookups_by_key", blip_on_the_first_re_read)
    run_worker_until_idle(redis_conn)
    assert calls == [3, 2, 1]  # at the start, the failed re-read, then again before the last email
    assert {row.id: row.status for row in _rows()} == dict.fromkeys(ids, "sent")
    assert queues.queue_for("default", redis_conn).failed_job_registry.count == 0


def test_each_sent_line_of_a_shared_job_names_its_notification(chunked, headers, redis_conn, smtp, capsys):
    _, client, _ = chunked
    ids = _post(client, headers, _items(3))
    logs.configure("INFO", "json")
    capsys.readouterr()
    run_worker_until_idle(redis_conn)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    sent = [line for line in lines if line["logger"] == "notifier.jobs" and " sent (attempt" in line["message"]]
    # The `sent` record of each email but the last is written with the next one's claim: its line
    # must still name its own notification, not the next one or none.
    assert [line.get("notification_id") for line in sent] == ids
    assert all(line["notification_id"] in line["message"] for line in sent)


def test_a_shared_job_keeps_its_worker_alive_one_email_timeout_at_a_time(chunked, headers, redis_conn, smtp,
                                                                         monkeypatch):
    # RQ keeps a SimpleWorker's key for the whole job's timeout (JOB_TIMEOUT per email in a shared job):
    # a worker killed outright would look alive that long, and the reconciler (which leaves a live
    # worker's send alone) would wait that long to recover the email it was sending.
    # The last email's `sent` record is written before: Redis may take its socket timeout to answer.
    settings, client, deliverer = chunked
    monkeypatch.setattr(jobs, "KEEP_ALIVE_SECONDS", 0)
    _post(client, headers, _items(3, priority="high"))  # high: no make-way check writes it instead
    ttls, statuses, send, keep = [], [], deliverer.mailer.send, queues.keep_worker_alive

    def sending(email):  # what Redis says of the worker as each email goes out
        ttls.append(redis_conn.ttl(queues.worker_keys(get_current_job().worker_name)[0]))
        return send(email)

    def keeping(connection, name, ttl, **kwargs):  # what the database says as the job asks Redis
        with database.connection_context():
            statuses.append(sorted(row.status for row in _rows()))
        return keep(connection, name, ttl, **kwargs)

    monkeypatch.setattr(deliverer.mailer, "send", sending)
    monkeypatch.setattr(queues, "keep_worker_alive", keeping)
    run_worker_until_idle(redis_conn)
    assert len(smtp.messages) == 3
    one_email = settings.job_timeout + 60
    # From the first email on: RQ's own TTL, for the whole job, left a worker killed in the job's first
    # KEEP_ALIVE_SECONDS looking alive for the whole job's timeout (found by a soak test: a worker
    # SIGKILLed 4.8 s into a 25-email job left its email `sending` for 560 s, not 80).
    assert len(ttls) == 3 and all(0 < ttl <= one_email for ttl in ttls)
    assert statuses == [["queued", "queued", "queued"], ["queued", "queued", "sent"], ["queued", "sent", "sent"]]



def test_a_shared_jobs_counts_go_with_each_keep_alive_not_only_at_its_end(chunked, headers, redis_conn, smtp,
                                                                           monkeypatch):
    # Kept for the end of the job, the counts of the emails it had sent (and the deletion of their sent
    # receipts) went with a worker killed in it: up to a whole job of sends missing from
    # notifier_notifications_sent_total.
    _, client, deliverer = chunked
    monkeypatch.setattr(jobs, "KEEP_ALIVE_SECONDS", 0)
    ids = _post(client, headers, _items(3, priority="high"))
    counted, receipts_left, send = [], [], deliverer.mailer.send

    def sending(email):  # what Redis holds of the emails sent before this one, as it goes out
        counted.append(total(collect_metrics(redis_conn), "notifier_notifications_sent_total"))
        receipts_left.append(redis_conn.exists(*receipts.keys(ids)))
        return send(email)

    monkeypatch.setattr(deliverer.mailer, "send", sending)
    run_worker_until_idle(redis_conn)
    assert len(smtp.messages) == 3
    assert counted == [0, 1, 2]
    assert receipts_left == [0, 0, 0]
    assert total(collect_metrics(redis_conn), "notifier_notifications_sent_total") == 3


def test_a_worker_killed_in_a_shared_jobs_first_seconds_looks_dead_after_one_email_timeout(chunked, headers,
                                                                                           redis_conn, smtp,
                                                                                           monkeypatch):
    # Found by a soak test: a worker SIGKILLed 4.8 s into a shared job of 25, before the job's first
    # renewal (KEEP_ALIVE_SECONDS), kept RQ's TTL for the whole job (JOB_TIMEOUT x 25 + 60 s, 51
    # minutes at the defaults), and the email it was sending stayed `sending` that long.
    settings, client, deliverer = chunked
    _post(client, headers, _items(3, priority="high"))
    ttls, send = [], deliverer.mailer.send

    def sending(email):  # what Redis says of the worker as each email goes out
        ttls.append(redis_conn.ttl(queues.worker_keys(get_current_job().worker_name)[0]))
        return send(email)

    monkeypatch.setattr(deliverer.mailer, "send", sending)
    run_worker_until_idle(redis_conn)
    assert len(smtp.messages) == 3
    assert len(ttls) == 3 and all(0 < ttl <= settings.job_timeout + 60 for ttl in ttls)


def test_a_shared_job_stops_at_its_time_limit_and_the_reconciler_hands_on_the_rest(stacks, pg_settings, smtp):
    # A shared job's limit is JOB_TIMEOUT per email. RQ raises it in the middle of whatever the job is
    # doing, a send most likely: taken for one email failing, it let the job go on with no limit.
    stack = stacks(pg_settings, JOB_TIMEOUT=1, RETRY_INTERVALS="1,1,1", RECONCILE_INTERVAL=1,
                   RECONCILE_GRACE_SECONDS=1).start("api", "worker")
    mid_data, cut = held_reply(smtp, 2)  # the job's 3 s limit comes while the server holds the second's answer
    status, body = request("POST", f"{stack.base}{BATCH}", stack.key, {"notifications": _items(3)})
    assert status == 202, body
    ids = [r["id"] for r in body["results"]]
    stack.wait_status(ids[1], "retrying", timeout=20)
    assert mid_data.is_set()  # the limit cut the second off mid-DATA
    cut.set()
    time.sleep(4)  # the third would have gone out by now, had the job gone on
    assert [stack.get(i)["status"] for i in ids] == ["sent", "retrying", "queued"]
    assert _recipients(smtp) == ["user0@example.com"]  # the second was cut off before the server took it

    stack.start("scheduler")  # its reconciler hands on the two the stopped job left
    for notification_id in ids:
        stack.wait_status(notification_id, "sent", timeout=40)
    assert _recipients(smtp) == [f"user{n}@example.com" for n in range(3)]
