"""The schema upgrade every process runs at start, against the work of the processes already running."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from peewee import IntegrityError

from notifier import consent, keys, schema
from notifier.db import database
from notifier.models import (
    DeliveryMode,
    Digest,
    Event,
    Notification,
    Preference,
    SchemaVersion,
    Status,
    Suppression,
    UserProfile,
    utcnow,
)
from tests.helpers import make_notification


def _waiting_for_a_lock(pg_url: str, other_than: int) -> bool:
    with psycopg2.connect(pg_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> %s", (other_than,))
        return cur.fetchone()[0] > 0


def test_a_process_starting_on_an_up_to_date_schema_never_holds_up_a_send_in_flight(pg_db, pg_url, api_key):
    notification = make_notification(api_key[0], status=Status.SENDING)
    sender = psycopg2.connect(pg_url)  # a worker recording a `sent`: history table first, then the row
    try:
        with sender.cursor() as cur:
            cur.execute("SET lock_timeout = '500ms'")
            cur.execute('LOCK TABLE "notification_events" IN ROW EXCLUSIVE MODE')
        outcome = []
        starting = threading.Thread(target=lambda: outcome.append(schema.upgrade(pg_db)))
        starting.start()
        deadline = time.monotonic() + 5
        while starting.is_alive() and not _waiting_for_a_lock(pg_url, sender.get_backend_pid()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with sender.cursor() as cur:  # raises LockNotAvailable if the upgrade holds the notifications
            cur.execute('UPDATE "notifications" SET "status" = %s WHERE "id" = %s', ("sent", notification.id))
            assert cur.rowcount == 1
        sender.commit()
        starting.join(timeout=10)
        assert outcome == [schema.SCHEMA_VERSION]
    finally:
        sender.close()


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_to_version_11_moves_preferences_an_address_path_stored_in_its_own_case(request, db_fixture):
    # Before 11, PUT /api/users/email:Ann@Example.com/preferences stored them under that spelling, which
    # no send reads (mail without a user id follows the address lower-cased): "off" did nothing.
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, _ = keys.create("before-11")
        for user_key, mode in (("email:Ann@Example.com", "off"),  # moves
                               ("email:BOB@example.com", "off"), ("email:bob@example.com", "daily"),  # mail read this
                               ("email:Cy@x.io", "weekly"), ("email:CY@x.io", "off"),  # the newest moves
                               ("EMAIL:Dee", "off"), ("User-7", "off")):  # user ids stay as they are
            Preference.create(api_key=key, user_key=user_key, category="marketing", mode=mode, updated_at=utcnow())
        UserProfile.create(api_key=key, user_key="email:Ann@Example.com", timezone="Europe/Paris",
                           quiet_start="22:00", quiet_end="07:00", updated_at=utcnow())
        SchemaVersion.update(version=10).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        assert consent.mode_for(key.id, "email:ann@example.com", "marketing") == DeliveryMode.OFF
        assert consent.mode_for(key.id, "email:bob@example.com", "marketing") == DeliveryMode.DAILY
        assert consent.mode_for(key.id, "email:cy@x.io", "marketing") == DeliveryMode.OFF
        assert {p.user_key for p in Preference.select()} == {
            "email:ann@example.com", "email:BOB@example.com", "email:bob@example.com", "email:Cy@x.io",
            "email:cy@x.io", "EMAIL:Dee", "User-7"}
        assert consent.get_profile(key, "email:ann@example.com").timezone == "Europe/Paris"


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_to_version_12_counts_the_final_moves_of_what_can_end_again(request, db_fixture):
    # A dead letter failed once before 12 had its `failed` event posted as "<id>:failed": failing again
    # after the upgrade must not be posted under that id again, and a receiver dropping duplicates by it
    # would drop it.
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, _ = keys.create("before-12")
        dead = make_notification(key, status=Status.FAILED)
        requeued = make_notification(key, status=Status.QUEUED)
        sent = make_notification(key, status=Status.SENT)
        lines = [(dead, "sending", "failed"), (requeued, "sending", "failed"), (requeued, "failed", "queued"),
                 (requeued, "sending", "failed"), (requeued, "failed", "queued"), (sent, "sending", "sent")]
        for notification, source, target in lines:
            Event.create(notification=notification.seq, kind="status", from_status=source, to_status=target)
        Event.create(notification=dead.seq, kind="callback", from_status="failed", to_status="failed")
        db.execute_sql('ALTER TABLE "notifications" DROP COLUMN "final_moves"')
        SchemaVersion.update(version=11).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        moves = {n.id: n.final_moves for n in Notification.select()}
    assert moves == {dead.id: 1, requeued.id: 2, sent.id: 0}


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_to_version_13_lets_a_callback_secret_be_rotated(request, db_fixture):
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, plaintext = keys.create("before-13")
        db.execute_sql('ALTER TABLE "api_keys" DROP COLUMN "old_callback_secret"')
        SchemaVersion.update(version=12).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        assert keys.rotate_callback_secret("before-13") is not None
        assert keys.authenticate(plaintext).old_callback_secret == key.callback_secret


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_to_version_15_makes_a_digest_per_address_of_a_window(request, db_fixture):
    db = request.getfixturevalue(db_fixture)
    window = utcnow().replace(microsecond=0)
    with database.connection_context():
        key, _ = keys.create("before-15")
        db.execute_sql('DROP INDEX "digest_api_key_id_user_key_category_window_end_email"')
        db.execute_sql('ALTER TABLE "digests" DROP COLUMN "email"')
        db.execute_sql('CREATE UNIQUE INDEX "digest_api_key_id_user_key_category_window_end" ON "digests" '
                       '("api_key_id", "user_key", "category", "window_end")')
        db.execute_sql('INSERT INTO "digests" ("api_key_id", "user_key", "category", "window_end", '
                       '"notification_id", "items", "created_at") VALUES (?, ?, ?, ?, ?, ?, ?)'.replace(
                           "?", "%s" if db_fixture == "pg_db" else "?"),
                       (key.id, "u1", "product", window, "n-old", 2, window))
        SchemaVersion.update(version=14).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        assert [(d.notification_id, d.email) for d in Digest.select()] == [("n-old", "")]
        fields = {"api_key": key, "user_key": "u1", "category": "product", "window_end": window, "items": 1}
        Digest.create(email="work@example.com", notification_id="n-work", **fields)
        Digest.create(email="home@example.com", notification_id="n-home", **fields)
        with pytest.raises(IntegrityError), database.atomic():
            Digest.create(email="home@example.com", notification_id="n-again", **fields)


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_from_version_7_or_before_unlists_the_addresses_only_an_older_rule_suppressed(request, db_fixture):
    # Versions 1-6 suppressed an address for any permanent refusal of RCPT, 1-7 for a refusal of our sender:
    # after the upgrade a password reset to an address a relay once refused by policy was `suppressed` still,
    # for good, and its dead letter could not be requeued (409 suppressed), though only an unknown mailbox
    # suppresses now. What an unknown mailbox listed stays, as does a reason that cannot be read.
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, _ = keys.create("version-4")
        reasons = {"policy@x.io": "recipient refused: 550 5.7.1 rejected by policy",
                   "full@x.io": "recipient refused: 552 5.2.2 mailbox full",
                   "sender@x.io": "sender refused: 553 5.1.8 sender domain does not exist",
                   "gone@x.io": "recipient refused: 550 5.1.1 no such user",
                   "old@x.io": "recipient refused: 550 mailbox unavailable",
                   "other@x.io": "added by hand"}
        for email, reason in reasons.items():
            consent.suppress(key.id, email, reason)
        SchemaVersion.update(version=4).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        assert {s.email for s in Suppression.select()} == {"gone@x.io", "old@x.io", "other@x.io"}
        consent.suppress(key.id, "policy@x.io", reasons["policy@x.io"])  # as a release before 7 may yet
    assert schema.upgrade(db) == schema.SCHEMA_VERSION  # at this version: never again
    with database.connection_context():
        assert consent.suppression(key.id, "policy@x.io") is not None


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_the_indexes_an_older_release_made_again_go_when_this_one_starts(request, db_fixture, caplog):
    # A rollback to a version before 8 (or one of its processes started during the upgrade): as it starts it
    # makes again the unique index of idempotency keys alone, and the schema stays at this version. Left,
    # every event sent with a key was a 500 (its notifications share the key), as was a send under a key an
    # event or a batch had used, for good: a process starting on this version ran no DDL.
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, _ = keys.create("rolled-back")
        db.execute_sql('CREATE UNIQUE INDEX "notification_api_key_id_idempotency_key" ON "notifications" '
                       '("api_key_id", "idempotency_key")')
        db.execute_sql('CREATE INDEX "notification_status_updated_at" ON "notifications" ("status", "updated_at")')
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    assert "notification_api_key_id_idempotency_key, notification_status_updated_at" in caplog.text
    with database.connection_context():
        assert not {"notification_api_key_id_idempotency_key", "notification_status_updated_at"} & {
            index.name for index in db.get_indexes("notifications")}
    make_notification(key, idempotency_key="order-1", idempotency_scope="event:order.placed:1")
    make_notification(key, idempotency_key="order-1", idempotency_scope="event:order.placed:2")
    caplog.clear()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION  # nothing left to drop: nothing said
    assert "older release" not in caplog.text


@pytest.mark.parametrize("db_fixture", ["pg_db", "sqlite_db"])
def test_an_upgrade_from_version_1_gives_the_notifications_before_categories_theirs(request, db_fixture):
    # Version 1 had no categories. Once _add_missing_columns refused a NOT NULL column without its DEFAULT
    # in the DDL, every process refused to start on a version-1 database (RuntimeError naming
    # notifications.category): its queued and scheduled mail waited for good.
    db = request.getfixturevalue(db_fixture)
    with database.connection_context():
        key, _ = keys.create("version-1")
    sent = make_notification(key, Status.SENT)
    queued = make_notification(key, Status.QUEUED)
    with database.connection_context():
        history = [(e.to_status, e.reason) for e in Event.select().where(Event.notification == sent.seq)]
        for index in db.get_indexes("notifications"):
            if "category" in index.columns or "category" in (index.sql or ""):
                db.execute_sql(f'DROP INDEX "{index.name}"')
        db.execute_sql('ALTER TABLE "notifications" DROP COLUMN "category"')
        SchemaVersion.update(version=1).execute()
    assert schema.upgrade(db) == schema.SCHEMA_VERSION
    with database.connection_context():
        assert {n.id: n.category for n in Notification.select()} == {sent.id: "transactional",
                                                                     queued.id: "transactional"}
        assert [(e.to_status, e.reason) for e in Event.select().where(Event.notification == sent.seq)] == history
        assert history


def test_a_not_null_column_without_its_default_in_the_ddl_is_refused_before_any_ddl_runs(tmp_path):
    # peewee adds such a column nullable, fills it, then sets NOT NULL: on SQLite by copying the table
    # and dropping the original, whose ON DELETE CASCADE empties the child table. The upgrade must stop
    # at once, naming the column, rather than pass on an empty test table and empty a user's history.
    from peewee import SQL, ForeignKeyField, IntegerField, Model, SqliteDatabase

    db = SqliteDatabase(str(tmp_path / "t.db"), pragmas={"foreign_keys": 1})

    class Parent(Model):
        class Meta:
            database = db
            table_name = "parents"

    class Child(Model):
        parent = ForeignKeyField(Parent, on_delete="CASCADE")

        class Meta:
            database = db
            table_name = "children"

    db.create_tables([Parent, Child])
    Child.create(parent=Parent.create())

    class WithoutDefault(Parent):
        added = IntegerField(default=0)

        class Meta:
            table_name = "parents"

    class WithDefault(Parent):
        added = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])

        class Meta:
            table_name = "parents"

    with pytest.raises(RuntimeError, match="parents.added is NOT NULL without a DEFAULT"):
        schema._add_missing_columns(db, [WithoutDefault])
    schema._add_missing_columns(db, [WithDefault])
    assert Child.select().count() == 1
    assert [row.added for row in WithDefault.select()] == [0]


def test_an_upgrade_from_version_17_adds_the_indexes_of_unsent_mail_and_of_digests_by_time(pg_db):
    with database.connection_context():
        for name in ("notifications_key_unsent_seq", "digest_created_at"):
            pg_db.execute_sql(f'DROP INDEX "{name}"')
        SchemaVersion.update(version=17).execute()
    assert schema.upgrade(pg_db) == schema.SCHEMA_VERSION == 18
    with database.connection_context():
        names = {i.name for t in ("notifications", "digests") for i in pg_db.get_indexes(t)}
        assert {"notifications_key_unsent_seq", "digest_created_at"} <= names
