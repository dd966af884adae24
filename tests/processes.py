"""Real processes for tests: the API (app.py), workers (worker.py) and the CLI, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

from redis import Redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_for(settings, **extra) -> dict:
    """The environment variables that describe settings, as an operator would set them."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        SMTP_HOST=settings.smtp_host,
        SMTP_PORT=str(settings.smtp_port),
        SMTP_SECURITY=settings.smtp_security,
        MAIL_FROM=settings.mail_from,
        RETRY_INTERVALS=",".join(str(i) for i in settings.retry_intervals),
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn(args: list[str], env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the process owns it for its lifetime
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def cli(args: list[str], env: dict) -> str:
    """Run `python -m notifier ...` and return its output."""
    done = subprocess.run([sys.executable, "-m", "notifier", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def request(method: str, url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def wait_reconciler_passes(redis, n: int = 1, timeout: float = 30.0) -> None:
    """Until n passes of the periodic reconciler (scheduler.py's job, run by a worker) have begun and
    ended after this call: what a pass would do to the state as it is now, one has done."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from scheduler import RECONCILE_JOB_ID

    since = datetime.now(UTC)  # RQ's timestamps: UTC, from this machine's clock
    ended: set[datetime] = set()

    def passes() -> bool:
        try:
            job = Job.fetch(RECONCILE_JOB_ID, connection=redis)
        except NoSuchJobError:
            return False
        # One job id for every pass: its started_at is the latest pass's, and ended_at is that pass's
        # end once it is at or after it.
        if job.started_at and job.ended_at and since < job.started_at <= job.ended_at:
            ended.add(job.started_at)
        return len(ended) >= n

    wait_until(passes, timeout=timeout, interval=0.02)


def wait_jobs_settled(redis, timeout: float = 30.0) -> None:
    """Until no RQ job is queued, scheduled or running, but rq-scheduler's periodic ones (which come
    back every interval): whatever the queues held has been done, a send by then at the SMTP server.
    Asked of each job's own status, which reads queued until a worker starts it: a worker on several
    queues takes a job with BLPOP, after which no queue or registry holds it until it starts."""
    from rq_scheduler import Scheduler

    from notifier.queues import LIVE_JOB_STATES

    def settled() -> bool:
        periodic = {f"rq:job:{job.id}".encode() for job in Scheduler(connection=redis).get_jobs()
                    if "interval" in job.meta}
        return not any(redis.hget(key, "status") in LIVE_JOB_STATES for key in redis.scan_iter("rq:job:*")
                       if key not in periodic and redis.type(key) == b"hash")

    wait_until(settled, timeout=timeout, interval=0.05)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Stack:
    """API, worker and scheduler processes on given settings, started and stopped by name."""

    def __init__(self, settings, log_dir, **env_extra):
        self.port = free_port()
        self.env = env_for(settings, PORT=self.port, **env_extra)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.key = cli(["keys", "create", f"stack-{self.port}"], self.env).strip().splitlines()[-1]

    SCRIPTS = {"api": "app.py", "worker": "worker.py", "scheduler": "scheduler.py"}

    def start(self, *names: str) -> Stack:
        for name in names:
            self.procs[name] = spawn([self.SCRIPTS[name.rstrip("0123456789")]], self.env,
                                     str(self.log_dir / f"{name}.log"))
            if name.startswith("api"):
                wait_for_http(f"{self.base}/api/health")
            elif name.startswith("worker"):
                self.wait_worker(self.procs[name])
        return self

    def wait_worker(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """Until the worker has registered with RQ, so a test that sends next does not time its start
        (seconds on a loaded machine) as the send's."""
        redis = Redis.from_url(self.env["REDIS_URL"])
        try:
            wait_until(lambda: proc.poll() is not None
                       or redis.exists(f"rq:worker:notifier-{socket.gethostname()}-{proc.pid}"), timeout=timeout)
        finally:
            redis.close()

    def stop(self, name: str, sig=signal.SIGTERM) -> int:
        return stop(self.procs.pop(name), sig)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def send(self, payload: dict, path: str = "/api/notifications/send") -> str:
        status, body = request("POST", f"{self.base}{path}", self.key, payload)
        assert status == 202, body
        return body["id"]

    def get(self, notification_id: str) -> dict:
        return request("GET", f"{self.base}/api/notifications/{notification_id}", self.key)[1]

    def wait_status(self, notification_id: str, *statuses: str, timeout: float = 30.0) -> dict:
        return wait_until(lambda: (d := self.get(notification_id))["status"] in statuses and d, timeout=timeout,
                          interval=0.05)


def expire_killed_worker(redis, pid: int) -> None:
    """What the TTL on the RQ key of a worker killed outright does later, once the job it was running
    could have ended (the job's timeout plus 60 s: minutes here): the worker no longer counts as alive,
    so the reconciler may recover the notification it was sending."""
    from rq import Worker

    keys = [worker.key for worker in Worker.all(connection=redis) if worker.pid == pid]
    assert keys, f"no RQ worker of pid {pid}"
    redis.delete(*keys)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    """A plain HTTP request as a browser or a mail client sends it: (status, headers, body text)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode("utf-8", "replace")
