"""The HTTP API: create_app() builds it; `python app.py` runs it for development."""

from __future__ import annotations

import errno
import logging
import threading

from flask import Flask, jsonify, request
from marshmallow import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import run_simple

from notifier.api import docs, guards, headers, operators, tracing
from notifier.api.common import NotificationIdConverter, UserIdConverter, rate_limit_headers
from notifier.api.notifications import POST_ONLY_ALLOW, POST_ONLY_PATHS
from notifier.config import Settings
from notifier.db import UNAVAILABLE_ERRORS, database, is_postgres, patience_of
from notifier.errors import HTTP_CODES, ApiError
from notifier.keycache import KeyCache
from notifier.queues import API_TIMEOUT_SECONDS, connect_redis
from notifier.ratelimit import Limiter
from notifier.resilience import reason_of
from notifier.runtime import (
    configure_logging,
    load_settings,
    make_renderer,
    open_database,
    release_free_memory,
    warn_about_templates,
    warn_about_unsubscribe_links,
)
from notifier.service import NotificationService

logger = logging.getLogger("notifier.api")
# Redis down, unreachable or too slow (not a command it refused: that is a bug, a 500).
REDIS_UNAVAILABLE_ERRORS = (RedisConnectionError, RedisTimeoutError)
# OSError numbers of a process or machine out of what it needs, not of a fault in the request.
EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.ENOSPC})

def error_response(status: int, code: str, message: str, details=None):
    """The one error envelope every failed request gets."""
    response = jsonify(error={"code": code, "message": message, "details": details})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        response = error_response(exc.status, exc.code, exc.message, exc.details)
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError):
        return error_response(422, "validation_error", "the request has invalid fields", exc.normalized_messages())

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        response = error_response(status, HTTP_CODES.get(status, "http_error"), exc.description or exc.name)
        # Keep the headers that tell the caller what to do instead: Allow (405), WWW-Authenticate (401).
        original = exc.get_response().headers
        for name in ("Allow", "WWW-Authenticate"):
            if name in original:
                response.headers[name] = original[name]
        if status == 405 and request.path in POST_ONLY_PATHS:
            response.headers["Allow"] = POST_ONLY_ALLOW
        return response

    def _database_unavailable(exc):
        # The server's reason tells the operator what to mend (`too many connections for role ...`,
        # a database that is not accepting connections, a full disk); libpq's names no password.
        # psycopg2 gives no words at all for some (a socket it could not open, out of file descriptors).
        reason = reason_of(exc)
        logger.warning("database unavailable: %s%s", type(exc).__name__, f": {reason}" if reason else "")
        return error_response(503, "service_unavailable", "the database is unavailable; try again shortly")

    for error_class in UNAVAILABLE_ERRORS:
        app.register_error_handler(error_class, _database_unavailable)

    def _redis_unavailable(exc: RedisError):
        # The send routes store and answer 202 without Redis; what needs it to answer at all (the RQ
        # dashboard reads nothing else) is unavailable, not broken.
        logger.warning("Redis unavailable: %s", type(exc).__name__)
        return error_response(503, "service_unavailable", "Redis is unavailable; try again shortly")

    for error_class in REDIS_UNAVAILABLE_ERRORS:
        app.register_error_handler(error_class, _redis_unavailable)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")

    @app.errorhandler(OSError)
    def _out_of_resources(exc: OSError):
        # The process or the machine ran out of file descriptors or memory (a low `ulimit -n` under
        # load): a retry shortly may pass, where a 500 said the request itself was at fault.
        if exc.errno not in EXHAUSTED_ERRNOS:
            return _unexpected(exc)
        logger.warning("out of resources: %s: %s", type(exc).__name__, exc.strerror)
        return error_response(503, "service_unavailable", "the service is out of resources; try again shortly")


class Api(Flask):
    """Flask, answering OPTIONS with 204 and its Allow header alone: Flask's own answer was 200 with an
    empty text/html body, neither the JSON envelope every other answer has nor nothing."""

    def make_default_options_response(self):
        response = super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


# After a request this large (a big batch), freed memory is handed back to the system.
LARGE_REQUEST_BYTES = 64 * 1024


def create_app(settings: Settings | None = None, *, redis=None) -> Flask:
    """Build the API for settings (read from the environment when not given)."""
    settings = settings or load_settings()
    configure_logging(settings)
    warn_about_unsubscribe_links(settings)
    warn_about_templates(settings)
    # No /static/<filename>: it would serve ./static, nothing of ours. rq-dashboard's pages link their
    # icon through url_for('static'), which operators.init_app sends to the dashboard's own.
    app = Api(__name__, static_folder=None)
    # werkzeug answers a path with `//` in it by a 308 to the merged path, with an HTML body: outside
    # the error envelope, and a second request for a path no client meant. It is a 404 like any other.
    app.url_map.merge_slashes = False
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, NOTIFIER_SETTINGS=settings, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    if settings.proxy_hops:
        # Behind reverse proxies: the client's address and scheme are what the proxies say they are.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    tracing.init_app(app)  # first, so every other hook and error already has the request id
    headers.init_app(app)
    guards.init_app(app)

    open_database(settings)
    redis = redis or connect_redis(settings.redis_url, timeout=API_TIMEOUT_SECONDS)
    limiter = Limiter(settings.redis_url)
    app.extensions["notifier"] = {
        "settings": settings,
        "redis": redis,
        "limiter": limiter,
        # PostgreSQL tells the cache of every key change; SQLite cannot, so there it reads each time.
        "key_cache": (KeyCache(settings.database_url, settings.database_connect_timeout, patience_of(database))
                      if is_postgres(database) else None),
        "service": NotificationService(settings, make_renderer(settings), redis, limiter),
        # A batch is mostly CPU work under one interpreter lock: taking them one at a time per
        # process cost no throughput in `make bench`, and keeps a process's memory to one batch's
        # worth instead of one per thread (which stays allocated as a high-water mark afterwards).
        "batch_slot": threading.Lock(),
    }
    app.after_request(rate_limit_headers)

    # peewee connects on first use, so /api/health never touches the database; give it back after.
    @app.teardown_request
    def _close_db(exc):
        if not database.is_closed():
            database.close()
        if (request.content_length or 0) >= LARGE_REQUEST_BYTES:
            release_free_memory()

    from notifier.api import catalog, deadletters, events, health, notifications, suppressions, unsubscribe, users

    app.url_map.converters["user"] = UserIdConverter  # before the routes that use them
    app.url_map.converters["nid"] = NotificationIdConverter
    app.register_blueprint(health.bp)
    app.register_blueprint(notifications.bp)
    app.register_blueprint(deadletters.bp)
    for blueprint in (events.bp, users.bp, suppressions.bp, catalog.bp, unsubscribe.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(docs.bp)  # /api/openapi.json and /api/docs, built from the routes above
    operators.init_app(app)  # /rq (the RQ dashboard) and /metrics, behind operator basic auth
    register_error_handlers(app)
    return app


if __name__ == "__main__":
    _settings = load_settings()
    configure_logging(_settings)
    open_database(_settings, wait=True)  # create_app's own then finds it answering
    # run_simple, not Flask.run: that prints Flask's banner with print(), the only lines outside
    # LOG_FORMAT (plain text among JSON ones).
    run_simple("127.0.0.1", _settings.port, create_app(_settings), threaded=True)
