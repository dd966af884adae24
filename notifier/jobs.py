"""RQ job functions: they take ids, re-read state, claim, render, send and record."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from notifier import callback_job, consent, digests, erasure, logs, metrics, queues, receipts, store, unsubscribe
from notifier.callbacks import CallbackRetry
from notifier.config import Settings
from notifier.db import RECONNECT_DELAYS, UNAVAILABLE_ERRORS, database
from notifier.errors import (
    STOPPING,
    DeliveryError,
    PermanentDeliveryError,
    RetriesExhausted,
    TransientDeliveryError,
)
from notifier.failed_jobs import log_failed_job
from notifier.mail import Mailer, OutgoingEmail, SendResult
from notifier.models import DIGEST_TEMPLATE, Category, Notification, Priority, Status, utcnow
from notifier.outage import DatabaseOutage
from notifier.rendering import RenderedEmail, Renderer, literal
from notifier.resilience import reason_of

logger = logging.getLogger(__name__)
T = TypeVar("T")


# How often a shared job looks whether higher-priority work is waiting: an urgent email waits at most
# about this long, plus the send in progress, behind a chunk of less urgent ones.
MAKE_WAY_CHECK_SECONDS = 0.01
# How old what a shared job knows of its recipients' consent may be when it sends: an unsubscribe
# made while a long job runs (a slow mail server) stops the job's later emails within about this.
CONSENT_MAX_AGE_SECONDS = 1.0
# How often a shared job tells Redis its worker is alive (queues.keep_worker_alive), which the
# reconciler asks before it takes back a send that is only slow.
KEEP_ALIVE_SECONDS = 5.0


def _lookups_by_key(rows: list[Notification]) -> dict[int, consent.Lookup]:
    """consent.for_waiting() for each API key among rows (a shared job has one key, but need not)."""
    return {key: consent.for_waiting([r for r in rows if r.api_key_id == key])
            for key in {r.api_key_id for r in rows}}


def _strings(value) -> list[str]:
    """The strings in a notification's template data, however deep."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _owes_callbacks(notification: Notification) -> bool:
    """Whether a notification that just became final may owe callbacks: its own, or (a digest) its
    items'. Most owe none, and are not read again to find out."""
    return bool(notification.callback_url) or notification.template == DIGEST_TEMPLATE


def _cut_off(exc: BaseException) -> str:
    """What an attempt that ended in something other than a delivery error records as its reason."""
    if isinstance(exc, JobTimeoutException):
        return f"{type(exc).__name__}: JOB_TIMEOUT ran out while sending"
    return type(exc).__name__


class SentNotRecorded(RuntimeError):
    """The SMTP server took an email and the database would not take its `sent` record."""


class Deliverer:
    """Everything the jobs of one worker process need, built once."""

    consent_max_age = CONSENT_MAX_AGE_SECONDS

    def __init__(self, settings: Settings, mailer: Mailer, renderer: Renderer, redis: Redis | None = None,
                 counts: metrics.Deferred | None = None, stop: threading.Event | None = None,
                 outage: DatabaseOutage | None = None):
        """counts: where the delivery counters go when not straight to redis: a worker's, which
        sends them with its next heartbeat (one round trip fewer per job). stop: set once the worker
        is asked to stop (SIGTERM): a shared job then hands its unsent emails on (deliver_many).
        outage: the worker's, when it pauses while the database is away (notifier.outage): a shared
        job that meets the database away then goes back to its queue whole (deliver_many)."""
        self.settings = settings
        self.mailer = mailer
        self.renderer = renderer
        self.redis = redis
        self._stop = stop
        self._outage = outage
        # Inside a shared job: the `sent` record of the last email, written in one transaction with
        # the next claim (one commit instead of two; see deliver_many), and whether its receipt is kept.
        self._unrecorded: tuple[Notification, receipts.Receipt, bool] | None = None
        self._hold_records = False
        # Inside a shared job: its id, which each claim records (store.claim).
        self._shared_job_id: str | None = None
        # Inside a shared job of delayed sends released together: the request each came from, by id
        # (queues.MEMBER_REQUEST_IDS_META), so each one's log lines and later jobs carry its own.
        self._member_requests: dict[str, str] = {}
        # Notifications this process sent while the database was away, with a receipt kept for each
        # (see notifier.receipts): its next job records them once the database answers again.
        self._kept: dict[str, Notification] = {}
        self._counts: Redis | metrics.Deferred | None = counts if counts is not None else redis
        # Where a sent receipt is kept as the server answers: the same Redis, but one that gives up
        # soon, as the `sent` record waits for it (notifier.receipts).
        self._receipts = queues.impatient(redis, receipts.KEEP_TIMEOUT_SECONDS) if redis is not None else None

    def deliver(self, notification_id: str) -> str:
        """Send one notification at most once; return what happened."""
        with database.connection_context(), logs.bound(notification_id=notification_id):
            # Read outside any transaction first: a pooled connection that died with a database
            # restart is replaced here, before the claim needs it.
            current, lookup = consent.sending(notification_id)
            self._record_kept()
            return self._deliver(notification_id, current, lookup)

    def _deliver(self, notification_id: str, current: Notification | None, lookup: consent.Lookup) -> str:
        if current is not None:
            logs.conceal_recipient(current.to)  # a refusal may echo it in a form the log filter cannot tell
        if current is None or current.status not in (Status.QUEUED, Status.RETRYING):
            self._record_unrecorded()
            # Still `sending` when a job for it comes (the retry of one that could not record its
            # `sent`): if its worker kept a receipt, the email went out, and this records it.
            if current is not None and current.status == Status.SENDING and self._record_receipts([current]):
                return "recorded late"
        elif current.erased_at is not None:
            # A tombstone (notifier.erasure) queued again: a dead letter requeued as its user was being
            # erased. It has no address left, and its user asked that nothing more be sent.
            self._record_unrecorded()
            if store.transition(notification_id, Status.CANCELLED, reason=erasure.REASON,
                                sources=(Status.QUEUED, Status.RETRYING)):
                self.after_final(notification_id)
                return "cancelled"
        elif current.expires_at is not None and utcnow() >= current.expires_at:
            # Past its deadline before any attempt: expire it without counting an attempt.
            self._record_unrecorded()
            if store.transition(notification_id, Status.EXPIRED, reason="deadline passed before it could be sent",
                                sources=(Status.QUEUED, Status.RETRYING)):
                metrics.expired(self._counts, current)
                self.after_final(notification_id)
                return "expired"
        elif reason := consent.unwanted(current.api_key_id, to=current.to, user_key=current.user_key,
                                        category=current.category, lookup=lookup):
            self._record_unrecorded()
            if store.transition(notification_id, Status.SUPPRESSED, reason=reason,
                                sources=(Status.QUEUED, Status.RETRYING)):
                self.after_final(notification_id)
                return "suppressed"
        elif (ends := consent.quiet_now(current, utcnow(), lookup)) is not None:
            self._record_unrecorded()
            if self._defer(current, ends):
                return "deferred"
        if current is None or not self._claim(current):
            # Someone else holds it, it was cancelled, or it is already final: nothing to do.
            logger.info("notification %s not claimable; skipping", notification_id)
            return "skipped"
        notification = current  # the claim changed only these two, so the row need not be read again
        notification.status, notification.attempts = Status.SENDING.value, current.attempts + 1
        if notification.expires_at is not None and utcnow() >= notification.expires_at:
            self._finish(notification, Status.EXPIRED, reason="deadline passed before it could be sent")
            metrics.expired(self._counts, notification)
            return "expired"
        try:
            # Inside the try: a statement cancelled there (a lock held on an item past
            # DATABASE_STATEMENT_TIMEOUT) is a failed attempt, retried, not a digest left `sending`
            # for the reconciler to take for a worker lost mid-send.
            if notification.template == DIGEST_TEMPLATE and self._leave_out_expired(notification):
                return "expired"
            email = self._outgoing(notification)
            # A refusal may quote the subject, a link or a code: never in the log.
            logs.conceal_content([*email.texts(), *_strings(notification.data)])
            result = self.mailer.send(email)
        except PermanentDeliveryError as exc:
            self._record_failure(notification, exc, final=True, lookup=lookup)
            raise
        except Exception as exc:  # noqa: BLE001 - anything else may pass: try again
            error = exc if isinstance(exc, DeliveryError) else TransientDeliveryError(_cut_off(exc))
            if notification.attempts >= self.settings.max_attempts:
                exhausted = RetriesExhausted(
                    f"gave up after {notification.attempts} attempts: {error}", error.smtp_code,
                    smtp_reply=error.smtp_reply,
                )
                self._record_failure(notification, exhausted, final=True, lookup=lookup)
                if isinstance(exc, STOPPING):
                    raise  # recorded; RQ stops the job (a shared one must not go on to the next email)
                raise exhausted from exc
            self._record_failure(notification, error, final=False, lookup=lookup)
            raise
        receipt = self._receipt(notification, result)
        if self._hold_records:
            # Held before its receipt's round trip: RQ's time limit or a stop landing there, deliver_many
            # still writes the record on its way out.
            self._unrecorded = (notification, receipt, False)
            self._unrecorded = (notification, receipt, self._keep(receipt))
        else:
            self._record_sent(notification, receipt)
        return "sent"

    def _defer(self, current: Notification, ends: datetime) -> bool:
        """Put off a queued or retrying notification until the recipient's quiet hours end (its attempts
        kept); whether this moved it. Its release is scheduled, or the reconciler's pass releases it."""
        # A fresh job id: one the notification was released by before may still be finished in Redis,
        # its expiry running, and rq-scheduler drops an entry whose job has gone. Recorded with the
        # move (same statement), so that the reconciler looks for this job, not the canonical one:
        # it took each deferral due soon for a release Redis had lost, and scheduled a second one.
        release_id = queues.release_job_id_for(current.id, again=True)
        if not store.transition(current.id, Status.SCHEDULED, reason="waiting for the user's quiet hours to end",
                                sources=(Status.QUEUED, Status.RETRYING), known=current, send_at=ends,
                                job_id=release_id):
            return False
        logger.info("notification %s waits for the recipient's quiet hours to end", current.id)
        current.status, current.send_at, current.job_id = Status.SCHEDULED.value, ends, release_id
        if self.redis is not None:
            try:
                queues.schedule_release(self.redis, self.settings, current.id, ends, current.priority,
                                        job_id=release_id)
            except RedisError as exc:
                logger.warning("notification %s release not scheduled (%s); the reconciler releases it",
                               current.id, type(exc).__name__)
        return True

    def _leave_out_expired(self, digest: Notification) -> bool:
        """Leave the items past their deadline out of a claimed digest (notifier.digests); True when
        that was every item, and the digest expired with them instead of going out."""
        expired, kept = digests.leave_out_expired(self.settings, self.renderer, digest, utcnow())
        for item in expired:
            metrics.expired(self._counts, item)
            if kept:
                self.after_final(item.id)  # final now, whether or not the digest goes out
        if expired and not kept:
            self._finish(digest, Status.EXPIRED, reason="every item's deadline passed before it could be sent")
            return True
        return False

    def _claim(self, current: Notification) -> bool:
        """The claim; with the last email's `sent` record in the same transaction when one is held.
        Each write is exactly what it would be alone, so this changes no guarantee: the email went out
        before either, and the next one goes out after both are committed."""
        if self._unrecorded is None:
            return store.claim(current.id, known=current, job_id=self._shared_job_id)
        sent, receipt, _ = self._unrecorded
        try:
            with database.atomic():
                recorded = store.transition(sent.id, Status.SENT, sources=(Status.SENDING,),
                                            known=sent, **self._sent_fields(receipt))
                claimed = store.claim(current.id, known=current, job_id=self._shared_job_id)
        except UNAVAILABLE_ERRORS:
            # Neither was written: the held record takes the careful way (it waits out a short outage).
            database.close()
            self._record_unrecorded()
            return store.claim(current.id, known=current, job_id=self._shared_job_id)
        self._unrecorded = None
        if recorded:
            self._forget(sent.id)
        with self._bound(sent.id):  # its lines are the sent one's, not the next one's
            self._after_held_sent(sent, receipt, recorded)
        return claimed

    def deliver_many(self, notification_ids: list[str]) -> dict[str, int]:
        """Deliver the notifications of a batch's shared job, each exactly as deliver() does. One that
        fails goes on in a job of its own: its retry at the due time, or RQ's failed registry; one
        this job never reached (the worker died) is handed on by the reconciler.

        The rows are read once for the job (the claim still compares each row's status, so a row
        changed meanwhile is skipped), and what their recipients agreed to once, then again for the
        rest whenever that is CONSENT_MAX_AGE_SECONDS old; each `sent` record shares a commit with the
        next claim.

        With the database away (a restart, a failover), the job ends there. In a worker that pauses
        for the database (outage), it goes back to its queue as it was, and runs again once the
        database answers: what it sent is skipped then, one it was sending recorded from its receipt
        or recovered. Elsewhere the reconciler hands on what it had not sent once the database answers.
        Failed instead, the job sat in RQ's failed registry, rq-dashboard's Failed list, for
        DEAD_LETTER_TTL_DAYS, though none of its emails was lost."""
        outcomes: Counter[str] = Counter()
        try:
            self._deliver_many(notification_ids, outcomes)
        except (*UNAVAILABLE_ERRORS, SentNotRecorded) as exc:
            job = get_current_job()
            if self._outage is not None and job is not None and self._outage.begins(exc, job.id):
                raise  # its worker puts it back, and takes no job until the database answers
            left = len(notification_ids) - sum(outcomes.values())
            outcomes["left to the reconciler"] += left
            # Named as it is: this catch also takes a statement timeout or a deadlock, which are no outage.
            logger.error("a shared job stopped on a database error (%s: %s); the reconciler hands on its %s "
                         "unsent emails", type(exc).__name__, reason_of(exc), left)
        return dict(outcomes)

    def _deliver_many(self, notification_ids: list[str], outcomes: Counter[str]) -> None:
        with database.connection_context():
            rows = store.get_many(notification_ids)
            self._record_kept()
            lookups, consent_read = _lookups_by_key(list(rows.values())), time.monotonic()
            # Counters go in one round trip at the end, unless the worker sends them already.
            own_counts = not isinstance(self._counts, metrics.Deferred)
            if own_counts:
                self._counts = metrics.Deferred(self.redis)
            self._hold_records = True
            job = get_current_job()
            self._shared_job_id = job.id if job is not None else None
            self._member_requests = (job.meta or {}).get(queues.MEMBER_REQUEST_IDS_META) or {} if job else {}
            priority = next((r.priority for r in rows.values()), None)
            checked = alive = time.monotonic()
            if len(notification_ids) > 1:
                # RQ's heartbeat as the job started kept the worker's key for the whole job's timeout
                # (JOB_TIMEOUT per email): killed before the first renewal below, the worker would look
                # alive that long and the email it was sending would wait that long to be recovered.
                self._keep_alive(job)
            try:
                for index, notification_id in enumerate(notification_ids):
                    if index and time.monotonic() - alive >= KEEP_ALIVE_SECONDS:
                        alive = time.monotonic()
                        self._keep_alive(job)
                    if priority is not None and self._stop is not None and self._stop.is_set():
                        # A warm shutdown waits for the job, which may have BATCH_JOB_SIZE emails
                        # to go: it outlasted a deploy's grace period, and the SIGKILL that followed
                        # could land mid-send. It waits for the email being sent; the rest go back.
                        self._hand_on(notification_ids[index:], priority)
                        outcomes["handed on"] += len(notification_ids) - index
                        logger.info("worker stopping: %s unsent emails of the job handed on to another worker",
                                    len(notification_ids) - index)
                        break
                    if index and time.monotonic() - checked >= MAKE_WAY_CHECK_SECONDS:
                        checked = time.monotonic()
                        if self._make_way(notification_ids[index:], priority):
                            outcomes["made way"] += len(notification_ids) - index
                            break
                    if index and time.monotonic() - consent_read >= self.consent_max_age:
                        # One read for the rest of the job: what was held of consent is getting old.
                        try:
                            lookups = _lookups_by_key([rows[i] for i in notification_ids[index:] if i in rows])
                            consent_read = time.monotonic()
                        except UNAVAILABLE_ERRORS as exc:
                            # A database blip: go on with what is held (as jobs did before they re-read)
                            # and try again before the next email; the claim rides out the blip.
                            logger.warning("consent not re-read: %s", type(exc).__name__)
                    current = rows.get(notification_id)
                    if current is not None and queues.retry_due(self.settings, current) is not None:
                        # Left `retrying` by this job before it went back to its queue (the database away,
                        # notifier.outage): its own retry job sends it when due. Sent now, it spent an
                        # attempt before the wait its server asked for (a 451).
                        outcomes["retrying"] += 1
                        continue
                    lookup = lookups[current.api_key_id] if current is not None else consent.DATABASE
                    with self._bound(notification_id):
                        try:
                            outcomes[self._deliver(notification_id, current, lookup)] += 1
                        except (*UNAVAILABLE_ERRORS, SentNotRecorded, *STOPPING):
                            # The database is away (a held `sent` record it would not take says so too),
                            # or RQ stops the job: the rest of it is handed on by the reconciler.
                            raise
                        except Exception as exc:  # noqa: BLE001 - _deliver() recorded it; where it goes next is read back
                            outcomes[self._carry_on(notification_id, exc)] += 1
            finally:
                self._hold_records, self._shared_job_id = False, None
                try:
                    self._record_unrecorded()
                finally:
                    if own_counts:
                        counts, self._counts = self._counts, self.redis
                        counts.flush()
                    self._member_requests = {}

    def _bound(self, notification_id: str):
        """logs.bound() for one notification of the job being run: its request's id too, when the job
        carries one for it (MEMBER_REQUEST_IDS_META)."""
        request_id = self._member_requests.get(notification_id)
        if request_id is None:
            return logs.bound(notification_id=notification_id)
        return logs.bound(notification_id=notification_id, request_id=request_id)

    def _keep_alive(self, job) -> None:
        # RQ keeps a SimpleWorker's key for its job's whole timeout (JOB_TIMEOUT per email here), so a
        # worker killed outright inside a long shared job would look alive for most of an hour, and the
        # email it was sending would wait that long to be recovered. While the job gets on, its worker
        # is kept alive for one email's timeout at a time instead.
        if self.redis is None or job is None or not job.worker_name:
            return
        self._record_unrecorded()  # not held while Redis may take its socket timeout (see _make_way)
        # The job's counts so far ride along (and the sent receipts it no longer needs): kept for the
        # job's end, a worker killed in it lost every count of the emails it had sent, up to a whole job.
        counts = self._counts.apply if isinstance(self._counts, metrics.Deferred) else None
        try:
            queues.keep_worker_alive(self.redis, job.worker_name, self.settings.job_timeout + 60, also=counts)
        except RedisError as exc:
            # The worker's key keeps the TTL it had: recovery after a crash may only wait longer.
            logger.warning("worker not kept alive: %s", type(exc).__name__)

    def _make_way(self, rest: list[str], priority: str | None) -> bool:
        """If higher-priority work is waiting, put the rest of this shared job back at the front of its
        queue as a job of its own, so a worker takes the urgent job first; True when it did."""
        if self.redis is None or priority is None or priority == Priority.HIGH:  # nothing above it
            return False
        # The last email's `sent` record is held for the next claim's commit. Write it now: Redis may
        # take up to its socket timeout to answer (frozen, failing over), and a worker that dies while
        # it waits would leave an email the server took `sending`, to be recovered and sent again.
        self._record_unrecorded()
        try:
            if not queues.waiting_above(self.redis, priority):
                return False
        except RedisError:
            return False
        self._hand_on(rest, priority)
        return True

    def _hand_on(self, rest: list[str], priority: str) -> None:
        """Put the rest of this shared job back at the front of its queue as a job of its own."""
        self._record_unrecorded()
        current = get_current_job()
        job_id = queues.new_shared_job_id()
        # The rows first: if the new job never reaches Redis, the reconciler finds it missing and hands
        # each of them on alone.
        mine = Notification.id.in_(rest)
        if current is not None:
            mine &= Notification.job_id == current.id  # not those already handed on alone
        Notification.update(job_id=job_id).where(mine).execute()
        try:
            queues.enqueue_shared(self.redis, self.settings, job_id, rest, priority,
                                  {i: self._member_requests[i] for i in rest if i in self._member_requests})
        except RedisError as exc:
            logger.warning("the rest of a shared job not queued (%s); the reconciler hands it on", type(exc).__name__)

    def _record_unrecorded(self) -> None:
        # A held `sent` record is written with a later email's context bound (or none, after the
        # last): its lines name its own notification.
        if self._unrecorded is not None:
            sent, receipt, kept = self._unrecorded
            self._unrecorded = None
            with self._bound(sent.id):
                self._after_held_sent(sent, receipt, self._write_sent(sent, receipt, kept))

    def _after_held_sent(self, sent: Notification, receipt: receipts.Receipt, recorded: bool) -> None:
        """_after_sent() for a held `sent` record, once it is written: inside a shared job, whose other
        emails it must not stop (the next one may be claimed already)."""
        try:
            self._after_sent(sent, receipt, recorded)
        except STOPPING:
            raise
        except Exception:  # noqa: BLE001 - its callback, if any, is recorded as owed: the reconciler queues it
            logger.warning("after sending notification %s", sent.id, exc_info=True)

    def _carry_on(self, notification_id: str, exc: Exception) -> str:
        with database.connection_context():
            current = store.get(notification_id)
        if current is not None and current.status == Status.RETRYING:
            try:
                queues.enqueue_delivery(self.redis, self.settings, current.id, current.priority, current.attempts,
                                        at=queues.retry_due(self.settings, current))
            except RedisError as error:
                # The rest of the job goes on; the reconciler queues this one's retry once Redis answers.
                logger.warning("notification %s retry not queued: %s", notification_id, type(error).__name__)
            return "retrying"
        if current is not None and current.status == Status.FAILED:
            queues.file_failed(self.redis, self.settings, current, f"{type(exc).__name__}: {exc}")
            # Filed as if it had failed alone: logged as that job's failure would be, an ERROR for a
            # refused message or a broken template as much as when it is sent alone.
            log_failed_job(queues.job_id_for(current.id), exc, False, exc_info=(type(exc), exc, exc.__traceback__),
                           queue=queues.QUEUE_NAMES[current.priority], func=queues.DELIVER_JOB)
            return "failed"
        # Still `sending`, which no failure _deliver() records leaves behind: the reconciler recovers it
        # (or records it `sent`, if a receipt says it went out).
        logger.error("notification %s left %s after %s", notification_id, current and current.status,
                     type(exc).__name__)
        return "unresolved"

    def _outgoing(self, notification: Notification) -> OutgoingEmail:
        headers, url = {}, None
        if notification.category != Category.TRANSACTIONAL and notification.user_key:
            url = unsubscribe.link(self.settings, notification.api_key_id, notification.user_key, notification.category)
            headers = unsubscribe.headers(url)
        if self.settings.reply_to:
            headers["Reply-To"] = self.settings.reply_to
        content = self.render(notification, url)
        return OutgoingEmail(notification_id=notification.id, to=notification.to, content=content, headers=headers)

    def render(self, notification: Notification, unsubscribe_url: str | None = None) -> RenderedEmail:
        """The subject and body parts of a notification, from its template or its literal content."""
        if notification.template:
            return self.renderer.render(notification.template, notification.data, unsubscribe_url)
        return literal(notification.subject or "", notification.text, notification.html, unsubscribe_url)

    def _finish(self, notification: Notification, target: Status, **fields) -> None:
        if store.transition(notification.id, target, sources=(Status.SENDING,), known=notification, **fields):
            notification.status = target.value
            if _owes_callbacks(notification):
                self.after_final(notification.id)

    def after_final(self, notification_id: str) -> None:
        """Queue the status callbacks a final notification owes its caller, if any (a digest: those of
        its items, which ended with it)."""
        if self.redis is not None:
            queues.dispatch_callback(self.redis, self.settings, store.get(notification_id))

    def _record_failure(self, notification: Notification, exc: DeliveryError, *, final: bool,
                        lookup: consent.Lookup = consent.DATABASE) -> None:
        message = str(exc)
        # A server's reply only when there was one (a refused connection or a broken template has
        # none), in its own words: `reason` says what notifier made of it.
        reply = (message if exc.smtp_reply is None else exc.smtp_reply) if exc.smtp_code is not None else None
        fields = {"reason": message, "smtp_code": exc.smtp_code, "smtp_reply": reply, "last_error": message}
        if final:
            if exc.address_rejected:
                consent.suppress(notification.api_key_id, notification.to, reason=message)
                lookup.suppressed(notification.api_key_id, notification.to, message)
            self._finish(notification, Status.FAILED, **fields)
        else:
            store.transition(notification.id, Status.RETRYING, sources=(Status.SENDING,), known=notification, **fields)
        metrics.attempt_failed(self._counts, notification, exc.smtp_code, final=final)
        # The outcome in the line's own words: an argument may be masked as a mail server's (a
        # recipient's mailbox, the email's content: data holding "final" would hide it).
        logger.warning("notification %s attempt %s failed (final): %s" if final
                       else "notification %s attempt %s failed (will retry): %s",
                       notification.id, notification.attempts, message)

    @staticmethod
    def _receipt(notification: Notification, result: SendResult) -> receipts.Receipt:
        """What the server's answer says: the `sent` record to write, and the receipt to keep until then."""
        job = get_current_job()  # RQ files it as failed if the record gives up: the receipt says which
        return receipts.Receipt(notification.id, result.smtp_code, result.smtp_reply, result.message_id, utcnow(),
                                job.id if job is not None else None)

    def _keep(self, receipt: receipts.Receipt) -> bool:
        # Before the `sent` record: a worker killed before that record (a few milliseconds at the
        # median, longer behind a lock) leaves the reconciler a receipt to record, not an email to send
        # again. A Redis that does not take it within KEEP_TIMEOUT_SECONDS costs only that: the record
        # is written as before.
        return receipts.keep(self._receipts, receipt)

    def _forget(self, notification_id: str) -> None:
        # Recorded by this process: its receipt is only clutter now, and goes with the worker's next
        # heartbeat, not in a round trip of its own. Only then: a record that lost to another
        # process's leaves it, the truth about an email that went out, and never deletes a receipt
        # a later attempt kept under the same key.
        receipts.forget(self._counts, [notification_id])

    @staticmethod
    def _sent_fields(receipt: receipts.Receipt) -> dict:
        return {"reason": "accepted by SMTP server", **receipt.fields()}

    def _record_sent(self, notification: Notification, receipt: receipts.Receipt) -> None:
        self._after_sent(notification, receipt, self._write_sent(notification, receipt))

    def _write_sent(self, notification: Notification, receipt: receipts.Receipt, kept: bool | None = None) -> bool:
        """Keep the receipt (unless kept says whether it is already) and write the `sent` record;
        whether this wrote it (False: the row had moved on meanwhile)."""
        fields = self._sent_fields(receipt)
        try:
            if kept is None:
                kept = self._keep(receipt)
            return self._write_or_own(notification, receipt, fields, kept)
        except (*STOPPING, SystemExit, KeyboardInterrupt):
            # RQ's time limit is one SIGALRM, raised as soon as Python runs again: in the receipt's
            # round trip, or after a statement that waited on a lock (a PREPARE waiting on a
            # migration's), before the UPDATE. The server has the email; left `sending`, the reconciler
            # would recover it and send it again. The alarm does not come twice: write the record and
            # do what follows it (the callback, the count, the line; an error there logged, as in a
            # shared job), then let the job stop.
            # A worker told to stop at once (a second SIGTERM: SystemExit) records it first too.
            # The alarm may also cut off the UPDATE itself, waiting for a row lock (patience's wait
            # lets it), or land just after it: psycopg2 closes the connection, and PostgreSQL still
            # carries the UPDATE out once the lock is free, before this second one, which then finds
            # the row moved on. Told apart by its sent_at and reason, that write is this job's, and so
            # are the callback and the rest: nothing else would queue the callback but the reconciler,
            # RECONCILE_GRACE_SECONDS and a pass later.
            recorded = self._write_or_own(notification, receipt, fields, bool(kept))
            self._after_held_sent(notification, receipt, recorded)
            raise

    def _write_or_own(self, notification: Notification, receipt: receipts.Receipt, fields: dict, kept: bool) -> bool:
        """_write_sent_now(); a row it finds moved on may have been moved by this job's own record:
        one whose statement RQ's limit cut off (see _write_sent), or a held one committed with the
        next claim just before the limit landed (see _claim). Then it is this job's, and True."""
        if self._write_sent_now(notification, receipt, fields, kept):
            return True
        if self._wrote_already(notification, fields):
            self._forget(notification.id)
            return True
        return False

    @staticmethod
    def _recorded_with(notification_id: str, sent_at: datetime) -> str | None:
        """The reason of the `sent` record made with an email's receipt (its sent_at), if there is
        one: the job's own ("accepted by SMTP server"), or one another process made from the receipt
        (receipts.LATE_REASON); None when the row moved on otherwise."""
        row = store.get(notification_id)
        if row is None or row.status != Status.SENT or row.sent_at != sent_at:
            return None
        sent = next((e for e in reversed(store.history(row)) if e.to_status == Status.SENT.value), None)
        return sent.reason if sent is not None else None

    def _wrote_already(self, notification: Notification, fields: dict) -> bool:
        # A record another process made from the receipt (the reconciler, while this one waited on a
        # lock) is not this job's, and its callback is queued already.
        return self._recorded_with(notification.id, fields["sent_at"]) == fields["reason"]

    def _write_sent_now(self, notification: Notification, receipt: receipts.Receipt, fields: dict,
                        kept: bool) -> bool:
        # The server has the message now; losing this record would send it again after recovery.
        # So ride out a short database blip. Its receipt is in Redis already if kept, and kept now
        # (with the usual timeout) if not: however long the database stays away, what finds the
        # notification still `sending` then records it instead of sending it again.
        for delay in RECONNECT_DELAYS:
            if delay:  # time.sleep(0) still gives up the CPU: one needless switch per email
                time.sleep(delay)
            try:
                recorded = store.transition(notification.id, Status.SENT, sources=(Status.SENDING,),
                                            known=notification, **fields)
                break
            except UNAVAILABLE_ERRORS:
                logger.warning("notification %s sent but not yet recorded; retrying", notification.id)
                database.close()
                kept = kept or receipts.keep(self.redis, receipt)
        else:
            if not kept:
                logger.error("notification %s sent, but neither recorded nor receipted: recovery may send it again",
                             notification.id)
                raise SentNotRecorded(f"notification {notification.id} was sent but could not be recorded, "
                                      "and no receipt could be kept")
            self._kept[notification.id] = notification
            raise SentNotRecorded(f"notification {notification.id} was sent but could not be recorded; "
                                  "its sent receipt is kept in Redis")
        if recorded:
            self._forget(notification.id)
        return recorded

    def _record_kept(self) -> None:
        """Record the receipts this process kept while the database was away (a job that runs finds
        it back)."""
        if self._kept:
            self._record_receipts(list(self._kept.values()))

    def _record_receipts(self, rows: list[Notification]) -> int:
        """Record as `sent` those of rows (read as `sending`) whose receipt Redis holds; returns how
        many this call recorded."""
        if self.redis is None:
            return 0
        try:
            found = receipts.find(self.redis, [row.id for row in rows])
        except RedisError as exc:
            logger.warning("sent receipts not read: %s", type(exc).__name__)
            return 0
        recorded = 0
        for row in rows:
            if row.id in found:
                with logs.bound(notification_id=row.id):
                    recorded += receipts.record(self.redis, self.settings, row, found[row.id], self._counts)
            # Recorded now, or already (its receipt gone): nothing more of it is owed by this process.
            self._kept.pop(row.id, None)
        return recorded

    def _after_sent(self, notification: Notification, receipt: receipts.Receipt, recorded: bool) -> None:
        if not recorded:
            # The row moved on while this worker sent it: another process recorded its receipt (and
            # counted it, the server's answer with it), or took it for lost. The notification is
            # counted as what it ends as, once; the answer, as an answer to this attempt, once.
            if self._recorded_with(notification.id, receipt.sent_at) is None:
                metrics.replied(self._counts, receipt.smtp_code)
            logger.warning("notification %s sent (attempt %s), but another process moved it on meanwhile",
                           notification.id, notification.attempts)
            return
        notification.status = Status.SENT.value
        if _owes_callbacks(notification):
            self.after_final(notification.id)
        metrics.sent(self._counts, notification, receipt.smtp_code)
        logger.info("notification %s sent (attempt %s)", notification.id, notification.attempts)

    def release(self, notification_id: str) -> str:
        """A delayed notification is due: queue it, unless it was cancelled or released already."""
        with database.connection_context(), logs.bound(notification_id=notification_id):
            current = store.get(notification_id)
            if current is not None and current.status == Status.SCHEDULED and current.send_at > utcnow():
                # Woken early (a clock step, a hand-run job): never send before the time asked for.
                # Put back under a new id, recorded with the row first (see _defer) so that the
                # reconciler does not take this job, finished once it returns, for a lost release.
                again = queues.release_job_id_for(notification_id, again=True)
                (Notification.update(job_id=again)
                 .where((Notification.seq == current.seq) & (Notification.status == Status.SCHEDULED.value))
                 .execute())
                queues.schedule_release(self.redis, self.settings, notification_id, current.send_at,
                                        current.priority, job_id=again)
                return "early"
            if not store.transition(notification_id, Status.QUEUED, reason="send time reached",
                                    sources=(Status.SCHEDULED,)):
                return "skipped"
            queues.dispatch(self.redis, self.settings, store.get(notification_id))
            return "released"

    def send_callback(self, notification_id: str) -> str:
        """POST the signed status event to the caller's callback_url (notifier.callback_job)."""
        try:
            outcome = callback_job.post_owed(self.settings, notification_id)
        except callback_job.CallbackGaveUp:
            metrics.callback(self._counts, "gave_up")
            raise
        except callback_job.AnsweredThenMovedOn:
            metrics.callback(self._counts, "delivered")  # its receiver took it; the next event is another's
            raise
        except CallbackRetry:
            metrics.callback(self._counts, "retried")
            raise
        if outcome in ("delivered", "gave up"):
            metrics.callback(self._counts, outcome.replace(" ", "_"))
        return outcome


_deliverer: Deliverer | None = None


def install(deliverer: Deliverer | None) -> None:
    """Make deliverer the one this process's jobs use (worker.py and tests call this)."""
    global _deliverer
    _deliverer = deliverer


def _current() -> Deliverer:
    if _deliverer is None:
        # A worker started some other way (rq's own CLI) builds its dependencies from the environment.
        from notifier.runtime import build_deliverer

        install(build_deliverer(Settings.from_env()))
    return _deliverer


def deliver(notification_id: str) -> str:
    """The RQ job: deliver one notification by id."""
    return _current().deliver(notification_id)


def deliver_many(notification_ids: list[str]) -> dict[str, int]:
    """The RQ job: deliver the notifications of a batch that share one job."""
    return _current().deliver_many(notification_ids)


def release(notification_id: str) -> str:
    """The job rq-scheduler runs when a delayed notification is due."""
    current = _current()
    job = get_current_job()
    if job is not None:
        # Release jobs scheduled before queues.schedule_release saved a failure TTL with them hold none
        # (sends may be delayed for years), and RQ's default keeps a failed one for a year; RQ files
        # the job by what it holds when the job fails.
        job.failure_ttl = queues.failure_ttl(current.settings)
    return current.release(notification_id)


def send_callback(notification_id: str) -> str:
    """The RQ job: send a notification's status callback."""
    return _current().send_callback(notification_id)


def _periodic(run: Callable[[], T]) -> Callable[[], T | None]:
    """A periodic job, which a database away (a restart, a failover) skips with an ERROR line: failed,
    each pass of an outage sat in RQ's failed registry, rq-dashboard's Failed list, for
    DEAD_LETTER_TTL_DAYS, with nothing there to redo; the next pass does the work."""

    @functools.wraps(run)
    def job():
        try:
            return run()
        except UNAVAILABLE_ERRORS as exc:
            logger.error("periodic job %s skipped on a database error (%s: %s); the next pass does its work",
                         run.__name__, type(exc).__name__, reason_of(exc))
            return None

    return job


@_periodic
def reconcile() -> dict:
    """The periodic job: rebuild from the database whatever Redis lost (see notifier.reconciler)."""
    from notifier.reconciler import reconcile as run

    current = _current()
    with database.connection_context():
        return run(current.settings, current.redis).as_dict()


@_periodic
def purge() -> int:
    """The periodic job: delete what RETENTION_DAYS no longer keeps (see notifier.retention)."""
    from notifier.retention import purge as run

    current = _current()
    with database.connection_context():
        deleted = run(current.settings)
    metrics.purged(current.redis, deleted)
    return deleted


@_periodic
def flush_digests() -> int:
    """The periodic job: make every daily or weekly digest that is due."""
    current = _current()
    with database.connection_context():
        return digests.flush_due(current.settings, current.redis, current.renderer)
