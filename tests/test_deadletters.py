"""The dead-letter queue: failed notifications, listing them, and requeueing them safely."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import pytest
from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job

from app import create_app
from notifier import deadletters
from notifier.db import database
from notifier.models import Status
from notifier.queues import QUEUE_NAMES, all_queues, job_id_for
from tests.helpers import LITERAL, make_notification, reload, run_worker_until_idle
from tests.processes import ROOT, cli, env_for, free_port

pytestmark = pytest.mark.integration

DEAD = "/api/dead-letters"


def _send(client, headers, **payload) -> str:
    response = client.post("/api/notifications/send", json={**LITERAL, **payload}, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


def _dead_letter(client, headers, smtp, redis_conn, **payload) -> str:
    """A notification the SMTP server refused for good: failed, its job in RQ's failed registry."""
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(client, headers, **payload)
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "failed"
    return notification_id


def _failed_job_ids(redis_conn) -> set[str]:
    return {job_id for queue in all_queues(redis_conn) for job_id in queue.failed_job_registry.get_job_ids()}


def _history(client, headers, notification_id) -> list[dict]:
    return client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()["history"]


def _failing_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `python -m notifier ...` when it is expected to fail (tests.processes.cli insists on success)."""
    return subprocess.run([sys.executable, "-m", "notifier", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_550_is_listed_as_a_dead_letter_for_its_key_only(client, headers, other_key, deliverer, smtp, redis_conn):
    notification_id = _dead_letter(client, headers, smtp, redis_conn)

    response = client.get(DEAD, headers=headers)
    assert response.status_code == 200
    (entry,) = response.get_json()["data"]
    assert entry["id"] == notification_id
    assert "550" in entry["reason"] and "rejected by policy" in entry["reason"]
    assert entry["smtp_code"] == 550
    assert entry["attempts"] == 1
    assert entry["in_failed_registry"] is True
    assert entry["to"] == LITERAL["to"]
    assert entry["failed_at"].endswith("Z")

    theirs = client.get(DEAD, headers={"X-API-Key": other_key[1]})
    assert theirs.status_code == 200
    assert theirs.get_json() == {"data": [], "next": None}
    assert reload(notification_id).status == "failed"
    assert smtp.count() == 0


def test_requeue_sends_a_dead_letter_with_fresh_attempts(client, headers, deliverer, smtp, redis_conn):
    notification_id = _dead_letter(client, headers, smtp, redis_conn)
    assert _failed_job_ids(redis_conn) == {job_id_for(notification_id)}

    response = client.post(f"{DEAD}/{notification_id}/requeue", headers=headers)

    assert response.status_code == 202
    assert response.get_json() == {"id": notification_id, "status": "queued"}
    requeued = reload(notification_id)
    assert (requeued.status, requeued.attempts, requeued.last_error) == ("queued", 0, None)
    assert _failed_job_ids(redis_conn) == set()
    last = _history(client, headers, notification_id)[-1]
    assert (last["from_status"], last["status"]) == ("failed", "queued")
    assert last["reason"] == "requeued from the dead-letter queue"

    run_worker_until_idle(redis_conn)
    sent = reload(notification_id)
    assert (sent.status, sent.attempts) == ("sent", 1)
    assert [e["status"] for e in _history(client, headers, notification_id)] == [
        "queued", "sending", "failed", "queued", "sending", "sent"
    ]
    assert client.get(DEAD, headers=headers).get_json() == {"data": [], "next": None}
    assert len(smtp.wait_for(1)) == 1
    assert smtp.count() == 1


def test_requeue_of_a_sent_notification_is_refused(client, headers, deliverer, smtp, redis_conn):
    notification_id = _send(client, headers)
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "sent"

    response = client.post(f"{DEAD}/{notification_id}/requeue", headers=headers)

    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "not_requeueable"
    assert "sent" in error["message"]
    assert error["details"] == {"status": "sent"}
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "sent"
    assert smtp.count() == 1


def test_sent_job_filed_as_failed_by_rq_is_not_requeued_by_the_cli(
    client, headers, deliverer, smtp, redis_conn, pg_settings
):
    notification_id = _send(client, headers)
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "sent"
    assert len(smtp.wait_for(1)) == 1
    # What RQ has been seen to do: move a job that succeeded into the failed registry as abandoned.
    job = Job.fetch(job_id_for(notification_id), connection=redis_conn)
    registry = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    registry.add(job, ttl=3600, exc_string="AbandonedJobError: moved to the failed registry")
    assert job_id_for(notification_id) in registry.get_job_ids()
    env = env_for(pg_settings)

    done = _failing_cli(["dlq", "requeue", notification_id], env)

    assert done.returncode != 0
    assert "sent" in done.stderr and "never sent twice" in done.stderr
    assert "requeued 0 notification(s)" in cli(["dlq", "requeue", "--all"], env)
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "sent"
    assert smtp.count() == 1


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_dlq_list_refuses_a_limit_below_1(client, headers, deliverer, smtp, redis_conn, pg_settings, limit):
    # 0 listed nothing and said there were more; -1 crashed with an IndexError while paging.
    _dead_letter(client, headers, smtp, redis_conn)

    done = _failing_cli(["dlq", "list", "--limit", limit], env_for(pg_settings))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "--limit" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_dlq_cli_lists_and_shows_a_dead_letter(client, headers, deliverer, smtp, redis_conn, pg_settings):
    notification_id = _dead_letter(client, headers, smtp, redis_conn)
    env = env_for(pg_settings)

    listed = cli(["dlq", "list"], env)
    shown = cli(["dlq", "show", notification_id], env)

    (line,) = [row for row in listed.splitlines() if row.startswith(notification_id)]
    assert "attempts=1" in line and "in RQ failed registry" in line and "550" in line
    assert "1 dead letter(s)" in listed
    assert f"id: {notification_id}" in shown
    assert "smtp_code: 550" in shown
    reason = next(row for row in shown.splitlines() if row.startswith("reason: "))
    assert "550" in reason and "rejected by policy" in reason
    assert f"rq job: {job_id_for(notification_id)} (failed)" in shown
    assert cli(["dlq", "show", notification_id.upper()], env) == shown  # the same id, as the API takes it
    assert reload(notification_id).status == "failed"
    assert smtp.count() == 0


def test_the_cli_says_when_its_redis_does_not_answer(client, headers, deliverer, smtp, redis_conn, pg_settings):
    # make run's Redis is on port 6390 and the CLI's default REDIS_URL on 6379: pointed at the wrong one,
    # `reconcile` printed a pass of zeros and `dlq list` called every dead letter "not in RQ", all exit 0.
    notification_id = _dead_letter(client, headers, smtp, redis_conn)
    env = env_for(replace(pg_settings, redis_url="redis://127.0.0.1:1/0"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "notifier", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    reconciled = run("reconcile")
    assert reconciled.returncode == 1 and "Redis at 127.0.0.1:1/0 does not answer" in reconciled.stderr
    assert "requeued=" not in reconciled.stdout
    listed = run("dlq", "list")  # the dead letters are in the database: listed, with the warning
    assert listed.returncode == 0 and "warning: Redis at 127.0.0.1:1/0 does not answer" in listed.stderr
    (line,) = [row for row in listed.stdout.splitlines() if row.startswith(notification_id)]
    assert "RQ unknown (Redis does not answer)" in line and "not in RQ" not in line  # not said as a fact
    shown = run("dlq", "show", notification_id)  # the same: it stopped with a traceback
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert f"id: {notification_id}" in shown.stdout and "rq job:" not in shown.stdout
    assert "in_failed_registry: unknown (Redis does not answer)" in shown.stdout
    listed_by_api = client.get(DEAD, headers=headers).get_json()["data"]  # the API's own Redis answers
    assert [e["in_failed_registry"] for e in listed_by_api] == [True]


def test_the_cli_says_when_redis_refuses_and_when_no_worker_reads_it(client, headers, deliverer, smtp, redis_conn,
                                                                   pg_settings):
    missing = _failing_cli(["reconcile"], env_for(replace(pg_settings, redis_url="redis://127.0.0.1:6379/99")))
    assert missing.returncode == 1 and "Redis at 127.0.0.1:6379/99 refused: DB index is out of range" in missing.stderr

    # A Redis that answers, but that no worker reads: the pass goes on there, with a warning.
    lonely = _failing_cli(["reconcile"], env_for(pg_settings))
    assert lonely.returncode == 0 and "requeued=" in lonely.stdout
    assert "no RQ worker is registered on Redis at" in lonely.stderr


def test_a_dead_letter_to_a_suppressed_address_is_not_requeued_until_the_address_is_removed(
        client, headers, deliverer, smtp, redis_conn, pg_settings):
    # A 550 for the address put it on the suppression list: requeued, it said 202 and ended `suppressed`.
    smtp.rcpt_replies.append("550 5.1.1 no such user")
    bounced = _send(client, headers, to="gone@example.com")
    run_worker_until_idle(redis_conn)
    assert reload(bounced).status == "failed"

    refused = client.post(f"{DEAD}/{bounced}/requeue", headers=headers)
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "suppressed"
    assert "DELETE /api/suppressions/" in refused.get_json()["error"]["message"]
    env = env_for(pg_settings)
    assert "suppressed: the address is on the suppression list since" in cli(["dlq", "show", bounced], env)
    assert "requeued 0 notification(s); left 1 to an address on the suppression list" in cli(
        ["dlq", "requeue", "--all"], env)
    assert reload(bounced).status == "failed"

    assert client.delete("/api/suppressions/gone@example.com", headers=headers).status_code in (200, 204)
    assert client.post(f"{DEAD}/{bounced}/requeue", headers=headers).status_code == 202
    run_worker_until_idle(redis_conn)
    assert reload(bounced).status == "sent"


def test_dlq_cli_show_refuses_a_notification_that_is_not_failed(client, headers, deliverer, smtp, redis_conn,
                                                                 pg_settings):
    notification_id = _send(client, headers)
    run_worker_until_idle(redis_conn)

    done = _failing_cli(["dlq", "show", notification_id], env_for(pg_settings))

    assert done.returncode != 0
    assert "not a dead letter" in done.stderr
    assert reload(notification_id).status == "sent"
    assert smtp.count() == 1


def test_dlq_cli_purge_empties_rq_but_keeps_the_failed_record(client, headers, deliverer, smtp, redis_conn,
                                                              pg_settings):
    first = _dead_letter(client, headers, smtp, redis_conn)
    second = _dead_letter(client, headers, smtp, redis_conn, priority="high")
    assert _failed_job_ids(redis_conn) == {job_id_for(first), job_id_for(second)}
    env = env_for(pg_settings)

    assert "purged 2 job(s)" in cli(["dlq", "purge", "--yes"], env)

    assert _failed_job_ids(redis_conn) == set()
    assert not redis_conn.exists(f"rq:job:{job_id_for(first)}")
    assert [reload(i).status for i in (first, second)] == ["failed", "failed"]
    entries = client.get(DEAD, headers=headers).get_json()["data"]
    assert {e["id"] for e in entries} == {first, second}
    assert all(e["in_failed_registry"] is False and e["smtp_code"] == 550 for e in entries)
    listed = cli(["dlq", "list"], env)
    assert "2 dead letter(s)" in listed and listed.count("not in RQ") == 2
    assert smtp.count() == 0


def test_dlq_cli_purge_survives_a_failed_entry_whose_job_is_gone(client, headers, deliverer, smtp, redis_conn,
                                                                pg_settings):
    # Redis may evict a job hash (it has a TTL) while its entry stays in the failed registry.
    gone = _dead_letter(client, headers, smtp, redis_conn)
    kept = _dead_letter(client, headers, smtp, redis_conn)
    redis_conn.delete(f"rq:job:{job_id_for(gone)}")
    assert _failed_job_ids(redis_conn) == {job_id_for(gone), job_id_for(kept)}

    assert "purged 2 job(s)" in cli(["dlq", "purge", "--yes"], env_for(pg_settings))

    assert _failed_job_ids(redis_conn) == set()
    assert [reload(i).status for i in (gone, kept)] == ["failed", "failed"]
    assert smtp.count() == 0


def test_dlq_cli_requeue_all_sends_every_dead_letter_once(client, headers, deliverer, smtp, redis_conn,
                                                          pg_settings):
    first = _dead_letter(client, headers, smtp, redis_conn, to="first@example.com")
    second = _dead_letter(client, headers, smtp, redis_conn, to="second@example.com")
    sent = _send(client, headers, to="third@example.com")
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1

    assert "requeued 2 notification(s)" in cli(["dlq", "requeue", "--all"], env_for(pg_settings))

    assert [reload(i).status for i in (first, second)] == ["queued", "queued"]
    assert _failed_job_ids(redis_conn) == set()
    run_worker_until_idle(redis_conn)
    assert [reload(i).status for i in (first, second, sent)] == ["sent", "sent", "sent"]
    received = smtp.wait_for(3)
    assert sorted(m.rcpt_tos[0] for m in received) == ["first@example.com", "second@example.com",
                                                       "third@example.com"]
    assert smtp.count() == 3


def test_dlq_cli_requeue_one_sends_it(client, headers, deliverer, smtp, redis_conn, pg_settings):
    notification_id = _dead_letter(client, headers, smtp, redis_conn)

    assert f"requeued {notification_id}" in cli(["dlq", "requeue", notification_id], env_for(pg_settings))

    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "sent"
    assert smtp.count() == 1


def test_requeue_of_an_unknown_id_is_not_found(client, headers, deliverer, smtp, redis_conn):
    response = client.post(f"{DEAD}/{uuid.uuid4()}/requeue", headers=headers)

    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    assert smtp.count() == 0


def test_requeue_of_another_keys_dead_letter_is_not_found(client, headers, other_key, deliverer, smtp, redis_conn):
    notification_id = _dead_letter(client, headers, smtp, redis_conn)

    response = client.post(f"{DEAD}/{notification_id}/requeue", headers={"X-API-Key": other_key[1]})

    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
    failed = reload(notification_id)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert _failed_job_ids(redis_conn) == {job_id_for(notification_id)}
    run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "failed"
    assert smtp.count() == 0


def test_dead_letters_are_listed_while_redis_is_down(pg_settings, pg_db, api_key):
    from redis import Redis

    from app import create_app
    from notifier.models import Status
    from tests.helpers import make_notification

    failed = make_notification(api_key[0], status=Status.FAILED)
    client = create_app(pg_settings, redis=Redis(port=1, socket_connect_timeout=0.2)).test_client()
    body = client.get("/api/dead-letters", headers={"X-API-Key": api_key[1]}).get_json()
    # Listed from the database; whether RQ still holds the job nobody can say without Redis.
    assert [(e["id"], e["in_failed_registry"]) for e in body["data"]] == [(failed.id, None)]


def _recording(real, asked: list[str]):
    def execute_command(self, *args, **options):
        asked.append(str(args[0]).upper())
        return real(self, *args, **options)

    return execute_command


def test_listing_and_requeueing_never_read_a_whole_failed_registry(client, headers, deliverer, smtp, redis_conn,
                                                                    monkeypatch):
    dead = _dead_letter(client, headers, smtp, redis_conn)
    # A month of other services' bounces in the same registry.
    registry = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    redis_conn.zadd(registry.key, {f"notification-{uuid.uuid4()}": 4e9 for _ in range(2000)})
    asked = []
    for cls in (type(redis_conn), Pipeline):  # a pipeline queues its commands through its own method
        monkeypatch.setattr(cls, "execute_command", _recording(cls.execute_command, asked))
    (entry,) = client.get(DEAD, headers=headers).get_json()["data"]
    assert entry["in_failed_registry"] is True
    with database.connection_context():
        assert deadletters.show(redis_conn, dead)[0].in_failed_registry is True  # `dlq show`
    assert client.post(f"{DEAD}/{dead}/requeue", headers=headers).status_code == 202
    monkeypatch.undo()
    assert "ZSCORE" in asked and "ZREM" in asked
    assert not {"ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE"} & set(asked), asked
    assert job_id_for(dead) not in registry.get_job_ids() and registry.count == 2000


def test_a_registry_entry_past_its_expiry_is_not_reported(client, headers, deliverer, smtp, redis_conn):
    dead = _dead_letter(client, headers, smtp, redis_conn)
    registry = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    redis_conn.zadd(registry.key, {job_id_for(dead): time.time() - 10})  # RQ drops it at its next cleanup
    (entry,) = client.get(DEAD, headers=headers).get_json()["data"]
    assert entry["in_failed_registry"] is False


def test_requeue_with_redis_down_is_accepted_and_left_to_the_reconciler(pg_settings, client, headers, api_key):
    failed = make_notification(api_key[0], Status.FAILED)
    down = create_app(pg_settings, redis=Redis(port=free_port(), socket_connect_timeout=0.2)).test_client()
    response = down.post(f"{DEAD}/{failed.id}/requeue", headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert reload(failed.id).status == "queued"


def test_dead_letters_come_a_page_at_a_time_past_the_first_hundred(client, headers, api_key, redis_conn):
    failed = [make_notification(api_key[0], status=Status.FAILED, to=f"u{n}@example.com") for n in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = client.get(DEAD, headers=headers, query_string=query).get_json()
        seen += [e["id"] for e in body["data"]]
        pages += 1
        if pages == 1:  # a failure arriving meanwhile comes first next time, never inside the walk
            make_notification(api_key[0], status=Status.FAILED, to="late@example.com")
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3 and sorted(seen) == sorted(n.id for n in failed)
    assert seen == [n.id for n in reversed(failed)]  # most recently failed first
    huge = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|" + b"9" * 25).decode()  # past any seq column
    for cursor in ("nonsense", huge):
        bad = client.get(DEAD, headers=headers, query_string={"cursor": cursor})
        assert bad.status_code == 422 and "cursor" in bad.get_json()["error"]["details"]


def _other_spellings(cursor: str) -> list[str]:
    """Cursors that read as the same place as a dead-letter cursor of ours, written by someone else."""
    at, seq = base64.urlsafe_b64decode(cursor).decode().split("|")

    def written(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode()

    spellings = [written(f"{at}+02:00|{seq}"), written(f"{at}Z|{seq}"), written(f"{at.replace('T', ' ')}|{seq}"),
                 written(f"{at[:10]}|{seq}"), written(f"{at}|0{seq}"), written(f"{at}|+{seq}"),
                 written(f"{at}| {seq}"), cursor.rstrip("="), f"{cursor[:4]}!{cursor[4:]}"]
    # Unpadded is another spelling only when base64 padded it: a key of a multiple of 3 bytes has none.
    return [s for s in spellings if s != cursor]


def test_a_dead_letter_cursor_we_did_not_write_is_422_even_when_it_reads_as_ours(client, headers, api_key):
    for n in range(3):
        make_notification(api_key[0], status=Status.FAILED, to=f"u{n}@example.com")
    ours = client.get(DEAD, headers=headers, query_string={"limit": 1}).get_json()["next"]
    assert client.get(DEAD, headers=headers, query_string={"cursor": ours}).status_code == 200
    for cursor in _other_spellings(ours):
        response = client.get(DEAD, headers=headers, query_string={"cursor": cursor})
        assert response.status_code == 422, (cursor, response.get_data(as_text=True))
        error = response.get_json()["error"]
        assert (error["code"], error["details"]) == ("validation_error", {"cursor": ["not a cursor from this API"]})


def test_the_cli_asks_a_silent_redis_once(client, headers, deliverer, smtp, redis_conn, pg_settings):
    # Found by a run-through: a Redis that takes connections and answers nothing (stopped) cost its 10 s
    # timeout again on each later call, about 20 s per dead letter `dlq requeue --all` requeued (and
    # 10 s per callback `callbacks redeliver --gave-up` posted again): a thousand took hours. Counted in
    # connections the silent server took, not seconds, which a busy machine stretches.
    ids = [_dead_letter(client, headers, smtp, redis_conn) for _ in range(3)]
    taken: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        silent.settimeout(0.2)

        def take() -> None:  # accept and answer nothing, as a stopped Redis's kernel does
            while silent.fileno() != -1:
                try:
                    taken.append(silent.accept()[0])
                except (TimeoutError, OSError):
                    continue

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        env = env_for(replace(pg_settings, redis_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0"))
        done = subprocess.run([sys.executable, "-m", "notifier", "dlq", "requeue", "--all"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        asked = len(taken)
    for conn in taken:
        conn.close()
    assert done.returncode == 0 and "does not answer (TimeoutError)" in done.stderr, done.stderr
    assert f"requeued {len(ids)} notification(s)" in done.stdout
    assert asked == 1, asked  # the first ping, not two more tries per dead letter
    assert {reload(i).status for i in ids} == {"queued"}  # the reconciler queues them once Redis answers
