"""What the API does once a request is parsed: check, store, then queue."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import timedelta

from peewee import IntegrityError
from redis import Redis

from notifier import queues, store
from notifier.config import Settings
from notifier.errors import Conflict, NotFound, Unprocessable
from notifier.models import ApiKey, Notification, Priority, Status, utcnow
from notifier.rendering import Renderer, TemplateRenderError

logger = logging.getLogger(__name__)

VERIFICATION_TEMPLATE = "verification"
MESSAGE_FIELDS = ("to", "template", "data", "subject", "text", "html", "priority", "user_id", "metadata")


class NotificationService:
    """Accepts notifications for the API; built once per app with its dependencies."""

    def __init__(self, settings: Settings, renderer: Renderer, redis: Redis):
        self.settings = settings
        self.renderer = renderer
        self.redis = redis

    def check_template(self, name: str, data: dict) -> None:
        """Refuse, before anything is stored, a template that does not exist or cannot render."""
        if not self.renderer.exists(name):
            known = ", ".join(self.renderer.names())
            raise Unprocessable("unknown template", {"template": [f"no template named {name!r}; known: {known}"]})
        try:
            self.renderer.render(name, data)
        except TemplateRenderError as exc:
            raise Unprocessable("the template cannot be rendered with this data", {"data": [str(exc)]}) from exc

    def send(self, api_key: ApiKey, payload: dict, idempotency_key: str | None = None) -> tuple[Notification, bool]:
        """Store a validated send request and queue it; returns it and whether it was a replay."""
        key = _idempotency_key(payload, idempotency_key)
        request_hash = _fingerprint(payload)
        if key is not None:
            earlier = store.find_idempotent(api_key, key)
            if earlier is not None:
                return _replay(earlier, request_hash), True
        if payload.get("template"):
            self.check_template(payload["template"], payload["data"])
        fields = {name: payload.get(name) for name in MESSAGE_FIELDS}
        if not payload.get("template"):
            fields["data"] = None
        fields.update(self._timing(payload), idempotency_key=key, request_hash=request_hash if key else None,
                      callback_url=payload.get("callback_url"))
        status = Status.SCHEDULED if fields["send_at"] else Status.QUEUED
        try:
            notification = store.create_notification(api_key, fields, status=status)
        except IntegrityError:
            # Another request with the same key won the race; answer as its replay.
            earlier = store.find_idempotent(api_key, key) if key else None
            if earlier is None:
                raise
            return _replay(earlier, request_hash), True
        queues.dispatch(self.redis, self.settings, notification)
        return notification, False

    def send_verification(self, api_key: ApiKey, payload: dict, idempotency_key: str | None = None):
        """A verification email: the verification template at high priority, with a default deadline."""
        data = {k: payload[k] for k in ("code", "verification_url", "name") if k in payload}
        message = {k: v for k, v in payload.items() if k not in ("code", "verification_url", "name")}
        message.update(template=VERIFICATION_TEMPLATE, data=data, priority=Priority.HIGH.value)
        if "expires_at" not in message and "ttl_seconds" not in message:
            message["ttl_seconds"] = self.settings.verification_ttl_seconds
        return self.send(api_key, message, idempotency_key)

    def cancel(self, api_key: ApiKey, notification_id: str) -> Notification:
        """Cancel a notification that is not being sent and not yet final; it will never be sent."""
        if store.get_for_key(api_key, notification_id) is None:
            raise NotFound("no such notification")
        cancelled = store.transition(
            notification_id,
            Status.CANCELLED,
            reason="cancelled by the caller",
            sources=(Status.SCHEDULED, Status.QUEUED, Status.RETRYING),
        )
        notification = store.get(notification_id)
        if not cancelled:
            raise Conflict(f"a {notification.status} notification cannot be cancelled", {"status": notification.status},
                           code="not_cancellable")
        queues.dispatch_callback(self.redis, self.settings, notification)
        return notification

    def _timing(self, payload: dict) -> dict:
        now = utcnow()
        send_at = payload.get("send_at")
        horizon = timedelta(days=self.settings.schedule_horizon_days)
        if "delay_seconds" in payload:
            delay = timedelta(seconds=payload["delay_seconds"])
            send_at = now + min(delay, horizon + timedelta(seconds=1))
        if send_at is not None and send_at <= now:
            send_at = None  # a time already past means now
        if send_at is not None and send_at > now + horizon:
            horizon = f"at most {self.settings.schedule_horizon_days} days ahead"
            raise Unprocessable("send_at is too far ahead", {"send_at": [horizon]})
        expires_at = payload.get("expires_at")
        if "ttl_seconds" in payload:
            expires_at = now + timedelta(seconds=payload["ttl_seconds"])
        if expires_at is not None and expires_at <= (send_at or now):
            raise Unprocessable("the deadline is before the send time", {"expires_at": ["must be after the send time"]})
        return {"send_at": send_at, "expires_at": expires_at}


def _idempotency_key(payload: dict, header: str | None) -> str | None:
    field = payload.pop("idempotency_key", None)
    if header is not None and field is not None and header != field:
        raise Unprocessable(
            "the Idempotency-Key header and the idempotency_key field differ",
            {"idempotency_key": ["differs from the Idempotency-Key header"]},
        )
    key = header if header is not None else field
    if key is not None and not (0 < len(key) <= 255):
        raise Unprocessable("bad idempotency key", {"idempotency_key": ["must be 1 to 255 characters"]})
    return key


def _fingerprint(payload: dict) -> str:
    # Relative times (delay_seconds, ttl_seconds) are part of the request as sent, so a replay of the
    # same request matches even though its absolute time would differ.
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(earlier: Notification, request_hash: str) -> Notification:
    if earlier.request_hash != request_hash:
        raise Conflict(
            "this idempotency key was used for a different request",
            {"id": earlier.id},
            code="idempotency_key_reused",
        )
    return earlier
