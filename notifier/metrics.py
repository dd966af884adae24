"""Delivery metrics kept in Redis, so every API and worker process counts into the same numbers.

A Prometheus client counter lives in one process, and notifier has several: gunicorn workers accept,
RQ workers send. So each event is written where it is observed, as one pipelined round trip of
HINCRBY on a hash per metric (the field is the JSON list of its label values), and /metrics reads
the hashes back at scrape time through a prometheus_client collector, with the queue depths and the
dead letters read then too. A metric that cannot be written is dropped and logged at debug: counting
must never get in the way of sending.
"""

from __future__ import annotations

import json
import logging
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from notifier.errors import STOPPING
from notifier.models import Notification, Priority, utcnow
from notifier.queues import QUEUES_BY_PRIORITY
from notifier.resilience import refuses_writes

logger = logging.getLogger(__name__)

KEY_PREFIX = "notifier:metrics:"
NOTIFICATION_LABELS = ("priority", "template")
LITERAL_TEMPLATE = "-"  # the template label of a send with its own subject and body
# Seconds from acceptance to the SMTP server taking the message: a quick send is well under a second,
# a retried one takes the retry intervals (minutes to an hour).
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
REPLY_CLASSES = ("2xx", "4xx", "5xx", "none")

COUNTERS = {
    "notifier_notifications_accepted_total": "Notifications the API accepted and stored (replays excluded).",
    "notifier_notifications_sent_total": "Notifications the SMTP server accepted, once each, as recorded sent.",
    "notifier_notifications_failed_total": "Notifications that failed for good (permanent error or last retry).",
    "notifier_notifications_retried_total": "Delivery attempts that failed transiently and will be retried.",
    "notifier_notifications_expired_total": ("Notifications that reached their deadline unsent, found by a worker or "
                                             "the reconciler (never sent late)."),
}
DELIVERY_SECONDS = "notifier_delivery_seconds"
SMTP_REPLIES = "notifier_smtp_replies_total"
RECONCILED = "notifier_reconciler_actions_total"
# What a reconciler pass can do (notifier.reconciler.Report's fields), each shown even at zero.
RECONCILER_ACTIONS = ("expired", "released", "rescheduled", "recovered", "recorded_late", "requeued", "callbacks",
                      "keys_forgotten")
CALLBACKS = "notifier_callbacks_total"
# How a status callback's attempt ended (notifier.callback_job), each shown even at zero.
CALLBACK_OUTCOMES = ("delivered", "retried", "gave_up")
PURGED = "notifier_notifications_purged_total"


def _key(metric: str, part: str = "") -> str:
    return f"{KEY_PREFIX}{metric}{':' + part if part else ''}"


def _field(*labels: str) -> str:
    return json.dumps(labels, separators=(",", ":"))


def _labels(notification: Notification) -> str:
    return _field(notification.priority or Priority.DEFAULT.value, notification.template or LITERAL_TEMPLATE)


def reply_class(smtp_code: int | None) -> str:
    """The class of an SMTP reply code: 2xx, 4xx, 5xx, or none when no reply came."""
    if smtp_code is not None and smtp_code // 100 in (2, 4, 5):
        return f"{smtp_code // 100}xx"
    return "none"


class Deferred:
    """Writes kept to be sent together in one round trip: a worker's counts (and the sent receipts
    it no longer needs, notifier.receipts), with its next heartbeat; a shared job's, at its end."""

    def __init__(self, redis: Redis | None):
        self.redis = redis
        self._builds: list[Callable] = []

    def add(self, build: Callable) -> None:
        self._builds.append(build)

    def apply(self, pipe) -> None:
        """Add the kept counts to someone else's pipeline (one round trip for both)."""
        builds, self._builds = self._builds, []
        for build in builds:
            build(pipe)

    def flush(self) -> None:
        builds, self._builds = self._builds, []
        if builds:
            _write(self.redis, lambda pipe: [build(pipe) for build in builds])


def _write(redis: Redis | Deferred | None, build: Callable) -> None:
    """One pipelined round trip; a failure is logged and dropped, never raised."""
    if isinstance(redis, Deferred):
        redis.add(build)
        return
    if redis is None:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        build(pipe)
        pipe.execute()
    except RedisError as exc:
        logger.debug("metrics not recorded: %s", type(exc).__name__)
    except STOPPING:
        raise  # RQ's time limit or stop, landing here: swallowed, the job would run on without one
    except Exception:  # noqa: BLE001 - a bug in counting must not fail a delivery either
        logger.warning("metrics not recorded", exc_info=True)


class Acceptances:
    """An API process's counts of the notifications it stored, on their way to Redis with the jobs of each
    hand-over (one round trip). Those Redis refused are kept, to go with the next hand-over it takes: out
    of memory (noeviction), read-only or MISCONF, it refuses every write, so none of them was counted.
    They were dropped, and the metric fell short of what was accepted by all a Redis outage's sends. Those
    whose answer never came (Redis unreachable or silent) are still dropped: each may have been counted
    (redis-py sends a pipeline again after a dropped connection), and a count kept would then count twice.
    What is kept lives in the process: one that stops before Redis takes writes again loses it."""

    def __init__(self):
        self._lock = threading.Lock()  # the API's threads share one
        self._refused: Counter[str] = Counter()

    def take(self, notifications: list[Notification]) -> Counter[str]:
        """The counts to write now: these notifications', and those Redis refused before (kept no more)."""
        with self._lock:
            counts, self._refused = self._refused, Counter()
        counts.update(_labels(n) for n in notifications)
        return counts

    def not_written(self, counts: Counter[str], exc: RedisError) -> None:
        """counts went with a write that failed with exc: keep them if Redis refused it (see the class)."""
        if refuses_writes(exc):
            with self._lock:
                self._refused.update(counts)


def write_accepted(pipe, counts: Counter[str]) -> None:
    """Add to pipe the counts of notifications the API stored (Acceptances.take)."""
    for labels, count in counts.items():
        pipe.hincrby(_key("notifier_notifications_accepted_total"), labels, count)


def sent(redis: Redis | Deferred | None, notification: Notification, smtp_code: int | None,
         at: datetime | None = None) -> None:
    """Count a notification the SMTP server took (at: when, if not now), with its latency since
    acceptance and the reply."""
    seconds = max(0.0, ((at or utcnow()) - notification.created_at).total_seconds())
    index = bisect_left(DELIVERY_BUCKETS, seconds)
    bound = floatToGoString(DELIVERY_BUCKETS[index]) if index < len(DELIVERY_BUCKETS) else "+Inf"
    priority = notification.priority or Priority.DEFAULT.value

    def build(pipe):
        pipe.hincrby(_key("notifier_notifications_sent_total"), _labels(notification), 1)
        # Each observation lands in its own bucket only; the collector makes them cumulative.
        pipe.hincrby(_key(DELIVERY_SECONDS, "buckets"), _field(priority, bound), 1)
        pipe.hincrbyfloat(_key(DELIVERY_SECONDS, "sum"), _field(priority), seconds)
        pipe.hincrby(_key(SMTP_REPLIES), _field(reply_class(smtp_code)), 1)

    _write(redis, build)


def replied(redis: Redis | Deferred | None, smtp_code: int | None) -> None:
    """Count only the reply to an attempt: one whose notification another process recorded meanwhile."""
    _write(redis, lambda pipe: pipe.hincrby(_key(SMTP_REPLIES), _field(reply_class(smtp_code)), 1))


def attempt_failed(redis: Redis | Deferred | None, notification: Notification, smtp_code: int | None, *,
                   final: bool) -> None:
    """Count a failed attempt: failed for good when final, otherwise retried; and the reply it got."""
    metric = "notifier_notifications_failed_total" if final else "notifier_notifications_retried_total"

    def build(pipe):
        pipe.hincrby(_key(metric), _labels(notification), 1)
        pipe.hincrby(_key(SMTP_REPLIES), _field(reply_class(smtp_code)), 1)

    _write(redis, build)


def expired(redis: Redis | Deferred | None, notification: Notification) -> None:
    """Count a notification that reached its deadline unsent."""
    _write(redis, lambda p: p.hincrby(_key("notifier_notifications_expired_total"), _labels(notification), 1))


def reconciled(redis: Redis | None, actions: dict[str, int]) -> None:
    """Count what a reconciler pass did, by action; `recovered` is the one that may send twice."""
    done = {action: count for action, count in actions.items() if count}
    if done:
        _write(redis, lambda pipe: [pipe.hincrby(_key(RECONCILED), _field(a), n) for a, n in done.items()])


def callback(redis: Redis | Deferred | None, outcome: str) -> None:
    """Count how a status callback's attempt ended: one of CALLBACK_OUTCOMES."""
    _write(redis, lambda p: p.hincrby(_key(CALLBACKS), _field(outcome), 1))


def purged(redis: Redis | Deferred | None, count: int) -> None:
    """Count notifications retention deleted (notifier.retention)."""
    if count:
        _write(redis, lambda p: p.hincrby(_key(PURGED), _field(), count))


class RedisCollector:
    """A prometheus_client collector reading every process's counts from Redis at scrape time.

    Register it on a fresh CollectorRegistry(auto_describe=False) per scrape. A Redis error
    propagates (the scrape fails); a dead_letters callable that fails only leaves that gauge out."""

    def __init__(self, redis: Redis, dead_letters: Callable[[], int] | None = None):
        self.redis = redis
        self.dead_letters = dead_letters

    def collect(self) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        for name in COUNTERS:
            pipe.hgetall(_key(name))
        pipe.hgetall(_key(DELIVERY_SECONDS, "buckets"))
        pipe.hgetall(_key(DELIVERY_SECONDS, "sum"))
        pipe.hgetall(_key(SMTP_REPLIES))
        pipe.hgetall(_key(RECONCILED))
        pipe.hgetall(_key(CALLBACKS))
        pipe.hgetall(_key(PURGED))
        for name in QUEUES_BY_PRIORITY:
            pipe.llen(Queue(name, connection=self.redis).key)
        results = iter(pipe.execute())

        for name, documentation in COUNTERS.items():
            family = CounterMetricFamily(name, documentation, labels=NOTIFICATION_LABELS)
            for labels, value in sorted(_decode(next(results), len(NOTIFICATION_LABELS)).items()):
                family.add_metric(labels, value)
            yield family

        yield _histogram(_decode(next(results), 2), _decode(next(results), 1))

        yield _one_label(SMTP_REPLIES, "SMTP replies to delivery attempts by class; none: no reply (connection "
                         "refused, dropped or timed out, or a template error).", "class", next(results), REPLY_CLASSES)
        yield _one_label(RECONCILED, "What reconciler passes did, by action. recovered: notifications whose worker "
                         "was lost mid-send (retried, so possibly sent twice, or failed); recorded_late: notifications "
                         "recorded sent from the receipt their worker kept in Redis (the database was away, or the "
                         "worker was killed before its record).",
                         "action", next(results), RECONCILER_ACTIONS)
        yield _one_label(CALLBACKS, "Status callback attempts by how they ended. retried: failed, to be tried again; "
                         "gave_up: refused (4xx, a redirect) or out of retries.", "outcome", next(results),
                         CALLBACK_OUTCOMES)
        yield CounterMetricFamily(PURGED, "Notifications deleted with their history once RETENTION_DAYS had passed "
                                  "since they ended.", value=sum(_decode(next(results), 0).values()))

        family = GaugeMetricFamily("notifier_queue_depth", "Jobs waiting in each RQ queue.", labels=("queue",))
        for name in QUEUES_BY_PRIORITY:
            family.add_metric((name,), next(results))
        yield family

        if self.dead_letters is not None:
            try:
                count = self.dead_letters()
            except Exception as exc:  # noqa: BLE001 - the other metrics are still worth scraping
                logger.warning("dead letters not counted: %s", type(exc).__name__)
            else:
                yield GaugeMetricFamily("notifier_dead_letters", "Notifications with status failed in the database "
                                        "(the dead-letter queue; requeueing one removes it).", value=count)


def _one_label(name: str, documentation: str, label: str, raw: dict, known: tuple[str, ...]) -> CounterMetricFamily:
    """A counter by one label: each known value, even at zero, then any other a notifier version wrote."""
    counts = {labels[0]: value for labels, value in _decode(raw, 1).items()}
    family = CounterMetricFamily(name, documentation, labels=(label,))
    for key in (*known, *sorted(set(counts) - set(known))):
        family.add_metric((key,), counts.get(key, 0))
    return family


def _decode(raw: dict, arity: int) -> dict[tuple[str, ...], float]:
    """The hash's fields as tuples of arity labels; a field no notifier version writes (hand-made,
    corrupt) is left out, so one odd key cannot fail the whole scrape with a 500."""
    decoded = {}
    for field, value in raw.items():
        try:
            labels = json.loads(field)
            if not (isinstance(labels, list) and len(labels) == arity and all(isinstance(x, str) for x in labels)):
                raise ValueError(field)
            decoded[tuple(labels)] = float(value)
        except ValueError:
            logger.warning("metrics: field %r not understood; left out", field)
    return decoded


def _histogram(buckets: dict[tuple[str, ...], float], sums: dict[tuple[str, ...], float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(DELIVERY_SECONDS, "Seconds from acceptance (created_at) to the SMTP server "
                                   "accepting the message.", labels=("priority",))
    priorities = [p.value for p in Priority]
    priorities += sorted({labels[0] for labels in buckets} - set(priorities))
    for priority in priorities:
        counts = {bound: value for (p, bound), value in _bounds(buckets).items() if p == priority}
        cumulative = [(floatToGoString(le), sum(v for bound, v in counts.items() if bound <= le))
                      for le in DELIVERY_BUCKETS]
        cumulative.append(("+Inf", sum(counts.values())))
        family.add_metric((priority,), cumulative, sums.get((priority,), 0.0))
    return family


def _bounds(buckets: dict[tuple[str, ...], float]) -> dict[tuple[str, float], float]:
    """The histogram's (priority, upper bound) counts, leaving out a bound that is not a number."""
    out = {}
    for (priority, bound), value in buckets.items():
        try:
            out[(priority, float(bound))] = value
        except ValueError:
            logger.warning("metrics: bucket bound %r not understood; left out", bound)
    return out
