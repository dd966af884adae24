"""Signed one-click unsubscribe links (RFC 8058): the token is the only credential they need.

A token is encrypted as well as signed (Fernet: AES in CBC mode with an HMAC), so the link shows
nothing of whom it unsubscribes: the user key is often the address itself, and a link is kept
wherever a URL is (a proxy's or a link scanner's logs, a forwarded email). Links made before, signed
but readable (itsdangerous), keep working while SECRET_KEY, or SECRET_KEY_FALLBACKS, holds their key."""

from __future__ import annotations

import base64
import functools
import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from itsdangerous import BadData, URLSafeSerializer

from notifier.config import Settings
from notifier.models import Category, Preference

SALT = "notifier.unsubscribe"
# What a link may turn off: the categories a user can refuse, for a user key as long as the column holds.
_CATEGORIES = frozenset(c.value for c in Category if c is not Category.TRANSACTIONAL)
_USER_KEY_MAX = Preference.user_key.max_length


@functools.lru_cache(maxsize=16)
def _fernet(signing_key: str) -> Fernet:
    # A key of its own for these tokens, derived from SECRET_KEY (which also seeds other things).
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT.encode(), info=b"unsubscribe token").derive(
        signing_key.encode("utf-8", "surrogatepass"))
    return Fernet(base64.urlsafe_b64encode(key))


def _claims(api_key_id: int, user_key: str, category: str) -> bytes:
    claims = json.dumps({"k": api_key_id, "u": user_key, "c": category}, separators=(",", ":"), ensure_ascii=False)
    return claims.encode("utf-8", "surrogatepass")


def make_token(settings: Settings, api_key_id: int, user_key: str, category: str) -> str:
    # Fernet's base64 keeps its `=` padding, which a URL path may hold but some mail clients cut a link at.
    return _fernet(settings.signing_key).encrypt(_claims(api_key_id, user_key, category)).decode().rstrip("=")


def token_length(api_key_id: int, user_key: str, category: str) -> int:
    """How long make_token()'s token for these claims is, without the cost of encrypting them."""
    # Fernet: version (1), timestamp (8), IV (16), the claims in AES blocks with PKCS7 padding, HMAC (32);
    # then base64 without its padding.
    size = 1 + 8 + 16 + (len(_claims(api_key_id, user_key, category)) // 16 + 1) * 16 + 32
    return -(-size * 4 // 3)


def _read_claims(settings: Settings, token: str):
    # Any of the keys may have made it: SECRET_KEY, or one it replaced (SECRET_KEY_FALLBACKS), so that
    # a rotated secret leaves the links in mail already sent working.
    keys = settings.verifying_keys
    if "." in token:  # made before tokens were encrypted: itsdangerous's payload.signature
        try:
            # itsdangerous signs with the last of its keys and tries them all, newest first.
            return URLSafeSerializer(list(reversed(keys)), salt=SALT).loads(token)
        except BadData:  # a bad signature, or a signed payload that is not JSON the parser takes (BadPayload)
            return None
    try:
        plain = MultiFernet([_fernet(key) for key in keys]).decrypt(token + "=" * (-len(token) % 4))
        return json.loads(plain.decode("utf-8", "surrogatepass"))
    except (InvalidToken, ValueError):  # tampered, foreign, or not base64 at all; not JSON (never made here)
        return None


def read_token(settings: Settings, token: str) -> tuple[int, str, str] | None:
    """(api key id, user key, category) of a genuine token; None for a tampered or foreign one."""
    data = _read_claims(settings, token)
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
