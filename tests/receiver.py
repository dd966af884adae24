"""A caller's callback endpoint for tests: a real HTTP server in the test process."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A caller's callback endpoint: records every POST and answers from a script (200 when it runs out)."""

    def __init__(self):
        self.calls: list[Call] = []
        self.codes: deque[int] = deque()
        self.always: int = 200
        self.delay = 0.0
        self.before_answer: Callable[[], None] | None = None  # run once, before the first answer
        self.answered = threading.Event()
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/notifier"

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.calls.append(Call(dict(self.headers.items()), body))
                    code = receiver.codes.popleft() if receiver.codes else receiver.always
                    hook, receiver.before_answer = receiver.before_answer, None
                if hook is not None:
                    hook()
                if receiver.delay:
                    receiver.closing.wait(receiver.delay)
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the notifier stopped waiting for us
                receiver.answered.set()

            def log_message(self, format, *args):
                pass

        return Handler

    def count(self) -> int:
        with self._lock:
            return len(self.calls)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
