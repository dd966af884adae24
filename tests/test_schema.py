"""The schema upgrade every process runs at start, against the work of the processes already running."""

from __future__ import annotations

import threading
import time

import psycopg2

from notifier import schema
from notifier.models import Status
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
