"""`make run`'s supervisor (notifier/dev.py), without starting the stack it would start."""

from __future__ import annotations

import socket
import subprocess

import pytest

from notifier import dev


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
