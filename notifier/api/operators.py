"""Operator pages: the RQ dashboard at /rq and Prometheus metrics at /metrics, behind HTTP basic auth.

rq-dashboard has no authentication of its own, and a plain GET to its requeue route requeues every
failed job, so every path under /rq is guarded, matched or not, before the dashboard's own hooks run.
Without OPERATOR_USERNAME and OPERATOR_PASSWORD configured, nobody gets in. A client address that
fails OPERATOR_AUTH_LIMIT times in its window is refused (429) until the window moves on, so the
password cannot be guessed at the speed of the API.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

import rq_dashboard
from flask import Blueprint, Flask, Response, current_app, g, request, url_for
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq_dashboard.web import setup_rq_connection
from werkzeug.datastructures import Authorization, WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from notifier import deadletters, metrics
from notifier.config import Settings
from notifier.errors import Conflict, Forbidden, NotFound, RateLimited, ServiceUnavailable
from notifier.ratelimit import parse_rate
from notifier.schemas import whole_number

logger = logging.getLogger(__name__)

REALM = "notifier operators"
DASHBOARD_PREFIX = "/rq"

bp = Blueprint("operators", __name__)


def init_app(app: Flask) -> None:
    """Mount the dashboard and the metrics, and guard both."""
    settings: Settings = app.extensions["notifier"]["settings"]
    app.config["RQ_DASHBOARD_REDIS_URL"] = settings.redis_url
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=DASHBOARD_PREFIX)
    setup_rq_connection(app)
    app.url_build_error_handlers.append(_dashboard_static)
    app.register_blueprint(bp)
    # On the app, not the blueprint: it then runs before rq-dashboard's hooks, and for paths under
    # /rq that match no route too.
    app.before_request(_guard)
    # What rq raises at rq-dashboard's actions, each a 500 before: a requeue of a job its failed
    # registry does not hold (queued, running, finished), and a job gone (expired, deleted) between
    # the guard's look and the action, as a late `sent` record takes its job out of the registry.
    app.register_error_handler(InvalidJobOperation, _not_requeueable)
    app.register_error_handler(NoSuchJobError, _job_gone)


def _dashboard_static(error, endpoint: str, values: dict) -> str | None:
    # rq-dashboard's pages link their icon through the app's `static` endpoint, which this app has none
    # of (create_app: static_folder=None): url_for raised BuildError, and every page of /rq was a 500.
    # The icon is the dashboard's own, under its guarded prefix.
    if endpoint != "static":
        return None
    return url_for(f"{rq_dashboard.blueprint.name}.static", **values)


def _not_requeueable(exc: InvalidJobOperation):
    # rq-dashboard's one action that can raise it; rq says nothing more (registry.requeue).
    return current_app.handle_user_exception(Conflict(
        "the job is not in RQ's failed registry: only a failed job can be requeued", code="not_requeueable"))


def _job_gone(exc: NoSuchJobError):
    # rq's own words name its Redis key ("No such job: rq:job:..."), not the job.
    return current_app.handle_user_exception(NotFound("no such job: it has expired or been deleted"))


def _guard() -> None:
    path = request.path
    if request.blueprint == bp.name or path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/"):
        require_operator()
        if request.blueprint == rq_dashboard.blueprint.name:
            _require_own_page()
            _require_dashboard_target()


# rq-dashboard's routes that change something: every one but GET and HEAD, and its requeue of a
# queue's failed jobs, which a GET does too.
_REQUEUE_ALL = f"{rq_dashboard.blueprint.name}.requeue_all"
# Sec-Fetch-Site, as a browser sets it: a request made by one of the dashboard's own pages, or by the
# operator (a typed address, a bookmark).
_OWN = frozenset({"same-origin", "none"})


def _require_own_page() -> None:
    """403 for a dashboard action a browser sends on behalf of another site. A browser sends an
    operator's cached basic-auth login with any request to the dashboard, so a page elsewhere could
    otherwise empty a queue, delete jobs or requeue them in the operator's name. Browsers say where a
    request comes from (Sec-Fetch-Site, which a page cannot set); a client that does not (curl, a
    script) is the operator's own. Only actions are refused: a link from elsewhere to a view opens."""
    if request.method in ("GET", "HEAD") and request.endpoint != _REQUEUE_ALL:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in _OWN:
        raise Forbidden("the dashboard takes actions from its own pages only; open it and act there",
                        {"Sec-Fetch-Site": site})


# What rq-dashboard's routes can name; it answers any other registry with an exception.
_MAX_PAGE = 2**31 - 1  # a page number and a page size: their product stays inside Redis's 64-bit indexes
_REGISTRIES = frozenset({"queued", "failed", "deferred", "started", "finished", "scheduled", "canceled"})


def _require_dashboard_target() -> None:
    """404 for a dashboard path naming what is not there: rq-dashboard answers a missing job, an
    instance beyond the one Redis configured, an unknown registry, a page or page size that is not a
    positive number and a queue with no key by raising, which would be a 500."""
    args = request.view_args or {}
    instance = args.get("instance_number")
    if instance is not None and instance >= len(current_app.config["RQ_DASHBOARD_REDIS_URL"]):
        raise NotFound(f"no dashboard instance {instance}")
    if "registry_name" in args and args["registry_name"] not in _REGISTRIES:
        raise NotFound(f"no registry named {args['registry_name']!r}; known: {', '.join(sorted(_REGISTRIES))}")
    for name in ("per_page", "page"):
        value = str(args.get(name, 1))
        # At most _MAX_PAGE: beyond, the range rq-dashboard asks Redis for is past a 64-bit index,
        # which Redis refuses with an error.
        if whole_number(value, 1, _MAX_PAGE) is None:
            raise NotFound(f"{name} must be a whole number from 1 to {_MAX_PAGE}")
    connection = current_app.redis_conn
    if request.endpoint == "rq_dashboard.queues_overview":
        # Its page catches Redis's ConnectionError itself and answers 200 "Connection Error", where
        # every other view (and a monitor probing this one) gets the 503 a RedisError is.
        connection.ping()
    if "job_id" in args and request.endpoint != "rq_dashboard.delete_job_view":  # delete answers itself
        if not Job.exists(args["job_id"], connection=connection):
            raise NotFound(f"no job {args['job_id']!r}")
    if request.endpoint == "rq_dashboard.compact_queue":
        if not connection.exists(Queue(args["queue_name"], connection=connection).key):
            raise NotFound(f"no queue {args['queue_name']!r} holds jobs")
    if request.endpoint == _REQUEUE_ALL:
        _forget_lost_jobs(Queue(args["queue_name"], connection=connection).failed_job_registry)


def _forget_lost_jobs(registry) -> None:
    """Drop the registry's entries whose job has gone: its data expired before the registry was
    cleaned (every few minutes), or Redis evicted it. rq-dashboard requeues every entry it lists and
    raised NoSuchJobError (a 500) at the first of these, after requeueing the ones before it."""
    job_ids = registry.get_job_ids(cleanup=False)
    with registry.connection.pipeline() as pipe:
        for job_id in job_ids:
            pipe.exists(Job.key_for(job_id))
        found = pipe.execute()
    for job_id, exists in zip(job_ids, found, strict=True):
        if not exists:
            registry.remove(job_id)  # what `dlq purge` does with such an entry: it goes all the same


def require_operator() -> None:
    """Let the request through only with the configured operator's basic-auth credentials."""
    ext = current_app.extensions["notifier"]
    settings: Settings = ext["settings"]
    challenge = WWWAuthenticate("basic", {"realm": REALM})
    if not (settings.operator_username and settings.operator_password):
        raise Unauthorized("operator access is not configured (set OPERATOR_USERNAME and OPERATOR_PASSWORD)",
                           www_authenticate=challenge)
    address = _client_block(request.remote_addr)  # what the limit counts by
    failures = parse_rate(settings.operator_auth_limit) if settings.operator_auth_limit else None
    if failures is not None:
        # Checked before the password, so a locked-out guesser learns nothing even when right.
        verdict = ext["limiter"].check(failures, "operator-auth", address, strict=True)
        if not verdict.allowed:
            g.rate_limit = verdict
            raise RateLimited(f"too many failed operator logins from this address; retry in {verdict.reset_seconds} s")
    auth = _authorization()
    if auth is None or auth.type != "basic":
        # Not a guess (a browser asks first without credentials): not counted.
        raise Unauthorized("operator credentials are required", www_authenticate=challenge)
    # Both compared in full, in constant time, so the answer's timing says nothing about either.
    name_ok = hmac.compare_digest((auth.username or "").encode(), settings.operator_username.encode())
    password_ok = hmac.compare_digest((auth.password or "").encode(), settings.operator_password.encode())
    if not (name_ok and password_ok):
        logger.warning("operator authentication failed for %s %s from %s", request.method, request.path,
                       request.remote_addr)
        if failures is not None:
            ext["limiter"].hit(failures, "operator-auth", address, strict=True)
        raise Unauthorized("wrong operator credentials", www_authenticate=challenge)


def _authorization() -> Authorization | None:
    """The request's Authorization header as werkzeug reads it; None when it cannot be read.

    werkzeug answers None for credentials that are not base64, but lets base64's ValueError out for a
    header holding a character beyond ASCII ("Basic é", which HTTP carries as Latin-1): a 500."""
    try:
        return request.authorization
    except ValueError:
        return None


def _client_block(address: str | None) -> str:
    """What the failed-login limit counts by: the address, or its /64 for IPv6, where one client
    holds at least a /64 and could otherwise take a fresh address for every guess."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip in _NAT64:  # IPv4 clients reaching us through NAT64: each is its embedded IPv4 address
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@bp.get("/metrics")
def scrape():
    """Prometheus metrics of every API and worker process, read from Redis now."""
    ext = current_app.extensions["notifier"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.RedisCollector(ext["redis"], dead_letters=deadletters.count))
    try:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    except (TypeError, ValueError):  # it compares a version it could not read ("version=abc") with a number
        encode, content_type = choose_encoder("")
    try:
        body = encode(registry)
    except RedisError as exc:
        raise ServiceUnavailable("Redis is unavailable; the metrics live there") from exc
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
