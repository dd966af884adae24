"""The baselines our figures are ratios of, measured in the same run on the same machine:
raw SMTP sends over reused connections, raw RQ no-op jobs, and a bare Flask JSON endpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from redis import Redis
from rq import Queue, Retry

from bench.load import summarize_ms
from bench.noop import STAMPS_KEY
from bench.procs import ROOT, CpuMeter, Procs, children
from bench.stack import Gunicorn, Options, Sink, rss_mb, wait_workers
from notifier.config import Settings
from notifier.queues import failure_ttl

# The same shape as notifier's queues: the no-op jobs go on the second, as literal sends do.
RAW_QUEUES = ("bench.high", "bench.default", "bench.low", "bench.callbacks")
# What the product's jobs get with the default settings (the bench runs the product on them).
FINISHED_JOB_TTL = Settings().finished_job_ttl
FAILURE_TTL = failure_ttl(Settings())


def run_load(opts: Options, port: int, path: str, *, timeout: float | None = None, **options) -> dict:
    """Run bench.load as its own process and return its JSON result."""
    argv = load_argv(opts, port, path, **options)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout or (opts.duration * 3 + 300))
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def load_argv(opts: Options, port: int, path: str, **options) -> list[str]:
    argv = [sys.executable, "-m", "bench.load", "--port", str(port), "--path", path]
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def raw_smtp(opts: Options, procs: Procs, sink: Sink) -> dict:
    """--rq-workers processes, each sending its share of --backlog messages over one connection."""
    clients = opts.rq_workers
    share = [opts.backlog // clients + (1 if i < opts.backlog % clients else 0) for i in range(clients)]
    start_at = time.time() + 2.0  # every client connected and waiting by then
    meter = CpuMeter({"sink": lambda: [sink.proc.pid]})
    running, first = [], 0
    for count in share:
        argv = [sys.executable, "-m", "bench.smtp_client", "--port", str(sink.port), "--first", str(first),
                "--count", str(count), "--start-at", repr(start_at)]
        running.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True))
        first += count
    time.sleep(max(0.0, start_at - time.time()))
    meter.start()  # the clients' start-up is not theirs to count
    outs = []
    for proc in running:
        out, _ = proc.communicate(timeout=600)
        outs.append(json.loads(out))
    accepted = sum(o["accepted"] for o in outs)
    cpu = meter.per_item(accepted)
    elapsed = max(o["finished"] for o in outs) - start_at
    per_message = [(o["finished"] - o["started"]) / max(1, o["accepted"]) for o in outs]
    return {
        "connections": clients,
        "messages": opts.backlog,
        "accepted": accepted,
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(accepted / elapsed, 1),
        "seconds_per_message": sum(per_message) / len(per_message),
        "cpu_ms": cpu,  # per message; "other" is the smtplib clients
    }


def _noop_jobs(count: int, prefix: str) -> list:
    # The options notifier's dispatch gives a delivery job (RETRY_INTERVALS=1,1 here).
    return [Queue.prepare_data("bench.noop.noop", (f"{prefix}-{i}",), job_id=f"{prefix}-{i}",
                               retry=Retry(max=2, interval=[1, 1]), timeout=120, result_ttl=FINISHED_JOB_TTL,
                               failure_ttl=FAILURE_TTL, description=f"no-op {prefix}-{i}")
            for i in range(count)]


def raw_rq(opts: Options, procs: Procs, redis: Redis, redis_url: str, env: dict, redis_pid: int) -> dict:
    """No-op jobs through the same worker setup: worker.py's class (a SimpleWorker whose heartbeat
    is one round trip) with the scheduler, --rq-workers of them on four queues; first the rate at
    which they drain --backlog jobs, then how long a job waits from enqueue to start at the latency
    phase's offered rate."""
    rq_cli = [os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "--worker-class",
              "worker.NotifierWorker", "--with-scheduler", "--logging_level", "WARNING", "--url", redis_url]
    workers = [procs.spawn(f"rawrq-{i}", [*rq_cli, "--name", f"rawrq-{i}", *RAW_QUEUES], env, python=False)
               for i in range(opts.rq_workers)]
    try:
        wait_workers(redis, opts.rq_workers)
        time.sleep(0.5)
        idle = rss_mb([w.pid for w in workers])
        queue = Queue("bench.default", connection=redis)
        jobs = _noop_jobs(opts.backlog, "noop")
        with redis.pipeline() as pipe:
            queue.enqueue_many(jobs, pipeline=pipe)
            pipe.execute()
        meter = CpuMeter({"workers": lambda: [p for w in workers for p in (w.pid, *children(w.pid))],
                          "redis": lambda: [redis_pid]}).start()
        started = time.perf_counter()
        finished = queue.finished_job_registry
        last, last_change = 0, time.monotonic()
        while (done := finished.get_job_count(cleanup=False)) < opts.backlog:
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > 60:
                raise RuntimeError(f"raw RQ: stuck at {done} of {opts.backlog} jobs")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        cpu = meter.per_item(opts.backlog)
        after = rss_mb([w.pid for w in workers])
        pickup = _pickup_latency(opts, redis)
        failed = queue.failed_job_registry.get_job_count(cleanup=False)
    finally:
        for worker in workers:
            procs.stop(worker)
    return {
        "workers": opts.rq_workers,
        "jobs": opts.backlog,
        "failed": failed,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(opts.backlog / elapsed, 1),
        "pickup_ms": pickup,
        "cpu_ms": cpu,  # per job
        "rss_idle_mb": idle,
        "rss_after_mb": after,
    }


def _pickup_latency(opts: Options, redis: Redis) -> dict:
    """Enqueue-to-start of a job at the latency phase's rate, on idle workers."""
    queue = Queue("bench.default", connection=redis)
    total = int(opts.latency_rate * min(opts.duration, 10))
    start = time.perf_counter()
    for i in range(total):
        delay = start + i / opts.latency_rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        queue.enqueue("bench.noop.stamp", time.time(), job_id=f"stamp-{i}", result_ttl=FINISHED_JOB_TTL,
                      job_timeout=120)
    deadline = time.monotonic() + 60
    while redis.llen(STAMPS_KEY) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    stamps = [float(v) for v in redis.lrange(STAMPS_KEY, 0, -1)]
    return {"jobs": len(stamps), **summarize_ms(stamps)}


def bare_flask(opts: Options, procs: Procs, env: dict) -> dict:
    """The bare Flask endpoint under the same gunicorn settings, driven as the API is."""
    server = Gunicorn.start(procs, "bare", "bench.bare:create_app()", opts, env, health_path=None)
    try:
        run_load(opts, server.port, "/bare", kind="bare", concurrency=4, requests=200, tag="warm")
        idle = rss_mb(server.workers)
        meter = CpuMeter({"api": lambda: [server.proc.pid, *server.workers]}).start()
        single = run_load(opts, server.port, "/bare", kind="bare", concurrency=opts.concurrency,
                          duration=opts.duration, tag="bare")
        single["cpu_ms"] = meter.per_item(single["ok"])  # per request; "other" is mostly the load generator
        meter.start()
        batch = run_load(opts, server.port, "/bare/batch", kind="batch", batch_size=opts.batch_size,
                         concurrency=opts.batch_concurrency, requests=math.ceil(opts.batch_backlog / opts.batch_size),
                         total_items=opts.batch_backlog, tag="barebatch")
        batch["cpu_ms"] = meter.per_item(batch["items_accepted"])  # per item
        latency = run_load(opts, server.port, "/bare", kind="bare", mode="open", rate=opts.latency_rate,
                           duration=min(opts.duration, 10), tag="barelat")
        after = rss_mb(server.workers)
    finally:
        procs.stop(server.proc)
    return {"single": single, "batch": batch, "latency": latency, "rss_idle_mb": idle, "rss_after_mb": after,
            "worker_class": opts.worker_class, "api_workers": opts.api_workers}


def latency_baseline(bare: dict | None, rq: dict | None, smtp: dict | None) -> dict | None:
    """What a request-to-SMTP latency cannot go below: the bare HTTP round trip at the same rate, plus
    RQ's enqueue-to-start, plus one SMTP send on a warm connection."""
    if not (bare and rq and smtp):
        return None
    send_ms = smtp["seconds_per_message"] * 1000
    out = {}
    for name in ("p50", "p95", "p99"):
        http, pickup = bare["latency"]["latency_ms"][name], rq["pickup_ms"][name]
        if http is None or pickup is None:
            return None
        out[name] = round(http + pickup + send_ms, 2)
    return out

