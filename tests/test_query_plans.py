"""The delivery path's statements find their row by its key, whatever PostgreSQL's statistics say.

The status guard of a transition sits beside a unique key; with indexes that lead with status (the
reconciler's) and statistics from before a backlog arrived, the planner used to walk every row of that
status for each claim instead."""

from __future__ import annotations

from notifier import store
from notifier.db import database
from notifier.models import Status

FIELDS = {"to": "carol@example.com", "subject": "Hi", "text": "Hello", "priority": "default"}


def _recording(monkeypatch) -> list[tuple[str, list]]:
    """Every statement the database runs from now on, with its parameters (and still run)."""
    seen, db = [], database.obj
    real = db.execute_sql

    def execute_sql(sql, params=None, *args, **kwargs):
        seen.append((sql, params))
        return real(sql, params, *args, **kwargs)

    monkeypatch.setattr(db, "execute_sql", execute_sql)
    return seen


def _plan(sql: str, params: list) -> str:
    return "\n".join(row[0] for row in database.execute_sql("EXPLAIN " + sql, params).fetchall())


def test_transitions_use_the_key_when_statistics_say_the_status_is_rare(pg_db, api_key, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 500)
        database.execute_sql("ANALYZE notifications")  # as autovacuum left it: hardly any `queued`
        backlog = store.create_notifications(key, [(dict(FIELDS), Status.QUEUED, "accepted")] * 500)
        first, second = backlog[0], backlog[1]
        seen = _recording(monkeypatch)
        assert store.claim(first.id, known=first)
        first.status = Status.SENDING.value
        assert store.transition(first.id, Status.SENT, sources=(Status.SENDING,), known=first, reason="sent")
        assert store.transition(second.id, Status.CANCELLED, reason="cancelled by caller")
        monkeypatch.undo()
        updates = [s for s in seen if s[0].startswith(("WITH", "UPDATE"))]
        lookups = [s for s in seen if s[0].startswith("SELECT") and '"status" IN' in s[0]]
        assert len(updates) == 3 and len(lookups) == 1
        for sql, params in updates:
            plan = _plan(sql, params)
            assert "notifications_pkey" in plan and "notification_status" not in plan, plan
        plan = _plan(*lookups[0])
        assert "notification_id" in plan and "notification_status" not in plan, plan
