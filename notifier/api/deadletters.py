"""The caller's dead letters: failed notifications, and requeueing them."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, current_app, jsonify

from notifier import deadletters
from notifier.api.common import current_key, page_query, require_api_key
from notifier.schemas import AcceptedSchema, PageQuerySchema, UtcDateTime

bp = Blueprint("deadletters", __name__, url_prefix="/api/dead-letters")
bp.before_request(require_api_key)
_dt = UtcDateTime()
_query = PageQuerySchema()


def _deps():
    ext = current_app.extensions["notifier"]
    return ext["redis"], ext["settings"]


@bp.get("")
def list_dead():
    """The caller's failed notifications, most recently failed first, with why they failed; a page at a
    time (pass the answer's `next` back as `cursor`)."""
    redis, _ = _deps()
    args = page_query(_query, deadletters.decode_cursor)
    page, next_cursor = deadletters.list_dead(redis, current_key(), args["limit"], args.get("cursor"))
    entries = []
    for entry in page:
        item = asdict(entry)
        item["failed_at"] = _dt.serialize("failed_at", item)
        entries.append(item)
    return jsonify(data=entries, next=next_cursor)


@bp.post("/<nid:notification_id>/requeue")
def requeue(notification_id: str):
    """Send a failed notification again with a fresh set of attempts; 409 for anything not failed."""
    redis, settings = _deps()
    notification = deadletters.requeue(redis, settings, notification_id, current_key())
    response = jsonify(AcceptedSchema().dump(notification))
    response.status_code = 202
    return response
