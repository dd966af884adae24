"""Checks every request passes before any route sees it."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

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


# RFC 3986's host (a name, an IPv4 address or a bracketed IPv6 one) and an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(?::[0-9]*)?")


_PROBES = frozenset({"/api/health", "/api/ready"})


def _bad_host() -> bool:
    # RFC 9112 3.2: an HTTP/1.1 request without a Host, or with one that is no host, is a 400. Nothing
    # of ours is built from it (links start with PUBLIC_BASE_URL, Location is a path), so this only
    # keeps the API from answering what a proxy or cache in front may have read another way.
    host = request.environ.get("HTTP_HOST")
    if host is None:
        # Except a probe: a load balancer's health check written as a bare HTTP/1.1 line (HAProxy's
        # `option httpchk GET /api/health HTTP/1.1` sends no Host) would mark every API process down.
        return request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1" and request.path not in _PROBES
    return _HOST.fullmatch(host) is None


def _not_utf8() -> bool:
    # werkzeug decodes the path and the query string with a replacement character for every byte that is
    # not UTF-8, so /api/users/%ff and /api/users/%fe named one user, "\ufffd", whom either erased. A body
    # that is not UTF-8 is refused; so is a path. (PATH_INFO is the decoded bytes as Latin-1, by WSGI.)
    # werkzeug's development server (`python app.py`, `make run`) has already put U+FFFD in PATH_INFO:
    # the request line as sent (RAW_URI, which gunicorn sets too) still has the escapes.
    try:
        request.environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        unquote_to_bytes(request.environ.get("RAW_URI", "").partition("?")[0].encode("latin-1")).decode("utf-8")
        # Its bytes as Latin-1 too: unquote_to_bytes would encode a str as UTF-8, and a byte sent as is (a
        # server that passes them on) would come out as valid UTF-8 for werkzeug to choke on (a 500).
        unquote_to_bytes(request.environ.get("QUERY_STRING", "").encode("latin-1")).decode("utf-8")
    except UnicodeError:
        return True
    return False


# A content coding (RFC 9110 8.4) or a transfer coding (RFC 9112 7) other than these is one the API
# would not undo: gunicorn hands a `gzip, chunked` body on still compressed, and a Content-Encoding is
# not decoded by anyone, so the body was refused as "not valid UTF-8", or a plain body mislabelled
# `br` was taken as it was.
_CONTENT_CODINGS = frozenset({"identity"})
_TRANSFER_CODINGS = frozenset({"chunked"})


def _codings(header: str) -> set[str]:
    return {coding.strip(" \t").lower() for coding in request.headers.get(header, "").split(",")} - {""}


def _refuse_codings() -> None:
    if unknown := _codings("Transfer-Encoding") - _TRANSFER_CODINGS:
        request.environ[CLOSE_CONNECTION] = True  # gunicorn closes it anyway
        raise ApiError(f"the transfer coding {', '.join(sorted(unknown))} is not supported: send the body as it is "
                       "(chunked or with Content-Length)", status=501, code="not_implemented")
    if request.get_data(cache=True) and (unknown := _codings("Content-Encoding") - _CONTENT_CODINGS):
        raise ApiError(f"the content coding {', '.join(sorted(unknown))} is not supported: send the body "
                       "uncompressed", status=415, code="unsupported_media_type",
                       headers={"Accept-Encoding": "identity"})


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
        end = "its last chunk" if request.content_length is None else "its Content-Length"
        raise ApiError(f"the request body ended before {end} (the client went away, or sent none of the rest "
                       "for CLIENT_TIMEOUT seconds)") from exc
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
    """Refuse, as 413 payload_too_large, a request whose body is over MAX_BODY_BYTES (see read_body);
    as 400 bad_request, one whose path, query string or headers hold a NUL character, whose path or
    query string is not UTF-8, or whose Host is missing (HTTP/1.1) or no host; and one whose body is
    compressed, as 415 unsupported_media_type (a Content-Encoding) or 501 not_implemented (a
    Transfer-Encoding besides chunked)."""
    # First: a check that refuses before the body is read would leave it unread.
    app.before_request(read_body)
    app.before_request(_refuse_codings)

    @app.before_request
    def _refuse_unreadable():
        if _not_utf8():  # first: werkzeug's request.args, which _has_nul reads, fails on such a query string
            raise ApiError("the path and query string must be UTF-8 (percent-encoded or not)")
        if _has_nul():
            raise ApiError("the path, query string and headers must not contain NUL characters")
        if _bad_host():
            raise ApiError("an HTTP/1.1 request needs one Host header naming a host (and port)")
