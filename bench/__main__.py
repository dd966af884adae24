"""`make bench`: start the real stack as production runs it, drive it, and print one table.

In one run: a private redis-server (never the machine's :6379), the SMTP sink, a fresh PostgreSQL
database; the baselines (raw SMTP over reused connections, raw RQ no-op jobs, a bare Flask endpoint
under the same gunicorn settings); then gunicorn serving the API, --rq-workers `worker.py` processes
and `scheduler.py`, driven by a separate load process on 127.0.0.1. Results also go to
var/bench/latest.json. Every process it started is stopped however it ends, Ctrl-C included.

Phases (--phases picks some): smtp, rq, bare (baselines); latency, priority, queued (single sends
with the workers paused, then their drain), batch, drain, single, memory (the product). Try
`--duration 3 --backlog 500` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

from redis import Redis

from bench import baselines, phases
from bench.procs import ROOT, Procs, cpu_delta, cpu_times
from bench.report import HOW, build_rows, cpu_lines, delivery_line, render
from bench.spy import Spy
from bench.stack import Options, Sink, product_env, recreate_database, start_redis

PHASES = ("smtp", "rq", "bare", "latency", "priority", "queued", "batch", "drain", "single", "memory")
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/notifier_bench"


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds per sustained phase (the issue's floors are for --duration 60)")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn --workers")
    parser.add_argument("--worker-class", choices=("gthread", "sync"), default="gthread",
                        help="gunicorn --worker-class")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn --threads (gthread)")
    parser.add_argument("--rq-workers", type=int, default=2, help="worker.py processes")
    parser.add_argument("--backlog", type=int, default=10000,
                        help="notifications in the drain and priority backlogs; raw RQ jobs; raw SMTP messages")
    parser.add_argument("--batch-backlog", type=int, default=None,
                        help="notifications sent through the batch route, then drained (default: 5 x --backlog, "
                             "so the batch figure is seconds of load, not the start and end of a few requests)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections of the closed-loop phases")
    parser.add_argument("--batch-size", type=int, default=1000, help="notifications per batch request")
    parser.add_argument("--batch-concurrency", type=int, default=4, help="connections sending batches")
    parser.add_argument("--latency-rate", type=float, default=100.0, help="offered req/s of the latency phase")
    parser.add_argument("--priority-rate", type=float, default=20.0, help="high-priority sends/s while low drains")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list, from {','.join(PHASES)}")
    parser.add_argument("--py-spy", action="store_true",
                        help="profile the API workers while they accept and the RQ workers while they drain "
                             "(py-spy record --gil); stacks in the run directory, heaviest frames in the output. "
                             "py-spy's own CPU then shows as 'other' in the CPU account")
    parser.add_argument("--database", default=DEFAULT_DATABASE,
                        help="PostgreSQL URL of a database to DROP and recreate for the run")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases: {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    batch_backlog = 5 * args.backlog if args.batch_backlog is None else args.batch_backlog
    if min(args.api_workers, args.rq_workers, args.backlog, batch_backlog, args.concurrency, args.batch_size) < 1:
        parser.error("workers, backlogs, concurrency and batch size must be at least 1")
    run_dir = os.path.join(ROOT, "var", "bench", time.strftime("run-%Y%m%d-%H%M%S"))
    return Options(duration=args.duration, api_workers=args.api_workers, rq_workers=args.rq_workers,
                   backlog=args.backlog, concurrency=args.concurrency, worker_class=args.worker_class,
                   threads=args.threads, batch_size=args.batch_size, batch_concurrency=args.batch_concurrency,
                   latency_rate=args.latency_rate, priority_rate=args.priority_rate, database=args.database,
                   phases=chosen, run_dir=run_dir, py_spy=args.py_spy, batch_backlog=batch_backlog)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(opts: Options, procs: Procs, results: dict, spy: Spy) -> None:
    """Every chosen phase, in an order that keeps each one's conditions clean."""
    wanted = set(opts.phases)
    say(f"private Redis, SMTP sink, database {opts.database.rsplit('/', 1)[-1]} (dropped and recreated)")
    redis_proc, redis_url = start_redis(procs)
    redis = Redis.from_url(redis_url)
    sink = Sink(procs)
    recreate_database(opts.database)
    env = product_env(procs.env, opts.database, redis_url, sink)

    if "smtp" in wanted:
        say(f"baseline: raw SMTP, {opts.rq_workers} connections, {opts.backlog} messages")
        results["raw_smtp"] = baselines.raw_smtp(opts, procs, sink)
    if "rq" in wanted:
        say(f"baseline: raw RQ, {opts.rq_workers} workers of worker.py's class, {opts.backlog} no-op jobs")
        results["raw_rq"] = baselines.raw_rq(opts, procs, redis, redis_url, env, redis_proc.pid)
    if "bare" in wanted:
        say(f"baseline: bare Flask under gunicorn ({opts.api_workers} x {opts.worker_class})")
        results["bare"] = baselines.bare_flask(opts, procs, env)
    results["latency_baseline"] = baselines.latency_baseline(results.get("bare"), results.get("raw_rq"),
                                                             results.get("raw_smtp"))
    if not wanted & {"latency", "priority", "queued", "batch", "drain", "single", "memory"}:
        return

    redis.flushdb()  # the baselines' jobs and stamps; the product starts on an empty Redis
    say(f"product: gunicorn app ({opts.api_workers} x {opts.worker_class}), {opts.rq_workers} worker.py, "
        "scheduler.py")
    product = phases.Product(opts, procs, env, redis, sink, opts.database, redis_pid=redis_proc.pid, spy=spy)
    product.start()
    results["batch_route"] = product.batch_route
    results["warm_up"] = phases.warm_up(product)
    memory = {"idle": product.memory()}
    if "latency" in wanted:
        say(f"latency: open loop {opts.latency_rate:g} req/s for {opts.duration:g}s")
        results["latency"] = phases.latency(product)
    if "priority" in wanted:
        say(f"priority: {opts.backlog} low queued, high at {opts.priority_rate:g}/s while they drain")
        results["priority"] = phases.priority(product)
    if "queued" in wanted:
        say(f"queued+drain: workers paused, {opts.backlog} single sends ({opts.concurrency} connections), "
            "then timed drain of one job per notification")
        results["queued"] = phases.batch_and_drain(product, False, batch=False)
    if wanted & {"batch", "drain"}:
        how = "batch route" if product.batch_route else "single sends (no batch route)"
        count = opts.batch_backlog if product.batch_route else opts.backlog
        say(f"batch+drain: workers paused, {count} notifications via {how}, then timed drain")
        results["drain"] = phases.batch_and_drain(product, "batch" in wanted)
    if "single" in wanted:
        say(f"single: closed loop, {opts.concurrency} connections, {opts.duration:g}s, workers running")
        results["single"] = phases.single(product)
    say("waiting for every notification to be final")
    started = time.monotonic()
    results["final_statuses"] = product.wait_settled()
    results["final_settle_s"] = round(time.monotonic() - started, 1)
    time.sleep(1.0)
    memory["after"] = product.memory()
    if "memory" in wanted:
        results["memory"] = memory
    results["delivery_check"] = phases.verify(product)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def loop_seconds(n: int = 5_000_000) -> float:
    """Seconds one interpreter takes for n additions: the machine's speed for Python today, since a
    virtual machine can run slower without reporting steal."""
    started = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - started


def cpu_share(start: list[int] | None, end: list[int] | None) -> dict | None:
    """Busy and stolen shares of all CPU time between two cpu_times(): on a virtual machine, steal is
    time the hypervisor gave to someone else, so a run with much of it measured a slower machine."""
    ticks = cpu_delta(start, end)
    if ticks is None or ticks[0] <= 0:
        return None
    total, busy, stolen = ticks
    return {"busy_pct": 100.0 * busy / total, "steal_pct": 100.0 * stolen / total}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Ctrl-C and a plain `kill` both end the run the same way: stop everything, report what was measured.
    # (A shell can start a background job with SIGINT ignored; take it back.)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    os.makedirs(opts.run_dir, exist_ok=True)
    results: dict = {"options": vars(opts), "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    procs = Procs(log_dir=opts.run_dir)
    spy = Spy(opts.run_dir, opts.py_spy)
    results["loop_seconds"] = loop_seconds()
    cpu_start = cpu_times()
    failed = None
    try:
        run(opts, procs, results, spy)
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as exc:  # noqa: BLE001 - report what was measured so far, then the error
        failed = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        say("stopping every process this run started")
        procs.close()
    results["load_average_end"] = os.getloadavg()
    results["cpu"] = cpu_share(cpu_start, cpu_times())
    results["error"] = failed
    results["py_spy"] = spy.report()
    rows = build_rows(results, opts)
    results["table"] = [row.as_dict() for row in rows]
    for path in (os.path.join(opts.run_dir, "results.json"), os.path.join(ROOT, "var", "bench", "latest.json")):
        with open(path, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    load1 = (results["load_average_start"][0], results["load_average_end"][0])
    print(f"notifier benchmark: {opts.api_workers} x gunicorn {opts.worker_class}"
          f"{f' ({opts.threads} threads)' if opts.worker_class == 'gthread' else ''}, {opts.rq_workers} RQ workers, "
          f"{opts.duration:g}s phases, backlog {opts.backlog}; {results['cpus']} CPUs, "
          f"load average {load1[0]:.2f} at start, {load1[1]:.2f} at end"
          + (f"; CPU over the run {results['cpu']['busy_pct']:.0f}% busy, {results['cpu']['steal_pct']:.1f}% stolen "
             "by the hypervisor" if results["cpu"] else "")
          + f"; 5M Python additions took {results['loop_seconds']:.2f} s")
    print(render(rows))
    print(delivery_line(results.get("delivery_check")))
    if where := cpu_lines(results):
        print(where)
    if results["py_spy"]:
        print(results["py_spy"])
    print(HOW)
    if failed:
        print(f"run did not finish: {failed} (logs in {os.path.relpath(opts.run_dir, ROOT)})")
    print(f"results: var/bench/latest.json; logs: {os.path.relpath(opts.run_dir, ROOT)}")
    return 1 if failed or not (results.get("delivery_check") or {}).get("ok", True) else 0


if __name__ == "__main__":
    sys.exit(main())
