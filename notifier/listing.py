"""Pages of an API key's notifications and suppressions, newest first, with opaque cursors; a user's
counts by status."""

from __future__ import annotations

from datetime import datetime

from peewee import fn

from notifier import cursors
from notifier.consent import ADDRESS_KEY_PREFIX, preferences_key
from notifier.models import ApiKey, Notification, Status, Suppression


def decode_cursor(cursor: str) -> int | None:
    """The seq (or suppression id) a cursor points at, or None when the cursor is not one of ours."""
    key = cursors.decode(cursor, int)
    return key[0] if key is not None else None


def list_for_key(
    api_key: ApiKey,
    *,
    limit: int,
    before_seq: int | None = None,
    status: str | None = None,
    user_id: str | None = None,
    template: str | None = None,
    priority: str | None = None,
    to: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> tuple[list[Notification], str | None]:
    """A page of the key's notifications, newest first, and the cursor of the next page."""
    query = Notification.select().where(Notification.api_key == api_key.id)
    filters = {
        Notification.status: status,
        Notification.user_id: user_id,
        Notification.template: template,
        Notification.priority: priority,
    }
    for column, value in filters.items():
        if value is not None:
            query = query.where(column == value)
    if to is not None:
        # An address in any case, as suppressions take it: Ann@Example.com is ann@example.com.
        query = query.where(fn.LOWER(Notification.to) == to.lower())
    if created_after is not None:
        query = query.where(Notification.created_at >= created_after)
    if created_before is not None:
        query = query.where(Notification.created_at < created_before)
    if before_seq is not None:
        query = query.where(Notification.seq < before_seq)
    rows = list(query.order_by(Notification.seq.desc()).limit(limit + 1))
    return cursors.page(rows, limit, lambda row: (row.seq,))


def suppressions_for_key(api_key: ApiKey, *, limit: int,
                         before_id: int | None = None) -> tuple[list[Suppression], str | None]:
    """A page of the key's suppressed addresses, newest first, and the cursor of the next page.

    By id, which only grows (an address suppressed again keeps its row): an address added or removed
    between pages never shifts the next one, as created_at alone could (two in one microsecond)."""
    query = Suppression.select().where(Suppression.api_key == api_key.id)
    if before_id is not None:
        query = query.where(Suppression.id < before_id)
    rows = list(query.order_by(Suppression.id.desc()).limit(limit + 1))
    return cursors.page(rows, limit, lambda row: (row.id,))


def stats_for_user(api_key: ApiKey, user_id: str) -> dict:
    """How many of a user's notifications there are, in total and per status."""
    counts = {status.value: 0 for status in Status}
    user_id = preferences_key(user_id)  # email:<address> in the letter case mail is keyed by
    query = (
        Notification.select(Notification.status, fn.COUNT(Notification.seq).alias("n"))
        .where(users_mail(api_key.id, user_id))
        .group_by(Notification.status)
    )
    for row in query:
        counts[row.status] = row.n
    return {"user_id": user_id, "total": sum(counts.values()), "by_status": counts}


def users_mail(api_key_id: int, user_key: str):
    """Which of a key's notifications are a user's, as SQL: those with that user id, or for
    "email:<address>" (as consent.preferences_key writes it) those sent to that address with no user id.
    The stats count these, and an erasure (notifier.erasure) erases these."""
    if user_key.startswith(ADDRESS_KEY_PREFIX):
        # Mail sent to the address with no user id (no row has such a user_id: it counted none). Its
        # rows are found by the index of key and address (their user_key is "email:" and the address
        # lower-cased, an ASCII one as the API takes it): by the index of key and user id, every row of
        # the key without one was read (0.9 s among 170,000).
        address = user_key.removeprefix(ADDRESS_KEY_PREFIX)
        whose = (fn.LOWER(Notification.to) == address) & Notification.user_id.is_null() & (
            Notification.user_key == user_key)
    else:
        whose = Notification.user_id == user_key
    return (Notification.api_key == api_key_id) & whose
