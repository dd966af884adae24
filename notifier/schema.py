"""Create or upgrade the schema, idempotently and safely when several processes start at once."""

from __future__ import annotations

import logging

from peewee import PostgresqlDatabase
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate

from notifier.keycache import CHANNEL
from notifier.models import MODELS, SchemaVersion

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 8
# Indexes a later version replaced, dropped where an earlier one made them (5: the reconciler pages
# owed callbacks by seq, not by updated_at; two partial indexes of version 5's first cut, before it
# paged deadlines and send times by seq too; 6: it pages queued rows a priority at a time; 8: an
# idempotency key is unique with its scope, as one event stores several notifications under it).
# Version 7 only adds one: a digest's items by digest_id.
_REPLACED_INDEXES = ("notification_callback_status_updated_at", "notifications_waiting_expires_at",
                     "notifications_scheduled_send_at", "notifications_queued_seq",
                     # The name peewee gave the key-only unique index (after the model, not the table).
                     "notification_api_key_id_idempotency_key")
_LOCK_ID = 0x6E6F7469  # an arbitrary constant: "noti"
_KEY_TRIGGER = "notifier_api_keys_changed"


def upgrade(db) -> int:
    """Bring the schema to SCHEMA_VERSION and return it."""
    with db.connection_context(), db.atomic():
        if isinstance(db, PostgresqlDatabase):
            # Two processes starting together would race on CREATE TABLE IF NOT EXISTS. The lock is
            # the transaction's, not the session's: a reconnect (the pool's, after a dropped
            # connection) cannot happen inside a transaction, so the work never runs without it.
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        # Columns first: an index a new version adds may be on a column it adds.
        _add_missing_columns(db)
        db.create_tables(MODELS, safe=True)  # and, on an existing table, the indexes it lacks
        for name in _REPLACED_INDEXES:
            db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')
        if isinstance(db, PostgresqlDatabase):
            _notify_key_changes(db)
        row = SchemaVersion.select().first()
        if row is not None and row.version < 7:
            _items_follow_their_digests(db)
        if row is None:
            SchemaVersion.create(version=SCHEMA_VERSION)
        elif row.version < SCHEMA_VERSION:
            row.version = SCHEMA_VERSION
            row.save()
        elif row.version > SCHEMA_VERSION:
            # An older release started against a newer schema (a rolling upgrade, a rollback): it
            # works, but it has just made again the indexes the newer one replaced.
            logger.warning("database schema is at version %s, newer than this release's %s", row.version,
                           SCHEMA_VERSION)
    logger.debug("schema at version %s", SCHEMA_VERSION)
    return SCHEMA_VERSION


def _items_follow_their_digests(db) -> None:
    # Before version 7 an item became `digested` as its digest was made. From 7 on it is `in_digest`
    # until the digest ends, then ends as the digest did (store.transition moves them together): the
    # items of a digest still on its way would otherwise say `digested` whatever became of it.
    mark = "%s" if isinstance(db, PostgresqlDatabase) else "?"

    def items_of(digests_where: str) -> str:
        return ('"status" = \'digested\' AND "digest_id" IN (SELECT "id" FROM "notifications" '
                f'WHERE "template" = \'digest\' AND {digests_where})')

    def marks(values: tuple) -> str:
        return ", ".join([mark] * len(values))

    final = ("sent", "failed", "expired", "cancelled", "suppressed", "digested")
    ended_unsent = ("failed", "expired", "cancelled", "suppressed")
    its = 'FROM "notifications" d WHERE d."id" = "notifications"."digest_id"'
    db.execute_sql('UPDATE "notifications" SET "status" = \'in_digest\', "sent_at" = NULL '
                   f'WHERE {items_of(f""""status" NOT IN ({marks(final)})""")}', final)
    db.execute_sql(f'UPDATE "notifications" SET "status" = (SELECT d."status" {its}), "sent_at" = NULL '
                   f'WHERE {items_of(f""""status" IN ({marks(ended_unsent)})""")}', ended_unsent)
    db.execute_sql(f'UPDATE "notifications" SET "sent_at" = (SELECT d."sent_at" {its}) '
                   f'WHERE "sent_at" IS NULL AND {items_of(f""""status" = {mark}""")}', ("sent",))


def _notify_key_changes(db) -> None:
    # The API caches keys and empties its cache on this notification (notifier.keycache), so that a
    # change made any way at all - the CLI, or SQL by hand - reaches every API process. Created
    # only when missing: CREATE TRIGGER locks api_keys, and every process runs this at start.
    present = db.execute_sql("SELECT 1 FROM pg_trigger WHERE tgname = %s AND tgrelid = 'api_keys'::regclass",
                             (_KEY_TRIGGER,)).fetchone()
    if present:
        return
    db.execute_sql(
        "CREATE OR REPLACE FUNCTION notifier_api_keys_changed() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $$"
    )
    db.execute_sql(
        f"CREATE TRIGGER {_KEY_TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys "
        "FOR EACH STATEMENT EXECUTE PROCEDURE notifier_api_keys_changed()"
    )


def _add_missing_columns(db) -> None:
    # Upgrades so far only add columns (each nullable or with a default): add whatever a table lacks.
    migrator = PostgresqlMigrator(db) if isinstance(db, PostgresqlDatabase) else SqliteMigrator(db)
    operations = []
    tables = set(db.get_tables())
    for model in MODELS:
        table = model._meta.table_name
        if table not in tables:
            continue  # create_tables makes it whole
        present = {column.name for column in db.get_columns(table)}
        for field in model._meta.sorted_fields:
            if field.column_name not in present:
                logger.info("adding column %s.%s", table, field.column_name)
                operations.append(migrator.add_column(table, field.column_name, field))
    if operations:
        migrate(*operations)
