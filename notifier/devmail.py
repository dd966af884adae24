"""A local SMTP server that keeps what it receives: `make run` reads mail from it, tests assert on it.

Run alone with `python -m notifier.devmail --port 1025 --dir var/mail`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.controller import Controller

from notifier.redact import mask_address

logger = logging.getLogger(__name__)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    helo: str = ""  # the name the client gave in EHLO or HELO

    @property
    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)


class CaptureHandler:
    """aiosmtpd handler: keeps every message (in memory, and as .eml files when given a folder).

    `replies` scripts the next answers to DATA ("451 try later", "550 no such user"); when it is
    empty every message is accepted. `mail_replies` and `rcpt_replies` do the same for MAIL FROM and
    RCPT. `delay` holds each DATA reply back, to imitate a slow server; `before_reply`, when set, is
    called (in a thread, so it may block) before each DATA reply, to hold one back until a test has
    done something meanwhile, such as killing the client mid-DATA. It offers PIPELINING, as
    most mail servers do (aiosmtpd reads pipelined commands in order but does not say so); with
    pipelining=False it does not, like a server that does not pipeline.
    """

    def __init__(self, folder: str | None = None, pipelining: bool = True):
        self.folder = folder
        self.pipelining = pipelining
        self.messages: list[Received] = []
        self.replies: deque[str] = deque()
        self.mail_replies: deque[str] = deque()
        self.rcpt_replies: deque[str] = deque()
        self.delay = 0.0
        self.before_reply: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        if folder:
            os.makedirs(folder, exist_ok=True)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # aiosmtpd leaves this to a handler that answers EHLO
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_replies:
            return self.mail_replies.popleft()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_replies:
            return self.rcpt_replies.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.before_reply is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.before_reply)
        if server.transport is None or server.transport.is_closing():
            # The client hung up before our reply: like a careful MTA, keep nothing.
            return "421 client went away"
        if self.replies:
            return self.replies.popleft()
        received = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content),
                            session.host_name or "")
        with self._lock:
            number = next(self._counter)
        if self.folder:
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{number:05d}.eml"
            try:
                _write_whole(os.path.join(self.folder, name), received.data)
            except OSError as exc:
                # A full disk: aiosmtpd answered 500, a permanent refusal that failed the notification for
                # good, and left an empty .eml. A mail server short of room answers 452, which is retried.
                logger.warning("mail not captured, %s: %s", self.folder, exc.strerror)
                return "452 4.3.1 Insufficient system storage"
            logger.info("captured mail for %s as %s", ", ".join(map(mask_address, received.rcpt_tos)), name)
        with self._lock:
            self.messages.append(received)
        return f"250 OK captured as {number}"

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least n messages arrived (or timeout) and return them all."""
        deadline = time.monotonic() + timeout
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)


def _write_whole(path: str, data: bytes) -> None:
    """Write data to path, or nothing: a reader of the folder never sees part of a message."""
    partial = path + ".part"
    try:
        with open(partial, "wb") as fh:
            fh.write(data)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def start(handler: CaptureHandler, host: str = "127.0.0.1", port: int = 0) -> Controller:
    """Run handler in a background thread on host:port (0 picks a free port); returns the controller."""
    controller = Controller(handler, hostname=host, port=port or _free_port(host))
    controller.start()
    return controller


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", default="var/mail")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s smtp-capture %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every connection at INFO
    controller = start(CaptureHandler(args.dir), args.host, args.port)
    logger.info("SMTP capture listening on %s:%s, keeping mail in %s", args.host, controller.port, args.dir)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
