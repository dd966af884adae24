"""The statements that run all the time find their rows by an index, whatever PostgreSQL's statistics say.

A transition's status guard sits beside a unique key, and the reconciler's pages look for rows in
one status: with statistics from before (or during) a backlog, the planner used to walk every row
of a status for each claim, or the whole table for a reconciler page."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from notifier import consent, deadletters, digests, listing, redelivery, store
from notifier.config import Settings
from notifier.db import _PREPARED, database
from notifier.models import CallbackStatus, Notification, SchemaVersion, Status, Suppression, utcnow
from notifier.reconciler import reconcile
from notifier.schema import SCHEMA_VERSION, upgrade

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


def _plan(sql: str, params: list, analyze: bool = False) -> str:
    explain = "EXPLAIN ANALYZE " if analyze else "EXPLAIN "
    return "\n".join(row[0] for row in database.execute_sql(explain + sql, params).fetchall())


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
            assert _found_by(_plan(sql, params), "seq")
        assert _found_by(_plan(*lookups[0]), "id")


def test_a_digest_finds_its_items_by_digest_id(pg_db, api_key, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        # Many digests sent long ago, each with its items: the table is mostly rows that were in one.
        for n in range(20):
            store.create_notifications(key, [(dict(FIELDS, digest_id=f"old-{n}"), Status.DIGESTED, "earlier")] * 200)
        digest = store.create_notification(key, dict(FIELDS, template="digest"), status=Status.SENDING)
        items = store.create_notifications(key, [(dict(FIELDS, digest_id=digest.id), Status.IN_DIGEST, "taken")] * 3)
        database.execute_sql("ANALYZE notifications")
        seen = _recording(monkeypatch)
        assert digests.leave_out_expired(Settings(), None, digest, utcnow()) == ([], True)  # before it goes out
        assert store.transition(digest.id, Status.SENT, sources=(Status.SENDING,), known=digest, reason="sent")
        monkeypatch.undo()
        (select,) = [s for s in seen if s[0].startswith("SELECT") and '"digest_id"' in s[0]]
        (update,) = [s for s in seen if s[0].startswith("UPDATE") and '"digest_id"' in s[0]]
        for statement in (select, update):
            assert _found_by(_plan(*statement), "digest_id")
            assert "notifications_digest_id" in _plan(*statement)
        assert {store.get(n.id).status for n in items} == {Status.DIGESTED}


def _found_by(plan: str, key: str) -> bool:
    """Whether every index lookup in plan is by key alone (whichever index holds it), none by status."""
    conditions = re.findall(r"Index Cond: (.*)", plan)
    assert conditions, plan
    assert all(re.match(rf"\(+{key}\)?(::text)? = ", c) for c in conditions), plan
    return True


# Statistics from a long backlog: a tenth of the table in each state a pass looks for, old enough
# for it, with deadlines, send times, owed callbacks and idempotency keys everywhere.
_BACKLOG = ("sent", "queued", "retrying", "scheduled", "held", "sending")


def _expected_index(sql: str, params: list) -> str:
    """The partial index meant for one of a pass's statements (named when the test fails)."""
    if '"idempotency_key" IS NOT NULL' in sql:
        return "notifications_keyed_created_at"
    for column, index in (("expires_at", "expiring_seq"), ("send_at", "scheduled_seq"),
                          ("callback_status", "callback_pending_seq")):
        if f'"{column}" <=' in sql or f'"{column}" =' in sql:
            return f"notifications_{index}"
    (status,) = [p for p in params if p in ("queued", "retrying", "sending")]
    return "notifications_queued_priority_seq" if status == "queued" else f"notifications_{status}_seq"


def test_reconciler_pages_never_walk_the_table_when_statistics_are_stale(pg_db, api_key, redis_conn, pg_settings,
                                                                         monkeypatch):
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 4000)
        store.create_notifications(key, [(dict(FIELDS), Status.QUEUED, "accepted")] * 6000)
        old = utcnow() - timedelta(hours=1)
        database.execute_sql(
            'UPDATE "notifications" SET "status" = (%s::text[])["seq" %% 6 + 1], "updated_at" = %s, '
            '"created_at" = %s - interval \'30 days\', "expires_at" = %s, "send_at" = %s, "callback_status" = %s, '
            '"idempotency_key" = \'k\' || "seq" WHERE "seq" %% 10 >= 4',
            [list(_BACKLOG), old, old, old, old, CallbackStatus.PENDING.value])
        database.execute_sql("ANALYZE notifications")
        # Then it all went out: what each step looks for is rare now, and the table mostly `sent`.
        Notification.update(status=Status.SENT.value, callback_status=None, idempotency_key=None).execute()
        seen = _recording(monkeypatch)
        reconcile(pg_settings, redis_conn)
        monkeypatch.undo()
        pages = [s for s in seen if s[0].startswith("SELECT") and "ORDER BY" in s[0] and "LIMIT" in s[0]]
        # A page each step (scheduled rows twice: those overdue, and those due soon whose release Redis
        # lost); four to requeue (queued, a priority at a time, then retrying); keys to forget.
        assert len(pages) == 10
        walks = []
        for sql, params in pages:
            plan, meant = _plan(sql, params), _expected_index(sql, params)
            # Queued pages each look for one priority: by seq alone they would walk the other two.
            if "notifications_pkey" in plan or "Seq Scan" in plan or ("queued" in params and meant not in plan):
                walks.append((meant, plan))
        assert walks == [], "\n\n".join(f"{meant}:\n{plan}" for meant, plan in walks)


def test_a_page_of_suppressions_reads_only_its_own_rows(pg_db, api_key, other_key, monkeypatch):
    # A key whose list is old, then another's long and newer: by the primary key, the old one's first
    # page walked every row of the other's (by the key alone, it would sort all of its own).
    old, new = api_key[0], other_key[0]
    with database.connection_context():
        for key, count in ((old, 3000), (new, 30000)):
            Suppression.insert_many([{"api_key": key.id, "email": f"gone-{i}@example.com", "reason": "bounced"}
                                     for i in range(count)]).execute()
        database.execute_sql("ANALYZE suppressions")
        seen = _recording(monkeypatch)
        for key in (old, new):
            _, cursor = listing.suppressions_for_key(key, limit=10)
            listing.suppressions_for_key(key, limit=10, before_id=listing.decode_cursor(cursor))
        monkeypatch.undo()
        pages = [s for s in seen if 'FROM "suppressions"' in s[0]]
        assert len(pages) == 4
        for sql, params in pages:
            plan = _plan(sql, params, analyze=True)
            assert "Rows Removed by Filter" not in plan and "Sort" not in plan and "Seq Scan" not in plan, plan
        assert "suppression_api_key_id_id" in _plan(*pages[0])


def test_an_upgrade_to_version_10_replaces_the_index_of_suppressions_by_key(pg_db):
    with database.connection_context():
        database.execute_sql('DROP INDEX "suppression_api_key_id_id"')
        database.execute_sql('CREATE INDEX "suppression_api_key_id" ON "suppressions" ("api_key_id")')
        SchemaVersion.update(version=9).execute()
    assert upgrade(pg_db) == SCHEMA_VERSION
    with database.connection_context():
        rows = database.execute_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'suppressions'").fetchall()
    assert {name for (name,) in rows} == {"suppressions_pkey", "suppression_api_key_id_email",
                                          "suppression_api_key_id_id"}


def test_held_notifications_and_dead_letters_are_read_by_their_own_indexes(pg_db, api_key, redis_conn, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        # A long history of sent mail, a few failed and a few held for a digest.
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 4000)
        store.create_notifications(key, [(dict(FIELDS), Status.FAILED, "gave up")] * 5)
        store.create_notifications(key, [(dict(FIELDS, user_key="u1", category="marketing"), Status.HELD, "held")] * 5)
        database.execute_sql("ANALYZE notifications")
        seen = _recording(monkeypatch)
        assert len(deadletters.list_dead(redis_conn, key, limit=3)[0]) == 3
        assert len(list(digests._held(key.id, "u1", "marketing"))) == 5
        assert digests.pending_counts() == {"marketing": 5}
        monkeypatch.undo()
        dead = [s for s in seen if '"status" = ' in s[0] and "failed" in (s[1] or [])]
        held = [s for s in seen if "held" in (s[1] or [])]
        assert dead and len(held) == 2
        for statement in dead:
            assert "notifications_dead_updated_at" in _plan(*statement), _plan(*statement)
        for statement in held:
            assert "notifications_held_user_category" in _plan(*statement), _plan(*statement)


def test_the_callbacks_that_gave_up_are_read_by_their_own_index(pg_db, api_key, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS, callback_url="http://hooks.example/n",
                                               callback_status="delivered"), Status.SENT, "earlier")] * 4000)
        gave_up = store.create_notifications(key, [(dict(FIELDS, callback_url="http://hooks.example/n",
                                                         callback_status="gave_up"), Status.SENT, "sent")] * 5)
        database.execute_sql("ANALYZE notifications")
        seen = _recording(monkeypatch)
        assert list(redelivery.gave_up(key, since=utcnow() - timedelta(hours=1))) == [n.id for n in gave_up]
        monkeypatch.undo()
        (statement,) = [s for s in seen if "gave_up" in (s[1] or [])]
        assert "notifications_callback_gave_up_seq" in _plan(*statement), _plan(*statement)


def test_a_keys_mail_to_one_address_is_read_by_its_own_index(pg_db, api_key, client, headers, monkeypatch):
    # A long history to many addresses (some of it sent with no user id), and a little to Ann, in any
    # letter case: by the key's index of every row, her page and her counts read all of the key's mail.
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS, to=f"someone-{i % 500}@example.com", user_id=f"u{i}",
                                               user_key=f"u{i}"), Status.SENT, "earlier") for i in range(3000)])
        store.create_notifications(key, [(dict(FIELDS, to=f"nobody-{i % 500}@example.com",
                                               user_key=f"email:nobody-{i % 500}@example.com"), Status.SENT,
                                          "earlier") for i in range(3000)])
        to_ann = [store.create_notification(key, dict(FIELDS, to=to, user_key="email:ann@example.com"), status=status)
                  for to, status in (("ann@example.com", Status.SENT), ("Ann@Example.com", Status.FAILED),
                                     ("ANN@example.com", Status.QUEUED))]
        # Hers under a user id: listed by address, but not counted as the address's own.
        as_user = store.create_notification(key, dict(FIELDS, to="ann@example.com", user_id="ann", user_key="ann"))
        database.execute_sql("ANALYZE notifications")
    seen = _recording(monkeypatch)
    page = client.get("/api/notifications?to=aNN@example.com&limit=2", headers=headers).get_json()
    rest = client.get(f"/api/notifications?to=ann@example.com&limit=2&cursor={page['next']}", headers=headers)
    stats = client.get("/api/notifications/user/email:Ann@Example.com/stats", headers=headers).get_json()
    monkeypatch.undo()
    listed = [n["id"] for n in page["data"] + rest.get_json()["data"]]
    assert listed == [as_user.id, *[n.id for n in reversed(to_ann)]]
    assert (stats["total"], stats["by_status"]["sent"], stats["by_status"]["failed"]) == (3, 1, 1)
    reads = [s for s in seen if 'LOWER("t1"."to")' in s[0]]
    assert len(reads) == 3
    with database.connection_context():
        for sql, params in reads:
            plan = _plan(sql, params, analyze=True)
            assert "notifications_key_lower_to_seq" in plan and "Seq Scan" not in plan, plan
            # Only Ann's rows are read: at most the one sent under her user id is left out.
            assert all(int(n) <= 1 for n in re.findall(r"Rows Removed by Filter: (\d+)", plan)), plan


def test_a_page_of_dead_letters_reads_their_histories_in_one_query(pg_db, api_key, redis_conn, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        dead = store.create_notifications(key, [(dict(FIELDS), Status.QUEUED, "accepted")] * 30)
        for n in dead:
            assert store.transition(n.id, Status.FAILED, reason=f"550 for {n.id}", smtp_code=550)
        seen = _recording(monkeypatch)
        entries, _ = deadletters.list_dead(redis_conn, key, limit=25)
        monkeypatch.undo()
    assert [(e.id, e.reason, e.smtp_code) for e in entries] == [(n.id, f"550 for {n.id}", 550)
                                                                for n in reversed(dead[5:])]
    assert len([s for s in seen if 'FROM "notification_events"' in s[0]]) == 1


def _indexes() -> set[str]:
    rows = database.execute_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'notifications'").fetchall()
    return {name for (name,) in rows}


# Version 4 had one index of every row's callback status instead of the reconciler's partial ones;
# the first cut of version 5 (on development and bench databases) had two partial indexes since
# replaced; version 5 one of queued rows by seq alone. Up to version 10, three indexes of every row.
_BEFORE_5 = {"notification_callback_status_updated_at": '("callback_status", "updated_at")',
             "notifications_waiting_expires_at": '("expires_at") WHERE "expires_at" IS NOT NULL',
             "notifications_scheduled_send_at": '("send_at") WHERE "status" = \'scheduled\'',
             "notifications_queued_seq": '("seq") WHERE "status" = \'queued\''}
_BEFORE_11 = {"notification_api_key_id": '("api_key_id")',
              "notification_status_updated_at": '("status", "updated_at")',
              "notification_status_api_key_id_user_key_category": '("status", "api_key_id", "user_key", "category")'}


@pytest.mark.parametrize("version, replaced, made", [
    (4, _BEFORE_5, None),
    (10, _BEFORE_11, {"notifications_held_user_category", "notifications_dead_updated_at"}),
    (13, {}, {"notifications_callback_gave_up_seq"}),
    (15, {}, {"notifications_key_lower_to_seq"}),
    (17, {}, {"notifications_key_unsent_seq"}),
])
def test_an_upgrade_makes_the_partial_indexes_and_drops_those_they_replace(pg_db, version, replaced, made):
    with database.connection_context():
        if made is None:
            made = {name for name in _indexes() if name.startswith("notifications_") and name != "notifications_pkey"}
            # The reconciler's seven, since version 7 a digest's items, since 11 the held ones and the dead
            # letters, since 14 the callbacks that gave up, since 16 a key's mail by address, since 18 a
            # key's mail that did not go out.
            assert len(made) == 13
        for name in made:
            database.execute_sql(f'DROP INDEX "{name}"')
        for name, columns in replaced.items():
            database.execute_sql(f'CREATE INDEX "{name}" ON "notifications" {columns}')
        SchemaVersion.update(version=version).execute()
    assert upgrade(pg_db) == SCHEMA_VERSION
    with database.connection_context():
        assert made <= _indexes()
        assert not set(replaced) & _indexes()
        assert SchemaVersion.get().version == SCHEMA_VERSION


def test_an_older_release_on_a_newer_schema_says_so(sqlite_db, caplog):
    SchemaVersion.update(version=SCHEMA_VERSION + 1).execute()
    with caplog.at_level("WARNING", logger="notifier.schema"):
        assert upgrade(sqlite_db) == SCHEMA_VERSION
    assert f"newer than this release's {SCHEMA_VERSION}" in caplog.text
    assert SchemaVersion.get().version == SCHEMA_VERSION + 1  # never moved back


def _generic_plan(sql: str, params: list) -> str:
    """The plan PostgreSQL uses for a prepared statement once it has switched to a generic one (after
    five runs, when that is not dearer than the custom plans), as the pooled connections run them."""
    name = _PREPARED[sql]
    database.execute_sql(sql, params)  # prepared on this connection, if it was not already
    database.execute_sql("SET plan_cache_mode = force_generic_plan")
    try:
        rows = database.execute_sql(f"EXPLAIN EXECUTE {name} ({', '.join(['%s'] * len(params))})", params)
        return "\n".join(row[0] for row in rows.fetchall())
    finally:
        database.execute_sql("RESET plan_cache_mode")


def test_prepared_statements_keep_the_key_in_their_generic_plans(pg_db, api_key, monkeypatch):
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 500)
        # A key with a long suppression list: the address must be looked up, not the key's list read.
        Suppression.insert_many([{"api_key": key.id, "email": f"gone-{i}@example.com", "reason": "bounced"}
                                 for i in range(2000)]).execute()
        database.execute_sql("ANALYZE notifications")
        database.execute_sql("ANALYZE suppressions")
        backlog = store.create_notifications(key, [(dict(FIELDS), Status.QUEUED, "accepted")] * 500)
        seen = _recording(monkeypatch)
        for n in backlog[:6]:
            store.get(n.id)  # as the API reads one
            current, _ = consent.sending(n.id)  # as a job reads it, with its recipient's consent
            consent.prefetch(key.id, [(current.to, "carol", "marketing")])  # as the API's send asks
            assert store.claim(current.id, known=current)
            current.status = Status.SENDING.value
            assert store.transition(current.id, Status.SENT, sources=(Status.SENDING,), known=current, reason="sent")
        monkeypatch.undo()
        marked = {sql: params for sql, params in seen if sql in _PREPARED}
        updates = [(sql, params) for sql, params in marked.items() if sql.startswith("WITH moved")]
        (by_id,) = [(sql, params) for sql, params in marked.items() if 'FROM "notifications" WHERE "id"' in sql]
        (sending,) = [(sql, params) for sql, params in marked.items() if "LATERAL" in sql]
        (consent_rows,) = [(sql, params) for sql, params in marked.items() if "UNION ALL" in sql and sql != sending[0]]
        assert len(updates) == 2  # the claim and the `sent` record
        for sql, params in updates:
            assert _found_by(_generic_plan(sql, params), "seq")
        assert _found_by(_generic_plan(*by_id), "id")
        plan = _generic_plan(*consent_rows)
        assert "suppression_api_key_id_email" in plan and "Seq Scan" not in plan, plan
        plan = _generic_plan(*sending)
        assert re.search(r"Index Cond: \(+id\)?(::text)? = ", plan) and "Seq Scan" not in plan, plan
        for index in ("suppression_api_key_id_email", "preference_api_key_id_user_key_category",
                      "userprofile_api_key_id_user_key"):
            assert index in plan, plan


def test_a_keys_unsent_mail_of_one_status_is_found_by_its_partial_index(pg_db, api_key):
    # Schema 11 took the index of every row's status away (each claim and `sent` record wrote into it);
    # status=expired then read every row of the key: 0.2-0.7 s over a small key's 36,000.
    key = api_key[0]
    with database.connection_context():
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "earlier")] * 2000)
        store.create_notifications(key, [(dict(FIELDS), Status.EXPIRED, "too late")] * 3)
        store.create_notifications(key, [(dict(FIELDS), Status.SENT, "later")] * 2000)
        database.execute_sql("ANALYZE notifications")
        sql, params = (Notification.select().where(Notification.api_key == key.id,
                                                   Notification.status == Status.EXPIRED.value)
                       .order_by(Notification.seq.desc()).limit(51).sql())
        assert "notifications_key_unsent_seq" in _plan(sql, params)
        rows, _ = listing.list_for_key(key, limit=50, status="expired")
        assert len(rows) == 3


def test_a_claim_and_a_sent_record_write_nothing_into_the_index_of_unsent_mail(pg_db, api_key):
    key = api_key[0]
    with database.connection_context():
        n = store.create_notification(key, dict(FIELDS))
        assert store.claim(n.id, known=n)
        n.status = Status.SENDING.value
        assert store.transition(n.id, Status.SENT, sources=(Status.SENDING,), known=n, reason="sent")
        database.execute_sql("SET enable_seqscan = off")
        count = database.execute_sql("SELECT count(*) FROM notifications WHERE status IN "
                                     "('cancelled', 'expired', 'failed', 'suppressed')").fetchone()[0]
        database.execute_sql("RESET enable_seqscan")
        assert count == 0


def test_retention_finds_the_digests_to_forget_by_time(pg_db, api_key):
    from notifier.models import Digest
    key = api_key[0]
    with database.connection_context():
        Digest.insert_many([{"api_key": key.id, "user_key": f"u{i}", "category": "marketing", "window_end": utcnow(),
                             "notification_id": f"gone-{i}", "items": 1,
                             "created_at": utcnow() - timedelta(days=i % 400)} for i in range(4000)]).execute()
        database.execute_sql("ANALYZE digests")
        sql, params = (Digest.select(Digest.id).where(Digest.created_at < utcnow() - timedelta(days=395))).sql()
        assert "digest_created_at" in _plan(sql, params)
