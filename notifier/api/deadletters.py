"""The caller's dead letters: failed notifications, and requeueing them."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, current_app, jsonify

from notifier import deadletters
from notifier.api.common import current_key, require_api_key
from notifier.schemas import AcceptedSchema, UtcDateTime

bp = Blueprint("deadletters", __name__, url_prefix="/api/dead-letters")
bp.before_request(require_api_key)
_dt = UtcDateTime()


def _deps():
    ext = current_app.extensions["notifier"]
    return ext["redis"], ext["settings"]


@bp.get("")
def list_dead():
    """The caller's failed notifications, newest first, with why they failed."""
    redis, _ = _deps()
    entries = []
    for entry in deadletters.list_dead(redis, current_key()):
        item = asdict(entry)
        item["failed_at"] = _dt.serialize("failed_at", item)
        entries.append(item)
    return jsonify(data=entries)


@bp.post("/<notification_id>/requeue")
def requeue(notification_id: str):
    """Send a failed notification again with a fresh set of attempts; 409 for anything not failed."""
    redis, settings = _deps()
    notification = deadletters.requeue(redis, settings, notification_id, current_key())
    response = jsonify(AcceptedSchema().dump(notification))
    response.status_code = 202
    return response
