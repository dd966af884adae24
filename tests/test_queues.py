"""Every kind of job notifier puts in Redis carries the retention settings (Redis memory is rate x TTL)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import pytest
from rq.job import Job

from notifier import queues
from notifier.models import Notification, Status, utcnow
from tests.conftest import REDIS_URL


def _job(redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis)


def test_every_job_keeps_finished_and_failed_for_the_settings(sqlite_settings, fake_redis):
    settings = replace(sqlite_settings, finished_job_ttl=7, dead_letter_ttl_days=3)
    alone = Notification(id="n-alone", priority="default", status=Status.QUEUED.value, attempts=0)
    shared = [Notification(id=f"n-shared-{n}", priority="low", status=Status.QUEUED.value, attempts=0, job_id="s-1")
              for n in range(2)]
    queues.enqueue_delivery(fake_redis, settings, "n-retry", "high", attempts_made=1)  # the reconciler's and retries'
    queues.dispatch_many(fake_redis, settings, [alone, *shared])  # the API's: one job each, and a batch's shared one
    queues.enqueue_shared(fake_redis, settings, "s-2", ["n-rest"], "low")  # the rest of a shared job that made way
    queues.enqueue_callback(fake_redis, settings, "n-alone")
    made = [queues.job_id_for("n-retry"), queues.job_id_for("n-alone"), "s-1", "s-2",
            queues.callback_job_id_for("n-alone")]
    assert [(_job(fake_redis, j).result_ttl, _job(fake_redis, j).failure_ttl) for j in made] == [(7, 3 * 86400)] * 5

    # A delayed send's release job (rq-scheduler's), from the moment it is scheduled.
    later = Notification(id="n-later", priority="default", status=Status.SCHEDULED.value, attempts=0,
                         send_at=utcnow() + timedelta(minutes=10))
    queues.dispatch_many(fake_redis, settings, [later])
    release = _job(fake_redis, queues.release_job_id_for("n-later"))
    assert (release.result_ttl, release.failure_ttl) == (7, 3 * 86400)

    # A notification that failed inside a shared job is filed as a dead letter of its own.
    queues.file_failed(fake_redis, settings, Notification(id="n-failed", priority="low", attempts=1), "550 no")
    registry = queues.queue_for("low", fake_redis).failed_job_registry
    expiry = fake_redis.zscore(registry.key, queues.job_id_for("n-failed"))
    assert 3 * 86400 - 60 < expiry - time.time() <= 3 * 86400


@pytest.mark.integration
def test_an_impatient_client_talks_to_the_same_redis_and_gives_up_on_connecting_as_soon(redis_conn):
    # A timeout drops the connection: the next command connects again, and would wait the source
    # client's connect timeout (2 s) where a receipt may take half a second (notifier.receipts).
    quick = queues.impatient(queues.connect_redis(REDIS_URL), 0.5)

    quick.set("notifier:test-impatient", b"1")

    assert redis_conn.get("notifier:test-impatient") == b"1"
    kwargs = quick.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.5, 0.5)
