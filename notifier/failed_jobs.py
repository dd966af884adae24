"""The line an operator reads about a failed job: `job <id> failed: ...`, at the level of what the
failure means (an ERROR is for someone to act on), for RQ's worker and for the emails a batch's
shared job files in the failed registry as jobs of their own."""

from __future__ import annotations

import logging

from notifier import logs, queues
from notifier.callback_job import CallbackGaveUp
from notifier.callbacks import CallbackRetry
from notifier.errors import DeliveryError, PermanentDeliveryError, RetriesExhausted, TransientDeliveryError

# The line about a failed job is RQ's worker's (worker.NotifierWorker), and a shared job's about each
# email it files in the failed registry as its own failed job: the same line, at the same level.
rq_log = logging.getLogger("rq.worker")


def unexpected_failure(exc: BaseException | None) -> bool:
    """Not a mail server's or a callback endpoint's answer: a bug, an outage, a time limit."""
    return not isinstance(exc, DeliveryError | CallbackRetry)


def failure_level(exc: BaseException | None, retried: bool) -> int:
    """How loud a job's failure is: a WARNING for an answer the job expects, from outside (a failure
    RQ retries, a mail server's refusal of the address, a callback endpoint's answer); an ERROR
    for what an operator must see to: retries that ran out on what could have passed (an outage
    outlasted them), a refusal of our sender or message, a failure of ours (a template missing or
    broken after a deploy), and anything unexpected (logged with its traceback)."""
    if isinstance(exc, DeliveryError) and exc.operator:
        return logging.ERROR  # SMTP_USERNAME/PASSWORD refused, a certificate not trusted: from the first
    if isinstance(exc, CallbackGaveUp) and isinstance(exc.__cause__, CallbackRetry):
        # The caller's endpoint was down for longer than the retries last: someone must know to post
        # them again (`callbacks redeliver --gave-up`) once it is back.
        return logging.ERROR
    if isinstance(exc, CallbackRetry | CallbackGaveUp):
        return logging.WARNING  # the caller's endpoint's answer (a retry, a 4xx refusal), theirs to mend
    if isinstance(exc, RetriesExhausted):
        return logging.ERROR
    if isinstance(exc, TransientDeliveryError) and retried:
        return logging.WARNING
    if isinstance(exc, PermanentDeliveryError) and exc.address_rejected:
        return logging.WARNING  # a bounce: the address is suppressed, the dead-letter queue says so
    return logging.ERROR


def log_failed_job(job_id: str, exc: BaseException | None, retried: bool, exc_info=None, cold_stop: bool = False,
                   **extra) -> None:
    """`job <id> failed: <exception>: <its text>; <what next>`, at the level of what it means.

    cold_stop: RQ's cold shutdown (a second SIGTERM or Ctrl-C) cut the job off, the operator's own
    doing and no bug: a WARNING, without a traceback; the reconciler takes back what it had not sent."""
    if cold_stop:
        level, exc_info = logging.WARNING, None
        next_step = "a cold shutdown; the reconciler takes back what it had not sent"
    else:
        level = failure_level(exc, retried)
        next_step = "RQ retries it" if retried else "to the failed registry (the dead-letter queue)"
    with logs.bound(notification_id=queues.notification_of_job(job_id)):
        # The exception itself as the argument: its text may be a mail server's, masked as one.
        rq_log.log(level, "job %s failed: %s: %s; %s", job_id, type(exc).__name__ if exc is not None else "?", exc,
                   next_step, exc_info=exc_info if unexpected_failure(exc) else None,
                   extra={"job_id": job_id, **extra})
