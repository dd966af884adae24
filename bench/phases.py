"""The product's phases, on the real stack: gunicorn API, RQ workers (worker.py), the scheduler,
PostgreSQL, the private Redis and the SMTP sink."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psycopg2
from redis import Redis
from rq import Queue

from bench.baselines import load_argv, run_load
from bench.load import summarize_ms
from bench.procs import ROOT, CpuMeter, Proc, Procs, children, cpu_seconds, named
from bench.spy import Spy
from bench.stack import Gunicorn, Options, Sink, create_key, rss_mb, wait_workers

FINAL = ("sent", "failed", "expired", "cancelled", "digested", "suppressed")
SEND = "/api/notifications/send"
BATCH = "/api/notifications/batch"


@dataclass
class Product:
    """The running product stack and what a phase needs to drive and watch it."""

    opts: Options
    procs: Procs
    env: dict
    redis: Redis
    sink: Sink
    database_url: str
    key: str = ""
    api: Gunicorn | None = None
    workers: list[Proc] = field(default_factory=list)
    scheduler: Proc | None = None
    batch_route: bool = False
    db: object = None
    redis_pid: int = 0
    spy: Spy = field(default_factory=lambda: Spy("", enabled=False))

    def cpu_meter(self) -> CpuMeter:
        """A meter of where the CPU goes, by part of the stack."""
        # PostgreSQL is every `postgres` process on the machine: nothing else should use it meanwhile.
        return CpuMeter({
            "api": lambda: [self.api.proc.pid, *children(self.api.proc.pid)],
            "workers": lambda: [p for w in self.workers for p in (w.pid, *children(w.pid))],
            "scheduler": lambda: [self.scheduler.pid],
            "postgres": lambda: named("postgres"),
            "redis": lambda: [self.redis_pid],
            "sink": lambda: [self.sink.proc.pid],
        })

    def start(self) -> None:
        self.key = create_key(self.env, "bench")
        self.api = Gunicorn.start(self.procs, "api", "app:create_app()", self.opts, self.env, "/api/health")
        self.workers = [self.procs.spawn(f"worker-{i}", ["worker.py"], self.env) for i in range(self.opts.rq_workers)]
        self.scheduler = self.procs.spawn("scheduler", ["scheduler.py"], self.env)
        wait_workers(self.redis, self.opts.rq_workers)
        self.db = psycopg2.connect(self.database_url)
        self.db.autocommit = True
        self.batch_route = self._has_batch_route()

    def _has_batch_route(self) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{self.api.port}{BATCH}", method="POST",
                                         data=b'{"notifications": []}',
                                         headers={"X-API-Key": self.key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10):
                return True
        except urllib.error.HTTPError as err:
            return err.code not in (404, 405)

    def load(self, path: str = SEND, **options) -> dict:
        return run_load(self.opts, self.api.port, path, key=self.key, **options)

    def pause_workers(self) -> None:
        for worker in self.workers:
            self.procs.pause(worker)

    def resume_workers(self) -> None:
        for worker in self.workers:
            self.procs.resume(worker)

    def statuses(self) -> dict[str, int]:
        with self.db.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM notifications GROUP BY status")
            return dict(cur.fetchall())

    def wait_settled(self, stall_timeout: float = 60.0) -> dict[str, int]:
        """Block until every notification is final; give up when none moves for stall_timeout."""
        last, last_change = None, time.monotonic()
        while True:
            counts = self.statuses()
            pending = sum(n for status, n in counts.items() if status not in FINAL)
            if not pending:
                return counts
            if pending != last:
                last, last_change = pending, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout:
                raise RuntimeError(f"{pending} notifications stuck for {stall_timeout:.0f}s: {counts}")
            time.sleep(0.2)

    def wait_sink(self, expected: int, stall_timeout: float = 60.0) -> None:
        """Block until the sink has received expected messages in all."""
        last, last_change = -1, time.monotonic()
        while (got := self.sink.count()) < expected:
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > stall_timeout:
                raise RuntimeError(f"the sink is stuck at {got} of {expected} messages")
            time.sleep(0.01)

    def memory(self) -> dict:
        """RSS in MB of every process of the stack, by role."""
        worker_children = [c for w in self.workers for c in children(w.pid)]
        return {
            "api_master": rss_mb([self.api.proc.pid]),
            "api_workers": rss_mb(children(self.api.proc.pid)),
            "rq_workers": rss_mb([w.pid for w in self.workers]),
            "rq_worker_schedulers": rss_mb(worker_children),
            "scheduler": rss_mb([self.scheduler.pid]),
        }


def read_ids(path: str) -> list[tuple[str, float]]:
    with open(path) as fh:
        return [(row["id"], row["start"]) for row in map(json.loads, fh)]


def arrival_latencies(ids: list[tuple[str, float]], dump: dict) -> tuple[list[float], int]:
    """Seconds from each request's write to the sink receiving its message; and how many never came."""
    first = dump["first"]
    values = [first[i] - start for i, start in ids if i in first]
    return values, len(ids) - len(values)


def db_latencies(product: Product, ids: list[str]) -> list[float]:
    """sent_at - created_at from PostgreSQL, in seconds, for ids."""
    with product.db.cursor() as cur:
        cur.execute("SELECT EXTRACT(EPOCH FROM (sent_at - created_at)) FROM notifications "
                    "WHERE id = ANY(%s) AND sent_at IS NOT NULL", (ids,))
        return [float(row[0]) for row in cur.fetchall()]


# API CPU that only a batch request costs (one of 1,000 takes 100 ms and more); a few sends, less.
WARM_BATCH_CPU_S = 0.03


def warm_up(product: Product) -> dict:
    """A few sends, and at least one batch in each API worker, so 'idle' means started and warm
    (every route the run uses has run once in every process), not cold. Which process takes a
    connection is the kernel's choice: batch rounds go on until each worker's CPU time shows one."""
    result = product.load(concurrency=4, requests=100, tag="warm")
    if product.batch_route:
        opts = product.opts
        workers, warm, rounds = set(children(product.api.proc.pid)), set(), []
        while len(rounds) < 10 and warm < workers:
            before = {pid: cpu_seconds(pid) or 0.0 for pid in workers}
            rounds.append(product.load(
                BATCH, kind="batch", batch_size=opts.batch_size, requests=opts.api_workers,
                total_items=opts.api_workers * opts.batch_size, concurrency=opts.api_workers, tag="warmb"))
            warm |= {pid for pid in workers if (cpu_seconds(pid) or 0.0) - before[pid] >= WARM_BATCH_CPU_S}
        result = {"single": result, "batch": rounds, "workers_without_a_batch": sorted(workers - warm)}
    product.wait_settled()
    time.sleep(1.0)
    return result


def latency(product: Product) -> dict:
    """Open loop at --latency-rate for --duration, workers running: request written to SMTP accepted."""
    ids_path = os.path.join(product.opts.run_dir, "latency-ids.jsonl")
    load = product.load(mode="open", rate=product.opts.latency_rate, duration=product.opts.duration,
                        tag="lat", ids_out=ids_path)
    product.wait_settled()
    ids = read_ids(ids_path)
    values, missing = arrival_latencies(ids, product.sink.dump())
    return {"load": load, "notifications": len(ids), "missing_at_sink": missing,
            "request_to_smtp_ms": summarize_ms(values),
            "created_to_sent_ms": summarize_ms(db_latencies(product, [i for i, _ in ids]))}


def _create_backlog(product: Product, priority: str, tag: str, count: int,
                    batch: bool = True) -> tuple[dict, list[tuple[str, float]]]:
    """count notifications at priority, through the batch route when there is one (and batch)."""
    opts = product.opts
    ids_path = os.path.join(opts.run_dir, f"{tag}-ids.jsonl")
    if product.batch_route and batch:
        load = product.load(BATCH, kind="batch", batch_size=opts.batch_size, priority=priority,
                            requests=math.ceil(count / opts.batch_size), total_items=count,
                            concurrency=opts.batch_concurrency, tag=tag, ids_out=ids_path)
    else:
        load = product.load(priority=priority, requests=count, concurrency=opts.concurrency, tag=tag,
                            ids_out=ids_path)
    return load, read_ids(ids_path)


def batch_and_drain(product: Product, measure_batch: bool, batch: bool = True) -> dict:
    """Workers paused: --batch-backlog notifications go in through the batch route (the batch
    figure), or, without a batch route or with batch=False, --backlog single sends (one job each);
    then the workers resume and the drain is timed until the sink has every one of them."""
    opts = product.opts
    count = opts.batch_backlog if product.batch_route and batch else opts.backlog
    product.wait_settled()
    before = product.sink.count()
    product.pause_workers()
    meter = product.cpu_meter().start()
    tag, shape = ("drain", "batch") if batch else ("queued", "single")
    try:
        with product.spy.record(f"{shape}-accept-api", children(product.api.proc.pid)):
            load, ids = _create_backlog(product, "default", tag, count, batch=batch)
        load["cpu_ms"] = meter.per_item(len(ids))  # per notification accepted
    finally:
        meter.start()
        resumed = time.time()
        product.resume_workers()
    with product.spy.record(f"{shape}-drain-workers", [w.pid for w in product.workers]):
        product.wait_sink(before + len(ids))
        cpu = meter.per_item(len(ids))  # per email delivered
    dump = product.sink.dump()
    product.wait_settled()
    arrivals = sorted(dump["first"][i] for i, _ in ids if i in dump["first"])
    out = {"created_with": "batch" if product.batch_route and batch else "single sends", "create": load,
           "notifications": len(ids), "received": len(arrivals), "cpu_ms": cpu}
    if arrivals:
        elapsed = arrivals[-1] - resumed
        out.update(elapsed_s=round(elapsed, 3), emails_per_s=round(len(arrivals) / elapsed, 1),
                   steady_emails_per_s=round((len(arrivals) - 1) / max(1e-9, arrivals[-1] - arrivals[0]), 1))
    if measure_batch and not product.batch_route:
        out["batch_skipped"] = "skipped: no batch route"
    return out


def priority(product: Product) -> dict:
    """--backlog low-priority notifications drain while high-priority sends arrive at --priority-rate;
    the figure is how long the high ones take from request to SMTP."""
    opts = product.opts
    product.wait_settled()
    product.pause_workers()
    try:
        create, low_ids = _create_backlog(product, "low", "low", opts.backlog)
    finally:
        product.resume_workers()
    ids_path = os.path.join(opts.run_dir, "high-ids.jsonl")
    argv = load_argv(opts, product.api.port, SEND, key=product.key, mode="open", rate=opts.priority_rate,
                     duration=max(600, opts.duration * 10), priority="high", tag="high", ids_out=ids_path)
    sender = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    low = Queue("notifier.low", connection=product.redis)
    try:
        last, last_change = None, time.monotonic()
        while (waiting := low.count) > 0:
            if waiting != last:
                last, last_change = waiting, time.monotonic()
            elif time.monotonic() - last_change > 60:
                raise RuntimeError(f"the low-priority backlog is stuck at {waiting}")
            if sender.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        if sender.poll() is None:
            sender.send_signal(signal.SIGTERM)
        out, err = sender.communicate(timeout=120)
    if sender.returncode != 0:
        raise RuntimeError(f"high-priority sender failed: {err.strip()[-2000:]}")
    load = json.loads(out)
    product.wait_settled()
    dump = product.sink.dump()
    high_ids = read_ids(ids_path)
    values, missing = arrival_latencies(high_ids, dump)
    low_arrivals = [dump["first"][i] for i, _ in low_ids if i in dump["first"]]
    return {"create": create, "low": len(low_ids), "high": len(high_ids), "high_load": load,
            "missing_at_sink": missing, "high_request_to_smtp_ms": summarize_ms(values),
            "high_created_to_sent_ms": summarize_ms(db_latencies(product, [i for i, _ in high_ids])),
            "low_drain_s": round(max(low_arrivals) - min(low_arrivals), 3) if low_arrivals else None}


def single(product: Product) -> dict:
    """Closed loop on POST /send with --concurrency connections for --duration, workers running."""
    return product.load(concurrency=product.opts.concurrency, duration=product.opts.duration, tag="single")


def verify(product: Product) -> dict:
    """Every notification sent, and the sink got each exactly once (and each raw baseline message too)."""
    with product.db.cursor() as cur:
        cur.execute("SELECT id, status FROM notifications")
        rows = cur.fetchall()
    counts = product.sink.dump()["counts"]
    ids = {i for i, _ in rows}
    not_sent = [i for i, status in rows if status != "sent"]
    missing = [i for i in ids if counts.get(i, 0) == 0]
    duplicated = [i for i in ids if counts.get(i, 0) > 1]
    unknown = [i for i in counts if i not in ids and not i.startswith("raw-")]
    raw_bad = [i for i, n in counts.items() if i.startswith("raw-") and n != 1]
    ok = not (not_sent or missing or duplicated or unknown or raw_bad) and bool(rows)
    return {"notifications": len(rows), "ok": ok, "not_sent": len(not_sent), "missing_at_sink": len(missing),
            "received_more_than_once": len(duplicated), "unknown_at_sink": len(unknown),
            "raw_not_exactly_once": len(raw_bad), "examples": (not_sent + missing + duplicated + unknown)[:5]}

