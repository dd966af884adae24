"""API keys for calling services: made once, shown once, stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from notifier.models import ApiKey, utcnow

KEY_PREFIX = "nfy"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(name: str) -> tuple[ApiKey, str]:
    """Create a key named name and return it with its plaintext, which is never stored."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    plaintext = f"{KEY_PREFIX}_{prefix}_{secret}"
    key = ApiKey.create(
        name=name, prefix=prefix, key_hash=_hash(plaintext), callback_secret=f"whsec_{secrets.token_urlsafe(32)}"
    )
    return key, plaintext


def authenticate(plaintext: str | None) -> ApiKey | None:
    """The live key this plaintext belongs to, or None; compared in constant time."""
    if not plaintext:
        return None
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    key = ApiKey.get_or_none(ApiKey.prefix == parts[1])
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.key_hash, _hash(plaintext)):
        return None
    return key


def revoke(name: str) -> bool:
    """Revoke the key named name at once; False when there is no such live key."""
    return bool(
        ApiKey.update(revoked_at=utcnow()).where((ApiKey.name == name) & (ApiKey.revoked_at.is_null())).execute()
    )


def all_keys() -> list[ApiKey]:
    """Every key, oldest first."""
    return list(ApiKey.select().order_by(ApiKey.created_at, ApiKey.id))
