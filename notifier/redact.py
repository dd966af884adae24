"""What may appear in logs: addresses masked, never a body, a password or a key."""


def mask_address(address: str | None) -> str:
    """a***@example.com: enough to tell messages apart, not enough to read the address."""
    if not address or "@" not in address:
        return "***"
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"
