"""A recipient's preferences: per category immediate, daily, weekly or off; timezone; quiet hours. And
erasing what the key holds of a user (notifier.erasure)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import MethodNotAllowed

from notifier import consent, erasure
from notifier.api.common import current_key, json_body, path_user_id, require_api_key
from notifier.errors import Unprocessable
from notifier.models import Category
from notifier.schemas import PreferencesSchema

bp = Blueprint("users", __name__, url_prefix="/api/users")
bp.before_request(require_api_key)
_preferences = PreferencesSchema()


PREFERENCES = "/preferences"
# What a path ending in /preferences takes, in a 405 and in an OPTIONS answer alike.
PREFERENCES_ALLOW = "GET, HEAD, OPTIONS, PUT"


@bp.after_request
def _preferences_options(response):
    # Flask answers OPTIONS with the methods of every rule the path matches, and /<user_id> matches
    # u1/preferences too: DELETE was offered, which erase_user refuses there (405).
    # The user id as erase_user reads it: /api/users/preferences is a user called "preferences".
    user_id = request.path.removeprefix(f"{bp.url_prefix}/")
    if request.method == "OPTIONS" and user_id.endswith(PREFERENCES) and "Allow" in response.headers:
        response.headers["Allow"] = PREFERENCES_ALLOW
    return response


@bp.get(f"/<user:user_id>{PREFERENCES}")
def get_preferences(user_id: str):
    """The user's preferences, with defaults for anything never set."""
    return jsonify(consent.preferences(current_key(), consent.preferences_key(path_user_id(user_id))))


@bp.put(f"/<user:user_id>{PREFERENCES}")
def put_preferences(user_id: str):
    """Change the parts given; transactional mail cannot be turned off."""
    user_id = consent.preferences_key(path_user_id(user_id))
    changes = json_body(_preferences)
    if consent.preferences_key(changes.pop("user_id", user_id)) != user_id:
        raise Unprocessable("the body's user_id is not the path's", {"user_id": ["not the user of the path"]})
    (changes.get("categories") or {}).pop(Category.TRANSACTIONAL.value, None)
    return jsonify(consent.update_preferences(current_key(), user_id, changes))


@bp.delete("/<user:user_id>")
def erase_user(user_id: str):
    """Erase what this key holds of the user: their mail (cancelled if still waiting), preferences and profile."""
    if user_id.endswith(PREFERENCES):
        # DELETE /api/users/u1/preferences is someone asking to reset u1's preferences, which is not a
        # route (PUT them back to the defaults instead), not to erase a user called "u1/preferences".
        raise MethodNotAllowed(valid_methods=PREFERENCES_ALLOW.split(", "))
    ext = current_app.extensions["notifier"]
    user_key = consent.preferences_key(path_user_id(user_id))
    return jsonify(erasure.erase(ext["redis"], ext["settings"], current_key(), user_key).as_dict())
