"""A write whose answer was lost with its connection: whether its commit was made after all.

A connection cut as a commit went out (a failover, a restart, a network fault) leaves the client
unable to tell a commit the server made, whose answer was lost, from one it never received. The API
answered 503 ("nothing is stored") either way, and the reconciler then sent what had been stored:
a caller retrying without an idempotency key got the email twice. The rows' ids are chosen before
they are written, so a new connection can tell which it was.
"""

from __future__ import annotations

import logging
import time

from notifier import store
from notifier.db import UNAVAILABLE_ERRORS, cancelled, deadlocked, discard_connection, is_postgres
from notifier.models import Notification

logger = logging.getLogger(__name__)

# Seconds between the tries to read what was stored: about 2 s in all, so a database that stays away
# still gets its 503 within the API's patience (a connection refused fails each try at once).
CHECK_DELAYS = (0.0, 0.25, 0.5, 1.0)


# How long one look-up waits for the transactions still writing under the key (see _after_open_writes).
LOCK_WAIT = "500ms"


def _after_open_writes(db, api_key_id: int) -> None:
    """Wait until no transaction that inserted under api_key_id is still open.

    The server may not have the lost COMMIT yet (still on its way, or the old session not yet told):
    read at once, the rows are not there, the answer is 503 "nothing stored", and the commit lands a
    moment later, to be sent by the reconciler. Each insert holds a FOR KEY SHARE lock on its key's row
    (the foreign key) until its transaction ends, so FOR UPDATE on that row waits for the lost one
    too; past LOCK_WAIT the try fails (lock_timeout) and the next one waits again."""
    if not is_postgres(db):
        return  # SQLite: one file, no session left behind on a network
    db.execute_sql(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
    db.execute_sql('SELECT 1 FROM "api_keys" WHERE "id" = %s FOR UPDATE', [api_key_id])


def in_doubt(exc: BaseException) -> bool:
    """Whether exc, raised by a write, leaves open whether it was committed: not a statement the server
    cancelled or rolled back to break a deadlock (it answered, so nothing was written), but a
    connection lost or broken."""
    return isinstance(exc, UNAVAILABLE_ERRORS) and not cancelled(exc) and not deadlocked(exc)


def stored(db, api_key_id: int, ids: list[str],
           delays: tuple[float, ...] = CHECK_DELAYS) -> dict[str, Notification] | None:
    """The notifications among ids that the database holds, by id, read on a new connection (the
    broken one is given up) once no transaction writing under api_key_id is still open; None when the
    database cannot be asked within delays."""
    for delay in delays:
        discard_connection(db)
        time.sleep(delay)
        try:
            with db.atomic():
                _after_open_writes(db, api_key_id)
                found = store.get_many(ids)
        except UNAVAILABLE_ERRORS as exc:
            logger.info("cannot read whether a lost commit was made yet: %s", type(exc).__name__)
            continue
        if found:
            logger.warning("a commit's answer was lost with its connection, but it was made: %s of %s "
                           "notification(s) stored", len(found), len(ids))
        return found
    discard_connection(db)
    return None
