"""Operator access: the RQ dashboard at /rq opens only with the operator's basic-auth credentials."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rq import Queue
from rq.job import Job

from notifier.config import Settings
from notifier.errors import ConfigError
from notifier.models import Priority
from notifier.queues import QUEUE_NAMES, all_queues, connect_redis, job_id_for
from tests.helpers import LITERAL, installed_deliverer, reload, run_worker_until_idle
from tests.operators import CHALLENGE, OPERATOR, operator_client

DEFAULT_QUEUE = QUEUE_NAMES[Priority.DEFAULT]


@pytest.fixture
def ops(pg_settings, pg_db, redis_conn):
    """A client of the API with the test operator configured."""
    return operator_client(pg_settings, redis_conn)


def _assert_refused(response) -> None:
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    body = response.get_json()
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"]
    assert body["error"]["details"] is None


def _failed_jobs(redis_conn) -> set[str]:
    return {job_id for queue in all_queues(redis_conn) for job_id in queue.failed_job_registry.get_job_ids()}


@pytest.fixture
def dead_letter(ops, headers, pg_settings, redis_conn, smtp) -> str:
    """A notification refused for good by the SMTP server: failed, its job in RQ's failed registry."""
    smtp.replies.append("550 5.7.1 message rejected by policy")
    response = ops.post("/api/notifications/send", json=LITERAL, headers=headers)
    assert response.status_code == 202
    notification_id = response.get_json()["id"]
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)
    assert reload(notification_id).status == "failed"
    assert _failed_jobs(redis_conn) == {job_id_for(notification_id)}
    return notification_id


def test_dashboard_without_credentials_is_401_with_a_basic_challenge(ops):
    _assert_refused(ops.get("/rq/"))


@pytest.mark.parametrize(
    "auth",
    [(OPERATOR[0], "wrong"), ("someone", OPERATOR[1]), (OPERATOR[0], ""), ("", ""), (OPERATOR[0].upper(), OPERATOR[1])],
)
def test_dashboard_with_wrong_credentials_is_401(ops, auth):
    _assert_refused(ops.get("/rq/", auth=auth))


@pytest.mark.parametrize("header", ["Basic \u00e9", "Basic \u00e9\u00e9\u00e9\u00e9", "Basic %%%", "Basic"])
@pytest.mark.parametrize("path", ["/rq/", "/metrics"])
def test_credentials_that_cannot_be_read_are_401_not_a_500(ops, path, header):
    # HTTP carries a header beyond ASCII as Latin-1 (gunicorn hands it on so): werkzeug let base64's
    # ValueError out of request.authorization for it, a 500 with a traceback in the log.
    _assert_refused(ops.get(path, headers={"Authorization": header}))


@pytest.mark.parametrize("auth", [None, ("", ""), ("operator", ""), ("admin", "admin"), OPERATOR])
def test_dashboard_is_closed_to_everyone_when_no_operator_is_configured(client, auth):
    # The stock app fixture configures no operator: no guess, not even an empty one, gets in.
    response = client.get("/rq/", auth=auth)
    _assert_refused(response)
    assert "not configured" in response.get_json()["error"]["message"]


def test_dashboard_opens_with_the_operator_credentials(ops, headers, redis_conn):
    assert ops.post("/api/notifications/send", json=LITERAL, headers=headers).status_code == 202

    page = ops.get("/rq/", auth=OPERATOR)
    assert page.status_code == 200
    assert b"<title>RQ dashboard" in page.data
    # Its icon is linked through the app's `static` endpoint, which the app does not have: the
    # dashboard's own, under /rq (the guard's), not a BuildError and a 500.
    assert b'href="/rq/static/favicon.ico"' in page.data
    assert ops.get("/rq/static/favicon.ico", auth=OPERATOR).status_code == 200
    queues = ops.get("/rq/0/data/queues.json", auth=OPERATOR)
    assert queues.status_code == 200
    by_name = {q["name"]: q for q in queues.get_json()["queues"]}
    assert by_name[DEFAULT_QUEUE]["count"] == 1
    assert ops.get("/rq/0/data/workers.json", auth=OPERATOR).status_code == 200


def test_every_path_under_rq_is_guarded_even_unknown_ones(ops):
    for path in ("/rq", "/rq/0/view/workers", "/rq/static/css/main.css", "/rq/no/such/page", "/rq/0/data/queues.json"):
        _assert_refused(ops.get(path))


def test_api_keys_do_not_open_the_dashboard(ops, api_key):
    _, plaintext = api_key
    _assert_refused(ops.get("/rq/", headers={"X-API-Key": plaintext}))
    _assert_refused(ops.get("/rq/", auth=(plaintext, plaintext)))
    _assert_refused(ops.get("/rq/", headers={"Authorization": f"Bearer {plaintext}"}))


def test_dashboard_actions_without_credentials_are_401_and_change_nothing(ops, dead_letter, redis_conn):
    job_id = job_id_for(dead_letter)
    actions = [
        ("GET", f"/rq/requeue/{DEFAULT_QUEUE}"),  # the plain GET that would requeue every failed job
        ("POST", f"/rq/requeue/{DEFAULT_QUEUE}"),
        ("POST", f"/rq/job/{job_id}/requeue"),
        ("POST", f"/rq/job/{job_id}/delete"),
        ("POST", f"/rq/queue/{DEFAULT_QUEUE}/failed/empty"),
        ("POST", f"/rq/queue/{DEFAULT_QUEUE}/queued/empty"),
        ("POST", f"/rq/queue/{DEFAULT_QUEUE}/compact"),
    ]
    for method, path in actions:
        _assert_refused(ops.open(path, method=method))
        _assert_refused(ops.open(path, method=method, auth=(OPERATOR[0], "wrong")))

    assert _failed_jobs(redis_conn) == {job_id}
    assert redis_conn.exists(f"rq:job:{job_id}")
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).count == 0
    assert reload(dead_letter).status == "failed"


def test_dashboard_lists_a_failed_job_and_its_details(ops, dead_letter):
    job_id = job_id_for(dead_letter)

    listing = ops.get(f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/8/asc/1.json", auth=OPERATOR)
    assert listing.status_code == 200
    assert [job["id"] for job in listing.get_json()["jobs"]] == [job_id]
    detail = ops.get(f"/rq/0/data/job/{job_id}.json", auth=OPERATOR)
    assert detail.status_code == 200
    assert detail.get_json()["status"] == "failed"
    assert "550" in detail.get_json()["exc_info"]
    assert ops.get(f"/rq/0/view/job/{job_id}", auth=OPERATOR).status_code == 200


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/rq/0/data/job/no-such-job.json"),
    ("GET", "/rq/0/view/job/no-such-job"),
    ("POST", "/rq/job/no-such-job/requeue"),
    ("GET", "/rq/1/view/queues"),  # one Redis is configured: instance 0
    ("GET", "/rq/1/data/queues.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/no-such-registry/8/asc/1.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/eight/asc/1.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/0/asc/1.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/8/asc/one.json"),
    # Past Redis's 64-bit indexes, which it refused with an error (a 500, then a 503 "Redis is unavailable").
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/99999999999999999999/asc/1.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/8/asc/99999999999999999999.json"),
    ("GET", f"/rq/0/view/jobs/{DEFAULT_QUEUE}/failed/8/asc/99999999999999999999"),
    # More digits than int() reads (4,300): a 500 (behind gunicorn's 4 KB request line, `make run`'s server).
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/{'9' * 4301}/asc/1.json"),
    ("GET", f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/8/asc/{'1' * 4301}.json"),
    ("POST", "/rq/queue/no-such-queue/compact"),
])
def test_dashboard_paths_naming_nothing_are_404_in_the_envelope(ops, method, path):
    """rq-dashboard itself answers these with an exception (a 500): a missing job, an instance or a
    registry that is not there, a page size that is not a number or is 0, a queue with no key."""
    response = ops.open(path, method=method, auth=OPERATOR)
    assert response.status_code == 404, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "not_found"
    assert set(response.get_json()["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize("path", [
    "/rq/",  # its page said "Connection Error" with a 200
    "/rq/0/data/queues.json",
    "/rq/0/data/workers.json",
    f"/rq/0/data/jobs/{DEFAULT_QUEUE}/failed/8/asc/1.json",
    "/rq/0/view/job/notification-x",
    "/metrics",
])
def test_operator_pages_answer_503_in_the_envelope_while_redis_is_away(pg_settings, pg_db, path):
    """rq-dashboard's JSON routes (and the check of a job it names) raised Redis's ConnectionError: a 500."""
    away = replace(pg_settings, redis_url="redis://127.0.0.1:1/0")
    ops = operator_client(away, connect_redis(away.redis_url))
    response = ops.get(path, auth=OPERATOR)
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "service_unavailable"
    assert set(response.get_json()["error"]) == {"code", "message", "details"}


def test_dashboard_requeue_never_resends_a_failed_notification(ops, dead_letter, pg_settings, redis_conn, smtp):
    # The dashboard's requeue only re-runs the RQ job; the job finds the notification failed in the
    # database and sends nothing. (`python -m notifier dlq requeue` is the way to send it again.)
    response = ops.get(f"/rq/requeue/{DEFAULT_QUEUE}", auth=OPERATOR)
    assert response.status_code == 200
    assert response.get_json()["count"] == 1
    with installed_deliverer(pg_settings, redis_conn):
        run_worker_until_idle(redis_conn)

    assert reload(dead_letter).status == "failed"
    assert smtp.count() == 0


def test_dashboard_requeue_of_a_job_that_has_not_failed_is_409_and_changes_nothing(ops, headers, redis_conn):
    # rq refuses to requeue a job its failed registry does not hold (InvalidJobOperation): it was a 500.
    notification_id = ops.post("/api/notifications/send", json=LITERAL, headers=headers).get_json()["id"]
    job_id = job_id_for(notification_id)

    response = ops.post(f"/rq/job/{job_id}/requeue", auth=OPERATOR)

    assert response.status_code == 409, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "not_requeueable"
    assert set(response.get_json()["error"]) == {"code", "message", "details"}
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).job_ids == [job_id]
    assert reload(notification_id).status == "queued"


def test_dashboard_requeue_all_passes_over_failed_entries_whose_job_has_gone(ops, dead_letter, redis_conn):
    # A failed registry's entry outlives its job when the job's data expired first (the registry is
    # cleaned every few minutes) or Redis evicted it: rq-dashboard requeued the jobs listed before it,
    # then raised NoSuchJobError at it, a 500.
    failed = Queue(DEFAULT_QUEUE, connection=redis_conn).failed_job_registry
    redis_conn.zadd(failed.key, {"notification-gone": 9_999_999_999})

    response = ops.get(f"/rq/requeue/{DEFAULT_QUEUE}", auth=OPERATOR)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["count"] == 1
    assert failed.get_job_ids(cleanup=False) == []
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).job_ids == [job_id_for(dead_letter)]


def test_a_job_gone_between_the_guards_look_and_the_requeue_is_404(ops, monkeypatch):
    # The guard saw it; it expired, or a late `sent` record took it out, before rq-dashboard acted:
    # rq's NoSuchJobError was a 500.
    monkeypatch.setattr(Job, "exists", classmethod(lambda cls, job_id, connection=None: True))

    response = ops.post("/rq/job/notification-gone-meanwhile/requeue", auth=OPERATOR)

    assert response.status_code == 404, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "not_found"


def test_operator_credentials_are_read_from_the_environment():
    settings = Settings.from_env({"OPERATOR_USERNAME": " ops ", "OPERATOR_PASSWORD": " s3cret "})

    assert (settings.operator_username, settings.operator_password) == ("ops", " s3cret ")
    assert "s3cret" not in repr(settings)
    assert (Settings.from_env({}).operator_username, Settings.from_env({}).operator_password) == ("", "")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OPERATOR_USERNAME": "ops"}, "OPERATOR_PASSWORD"),
        ({"OPERATOR_PASSWORD": "s3cret"}, "OPERATOR_USERNAME"),
        ({"OPERATOR_USERNAME": "ops:root", "OPERATOR_PASSWORD": "s3cret"}, "OPERATOR_USERNAME"),
    ],
)
def test_half_an_operator_pair_or_a_colon_in_the_name_stops_start_up(env, named):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.setting == named


def _throttled_ops(pg_settings, redis_conn, **changes):
    return operator_client(replace(pg_settings, **{"operator_auth_limit": "3/minute", **changes}), redis_conn)


def _from(address: str) -> dict:
    return {"REMOTE_ADDR": address}


def test_repeated_wrong_operator_passwords_lock_out_that_address(pg_settings, pg_db, redis_conn, caplog):
    ops = _throttled_ops(pg_settings, redis_conn)
    guesser, colleague = _from("203.0.113.7"), _from("198.51.100.2")
    for guess in ("hunter2", "letmein", "password"):
        _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], guess), environ_base=guesser))

    # The fourth try is refused before the password is looked at, the right one included.
    locked = ops.get("/metrics", auth=OPERATOR, environ_base=guesser)
    assert locked.status_code == 429
    assert locked.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(locked.headers["Retry-After"]) <= 60
    assert ops.get("/rq/", auth=OPERATOR, environ_base=guesser).status_code == 429
    # Another address is not locked out by someone else's guessing.
    assert ops.get("/metrics", auth=OPERATOR, environ_base=colleague).status_code == 200
    assert "from 203.0.113.7" in caplog.text and "hunter2" not in caplog.text


def test_wrong_operator_passwords_are_still_limited_while_redis_is_away(pg_settings, pg_db, caplog):
    # The limit lived in Redis alone: with Redis down every guess was free, and the right password
    # answered 503 where a wrong one answered 401. Each process counts them meanwhile.
    away = replace(pg_settings, redis_url="redis://127.0.0.1:1/0", operator_auth_limit="3/minute")
    ops = operator_client(away, connect_redis(away.redis_url))
    guesser = _from("203.0.113.8")
    for guess in ("hunter2", "letmein", "password"):
        _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], guess), environ_base=guesser))

    assert ops.get("/metrics", auth=OPERATOR, environ_base=guesser).status_code == 429
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("198.51.100.3")).status_code == 503
    assert "rate limit counted in this process only, Redis unreachable" in caplog.text


def test_right_logins_and_credential_less_asks_are_never_counted(pg_settings, pg_db, redis_conn):
    ops = _throttled_ops(pg_settings, redis_conn)
    for _ in range(5):
        _assert_refused(ops.get("/rq/", environ_base=_from("192.0.2.9")))  # a browser asks first
        assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("192.0.2.9")).status_code == 200
    _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], "wrong"), environ_base=_from("192.0.2.9")))
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("192.0.2.9")).status_code == 200


def test_an_empty_operator_auth_limit_counts_nothing(pg_settings, pg_db, redis_conn):
    ops = _throttled_ops(pg_settings, redis_conn, operator_auth_limit="")
    for _ in range(12):
        _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], "wrong")))
    assert ops.get("/metrics", auth=OPERATOR).status_code == 200


def test_forwarded_for_names_the_client_only_behind_configured_proxies(pg_settings, pg_db, redis_conn):
    proxy = _from("10.0.0.5")
    direct = _throttled_ops(pg_settings, redis_conn)
    for n in range(3):  # a guesser cannot dodge the count by making up X-Forwarded-For
        _assert_refused(direct.get("/metrics", auth=(OPERATOR[0], "wrong"), environ_base=proxy,
                                   headers={"X-Forwarded-For": f"203.0.113.{n}"}))
    assert direct.get("/metrics", auth=OPERATOR, environ_base=proxy).status_code == 429

    redis_conn.flushdb()
    behind = _throttled_ops(pg_settings, redis_conn, proxy_hops=1)
    for _ in range(3):
        _assert_refused(behind.get("/metrics", auth=(OPERATOR[0], "wrong"), environ_base=proxy,
                                   headers={"X-Forwarded-For": "203.0.113.7"}))
    assert behind.get("/metrics", auth=OPERATOR, environ_base=proxy,
                      headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 429
    # The proxy's other clients still get in.
    assert behind.get("/metrics", auth=OPERATOR, environ_base=proxy,
                      headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200


def test_operator_auth_limit_and_proxy_hops_are_read_from_the_environment():
    assert Settings.from_env({}).operator_auth_limit == "10/minute"
    assert Settings.from_env({"OPERATOR_AUTH_LIMIT": " "}).operator_auth_limit == ""
    assert Settings.from_env({"PROXY_HOPS": "2"}).proxy_hops == 2
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"PROXY_HOPS": "-1"})
    assert caught.value.setting == "PROXY_HOPS"


def test_ipv6_guesses_count_per_64_and_mapped_ipv4_as_ipv4(pg_settings, pg_db, redis_conn):
    ops = _throttled_ops(pg_settings, redis_conn)
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):  # one client takes a new address per guess
        _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], "wrong"), environ_base=_from(host)))
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("2001:db8::99")).status_code == 429
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("2001:db8:0:1::1")).status_code == 200

    for _ in range(3):
        _assert_refused(ops.get("/metrics", auth=(OPERATOR[0], "wrong"), environ_base=_from("::ffff:203.0.113.7")))
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("203.0.113.7")).status_code == 429
    # Through NAT64 each IPv4 client is its own: one guesser does not lock out the others.
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("64:ff9b::cb00:7107")).status_code == 429  # .7
    assert ops.get("/metrics", auth=OPERATOR, environ_base=_from("64:ff9b::c633:6402")).status_code == 200


@pytest.mark.parametrize("name", ["OPERATOR_AUTH_LIMIT", "RATE_LIMIT", "RECIPIENT_CAP"])
@pytest.mark.parametrize("rate", ["0/minute", "10/minute;20/day", "lots", "1/99999999999999999999 seconds",
                                  "1000000000001/second", "1/1001 years", "5/0 seconds",
                                  "1 per" + " " * 40 + "second"])
def test_a_rate_must_be_one_rate_within_bounds(name, rate):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: rate})
    assert caught.value.setting == name


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_dashboard_actions_a_browser_sends_for_another_site_are_403_and_change_nothing(ops, dead_letter, redis_conn,
                                                                                      site):
    # A browser sends an operator's cached basic-auth login along with a request another site's page
    # makes: that page could empty queues or delete jobs. It says where the request comes from.
    job_id = job_id_for(dead_letter)
    actions = [
        ("GET", f"/rq/requeue/{DEFAULT_QUEUE}"),
        ("POST", f"/rq/requeue/{DEFAULT_QUEUE}"),
        ("POST", f"/rq/job/{job_id}/requeue"),
        ("POST", f"/rq/job/{job_id}/delete"),
        ("POST", f"/rq/queue/{DEFAULT_QUEUE}/failed/empty"),
        ("POST", f"/rq/queue/{DEFAULT_QUEUE}/compact"),
    ]
    for method, path in actions:
        response = ops.open(path, method=method, auth=OPERATOR, headers={"Sec-Fetch-Site": site})
        assert response.status_code == 403, (method, path)
        assert response.get_json()["error"]["code"] == "forbidden"
    assert _failed_jobs(redis_conn) == {job_id}
    assert redis_conn.exists(f"rq:job:{job_id}")

    # A link from elsewhere still opens a view; the dashboard's own pages and the operator's own
    # clients (no Sec-Fetch-Site: curl, a script) still act.
    assert ops.get(f"/rq/0/view/job/{job_id}", auth=OPERATOR, headers={"Sec-Fetch-Site": site}).status_code == 200
    own = ops.post(f"/rq/job/{job_id}/requeue", auth=OPERATOR, headers={"Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200
    assert _failed_jobs(redis_conn) == set()
    assert ops.get(f"/rq/requeue/{DEFAULT_QUEUE}", auth=OPERATOR).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/rq/"])
def test_options_of_an_operator_page_answers_204_with_allow_and_no_body(ops, path):
    _assert_refused(ops.options(path))
    response = ops.options(path, auth=OPERATOR)
    assert response.status_code == 204, response.get_data(as_text=True)
    assert response.get_data() == b"" and "Content-Type" not in response.headers
    assert "GET" in response.headers["Allow"].split(", ")


@pytest.mark.parametrize("rate", ["2000000000/day", "1/3650 days", "100000000000/second", "1/1000 years"])
def test_a_rate_redis_takes_is_taken(rate):
    assert Settings.from_env({"RATE_LIMIT": rate}).rate_limit == rate
