"""RQ job functions: they take ids, re-read state, claim, render, send and record."""

from __future__ import annotations

import logging
import time

from notifier import store
from notifier.config import Settings
from notifier.db import UNAVAILABLE_ERRORS, database
from notifier.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from notifier.mail import Mailer, OutgoingEmail, SendResult
from notifier.models import Notification, Status, utcnow
from notifier.rendering import RenderedEmail, Renderer, literal

logger = logging.getLogger(__name__)


class RetriesExhausted(PermanentDeliveryError):
    """The last allowed attempt failed; the job goes to the dead-letter queue."""


class Deliverer:
    """Everything one delivery needs, built once per worker process."""

    def __init__(self, settings: Settings, mailer: Mailer, renderer: Renderer):
        self.settings = settings
        self.mailer = mailer
        self.renderer = renderer

    def deliver(self, notification_id: str) -> str:
        """Send one notification at most once; return what happened."""
        with database.connection_context():
            if not store.claim(notification_id):
                # Someone else holds it, it was cancelled, or it is already final: nothing to do.
                logger.info("notification %s not claimable; skipping", notification_id)
                return "skipped"
            notification = store.get(notification_id)
            try:
                result = self.mailer.send(self._outgoing(notification))
            except PermanentDeliveryError as exc:
                self._record_failure(notification, exc, final=True)
                raise
            except Exception as exc:  # noqa: BLE001 - anything else may pass: try again
                error = exc if isinstance(exc, DeliveryError) else TransientDeliveryError(f"{type(exc).__name__}")
                if notification.attempts >= self.settings.max_attempts:
                    exhausted = RetriesExhausted(
                        f"gave up after {notification.attempts} attempts: {error}", error.smtp_code
                    )
                    self._record_failure(notification, exhausted, final=True)
                    raise exhausted from exc
                self._record_failure(notification, error, final=False)
                raise
            self._record_sent(notification, result)
            return "sent"

    def _outgoing(self, notification: Notification) -> OutgoingEmail:
        content = self.render(notification)
        return OutgoingEmail(notification_id=notification.id, to=notification.to, content=content)

    def render(self, notification: Notification) -> RenderedEmail:
        """The subject and body parts of a notification, from its template or its literal content."""
        if notification.template:
            return self.renderer.render(notification.template, notification.data)
        return literal(notification.subject or "", notification.text, notification.html)

    def _record_failure(self, notification: Notification, exc: DeliveryError, *, final: bool) -> None:
        target = Status.FAILED if final else Status.RETRYING
        message = str(exc)
        store.transition(
            notification.id,
            target,
            reason=message,
            sources=(Status.SENDING,),
            smtp_code=exc.smtp_code,
            smtp_reply=message,
            last_error=message,
        )
        logger.warning(
            "notification %s attempt %s failed (%s): %s",
            notification.id,
            notification.attempts,
            "final" if final else "will retry",
            message,
        )

    def _record_sent(self, notification: Notification, result: SendResult) -> None:
        # The server has the message now; losing this record would send it again after recovery,
        # so ride out a short database blip before giving up.
        for delay in (0, 0.5, 1, 2, 4):
            time.sleep(delay)
            try:
                store.transition(
                    notification.id,
                    Status.SENT,
                    reason="accepted by SMTP server",
                    sources=(Status.SENDING,),
                    smtp_code=result.smtp_code,
                    smtp_reply=result.smtp_reply,
                    sent_at=utcnow(),
                    message_id=result.message_id,
                    last_error=None,
                )
                break
            except UNAVAILABLE_ERRORS:
                logger.warning("notification %s sent but not yet recorded; retrying", notification.id)
                database.close()
        else:
            raise RuntimeError(f"notification {notification.id} was sent but could not be recorded")
        logger.info("notification %s sent (attempt %s)", notification.id, notification.attempts)


_deliverer: Deliverer | None = None


def install(deliverer: Deliverer) -> None:
    """Make deliverer the one this process's jobs use (worker.py and tests call this)."""
    global _deliverer
    _deliverer = deliverer


def _current() -> Deliverer:
    if _deliverer is None:
        # A worker started some other way (rq's own CLI) builds its dependencies from the environment.
        from notifier.runtime import build_deliverer

        install(build_deliverer(Settings.from_env()))
    return _deliverer


def deliver(notification_id: str) -> str:
    """The RQ job: deliver one notification by id."""
    return _current().deliver(notification_id)
