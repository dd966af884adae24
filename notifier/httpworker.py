"""What the API changes in gunicorn: its worker (gthread, answering gunicorn's own refusals in the
API's envelope, and closing a connection when the API asks) and its logger (without gunicorn's access
line). gunicorn.conf.py names both.

gunicorn refuses a request it cannot parse (a header over limit_request_field_size, a request line
over limit_request_line) before Flask sees it, with an HTML page. A caller of this API
gets {"error": {"code", "message", "details"}} for every other refusal, so these get it too.
gunicorn.conf.py names this class."""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import struct
import sys
import time
from http import HTTPStatus

from gunicorn import glogging, util
from gunicorn.workers import gthread
from gunicorn.workers.gthread import TConn, ThreadWorker

from notifier.api import headers
from notifier.errors import HTTP_CODES

# Set in a request's WSGI environ by the application when the connection must not carry another
# request (a body it refused unread): the answer then says `Connection: close` and the connection
# closes. A WSGI application may not send hop-by-hop headers itself (PEP 3333), and gunicorn drops a
# `Connection` header it is given. Flask's development server closes every connection anyway.
CLOSE_CONNECTION = "notifier.close_connection"
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's answer, with the API's error envelope as its body."""
    # gunicorn hands its 501 (a transfer coding it does not know) the reason of its 400s: the status
    # line read "501 Bad Request".
    if status_int in _PHRASES:
        reason = _PHRASES[status_int]
    body = json.dumps({"error": {"code": HTTP_CODES.get(status_int, "http_error"), "message": mesg or reason,
                                 "details": None}}).encode()
    fields = {"Connection": "close", "Content-Type": "application/json", "Content-Length": str(len(body))}
    headers.add(fields)  # what the application's answers carry besides
    head = f"HTTP/1.1 {status_int} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    head += "\r\n"
    util.write_nonblock(sock, head.encode("latin-1") + body)


def closing_when_asked(app):
    """app, with gunicorn closing the connection after an answer to a request that set CLOSE_CONNECTION.

    Without it gunicorn answers `Connection: keep-alive`, then drains at most 64 KiB of the body the
    application left unread and, past that, drops the connection: the client's next request on it
    fails (RemoteDisconnected, a broken pipe)."""

    def serve(environ, start_response):
        def start(status, headers, exc_info=None):
            if environ.get(CLOSE_CONNECTION):
                # gunicorn hands the application its Response's own start_response.
                start_response.__self__.force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return serve


def _content_length(req) -> int:
    """The request's Content-Length (gunicorn has parsed it, and refused one given twice or not a
    number), 0 without one (a chunked body, or none)."""
    return next((int(value) for name, value in req.headers if name == "CONTENT-LENGTH"), 0)


class _Connection(TConn):
    """gthread's connection, waiting for a new client's first bytes with poll(), which takes no file
    descriptor: gthread's selector took one for each, and out of them (a low `ulimit -n` under load)
    the connection was closed unanswered, an ERROR with a traceback (`Socket error processing request.`)."""

    def wait_for_data(self, timeout):
        if self.data_ready:
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            ready = poller.poll(timeout * 1000)
        except (OSError, ValueError):  # closed meanwhile, as gthread's own takes it
            return False
        self.data_ready = bool(ready)
        return self.data_ready


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker; its refusals are written by write_json_error, it closes the
    connection when the application asks (closing_when_asked), and it says no `100 Continue` to a
    body the application will refuse as over MAX_BODY_BYTES."""

    # How often a worker out of file descriptors says so, while it lasts.
    OUT_OF_DESCRIPTORS_LOG_SECONDS = 60.0
    # How long it takes no new connection after it found none left.
    ACCEPT_PAUSE_SECONDS = 0.2

    def init_process(self):
        # gunicorn offers no hook for its error pages: every worker writes them through this module
        # function. Set in the worker process only, where nothing else of gunicorn's uses it.
        util.write_error = write_json_error
        gthread.TConn = _Connection  # what gthread's accept() makes each connection of, likewise
        self._out_of_descriptors_told = None
        self._accept_from = 0.0  # time.monotonic() before which the worker takes no new connection
        super().init_process()

    def set_accept_enabled(self, enabled):
        # gthread's loop listens again at its next turn: at once, and the accept failed again, a busy loop.
        if enabled and time.monotonic() < self._accept_from:
            return
        super().set_accept_enabled(enabled)

    def finish_request(self, conn, fs):
        super().finish_request(conn, fs)
        self._accept_from = 0.0  # a request ended, and with it a connection, often: listen again at once

    def accept(self, listener):
        try:
            super().accept(listener)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # Out of file descriptors (a low `ulimit -n` under load): gthread let this end the worker, and
            # gunicorn's restart reset every connection it held, the answers to sends it had stored among
            # them. The client waits in the listen backlog instead: the loop listens again as a request
            # ends, or at its first turn (within a second) after ACCEPT_PAUSE_SECONDS.
            now = time.monotonic()
            self.set_accept_enabled(False)
            self._accept_from = now + self.ACCEPT_PAUSE_SECONDS
            told = self._out_of_descriptors_told
            if told is None or now - told >= self.OUT_OF_DESCRIPTORS_LOG_SECONDS:
                self._out_of_descriptors_told = now
                self.log.warning("out of file descriptors (%s, limit %s): new connections wait until some "
                                 "close; raise the open file limit (ulimit -n, LimitNOFILE)", exc.strerror,
                                 resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def load_wsgi(self):
        super().load_wsgi()
        settings = self.wsgi.config["NOTIFIER_SETTINGS"]  # the Flask app create_app() made
        # At least a microsecond: a limit that rounds to zero turns it off.
        micros = max(1, round(settings.client_timeout * 1_000_000))
        self._stall_limit = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)
        self._max_body = self.wsgi.config["MAX_CONTENT_LENGTH"]
        self.wsgi = closing_when_asked(self.wsgi)

    def handle_request(self, req, conn):
        if req._expected_100_continue and _content_length(req) > self._max_body:
            # gunicorn says `100 Continue` as it hands the request on, before the application can
            # refuse it: a client that asks first (curl does for a body over 1 MB) then sent the whole
            # body the 413 that followed refused. Without the 100 it waits for that 413.
            req._expected_100_continue = False
        return super().handle_request(req, conn)

    def handle(self, conn):
        if not conn.initialized:
            # gthread reads a request, and writes its answer, on a blocking socket in one of a few
            # threads: a client that sent half a request (or half its body) and then nothing held a
            # thread for as long as it kept the connection, and 16 such clients took a 2-worker API
            # offline. The kernel ends each read or write that waits longer than CLIENT_TIMEOUT
            # (EAGAIN, which a blocking socket raises): the request is refused and its connection
            # closed. gunicorn's own wait for a first byte (5 s) comes before this. Not over TLS
            # (--certfile): Python's ssl module reads again after an EAGAIN; TLS ends at the proxy.
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._stall_limit)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._stall_limit)
        return super().handle(conn)


class ApiLogger(glogging.Logger):
    """gunicorn's logger, less its access line.

    The API logs one line per request itself (notifier.api.access): structured, with the request id,
    the path without its query string, and an unsubscribe link's token replaced by the route's
    pattern. gunicorn's line would repeat each request with the raw request line, token and query
    string included, and it formats that line for every request even when its logger drops it."""

    def access(self, resp, req, environ, request_time):
        return None

    def exception(self, msg, *args, **kwargs):
        if isinstance(sys.exc_info()[1], BlockingIOError):
            # A read or write that ran past CLIENT_TIMEOUT (JsonErrorWorker.handle): the client's
            # doing, not a fault of the server's worth a traceback, and one a client can repeat at will.
            self.info("a client stalled mid-request past CLIENT_TIMEOUT; its connection was closed")
            return
        super().exception(msg, *args, **kwargs)
