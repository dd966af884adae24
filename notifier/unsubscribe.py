"""Signed one-click unsubscribe links (RFC 8058): the token is the only credential they need."""

from __future__ import annotations

from itsdangerous import BadData, URLSafeSerializer

from notifier.config import Settings
from notifier.models import Category, Preference

SALT = "notifier.unsubscribe"
# What a link may turn off: the categories a user can refuse, for a user key as long as the column holds.
_CATEGORIES = frozenset(c.value for c in Category if c is not Category.TRANSACTIONAL)
_USER_KEY_MAX = Preference.user_key.max_length


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.signing_key, salt=SALT)


def make_token(settings: Settings, api_key_id: int, user_key: str, category: str) -> str:
    return _serializer(settings).dumps({"k": api_key_id, "u": user_key, "c": category})


def read_token(settings: Settings, token: str) -> tuple[int, str, str] | None:
    """(api key id, user key, category) of a genuine token; None for a tampered or foreign one."""
    try:
        data = _serializer(settings).loads(token)
    except BadData:  # a bad signature, or a signed payload that is not JSON the parser takes (BadPayload)
        return None
    if not isinstance(data, dict) or not {"k", "u", "c"} <= data.keys():
        return None
    key_id, user_key, category = data["k"], data["u"], data["c"]
    # Held to what make_token() writes, as the columns they go to take it: the development secret
    # signs whatever anyone asks while SECRET_KEY is unset, and a claim PostgreSQL refuses was a 500.
    if (type(key_id) is not int or not isinstance(user_key, str) or not 0 < len(user_key) <= _USER_KEY_MAX
            or not _storable(user_key) or category not in _CATEGORIES):
        return None
    return key_id, user_key, category


def _storable(text: str) -> bool:
    # PostgreSQL holds neither a NUL nor an unpaired surrogate (a JSON escape like \ud800, which is not
    # Unicode text and which the driver cannot encode): either, written, was a 500.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def link(settings: Settings, api_key_id: int, user_key: str, category: str) -> str:
    return f"{settings.public_base_url}/unsubscribe/{make_token(settings, api_key_id, user_key, category)}"


def headers(url: str) -> dict[str, str]:
    """The two headers that let a mail client unsubscribe with one click."""
    return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
