"""One-click unsubscribe (RFC 8058): no API key, the signed token in the link is the credential."""

from __future__ import annotations

from html import escape

from flask import Blueprint, current_app, request

from notifier import consent
from notifier.errors import ApiError
from notifier.models import ApiKey, DeliveryMode
from notifier.unsubscribe import read_token

bp = Blueprint("unsubscribe", __name__, url_prefix="/unsubscribe")

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#111827">
<h1 style="font-size:1.4rem">{title}</h1><p>{body}</p>{form}</body></html>"""


_INVALID = ("This link does not work", "It may have been cut short as it was copied: open it from the email "
            "again. Every email of ours that you can unsubscribe from has a link of its own at the bottom.")


def _invalid():
    """A link that is not genuine: for a browser, a page that says so; for anything else, the error envelope."""
    # A person clicking a link a mail client cut short got JSON; a program (a mail client posting the
    # one-click unsubscribe, a test) asks for nothing in particular and still gets the envelope.
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        title, body = _INVALID
        return _PAGE.format(title=title, body=body, form=""), 400
    raise ApiError("this unsubscribe link is not valid", code="invalid_token")


def _read(token: str) -> tuple[ApiKey | None, str, str] | None:
    """The key whose list the link writes to, the user and the category; the key is None when it
    was deleted, and with it that list and every way of sending in its name.

    A revoked key still counts: the token is signed with SECRET_KEY, not with anything of the key's,
    so revoking the key makes no link less genuine. Its list still matters too: revoking stops the
    key's requests, not the mail it queued, scheduled or held for a digest, which workers still
    send, checking this list just before. None when the link is not genuine."""
    found = read_token(current_app.extensions["notifier"]["settings"], token)
    if found is None:
        return None
    return ApiKey.get_or_none(ApiKey.id == found[0]), found[1], found[2]


@bp.get("/<token>")
def confirm(token: str):
    """A small page that asks before unsubscribing (a link scanner's GET must not unsubscribe)."""
    if (read := _read(token)) is None:
        return _invalid()
    _, _, category = read
    # No action: the form posts back to the URL the browser opened, whatever a proxy in front of the
    # API put before the path (PUBLIC_BASE_URL https://host/notifier); request.path lost that prefix.
    form = ('<form method="post">'
            '<button type="submit" style="padding:.6rem 1.2rem">Unsubscribe</button></form>')
    return _PAGE.format(title="Unsubscribe", form=form,
                        body=f"Stop receiving {escape(category)} emails? Account emails such as password "
                             "resets will still arrive.")


@bp.post("/<token>")
def one_click(token: str):
    """Turn the category off for this user: what the mail client's one-click button posts."""
    if (read := _read(token)) is None:
        return _invalid()
    key, user_key, category = read
    if key is not None:
        consent.set_mode(key, user_key, category, DeliveryMode.OFF.value)
    return _PAGE.format(title="You are unsubscribed", form="",
                        body=f"You will no longer receive {escape(category)} emails.")
