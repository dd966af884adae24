"""The templates a key can send, and what one would send with given data, without sending it."""

from __future__ import annotations

from flask import Blueprint, jsonify

from notifier import rules
from notifier.api.common import json_body, require_api_key, service
from notifier.errors import NotFound
from notifier.models import DIGEST_TEMPLATE
from notifier.schemas import PreviewSchema

bp = Blueprint("templates", __name__, url_prefix="/api/templates")
bp.before_request(require_api_key)
_preview = PreviewSchema()


@bp.get("")
def list_templates():
    """The templates a send may name, each with the category its mail is in."""
    names = (name for name in service().renderer.names() if name != DIGEST_TEMPLATE)
    own = service().categories
    return jsonify(data=[{"name": name, "category": rules.category_of(name, own=own).value} for name in names])


@bp.post("/<name>/preview")
def preview(name: str):
    """What a send of this template with this data would put in the email: checked as a send is."""
    data = json_body(_preview)["data"]
    renderer = service().renderer
    if name == DIGEST_TEMPLATE or not renderer.exists(name):
        lacking = renderer.lacking(name) if name != DIGEST_TEMPLATE else ""
        raise NotFound(f"no template named {name!r}{f' ({lacking})' if lacking else ''}; GET /api/templates lists them")
    category = rules.category_of(name, own=service().categories)
    # The link a send of it is checked with (a preview has no recipient to sign one for).
    email = service().check_template(name, data, service().sample_unsubscribe_url(category))
    return jsonify(template=name, category=category.value, subject=email.subject, text=email.text, html=email.html)
