"""The benchmark's SMTP sink speaks enough SMTP for smtplib, and counts each message by its id."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
import time

import pytest

from bench.sink import NO_ID, Counter, SinkProtocol


@pytest.fixture
def sink():
    """A sink on a free port, served by an event loop in a thread; yields (port, counter)."""
    counter = Counter()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: SinkProtocol(counter), "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1], counter
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    server.close()
    loop.close()


def message(ident: str | None, body: str = "hello\r\n") -> bytes:
    header = f"X-Notification-ID: {ident}\r\n" if ident is not None else ""
    return f"From: a@example.com\r\nSubject: s\r\n{header}\r\n{body}".encode()


def test_smtplib_sends_many_messages_on_one_connection(sink):
    port, counter = sink
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.has_extn("smtputf8")
        for n in range(3):
            assert smtp.sendmail("a@example.com", ["b@example.com", "c@example.com"], message(f"n-{n}")) == {}
        assert smtp.noop()[0] == 250
        smtp.rset()
        smtp.sendmail("a@example.com", ["b@example.com"], message("n-0"))
    assert counter.total == 4
    assert counter.counts == {"n-0": 2, "n-1": 1, "n-2": 1}
    assert set(counter.first) == {"n-0", "n-1", "n-2"}


def test_dots_empty_and_large_messages(sink):
    port, counter = sink
    large = "".join(f"line {i}\r\n.starts with a dot\r\n" for i in range(50_000))  # ~1.4 MB, many reads
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], message("dots", ".\r\n..\r\n.x\r\n"))
        smtp.sendmail("a@example.com", ["b@example.com"], b"")
        smtp.sendmail("a@example.com", ["b@example.com"], message("large", large))
        smtp.sendmail("a@example.com", ["b@example.com"], message(None))
    assert counter.counts == {"dots": 1, NO_ID: 2, "large": 1}


def test_pipelined_commands_and_an_end_of_data_split_across_writes(sink):
    port, counter = sink
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"220")
        conn.sendall(b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [reader.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        for piece in (message("split") + b"\r", b"\n.", b"\r", b"\n"):
            conn.sendall(piece)
            time.sleep(0.02)  # so the sink reads each piece on its own
        assert reader.readline()[:3] == b"250"
        conn.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [reader.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        for piece in (b".", b"\r", b"\n"):  # an empty message, its "." line in three reads
            conn.sendall(piece)
            time.sleep(0.02)
        assert reader.readline()[:3] == b"250"
        conn.sendall(b"WHAT\r\nQUIT\r\n")
        assert reader.readline()[:3] == b"500"
        assert reader.readline()[:3] == b"221"
        assert reader.readline() == b""  # the sink closed the connection
    assert counter.counts == {"split": 1, NO_ID: 1}
