"""`make run`'s supervisor (notifier/dev.py), without starting the stack it would start."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
from contextlib import suppress

import pytest
from redis import Redis
from redis.exceptions import RedisError

from notifier import dev
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


@pytest.mark.integration
def test_closing_the_terminal_stops_the_whole_stack(tmp_path):
    # SIGHUP to make run's process group, as a closed terminal sends: the API, worker and scheduler
    # died mid-job, and so did the supervisor, leaving its Redis and SMTP capture (sessions of their
    # own) running on their ports, where the next make run could not start.
    redis_port, smtp_port, api_port = _free_port(), _free_port(), _free_port()
    var = tmp_path / "var"
    code = (
        "import sys\nfrom notifier import dev\n"
        f"dev.VAR = {str(var)!r}\ndev.DEV_KEY_FILE = {str(var / 'dev-api-key')!r}\n"
        f"dev.DEV_REDIS_PORT = {redis_port}\ndev.DEV_SMTP_PORT = {smtp_port}\n"
        "sys.exit(dev.main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SMTP_HOST")}
    env.update(PORT=str(api_port), DATABASE_URL=f"sqlite:///{tmp_path}/notifier.db", OPERATOR_USERNAME="operator",
               OPERATOR_PASSWORD="operator-password", PYTHONUNBUFFERED="1")
    with open(tmp_path / "dev.log", "wb") as log:
        supervisor = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=PROJECT_ROOT, stdout=log,
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
