"""What every blueprint shares: the JSON body, the API key, the service."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from flask import current_app, g, request
from marshmallow import Schema, ValidationError
from werkzeug.routing import BaseConverter
from werkzeug.routing import ValidationError as RoutingValidationError

from notifier import keys
from notifier.errors import ApiError, RateLimited, Unauthorized, Unprocessable
from notifier.models import ApiKey
from notifier.ratelimit import key_rate
from notifier.schemas import IDEMPOTENCY_HEADER, IdempotencyHeaderSchema, PageQuerySchema, UserPathSchema
from notifier.service import NotificationService

API_KEY_HEADER = "X-API-Key"
_SURROGATE = re.compile("[\\ud800-\\udfff]")
# How a NUL or a surrogate can reach a parsed body: strict JSON holds neither raw (a control character
# inside a string is refused, and the body was decoded as UTF-8 first), only as \u escapes.
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_user_path = UserPathSchema()
_idempotency_header = IdempotencyHeaderSchema()


def service() -> NotificationService:
    return current_app.extensions["notifier"]["service"]


def require_api_key() -> None:
    """before_request hook: the caller must present a live API key."""
    ext = current_app.extensions["notifier"]
    # Blanks around a header's value are not part of it (RFC 9110 5.5): gunicorn drops them and Flask's
    # development server did not, so a key with a trailing space worked under one and was 401 under the other.
    key = keys.authenticate((request.headers.get(API_KEY_HEADER) or "").strip(" \t") or None, ext["key_cache"])
    if key is None:
        raise Unauthorized(f"a valid {API_KEY_HEADER} header is required")
    g.api_key = key
    verdict = ext["limiter"].hit(key_rate(key.rate_limit, ext["settings"].rate_limit), "key", str(key.id))
    g.rate_limit = verdict
    if not verdict.allowed:
        raise RateLimited(f"over this key's rate limit of {verdict.limit} requests; retry in {verdict.reset_seconds} s")


def rate_limit_headers(response):
    """after_request hook: every answer to a keyed request says where the caller stands."""
    verdict = g.get("rate_limit")
    if verdict is not None:
        response.headers.update(verdict.headers())
    return response


def current_key() -> ApiKey:
    return g.api_key


def idempotency_header() -> str | None:
    """The request's Idempotency-Key header, if any, held to what the idempotency_key field takes and
    to what a header carries whole (ValidationError, naming the header, becomes a 422)."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    return None if value is None else _idempotency_header.load({IDEMPOTENCY_HEADER: value})["key"]


def page_query(schema: PageQuerySchema, decode_cursor: Callable[[str], object | None]) -> dict:
    """A list request's query string, as every list reads it: loaded by schema (an unknown parameter,
    or one given twice, is 422, as in a body), `limit` at most PAGE_SIZE_MAX, and `cursor`, when
    given, replaced by what decode_cursor reads of it (None: a cursor this list did not write, 422)."""
    repeated = sorted({name for name in request.args if len(request.args.getlist(name)) > 1})
    if repeated:
        # status=queued&status=failed read as the first alone: the caller got a page of one status
        # and no sign the other was dropped.
        raise Unprocessable(f"{repeated[0]} is given more than once", {n: ["given more than once"] for n in repeated})
    args = schema.load(request.args.to_dict())
    max_page = current_app.extensions["notifier"]["settings"].page_size_max
    if args["limit"] > max_page:
        raise Unprocessable(f"limit may be at most {max_page}", {"limit": [f"must be at most {max_page}"]})
    if "cursor" in args:
        args["cursor"] = decode_cursor(args["cursor"])
        if args["cursor"] is None:
            raise Unprocessable("the cursor is not valid", {"cursor": ["not a cursor from this API"]})
    return args


def request_body() -> bytes:
    """The whole request body: guards.read_body read it (and refused one over MAX_BODY_BYTES) before
    any route ran."""
    return request.get_data(cache=True)


# Routes of their own under /api/notifications that take only POST: never a notification id.
POST_ONLY_NAMES = frozenset({"send", "batch", "send-verification"})


class NotificationIdConverter(BaseConverter):
    """<nid:notification_id>: a notification id in a path, in either case. Ours are UUIDs written
    lower-case, and a UUID's hex digits name the same id in capitals (RFC 9562 asks that they be
    read so), which some callers' UUID types print."""

    def to_python(self, value: str) -> str:
        if value in POST_ONLY_NAMES:
            # Not an id: werkzeug then answers a GET of /send 405 as it routes, before the API key is
            # looked at, as every other 405. As a GET of /<id>, it was 401 without a key, and with one
            # a 405 that counted against the key's rate.
            raise RoutingValidationError()
        return value.lower()


class UserIdConverter(BaseConverter):
    """<user:user_id>: a user id in a path, "/" included (org/7, as org/7 or org%2F7), as a send takes it.

    Not part-isolating, so the rest of the route (/preferences, /stats) is matched after it, and an id
    like "/x", "x/" or "a//b" is matched as it is instead of being redirected to a merged-slash URL,
    which would name another user."""

    regex = "(?s:.+?)"  # line breaks too: a body's user_id may hold them
    part_isolating = False


def path_user_id(user_id: str) -> str:
    """A user id from the path, held to the limits of one in a body (ValidationError becomes a 422)."""
    return _user_path.load({"user_id": user_id})["user_id"]


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _DuplicateName(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _unique_names(pairs: list[tuple[str, object]]) -> dict:
    # {"to": "a@x", "to": "b@x"} was read as its last "to", where another parser in the caller's path
    # (a proxy's filter, a signature check, a log) may read the first: the message then went to
    # someone the checked request never named. RFC 8259 leaves such an object's meaning open.
    found = dict(pairs)
    if len(found) != len(pairs):
        seen = set()
        raise _DuplicateName(next(name for name, _ in pairs if name in seen or seen.add(name)))
    return found


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a number, but one no JSON can carry back
        raise ValueError(f"{text} is out of range")
    return value


def json_body(schema: Schema) -> dict:
    """The request's JSON object, loaded through schema (ValidationError becomes a 422)."""
    body, escaped = _parsed()
    bad = _unstorable_text(body) if escaped else None
    if bad:
        raise ValidationError(bad)
    return schema.load(body)


def json_items(schema: Schema, field: str) -> tuple[dict, dict[int, dict]]:
    """json_body() for a body whose `field` lists items the route validates one by one (a batch's
    notifications): the body loaded through schema, and {index: problems} for the items holding
    text no column may hold, so that such an item is refused alone, as any other invalid one."""
    body, escaped = _parsed()
    bad = _unstorable_text({name: value for name, value in body.items() if name != field}) if escaped else None
    if bad:
        raise ValidationError(bad)
    loaded = schema.load(body)
    items = body.get(field) if escaped else None
    if not isinstance(items, list):
        return loaded, {}
    return loaded, {index: problems for index, item in enumerate(items)
                    if isinstance(item, dict) and (problems := _unstorable_text(item))}


def _parsed() -> tuple[dict, bool]:
    """The request's JSON object, and whether its text may hold a NUL or an unpaired surrogate."""
    try:
        # JSON on the wire is UTF-8 (RFC 8259); the parser alone would let encoded surrogates through.
        text = request_body().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("the request body is not valid UTF-8", code="malformed_json") from exc
    try:
        # The text just decoded, not the bytes: given bytes, the parser would also take UTF-16 and
        # UTF-32 (which decode as "UTF-8" too, ASCII with NULs between), and the escape check
        # must read what the parser reads.
        # NaN and Infinity, which Python's parser takes by default, are not JSON: stored and echoed
        # back, they would make answers and status callbacks that strict parsers refuse.
        body = current_app.json.loads(text, parse_constant=_no_constant, parse_float=_finite,
                                      object_pairs_hook=_unique_names)
    except _DuplicateName as exc:
        raise ApiError(f"the request body names {exc.name[:100]!r} twice in one object",
                       code="malformed_json") from exc
    except ValueError as exc:  # not JSON
        raise ApiError("the request body is not valid JSON", code="malformed_json") from exc
    except RecursionError as exc:  # nested deeper than Python's parser goes
        raise ApiError("the request body is nested too deeply", code="malformed_json") from exc
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="malformed_json")
    return body, _UNSTORABLE_ESCAPE.search(text) is not None


def _unstorable_text(body: dict) -> dict:
    """{field: [problem]} for strings no database column may hold: NUL characters, which PostgreSQL
    refuses, and unpaired surrogates (a JSON escape like \\ud800), which are not Unicode text."""
    problems: dict[str, list[str]] = {}
    stack = [*body.items(), *((name, name) for name in body)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((field, item) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((field, item) for item in value)
        elif isinstance(value, str) and field not in problems:
            if "\x00" in value:
                problems[field] = ["must not contain NUL characters"]
            elif _SURROGATE.search(value):
                problems[field] = ["must be valid Unicode text (no unpaired surrogates)"]
    return problems
