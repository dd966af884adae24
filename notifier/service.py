"""What the API does once a request is parsed: check, store, then queue."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

from peewee import IntegrityError, OperationalError
from redis import Redis
from redis.exceptions import RedisError

from notifier import commits, consent, idempotency, metrics, queues, rules, store, unsubscribe
from notifier.callback_targets import literal_denied
from notifier.config import Settings
from notifier.consent import Decision
from notifier.db import UNAVAILABLE_ERRORS, deadlocked
from notifier.errors import ApiError, Conflict, NotFound, Unprocessable
from notifier.models import (
    DIGEST_TEMPLATE,
    FINAL_STATUSES,
    ApiKey,
    CallbackStatus,
    Category,
    Notification,
    Priority,
    Status,
    new_public_id,
    utcnow,
)
from notifier.ratelimit import Limiter, parse_rate
from notifier.redact import keyed_digest
from notifier.rendering import UNSUBSCRIBE_URL, RenderedEmail, Renderer, TemplateMissing, TemplateRenderError

logger = logging.getLogger(__name__)
# The token of the unsubscribe link a template is checked with before a send is stored, and a preview
# shows: where a real email has its recipient's own signed link. It leads to the unsubscribe page's
# answer for a link that is not valid, never to anyone's preferences.
PREVIEW_TOKEN = "preview"

# After Redis failed to take a request's jobs, this process's next requests store theirs without asking it
# for this long (the reconciler queues them, as it does the failed one's). Each waited its 2 s for a
# Redis gone silent (a partition: nothing refuses, nothing resets), so four threads of a process took two
# sends a second between them, and every other request, /api/ready too, queued behind them.
REDIS_AWAY_SECONDS = 2.0
# Within that moment a request still asks, but waits this long at most for the answer: a Redis that came
# back at once (a one-off stall, a failover) takes the jobs, and ends the moment. Not asking at all left
# every send of those 2 s, a login code too, to the reconciler: 30-60 s later (RECONCILE_GRACE_SECONDS and
# RECONCILE_INTERVAL), though Redis had answered all along (helper 4's review).
REDIS_PROBE_SECONDS = 0.1

# Put before the address hashed for the recipient cap's key (_cap_id), so that hash is never one
# SECRET_KEY makes for anything else.
RECIPIENT_CAP_CONTEXT = b"notifier.recipient-cap\0"

VERIFICATION_TEMPLATE = "verification"
# How often a batch is stored again after PostgreSQL broke a deadlock by rolling it back.
DEADLOCK_ATTEMPTS = 3
MESSAGE_FIELDS = ("to", "template", "data", "subject", "text", "html", "priority", "user_id", "metadata")


@dataclass(frozen=True)
class Draft:
    """A checked request: the row to store and what happens to it."""

    fields: dict
    decision: Decision
    key: idempotency.Key | None
    request_hash: str | None


class NotificationService:
    """Accepts notifications for the API; built once per app with its dependencies."""

    def __init__(self, settings: Settings, renderer: Renderer, redis: Redis, limiter: Limiter | None = None):
        self.settings = settings
        self.renderer = renderer
        self.redis = redis
        self.limiter = limiter
        self.recipient_cap = parse_rate(settings.recipient_cap) if settings.recipient_cap else None
        self.categories = rules.own_categories(settings)
        self._redis_away_until = 0.0  # time.monotonic() before which Redis is asked only briefly
        self._redis_probe: Redis | None = None  # the client that asks it so (queues.impatient)
        self.acceptances = metrics.Acceptances()

    def recipient(self, payload: dict) -> tuple[str, str, Category]:
        """(to, user_key, category) of a validated send request: whose consent applies, and to what."""
        return (payload["to"], consent.user_key_for(payload.get("user_id"), payload["to"]),
                rules.category_of(payload.get("template"), payload.get("category"), self.categories))

    def sample_unsubscribe_url(self, category: Category, api_key_id: int | None = None,
                               user_key: str | None = None) -> str | None:
        """The unsubscribe link a template of category is checked with: like its email's; None if transactional.
        Given whose it is, as long as the real one, so that an email near MAX_PART_CHARS that passes the check
        cannot fail for its length at send time."""
        if category == Category.TRANSACTIONAL:
            return None
        token = PREVIEW_TOKEN
        if api_key_id is not None and user_key is not None:
            token = token.ljust(unsubscribe.token_length(api_key_id, user_key, category.value), "x")
        return f"{self.settings.public_base_url}/unsubscribe/{token}"

    def check_template(self, name: str, data: dict, unsubscribe_url: str | None = None) -> RenderedEmail:
        """Refuse, before anything is stored, a template that does not exist, cannot render, or is the digest;
        return what it renders (with unsubscribe_url, as rendering.Renderer.render takes it)."""
        # The digest is made by notifier from held notifications. Sent by a caller, it went out as a digest
        # of nothing, which the digest paths (callbacks owed for its items, its requeue) then handled.
        if name == DIGEST_TEMPLATE:
            raise Unprocessable("the digest template is not sent by callers", {"template": [
                f"{DIGEST_TEMPLATE!r} is made by notifier from held notifications (see the user's preferences)"]})
        if not self.renderer.exists(name):
            known = ", ".join(n for n in self.renderer.names() if n != DIGEST_TEMPLATE)
            why = f" ({lacking})" if (lacking := self.renderer.lacking(name)) else ""
            raise Unprocessable("unknown template", {"template": [f"no template named {name!r}{why}; known: {known}"]})
        if UNSUBSCRIBE_URL in (data or {}):
            raise Unprocessable("the data set a template variable notifier sets", {"data": [
                f"{UNSUBSCRIBE_URL!r} is set by notifier: its own signed link in mail a user can unsubscribe from, "
                "none in transactional mail"]})
        try:
            return self.renderer.render(name, data, unsubscribe_url)
        except TemplateMissing as exc:  # a file it uses is missing, or it went since exists() found it
            raise Unprocessable("the template or a file it uses is missing", {"template": [str(exc)]}) from exc
        except TemplateRenderError as exc:
            raise Unprocessable("the template cannot be rendered with this data", {"data": [str(exc)]}) from exc

    def check_callback_url(self, url: str) -> None:
        """Refuse a callback_url whose host is a literal address in CALLBACK_DENY_NETWORKS (a name is
        checked where it leads, at each attempt: notifier.callback_targets)."""
        refused = literal_denied(url, self.settings.callback_deny_networks)
        if refused is not None:
            raise Unprocessable("the callback_url may not be posted to", {"callback_url": [refused]})

    def draft(self, api_key: ApiKey, payload: dict, key: idempotency.Key | None = None,
              lookup: consent.Lookup | None = None, earlier: Notification | None = None, looked_up: bool = False):
        """Check a send request (its idempotency key taken out of it already) and decide its fate,
        storing nothing: (Draft, None), or (None, the earlier notification) when it replays key.
        looked_up: the caller looked key up already (earlier is what it found, None: nothing)."""
        request_hash = _fingerprint(payload) if key is not None else None  # only a replay compares it
        if key is not None:
            if earlier is None and not looked_up:
                earlier = idempotency.find(api_key, key)
            if earlier is not None:
                return None, _replay(earlier, request_hash)
        return self._prepare(api_key, payload, key, request_hash, lookup), None

    def _prepare(self, api_key: ApiKey, payload: dict, key: idempotency.Key | None, request_hash: str | None,
                 lookup: consent.Lookup | None = None) -> Draft:
        """draft() once the key is known to be new: the row to store under key, with request_hash."""
        to, user_key, category = self.recipient(payload)
        if payload.get("template"):
            # With the link its email will have (the worker sets it): rendered without, a template showing
            # it through `link` was refused at every send its preview showed, and one that fails only
            # beside the link was accepted, to fail for good at its first attempt.
            self.check_template(payload["template"], payload["data"],
                                self.sample_unsubscribe_url(category, api_key.id, user_key))
        if payload.get("callback_url"):
            self.check_callback_url(payload["callback_url"])
        fields = {name: payload.get(name) for name in MESSAGE_FIELDS}
        if not payload.get("template"):
            fields["data"] = None
        timing = self._timing(payload)
        if lookup is None:  # one send: its consent answers in one round trip
            lookup = consent.prefetch(api_key.id, [(to, user_key, category)])
        decision = consent.decide(api_key, to=payload["to"], user_key=user_key, category=category,
                                  send_at=timing["send_at"], now=utcnow(), lookup=lookup)
        decision = self._cap(api_key, payload["to"], category, decision)
        fields.update(
            timing,
            # Chosen here, not by the insert, so a commit whose answer is lost can be looked up (commits.py).
            id=new_public_id(),
            send_at=decision.send_at,
            category=category.value,
            user_key=user_key,
            **(key.fields if key else {}),
            request_hash=request_hash,
            callback_url=payload.get("callback_url"),
        )
        if decision.status in FINAL_STATUSES and fields["callback_url"]:
            fields["callback_status"] = CallbackStatus.PENDING.value
        return Draft(fields, decision, key, request_hash)

    def send(self, api_key: ApiKey, payload: dict, idempotency_key: str | None = None) -> tuple[Notification, bool]:
        """Store a validated send request and queue it; returns it and whether it was a replay."""
        key = _idempotency_key(payload, idempotency_key)
        db = Notification._meta.database
        written: list[Draft] = []
        try:
            with db.atomic() if key is not None else nullcontext():
                if key is not None:
                    # Requests under one key take turns: the first decides and stores, the others find it
                    # and replay it. Looked up at once, each decided its own fate before any was stored, the
                    # recipient cap counting every one, and whichever stored first won: a retry the cap
                    # refused stored its `suppressed` in place of the email the cap had let through.
                    idempotency.hold(api_key, key)
                draft, earlier = self.draft(api_key, payload, idempotency.Key(key) if key is not None else None)
                if earlier is None:
                    try:
                        with db.atomic() if key is not None else nullcontext():  # a savepoint in the held transaction
                            written.append(draft)
                            notification = self._store(api_key, draft)
                    except IntegrityError as exc:
                        # The key was taken meanwhile where the lock does not serialize (SQLite, a key stored
                        # by a version without it): answer as that request's replay.
                        earlier = self._holder(api_key, draft, exc)
        except UNAVAILABLE_ERRORS as exc:
            notification, earlier = self._stored_anyway(api_key, written, exc)[written[0].fields["id"]], None
        if earlier is not None:
            return earlier, True
        self.hand_over(notification)
        return notification, False

    def _stored_anyway(self, api_key: ApiKey, written: list[Draft], exc: Exception) -> dict[str, Notification]:
        """After exc broke the transaction that wrote these drafts: the notifications its commit made
        after all (the answer lost with the connection, not the commit), by id. Raises exc again when
        it made none, nothing was written, or the database cannot be asked: then the 503 is true."""
        if not written or not commits.in_doubt(exc):
            raise exc
        found = commits.stored(Notification._meta.database, api_key.id, [draft.fields["id"] for draft in written])
        if not found:
            raise exc
        return found

    def _holder(self, api_key: ApiKey, draft: Draft, refused: IntegrityError) -> Notification:
        """The notification holding the idempotency key for which the unique index refused draft,
        if draft replays it (409 if not); refused again when draft has no key."""
        earlier = idempotency.find(api_key, draft.key) if draft.key else None
        if earlier is None:
            raise refused
        return _replay(earlier, draft.request_hash)

    def _store(self, api_key: ApiKey, draft: Draft) -> Notification:
        return store.create_notification(api_key, draft.fields, status=draft.decision.status,
                                         reason=draft.decision.reason)

    def hand_over(self, notification: Notification) -> None:
        """After the commit: queue what must be sent, or the callback of what ended at once."""
        self.hand_over_many([notification])

    def hand_over_many(self, notifications: list[Notification]) -> None:
        """hand_over() for many, with their delivery jobs and acceptance counts in one round trip."""
        if not notifications:
            return
        redis, probing = self.redis, time.monotonic() < self._redis_away_until
        if probing:
            if self._redis_probe is None:
                self._redis_probe = queues.impatient(self.redis, REDIS_PROBE_SECONDS)
            redis = self._redis_probe
        counts = self.acceptances.take(notifications)  # every newly stored notification passes here once
        owed = [n for n in notifications if n.status in (Status.QUEUED, Status.SCHEDULED)]
        try:
            queues.enqueue_stored(redis, self.settings, owed, also=lambda pipe: metrics.write_accepted(pipe, counts))
        except RedisError as exc:
            queues.not_queued(owed, exc)
            self.acceptances.not_written(counts, exc)
            # Redis away: asked again for each callback, each waited its 2 s; the reconciler queues them.
            # A brief ask that failed does not make the moment longer: a Redis merely slower than
            # REDIS_PROBE_SECONDS would otherwise never be asked in full again.
            if not probing:
                self._redis_away_until = time.monotonic() + REDIS_AWAY_SECONDS
            return
        self._redis_away_until = 0.0
        for notification in notifications:
            if notification.status in FINAL_STATUSES:
                queues.dispatch_callback(redis, self.settings, notification)

    def send_batch(self, api_key: ApiKey, payloads: list[dict | None], batch_key: str | None = None) -> list:
        """Accept many sends at once. Each item stands alone: the answer, by index, is a Notification
        (new or replayed) or the ApiError that refused it; None items were refused by the caller's
        schema already. Valid items are stored in one bulk insert and queued through one pipeline."""
        results: list = [None] * len(payloads)
        batch_key = _idempotency_key({}, batch_key)
        keys: dict[int, idempotency.Key] = {}
        for index, payload in enumerate(payloads):
            if payload is not None:
                own = payload.pop("idempotency_key", None)
                if own is not None:
                    keys[index] = idempotency.Key(own)
                elif batch_key is not None:
                    keys[index] = idempotency.Key.for_item(batch_key, index)
        db = Notification._meta.database
        written: list[tuple[int, Draft]] = []
        repeats: list[tuple[int, int, dict]] = []
        try:
            with db.atomic() if keys else nullcontext():
                if keys:
                    # As for a send: copies of one batch take turns, so each item is decided (the recipient
                    # cap counting it) by the copy that stores it, never by a retry racing it.
                    idempotency.hold_batch(api_key, list(keys.values()))
                stored = self._store_batch(api_key, payloads, keys, results, savepoint=bool(keys), written=written,
                                           repeats=repeats)
        except UNAVAILABLE_ERRORS as exc:
            found = self._stored_anyway(api_key, [draft for _, draft in written], exc)
            # One transaction: those written and not found were answered as replays or refusals in it.
            stored = [found[draft.fields["id"]] for _, draft in written if draft.fields["id"] in found]
            for index, draft in written:
                if draft.fields["id"] in found:
                    results[index] = (found[draft.fields["id"]], False)
        for index, first, payload in repeats:
            results[index] = _as_repeat(results[first], payload)
        self.hand_over_many(stored)
        return results

    def _store_batch(self, api_key: ApiKey, payloads: list[dict | None], keys: dict[int, idempotency.Key],
                     results: list, savepoint: bool, written: list, repeats: list) -> list[Notification]:
        """send_batch() once its keys are held: each item decided, the new ones stored (returned);
        written gets the (index, draft) of each before its insert is sent, repeats the (index, index of
        the first, payload) of each new item under a key an earlier new item of the batch has."""
        db = Notification._meta.database
        known = idempotency.find_many(api_key, list(keys.values()))
        valid = [p for p in payloads if p is not None]
        lookup = consent.prefetch(api_key.id, (self.recipient(p) for p in valid))
        drafts = []
        first_under: dict[idempotency.Key, int] = {}
        for index, payload in enumerate(payloads):
            if payload is None:
                continue
            if keys.get(index) in first_under:
                # The key twice in one batch: the replay of the first item (or a 409), never decided
                # itself, as a replay is not. It was put to the recipient cap too, the cap counting two.
                repeats.append((index, first_under[keys[index]], payload))
                continue
            try:
                # The batch's keys were looked up at once: a new one is not asked about again, item
                # by item (1,000 queries made a keyed batch of 1,000 five times slower).
                draft, earlier = self.draft(api_key, payload, keys.get(index), lookup=lookup,
                                            earlier=known.get(keys.get(index)), looked_up=True)
            except ApiError as exc:
                results[index] = exc
                continue
            if earlier is not None:
                results[index] = (earlier, True)
            else:
                drafts.append((index, draft))
                if index in keys:
                    first_under[keys[index]] = index
        written.extend(drafts)
        try:
            fields = queues.share_jobs(self.settings, [(d.decision.status, d.fields) for _, d in drafts])
            with db.atomic() if savepoint else nullcontext():  # a refused insert leaves the transaction usable
                stored = store.create_notifications(api_key, [(f, d.decision.status, d.decision.reason)
                                                              for f, (_, d) in zip(fields, drafts, strict=True)])
        except IntegrityError:
            # A key taken meanwhile by another request, or twice in this batch.
            stored = self._store_each(api_key, drafts, results)
        except OperationalError as exc:
            # Another batch holds keys of this one and waits for keys this one holds (their items in
            # another order): PostgreSQL cancelled this insert to end the deadlock, and rolled it
            # back. It answered 503 "the database is unavailable" to a valid batch.
            if not deadlocked(exc):
                raise
            stored = self._store_each(api_key, drafts, results)
        else:
            for (index, _), notification in zip(drafts, stored, strict=True):
                results[index] = (notification, False)
        return stored

    def _store_each(self, api_key: ApiKey, drafts: list[tuple[int, Draft]], results: list) -> list[Notification]:
        """Store a batch's drafts one at a time, each stored or answered (into results) as the replay
        of the one that holds its key; returns those stored.

        All in one transaction, queued once it commits: a failure part way (a 503) stores none of the
        batch, as the bulk insert would not, so the caller's retry sends nothing twice. A deadlock with
        another batch rolls it all back; it is tried again, by then waiting for the other to commit."""
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                return self._store_each_once(api_key, drafts, results)
            except OperationalError as exc:
                if not deadlocked(exc) or attempt == DEADLOCK_ATTEMPTS:
                    raise
                logger.warning("a batch's insert deadlocked with another request's (attempt %s); trying it again",
                               attempt)
        return []  # DEADLOCK_ATTEMPTS is at least 1: every attempt returned or raised

    def _store_each_once(self, api_key: ApiKey, drafts: list[tuple[int, Draft]], results: list) -> list[Notification]:
        db, stored = Notification._meta.database, []
        with db.atomic():
            # In the order of their keys, as every batch here takes them: two batches that share keys
            # then never each hold one the other waits for. In their own order (a batch's items in
            # another order than the other's), the deadlock came back on every try.
            for index, draft in sorted(drafts, key=_key_order):
                try:
                    with db.atomic():  # a savepoint: a refused key leaves the transaction usable
                        stored.append(self._store(api_key, draft))
                    results[index] = (stored[-1], False)
                except IntegrityError as exc:
                    try:
                        results[index] = (self._holder(api_key, draft, exc), True)
                    except ApiError as conflict:
                        results[index] = conflict
        return stored

    def emit(self, api_key: ApiKey, event: dict, idempotency_key: str | None = None) -> list[tuple[Notification, bool]]:
        """A business event: every notification its rule causes, stored together or not at all."""
        key = _idempotency_key(event, idempotency_key)
        written: list[Draft] = []
        try:
            try:
                results = self._emit_once(api_key, event, key, written)
            except IntegrityError:
                # The same event sent again at the same time stored its keys first (the unique index
                # made this insert wait for that commit): once more, this one then finds them and is the
                # replay. (On PostgreSQL idempotency.hold() makes them take turns, so this is SQLite's.)
                written.clear()
                results = self._emit_once(api_key, event, key, written)
        except UNAVAILABLE_ERRORS as exc:
            found = self._stored_anyway(api_key, written, exc)
            if len(found) < len(written):  # one transaction: never part of it
                raise
            results = [(found[draft.fields["id"]], False) for draft in written]
        # In one round trip: one each waited its own 2 s while Redis hung.
        self.hand_over_many([notification for notification, replayed in results if not replayed])
        return results

    def _emit_once(self, api_key: ApiKey, event: dict, key: str | None,
                   written: list[Draft]) -> list[tuple[Notification, bool]]:
        user = event["user"]
        rule_list = rules.RULES[event["type"]]
        # The key covers the whole event, the user's timezone included: every notification stores the
        # fingerprint of the event, not only of its own part.
        request_hash = _fingerprint(event) if key is not None else None
        # One transaction for everything the event writes, the user's timezone included: a refused
        # event (422, 409) leaves no trace, and neither does a replay.
        with Notification._meta.database.atomic():
            if key is not None:
                idempotency.hold(api_key, key)  # an event of another type under this key waits for ours
                earlier = self._earlier_event(api_key, event, key, request_hash)
                if earlier:
                    return [(notification, True) for notification in earlier]
            if user.get("timezone"):  # first, so quiet hours use it
                consent.update_preferences(api_key, user["id"], {"timezone": user["timezone"]})
            drafts = [self._prepare(api_key, self._rule_payload(event, rule),
                                    idempotency.Key.for_rule(key, rule.template) if key is not None else None,
                                    request_hash)
                      for rule in rule_list]
            written.extend(drafts)
            return [(self._store(api_key, draft), False) for draft in drafts]

    def _earlier_event(self, api_key: ApiKey, event: dict, key: str, request_hash: str) -> list[Notification]:
        """What an earlier event stored under key, in rule order (empty if none): 409 unless that event
        was this one. Every rule's key is looked up, so an event of another type meets it too."""
        own = {idempotency.Key.for_rule(key, rule.template): rule for rule in rules.RULES[event["type"]]}
        others = [idempotency.Key.for_rule(key, template) for template in rules.TEMPLATES]
        found = idempotency.find_many(api_key, [*own, *(k for k in others if k not in own)])
        for k, notification in found.items():
            # Events stored by earlier versions gave each notification the fingerprint of its own
            # rule's part of the event, which leaves out the user's timezone: such rows still replay.
            legacy = _fingerprint(self._rule_payload(event, own[k])) if k in own else None
            _replay(notification, request_hash, legacy)
        return [found[k] for k in own if k in found]

    def _rule_payload(self, event: dict, rule) -> dict:
        user = event["user"]
        data = dict(event["data"])
        if user.get("name"):
            data.setdefault("name", user["name"])
        payload = {"to": user["email"], "template": rule.template, "data": data, "priority": rule.priority.value,
                   "user_id": user["id"], "metadata": {"event": event["type"], **(event.get("metadata") or {})}}
        if event.get("callback_url"):
            payload["callback_url"] = event["callback_url"]
        delay = rules.delay_of(rule, self.settings)
        if delay:
            payload["delay_seconds"] = delay
        return payload

    def send_verification(self, api_key: ApiKey, payload: dict, idempotency_key: str | None = None):
        """A verification email: the verification template at high priority, with a default deadline."""
        data = {k: payload[k] for k in ("code", "verification_url", "name") if k in payload}
        message = {k: v for k, v in payload.items() if k not in ("code", "verification_url", "name")}
        message.update(template=VERIFICATION_TEMPLATE, data=data, priority=Priority.HIGH.value)
        implied = "expires_at" not in message and "ttl_seconds" not in message
        if implied:
            message["ttl_seconds"] = self.settings.verification_ttl_seconds
        try:
            return self.send(api_key, message, idempotency_key)
        except Unprocessable as exc:
            if not (implied and isinstance(exc.details, dict) and "ttl_seconds" in exc.details):
                raise
            # A deadline the request never gave: named as what it is, on the field that passed it.
            field = "delay_seconds" if "delay_seconds" in message else "send_at"
            raise Unprocessable("the send time is past the verification's deadline", {field: [
                f"must be within VERIFICATION_TTL_SECONDS ({self.settings.verification_ttl_seconds} s) of now, "
                "the deadline a verification has unless ttl_seconds or expires_at gives another"]}) from None

    def cancel(self, api_key: ApiKey, notification_id: str) -> Notification:
        """Cancel a notification that is not being sent and not yet final; it will never be sent."""
        if store.get_for_key(api_key, notification_id) is None:
            raise NotFound("no such notification")
        # The answer is read in the cancel's own transaction: a failure reading it (a 503) cancels nothing.
        with Notification._meta.database.atomic():
            cancelled = store.transition(
                notification_id,
                Status.CANCELLED,
                reason="cancelled by the caller",
                sources=(Status.SCHEDULED, Status.QUEUED, Status.RETRYING, Status.HELD),
            )
            notification = store.get(notification_id)
        if not cancelled:
            if notification.status == Status.IN_DIGEST:
                raise Conflict(f"notification {notification.id} is in digest {notification.digest_id}, which has not "
                               "gone out: cancel the digest, and its items are cancelled with it",
                               {"status": notification.status, "digest_id": notification.digest_id},
                               code="not_cancellable")
            raise Conflict(f"notification {notification.id} is {notification.status}: it can no longer be cancelled",
                           {"status": notification.status}, code="not_cancellable")
        queues.dispatch_callback(self.redis, self.settings, notification)
        return notification

    def _cap(self, api_key: ApiKey, to: str, category: str, decision: Decision) -> Decision:
        """Non-transactional mail to one address is capped (RECIPIENT_CAP), so a looping caller
        cannot flood an inbox; a capped notification is stored as suppressed, with the reason."""
        if (self.limiter is None or self.recipient_cap is None or category == rules.Category.TRANSACTIONAL
                or decision.status not in (Status.QUEUED, Status.SCHEDULED, Status.HELD)):
            return decision
        if self.limiter.allows(self.recipient_cap, "recipient", str(api_key.id), _cap_id(self.settings, to)):
            return decision
        return Decision(Status.SUPPRESSED, f"the recipient cap of {self.settings.recipient_cap} for this address "
                                           "was reached")

    def _timing(self, payload: dict) -> dict:
        now = utcnow()
        send_at = payload.get("send_at")
        horizon = timedelta(days=self.settings.schedule_horizon_days)
        if "delay_seconds" in payload:
            delay = timedelta(seconds=payload["delay_seconds"])
            send_at = now + min(delay, horizon + timedelta(seconds=1))
        if send_at is not None and send_at <= now:
            send_at = None  # a time already past means now
        # An error names the field the request sent, not the one it was turned into.
        if send_at is not None and send_at > now + horizon:
            field = "delay_seconds" if "delay_seconds" in payload else "send_at"
            horizon = f"at most {self.settings.schedule_horizon_days} days ahead"
            raise Unprocessable(f"{field} is too far ahead", {field: [horizon]})
        expires_at = payload.get("expires_at")
        if "ttl_seconds" in payload:
            expires_at = now + timedelta(seconds=payload["ttl_seconds"])
        if expires_at is not None and expires_at <= (send_at or now):
            field = "ttl_seconds" if "ttl_seconds" in payload else "expires_at"
            raise Unprocessable("the deadline is before the send time", {field: ["must be after the send time"]})
        return {"send_at": send_at, "expires_at": expires_at}


def _idempotency_key(payload: dict, header: str | None) -> str | None:
    field = payload.pop("idempotency_key", None)
    if header is not None and field is not None and header != field:
        raise Unprocessable(
            "the Idempotency-Key header and the idempotency_key field differ",
            {"idempotency_key": ["differs from the Idempotency-Key header"]},
        )
    # Each already held to the same rule where it was read (schemas.IdempotencyKey).
    return header if header is not None else field


def _key_order(item: tuple[int, Draft]) -> tuple:
    """Where a batch's draft comes when its keys are taken in order: keyed ones by key, then the others."""
    key = item[1].key
    return (0, key.key, key.scope, item[0]) if key is not None else (1, "", "", item[0])


def _cap_id(settings: Settings, to: str) -> str:
    """What names an address's RECIPIENT_CAP counter in Redis: a keyed hash of it (any letter case), the
    same in every API process and across restarts while SECRET_KEY stays. The address itself stayed in
    the key for the whole window, after the user's erasure too, for anyone reading Redis (the
    dashboard's operators) to see; unkeyed, a guessed address could be checked against it."""
    return keyed_digest(settings.signing_key, RECIPIENT_CAP_CONTEXT + to.lower().encode("utf-8", "surrogatepass"))


def _fingerprint(payload: dict) -> str:
    # Relative times (delay_seconds, ttl_seconds) are part of the request as sent, so a replay of the
    # same request matches even though its absolute time would differ.
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _as_repeat(first, payload: dict):
    """A batch item's answer when an earlier item of the batch has its key: the replay of what that
    item became, a 409 if their requests differ, or the first's own refusal."""
    if not isinstance(first, tuple):
        return first
    try:
        return _replay(first[0], _fingerprint(payload)), True
    except Conflict as exc:
        return exc


def _replay(earlier: Notification, *request_hashes: str | None) -> Notification:
    """earlier, if it was stored by a request with one of these fingerprints; else 409."""
    if earlier.request_hash is None or earlier.request_hash not in request_hashes:
        raise Conflict(
            "this idempotency key was used for a different request",
            {"id": earlier.id},
            code="idempotency_key_reused",
        )
    return earlier


