"""Errors, grouped by what the caller should do about them."""

from __future__ import annotations

from rq.exceptions import StopRequested
from rq.timeouts import JobTimeoutException

# Error codes of the HTTP errors the web stack answers itself (Flask and Werkzeug, or gunicorn for a
# request it cannot parse), for the one error envelope.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    429: "rate_limited",
    431: "header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}

# RQ stopping a job (its time limit, the worker's shutdown), raised wherever the job is: never one
# email, group or item failing, so no `except Exception` in a job may take it for one.
STOPPING = (JobTimeoutException, StopRequested)


class NotifierError(Exception):
    """Base class for every error notifier raises on purpose."""


class ConfigError(NotifierError):
    """A setting is wrong: the process must not start."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting = setting


class DeliveryError(NotifierError):
    """Sending failed; subclasses say whether trying again can help."""

    def __init__(self, message: str, smtp_code: int | None = None, address_rejected: bool = False,
                 smtp_reply: str | None = None, operator: bool = False):
        super().__init__(message)
        self.smtp_code = smtp_code
        # The server's own words after the code (message adds notifier's: what it was refusing).
        self.smtp_reply = smtp_reply
        # The server said this mailbox does not exist: the address belongs on the suppression list.
        self.address_rejected = address_rejected
        # Only an operator can mend it (SMTP_USERNAME/PASSWORD refused, a certificate not trusted, no
        # STARTTLS): retried, to give them the time, and logged as an ERROR from the first attempt.
        self.operator = operator


class TransientDeliveryError(DeliveryError):
    """Try again later: a 4xx reply, a timeout, a dropped connection."""


class PermanentDeliveryError(DeliveryError):
    """Never try again: a 5xx reply, a refused recipient, a broken template."""


class RetriesExhausted(PermanentDeliveryError):
    """The last allowed attempt failed; the job goes to the dead-letter queue."""


class ApiError(NotifierError):
    """A request the caller must change before sending again; becomes the JSON error envelope."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: object = None, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        # What the answer carries besides the envelope (a Retry-After, say).
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class RateLimited(ApiError):
    """Slow down: the answer's Retry-After says when to come back."""

    status = 429
    code = "rate_limited"


class Unprocessable(ApiError):
    status = 422
    code = "validation_error"


class ServiceUnavailable(ApiError):
    """A dependency is down; the caller may retry the same request later."""

    status = 503
    code = "service_unavailable"
