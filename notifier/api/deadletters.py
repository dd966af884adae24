"""The caller's dead letters: failed notifications, and requeueing them."""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, current_app, jsonify, request

from notifier import deadletters
from notifier.api.common import current_key, require_api_key
from notifier.errors import Unprocessable
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
    redis, settings = _deps()
    args = _query.load(request.args.to_dict())
    if args["limit"] > settings.page_size_max:
        raise Unprocessable(f"limit may be at most {settings.page_size_max}",
                            {"limit": [f"must be at most {settings.page_size_max}"]})
    try:
        page, next_cursor = deadletters.list_dead(redis, current_key(), args["limit"], args.get("cursor"))
    except ValueError:
        raise Unprocessable("the cursor is not valid", {"cursor": ["not a cursor from this API"]}) from None
    entries = []
    for entry in page:
        item = asdict(entry)
        item["failed_at"] = _dt.serialize("failed_at", item)
        entries.append(item)
    return jsonify(data=entries, next=next_cursor)


@bp.post("/<notification_id>/requeue")
def requeue(notification_id: str):
    """Send a failed notification again with a fresh set of attempts; 409 for anything not failed."""
    redis, settings = _deps()
    notification = deadletters.requeue(redis, settings, notification_id, current_key())
    response = jsonify(AcceptedSchema().dump(notification))
    response.status_code = 202
    return response
