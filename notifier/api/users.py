"""A recipient's preferences: per category immediate, daily, weekly or off; timezone; quiet hours."""

from __future__ import annotations

from flask import Blueprint, jsonify

from notifier import consent
from notifier.api.common import current_key, json_body, path_user_id, require_api_key
from notifier.errors import Unprocessable
from notifier.models import Category
from notifier.schemas import PreferencesSchema

bp = Blueprint("users", __name__, url_prefix="/api/users")
bp.before_request(require_api_key)
_preferences = PreferencesSchema()


@bp.get("/<user:user_id>/preferences")
def get_preferences(user_id: str):
    """The user's preferences, with defaults for anything never set."""
    return jsonify(consent.preferences(current_key(), consent.preferences_key(path_user_id(user_id))))


@bp.put("/<user:user_id>/preferences")
def put_preferences(user_id: str):
    """Change the parts given; transactional mail cannot be turned off."""
    user_id = consent.preferences_key(path_user_id(user_id))
    changes = json_body(_preferences)
    if consent.preferences_key(changes.pop("user_id", user_id)) != user_id:
        raise Unprocessable("the body's user_id is not the path's", {"user_id": ["not the user of the path"]})
    (changes.get("categories") or {}).pop(Category.TRANSACTIONAL.value, None)
    return jsonify(consent.update_preferences(current_key(), user_id, changes))
