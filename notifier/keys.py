"""API keys for calling services: made once, shown once, stored only as a hash.

A key can be rotated: the new secret works at once and the previous one keeps working until it is
revoked (`keys revoke NAME --old`), so a caller can switch over without a moment of 401s. The API
caches keys (notifier.keycache); a change here reaches it as soon as PostgreSQL tells it.

Its callback secret (which signs status callbacks) is rotated the same way: the new one signs at once,
and the one it replaced signs each callback too until the rotation ends (`keys secret NAME
--end-rotation`), so a receiver can switch over without refusing one event."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from notifier.db import select_one
from notifier.keycache import KeyCache
from notifier.models import ApiKey, utcnow

KEY_PREFIX = "nfy"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"


def create(name: str, rate_limit: str | None = None) -> tuple[ApiKey, str]:
    """Create a key named name and return it with its plaintext, which is never stored."""
    prefix, plaintext = _new_secret()
    key = ApiKey.create(
        name=name,
        prefix=prefix,
        key_hash=_hash(plaintext),
        callback_secret=_new_callback_secret(),
        rate_limit=rate_limit,
    )
    return key, plaintext


def _new_callback_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def rotate_callback_secret(name: str) -> str | None:
    """Give the live key named name a new callback secret, and return it; callbacks are signed with
    both it and the current one until end_callback_rotation(). Rotating again drops the oldest."""
    new = _new_callback_secret()
    rotated = (ApiKey.update(old_callback_secret=ApiKey.callback_secret, callback_secret=new)
               .where((ApiKey.name == name) & ApiKey.revoked_at.is_null()).execute())
    return new if rotated else None


def end_callback_rotation(name: str) -> bool:
    """Stop signing the key's callbacks with the callback secret its rotation replaced; False when no
    such key is being rotated. A revoked key too: its queued mail's callbacks, and redeliveries, are
    still signed, and with both secrets for ever if its rotation could not be ended."""
    return bool(ApiKey.update(old_callback_secret=None)
                .where((ApiKey.name == name) & ApiKey.old_callback_secret.is_null(False)).execute())


class RotationUnderway(Exception):
    """The key's previous rotation has not ended: the secret it replaced still works, and a second
    rotation would stop it at once."""

    def __init__(self, old_prefix: str):
        super().__init__(old_prefix)
        self.old_prefix = old_prefix


def rotate(name: str, force: bool = False) -> str | None:
    """Give the live key named name a new secret; the current one keeps working until revoked. None
    when there is no such key. One whose last rotation is under way (its previous secret still works)
    raises RotationUnderway, unless force: then that previous secret stops working at once."""
    prefix, plaintext = _new_secret()
    live = (ApiKey.name == name) & ApiKey.revoked_at.is_null()
    while True:
        # One statement, on the row as it is now: a read and a save() of every column wrote back a
        # revoked_at read before a revoke made meanwhile, and the revoked key worked again.
        rotated = (ApiKey.update(old_prefix=ApiKey.prefix, old_key_hash=ApiKey.key_hash, prefix=prefix,
                                 key_hash=_hash(plaintext))
                   .where(live if force else live & ApiKey.old_prefix.is_null()).execute())
        if rotated:
            return plaintext
        underway = ApiKey.get_or_none(live)
        if underway is None:
            return None
        if underway.old_prefix is not None:
            raise RotationUnderway(underway.old_prefix)
        # The rotation under way ended (`revoke --old`) between the two statements: rotate now.


def authenticate(plaintext: str | None, cache: KeyCache | None = None) -> ApiKey | None:
    """The live key this plaintext belongs to, or None; compared in constant time. The API passes
    its cache; the key is read from the database when there is none."""
    if not plaintext:
        return None
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    key = cache.lookup(parts[1], _by_prefix) if cache is not None else _by_prefix(parts[1])
    if key is None or key.revoked_at is not None:
        return None
    stored = key.key_hash if key.prefix == parts[1] else key.old_key_hash
    if not stored or not hmac.compare_digest(stored, _hash(plaintext)):
        return None
    return key


def _by_prefix(prefix: str) -> ApiKey | None:
    return select_one(ApiKey, '"prefix" = {} OR "old_prefix" = {}', prefix, prefix)


def revoke(name: str, old_only: bool = False) -> bool:
    """Revoke the key named name (or only the secret a rotation replaced); API processes refuse it as
    soon as PostgreSQL notifies them, milliseconds later."""
    live = (ApiKey.name == name) & (ApiKey.revoked_at.is_null())
    if old_only:
        return bool(ApiKey.update(old_prefix=None, old_key_hash=None)
                    .where(live & ApiKey.old_prefix.is_null(False)).execute())
    return bool(ApiKey.update(revoked_at=utcnow()).where(live).execute())


def set_rate(name: str, rate_limit: str | None) -> bool:
    """Give the live key named name its own request rate (None: RATE_LIMIT's); False when there is
    no such key. The API processes take it as soon as PostgreSQL notifies them."""
    return bool(ApiKey.update(rate_limit=rate_limit)
                .where((ApiKey.name == name) & ApiKey.revoked_at.is_null()).execute())


def all_keys() -> list[ApiKey]:
    """Every key, oldest first."""
    return list(ApiKey.select().order_by(ApiKey.created_at, ApiKey.id))
