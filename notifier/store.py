"""The queries: create, read, and the one guarded status transition (pages for the API: notifier.listing)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from datetime import datetime

from peewee import SQL, Case, EnclosedNodeList, NodeList, fn

from notifier.db import execute_once, is_postgres, model_from, prepared, select_one
from notifier.models import (
    DIGEST_TEMPLATE,
    FINAL_STATUSES,
    ApiKey,
    CallbackStatus,
    Event,
    Notification,
    Status,
    allowed_sources,
    digest_item_move,
    new_public_id,
    utcnow,
)


def _insert_sql(model, columns: tuple[str, ...], rows: int = 1, returning: tuple[str, ...] = ()) -> str:
    # Written once per shape and database kind: on the accept path peewee's builder cost more than
    # the insert itself.
    param = Notification._meta.database.param
    key = (model, columns, rows, returning, param)
    sql = _INSERTS.get(key)
    if sql is None:
        names = ", ".join(f'"{model._meta.fields[c].column_name}"' for c in columns)
        row = f"({', '.join([param] * len(columns))})"
        sql = f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES {", ".join([row] * rows)}'
        if returning:
            sql += " RETURNING " + ", ".join(f'"{c}"' for c in returning)
        _INSERTS[key] = sql
    return sql


_INSERTS: dict[tuple, str] = {}
_NOTIFICATION_COLUMNS = tuple(f.name for f in Notification._meta.sorted_fields if f.name != "seq")
_EVENT_COLUMNS = ("notification", "at", "kind", "from_status", "to_status", "reason")
_CHUNK = 200  # rows per INSERT: well under every database's limit on parameters


def create_notification(api_key: ApiKey, fields: dict, status: Status = Status.QUEUED, reason: str = "accepted"):
    """Store a new notification and the first line of its history, together or not at all."""
    return create_notifications(api_key, [(fields, status, reason)])[0]


def create_notifications(api_key: ApiKey, items: list[tuple[dict, Status, str]]) -> list[Notification]:
    """Store notifications and their first history lines in one transaction; returned in order."""
    now = utcnow()
    # The defaults once, not per row: what varies by row (the id, the times) is given or set here.
    defaults = Notification._meta.get_default_dict()
    rows = [{**defaults, **fields, "id": fields.get("id") or new_public_id(), "api_key": api_key.id,
             "status": status.value, "created_at": now, "updated_at": now} for fields, status, _ in items]
    notifications = [_loaded(row, api_key) for row in rows]
    at = Event._meta.fields["at"].db_value(now)
    db = Notification._meta.database
    reasons = [reason for _, _, reason in items]
    postgres = is_postgres(db)
    # One statement per chunk on PostgreSQL (the rows and their history lines together, a
    # data-modifying WITH); a batch of more than one chunk is one transaction all the same.
    with db.atomic() if len(notifications) > _CHUNK or not postgres else nullcontext():
        seqs = {}
        for start in range(0, len(notifications), _CHUNK):
            chunk = notifications[start:start + _CHUNK]
            # Every notification column stores None as NULL: no conversion needed (half the cells).
            values = [None if (v := row.get(c)) is None else to_db(v)
                      for row in rows[start:start + _CHUNK] for c, to_db in _NOTIFICATION_TO_DB]
            sql = _insert_sql(Notification, _NOTIFICATION_COLUMNS, len(chunk), ("seq", "id"))
            if postgres:
                sql, values = _with_history(sql, len(chunk)), [
                    *values, at, *(v for n, reason in zip(chunk, reasons[start:], strict=False)
                                   for v in (n.id, n.status, reason))]
            seqs.update((public_id, seq) for seq, public_id in execute_once(db, sql, values).fetchall())
        for n in notifications:
            n.seq = seqs[n.id]
        if not postgres:
            events = [(n.seq, at, "status", None, n.status, reason) for n, reason in zip(notifications, reasons,
                                                                                          strict=True)]
            for start in range(0, len(events), _CHUNK):
                chunk = events[start:start + _CHUNK]
                db.execute_sql(_insert_sql(Event, _EVENT_COLUMNS, len(chunk)), [v for row in chunk for v in row])
    return notifications


_NOTIFICATION_TO_DB = tuple((c, Notification._meta.fields[c].db_value) for c in _NOTIFICATION_COLUMNS)


def _loaded(data: dict, api_key: ApiKey) -> Notification:
    """The model of a row about to be inserted, given every field's value by name: what
    Notification(**data) makes, without its descriptor call per field (in a batch of a thousand,
    building the models that way took a fifth of the request's CPU)."""
    notification = model_from(Notification, data)
    notification.__rel__["api_key"] = api_key  # as the api_key descriptor keeps the object it was given
    return notification


def _with_history(insert_sql: str, rows: int) -> str:
    """insert_sql (notifications ... RETURNING seq, id) that also writes each row's first history line."""
    key = ("with-history", insert_sql)
    sql = _INSERTS.get(key)
    if sql is None:
        param = Notification._meta.database.param
        columns = ", ".join(f'"{Event._meta.fields[c].column_name}"' for c in _EVENT_COLUMNS)
        first = ", ".join([f"({param}, {param}, {param})"] * rows)
        sql = (
            f"WITH made AS ({insert_sql}), "
            f"lines AS (INSERT INTO \"{Event._meta.table_name}\" ({columns}) "
            f"SELECT made.seq, {param}, 'status', NULL, first.status, first.reason FROM made "
            f"JOIN (VALUES {first}) AS first (id, status, reason) ON first.id = made.id) "
            f"SELECT seq, id FROM made"
        )
        # A single send's insert runs for every request; a batch's, of a few sizes, far less often.
        _INSERTS[key] = sql = prepared(sql) if rows == 1 else sql
    return sql


def get(public_id: str) -> Notification | None:
    """The notification with this id, whoever owns it."""
    return select_one(Notification, '"id" = {}', public_id)


def get_many(public_ids: list[str]) -> dict[str, Notification]:
    """The notifications with these ids, by id (missing ones left out)."""
    return {n.id: n for n in Notification.select().where(Notification.id.in_(public_ids))} if public_ids else {}


def rows_of(public_ids: list[str], columns) -> list[tuple]:
    """These columns of the notifications with these ids, as tuples, in no order. Many ids in one
    query on PostgreSQL (an array): peewee took longer to write IN with 500 values than the
    database to answer it, and longer to make models of the rows than to read them."""
    query = Notification.select(*columns)
    if is_postgres(Notification._meta.database):
        return list(query.where(Notification.id == fn.ANY(SQL("%s", [public_ids]))).tuples())
    return [row for start in range(0, len(public_ids), _CHUNK)
            for row in query.where(Notification.id.in_(public_ids[start:start + _CHUNK])).tuples()]


def items_owed_callbacks(digest: Notification) -> list[Notification]:
    """The items of a digest whose status callback is owed (only notifier's digests have items)."""
    if digest.template != DIGEST_TEMPLATE:
        return []
    return list(Notification.select(Notification.id, Notification.callback_status, Notification.callback_attempts)
                .where((Notification.digest_id == digest.id)
                       & (Notification.callback_status == CallbackStatus.PENDING.value)))


def get_for_key(api_key: ApiKey, public_id: str) -> Notification | None:
    """The notification with this id if it belongs to api_key."""
    return Notification.get_or_none((Notification.id == public_id) & (Notification.api_key == api_key.id))


def history(notification: Notification) -> list[Event]:
    """Every status change and attempt of a notification, oldest first."""
    return list(Event.select().where(Event.notification == notification.seq).order_by(Event.at, Event.id))


# A status guard beside a unique key is written `(status ...) IS TRUE`, which means the same but which
# no index can serve: the key must find the row and the guard only filter it. Indexes that lead with
# status (the dead letters' and the digests') looked as cheap to the planner as the key whenever the statistics said
# that status was rare (the last ANALYZE came before the backlog), and PostgreSQL then walked every
# row of that status for each claim: 0.44-0.68 ms a statement instead of 0.27 over a backlog of
# 4,000-10,000, growing with the backlog.
_UNINDEXED_STATUS = '("status" = {param}) IS TRUE'


def _status_in(values: list[str]):
    """`status IN values` as a guard only (see _UNINDEXED_STATUS)."""
    return NodeList((EnclosedNodeList([Notification.status.in_(values)]), SQL("IS TRUE")))


def transition(
    public_id: str,
    target: Status,
    *,
    reason: str,
    sources: Iterable[Status] | None = None,
    smtp_code: int | None = None,
    smtp_reply: str | None = None,
    known: Notification | None = None,
    **changes,
) -> bool:
    """Move a notification to target if, and only if, it is in an allowed source status.

    This is the only way a status changes: a compare-and-set update, so two workers (or a job
    delivered twice) can never both win. Returns whether this call made the change. A caller that
    has just read the row passes it as `known`: the update is then guarded by the status it read
    (still a compare-and-set) and the row need not be read again. A digest's items move with it, in
    the same transaction (models.digest_item_move): whichever way a digest ends, its items say so.
    """
    if known is not None:
        sources = [s for s in (sources or allowed_sources(target)) if s == known.status]
    allowed = frozenset(sources) if sources is not None else allowed_sources(target)
    allowed &= allowed_sources(target)
    if not allowed:
        return False
    now = utcnow()
    _implied_changes(target, changes, PENDING_IF_CALLBACK_URL, INCREMENT)
    db = Notification._meta.database
    assignments = {"status": target.value, "updated_at": now, **changes}
    event = [Event._meta.fields["at"].db_value(now), "status", None, target.value, reason, smtp_code, smtp_reply]
    if known is not None and is_postgres(db) and known.template != DIGEST_TEMPLATE:
        # One statement, so one round trip and (outside a caller's transaction) one commit: the
        # update and its history line together or not at all, the update still guarded by status.
        event[2] = known.status
        return _compare_and_set(db, known.seq, known.status, assignments, event)
    with db.atomic():
        if known is not None:
            row = known
            if not _compare_and_set(db, row.seq, row.status, assignments):
                return False
        else:
            # Read, then update guarded by the status read. Another move may commit in between (a
            # release making a delayed send `queued` as the caller cancels it): the update then
            # changes nothing though the row may still be in an allowed status, so read it again.
            # Each round is lost only to a move that committed, and a row makes few moves.
            for _ in range(_MOVES_AT_MOST):
                row = (
                    Notification.select(Notification.seq, Notification.id, Notification.status, Notification.template)
                    .where((Notification.id == public_id) & _status_in([s.value for s in allowed]))
                    .first()
                )
                if row is None:
                    return False
                if _compare_and_set(db, row.seq, row.status, assignments):
                    break
            else:
                return False
        event[2] = row.status
        db.execute_sql(_insert_sql(Event, _FULL_EVENT_COLUMNS), [row.seq, *event])
        if row.template == DIGEST_TEMPLATE:
            _move_items(row.id, Status(row.status), target, reason, smtp_code, smtp_reply, changes.get("sent_at"))
    return True


_FULL_EVENT_COLUMNS = (*_EVENT_COLUMNS, "smtp_code", "smtp_reply")
# How often transition() reads a row again after another move won the race for it: more than the
# moves between waiting statuses that can come in a row (scheduled -> queued -> sending).
_MOVES_AT_MOST = 5


def _implied_changes(target: Status, changes: dict, owed_callback, one_more) -> None:
    """What a move to target changes besides the status; owed_callback: how the update says "pending
    when the caller gave a callback_url"; one_more: how it says "final_moves plus one"."""
    if target in FINAL_STATUSES:
        # Reaching a final state owes the caller a status callback, if they asked for one.
        changes["callback_status"] = owed_callback
        changes["callback_attempts"] = 0
        changes["final_moves"] = one_more
    elif target in (Status.QUEUED, Status.RETRYING):
        # Whatever queues it again gives it a job of its own, never a batch's shared one.
        changes.setdefault("job_id", None)


def _move_items(digest_id: str, source: Status, target: Status, reason: str, smtp_code: int | None,
                smtp_reply: str | None, sent_at: datetime | None) -> None:
    """The items of a digest that just moved from source to target follow it (none when the notification
    is a caller's own send of the digest template: only notifier's digests have items)."""
    move = digest_item_move(source, target)
    if move is None:
        return
    item_source, item_target = move
    item_reason = f"digest {digest_id} {target}: {reason}"
    changes: dict = {}
    if item_target is Status.DIGESTED:
        changes["sent_at"] = sent_at
    elif item_target is Status.FAILED:
        changes["last_error"] = item_reason
    elif item_target is Status.IN_DIGEST:
        # Back in a digest that goes out again: its failure is no longer the last word, and the
        # callback it is owed is the digest's next outcome.
        changes.update(last_error=None, callback_status=None, callback_attempts=0)
    _transition_where(Notification.digest_id == digest_id, item_target, reason=item_reason, sources=(item_source,),
                      smtp_code=smtp_code, smtp_reply=smtp_reply, **changes)


def transition_many(seqs: list[int], target: Status, *, reason: str, sources: Iterable[Status],
                    **changes) -> list[int]:
    """transition() for many rows at once (a digest taking its items, what was held being suppressed);
    returns the seqs of those that moved.

    The same compare-and-set, so a row that moved on meanwhile is left alone; callers that need all
    or nothing compare the count inside their own transaction."""
    if not seqs:
        return []
    return _transition_where(Notification.seq.in_(seqs), target, reason=reason, sources=sources, **changes)


def transition_matching(where, target: Status, *, reason: str, sources: Iterable[Status], **changes) -> list[int]:
    """transition_many() for the rows a condition selects (a user's rows within a range of seq, say), with
    no list of them to write into the statement; returns the seqs of those that moved. The same
    compare-and-set: only a row in one of sources moves, and each that does gets its history line.
    Not for digests, whose items move with them (transition() moves them)."""
    return _transition_where(where, target, reason=reason, sources=sources, **changes)


def release(jobs: dict[int, str | None], *, reason: str) -> list[int]:
    """Move scheduled notifications to `queued`, each with its job_id (by seq; None: a job of its own);
    returns the seqs of those that moved. transition_many() for delayed sends due at one moment,
    with a job id each: on PostgreSQL one statement whatever their number (the rows and their history
    lines, as two arrays), where peewee's builder took longer than the database for a page of 500."""
    if not jobs:
        return []
    db = Notification._meta.database
    if not is_postgres(db):
        shared = [(seq, job_id) for seq, job_id in jobs.items() if job_id is not None]
        return transition_many(list(jobs), Status.QUEUED, reason=reason, sources=(Status.SCHEDULED,),
                               job_id=Case(Notification.seq, shared, None) if shared else None)
    columns = ", ".join(f'"{Event._meta.fields[c].column_name}"' for c in _EVENT_COLUMNS)
    sql = (
        'WITH moved AS (UPDATE "notifications" AS n SET "status" = %s, "updated_at" = %s, "job_id" = v.job_id '
        "FROM unnest(%s::bigint[], %s::varchar[]) AS v (seq, job_id) "
        f'WHERE n."seq" = v.seq AND {_UNINDEXED_STATUS.format(param="%s")} RETURNING n."seq"), '
        f'lines AS (INSERT INTO "{Event._meta.table_name}" ({columns}) '
        "SELECT moved.seq, %s, 'status', %s, %s, %s FROM moved) "
        "SELECT seq FROM moved"
    )
    now = Event._meta.fields["at"].db_value(utcnow())
    queued, scheduled = Status.QUEUED.value, Status.SCHEDULED.value
    params = [queued, now, list(jobs), list(jobs.values()), scheduled, now, scheduled, queued, reason]
    return [seq for (seq,) in execute_once(db, sql, params).fetchall()]


def _transition_where(where, target: Status, *, reason: str, sources: Iterable[Status], smtp_code: int | None = None,
                      smtp_reply: str | None = None, **changes) -> list[int]:
    allowed = sorted(frozenset(sources) & allowed_sources(target))
    if not allowed:
        return []
    now = utcnow()
    _implied_changes(target, changes, Case(
        None, [(Notification.callback_url.is_null(False), CallbackStatus.PENDING.value)], None),
        Notification.final_moves + 1)
    moved: list[int] = []
    with Notification._meta.database.atomic():
        for source in allowed:
            # A source at a time, each update its own compare-and-set: the history lines are then
            # written for exactly the rows it moved, each naming the status its row really left.
            update = (Notification.update(status=target.value, updated_at=now, **changes)
                      .where(where & _status_in([source.value])).returning(Notification.seq))
            seqs = [row.seq for row in update.execute()]
            if seqs:
                Event.insert_many(
                    [{"notification": seq, "at": now, "kind": "status", "from_status": source.value,
                      "to_status": target.value, "reason": reason, "smtp_code": smtp_code,
                      "smtp_reply": smtp_reply} for seq in seqs]
                ).execute()
            moved += seqs
    return moved


def record(public_id: str, *, kind: str, reason: str, status: str | None = None, **fields) -> None:
    """Append a line to a notification's history that is not a status change (a callback attempt)."""
    row = Notification.select(Notification.seq, Notification.status).where(Notification.id == public_id).first()
    if row is not None:
        Event.create(notification=row.seq, kind=kind, from_status=row.status, to_status=status or row.status,
                     reason=reason, **fields)


# Values for transition() changes that SQL computes rather than the caller.
INCREMENT = object()  # the column plus one
PENDING_IF_CALLBACK_URL = object()  # "pending" when the caller gave a callback_url, else NULL
_UPDATES: dict[tuple, str] = {}


def _compare_and_set(db, seq: int, expected_status: str, assignments: dict, event: list | None = None) -> bool:
    """UPDATE ... WHERE seq = ? AND status = ?, with its SQL written once per set of columns: on the
    delivery path peewee's builder cost more than the update itself. Given the values of a history
    line (every event column but the notification), the update also writes it, in the same statement
    (PostgreSQL: a data-modifying WITH)."""
    fields = Notification._meta.fields
    names = tuple(assignments)
    key = (names, db.param, event is not None)
    sql = _UPDATES.get(key)
    if sql is None:
        parts = []
        for name in names:
            column = f'"{fields[name].column_name}"'
            if assignments[name] is INCREMENT:
                parts.append(f"{column} = {column} + 1")
            elif assignments[name] is PENDING_IF_CALLBACK_URL:
                parts.append(f'{column} = CASE WHEN "callback_url" IS NULL THEN NULL ELSE {db.param} END')
            else:
                parts.append(f"{column} = {db.param}")
        sql = (f'UPDATE "notifications" SET {", ".join(parts)} '
               f'WHERE "seq" = {db.param} AND {_UNINDEXED_STATUS.format(param=db.param)}')
        if event is not None:
            columns = ", ".join(f'"{Event._meta.fields[c].column_name}"' for c in _FULL_EVENT_COLUMNS)
            values = ", ".join([db.param] * (len(_FULL_EVENT_COLUMNS) - 1))
            sql = (f'WITH moved AS ({sql} RETURNING "seq") '
                   f'INSERT INTO "{Event._meta.table_name}" ({columns}) SELECT "seq", {values} FROM moved')
        _UPDATES[key] = sql = prepared(sql)
    params = []
    for name in names:
        value = assignments[name]
        if value is PENDING_IF_CALLBACK_URL:
            params.append(CallbackStatus.PENDING.value)
        elif value is not INCREMENT:
            params.append(fields[name].db_value(value))
    return db.execute_sql(sql, [*params, seq, str(expected_status), *(event or ())]).rowcount == 1


def claim(public_id: str, known: Notification | None = None, job_id: str | None = None) -> bool:
    """Take a queued or retrying notification for sending and count the attempt. job_id: the batch's
    shared job that claims it (None: its own job), kept with the claim so that the reconciler asks
    Redis about the job that is sending it (queues.job_id_of), not one it was handed to meanwhile."""
    return transition(
        public_id,
        Status.SENDING,
        reason="claimed by worker",
        sources=(Status.QUEUED, Status.RETRYING),
        attempts=INCREMENT,
        known=known,
        job_id=job_id,
    )
