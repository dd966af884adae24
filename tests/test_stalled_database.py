"""PostgreSQL that stalls: it takes connections and what is sent on them, and answers nothing, as a
hung server or a network path dropping everything does. No error or reset comes back, so only the
client's own limits end the wait: a send that hung until the server came back, and behind it (the
pool's lock) every other request of the process, now gets its 503 within seconds, and /api/ready
its not_ready within DATABASE_CONNECT_TIMEOUT."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace

import psycopg2
import pytest

from app import create_app
from notifier import jobs, keycache, receipts, store
from notifier.config import ConfigError, Settings
from notifier.db import bind, database
from notifier.models import Notification, Status
from notifier.queues import dispatch
from notifier.reconciler import reconcile
from tests.helpers import (
    LITERAL,
    eventually,
    held_reply,
    installed_deliverer,
    make_notification,
    reload,
    run_worker_until_idle,
)
from tests.processes import free_port

pytestmark = pytest.mark.integration

# What a send may take against a stalled database at the default DATABASE_CONNECT_TIMEOUT (2 s): the
# statement's answer a second late, then a new connection tried for 2 s; measured 3.0 s.
SEND_BOUND = 4.5


@pytest.fixture
def stall_app(pg_settings, pg_db, redis_conn, proxy):
    """The API on PostgreSQL behind the proxy, its pool holding a connection that answered."""
    name = pg_settings.database_url.rsplit("/", 1)[1]
    application = create_app(replace(pg_settings, database_url=proxy.url(name)), redis=redis_conn)
    application.config["TESTING"] = True
    yield application
    proxy.resume()
    database.close_all()


def _timed(app, method: str, path: str, **kwargs) -> tuple[float, int | None, dict | None]:
    """(seconds, status, body) of one request, in a thread of its own: a hang fails the test, not the run."""
    answer = {}

    def run():
        started = time.monotonic()
        response = app.test_client().open(path, method=method, **kwargs)
        answer["it"] = (time.monotonic() - started, response.status_code, response.get_json())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    return answer.get("it", (60.0, None, None))


def _send(app, headers):
    return _timed(app, "POST", "/api/notifications/send", json=LITERAL, headers=headers)


def _stored() -> int:
    with database.connection_context():
        return Notification.select().count()


@pytest.mark.parametrize("idle", [0.0, 1.5])  # handed out as it is; or checked by the pool first (SELECT 1)
def test_a_send_to_a_stalled_database_is_answered_503_within_seconds(stall_app, headers, proxy, idle):
    assert _send(stall_app, headers)[1] == 202
    time.sleep(idle)
    proxy.stall()
    waited, status, body = _send(stall_app, headers)
    assert status == 503, body
    assert body["error"]["code"] == "service_unavailable"
    assert waited < SEND_BOUND
    # Told within the moment: the next one is not made to wait its own turn.
    waited, status, _ = _send(stall_app, headers)
    assert status == 503 and waited < 1.5  # not another 2 s


def test_with_several_hosts_the_probe_asks_the_stalled_one(pg_settings, pg_db, redis_conn, headers, proxy):
    # The pool connected to the second host, the first refusing then; the first answers by the time
    # the second stalls. The probe asked the URL's hosts, found the first answering, and the send
    # waited for as long as the stall lasted (and a cancel could reach a session of the other server).
    from tests.cutproxy import CutProxy

    first_port = free_port()
    name = pg_settings.database_url.rsplit("/", 1)[1]
    url = f"postgresql://postgres@127.0.0.1:{first_port},127.0.0.1:{proxy.port}/{name}"
    app = create_app(replace(pg_settings, database_url=Settings.from_env({"DATABASE_URL": url}).database_url),
                     redis=redis_conn)
    first = None
    try:
        assert _send(app, headers)[1] == 202
        first = CutProxy(5432, port=first_port)
        proxy.stall()
        waited, status, body = _send(app, headers)
        assert status == 503, body
        assert waited < SEND_BOUND
    finally:
        proxy.resume()
        if first is not None:
            first.close()
        database.close_all()


def test_sends_at_once_to_a_stalled_database_each_get_their_503_within_seconds(stall_app, headers, proxy):
    # The pool makes connections one at a time, under its lock: each thread waited its turn, then its
    # own connect timeout.
    assert _send(stall_app, headers)[1] == 202
    time.sleep(1.5)
    proxy.stall()
    answers: list[tuple] = []
    threads = [threading.Thread(target=lambda: answers.append(_send(stall_app, headers))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for _, status, _ in answers] == [503] * 4
    assert max(waited for waited, _, _ in answers) < SEND_BOUND


def test_a_send_that_listens_for_key_changes_again_during_a_stall_waits_no_longer_than_the_others(
        stall_app, headers, proxy, monkeypatch):
    # The key cache's listening connection is lost in an outage (a partition ends it within 25 s), and
    # a request tries it again every RECONNECT_SECONDS. That request waited its connect timeout for the
    # cache's connection, then as long again for its own: 5 s where every other send took 3, one in
    # each API process every 5 s for as long as the outage lasted (seen in a partition, 4.0 s).
    monkeypatch.setattr(keycache, "RECONNECT_SECONDS", 0.0)
    assert _send(stall_app, headers)[1] == 202
    stall_app.extensions["notifier"]["key_cache"].close()
    proxy.stall()
    waited, status, body = _send(stall_app, headers)
    assert status == 503, body
    assert waited < SEND_BOUND
    # The cache's connection found the server silent for the pool too: the next send is told at once.
    waited, status, _ = _send(stall_app, headers)
    assert status == 503 and waited < 1.5  # not another 2 s


def test_a_send_the_stall_kept_from_the_server_stores_nothing(stall_app, headers, proxy):
    assert _send(stall_app, headers)[1] == 202
    time.sleep(1.5)  # the pool checks the connection first, and that check is what stalls
    proxy.stall()
    assert _send(stall_app, headers)[1] == 503
    proxy.resume()
    time.sleep(Settings.database_connect_timeout)  # what the process remembers of the silence
    assert _stored() == 1


def test_a_send_whose_insert_went_out_as_the_database_stalled_is_answered_503_within_seconds(
        pg_settings, pg_db, redis_conn, headers, proxy):
    # The insert may yet be made (the server has it, and may come back to it): the lost commit's
    # look-up is asked, and fails at once while the server is silent; the outcome is unknown.
    name = pg_settings.database_url.rsplit("/", 1)[1]
    settings = replace(pg_settings, database_url=proxy.url(name), database_prepare=False)  # statements as text
    application = create_app(settings, redis=redis_conn)
    proxy.stall(at=b'INSERT INTO "notifications"')
    waited, status, body = _send(application, headers)
    assert status == 503, body
    assert waited < SEND_BOUND + 2  # the look-up's pauses, 1.75 s
    proxy.resume()
    # The server gets the held insert now and stores the row: why that 503 says "unknown". Waited for
    # here, it no longer lands in the next test's emptied tables (a foreign key error there).
    time.sleep(Settings.database_connect_timeout)  # what the process remembers of the silence
    assert eventually(lambda: _stored() == 1, timeout=10)
    database.close_all()


def test_ready_answers_not_ready_within_the_connect_timeout(stall_app, proxy):
    assert _timed(stall_app, "GET", "/api/ready")[1] == 200
    proxy.stall()
    waited, status, body = _timed(stall_app, "GET", "/api/ready")
    assert status == 503
    assert body["error"]["code"] == "not_ready"
    assert body["error"]["details"]["database"].startswith("unavailable")
    assert body["error"]["details"]["redis"] == "ok"
    assert waited < 2.5


def test_a_process_whose_pool_holds_idle_connections_answers_a_stall_as_fast_as_one_with_one(
        stall_app, headers, proxy):
    # Under load the pool holds several idle connections, each pinged (SELECT 1) as it is handed out,
    # under the pool's lock. In a partition the first ping took its second and the probe's 2 s, and
    # then each next one its second more, the lock held all along: every thread of the process waited
    # behind it: sends 6.8 s and /api/ready 6.4 s in a partition, 12 s here with six idle connections.
    held = threading.Barrier(6)

    def hold(_):  # six requests at once: six connections in the pool
        with stall_app.app_context():
            database.connect(reuse_if_open=True)
            database.execute_sql("SELECT 1")
            held.wait(10)
            database.close()

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(database.obj._connections) == 6
    time.sleep(1.5)  # each is pinged before it is handed out again
    proxy.stall()
    answers: list[tuple] = []
    sends = [threading.Thread(target=lambda: answers.append(_send(stall_app, headers))) for _ in range(4)]
    for thread in sends:
        thread.start()
    time.sleep(0.2)
    waited, status, _ = _timed(stall_app, "GET", "/api/ready")
    for thread in sends:
        thread.join()
    assert status == 503
    assert waited < 2.5
    assert [status for _, status, _ in answers] == [503] * 4
    assert max(waited for waited, _, _ in answers) < SEND_BOUND


def test_the_api_answers_again_once_the_database_does(stall_app, headers, proxy):
    proxy.stall()
    assert _send(stall_app, headers)[1] == 503
    proxy.resume()
    time.sleep(Settings.database_connect_timeout)  # what the process remembers of the silence
    assert _timed(stall_app, "GET", "/api/ready")[1] == 200
    assert _send(stall_app, headers)[1] == 202


def test_a_statement_waiting_for_a_lock_is_not_taken_for_a_stalled_server(app, headers, pg_url):
    # Silent for longer than the probe's delay and its timeout together, but its server answers the
    # probe: the request waits for the lock, as long as DATABASE_STATEMENT_TIMEOUT lets it.
    client = app.test_client()
    created = client.post("/api/notifications/send", json=LITERAL, headers=headers).get_json()
    locker = psycopg2.connect(pg_url)
    with locker.cursor() as cur:
        cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (created["id"],))
    release = threading.Timer(4.0, locker.rollback)
    release.start()
    started = time.monotonic()
    try:
        response = client.post(f"/api/notifications/{created['id']}/cancel", headers=headers)
    finally:
        release.join()
        locker.close()
    assert response.status_code == 200, response.get_json()
    assert time.monotonic() - started > 3.5


def test_a_job_whose_database_stalls_once_the_email_is_out_ends_in_a_retry_with_a_receipt(
        pg_settings, pg_db, api_key, redis_conn, smtp, proxy):
    # The `sent` record met a stalled database: libpq waited for its answer for good, deaf to RQ's
    # time limit (a SIGALRM; libpq resumes its wait after one) and to SIGTERM: the worker hung, its
    # job `started`, for as long as the stall lasted (over 11 minutes with JOB_TIMEOUT at 5 s, until
    # killed). Now the record gives up like any other unavailable database: the receipt is kept, the
    # job ends in its retry, and the worker goes on.
    name = pg_settings.database_url.rsplit("/", 1)[1]
    settings = replace(pg_settings, database_url=proxy.url(name), job_timeout=3, retry_intervals=(60,))
    notification = make_notification(api_key[0])
    dispatch(redis_conn, settings, notification)
    bind(settings.database_url)
    smtp.delay = 1.0  # the database stalls while the mail server takes the email
    threading.Timer(0.5, proxy.stall).start()
    started = time.monotonic()
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)  # in this thread: RQ's time limit is a signal
    waited = time.monotonic() - started
    assert len(smtp.messages) == 1
    assert redis_conn.exists(f"{receipts.KEY_PREFIX}{notification.id}")
    assert waited < settings.job_timeout + 20  # the record's tries (7.5 s of pauses), each a few seconds
    (job_id,) = [j.decode() for j in redis_conn.zrange("rq:scheduled:notifier.default", 0, -1)]  # its retry
    assert job_id.endswith(notification.id)
    proxy.resume()
    bind(pg_settings.database_url)
    assert reload(notification.id).status == Status.SENDING  # for the receipt to record, never to send again


def test_the_setting():
    assert Settings.from_env({}).database_connect_timeout == 2
    assert Settings.from_env({"DATABASE_CONNECT_TIMEOUT": "0.5"}).database_connect_timeout == 0.5
    for bad in ("0", "-1", "nan", "601", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"DATABASE_CONNECT_TIMEOUT": bad})



def _lock_waiters(admin) -> int:
    """How many sessions wait for a lock to update a notification (prepared or not)."""
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND query ~ 'UPDATE \"notifications\"|EXECUTE notifier_'")
        return cur.fetchone()[0]


def _hold_the_row(pg_url, notification_id: str, until):
    """A session of the test's own holding the notification's row (SELECT ... FOR UPDATE) until
    until() is true, then letting it go; returned as (its thread, the session)."""
    locker = psycopg2.connect(pg_url)

    def hold():
        try:
            while not until():
                time.sleep(0.05)
        finally:
            locker.rollback()

    with locker.cursor() as cur:
        cur.execute('SELECT 1 FROM "notifications" WHERE "id" = %s FOR UPDATE', (notification_id,))
    thread = threading.Thread(target=hold)
    thread.start()
    return thread, locker


def test_a_sent_record_the_job_limit_cuts_off_behind_a_lock_lands_once_and_the_job_queues_its_callback(
        fast_settings, pg_db, pg_url, api_key, redis_conn, smtp, receiver):
    # The record waits for a row another session holds; RQ's limit (a SIGALRM) now cuts that wait off
    # (patience waits in Python) and psycopg2 closes the connection. PostgreSQL would still carry the
    # UPDATE out once the row is free; the job writes the record again (the alarm comes once). Before,
    # that second write found the row `sent` by the first, took it for someone else's, and left the
    # callback to the reconciler. Now the first is cancelled on the server (patience.Patience.cancel),
    # and one that lands all the same is told by its sent_at (jobs.Deliverer._wrote_already).
    settings = replace(fast_settings, job_timeout=2, retry_intervals=(60,))
    notification = make_notification(api_key[0], callback_url=receiver.url)
    dispatch(redis_conn, settings, notification)
    arrived, let_go = held_reply(smtp)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    held: dict = {}

    def hold_the_row_past_the_limit():
        arrived.wait(10)
        until = time.monotonic() + settings.job_timeout + 1.5
        held["it"] = _hold_the_row(pg_url, notification.id, lambda: time.monotonic() >= until)
        let_go.set()
        while time.monotonic() < until:
            held["waiting"] = max(held.get("waiting", 0), _lock_waiters(admin))
            time.sleep(0.05)

    holder = threading.Thread(target=hold_the_row_past_the_limit)
    holder.start()
    try:
        with installed_deliverer(settings, redis_conn):
            run_worker_until_idle(redis_conn)  # in this thread: RQ's time limit is a signal
    finally:
        holder.join()
        held["it"][0].join()
        held["it"][1].close()
        admin.close()

    assert held["waiting"] >= 1, "the record never waited for the row: nothing was tested"
    # The same burst run posted the callback: no reconciler pass was needed.
    assert receiver.count() == 1
    row = reload(notification.id)
    assert (row.status, row.callback_status) == (Status.SENT, "delivered")
    assert [e.to_status for e in _history(notification.id) if e.kind == "status"] == ["queued", "sending", "sent"]
    with installed_deliverer(settings, redis_conn):
        assert jobs.deliver(notification.id) == "skipped"  # the job's retry, due in a minute
    assert len(smtp.messages) == 1
    assert receiver.count() == 1


def test_a_claim_the_job_limit_cuts_off_behind_a_lock_is_not_made_after_the_job_has_gone(
        fast_settings, pg_db, pg_url, api_key, redis_conn, smtp, receiver):
    # The only attempt's claim waits for a row another session holds, past JOB_TIMEOUT. Before, the
    # server made the claim once the row was free, after the job had failed: the notification was
    # `sending` with nobody sending it, and the reconciler took it for a send its worker was lost in,
    # on this last attempt `failed` ("delivery is unknown"), its callback saying so; never sent.
    # (With attempts left: recovered as a possible duplicate, SENDING_TIMEOUT later.)
    settings = replace(fast_settings, job_timeout=2, retry_intervals=(), reconcile_grace_seconds=0, sending_timeout=1)
    notification = make_notification(api_key[0], callback_url=receiver.url)
    dispatch(redis_conn, settings, notification)
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    finished = threading.Event()
    holder, locker = _hold_the_row(pg_url, notification.id, finished.is_set)
    try:
        with installed_deliverer(settings, redis_conn):
            run_worker_until_idle(redis_conn)  # the job fails with its time limit, no retry left
        left_waiting = _lock_waiters(admin)
    finally:
        finished.set()
        holder.join()
        locker.close()
        admin.close()
    assert left_waiting == 0  # the cut-off claim was not left waiting on the server
    time.sleep(0.5)
    assert (reload(notification.id).status, reload(notification.id).attempts) == (Status.QUEUED, 0)

    time.sleep(1.1)  # past the grace and SENDING_TIMEOUT: what the reconciler would do to a lost send
    report = reconcile(settings, redis_conn)
    assert (report.requeued, report.recovered) == (1, 0)  # its job is gone; queued again, no worker lost
    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)
    row = reload(notification.id)
    assert (row.status, row.attempts, row.callback_status) == (Status.SENT, 1, "delivered")
    assert len(smtp.messages) == 1
    assert receiver.count() == 1 and receiver.calls[0].json["status"] == "sent"


def _history(notification_id: str):
    with database.connection_context():
        return store.history(store.get(notification_id))


class _Limit(Exception):
    """What a signal's handler raises in the test below, as RQ's raises JobTimeoutException."""


@pytest.mark.parametrize("nested", [False, True])  # a savepoint too: a digest's transition nests one
def test_a_signal_cutting_off_a_statement_in_a_transaction_ends_in_its_own_exception(pg_db, pg_url, api_key,
                                                                                     nested):
    # psycopg2 closes a connection whose wait a signal's handler cut off; leaving atomic(), peewee's
    # ROLLBACK on it raised InterfaceError in place of the handler's exception. RQ's time limit was
    # then taken for the database gone: a shared job (its held `sent` record and next claim share a
    # transaction) wrote the record, claimed again, and went on past its limit.
    notification = make_notification(api_key[0])
    released = threading.Event()
    holder, locker = _hold_the_row(pg_url, notification.id, released.is_set)

    def limit(signum, frame):
        raise _Limit()

    previous = signal.signal(signal.SIGALRM, limit)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(_Limit), database.connection_context(), database.atomic():
            if nested:
                with database.atomic():
                    Notification.update(subject="changed").where(Notification.id == notification.id).execute()
            else:
                Notification.update(subject="changed").where(Notification.id == notification.id).execute()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        released.set()
        holder.join()
        locker.close()
    time.sleep(0.3)  # for a statement still made once the row is free
    assert reload(notification.id).subject == "Hi"  # never committed: the transaction ended with its session
