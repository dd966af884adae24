"""`python -m bench.instructions`: what one delivery job costs a worker, counted in instructions.

The main bench times CPU, which on this machine moves by tens of percent from one run to the next;
valgrind's callgrind counts the instructions a worker process executes, the same on every run
whatever else the machine does. For each kind of job (the baseline's no-op, then one email), one
worker.NotifierWorker runs under callgrind with counting off while it starts and takes a few jobs
to warm up; counting is switched on for --jobs more and off again, and the total is divided by them.
PostgreSQL, Redis and the SMTP sink are not counted: the main bench's CPU account has them.

--only MODULE:QUALNAME (repeatable) counts only inside those functions (their callees included), to
see where an email's instructions go: notifier.jobs:Deliverer.deliver is the whole job,
notifier.mail:SmtpMailer.send the writing and sending of the message. It needs gcc and valgrind's
headers, to build the switch the functions flip.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import importlib
import json
import os
import runpy
import subprocess
import sys
import time

from redis import Redis
from rq import Queue, Worker

from bench.baselines import RAW_QUEUES, _noop_jobs
from bench.procs import ROOT, Procs
from bench.stack import Sink, create_key, drop_database, product_env, recreate_database, start_redis

# Each run its own, so that runs can go side by side (counts do not depend on the machine's load).
DATABASE = f"postgresql://postgres@127.0.0.1:5432/notifier_bench_instructions_{os.getpid()}"
WARM_UP_JOBS = 10
_SWITCH_C = "#include <valgrind/callgrind.h>\nvoid toggle(void) { CALLGRIND_TOGGLE_COLLECT; }\n"


def _build_switch(run_dir: str) -> str:
    source, library = os.path.join(run_dir, "switch.c"), os.path.join(run_dir, "switch.so")
    with open(source, "w") as fh:
        fh.write(_SWITCH_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    return library


def launch(switch: str, targets: list[str], argv: list[str]) -> None:
    """Inside the worker process: wrap each target so that counting is on only inside it, then run argv
    (a script, or the `rq` command)."""
    lib = ctypes.CDLL(switch)
    for target in targets:
        module, qualname = target.split(":")
        owner = importlib.import_module(module)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, _counted(lib, getattr(owner, name)))
    sys.argv = argv
    if os.path.basename(argv[0]) == "rq":
        from rq.cli import main

        sys.exit(main())
    runpy.run_path(argv[0], run_name="__main__")


_depth = [0]  # how many counted functions are running: one inside another is counted once


def _counted(lib, function):
    @functools.wraps(function)
    def counted(*args, **kwargs):
        if not _depth[0]:
            lib.toggle()
        _depth[0] += 1
        try:
            return function(*args, **kwargs)
        finally:
            _depth[0] -= 1
            if not _depth[0]:
                lib.toggle()
    return counted


def measure(kind: str, jobs: int, targets: list[str], run_dir: str) -> dict:
    """Instructions per job of one worker taking `jobs` jobs of kind ("noop" or "email")."""
    procs = Procs(log_dir=os.path.join(run_dir, kind))
    os.makedirs(procs.log_dir)
    try:
        _, redis_url = start_redis(procs)
        sink = Sink(procs)
        recreate_database(DATABASE)
        env = product_env(dict(os.environ), DATABASE, redis_url, sink)
        key = create_key(env, "instructions")
        redis = Redis.from_url(redis_url)
        out = os.path.join(procs.log_dir, "callgrind.%p")
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        if targets:
            valgrind += ["--collect-atstart=no", sys.executable, "-m", "bench.instructions", "--launch",
                         _build_switch(procs.log_dir), ",".join(targets)]
        else:
            valgrind += [sys.executable]
        if kind == "email":
            argv = [*valgrind, "worker.py"]
        else:
            argv = [*valgrind, os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "--worker-class",
                    "worker.NotifierWorker", "--with-scheduler", "--logging_level", "WARNING", "--url", redis_url,
                    *RAW_QUEUES]
        worker = procs.spawn("worker", argv, env, python=False)
        deadline = time.monotonic() + 600
        while Worker.count(connection=redis) < 1:
            if worker.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start (see {worker.log_path})")
            time.sleep(0.5)
        send, done = _driver(kind, env, key, redis, sink)
        send(WARM_UP_JOBS, "warm")
        _wait(done, WARM_UP_JOBS)
        subprocess.run(["callgrind_control", "--instr=on", str(worker.pid)], check=True, capture_output=True)
        started = time.monotonic()
        send(jobs, "counted")
        _wait(done, WARM_UP_JOBS + jobs)
        seconds = time.monotonic() - started
        subprocess.run(["callgrind_control", "--dump", str(worker.pid)], check=True, capture_output=True)
        total = _dumped_total(procs.log_dir, worker.pid)
        return {"kind": kind, "jobs": jobs, "instructions": total, "per_job": total / jobs,
                "seconds_under_valgrind": round(seconds, 1)}
    finally:
        procs.close()
        drop_database(DATABASE)


def _driver(kind: str, env: dict, key: str, redis: Redis, sink: Sink):
    """send(count, tag) and done() for a kind of job."""
    if kind == "noop":
        queue = Queue(RAW_QUEUES[1], connection=redis)
        return (lambda count, tag: queue.enqueue_many(_noop_jobs(count, tag)),
                lambda: len(queue.finished_job_registry))
    os.environ.update(env)  # the API's settings, read once by create_app
    from app import create_app

    client = create_app().test_client()

    def send(count: int, tag: str) -> None:
        for i in range(count):
            answer = client.post("/api/notifications/send", headers={"X-API-Key": key},
                                 json={"to": f"{tag}-{i}@bench.example", "template": "verification",
                                       "data": {"code": "123456"}})
            if answer.status_code != 202:
                raise RuntimeError(f"send refused: {answer.status_code} {answer.get_data(as_text=True)}")
    return send, sink.count


def _wait(done, count: int, stall_seconds: float = 300.0) -> None:
    last, moved = -1, time.monotonic()
    while (now := done()) < count:
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_seconds:
            raise RuntimeError(f"stuck at {now} of {count} jobs")
        time.sleep(0.5)


def _dumped_total(log_dir: str, pid: int) -> int:
    # The dump asked for is written as callgrind.PID.1; the totals line sums every event counted.
    for _ in range(100):
        for path in glob.glob(os.path.join(log_dir, f"callgrind.{pid}.*")):
            with open(path, errors="replace") as fh:
                for line in fh:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--launch"]:
        launch(argv[1], [t for t in argv[2].split(",") if t], argv[3:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs counted per kind (about 0.5 s each under valgrind)")
    parser.add_argument("--only", action="append", default=[], metavar="MODULE:QUALNAME",
                        help="count only inside this function of the email job (repeatable)")
    parser.add_argument("--kinds", default=None, help="noop,email (default), or one of them; with --only: email")
    args = parser.parse_args(argv)
    run_dir = os.path.join(ROOT, "var", "bench", time.strftime("instructions-%Y%m%d-%H%M%S-") + str(os.getpid()))
    os.makedirs(run_dir)
    kinds = args.kinds.split(",") if args.kinds else ["email"] if args.only else ["noop", "email"]
    if set(kinds) - {"noop", "email"}:
        parser.error("--kinds takes noop, email or both")
    results = [measure(kind, args.jobs, args.only, run_dir) for kind in kinds]
    for result in results:
        print(f"{result['kind']:>6}: {result['per_job'] / 1e6:6.3f}M instructions per job "
              f"({result['jobs']} jobs, {result['seconds_under_valgrind']} s under valgrind)")
    if len(results) == 2:
        ratio = results[1]["per_job"] / results[0]["per_job"]
        print(f"an email costs the worker {ratio:.2f} times a no-op job's instructions")
    elif args.only:
        print(f"counted only inside: {', '.join(args.only)}")
    with open(os.path.join(run_dir, "results.json"), "w") as fh:
        json.dump({"only": args.only, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
