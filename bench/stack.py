"""The services a benchmark run starts and talks to: a private Redis, the SMTP sink, a fresh
PostgreSQL database, gunicorn (the API or the bare baseline), RQ workers and the scheduler."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psycopg2
from psycopg2.extensions import parse_dsn
from redis import Redis
from rq import Worker

from bench.procs import ROOT, Proc, Procs, children, free_port, rss_kb, wait_port


@dataclass
class Options:
    """What the command line chose (see bench/__main__.py)."""

    duration: float
    api_workers: int
    rq_workers: int
    backlog: int
    concurrency: int
    worker_class: str
    threads: int
    batch_size: int
    batch_concurrency: int
    latency_rate: float
    priority_rate: float
    database: str
    phases: list[str]
    run_dir: str
    py_spy: bool = False
    batch_backlog: int = 0  # notifications sent through the batch route, then drained


class Sink:
    """The SMTP sink process and its control port."""

    def __init__(self, procs: Procs):
        self.port, self.control_port = free_port(), free_port()
        self.proc = procs.spawn("sink", ["-m", "bench.sink", "--port", str(self.port),
                                         "--control-port", str(self.control_port)])
        wait_port(self.control_port, self.proc.popen)
        wait_port(self.port, self.proc.popen)
        self._conn = socket.create_connection(("127.0.0.1", self.control_port))
        self._file = self._conn.makefile("rb")

    def _ask(self, command: str) -> bytes:
        self._conn.sendall(command.encode() + b"\n")
        return self._file.readline()

    def count(self) -> int:
        """Messages received so far."""
        return int(self._ask("count"))

    def dump(self) -> dict:
        """{"total", "counts": {id: n}, "first": {id: unix time of first arrival}}."""
        return json.loads(self._ask("dump"))


def start_redis(procs: Procs) -> tuple[Proc, str]:
    """A private redis-server on a free port, without persistence; never the machine's own Redis."""
    port = free_port()
    proc = procs.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", procs.log_dir, "--loglevel", "warning",
                                 "--maxclients", "2000"], python=False)
    wait_port(port, proc.popen)
    return proc, f"redis://127.0.0.1:{port}/0"


def recreate_database(url: str) -> None:
    """Drop and create the database named in url (connecting to the server's `postgres` database)."""
    _administer(url, create=True)


def drop_database(url: str) -> None:
    """Drop the database named in url, if it is there."""
    _administer(url, create=False)


def _administer(url: str, create: bool) -> None:
    params = parse_dsn(url)  # as the product reads it (libpq's reading)
    name = params.get("dbname", "")
    if not name or not name.replace("_", "").isalnum():
        raise SystemExit(f"bench: refusing database name {name!r}: letters, digits and _ only")
    admin = psycopg2.connect(**{"user": "postgres", **params, "dbname": "postgres"})
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            cur.execute(f'CREATE DATABASE "{name}"')
    admin.close()


def product_env(base: dict, database_url: str, redis_url: str, sink: Sink) -> dict:
    """The settings every product process gets, as an operator would set them."""
    env = dict(base)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(sink.port),
        SMTP_SECURITY="none",
        MAIL_FROM="notifier@bench.example",
        LOG_LEVEL="WARNING",
        # Far above anything this machine can offer, so the limiter counts but never refuses.
        RATE_LIMIT="1000000/second",
        RECIPIENT_CAP="",
        RETRY_INTERVALS="1,1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=ROOT,
    )
    return env


@dataclass
class Gunicorn:
    """A gunicorn master serving app_spec, and its workers."""

    proc: Proc
    port: int
    workers: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, procs: Procs, name: str, app_spec: str, opts: Options, env: dict,
              health_path: str | None) -> Gunicorn:
        port = free_port()
        args = ["-m", "gunicorn", app_spec, "--workers", str(opts.api_workers), "--worker-class", opts.worker_class,
                "--bind", f"127.0.0.1:{port}", "--control-socket", os.path.join(opts.run_dir, f"{name}.ctl")]
        if opts.worker_class == "gthread":
            args += ["--threads", str(opts.threads)]
        proc = procs.spawn(name, args, env)
        wait_port(port, proc.popen, timeout=60)
        if health_path:
            _wait_http(port, health_path)
        deadline = time.monotonic() + 30
        while len(workers := children(proc.pid)) < opts.api_workers and time.monotonic() < deadline:
            time.sleep(0.1)
        return cls(proc, port, workers)


def _wait_http(port: int, path: str, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"http://127.0.0.1:{port}{path} did not answer within {timeout}s")


def wait_workers(redis: Redis, count: int, timeout: float = 60.0) -> None:
    """Block until count RQ workers have registered in redis."""
    deadline = time.monotonic() + timeout
    while Worker.count(connection=redis) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {Worker.count(connection=redis)} of {count} RQ workers registered")
        time.sleep(0.1)


def create_key(env: dict, name: str) -> str:
    """`python -m notifier keys create NAME`; the plaintext key is its last line."""
    done = subprocess.run([sys.executable, "-m", "notifier", "keys", "create", name], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"keys create failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def rss_mb(pids: list[int]) -> dict[str, float]:
    """RSS in MB by pid, of each pid still alive."""
    return {str(pid): round(kb / 1024, 1) for pid in pids if (kb := rss_kb(pid)) is not None}
