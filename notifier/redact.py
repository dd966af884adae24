"""What may appear in logs and Redis: addresses masked or keyed-hashed, never a body, a password or a key."""

import hashlib
import hmac


def mask_address(address: str | None) -> str:
    """a***@example.com: enough to tell messages apart, not enough to read the address."""
    if not address or "@" not in address:
        return "***"
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def keyed_digest(secret: str, message: bytes) -> str:
    """HMAC-SHA256 of message under secret, in lower-case hex: what signs status callbacks, and what stands
    for an address where the address itself may not be kept (a Redis key). surrogatepass: SECRET_KEY comes
    from the environment, where bytes beyond UTF-8 become lone surrogates."""
    return hmac.new(secret.encode("utf-8", "surrogatepass"), message, hashlib.sha256).hexdigest()
