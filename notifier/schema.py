"""Create or upgrade the schema, idempotently and safely when several processes start at once."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from peewee import PostgresqlDatabase
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate

from notifier import index_builds, mail
from notifier.keycache import CHANNEL
from notifier.models import FINAL_STATUSES, MODELS, Event, SchemaVersion, Status, Suppression, utcnow

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 18
# Indexes a later version replaced, dropped where an earlier one made them (5: the reconciler pages
# owed callbacks by seq, not by updated_at; two partial indexes of version 5's first cut, before it
# paged deadlines and send times by seq too; 6: it pages queued rows a priority at a time; 8: an
# idempotency key is unique with its scope, as one event stores several notifications under it).
# Version 7 only adds one: a digest's items by digest_id; 9 moves the items of digests made before 7;
# 10 replaces the index of suppressions by key alone with one by key and id, the order of the API's
# pages of them; 11 replaces three indexes of every notification by two partial ones (models.py) and
# moves the preferences an `email:` path stored in its own letter case to the key mail reads; 12 counts
# the moves that made each notification final (models.Notification.final_moves); 13 only adds a column
# (the callback secret a rotation replaced); 14 only adds an index (the callbacks that gave up); 15
# makes a digest per address (models.Digest.email), its unique index with it; 16 only adds an index
# (a key's notifications by lower-cased address, for the API's `to` filter and a user's counts by address);
# 17 only adds a column (when a user's data was erased: models.Notification.erased_at); 18 only adds two
# indexes (a key's notifications that did not go out, partial; the digests made, by time).
_REPLACED_INDEXES = ("notification_callback_status_updated_at", "notifications_waiting_expires_at",
                     "notifications_scheduled_send_at", "notifications_queued_seq",
                     # The name peewee gave the key-only unique index (after the model, not the table).
                     "notification_api_key_id_idempotency_key",
                     # 10: the foreign key's own index (the model's name again), now the start of two others.
                     "suppression_api_key_id",
                     "notification_api_key_id", "notification_status_updated_at",
                     "notification_status_api_key_id_user_key_category",
                     # 15: one digest per user, category and window, now per address too.
                     "digest_api_key_id_user_key_category_window_end")
ONE_DIGEST_PER_WINDOW = _REPLACED_INDEXES[-1]
# Those of notifications, which a release before theirs makes again when it starts against this schema (a
# rollback, or an old process started during an upgrade) while the version stays: the key-only unique one
# (versions 1-7) refuses an event's notifications, which share its key (every event with one was a 500), and
# the others cost each claim and `sent` record a write more. All on one table, so dropping them takes no
# lock but that table's: a send in flight cannot be waiting for this transaction holding another.
_MADE_AGAIN_BY_OLDER = tuple(name for name in _REPLACED_INDEXES if name.startswith("notification"))
_LOCK_ID = 0x6E6F7469  # an arbitrary constant: "noti"
_KEY_TRIGGER = "notifier_api_keys_changed"


def upgrade(db) -> int:
    """Bring the schema to SCHEMA_VERSION and return it."""
    postgres = isinstance(db, PostgresqlDatabase)
    with db.connection_context():
        with _locked(db):
            if _up_to_date(db):
                # Every process runs this at start, while others send: a schema already at this version
                # gets no DDL. CREATE INDEX IF NOT EXISTS locks its table (SHARE) even when the index
                # exists, until this transaction ends, and it locks notifications before
                # notification_events, where a claim or a `sent` record in flight locks them the other
                # way round: the two deadlocked, every write waited for PostgreSQL's deadlock_timeout,
                # one of them was cancelled (a starting process died of it), and a worker killed
                # meanwhile sent its email again. Only what an older release made again is dropped.
                _drop_made_again(db)
                return SCHEMA_VERSION
            if not postgres:
                # Columns first: an index a new version adds may be on a column it adds.
                _add_missing_columns(db)
                db.create_tables(MODELS, safe=True)  # and, on an existing table, the indexes it lacks
                _finish(db)
        if postgres:
            _upgrade_postgres(db)
    logger.debug("schema at version %s", SCHEMA_VERSION)
    return SCHEMA_VERSION


def _upgrade_postgres(db) -> None:
    # As on SQLite, but an existing table's indexes are built outside any transaction, writes going on
    # (notifier.index_builds). Should the process die meanwhile, the version is not recorded yet: the next
    # upgrade builds what is missing, and what a build left invalid, again. The indexes a version replaced
    # go once their successors are there.
    with index_builds.one_at_a_time(db) as still_ours:
        with _locked(db):
            still_ours()
            if _up_to_date(db):
                return  # another process upgraded it while this one waited
            _add_missing_columns(db)
            tables = set(db.get_tables())
            # A new table is empty: its indexes are built with it.
            db.create_tables([model for model in MODELS if model._meta.table_name not in tables], safe=True)
        index_builds.build_missing(db, MODELS, still_ours)
        with _locked(db):
            still_ours()
            index_builds.require_valid(db, MODELS)
            _finish(db)


@contextmanager
def _locked(db):
    """A transaction that waits for any other process's upgrade transaction (an older release's too)."""
    with db.atomic():
        if isinstance(db, PostgresqlDatabase):
            # An upgrade waits for another process's and may rewrite a large table: neither is a
            # stuck statement, so DATABASE_STATEMENT_TIMEOUT does not apply (for this transaction only).
            db.execute_sql("SET LOCAL statement_timeout = 0")
            # Two processes starting together would race on CREATE TABLE IF NOT EXISTS. The lock is
            # the transaction's, not the session's: a reconnect (the pool's, after a dropped
            # connection) cannot happen inside a transaction, so the work never runs without it.
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        yield


def _finish(db) -> None:
    """What follows the tables and their indexes: the indexes replaced go, rows move, the version is recorded."""
    for name in _REPLACED_INDEXES:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')
    if isinstance(db, PostgresqlDatabase):
        _notify_key_changes(db)
    row = SchemaVersion.select().first()
    if row is not None and row.version < 8:
        _suppressions_of_unknown_mailboxes_only(db)
    if row is not None and row.version < 9:
        _items_follow_their_digests(db)
    if row is not None and row.version < 11:
        _address_keys_lower_cased(db)
    if row is not None and row.version < 12:
        _final_moves_counted(db)
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


def _drop_made_again(db) -> None:
    """Drop the indexes of notifications this version replaced that an older release made again (read
    from the catalog: no table is locked when there are none)."""
    names = list(_MADE_AGAIN_BY_OLDER)
    if isinstance(db, PostgresqlDatabase):
        rows = db.execute_sql("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                              "AND tablename = 'notifications' AND indexname = ANY(%s)", (names,)).fetchall()
    else:
        rows = db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'notifications' "
                              f"AND name IN ({', '.join('?' * len(names))})", names).fetchall()
    found = sorted(name for (name,) in rows)
    if not found:
        return
    logger.warning("an older release made again indexes of notifications that version %s replaced: dropping %s",
                   SCHEMA_VERSION, ", ".join(found))
    for name in found:
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


def drop_one_digest_per_window(db) -> None:
    """Drop the unique index of digests a version-14 process made again when it started after the
    upgrade: it allows one digest per user's window, where version 15 makes one per address."""
    db.execute_sql(f'DROP INDEX IF EXISTS "{ONE_DIGEST_PER_WINDOW}"')


def _up_to_date(db) -> bool:
    """Whether the schema is at SCHEMA_VERSION already (read without locking any table but its own)."""
    if not db.table_exists(SchemaVersion._meta.table_name):
        return False
    row = SchemaVersion.select().first()
    return row is not None and row.version == SCHEMA_VERSION


def _suppressions_of_unknown_mailboxes_only(db) -> None:
    # Until version 6's last release, any permanent refusal of RCPT put the address on its key's
    # suppression list (a 550 5.7.1 policy refusal of one message, a 552 5.2.2 full mailbox), and until
    # version 7's a refusal of our sender too: every later send to it, transactional mail included and a
    # requeued dead letter, was `suppressed` for good, though only an unknown mailbox does that now (and
    # the README promises no more). Those the old rules alone listed go, with a warning naming how many.
    stale = [row_id for row_id, reason in db.execute_sql('SELECT "id", "reason" FROM "suppressions"')
             if reason is not None and not mail.names_an_unknown_mailbox(reason)]
    if not stale:
        return
    logger.warning("schema upgrade: %s suppressed addresses were listed for a refusal that was not of an unknown "
                   "mailbox (an older release's rule): they are mailed again", len(stale))
    for start in range(0, len(stale), 500):
        Suppression.delete().where(Suppression.id.in_(stale[start:start + 500])).execute()


def _items_follow_their_digests(db) -> None:
    # Before version 7 an item became `digested` as its digest was made (and its callback said so).
    # From 7 on it is `in_digest` until the digest ends, then ends as the digest did (store.transition
    # moves them together): an item of a digest still on its way would otherwise say `digested`
    # whatever became of it. Version 9 does this, as databases that reached 7 or 8 did not.
    mark = "%s" if isinstance(db, PostgresqlDatabase) else "?"

    def items_of(digests_where: str) -> str:
        return ('"status" = \'digested\' AND "digest_id" IN (SELECT "id" FROM "notifications" '
                f'WHERE "template" = \'digest\' AND {digests_where})')

    def move(where: str, where_params: tuple, to: str, reason: str, assignments: str, params: tuple = ()) -> None:
        # The history line first, while the rows still read `digested`; then the move itself.
        at = Event._meta.fields["at"].db_value(utcnow())
        db.execute_sql('INSERT INTO "notification_events" ("notification_id", "at", "kind", "from_status", '
                       f'"to_status", "reason") SELECT "seq", {mark}, \'status\', \'digested\', {mark}, {mark} '
                       f'FROM "notifications" WHERE {where}', (at, to, reason, *where_params))
        db.execute_sql(f'UPDATE "notifications" SET "status" = {mark}, {assignments} WHERE {where}',
                       (to, *params, *where_params))

    final = ("sent", "failed", "expired", "cancelled", "suppressed", "digested")
    # Its callback is owed when the digest ends, as for any item in one.
    move(items_of(f'"status" NOT IN ({", ".join([mark] * len(final))})'), final, "in_digest",
         "schema upgrade: its digest has not gone out yet",
         '"sent_at" = NULL, "last_error" = NULL, "callback_status" = NULL, "callback_attempts" = 0')
    for ended in ("failed", "expired", "cancelled", "suppressed"):
        reason = f"schema upgrade: its digest was {ended}"
        move(items_of(f'"status" = {mark}'), (ended,), ended, reason,
             f'"sent_at" = NULL, "last_error" = {mark}, "callback_attempts" = 0, "callback_status" = '
             'CASE WHEN "callback_url" IS NULL THEN NULL ELSE \'pending\' END', (reason,))
    sent = items_of(f'"status" = {mark}')
    db.execute_sql('UPDATE "notifications" SET "sent_at" = (SELECT d."sent_at" FROM "notifications" d WHERE '
                   f'd."id" = "notifications"."digest_id") WHERE "sent_at" IS NULL AND {sent}', ("sent",))


def _address_keys_lower_cased(db) -> None:
    # Before version 11, PUT /api/users/email:Ann@Example.com/preferences stored them under the address
    # as the path wrote it, while mail sent to it with no user id follows "email:" and the address
    # lower-cased (consent.user_key_for): turning a category off that way did nothing. The API
    # lower-cases such a path now; this moves what it stored before to the key mail reads.
    collate = ' COLLATE "C"' if isinstance(db, PostgresqlDatabase) else ""

    def lowered(alias: str) -> str:
        # ASCII only, as Python lower-cases an address the API takes ("C": whatever the database's collation).
        return f'\'email:\' || lower(substr({alias}."user_key", 7){collate})'

    def address(alias: str) -> str:
        return f'substr({alias}."user_key", 1, 6) = \'email:\''  # LIKE ignores case on SQLite

    for table, same in (("preferences", ' AND {a}."category" = t."category"'), ("user_profiles", "")):
        def one(alias: str, same=same) -> str:
            return f'{alias}."api_key_id" = t."api_key_id" AND {address(alias)}{same.format(a=alias)}'
        # Where the lower-cased key has answers already, mail has followed those: they stay. Of
        # several spellings of one address, the newest row moves.
        db.execute_sql(
            f'UPDATE "{table}" SET "user_key" = {lowered("t")} FROM (SELECT * FROM "{table}") t '
            f'WHERE "{table}"."id" = t."id" AND {address("t")} AND t."user_key" <> {lowered("t")} '
            f'AND NOT EXISTS (SELECT 1 FROM "{table}" o WHERE {one("o")} AND o."user_key" = {lowered("t")}) '
            f'AND t."id" = (SELECT max(m."id") FROM "{table}" m WHERE {one("m")} AND {lowered("m")} = {lowered("t")})')


def _final_moves_counted(db) -> None:
    # Version 12 counts the moves that made a notification final (Notifier-Event-Id names which one
    # from the second on). Counted from the history only where another can still come, a dead letter
    # or a notification requeued from one: every other row is final for good, and its event keeps the
    # id it had, whatever it was posted as before the upgrade.
    mark = "%s" if isinstance(db, PostgresqlDatabase) else "?"
    final = [status.value for status in FINAL_STATUSES]
    marks = ", ".join([mark] * len(final))
    db.execute_sql(
        'UPDATE "notifications" SET "final_moves" = (SELECT count(*) FROM "notification_events" e '
        f'WHERE e."notification_id" = "notifications"."seq" AND e."kind" = \'status\' '
        f'AND e."from_status" IS NOT NULL AND e."to_status" IN ({marks})) '
        f'WHERE "status" IN ({mark}) OR "status" NOT IN ({marks})',
        (*final, Status.FAILED.value, *final))


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


def _add_missing_columns(db, models=MODELS) -> None:
    # Upgrades so far only add columns (each nullable or with a default): add whatever a table lacks.
    # One that changed a column's type would also have to make every running process reconnect: a
    # statement its connections prepared (notifier.db) then fails, "cached plan must not change result type".
    # A NOT NULL column carries its default in its DDL (constraints=[SQL("DEFAULT ...")]) and is added
    # as it is: peewee otherwise adds it nullable, fills every row, then sets NOT NULL, which rewrites
    # the whole table on PostgreSQL and, on SQLite, copies the table and drops the original, whose
    # ON DELETE CASCADE emptied the history of every notification.
    migrator = PostgresqlMigrator(db) if isinstance(db, PostgresqlDatabase) else SqliteMigrator(db)
    operations = []
    tables = set(db.get_tables())
    for model in models:
        table = model._meta.table_name
        if table not in tables:
            continue  # create_tables makes it whole
        present = {column.name for column in db.get_columns(table)}
        for field in model._meta.sorted_fields:
            if field.column_name not in present:
                if not field.null and not _default_in_ddl(field):
                    # Refused before any DDL runs: the rebuild would pass every test on an empty table.
                    raise RuntimeError(f"{table}.{field.column_name} is NOT NULL without a DEFAULT in its DDL "
                                       '(constraints=[SQL("DEFAULT ...")]): it cannot be added in place')
                logger.info("adding column %s.%s", table, field.column_name)
                operations.append(migrator.add_column(table, field.column_name, field, allow_not_null=True))
    if operations:
        migrate(*operations)


def _default_in_ddl(field) -> bool:
    return any("DEFAULT" in getattr(c, "sql", "").upper() for c in field.constraints or ())
