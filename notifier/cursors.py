"""Opaque page cursors: the key of a page's last row, in URL-safe base64, read back only as written.

A cursor is ours to make, so a reader takes exactly what encode() writes and nothing else. Python's
parsers are lenient: base64 skips characters outside its alphabet, int() takes "+3", " 3", "03",
"1_0" and other scripts' digits, and datetime.fromisoformat() takes a UTC offset, a "Z", a space
for the "T" or a date alone. Each of those made a cursor we never wrote that was answered 200, one
with an offset against columns of naive UTC; now each is the API's 422 for a bad cursor.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

SEQ_MAX = 2**63  # past what a seq column holds; SQLite refuses a larger integer outright

Part = datetime | int
Row = TypeVar("Row")


def encode(*key: Part, padded: bool = False) -> str:
    """The cursor of key: naive UTC datetimes and seqs. padded: keep base64's trailing "=", as the
    dead-letter cursors always did (a cursor handed out before stays good)."""
    text = "|".join(part.isoformat() if isinstance(part, datetime) else str(part) for part in key)
    cursor = base64.urlsafe_b64encode(text.encode()).decode()
    return cursor if padded else cursor.rstrip("=")


def decode(cursor: str, *kinds: type[Part], padded: bool = False) -> tuple | None:
    """The key, of parts of these kinds, that encode(key, padded=padded) made into cursor; None for
    any cursor it would not have made."""
    try:
        parts = base64.urlsafe_b64decode((cursor + "=" * (-len(cursor) % 4)).encode()).decode().split("|")
        if len(parts) != len(kinds):
            return None
        key = tuple(_parsed(part, kind) for part, kind in zip(parts, kinds, strict=True))
    except (ValueError, UnicodeDecodeError):
        return None
    # Written again, the key must give the very cursor back: this refuses every other spelling of it.
    return key if encode(*key, padded=padded) == cursor else None


def _parsed(text: str, kind: type[Part]) -> Part:
    if kind is datetime:
        at = datetime.fromisoformat(text)
        if at.tzinfo is not None:  # it would write back as it came, but the columns are naive UTC
            raise ValueError("an offset in a cursor")
        return at
    seq = int(text)
    if not 0 < seq < SEQ_MAX:
        raise ValueError("not a seq")
    return seq


def page(rows: list[Row], limit: int, key: Callable[[Row], tuple[Part, ...]],
         padded: bool = False) -> tuple[list[Row], str | None]:
    """The first limit of rows, read as limit + 1 to learn whether more follow, and the cursor of the
    next page: the key of this page's last row (None: this is the last page)."""
    next_cursor = encode(*key(rows[limit - 1]), padded=padded) if len(rows) > limit else None
    return rows[:limit], next_cursor
