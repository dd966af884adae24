"""Pages of a key's notifications by creation time, on PostgreSQL: every row of the window, found by a range of seq."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from notifier import listing, store
from notifier.db import database
from notifier.models import Notification, Status

FIELDS = {"to": "carol@example.com", "subject": "Hi", "text": "Hello", "priority": "default"}
START = datetime(2026, 1, 1)


def _spread(seqs: list[int], step: timedelta, jitter: timedelta) -> dict[int, datetime]:
    """Give rows created_at step apart in seq order, each off by up to jitter either way (an insert held
    up, another host's clock): two rows' created_at and seq then disagree by up to twice jitter."""
    rng = random.Random(7)
    times = {seq: START + i * step + rng.uniform(-1, 1) * jitter for i, seq in enumerate(seqs)}
    for seq, at in times.items():
        Notification.update(created_at=at).where(Notification.seq == seq).execute()
    return times


def test_the_created_at_filters_list_every_row_of_the_window_though_created_at_strays_from_seq(pg_db, api_key):
    key = api_key[0]
    with database.connection_context():
        rows = store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 400)
        times = _spread([r.seq for r in rows], timedelta(minutes=1), listing.CREATED_AT_SLACK * 0.49)
        hour = timedelta(hours=1)
        for after, before in [(START + 2 * hour, START + 3 * hour), (None, START + hour), (START + 5 * hour, None),
                              (START - 24 * hour, START), (START + 24 * hour, None)]:
            expected = sorted((seq for seq, at in times.items()
                               if (after is None or at >= after) and (before is None or at < before)), reverse=True)
            listed, cursor = [], None
            while True:
                page, cursor = listing.list_for_key(key, limit=25, created_after=after, created_before=before,
                                                    before_seq=listing.decode_cursor(cursor) if cursor else None)
                listed += [n.seq for n in page]
                if cursor is None:
                    break
            assert listed == expected, (after, before)


def test_seq_at_divides_the_rows_at_a_moment_give_or_take_the_slack(pg_db, api_key):
    with database.connection_context():
        rows = store.create_notifications(api_key[0], [(dict(FIELDS), Status.SENT, "earlier")] * 300)
        gone = [r.seq for r in rows if r.seq % 3 == 0]  # gaps, as retention leaves
        Notification.delete().where(Notification.seq.in_(gone)).execute()
        kept = [r.seq for r in rows if r.seq % 3]
        times = _spread(kept, timedelta(minutes=10), listing.CREATED_AT_SLACK * 0.49)
        for hours in (0, 3, 10, 25, 40, 60):
            moment = START + timedelta(hours=hours)
            boundary = listing.seq_at(moment)
            assert all(seq < boundary for seq, at in times.items() if at < moment - listing.CREATED_AT_SLACK)
            assert all(seq >= boundary for seq, at in times.items() if at >= moment + listing.CREATED_AT_SLACK)


def test_a_window_far_back_is_read_from_its_end_not_from_the_newest_row(pg_db, api_key, monkeypatch):
    # Before, the page walked the key's rows from the newest back to the window, dropping each: 0.9-3.9 s
    # over a key's 1.5-1.7 million rows for a day a month or two back.
    key = api_key[0]
    with database.connection_context():
        rows = store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 3000)
        _spread([r.seq for r in rows], timedelta(minutes=10), timedelta(0))
        database.execute_sql("ANALYZE notifications")
        after, before = START + timedelta(days=2), START + timedelta(days=3)
        seen, real = [], database.obj.execute_sql

        def execute_sql(sql, params=None, *args, **kwargs):
            seen.append((sql, params))
            return real(sql, params, *args, **kwargs)

        monkeypatch.setattr(database.obj, "execute_sql", execute_sql)
        page, _ = listing.list_for_key(key, limit=50, created_after=after, created_before=before)
        monkeypatch.undo()
        assert [n.created_at for n in page] == sorted((n.created_at for n in page), reverse=True)
        assert len(page) == 50 and all(after <= n.created_at < before for n in page)
        (sql, params), = [(sql, params) for sql, params in seen if 'ORDER BY "t1"."seq" DESC' in sql]
        plan = "\n".join(r[0] for r in database.execute_sql("EXPLAIN ANALYZE " + sql, params).fetchall())
        removed = [int(line.split(":")[1]) for line in plan.splitlines() if "Rows Removed by Filter" in line]
        # At most the rows of the slack on either side of the window (an hour: 6 rows each), not the 2,500
        # newer than it.
        assert sum(removed) <= 20, plan
