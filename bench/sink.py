"""The benchmark's SMTP sink: accepts every message, keeps nothing but which notification it was.

Run as its own process: `python -m bench.sink --port P --control-port Q`. For each message it notes
the X-Notification-ID header (how many times each id arrived, and when it first did) and answers 250.
A line-based control port answers `count` (messages so far) and `dump` (one JSON line: counts and
first-arrival times per id), so the benchmark can watch a drain and check "each exactly once".

The SMTP side is a small asyncio protocol, not aiosmtpd: the sink shares the machine's two cores with
what it measures, and aiosmtpd spent 0.6-0.7 ms of CPU on each message (a fifth of a batch drain's
CPU), where a relay in production runs elsewhere. It speaks what smtplib needs of a server that
takes everything: EHLO/HELO, MAIL, RCPT, DATA (dot-stuffed, ended by CRLF.CRLF), RSET, NOOP, QUIT,
commands pipelined or not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

HEADER = b"\nX-Notification-ID:"
NO_ID = "(no X-Notification-ID)"
END_OF_DATA = b"\r\n.\r\n"

# PIPELINING as most mail servers offer it (data_received answers every command a read holds).
_EHLO = b"250-bench-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-PIPELINING\r\n250 HELP\r\n"
_REPLIES = {
    b"HELO": b"250 bench-sink\r\n",
    b"MAIL": b"250 OK\r\n",
    b"RCPT": b"250 OK\r\n",
    b"RSET": b"250 OK\r\n",
    b"NOOP": b"250 OK\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 Bye\r\n",
}


class Counter:
    """Messages per X-Notification-ID, and when each id first arrived."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.total = 0

    def message(self, content: bytes) -> None:
        start = content.find(HEADER)
        if start < 0:
            ident = NO_ID
        else:
            start += len(HEADER)
            end = content.find(b"\r\n", start)
            ident = content[start:end if end >= 0 else None].strip().decode("ascii", "replace")
        if ident in self.counts:
            self.counts[ident] += 1
        else:
            self.counts[ident] = 1
            self.first[ident] = time.time()
        self.total += 1

    def dump(self) -> dict:
        return {"total": self.total, "counts": self.counts, "first": self.first}


class SinkProtocol(asyncio.Protocol):
    """One SMTP connection: every command answered at once, every message counted and dropped."""

    def __init__(self, counter: Counter):
        self.counter = counter
        self.buffer = b""
        self.in_data = False
        self.scanned = 0  # how far the buffer is known to hold no end of data

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        replies = []
        while buffer:
            if self.in_data:
                # A message may be empty: then its end is the "." line alone.
                if self.scanned == 0 and len(buffer) < 3 and b".\r\n".startswith(buffer):
                    break  # perhaps that line, not all here yet
                if buffer.startswith(b".\r\n") and self.scanned == 0:
                    content, buffer = b"", buffer[3:]
                else:
                    end = buffer.find(END_OF_DATA, max(0, self.scanned - 4))
                    if end < 0:
                        self.scanned = len(buffer)
                        break
                    content, buffer = buffer[:end + 2], buffer[end + 5:]
                self.in_data, self.scanned = False, 0
                self.counter.message(content)
                replies.append(b"250 OK\r\n")
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                break
            verb, buffer = buffer[:4].upper(), buffer[end + 2:]
            if verb == b"EHLO":
                replies.append(_EHLO)
            else:
                replies.append(_REPLIES.get(verb, b"500 Error: command not recognized\r\n"))
                if verb == b"DATA":
                    self.in_data = True
                elif verb == b"QUIT":
                    self.transport.write(b"".join(replies))
                    self.transport.close()
                    return
        self.buffer = buffer
        if replies:
            self.transport.write(b"".join(replies))


async def _control(counter: Counter, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            command = line.strip().decode()
            if command == "count":
                writer.write(b"%d\n" % counter.total)
            elif command == "dump":
                writer.write(json.dumps(counter.dump(), separators=(",", ":")).encode() + b"\n")
            else:
                writer.write(b"error: unknown command\n")
            await writer.drain()
    finally:
        writer.close()


async def serve(host: str, port: int, control_port: int) -> None:
    loop = asyncio.get_running_loop()
    counter = Counter()
    smtp = await loop.create_server(lambda: SinkProtocol(counter), host, port, backlog=512)
    control = await asyncio.start_server(lambda r, w: _control(counter, r, w), host, control_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on {host}:{port}, control on {control_port}", flush=True)
    await stop.wait()
    smtp.close()
    control.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.control_port))


if __name__ == "__main__":
    main()
