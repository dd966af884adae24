"""The OpenAPI 3 document, built from the app's own routes and a registry of what each one does.

Paths and methods come from Flask's url_map, so a route nobody documented still appears (with its
docstring) and `undocumented()` names it; request and response shapes come from the marshmallow
schemas through apispec."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema, fields
from werkzeug.routing import Rule

from notifier.schemas import IDEMPOTENCY_HEADER_PATTERN, IDEMPOTENCY_KEY_MAX

API_PREFIX = "/api"
TITLE = "notifier"
VERSION = "0.1.0"
IGNORED_METHODS = {"HEAD", "OPTIONS"}
JSON = "application/json"

# What each error status means; an operation may say more about its own (its 409s, say).
ERROR_DESCRIPTIONS = {
    400: "`bad_request`: a NUL character in the path, query string or a header, a path or query string that is "
         "not UTF-8, an HTTP/1.1 request without a Host (or one naming no host), or a body that cannot be read",
    401: "`unauthorized`: missing, wrong or revoked API key",
    404: "`not_found`: no such route, or nothing of yours by that id",
    409: "`conflict`",
    413: "`payload_too_large`: the body is over MAX_BODY_BYTES",
    415: "`unsupported_media_type`: the body has a Content-Encoding (gzip, br, ...): bodies are never decompressed",
    422: "`validation_error`: a field is wrong, unknown or missing; `details` names each field",
    429: "`rate_limited`: too many requests; wait for Retry-After seconds",
    503: "`service_unavailable`: the database is unreachable; nothing was stored, retrying is safe",
}
BODY_400 = ("`malformed_json`: the body is not a JSON object (not JSON, not UTF-8, nested too deeply, or naming "
            "a key twice in one object); "
            "or " + ERROR_DESCRIPTIONS[400])


# Every answer to a request with a valid API key says where the key stands against its rate limit.
RATE_LIMIT_HEADERS = {
    "RateLimit-Limit": "requests this key may make in the window",
    "RateLimit-Remaining": "requests left in the current window",
    "RateLimit-Reset": "seconds until the oldest request counted in the window leaves it (when none is left, "
                       "until one more is allowed)",
}


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, metadata={"description": "machine-readable, e.g. validation_error"})
    message = fields.String(required=True, metadata={"description": "for people"})
    details = fields.Raw(required=True, allow_none=True,
                         metadata={"description": "per-field problems, or other specifics; may be null"})


class ErrorSchema(Schema):
    """The one shape every error has."""

    error = fields.Nested(ErrorDetailSchema, required=True)


@dataclass(frozen=True)
class Op:
    """What one method of one route does, for the document."""

    summary: str
    tag: str
    ok: int = 200
    ok_schema: type[Schema] | Schema | None = None
    ok_description: str = "OK"
    ok_headers: dict[str, dict] = field(default_factory=dict)
    ok_content_type: str = JSON
    body: type[Schema] | None = None
    query: type[Schema] | None = None
    errors: dict[int, str] = field(default_factory=dict)  # beyond those the route's shape implies
    public: bool = False  # no API key needed
    uses_database: bool = True
    idempotency_header: bool = False
    description: str = ""
    retry_after: frozenset[int] = frozenset()  # error statuses of its own that carry Retry-After (429 always does)


_ARGUMENT = re.compile(r"<(?:[a-zA-Z_][a-zA-Z0-9_]*(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>")


def openapi_path(rule: Rule) -> str:
    """/api/notifications/<notification_id> as /api/notifications/{notification_id}."""
    return _ARGUMENT.sub(r"{\1}", rule.rule)


def api_routes(app: Flask) -> list[tuple[Rule, str]]:
    """Every (rule, method) under /api, in a stable order."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.rule == API_PREFIX or rule.rule.startswith(API_PREFIX + "/"):
            found.extend((rule, method) for method in sorted((rule.methods or set()) - IGNORED_METHODS))
    return sorted(found, key=lambda pair: (pair[0].rule, pair[1]))


def undocumented(app: Flask, registry: dict[tuple[str, str], Op]) -> list[str]:
    """"METHOD /path (endpoint)" for every route under /api the registry does not describe."""
    return [f"{method} {rule.rule} ({rule.endpoint})" for rule, method in api_routes(app)
            if (rule.endpoint, method) not in registry]


def stale(app: Flask, registry: dict[tuple[str, str], Op]) -> list[tuple[str, str]]:
    """Registry entries for routes the app no longer has."""
    present = {(rule.endpoint, method) for rule, method in api_routes(app)}
    return sorted(set(registry) - present)


def build(app: Flask, registry: dict[tuple[str, str], Op], path_parameters: dict[str, str]) -> dict:
    """The OpenAPI 3.0 document of every route under /api."""
    spec = APISpec(
        title=TITLE,
        version=VERSION,
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Send email notifications and follow them to the inbox. "
                             "Every response carries an X-Request-ID header."},
    )
    spec.components.security_scheme("ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    spec.components.schema("Error", schema=ErrorSchema)
    spec.components.header("X-Request-ID", {
        "description": "The caller's X-Request-ID when it was well-formed, otherwise a new id; it is in "
                       "every log line about the request",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
    })
    for name, description in RATE_LIMIT_HEADERS.items():
        spec.components.header(name, {"description": description, "schema": {"type": "string", "pattern": "^[0-9]+$"}})
    spec.components.header("Retry-After", {"description": "seconds to wait before trying again", "required": True,
                                           "schema": {"type": "string", "pattern": "^[0-9]+$"}})
    spec.components.parameter("X-Request-ID", "header", {
        "description": "Your id for this request (1 to 128 of A-Z a-z 0-9 . _ -), echoed back and logged; "
                       "anything else is replaced by a new id",
        "required": False,
        "schema": {"type": "string"},
    })
    spec.components.parameter("Idempotency-Key", "header", {
        "description": "The same key and payload return the original notification and send nothing "
                       "(header Idempotent-Replayed: true); the same key with another payload is 409. "
                       "Same as the idempotency_key field; if both are given they must match. ASCII only, given "
                       "once and without a comma (else 422): a key beyond ASCII or with a comma goes in the field",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX,
                   "pattern": IDEMPOTENCY_HEADER_PATTERN},
    })

    paths: dict[str, dict] = {}
    for rule, method in api_routes(app):
        op = registry.get((rule.endpoint, method)) or _fallback(app, rule)
        paths.setdefault(openapi_path(rule), {"rule": rule, "operations": {}})["operations"][method.lower()] = (
            _operation(rule, method, op)
        )
    for path, entry in paths.items():
        parameters = [
            {"name": name, "in": "path", "required": True, "description": path_parameters.get(name, name),
             "schema": {"type": "string", "minLength": 1}}
            for name in _arguments(entry["rule"])
        ]
        spec.path(path=path, operations=entry["operations"], parameters=parameters)
    document = spec.to_dict()
    _limit_pages(document, app.config["NOTIFIER_SETTINGS"].page_size_max)
    return document


def _limit_pages(document: dict, page_size_max: int) -> None:
    """Give each list's `limit` parameter its maximum, PAGE_SIZE_MAX, which is this install's setting."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if isinstance(parameter, dict) and parameter.get("in") == "query" and parameter["name"] == "limit":
                    parameter["schema"]["maximum"] = page_size_max


def _arguments(rule: Rule) -> list[str]:
    return _ARGUMENT.findall(rule.rule)


def _fallback(app: Flask, rule: Rule) -> Op:
    doc = (app.view_functions[rule.endpoint].__doc__ or "").strip()
    return Op(summary=doc.splitlines()[0] if doc else rule.endpoint, tag="undocumented",
              description="Not yet described in notifier/api/operations.py.")


def _response(description: str, schema=None, content_type: str = JSON, headers: dict | None = None) -> dict:
    response: dict = {"description": description, "headers": {"X-Request-ID": "X-Request-ID", **(headers or {})}}
    if schema is not None:
        response["content"] = {content_type: {"schema": schema}}
    return response


def _operation(rule: Rule, method: str, op: Op) -> dict:
    operation: dict = {
        "summary": op.summary,
        "tags": [op.tag],
        "operationId": f"{rule.endpoint}.{method.lower()}",
        "parameters": ["X-Request-ID"],
        "responses": {str(op.ok): _response(op.ok_description, op.ok_schema, op.ok_content_type, op.ok_headers)},
    }
    if op.description:
        operation["description"] = op.description
    operation["security"] = [] if op.public else [{"ApiKey": []}]
    if op.idempotency_header:
        operation["parameters"].append("Idempotency-Key")
    if op.query is not None:
        operation["parameters"].append({"in": "query", "schema": op.query})
    if op.body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": op.body}}}

    errors = _implied_errors(rule, op)
    errors.update(op.errors)
    for status in sorted(errors):
        text = errors[status] or ERROR_DESCRIPTIONS[status]
        operation["responses"][str(status)] = _response(text, "Error", headers=_error_headers(status, op))
    if not op.public:
        for status, response in operation["responses"].items():
            if status not in _BEFORE_THE_KEY or (status == "400" and op.body is not None):
                response["headers"].update({name: name for name in RATE_LIMIT_HEADERS})
    return operation


# Answered before the API key passed, so without RateLimit headers: a body over MAX_BODY_BYTES, a NUL
# character (a 400, which on a route with a body may also be malformed JSON, read after it), a
# compressed body, no key.
_BEFORE_THE_KEY = {"400", "401", "413", "415"}


def _error_headers(status: int, op: Op) -> dict:
    return {"Retry-After": "Retry-After"} if status == 429 or status in op.retry_after else {}


def _implied_errors(rule: Rule, op: Op) -> dict[int, str]:
    """{status: description, or "" for the usual one} of the errors the route's shape implies."""
    # A NUL character anywhere in the request line or headers; a body over MAX_BODY_BYTES, which every
    # route refuses (guards.read_body), one that takes none too.
    statuses = [400, 413]
    if op.body is not None:
        statuses += [415, 422]
    if op.query is not None:
        statuses.append(422)
    if not op.public:
        statuses += [401, 429]
    if _arguments(rule):
        statuses.append(404)  # a path segment that names nothing of yours, or that is no route at all
    if op.uses_database:
        statuses.append(503)
    errors = dict.fromkeys(statuses, "")
    if op.body is not None:
        errors[400] = BODY_400
    return errors
