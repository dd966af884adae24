"""What the API does once a request is parsed: check, store, then queue."""

from __future__ import annotations

import logging

from redis import Redis
from redis.exceptions import RedisError

from notifier import queues, store
from notifier.config import Settings
from notifier.errors import Unprocessable
from notifier.models import ApiKey, Notification, Priority
from notifier.rendering import Renderer, TemplateRenderError

logger = logging.getLogger(__name__)

VERIFICATION_TEMPLATE = "verification"


class NotificationService:
    """Accepts notifications for the API; built once per app with its dependencies."""

    def __init__(self, settings: Settings, renderer: Renderer, redis: Redis):
        self.settings = settings
        self.renderer = renderer
        self.redis = redis

    def check_template(self, name: str, data: dict) -> None:
        """Refuse, before anything is stored, a template that does not exist or cannot render."""
        if not self.renderer.exists(name):
            raise Unprocessable(
                "unknown template",
                {"template": [f"no template named {name!r}; known: {', '.join(self.renderer.names())}"]},
            )
        try:
            self.renderer.render(name, data)
        except TemplateRenderError as exc:
            raise Unprocessable("the template cannot be rendered with this data", {"data": [str(exc)]}) from exc

    def send(self, api_key: ApiKey, payload: dict) -> Notification:
        """Store a validated send request and queue it."""
        if payload.get("template"):
            self.check_template(payload["template"], payload["data"])
        fields = {
            "to": payload["to"],
            "template": payload.get("template"),
            "data": payload.get("data") if payload.get("template") else None,
            "subject": payload.get("subject"),
            "text": payload.get("text"),
            "html": payload.get("html"),
            "priority": payload["priority"],
            "user_id": payload.get("user_id"),
            "metadata": payload.get("metadata"),
        }
        notification = store.create_notification(api_key, fields)
        self.enqueue(notification)
        return notification

    def send_verification(self, api_key: ApiKey, payload: dict) -> Notification:
        """A verification email: the verification template at high priority."""
        data = {k: payload[k] for k in ("code", "verification_url", "name") if k in payload}
        return self.send(
            api_key,
            {
                "to": payload["to"],
                "template": VERIFICATION_TEMPLATE,
                "data": data,
                "priority": Priority.HIGH.value,
                "user_id": payload["user_id"],
                "metadata": payload.get("metadata"),
            },
        )

    def enqueue(self, notification: Notification) -> bool:
        """Queue a stored notification; when Redis is away it stays queued in the database for later."""
        try:
            queues.enqueue_delivery(self.redis, self.settings, notification.id, notification.priority)
        except RedisError as exc:
            # Accepted work is in the database already; the reconciler queues it once Redis is back.
            logger.warning("notification %s stored but not queued: %s", notification.id, type(exc).__name__)
            return False
        except Exception:  # noqa: BLE001 - the row is stored: answering 500 now would invite a duplicate
            logger.exception("notification %s stored but not queued", notification.id)
            return False
        return True
