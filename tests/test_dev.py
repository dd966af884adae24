"""`make run`'s supervisor (notifier/dev.py), without starting the stack it would start."""

from __future__ import annotations

import fcntl
import glob
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import uuid
from contextlib import suppress
from datetime import datetime

import pytest
from redis import Redis
from redis.exceptions import RedisError

from notifier import dev, receipts
from notifier.runtime import PROJECT_ROOT
from tests.processes import wait_until


@pytest.fixture
def held_port():
    """A port something already listens on, as a Redis or API left running by an earlier run does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if make run starts a process or touches the database."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"make run started {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(dev, "_dev_key", refuse)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_make_run_refuses_an_api_port_already_in_use(held_port, nothing_starts, monkeypatch, capsys):
    # The API it started failed to bind, but the old API answered its port: the banner said
    # "notifier is running" before "api exited with 1; stopping".
    monkeypatch.setenv("PORT", str(held_port))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")

    assert dev.main() == 1
    assert f"port {held_port} (for the API) is already in use" in capsys.readouterr().err


def test_make_run_refuses_when_a_redis_left_running_holds_its_port(held_port, nothing_starts, monkeypatch, capsys):
    # A run whose supervisor was killed leaves its Redis (a session of its own) running: the next
    # run's Redis could not bind, the old one answered in its place, and the whole stack then stopped
    # with "redis exited with 1" and no word of why.
    monkeypatch.setattr(dev, "DEV_REDIS_PORT", held_port)
    monkeypatch.setenv("PORT", str(_free_port()))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")

    assert dev.main() == 1
    err = capsys.readouterr().err
    assert f"port {held_port} (for the development Redis) is already in use" in err
    assert "REDIS_URL" in err


def _supervisor(tmp_path, redis_port: int, smtp_port: int) -> list[str]:
    """The command of a make run whose files (var/) are all under tmp_path, on the ports given."""
    var = tmp_path / "var"
    code = (
        "import sys\nfrom notifier import dev\n"
        f"dev.VAR = {str(var)!r}\ndev.DEV_KEY_FILE = {str(var / 'dev-api-key')!r}\n"
        f"dev.DEV_SECRET_KEY_FILE = {str(var / 'secret-key')!r}\n"
        f"dev.DEV_OPERATOR_PASSWORD_FILE = {str(var / 'operator-password')!r}\n"
        f"dev.DEV_REDIS_PORT = {redis_port}\ndev.DEV_SMTP_PORT = {smtp_port}\n"
        "sys.exit(dev.main())\n"
    )
    return [sys.executable, "-c", code]


def _supervisor_env(tmp_path, api_port: int, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SMTP_HOST", "SECRET_KEY")}
    env.update(PORT=str(api_port), DATABASE_URL=f"sqlite:///{tmp_path}/notifier.db", OPERATOR_USERNAME="operator",
               OPERATOR_PASSWORD="operator-password", PYTHONUNBUFFERED="1")
    env.update(settings)
    return env


@pytest.mark.integration
def test_closing_the_terminal_stops_the_whole_stack(tmp_path):
    # SIGHUP to make run's process group, as a closed terminal sends: the API, worker and scheduler
    # died mid-job, and so did the supervisor, leaving its Redis and SMTP capture (sessions of their
    # own) running on their ports, where the next make run could not start.
    redis_port, smtp_port, api_port = _free_port(), _free_port(), _free_port()
    with open(tmp_path / "dev.log", "wb") as log:
        supervisor = subprocess.Popen(_supervisor(tmp_path, redis_port, smtp_port),
                                      env=_supervisor_env(tmp_path, api_port), cwd=PROJECT_ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"notifier is running" in (tmp_path / "dev.log").read_bytes(), timeout=60)
        os.killpg(supervisor.pid, signal.SIGHUP)
        assert supervisor.wait(timeout=60) == 0, (tmp_path / "dev.log").read_text()
        for port in (redis_port, smtp_port, api_port):
            assert wait_until(lambda port=port: not dev._answers(port), timeout=10), f"port {port} still answers"
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGTERM)
            supervisor.wait(timeout=60)
        _stop_leftovers(redis_port, tmp_path)


@pytest.mark.integration
def test_a_sent_receipt_outlives_a_restart_of_make_run(tmp_path):
    # A worker killed between the SMTP server's 250 and its `sent` record leaves a receipt in Redis,
    # from which the reconciler records the `sent`. But make run stops everything when one of its
    # processes exits, and its Redis, kept in memory alone, started the next run empty: the receipt
    # was gone, the reconciler took the notification for one lost mid-send, and the message went out
    # twice (a load run on the embedded defaults: a worker killed with kill -9, then a restart).
    redis_port, smtp_port, api_port = _free_port(), _free_port(), _free_port()
    receipt = receipts.Receipt(str(uuid.uuid4()), 250, "2.0.0 Ok: queued", "<m@notifier>",
                               datetime(2026, 12, 3, 14, 37))
    try:
        for run in ("first", "second"):
            log_path = tmp_path / f"dev-{run}.log"
            with open(log_path, "wb") as log:
                supervisor = subprocess.Popen(_supervisor(tmp_path, redis_port, smtp_port),
                                              env=_supervisor_env(tmp_path, api_port), cwd=PROJECT_ROOT,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                assert wait_until(lambda path=log_path: b"notifier is running" in path.read_bytes(), timeout=60)
                redis = Redis(port=redis_port)
                if run == "first":
                    assert receipts.keep(redis, receipt)
                else:
                    assert receipts.find(redis, [receipt.notification_id]) == {receipt.notification_id: receipt}
                os.killpg(supervisor.pid, signal.SIGINT)  # Ctrl-C
                assert supervisor.wait(timeout=60) == 0, log_path.read_text()
            finally:
                if supervisor.poll() is None:
                    os.killpg(supervisor.pid, signal.SIGTERM)
                    supervisor.wait(timeout=60)
    finally:
        _stop_leftovers(redis_port, tmp_path)


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.integration
def test_closing_a_real_terminal_stops_the_whole_stack(tmp_path):
    # A closed terminal answers every write with EIO: the supervisor's "stopping..." raised OSError
    # before it stopped anything, and Redis, the SMTP capture and the app processes (which ignore
    # SIGHUP) all went on running. The terminal here is a pseudo-terminal whose master side closes.
    redis_port, smtp_port, api_port = _free_port(), _free_port(), _free_port()
    master, slave = pty.openpty()
    with open(tmp_path / "dev.err", "wb") as err:
        supervisor = subprocess.Popen(_supervisor(tmp_path, redis_port, smtp_port),
                                      env=_supervisor_env(tmp_path, api_port), cwd=PROJECT_ROOT,
                                      stdin=slave, stdout=slave, stderr=err, preexec_fn=_controlling_terminal)
    os.close(slave)
    try:
        shown = bytearray()
        while b"notifier is running" not in shown:
            assert select.select([master], [], [], 60)[0], "no banner in 60 s"
            shown += os.read(master, 65536)
        os.close(master)  # the kernel sends SIGHUP to the session leader, the supervisor here
        master = None
        os.killpg(supervisor.pid, signal.SIGHUP)  # as a shell passes it on to its job
        assert supervisor.wait(timeout=60) == 0, (tmp_path / "dev.err").read_text()
        for port in (redis_port, smtp_port, api_port):
            assert wait_until(lambda port=port: not dev._answers(port), timeout=10), f"port {port} still answers"
    finally:
        if master is not None:
            os.close(master)
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGTERM)
            supervisor.wait(timeout=60)
        _stop_leftovers(redis_port, tmp_path)


@pytest.mark.integration
def test_a_failed_start_stops_the_redis_and_smtp_capture_it_started(tmp_path):
    # The API key is made once Redis and the SMTP capture run; a database that did not answer then
    # ended make run with a traceback and left both running on their ports, so the next make run
    # refused to start ("port 6390 ... is already in use").
    redis_port, smtp_port, api_port = _free_port(), _free_port(), _free_port()
    env = _supervisor_env(tmp_path, api_port, DATABASE_URL=f"postgresql://127.0.0.1:{_free_port()}/notifier")
    try:
        with open(tmp_path / "dev.log", "wb") as log:  # not a pipe: what is left running holds it open
            done = subprocess.run(_supervisor(tmp_path, redis_port, smtp_port), env=env, cwd=PROJECT_ROOT,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=120)
        assert done.returncode != 0, (tmp_path / "dev.log").read_text()
        for port in (redis_port, smtp_port):
            assert wait_until(lambda port=port: not dev._answers(port), timeout=10), f"port {port} still answers"
    finally:
        _stop_leftovers(redis_port, tmp_path)


def _stop_leftovers(redis_port: int, tmp_path) -> None:
    """Stop what a failed run left: its Redis, and any process whose command or environment names tmp_path."""
    if dev._answers(redis_port):
        with suppress(RedisError):
            Redis(port=redis_port).shutdown(nosave=True)
    for proc in glob.glob("/proc/[0-9]*"):
        with suppress(OSError):
            with open(f"{proc}/cmdline", "rb") as cmdline, open(f"{proc}/environ", "rb") as environ:
                if str(tmp_path).encode() in cmdline.read() + environ.read():
                    os.kill(int(proc.rsplit("/", 1)[1]), signal.SIGKILL)
