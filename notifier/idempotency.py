"""Idempotency keys: what a caller's key names, and finding the notification an earlier request stored.

A caller's key covers a whole request, and some requests store several notifications: an event one
per rule, a batch one per item. Each notification is stored under the caller's key as given and a
scope saying which part of the request it answers for, so that no key a caller may choose for one
route can name a notification of another ("abc:welcome" on a send is not event "abc"'s welcome).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from notifier.db import database, is_postgres
from notifier.models import ApiKey, Notification

# The request is the notification: a send, a verification, a batch item with a key of its own.
SEND = "send"


@dataclass(frozen=True)
class Key:
    """A caller's key (1 to 255 characters, as given) and the part of the request it answers for."""

    key: str
    scope: str = SEND

    @classmethod
    def for_rule(cls, key: str, template: str) -> Key:
        """The key of the notification an event's rule for template makes."""
        return cls(key, f"event:{template}")

    @classmethod
    def for_item(cls, key: str, index: int) -> Key:
        """The key of item index of a batch sent with key and no key of the item's own."""
        return cls(key, f"batch:{index}")

    @property
    def fields(self) -> dict[str, str]:
        """The notification's columns that store this key."""
        return {"idempotency_key": self.key, "idempotency_scope": self.scope}

    @property
    def legacy(self) -> str:
        # Schema version 7 and older stored an event's and a batch's keys as "<key>:<template>" and
        # "<key>:<index>", with no scope, in the namespace of the keys callers give. Those rows are
        # still found, until the reconciler forgets their keys (IDEMPOTENCY_TTL_DAYS after the
        # upgrade; then this fallback finds nothing and can go).
        return self.key if self.scope == SEND else f"{self.key}:{self.scope.partition(':')[2]}"


def hold(api_key: ApiKey, key: str) -> None:
    """Inside a transaction: make any other request under the same key wait until it ends.

    For a request that stores several notifications under scopes that depend on what it says (an
    event's templates): two different events under one key share no row the unique index could
    refuse, so without this both would be stored. For a send: the unique index would keep one row,
    but every request that missed the lookup would decide the send first (the recipient cap counts
    it), and the row kept would be whichever's insert came first. PostgreSQL only (SQLite has one writer at a time);
    two keys that hash alike merely wait for each other."""
    if is_postgres(database):
        database.execute_sql("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (api_key.id, key))


# Up to this many keys a batch locks each one as a send does (what the shared lock table holds per
# transaction by default is 64): a send and a small batch under one key then take turns too.
KEYS_LOCKED_ONE_BY_ONE = 16


def hold_batch(api_key: ApiKey, keys: list[Key]) -> None:
    """hold() for a batch. A small one locks each of its keys as a send does, in the order of their
    locks, so a send and a batch item under one key sent at once are decided once: with only the
    batch's own lock each was put to the recipient cap, the replay included. A larger one takes one
    lock, named by its set of keys (whatever their order), so that copies of one batch sent at once
    take turns: a thousand per batch, in every API process at once, would fill PostgreSQL's shared
    lock table (max_locks_per_transaction), which every other lock needs too. Large batches that
    merely share some keys, or a key with a send, do not wait for each other; the unique index keeps
    each key to one notification."""
    if not is_postgres(database) or not keys:
        return
    names = sorted({k.key for k in keys})
    if len(names) <= KEYS_LOCKED_ONE_BY_ONE:
        # In the order of the locks themselves, so two batches never each hold what the other waits for
        # (two keys whose hashes are alike are one lock).
        database.execute_sql("SELECT count(pg_advisory_xact_lock(%s, h)) FROM (SELECT DISTINCT hashtext(k) AS h "
                             "FROM unnest(%s::text[]) AS k ORDER BY h) AS locks", (api_key.id, names))
        return
    names = "\n".join(sorted({f"{k.scope}\n{k.key}" for k in keys}))  # no key holds a line break
    digest = int.from_bytes(hashlib.sha256(names.encode()).digest()[:4], "big", signed=True)
    database.execute_sql("SELECT pg_advisory_xact_lock(%s, %s)", (api_key.id, digest))


def find(api_key: ApiKey, key: Key) -> Notification | None:
    """The notification an earlier request stored under key, if it is still remembered."""
    return find_many(api_key, [key]).get(key)


def find_many(api_key: ApiKey, keys: list[Key]) -> dict[Key, Notification]:
    """find() for many keys in one query, by key; keys with no notification are left out."""
    if not keys:
        return {}
    names = sorted({k.key for k in keys} | {k.legacy for k in keys})
    rows = Notification.select().where((Notification.api_key == api_key.id)
                                       & Notification.idempotency_key.in_(names))
    stored = {(n.idempotency_key, n.idempotency_scope): n for n in rows}
    found = {}
    for key in keys:
        notification = stored.get((key.key, key.scope)) or stored.get((key.legacy, None))
        if notification is not None:
            found[key] = notification
    return found
