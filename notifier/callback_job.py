"""The status-callback job: post the event a notification owes its caller, once per attempt, and
record how each attempt ended (notifier.callbacks builds, signs and sends the request itself)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

from rq import get_current_job
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from notifier import logs, queues, store
from notifier.callbacks import CallbackRejected, CallbackRetry, event_body, event_id, post, turn
from notifier.config import Settings
from notifier.db import RECONNECT_DELAYS, UNAVAILABLE_ERRORS, database, discard_connection, past_statement_timeout
from notifier.errors import PermanentDeliveryError
from notifier.models import FINAL_STATUSES, CallbackStatus, Notification

logger = logging.getLogger(__name__)


class CallbackGaveUp(PermanentDeliveryError):
    """The caller's callback endpoint refused or kept failing; we stop trying."""


class AnsweredThenMovedOn(CallbackRetry):
    """The receiver took the event it was posted (2xx), and the notification has moved on to another
    final state meanwhile: the job is retried for the event owed now. Counted as delivered."""


def post_owed(settings: Settings, notification_id: str) -> str:
    """POST the signed status event owed for a notification to the caller's callback_url, once per
    attempt; RQ retries what may pass. Returns what happened."""
    with database.connection_context(), logs.bound(notification_id=notification_id):
        notification = store.get(notification_id)
        if not _owes_callback(notification):
            return "skipped"
        with turn(notification) as mine:
            if not mine:
                # Another job is posting this very event now (Redis lost its job while it ran, and
                # the reconciler queued it again): it records how that ends, and its retries follow
                # from there.
                logger.info("callback for notification %s is being posted by another job; skipping", notification_id)
                return "skipped"
            notification = store.get(notification_id)  # as the last job to post it left it
            if not _owes_callback(notification):
                return "skipped"
            return _post(settings, notification)


def _post(settings: Settings, notification: Notification) -> str:
    attempt = notification.callback_attempts + 1
    if attempt > settings.max_callback_attempts:
        # Every attempt was made and this job still came (a retry of one that died mid-post, the
        # reconciler's): never one more, whatever ended the last.
        _outcome(notification, CallbackStatus.GAVE_UP, f"callback not sent: {attempt - 1} attempts made; giving up")
        return "gave up"
    if not Notification.update(callback_attempts=attempt).where(_still_owed_as_read(notification)).execute():
        # Final again since it was read (requeued and ended anew): the attempt would count against the
        # new event, which could then give up an attempt early, and this one is no longer owed.
        _retry_at_once(settings)
        raise CallbackRetry(f"the notification moved on before its {notification.status} event was posted; the "
                            "event owed now goes next")
    body = event_body(notification)
    try:
        try:
            with _limit_until_answered(queues.callback_job_timeout(settings)):
                key = notification.api_key  # read from the database now: a rotation applies to the next attempt
                code = post(
                    notification.callback_url,
                    body,
                    key.callback_secret,
                    event_id(notification),
                    settings.callback_timeout,
                    old_secret=key.old_callback_secret,
                    deny_networks=settings.callback_deny_networks,
                )
        except JobTimeoutException as exc:
            # RQ's limit on the job (queues.callback_job_timeout): an attempt like any other,
            # in the history and retried, not a job that vanished mid-attempt.
            limit = queues.callback_job_timeout(settings)
            raise CallbackRetry(f"no whole answer within {limit} s") from exc
    except (CallbackRetry, CallbackRejected) as exc:
        final = isinstance(exc, CallbackRejected) or attempt >= settings.max_callback_attempts
        if not _outcome(notification, CallbackStatus.GAVE_UP if final else None,
                        f"callback attempt {attempt} failed: {exc}" + ("; giving up" if final else "")):
            raise _moved_on(settings, notification) from exc
        if final:
            raise CallbackGaveUp(str(exc)) from exc
        raise
    if not _outcome(notification, CallbackStatus.DELIVERED, f"callback delivered: HTTP {code}"):
        raise _moved_on(settings, notification, answered=True)
    return "delivered"


def _moved_on(settings: Settings, notification: Notification, answered: bool = False) -> CallbackRetry:
    # The notification owes another event now (a dead letter requeued and final again), and this job
    # is the one to post it: the final transition found it running and queued no other
    # (queues.enqueue_callback). Retried at once, with the whole set of retries of a new event, not at
    # the old event's next interval with what it had left (up to half an hour, or none).
    _retry_at_once(settings)
    return (AnsweredThenMovedOn if answered else CallbackRetry)(
        f"the {notification.status} event was posted, and the notification has moved on; the event owed now goes "
        "next")


def _retry_at_once(settings: Settings) -> None:
    job = get_current_job()
    if job is None:
        return  # called outside a worker (a shell, a test): there is no retry to shape
    # RQ takes interval number len(intervals) - retries_left: the first retry comes now, the rest as a
    # new event's would (the worker handles the failure with this job object, as with
    # worker.stop_retrying_permanent_failures).
    job.retry_intervals = [0, *settings.callback_retry_intervals]
    job.retries_left = len(job.retry_intervals)


def _outcome(notification: Notification, state: CallbackStatus | None, reason: str) -> bool:
    """Record how an attempt ended; False when the notification moved on to another final state (a
    dead letter requeued and ended again, its digest too) while its event was posted."""
    # Mostly written after the receiver answered, where nothing may fail the job (see
    # _limit_until_answered): DATABASE_STATEMENT_TIMEOUT cancelling a wait for the row (a long
    # transaction holding it) failed it, RQ retried it, and a receiver that had said 2xx got the
    # event again. So a statement cancelled at the limit is run again, for as long as it takes, as
    # it waited before there was a limit. (Each alone, outside a transaction, as before: the pool
    # still replaces a connection dropped meanwhile and runs the statement on the new one.)
    current = True
    if state is not None:
        # Only while the notification is still in the very final state whose event was posted: requeued
        # from the dead-letter queue and final again meanwhile (its digest too), it owes the event of
        # its new outcome, which this answer says nothing of, even when that is the same status again.
        current = bool(_riding_out(lambda: Notification.update(callback_status=state.value)
                                   .where(_still_owed_as_read(notification)).execute()))
        if not current:
            # Recorded under the new status otherwise, it read as that event's outcome.
            moved = _riding_out(lambda: store.get(notification.id))
            now = f"{moved.status} again" if moved.status == notification.status else f"{moved.status} now"
            reason += f", to the {notification.status} event: the notification is {now}"
    _riding_out(lambda: store.record(notification.id, kind="callback", reason=reason))
    return current


def _riding_out(run):
    """run() past a cancel (past_statement_timeout) and past a database away for a few seconds (a
    restart: the connection cut, then none taken), each try on a new connection. Failing there failed
    the job after the receiver had answered, and RQ's retry posted the event again."""
    for tries, delay in enumerate(RECONNECT_DELAYS, 1):  # as a `sent` record rides a restart out
        if delay:
            time.sleep(delay)
        try:
            return past_statement_timeout(run)
        except UNAVAILABLE_ERRORS as exc:
            if tries == len(RECONNECT_DELAYS):
                raise
            logger.warning("callback attempt not yet recorded (%s); retrying", type(exc).__name__)
            # For good, not back into the pool: a connection that still works may hold this job's
            # advisory lock, which its next user would keep.
            discard_connection(database)
    return None  # RECONNECT_DELAYS is not empty: every try returned or raised


def _still_owed_as_read(notification: Notification):
    """SQL: the row is still in the very final state whose event this job posts (the same status and
    the same move into it: requeued and final again, even in that status, it owes a new event)."""
    return ((Notification.seq == notification.seq) & (Notification.status == notification.status)
            & (Notification.final_moves == notification.final_moves))


def _owes_callback(notification: Notification | None) -> bool:
    return (notification is not None and notification.callback_status == CallbackStatus.PENDING
            and notification.status in FINAL_STATUSES)


def _limit_until_answered(seconds: int):
    """RQ's time limit on the running job, started anew here and gone for good when the block ends.

    Once the receiver has answered, nothing may interrupt recording the answer: an alarm landing
    there (a slow or reconnecting database) failed the job, RQ retried it, and a receiver that had
    said 2xx got the event again. RQ's limit is one SIGALRM per process (UnixSignalDeathPenalty,
    which NotifierWorker names), so the alarm set here replaces RQ's and leaving the block cancels
    both. What follows the answer is two short statements with no limit: a database that holds them
    up holds up every job of the worker alike, and waiting is better than posting the event twice."""
    if get_current_job() is None:
        return nullcontext()  # called outside a worker (a shell, a test): there is no limit to replace
    return UnixSignalDeathPenalty(seconds, JobTimeoutException)
