"""Business events: one call, every notification its rule causes."""

from __future__ import annotations

from flask import Blueprint, jsonify, url_for

from notifier.api.common import current_key, idempotency_header, json_body, require_api_key, service
from notifier.schemas import EventSchema, UtcDateTime

bp = Blueprint("events", __name__, url_prefix="/api/events")
bp.before_request(require_api_key)
_event = EventSchema()
_dt = UtcDateTime()


@bp.post("")
def emit():
    """Accept an event (user.signup, password.reset_requested, order.placed, ...); 202 with what it caused."""
    event = json_body(_event)
    results = service().emit(current_key(), event, idempotency_header())
    created = [
        {
            "id": n.id,
            "template": n.template,
            "status": n.status,
            "priority": n.priority,
            "send_at": _dt.serialize("send_at", n),
            "location": url_for("notifications.get_one", notification_id=n.id),
            "replayed": replayed,
        }
        for n, replayed in results
    ]
    response = jsonify(event=event["type"], notifications=created)
    response.status_code = 202
    return response
