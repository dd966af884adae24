"""Request ids and the access log: every response says which request it was, and so does every log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from notifier import logs
from notifier.consent import ADDRESS_KEY_PREFIX
from notifier.redact import mask_address

REQUEST_ID_HEADER = "X-Request-ID"
# What a caller's own id may look like; anything else (too long, odd characters) is replaced, so a
# header can never smuggle line breaks or markup into the logs.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

SECRET_VIEW_ARGS = {"token"}
# Routes logged as their pattern whatever their arguments: an erasure's line must not keep whom it erased.
PATTERN_ONLY_ENDPOINTS = {"users.erase_user"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

access_log = logging.getLogger("notifier.api.access")


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is well-formed, otherwise a new one."""
    # Nor one that reads as a secret (an API key, a callback secret): the id goes into every log line
    # about the request, as it is, and into the meta of the RQ jobs it queues, and a caller that put its
    # key there by mistake had it logged whole.
    if header and _VALID_REQUEST_ID.fullmatch(header) and logs.redact(header) == header:
        return header
    return uuid.uuid4().hex


def _loggable_path() -> str:
    # The path only: query strings may carry addresses, and bodies are never logged. A route whose
    # path holds a credential (an unsubscribe token) is logged as its pattern.
    rule = request.url_rule
    if rule is not None and (rule.endpoint in PATTERN_ONLY_ENDPOINTS
                             or any(name in SECRET_VIEW_ARGS for name in rule.arguments)):
        return rule.rule
    path = request.path
    args = request.view_args or {}
    # An address in the path (/api/suppressions/<email>, email:<address> as a user id), masked whole:
    # the log's own pattern stops at "/", which an address may hold (sales/lead@example.com).
    if rule is None and "@" in path:
        rule, args = _route_of_another_method()
        if rule is None:
            # No route to say where it starts (a 404): all but the first two words, whatever they are
            # (a local part may be made of the routes' own words: users/preferences/ann@...).
            path = "/".join([*path.split("/")[:3], _masked("/".join(path.split("/")[3:]))])
    if rule is not None and any(isinstance(value, str) and "@" in value for value in args.values()):
        path = _VIEW_ARG.sub(lambda m: _masked(args.get(m.group(1), m.group(0))), rule.rule)
    # A decoded %0A must not start a forged line in a text log.
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)


_VIEW_ARG = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")


def _route_of_another_method():
    """(rule, view args) of the route a 405's path matched with a method it takes; (None, {})."""
    refused = request.routing_exception
    if not isinstance(refused, MethodNotAllowed) or not refused.valid_methods:
        return None, {}
    adapter = current_app.url_map.bind_to_environ(request.environ)
    try:
        return adapter.match(method=next(iter(refused.valid_methods)), return_rule=True)
    except HTTPException:
        return None, {}


def _masked(value) -> str:
    if not isinstance(value, str) or "@" not in value:
        return str(value)
    prefix = ADDRESS_KEY_PREFIX if value.startswith(ADDRESS_KEY_PREFIX) else ""
    return prefix + mask_address(value[len(prefix):])


def init_app(app: Flask) -> None:
    """Give each request an id (the caller's, or a new one), echo it, and log one line per request."""

    @app.before_request
    def _begin():
        g.request_started = time.monotonic()
        g.request_id_token = logs.request_id.set(request_id_from(request.headers.get(REQUEST_ID_HEADER)))

    @app.after_request
    def _end(response: Response) -> Response:
        request_id = logs.request_id.get()
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("request_started")
        duration_ms = round((time.monotonic() - started) * 1000, 1) if started is not None else None
        path = _loggable_path()
        access_log.info("%s %s %s", request.method, path, response.status_code,
                        extra={"method": request.method, "path": path, "status": response.status_code,
                               "duration_ms": duration_ms})
        return response

    @app.teardown_request
    def _forget(exc):
        token = g.pop("request_id_token", None)
        if token is not None:
            logs.request_id.reset(token)
