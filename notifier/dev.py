"""`python -m notifier dev` (what `make run` runs): the whole stack on one machine, on embedded defaults.

Starts a private Redis keeping its data under var/ (unless REDIS_URL is set), an SMTP capture server
keeping mail under var/mail (unless SMTP_HOST is set), then the API, a worker and the scheduler. Ctrl-C
stops them all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

from notifier.runtime import PROJECT_ROOT

VAR = os.path.join(PROJECT_ROOT, "var")
DEV_REDIS_PORT = 6390
DEV_SMTP_PORT = 1025
DEV_KEY_FILE = os.path.join(VAR, "dev-api-key")
DEV_OPERATOR_PASSWORD_FILE = os.path.join(VAR, "operator-password")
DEV_SECRET_KEY_FILE = os.path.join(VAR, "secret-key")


def _answers(port: int) -> bool:
    """Whether something on this machine accepts connections on port."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_port(port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(port):
            return True
        time.sleep(0.1)
    return False


def _ports_taken(env: dict) -> list[str]:
    """A line for each port this run would listen on that something already holds.

    Each start waits for its port to answer, so a Redis, SMTP capture or API left running (by a run
    whose supervisor was killed, or by another checkout) answered in place of the one just started:
    the banner described that old stack, and then "redis exited with 1" stopped everything."""
    wanted = [("the API", int(env.get("PORT", "5000")), "PORT")]
    if "REDIS_URL" not in env:
        wanted.append(("the development Redis", DEV_REDIS_PORT, "REDIS_URL"))
    if "SMTP_HOST" not in env:
        wanted.append(("the SMTP capture", DEV_SMTP_PORT, "SMTP_HOST"))
    return [f"port {port} (for {what}) is already in use: stop what holds it, or set {setting}"
            for what, port, setting in wanted if _answers(port)]


def _ignore_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _interrupt(*_) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: stop everything. The next one is ignored from here: a closed
    terminal sends two (the shell passes its hangup on, and the kernel sends another when the shell
    exits), and a second, raised as the stopping began, cut it short."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt


def _say(*args, **kwargs) -> None:
    """print, for a terminal that may be gone: closed, it answers every write with EIO, which
    raised before anything was stopped and left the whole stack running."""
    with contextlib.suppress(OSError):
        print(*args, **kwargs)


def _dev_key(env: dict) -> str:
    """The development API key: reused from var/ while it still works, otherwise made anew."""
    code = (
        "import sys\n"
        "from notifier import keys\nfrom notifier.db import database\n"
        "from notifier.runtime import load_settings, open_database\n"
        "open_database(load_settings())\n"
        "with database.connection_context():\n"
        "    old = open(sys.argv[1]).read().strip() if len(sys.argv) > 1 else ''\n"
        "    if old and keys.authenticate(old):\n"
        "        print(old)\n"
        "    else:\n"
        "        keys.revoke('dev')\n"
        "        from notifier.models import ApiKey, utcnow\n"
        # Renamed, not deleted: its notifications still name it (a foreign key), and their history
        # stays readable under it.
        "        ApiKey.update(name=f'dev-until-{utcnow():%Y%m%d%H%M%S%f}').where(ApiKey.name == 'dev').execute()\n"
        "        print(keys.create('dev')[1])\n"
    )
    args = [sys.executable, "-c", code] + ([DEV_KEY_FILE] if os.path.exists(DEV_KEY_FILE) else [])
    key = subprocess.run(args, env=env, check=True, capture_output=True, text=True, cwd=PROJECT_ROOT).stdout.strip()
    # Readable by its owner alone, like var/operator-password and var/secret-key: it is a live API key.
    # (O_CREAT's mode only applies to a new file: one an earlier run left readable is narrowed too.)
    with open(os.open(DEV_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(key + "\n")
    return key


def _dev_operator(env: dict) -> str:
    """Operator credentials for /rq and /metrics: the environment's, or `operator` with a password
    generated once into var/operator-password. Returns what the banner shows."""
    if env.get("OPERATOR_USERNAME") or env.get("OPERATOR_PASSWORD"):
        return f"{env.get('OPERATOR_USERNAME', '')} (password from OPERATOR_PASSWORD)"
    password = _kept_secret(DEV_OPERATOR_PASSWORD_FILE, 16)
    env.update(OPERATOR_USERNAME="operator", OPERATOR_PASSWORD=password)
    return f"operator / {password}"


def _kept_secret(path: str, size: int) -> str:
    """A random secret generated once into path (readable by its owner alone), the same every run."""
    secret = ""
    if os.path.exists(path):
        with open(path) as fh:
            secret = fh.read().strip()
    if not secret:
        secret = secrets.token_urlsafe(size)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(secret + "\n")
    return secret


def main() -> int:
    env = dict(os.environ)
    taken = _ports_taken(env)
    if taken:
        print("\n".join(["make run cannot start:", *taken]), file=sys.stderr)
        return 1
    os.makedirs(VAR, exist_ok=True)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("LOG_FORMAT", "text")  # a person is reading this terminal
    procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(name: str, args: list[str]) -> None:
        # Ctrl-C reaches every process of the terminal's group at once; Redis and the SMTP capture
        # get a session of their own, so they outlive the workers that are finishing with them.
        own_session = name in ("redis", "smtp")
        # Closing the terminal sends SIGHUP to its group: the API, worker and scheduler died mid-job
        # at once, and so did this process, before it could stop Redis and the SMTP capture, which
        # went on holding their ports. They ignore it (an ignored signal stays ignored across exec);
        # this process stops them all as for Ctrl-C.
        procs.append((name, subprocess.Popen(args, env=env, cwd=PROJECT_ROOT, start_new_session=own_session,
                                             preexec_fn=None if own_session else _ignore_hangup)))

    # From the first process started, a signal or a failure (the API key's database not answering)
    # stops all it started: Redis and the SMTP capture, with sessions of their own, outlived a
    # supervisor stopped during the start, and held their ports, so the next make run refused to start.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        return _supervise(env, procs, spawn)
    except KeyboardInterrupt:
        _say("\nstopping...", flush=True)
        return _stop(procs, 0)
    except BaseException:
        _stop(procs, 1)
        raise


def _supervise(env: dict, procs: list, spawn) -> int:
    """Start the stack, say how to use it, and watch it until one of its processes exits."""
    if "REDIS_URL" not in env:
        server = shutil.which("redis-server")
        if server is None:
            print(
                "make run needs redis-server on PATH (apt-get install redis-server) or REDIS_URL set", file=sys.stderr
            )
            return 1
        spawn(
            "redis",
            [
                server,
                "--port",
                str(DEV_REDIS_PORT),
                "--bind",
                "127.0.0.1",
                # Its data outlive a stop, in var/appendonlydir: make run stops everything when one
                # process exits, so a worker killed after the SMTP server took an email, before its
                # `sent` record, always meant a restart; an empty Redis had lost the sent receipt, and
                # the email went out again. (Queued jobs and delayed releases resume at once too,
                # instead of a reconciler pass later.)
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                VAR,
                "--loglevel",
                "warning",
            ],
        )
        env["REDIS_URL"] = f"redis://127.0.0.1:{DEV_REDIS_PORT}/0"
        if not _wait_for_port(DEV_REDIS_PORT):
            _say("the development Redis did not start", file=sys.stderr)
            return _stop(procs, 1)
    mail_dir = None
    if "SMTP_HOST" not in env:
        mail_dir = os.path.join(VAR, "mail")
        spawn("smtp", [sys.executable, "-m", "notifier.devmail", "--port", str(DEV_SMTP_PORT), "--dir", mail_dir])
        env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(DEV_SMTP_PORT), SMTP_SECURITY="none")
        _wait_for_port(DEV_SMTP_PORT)

    operator = _dev_operator(env)
    # Unsubscribe links are signed with SECRET_KEY: one of this checkout's own, not the public
    # development secret (which the API warns about), and the same every run so earlier links work.
    env.setdefault("SECRET_KEY", _kept_secret(DEV_SECRET_KEY_FILE, 32))
    key = _dev_key(env)
    port = env.get("PORT", "5000")
    spawn("api", [sys.executable, "app.py"])
    spawn("worker", [sys.executable, "worker.py"])
    spawn("scheduler", [sys.executable, "scheduler.py"])
    if not _wait_for_port(int(port)):
        _say("the API did not start", file=sys.stderr)
        return _stop(procs, 1)

    base = f"http://127.0.0.1:{port}"
    print(
        f"""
notifier is running.
  API:        {base}   (health: {base}/api/health)
  API key:    {key}
  Dashboard:  {base}/rq   (metrics: {base}/metrics)
  Operator:   {operator}
  Mail:       {mail_dir or env["SMTP_HOST"]}{" (each message is a .eml file)" if mail_dir else ""}
  Database:   {env.get("DATABASE_URL", "sqlite:///var/notifier.db")}

Send one:
  curl -s -X POST {base}/api/notifications/send-verification \\
    -H 'X-API-Key: {key}' -H 'Content-Type: application/json' \\
    -d '{{"to": "ada@example.com", "user_id": "u1", "code": "123456", "name": "Ada"}}'

Ctrl-C stops everything.
""",
        flush=True,
    )
    while True:
        for name, proc in procs:
            if proc.poll() is not None:
                _say(f"{name} exited with {proc.returncode}; stopping", file=sys.stderr)
                return _stop(procs, 1)
        time.sleep(0.5)


def _stop(procs, code: int) -> int:
    # A second signal must not cut the stopping short (make, sent SIGTERM with its process group,
    # sends its own to this child too): interrupted here, the Redis and SMTP servers, which have
    # sessions of their own, were left running. Each wait below ends in a kill all the same.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The app processes first (a worker finishes its current send), then the Redis and SMTP server
    # they were using: stopping all at once left workers waiting for a Redis that had gone.
    services = {"redis", "smtp"}
    for group in ([p for n, p in procs if n not in services], [p for n, p in procs if n in services]):
        for proc in group:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in group:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    return code
