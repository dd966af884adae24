"""Status callbacks to the caller: the signed JSON event, posting it, and whose turn it is to post it.

A callback carries two headers:
  Notifier-Event-Id:  the notification id and status, e.g. "4f…:sent", the same on every retry of the
                      event; a notification that ends again (a dead letter requeued, its digest too)
                      adds which time it ended, e.g. "4f…:failed:2", so that a receiver dropping
                      duplicates by it takes the new event
  Notifier-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" keyed with the API key's
                      callback secret>, and while that secret is being rotated (notifier.keys) a
                      second v1 keyed with the one it replaces
A receiver recomputes v1 over the raw body and rejects the call when no v1 matches or t is old.
"""

from __future__ import annotations

import base64
import hmac
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from notifier.callback_targets import DeniedTarget, Networks, SlowResolution, handlers, resolver_host
from notifier.db import UNAVAILABLE_ERRORS, discard_connection, is_postgres
from notifier.models import Notification
from notifier.redact import keyed_digest
from notifier.schemas import UtcDateTime, port_out_of_range, unsplittable

SIGNATURE_HEADER = "Notifier-Signature"
EVENT_ID_HEADER = "Notifier-Event-Id"
_dt = UtcDateTime()


class CallbackRetry(Exception):
    """The receiver was unreachable, slow, or asked us to come back (timeout, 5xx, 429)."""


class CallbackRejected(Exception):
    """The receiver refused the event for good (any other 4xx); retrying will not help."""


def event_body(notification: Notification) -> bytes:
    """The JSON event for a notification's current, final state."""
    event = {
        "event": f"notification.{notification.status}",
        "id": notification.id,
        "status": notification.status,
        "attempts": notification.attempts,
        "error": notification.last_error,
        "created_at": _dt.serialize("created_at", notification),
        "updated_at": _dt.serialize("updated_at", notification),
        "sent_at": _dt.serialize("sent_at", notification),
        "metadata": notification.metadata,
    }
    return json.dumps(event, separators=(",", ":")).encode()


def event_id(notification: Notification) -> str:
    """The Notifier-Event-Id of the event a notification owes now: "<id>:<status>", and ":<n>" after
    it for the n-th time the notification became final, from the second on."""
    base = f"{notification.id}:{notification.status}"
    return base if notification.final_moves <= 1 else f"{base}:{notification.final_moves}"


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    return keyed_digest(secret, f"{timestamp}.".encode() + body)


def sign(secret: str, body: bytes, timestamp: int, old_secret: str | None = None) -> str:
    """The Notifier-Signature header value for body sent at timestamp: a v1 for the secret, then one for
    the secret it replaces while a rotation lasts (as Stripe and Standard Webhooks sign)."""
    signed = [secret] if old_secret is None else [secret, old_secret]
    return f"t={timestamp}," + ",".join(f"v1={_digest(s, body, timestamp)}" for s in signed)


def verify(secret: str, body: bytes, header: str, tolerance: int = 300, now: float | None = None) -> bool:
    """What a receiver does: check that one v1 of the signature is body's under secret, and that it is
    recent. Any v1 may be the one: during a rotation of the secret there are two, the new one's first."""
    try:
        parts = [item.split("=", 1) for item in header.split(",")]
        (t,) = [value for name, value in parts if name == "t"]
        # int() takes other scripts' digits and signs, which sign() never writes; and it raises for
        # more digits than it converts (4,300), which a forged header may hold.
        timestamp = int(t) if t.isascii() and t.isdigit() else None
    except ValueError:
        return False
    if timestamp is None or abs((now or time.time()) - timestamp) > tolerance:
        return False
    expected = _digest(secret, body, timestamp).encode()
    # As bytes: compare_digest raises TypeError for a str holding anything beyond ASCII, which a
    # forged header may, instead of answering False.
    return any(hmac.compare_digest(expected, value.encode("utf-8", "replace"))
               for name, value in parts if name == "v1")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # Followed, a redirect turns the POST into a GET without the event (urllib's way, as browsers'),
    # and the attempt would count as delivered: the 3xx is answered as the error it is instead.
    # Refused before urllib looks at the Location at all: it first refuses one of any scheme but
    # http(s) or ftp with an error quoting the whole of it (a password, a token), which went on to the
    # worker's log as the cause of ours.
    def http_error_302(self, req, fp, code, msg, headers):
        return None  # left to HTTPDefaultErrorHandler: an HTTPError naming the code alone

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _FinalAnswer(http.client.HTTPResponse):
    # http.client reads past a 100 Continue only: any other informational answer (a 103 Early Hints
    # from the receiver or a proxy before it, a 102) was taken for the answer itself, and the event,
    # delivered, was given up as "HTTP 103". A 1xx is never the answer to a request (RFC 9110 15.2):
    # its head is read past here, where http.client reads each status line (begin(), and a proxy's
    # CONNECT), as it has no public hook between the two. An endless run of them ends at the job's
    # limit, as an answer trickled byte by byte does.
    def _read_status(self):
        version, status, reason = super()._read_status()
        while 100 <= status < 200:
            http.client.parse_headers(self.fp)
            version, status, reason = super()._read_status()
        return version, status, reason


def post(url: str, body: bytes, secret: str, event_id: str, timeout: float, old_secret: str | None = None,
         deny_networks: Networks = ()) -> int:
    """POST the event signed with secret (and old_secret, during its rotation), to no address in
    deny_networks; return the HTTP status, or raise CallbackRetry / CallbackRejected. timeout bounds
    resolving the host, connecting, and each read of the answer."""
    if unsplittable(url):
        # Stored before the API refused such a URL: no attempt can pass, and urllib's ValueError, raised
        # before any request, failed every attempt, quoting the netloc (a password too) into the log.
        raise CallbackRejected("the callback URL cannot be taken apart into host and path")
    if port_out_of_range(url):
        # Stored before the API refused such a URL: connecting would reach the port it wraps around to.
        raise CallbackRejected("the callback URL's port is not from 1 to 65535")
    url, authorization = _credentials_apart(url)
    request = urllib.request.Request(_ascii_target(url), data=body, method="POST")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", "notifier-callbacks/1")
    request.add_header(EVENT_ID_HEADER, event_id)
    request.add_header(SIGNATURE_HEADER, sign(secret, body, int(time.time()), old_secret))
    opener = urllib.request.build_opener(_NoRedirects, *handlers(deny_networks, timeout, _FinalAnswer))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status
    except DeniedTarget as exc:
        raise CallbackRejected(str(exc)) from None
    except SlowResolution as exc:
        raise CallbackRetry(str(exc)) from None
    except urllib.error.HTTPError as exc:
        # Not chained: urllib's error adds nothing to the code but the answer's reason phrase, which is
        # the receiver's to write (up to 64 KB, control characters and all) and reached the worker's log
        # as the cause.
        if exc.code == 429 or exc.code >= 500:
            raise CallbackRetry(f"HTTP {exc.code}") from None
        if 300 <= exc.code < 400:
            where = _where(exc.headers.get("Location"))
            raise CallbackRejected(f"HTTP {exc.code} to {where!r}: callbacks do not follow redirects; "
                                   "give the final URL") from None
        raise CallbackRejected(f"HTTP {exc.code}") from None
    except http.client.InvalidURL:
        # Stored before the API refused what http.client cannot write in a request (a control
        # character): no attempt can pass, and its message quotes the path and query, a token too.
        raise CallbackRejected("InvalidURL: the callback URL cannot be written in a request") from None
    except (http.client.BadStatusLine, http.client.UnknownProtocol) as exc:
        if isinstance(exc, http.client.RemoteDisconnected):
            raise CallbackRetry(f"{type(exc).__name__}: {exc}") from exc
        # Their message is the receiver's first line itself: up to 64 KB of whatever it sent (its body,
        # with no status line before it), and a NUL in it cannot be stored in the history at all. Named,
        # not quoted, and not chained either: the cause is written to the worker's log with the job.
        raise CallbackRetry(f"{type(exc).__name__}: the answer is not HTTP") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # Unreachable, slow, or not speaking HTTP (a bad status line, a dropped or truncated answer):
        # retried, and given up after the last attempt like any other failure.
        raise CallbackRetry(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from exc


def _credentials_apart(url: str) -> tuple[str, str | None]:
    """url without its user:password@, and the basic-auth header they stand for. urllib does not send
    them: it takes them for part of the host (the password for the port) and quoted them in its error,
    in the history and the worker's log."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def _ascii_target(url: str) -> str:
    """url (without credentials) with each character of its path and query beyond ASCII
    percent-encoded as UTF-8, as a browser sends such a URL (an IRI, which the API takes), and a host
    beyond ASCII in its IDNA form: http.client writes neither in the request (the Host header as
    Latin-1, a Cyrillic host not at all), and every attempt failed with a UnicodeEncodeError that no
    retry could mend."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if not netloc.isascii() and "[" not in netloc:  # a name: a port, if any, is after the last ":"
        name, colon, port = netloc.rpartition(":")
        name, port = (name, colon + port) if colon else (port, "")
        host = resolver_host(name)
        if host is None:  # stored before the API refused such a host
            raise CallbackRejected("the callback URL's host is not a domain name (an empty or over-long label, or a "
                                   "character no domain name may hold)")
        netloc = host + port
    return urlunsplit(parts._replace(netloc=netloc, path=_BEYOND_ASCII.sub(_quoted, parts.path),
                                     query=_BEYOND_ASCII.sub(_quoted, parts.query)))


_BEYOND_ASCII = re.compile(r"[^\x00-\x7f]+")


def _quoted(match: re.Match) -> str:
    return quote(match.group(), safe="")


def _where(location: str | None) -> str | None:
    """A redirect's target as an error names it (in the history, and in the worker's log): without the
    credentials, query or fragment it may carry, such as the callback URL's own token again."""
    if location is None:
        return None
    try:
        parts = urlsplit(location)
    except ValueError:
        # One urllib cannot take apart ("http://[x"): not named, as none is. Raised here, inside the
        # handler of the 3xx, it failed the attempt as an error of ours (retried, unrecorded, logged
        # with the receiver's HTTPError as its context) instead of refusing the redirect.
        return None
    where = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    # The receiver writes it (up to 64 KB): enough of it to tell where, not all of it.
    return where if len(where) <= _WHERE_CHARS else where[:_WHERE_CHARS] + "…"


_WHERE_CHARS = 200


# Status callbacks being posted hold PostgreSQL advisory locks (this class, the notification's seq in
# 31 bits). Negative, so never an API key's id, which idempotency.hold() locks with.
_CALLBACK_LOCK_CLASS = -0x63616C6C  # "call"


@contextmanager
def turn(notification: Notification) -> Iterator[bool]:
    """Whether this process may post the notification's status callback now: False while another
    process is in the middle of posting it. Two jobs for one callback run at once when Redis lost the
    first one's job while it ran (restarted empty, flushed) and the reconciler queued it again.

    PostgreSQL: a session advisory lock on the connection, held until the block ends and gone with
    the connection if the process dies. SQLite (one machine, `make run`): always True."""
    db = Notification._meta.database
    if not is_postgres(db):
        yield True
        return
    key = (_CALLBACK_LOCK_CLASS, notification.seq & 0x7FFFFFFF)
    held = None  # not known: whatever interrupts the statement may come after the server took the lock
    try:
        held = db.execute_sql("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()[0]
        yield held
    finally:
        released = held is False
        try:
            with suppress(*UNAVAILABLE_ERRORS):  # a broken session ends below, and the lock with it
                if held:
                    db.execute_sql("SELECT pg_advisory_unlock(%s, %s)", key)
                    released = True
        finally:
            if not released:
                # Taking or releasing the lock was cut short (RQ's job limit is a SIGALRM that raises
                # wherever the job is; an error): the session may still hold it. Given back to the pool
                # (close() only does that), it would make every other worker skip this callback for as
                # long as the connection lives. End the session: the lock ends with it.
                discard_connection(db)
