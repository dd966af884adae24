"""Queue names, the Redis connection, and handing a notification to the queue for its priority."""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis import Redis
from redis.client import Pipeline
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError, WatchError
from rq import Queue, Retry, Worker
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.job import Job, JobStatus
from rq.results import Result
from rq_scheduler import Scheduler

from notifier import logs, store
from notifier.config import Settings
from notifier.models import Notification, Priority, Status, utcnow
from notifier.tally import Tally

logger = logging.getLogger(__name__)

QUEUE_NAMES: dict[Priority, str] = {
    Priority.HIGH: "notifier.high",
    Priority.DEFAULT: "notifier.default",
    Priority.LOW: "notifier.low",
}
# Status callbacks to callers have a queue of their own, last, so they never hold up an email.
CALLBACK_QUEUE = "notifier.callbacks"
# Workers listen in this order, so a high-priority email never waits behind a low-priority backlog.
QUEUES_BY_PRIORITY: tuple[str, ...] = (
    *(QUEUE_NAMES[p] for p in (Priority.HIGH, Priority.DEFAULT, Priority.LOW)),
    CALLBACK_QUEUE,
)
# The periodic jobs (the reconciler, digests) go where they are picked up first. A delayed send's
# release job goes on its own priority's queue instead (queues.schedule_release).
CONTROL_QUEUE = QUEUE_NAMES[Priority.HIGH]

DELIVER_JOB = "notifier.jobs.deliver"
# The job meta key of the request a job came from, so the worker's log lines carry its id too.
REQUEST_ID_META = "request_id"
# The job meta key of the requests the notifications of a shared job came from, by notification id,
# when they came from several (delayed sends released together, notifier.releases).
MEMBER_REQUEST_IDS_META = "request_ids"
DELIVER_MANY_JOB = "notifier.jobs.deliver_many"
RELEASE_JOB = "notifier.jobs.release"
CALLBACK_JOB = "notifier.jobs.send_callback"
# The states of a job (its hash's `status`) that will still run, or are running.
LIVE_JOB_STATES = frozenset({b"queued", b"started", b"scheduled", b"deferred"})
_RUNNING_JOB_STATES = frozenset({b"queued", b"started"})  # those not waiting for a retry


# The API's Redis calls wait at most this long for an answer: a hung Redis (a failover, a stopped
# process) made each send wait out a 10 s read, after the work was stored, and soon every thread of
# every API process waited. What the API asks of Redis (a rate limit, a job to queue, a page of the
# dashboard) takes milliseconds, and what it stored without Redis the reconciler queues later.
API_TIMEOUT_SECONDS = 2.0

# A send stored while Redis refuses its job (out of memory, read-only, MISCONF) or does not answer is said
# at most once per this many seconds per process, with how many there were (not_queued): each logged a
# line of its own, hundreds a second under load. The reconciler queues each of them once Redis takes jobs.
NOT_QUEUED_LOG_SECONDS = 2.0
_not_queued = Tally(NOT_QUEUED_LOG_SECONDS)


def connect_redis(url: str, timeout: float = 10.0) -> Redis:
    """A Redis client for url; short timeouts so a dead Redis fails a request instead of hanging it.
    timeout: for each answer (a worker's blocking dequeue waits less than the default 10 s)."""
    return Redis.from_url(url, socket_connect_timeout=min(2.0, timeout), socket_timeout=timeout,
                          health_check_interval=30, driver_info=driver_info())


@functools.cache
def driver_info() -> DriverInfo:
    """What each Redis connection names itself to the server (CLIENT SETINFO), read once per process.

    redis-py read its version from its package's files for every connection it made: under a low
    `ulimit -n` that open() failed with an OSError, which no caller takes for Redis's, and a send
    already stored answered 503 (so a retry without an idempotency key would send it twice)."""
    return DriverInfo()


def impatient(redis: Redis, timeout: float) -> Redis:
    """A client of the same Redis as redis (a pool of its own) that waits at most timeout to connect and
    for each answer."""
    pool = redis.connection_pool
    # Not the pool's own bookkeeping (redis-py's maintenance handler, the timeouts it restores).
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith(("maint_notifications", "orig_"))}
    connect = min(kwargs.get("socket_connect_timeout") or timeout, timeout)  # a timeout drops the connection
    return type(redis)(connection_pool=type(pool)(connection_class=pool.connection_class, **{
        **kwargs, "socket_timeout": timeout, "socket_connect_timeout": connect}))


def queue_for(priority: str, connection: Redis) -> Queue:
    """The RQ queue that carries notifications of this priority."""
    return Queue(QUEUE_NAMES[Priority(priority)], connection=connection)


def all_queues(connection: Redis) -> list[Queue]:
    """Every queue a notifier worker consumes, highest priority first."""
    return [Queue(name, connection=connection) for name in QUEUES_BY_PRIORITY]


def failure_ttl(settings: Settings) -> int:
    """Seconds a failed job stays in RQ's failed registry (the dead-letter queue)."""
    return settings.dead_letter_ttl_days * 86400


def job_id_for(notification_id: str) -> str:
    """One RQ job id per notification: enqueueing it again replaces the job instead of adding one."""
    return f"notification-{notification_id}"


def new_shared_job_id() -> str:
    """The id of a job that carries several notifications of one batch."""
    return f"notifications-{uuid.uuid4()}"


def job_id_of(notification: Notification) -> str:
    """The id of the job that carries this notification now."""
    return notification.job_id or job_id_for(notification.id)


def callback_job_id_for(notification_id: str) -> str:
    return f"callback-{notification_id}"


RELEASE_JOB_PREFIX = "release-"
NOTIFICATION_ID_LENGTH = 36  # models.new_public_id: a UUID's text


def release_job_id_for(notification_id: str, again: bool = False) -> str:
    """The id of the job that releases a delayed notification; again: a new one for a release that
    woke early and puts itself back, or one a worker puts off for quiet hours. Under its own id, RQ
    marks the job that woke finished once it returns and expires it after FINISHED_JOB_TTL, and
    rq-scheduler drops, without a word, a schedule entry whose job is gone: the send then waited for
    the reconciler. A new one is recorded in the row's job_id (release_job_id_of), which holds 64
    characters: 16 hex digits of randomness are plenty for one notification's releases."""
    if again:
        return f"{RELEASE_JOB_PREFIX}{notification_id}-{uuid.uuid4().hex[:16]}"
    return f"{RELEASE_JOB_PREFIX}{notification_id}"


def notification_of_release(job_id: str) -> str | None:
    """The id of the notification a release job (release_job_id_for) releases; None for another job."""
    if not job_id.startswith(RELEASE_JOB_PREFIX):
        return None
    notification_id = job_id[len(RELEASE_JOB_PREFIX):len(RELEASE_JOB_PREFIX) + NOTIFICATION_ID_LENGTH]
    rest = job_id[len(RELEASE_JOB_PREFIX) + NOTIFICATION_ID_LENGTH:]
    return notification_id if len(notification_id) == NOTIFICATION_ID_LENGTH and rest[:1] in ("", "-") else None


def notification_of_job(job_id: str) -> str | None:
    """The id of the one notification a job delivers, releases or calls back about; None for a shared
    job of several, or another job."""
    for prefix in ("notification-", "callback-"):
        if job_id.startswith(prefix) and len(job_id) == len(prefix) + NOTIFICATION_ID_LENGTH:
            return job_id[len(prefix):]
    return notification_of_release(job_id)


def release_job_id_of(notification: Notification) -> str:
    """The id of the job that releases this scheduled notification: the one recorded with it when it
    was put off under a new id (jobs.Deliverer), else release_job_id_for it."""
    job_id = notification.job_id
    if job_id and job_id.startswith(RELEASE_JOB_PREFIX):
        return job_id
    return release_job_id_for(notification.id)


def _retry(intervals: tuple[int, ...], attempts_made: int) -> Retry | None:
    remaining = intervals[attempts_made:]
    return Retry(max=len(remaining), interval=list(remaining)) if remaining else None


def retry_policy(settings: Settings, attempts_made: int) -> Retry | None:
    """RQ's retries for a notification that has already been tried attempts_made times."""
    return _retry(settings.retry_intervals, attempts_made)


def traced() -> dict:
    """Job meta naming the request (or the job) being served now, if any: a job's log lines then
    carry the id of the request that caused it, however many jobs later. Always a dict, None and
    all: RQ writes no meta for an empty one, and a job enqueued again under the same id (reconciler,
    `dlq requeue`) would keep the id of the request that made the old job."""
    return {REQUEST_ID_META: logs.request_id.get()}


def traced_members(request_ids: dict[str, str | None]) -> dict:
    """Job meta naming the requests the notifications of a shared job came from (notification id ->
    request id): the one request's id when they share it, else each one's."""
    distinct = set(request_ids.values())
    if len(distinct) <= 1:
        return {REQUEST_ID_META: next(iter(distinct), None)}
    return {REQUEST_ID_META: None,
            MEMBER_REQUEST_IDS_META: {key: value for key, value in request_ids.items() if value is not None}}


def enqueue_delivery(
    connection: Redis,
    settings: Settings,
    notification_id: str,
    priority: str,
    attempts_made: int = 0,
    at: datetime | None = None,
    pipeline: Pipeline | None = None,
):
    """Put a delivery job for the notification on its priority queue (at a time, if given); on pipeline,
    when given, which the caller executes.

    Raises RedisError if Redis is unreachable."""
    queue = queue_for(priority, connection)
    options = {
        "job_id": job_id_for(notification_id),
        "retry": retry_policy(settings, attempts_made),
        "job_timeout": settings.job_timeout,
        "result_ttl": settings.finished_job_ttl,
        "failure_ttl": failure_ttl(settings),
        "description": f"deliver notification {notification_id}",
        "meta": traced(),
    }
    if pipeline is not None:
        options["pipeline"] = pipeline
    if at is not None:
        # Our times are naive UTC; RQ reads a naive time as the machine's local time.
        return queue.enqueue_at(at.replace(tzinfo=UTC) if at.tzinfo is None else at, DELIVER_JOB, notification_id,
                                **options)
    return queue.enqueue(DELIVER_JOB, notification_id, **options)


def retry_due(settings: Settings, notification: Notification) -> datetime | None:
    """When a retrying notification's next attempt is due (None: now), by RETRY_INTERVALS."""
    attempts = notification.attempts
    if notification.status != Status.RETRYING or not 0 < attempts <= len(settings.retry_intervals):
        return None
    due = notification.updated_at + timedelta(seconds=settings.retry_intervals[attempts - 1])
    return due if due > utcnow() else None


def file_failed(connection: Redis, settings: Settings, notification: Notification, reason: str) -> None:
    """Put a notification that failed inside a shared job into RQ's failed registry (the dead-letter
    queue) as its own job, as if it had failed alone; the database already says `failed`."""
    queue, ttl = queue_for(notification.priority, connection), failure_ttl(settings)
    job = queue.create_job(DELIVER_JOB, args=(notification.id,), job_id=job_id_for(notification.id),
                           timeout=settings.job_timeout, result_ttl=settings.finished_job_ttl,
                           failure_ttl=ttl, description=f"deliver notification {notification.id}")
    try:
        with connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            queue.failed_job_registry.add(job, ttl=ttl, exc_string=reason, pipeline=pipe)
            Result.create_failure(job, ttl, exc_string=reason, pipeline=pipe)
            pipe.execute()
    except RedisError as exc:
        logger.warning("notification %s failed; not filed in RQ's registry: %s", notification.id, type(exc).__name__)


def unfile_failed(connection: Redis, job_ids: list[str]) -> None:
    """Take these jobs out of every notifier queue's failed registry. By id (ZREM, nothing when absent),
    never by reading a whole registry; the jobs themselves are left (one may be running again).
    Raises RedisError."""
    with connection.pipeline(transaction=False) as pipe:
        for queue in all_queues(connection):
            for job_id in job_ids:
                queue.failed_job_registry.remove(job_id, pipeline=pipe)
        pipe.execute()


def worker_keys(worker_name: str) -> tuple[str, str]:
    """The Redis keys of an RQ worker: its own (a hash) and the set of the jobs it is executing."""
    return f"{Worker.redis_worker_namespace_prefix}{worker_name}", WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)


# What tells the reconciler a send is still going (RQ's registry of workers, each worker's executions)
# lives only in Redis's memory: a restart without persistence, a flush or a failover to a replica that
# had not seen it forgets it while a worker may still be sending. This key, set where it is missing by
# what writes to Redis all the time (each worker's heartbeat, each pass of the reconciler), says since
# when Redis remembers: a send claimed before then may be going on where nothing shows it
# (reconciler._recover).
REMEMBERS_SINCE_KEY = "notifier:redis-remembers-since"


def mark_memory(pipe: Pipeline) -> None:
    """Add to pipe: note now as the moment Redis's memory starts, unless a moment is noted already."""
    pipe.set(REMEMBERS_SINCE_KEY, f"{time.time():.3f}", nx=True)


def remembers_since(value: bytes | None) -> datetime | None:
    """The moment (naive UTC) REMEMBERS_SINCE_KEY's value notes; None for none, or one unreadable."""
    try:
        return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None) if value is not None else None
    except ValueError:
        return None


def keep_worker_alive(connection: Redis, worker_name: str, ttl: int,
                      also: Callable[[Pipeline], None] | None = None) -> None:
    """Set the TTL of a worker's keys, as RQ's heartbeat does: the reconciler takes a worker whose key
    is gone for dead (reconciler._running). also: more writes for the same round trip, whose errors
    are not this one's. Raises RedisError."""
    keys = worker_keys(worker_name)
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.expire(key, ttl)
        if also is not None:
            also(pipe)
        replies = pipe.execute(raise_on_error=False)
    for reply in replies[:len(keys)]:
        if isinstance(reply, Exception):
            raise reply


def schedule_release(connection: Redis, settings: Settings, notification_id: str, send_at: datetime,
                     priority: str, job_id: str | None = None) -> None:
    """Ask rq-scheduler to release a delayed notification at send_at (naive UTC), by a job of job_id
    (release_job_id_for, unless given) on the queue of the notification's priority.

    rq-scheduler passes unknown options on to the job function and knows nothing of RQ's retries, so
    it only enqueues a small release job; that job puts the notification on its priority queue. A
    release that fails (the database away) is not retried; the reconciler releases the notification
    all the same."""
    # rq-scheduler keeps whole seconds (it truncates): round up, or the email could go out early.
    at = send_at.replace(microsecond=0) + timedelta(seconds=1) if send_at.microsecond else send_at
    # rq-scheduler takes no failure TTL, but it keeps the job's hash as saved, and RQ files a failed
    # job, an abandoned one (its worker killed) too, by the TTL in it: saved here, the job leaves the
    # failed registry like every other. enqueue_at only writes, so on a MULTI pipeline the TTL goes
    # in with the schedule entry: the scheduler never sees the job without it, and no save of ours
    # can come after it has moved the job on (and put back a job that has finished and gone).
    # On its own priority's queue: on the high queue, the releases of a low-priority campaign due at
    # one moment (thousands) held up every high-priority email behind them, for seconds.
    with connection.pipeline() as pipe:
        job = Scheduler(queue_name=QUEUE_NAMES[Priority(priority)], connection=pipe).enqueue_at(
            at, RELEASE_JOB, notification_id, job_id=job_id or release_job_id_for(notification_id), meta=traced(),
            job_result_ttl=settings.finished_job_ttl,
        )
        job.failure_ttl = failure_ttl(settings)
        job.save(pipeline=pipe)
        pipe.execute()


def callback_job_timeout(settings: Settings) -> int:
    """RQ's limit on a callback job: CALLBACK_TIMEOUT bounds each read of the answer, not the whole of
    it, and a receiver trickling its answer would hold a worker (and the emails waiting for it)."""
    return int(settings.callback_timeout * 2) + 5


def enqueue_callback(connection: Redis, settings: Settings, notification_id: str, attempts_made: int = 0,
                     unless_live: bool = True, new_event: bool = False, at: datetime | None = None) -> Job | None:
    """Queue the status callback job of a notification that reached a final state; returns it, or None
    when its job is live already (queued, running, waiting for a retry): that job reads the row as it
    runs and posts the event owed then, and a second one would post the same event at once, whatever
    the retry interval (unless_live=False: a job `started` whose worker is gone, the reconciler's).
    new_event: the notification has just become final (again): a job waiting for the retry of the
    event it owed before is replaced, so the new one goes now rather than at that retry.

    The look and the queueing are one transaction (WATCH on the job): the reconciler, a redelivery
    and a final transition each queued it after seeing no live job, and two that looked at once both
    did, two jobs under one id. An earlier job's hash under that id (a finished one's, a failed one's)
    is replaced whole, its expiry with it: kept, a failed job's 30 days, or a finished job's minute,
    ran on under the new job, which vanished from its queue or its retry when it ran out. Its entry
    in a failed or finished registry goes too. at: when (naive UTC) its next attempt is due, for a
    retry Redis lost; None, now. Raises RedisError."""
    job_id = callback_job_id_for(notification_id)
    key = Job.key_for(job_id)
    data = Queue.prepare_data(
        CALLBACK_JOB,
        (notification_id,),
        job_id=job_id,
        retry=_retry(settings.callback_retry_intervals, attempts_made),
        timeout=callback_job_timeout(settings),
        result_ttl=settings.finished_job_ttl,
        failure_ttl=failure_ttl(settings),
        description=f"status callback for notification {notification_id}",
        meta=traced(),
    )
    queue = Queue(CALLBACK_QUEUE, connection=connection)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                status = pipe.hget(key, "status")
                # `queued` in a queue: a worker killed between taking a job off its queue (BLPOP) and
                # marking it started left it `queued` in no queue, where nothing would ever run it.
                # (Watching its hash is enough: whatever queues it again writes that.)
                lost = status == b"queued" and pipe.lpos(queue.key, job_id) is None
                if unless_live and not lost and status in (_RUNNING_JOB_STATES if new_event else LIVE_JOB_STATES):
                    return None
                pipe.multi()
                pipe.delete(key)
                for registry in (queue.failed_job_registry, queue.finished_job_registry,
                                 queue.scheduled_job_registry, queue.deferred_job_registry):
                    registry.remove(job_id, pipeline=pipe)
                if at is None:
                    (job,) = queue.enqueue_many([data], pipeline=pipe)
                else:
                    job = queue.enqueue_at(at.replace(tzinfo=UTC), CALLBACK_JOB, *data.args, pipeline=pipe,
                                           job_id=data.job_id, retry=data.retry, job_timeout=data.timeout,
                                           result_ttl=data.result_ttl, failure_ttl=data.failure_ttl,
                                           description=data.description, meta=data.meta)
                pipe.execute()
                return job
            except WatchError:
                continue  # another process changed the job meanwhile: look again


def share_jobs(settings: Settings, items: list[tuple[str, dict]]) -> list[dict]:
    """Give the queued notifications of a batch, given as (status, fields), a job_id each, so that up
    to BATCH_JOB_SIZE of one priority travel in one job; returns the fields, with job_id where shared.

    One RQ job per notification costs the worker more than the send itself; one per chunk keeps a
    chunk small enough that a high-priority email never waits long behind it."""
    groups = [(fields.get("priority") or Priority.DEFAULT.value) if status == Status.QUEUED else None
              for status, fields in items]
    return [{**fields, "job_id": job_id} if job_id else fields
            for (_, fields), job_id in zip(items, shared_job_ids(settings, groups), strict=True)]


def shared_job_ids(settings: Settings, groups: list) -> list[str | None]:
    """A shared job id for each of a run of notifications, given by the group each belongs to (its
    priority, with whatever else must be the same in one job; None: one that shares no job): up to
    BATCH_JOB_SIZE of a group, in order, get the same id. All None when BATCH_JOB_SIZE is 1."""
    size = settings.batch_job_size
    out: list[str | None] = [None] * len(groups)
    if size <= 1:
        return out
    current: dict = {}  # group -> (job id, members so far)
    for index, group in enumerate(groups):
        if group is None:
            continue
        job_id, members = current.get(group, ("", size))
        if members >= size:
            job_id, members = new_shared_job_id(), 0
        current[group] = (job_id, members + 1)
        out[index] = job_id
    return out


def dispatch(connection: Redis, settings: Settings, notification: Notification,
             also: Callable[[Pipeline], None] | None = None) -> bool:
    """Hand a stored notification to Redis as its status asks. False when Redis is away: the row
    stays as it is, and the reconciler hands it over once Redis is back."""
    return dispatch_many(connection, settings, [notification], also)


def dispatch_callback(connection: Redis, settings: Settings, notification: Notification) -> bool:
    """Queue the status callback a final notification owes, if any, and those the items of a digest
    owe once it ended with them (an item left out of its digest, past its deadline, had its callback
    queued then: enqueue_callback passes over a live one); Redis away means the reconciler queues them
    later. True when any was queued."""
    owed = [(notification, True)] if notification.callback_status == "pending" else []
    owed += [(n, False) for n in store.items_owed_callbacks(notification) if n.callback_status == "pending"]
    queued = False
    try:
        for n, new_event in owed:
            queued = enqueue_callback(connection, settings, n.id, n.callback_attempts,
                                      new_event=new_event) is not None or queued
    except RedisError as exc:
        logger.warning("callback for notification %s not queued: %s", notification.id, type(exc).__name__)
        return False
    return queued


def _shared_job(settings: Settings, job_id: str, notification_ids: list[str], at_front: bool = False,
                meta: dict | None = None):
    # No RQ retry: each notification that fails in it goes on in a job of its own (jobs.deliver_many).
    return Queue.prepare_data(DELIVER_MANY_JOB, (notification_ids,), job_id=job_id, at_front=at_front,
                              timeout=settings.job_timeout * len(notification_ids),
                              result_ttl=settings.finished_job_ttl, failure_ttl=failure_ttl(settings),
                              meta=traced() if meta is None else meta,
                              description=f"deliver {len(notification_ids)} notifications of a batch")


def enqueue_shared(connection: Redis, settings: Settings, job_id: str, notification_ids: list[str],
                   priority: str, request_ids: dict[str, str] | None = None) -> None:
    """Put a shared job back at the front of its queue (the rest of one that made way). request_ids:
    those of its members that came from requests of their own (MEMBER_REQUEST_IDS_META)."""
    meta = {**traced(), MEMBER_REQUEST_IDS_META: request_ids} if request_ids else None
    queue_for(priority, connection).enqueue_many([_shared_job(settings, job_id, notification_ids, at_front=True,
                                                              meta=meta)])


def waiting_above(connection: Redis, priority: str) -> bool:
    """Whether a queue of higher priority than this one has jobs waiting."""
    order = list(Priority)  # highest first
    higher = order[:order.index(Priority(priority))]
    if not higher:
        return False
    with connection.pipeline(transaction=False) as pipe:
        for p in higher:
            pipe.llen(f"{Queue.redis_queue_namespace_prefix}{QUEUE_NAMES[p]}")
        return any(pipe.execute())


def dispatch_many(connection: Redis, settings: Settings, notifications: list[Notification],
                  also: Callable[[Pipeline], None] | None = None,
                  request_ids: dict[str, str | None] | None = None) -> bool:
    """dispatch() for many (enqueue_stored): False when Redis is away, said by not_queued (the
    reconciler hands them over later)."""
    try:
        enqueue_stored(connection, settings, notifications, also, request_ids)
    except RedisError as exc:
        not_queued(notifications, exc)
        return False
    return True


def enqueue_stored(connection: Redis, settings: Settings, notifications: list[Notification],
                   also: Callable[[Pipeline], None] | None = None,
                   request_ids: dict[str, str | None] | None = None) -> None:
    """Every delivery job of these stored notifications goes to Redis in one pipeline, with whatever
    `also` adds to it (the acceptance counts). Notifications that share a job_id (see share_jobs) go in
    one job; the others get one each. request_ids: the request each notification came from, by id, when
    not the one being served (traced_members). Raises RedisError: see not_queued."""
    by_queue: dict[str, list] = {}
    shared: dict[str, list[Notification]] = {}
    scheduled = []
    served = traced()

    def meta(members: list[Notification]) -> dict:
        return served if request_ids is None else traced_members({n.id: request_ids.get(n.id) for n in members})

    for n in notifications:
        if n.status == Status.QUEUED and n.job_id:
            shared.setdefault(n.job_id, []).append(n)
        elif n.status in (Status.QUEUED, Status.RETRYING):
            by_queue.setdefault(n.priority, []).append(Queue.prepare_data(
                DELIVER_JOB, (n.id,), job_id=job_id_for(n.id), retry=retry_policy(settings, n.attempts),
                timeout=settings.job_timeout, result_ttl=settings.finished_job_ttl, failure_ttl=failure_ttl(settings),
                meta=meta([n]),
                description=f"deliver notification {n.id}"))
        elif n.status == Status.SCHEDULED:
            scheduled.append(n)
    for job_id, members in shared.items():
        by_queue.setdefault(members[0].priority, []).append(
            _shared_job(settings, job_id, [n.id for n in members], meta=meta(members)))
    # One round trip for the lot; MULTI/EXEC would add nothing, each job being whole on its own.
    with connection.pipeline(transaction=False) as pipe:
        for priority, jobs in by_queue.items():
            queue_for(priority, connection).enqueue_many(jobs, pipeline=pipe)
        if also is not None:
            also(pipe)
        pipe.execute()
    for n in scheduled:
        schedule_release(connection, settings, n.id, n.send_at, n.priority, job_id=release_job_id_of(n))
    if missed := _not_queued.add(0):  # Redis takes jobs again: the last of those it did not, said
        logger.warning("%s notifications stored but not queued since the last such line; Redis takes jobs again, "
                       "and the reconciler queues them", missed)


def not_queued(notifications: list[Notification], exc: RedisError) -> None:
    """Say that Redis refused, or did not answer, the jobs of these stored notifications: at most once
    per NOT_QUEUED_LOG_SECONDS in a process, with how many since the line before."""
    due = _not_queued.add(len(notifications))
    if not due:
        return
    if due == len(notifications):  # none folded in from before
        what = f"notification {notifications[0].id}" if due == 1 else f"{due} notifications"
        logger.warning("%s stored but not queued: %s", what, type(exc).__name__)
    else:
        latest = f", the latest notification {notifications[-1].id}" if notifications else ""
        logger.warning("%s notifications stored but not queued since the last such line (this process says so "
                       "at most every %g s)%s: %s", due, NOT_QUEUED_LOG_SECONDS, latest, type(exc).__name__)
