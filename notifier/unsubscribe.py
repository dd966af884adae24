"""Signed one-click unsubscribe links (RFC 8058): the token is the only credential they need."""

from __future__ import annotations

from itsdangerous import BadSignature, URLSafeSerializer

from notifier.config import Settings

SALT = "notifier.unsubscribe"


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.signing_key, salt=SALT)


def make_token(settings: Settings, api_key_id: int, user_key: str, category: str) -> str:
    return _serializer(settings).dumps({"k": api_key_id, "u": user_key, "c": category})


def read_token(settings: Settings, token: str) -> tuple[int, str, str] | None:
    """(api key id, user key, category) of a genuine token; None for a tampered or foreign one."""
    try:
        data = _serializer(settings).loads(token)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not {"k", "u", "c"} <= data.keys():
        return None
    return data["k"], data["u"], data["c"]


def link(settings: Settings, api_key_id: int, user_key: str, category: str) -> str:
    return f"{settings.public_base_url}/unsubscribe/{make_token(settings, api_key_id, user_key, category)}"


def headers(url: str) -> dict[str, str]:
    """The two headers that let a mail client unsubscribe with one click."""
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
