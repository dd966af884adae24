"""The caller's suppression list: addresses a server said do not exist, never mailed again."""

from __future__ import annotations

from flask import Blueprint, jsonify

from notifier import listing
from notifier.api.common import current_key, page_query, require_api_key
from notifier.errors import NotFound
from notifier.models import Suppression
from notifier.schemas import PageQuerySchema, UtcDateTime

bp = Blueprint("suppressions", __name__, url_prefix="/api/suppressions")
bp.before_request(require_api_key)
_dt = UtcDateTime()
_query = PageQuerySchema()


@bp.get("")
def list_suppressions():
    """The suppressed addresses of this key, newest first, with why; a page at a time (pass the
    answer's `next` back as `cursor`)."""
    args = page_query(_query, listing.decode_cursor)
    rows, next_cursor = listing.suppressions_for_key(current_key(), limit=args["limit"],
                                                     before_id=args.get("cursor"))
    return jsonify(data=[{"email": s.email, "reason": s.reason, "created_at": _dt.serialize("created_at", s)}
                         for s in rows], next=next_cursor)


@bp.delete("/<path:email>")
def delete_suppression(email: str):
    """Mail this address again (after the user fixed it, say)."""
    removed = (Suppression.delete()
               .where((Suppression.api_key == current_key().id) & (Suppression.email == email.lower())).execute())
    if not removed:
        raise NotFound(f"{email} is not suppressed")
    return jsonify(email=email.lower(), suppressed=False)
