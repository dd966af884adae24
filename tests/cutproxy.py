"""A TCP proxy in front of PostgreSQL that loses the answer to one statement: the commit's answer lost.

A connection that drops after the server committed but before its answer reached the client is
what a failover, a restart or a network fault can do to any client; nothing in the client can tell
it from a connection lost before the commit. The proxy forwards everything until armed; armed with
a marker, it forwards the client's message holding it, then cuts that connection (both sides, with
a reset) instead of passing the server's answer on.

Stalled (stall()), it forwards nothing on any connection, old or new, while still accepting them and
taking in what each side sends: a server that hangs, or a network path that drops everything, without
a reset or an error to tell the client. resume() passes on what it held, in order.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class CutProxy:
    """Listens on 127.0.0.1 (port: .port) and forwards to upstream; cut_answer_to() arms it once."""

    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.before_reply = False  # cut the request instead: the server never sees the statement
        self.late: float | None = None  # cut the client at once; the server gets the statement this much later
        self.stall_armed = False  # stall instead, from the marked message on
        self.cuts = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def cut_answer_to(self, marker: bytes, *, before_reply: bool = False, late: float | None = None) -> None:
        """Cut the next connection that sends marker: after the server answers it (the statement ran,
        and committed if it was a commit), or before the server sees it when before_reply. late: the
        client is cut at once and the server gets the statement that many seconds later (a COMMIT
        still on its way when the client gave up), its answer going nowhere."""
        with self._lock:
            self.marker, self.before_reply, self.late, self.stall_armed = marker, before_reply, late, False

    def stall(self, at: bytes | None = None) -> None:
        """Forward nothing from now on, on any connection, until resume(); at: from the next client
        message holding it on (that message held too)."""
        if at is None:
            self._flowing.clear()
            return
        with self._lock:
            self.marker, self.stall_armed = at, True

    def resume(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"cut_next_answer": False}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, state), daemon=True).start()

    def _armed(self, data: bytes) -> bool:
        with self._lock:
            if self.marker is not None and self.marker in data:
                self.marker = None
                return True
        return False

    def _requests(self, client, upstream, state) -> None:
        while (data := _recv(client)):
            if self._armed(data):
                if self.stall_armed:
                    self._flowing.clear()
                elif self.before_reply:
                    self._cut(client, upstream)
                    return
                elif self.late is not None:
                    self._cut(client)
                    time.sleep(self.late)
                    upstream.sendall(data)
                    time.sleep(0.5)  # its answer, read and dropped by _answers
                    self._cut(upstream, counted=False)
                    return
                else:
                    state["cut_next_answer"] = True
            self._flowing.wait()
            if self._closed:
                break  # what was held when the test ended goes nowhere, never into the next test's tables
            try:
                upstream.sendall(data)
            except OSError:
                break
        _shut(upstream)

    def _answers(self, upstream, client, state) -> None:
        while (data := _recv(upstream)):
            if state["cut_next_answer"]:
                self._cut(client, upstream)
                return
            self._flowing.wait()
            try:
                client.sendall(data)
            except OSError:
                break
        _shut(client)

    def _cut(self, *socks, counted: bool = True) -> None:
        self.cuts += counted
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread, blocked reading it
            except OSError:
                pass
            sock.close()


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
