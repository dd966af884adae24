"""Checks every request passes before any route sees it."""

from __future__ import annotations

from flask import Flask, current_app, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException

from notifier.errors import ApiError
from notifier.httpworker import CLOSE_CONNECTION

# What reading a body can raise besides werkzeug's own 400 for a client gone mid-body: gunicorn's
# refusal of a broken chunked encoding, and a socket error or timeout (the development server's too).
_UNREADABLE_BODY = (ParseException, OSError)


def _has_nul() -> bool:
    # PostgreSQL cannot hold a NUL character in text, and the driver raises rather than send one, so
    # a NUL that reached a query (an id in the path, a filter, an API key) would be a 500.
    if "\x00" in request.path:
        return True
    if any("\x00" in name or "\x00" in value for name, value in request.args.items(multi=True)):
        return True
    return any("\x00" in value for value in request.headers.values())


def _too_large(limit: int) -> ApiError:
    # Where the body ends is not known (or not worth reading to): the connection cannot carry another
    # request, so it is closed after the answer rather than left to the server to drop unannounced.
    request.environ[CLOSE_CONNECTION] = True
    return ApiError(f"the request body is over MAX_BODY_BYTES ({limit} bytes)", status=413, code="payload_too_large")


def read_body() -> None:
    """Read the request's whole body before any route runs, and refuse one over MAX_BODY_BYTES with 413.

    Every route, whether it reads a body or not (a one-click unsubscribe, a 404, a 401), so each one
    refuses the same bodies, and none leaves part of one on a keep-alive connection: gunicorn drains
    at most 64 KiB of what the application left unread and otherwise drops the connection after an
    answer that promised to keep it, and a client's next request on it fails. The body is kept
    (request.get_data() answers from it, form parsing too), so at most MAX_BODY_BYTES a request."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if (request.content_length or 0) > limit:
        raise _too_large(limit)  # read none of it
    try:
        data = request.get_data(cache=True)
        # A chunked body over the limit: werkzeug stops reading at the limit and refuses only a read
        # past it, which get_data never makes, so the body would be cut short without a word. (The
        # server's own input, past werkzeug's limit, says whether there was more.)
        over = request.content_length is None and len(data) >= limit and request.environ["wsgi.input"].read(1)
    except ClientDisconnected as exc:
        request.environ[CLOSE_CONNECTION] = True
        # werkzeug's own words are about a browser: say what happened to the body instead.
        raise ApiError("the request body ended before its Content-Length (the client went away, or sent none "
                       "of the rest for CLIENT_TIMEOUT seconds)") from exc
    except HTTPException:
        request.environ[CLOSE_CONNECTION] = True
        raise
    except _UNREADABLE_BODY as exc:
        request.environ[CLOSE_CONNECTION] = True  # where the next request would start is unknown
        raise ApiError("the request body could not be read (a broken chunked encoding, a dropped upload, or "
                       "none of the rest for CLIENT_TIMEOUT seconds)") from exc
    if over:
        raise _too_large(limit)


def init_app(app: Flask) -> None:
    """Refuse, as 413 payload_too_large, a request whose body is over MAX_BODY_BYTES (see read_body),
    and, as 400 bad_request, one whose path, query string or headers hold a NUL character."""
    # First: a check that refuses before the body is read would leave it unread.
    app.before_request(read_body)

    @app.before_request
    def _refuse_nul():
        if _has_nul():
            raise ApiError("the path, query string and headers must not contain NUL characters")
