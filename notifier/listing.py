"""Pages of an API key's notifications and suppressions, newest first, with opaque cursors; a user's
counts by status."""

from __future__ import annotations

from datetime import datetime, timedelta

from peewee import fn

from notifier import cursors
from notifier.consent import ADDRESS_KEY_PREFIX, preferences_key
from notifier.models import ApiKey, Notification, Status, Suppression

# How far a notification's created_at may stray from the order of seq: it is taken just before the INSERT
# that draws the seq (store.create_notifications), so a row can be younger than one after it only by
# what held that INSERT up (a lock of a schema upgrade, bounded by DATABASE_STATEMENT_TIMEOUT) or by
# the clocks of two API hosts disagreeing. The created_at filters find their rows in a range of seq
# this much wider than the window, and still filter by created_at itself.
CREATED_AT_SLACK = timedelta(hours=1)


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
    # Each time filter also bounds seq (seq_at): the page then walks the key's index of seq from the
    # window's end, where it walked every newer row of the key and dropped them (0.9-3.9 s over a
    # key's 1.5-1.7 million rows for a day a month or two back). An index by created_at does not help:
    # the planner still expects matches to be spread evenly and walks seq from the newest row, and
    # every claim and `sent` record would write a line into it (no update of a status is HOT).
    if created_after is not None:
        query = query.where(Notification.created_at >= created_after)
        if created_after - datetime.min > CREATED_AT_SLACK:  # an hour before datetime.min overflows
            query = query.where(Notification.seq >= seq_at(created_after - CREATED_AT_SLACK))
    if created_before is not None:
        query = query.where(Notification.created_at < created_before)
        if datetime.max - created_before > CREATED_AT_SLACK:  # and after datetime.max
            query = query.where(Notification.seq < seq_at(created_before + CREATED_AT_SLACK))
    if before_seq is not None:
        query = query.where(Notification.seq < before_seq)
    rows = list(query.order_by(Notification.seq.desc()).limit(limit + 1))
    return cursors.page(rows, limit, lambda row: (row.seq,))


def seq_at(moment: datetime) -> int:
    """A seq that divides the notifications at moment: every one created before moment - CREATED_AT_SLACK
    has a smaller seq, and every one created at or after moment + CREATED_AT_SLACK one at least as large.

    A binary search over the primary key (about 21 reads of one row for 2 million rows, all keys'
    alike): each step reads the first row at or after the middle of what is left, so a gap in seq
    (rows deleted by retention) only shortens the search. Each bound it keeps is next to a row read
    on that side of moment, which is what makes the promise hold while created_at and seq disagree by
    less than CREATED_AT_SLACK."""
    db = Notification._meta.database
    # Statements of their own, not peewee's: its builder took longer than the read of one row.
    first, last = db.execute_sql('SELECT min("seq"), max("seq") FROM "notifications"').fetchone()
    if first is None:
        return 1
    probe = (f'SELECT "seq", "created_at" FROM "notifications" WHERE "seq" >= {db.param} AND "seq" < {db.param} '
             'ORDER BY "seq" LIMIT 1')
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        row = db.execute_sql(probe, (middle, high)).fetchone()
        if row is None:
            high = middle  # no row in [middle, high)
        elif Notification.created_at.python_value(row[1]) < moment:
            low = row[0] + 1
        else:
            high = row[0]
    return low


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
