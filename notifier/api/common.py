"""What every blueprint shares: the JSON body, the API key, the service."""

from __future__ import annotations

from flask import current_app, g, request
from marshmallow import Schema
from werkzeug.exceptions import BadRequest

from notifier import keys
from notifier.errors import ApiError, Unauthorized
from notifier.models import ApiKey
from notifier.service import NotificationService

API_KEY_HEADER = "X-API-Key"


def service() -> NotificationService:
    return current_app.extensions["notifier"]["service"]


def require_api_key() -> None:
    """before_request hook: the caller must present a live API key."""
    key = keys.authenticate(request.headers.get(API_KEY_HEADER))
    if key is None:
        raise Unauthorized(f"a valid {API_KEY_HEADER} header is required")
    g.api_key = key


def current_key() -> ApiKey:
    return g.api_key


def json_body(schema: Schema) -> dict:
    """The request's JSON object, loaded through schema (ValidationError becomes a 422)."""
    try:
        body = request.get_json(force=True)
    except BadRequest as exc:
        raise ApiError("the request body is not valid JSON", code="malformed_json") from exc
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="malformed_json")
    return schema.load(body)
