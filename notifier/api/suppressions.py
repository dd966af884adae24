"""The caller's suppression list: addresses a server said do not exist, never mailed again."""

from __future__ import annotations

from flask import Blueprint, jsonify

from notifier.api.common import current_key, require_api_key
from notifier.errors import NotFound
from notifier.models import Suppression
from notifier.schemas import UtcDateTime

bp = Blueprint("suppressions", __name__, url_prefix="/api/suppressions")
bp.before_request(require_api_key)
_dt = UtcDateTime()


@bp.get("")
def list_suppressions():
    """Every suppressed address of this key, newest first, with why."""
    rows = (Suppression.select().where(Suppression.api_key == current_key().id)
            .order_by(Suppression.created_at.desc()).limit(1000))
    return jsonify(data=[{"email": s.email, "reason": s.reason, "created_at": _dt.serialize("created_at", s)}
                         for s in rows])


@bp.delete("/<path:email>")
def delete_suppression(email: str):
    """Mail this address again (after the user fixed it, say)."""
    removed = (Suppression.delete()
               .where((Suppression.api_key == current_key().id) & (Suppression.email == email.lower())).execute())
    if not removed:
        raise NotFound(f"{email} is not suppressed")
    return jsonify(email=email.lower(), suppressed=False)
