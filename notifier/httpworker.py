"""What the API changes in gunicorn: its worker (gthread, answering gunicorn's own refusals in the
API's envelope) and its logger (without gunicorn's access line). gunicorn.conf.py names both.

gunicorn refuses a request it cannot parse (a header over limit_request_field_size, a request line
over limit_request_line, a broken chunk) before Flask sees it, with an HTML page. A caller of this API
gets {"error": {"code", "message", "details"}} for every other refusal, so these get it too.
gunicorn.conf.py names this class."""

from __future__ import annotations

import json

from gunicorn import glogging, util
from gunicorn.workers.gthread import ThreadWorker

from notifier.errors import HTTP_CODES


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's answer, with the API's error envelope as its body."""
    body = json.dumps({"error": {"code": HTTP_CODES.get(status_int, "http_error"), "message": mesg or reason,
                                 "details": None}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker; its refusals are written by write_json_error."""

    def init_process(self):
        # gunicorn offers no hook for its error pages: every worker writes them through this module
        # function. Set in the worker process only, where nothing else of gunicorn's uses it.
        util.write_error = write_json_error
        super().init_process()


class ApiLogger(glogging.Logger):
    """gunicorn's logger, less its access line.

    The API logs one line per request itself (notifier.api.access): structured, with the request id,
    the path without its query string, and an unsubscribe link's token replaced by the route's
    pattern. gunicorn's line would repeat each request with the raw request line, token and query
    string included, and it formats that line for every request even when its logger drops it."""

    def access(self, resp, req, environ, request_time):
        return None
