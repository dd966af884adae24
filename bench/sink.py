"""The benchmark's SMTP sink: accepts every message, keeps nothing but which notification it was.

Run as its own process: `python -m bench.sink --port P --control-port Q`. For each message it notes
the X-Notification-ID header (how many times each id arrived, and when it first did) and answers 250.
A line-based control port answers `count` (messages so far) and `dump` (one JSON line: counts and
first-arrival times per id), so the benchmark can watch a drain and check "each exactly once".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time

from aiosmtpd.smtp import SMTP

HEADER = b"\nX-Notification-ID:"
NO_ID = "(no X-Notification-ID)"


class CountingHandler:
    """aiosmtpd handler that counts messages per X-Notification-ID and discards them."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.total = 0

    async def handle_DATA(self, server, session, envelope):
        content = envelope.content
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
        return "250 OK"

    def dump(self) -> dict:
        return {"total": self.total, "counts": self.counts, "first": self.first}


async def _control(handler: CountingHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            command = line.strip().decode()
            if command == "count":
                writer.write(b"%d\n" % handler.total)
            elif command == "dump":
                writer.write(json.dumps(handler.dump(), separators=(",", ":")).encode() + b"\n")
            else:
                writer.write(b"error: unknown command\n")
            await writer.drain()
    finally:
        writer.close()


async def serve(host: str, port: int, control_port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    # A fixed hostname: without one aiosmtpd calls socket.getfqdn() for every connection.
    smtp = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-sink", ident="bench-sink", loop=loop, data_size_limit=None),
        host, port, backlog=512,
    )
    control = await asyncio.start_server(lambda r, w: _control(handler, r, w), host, control_port)
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
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd logs each connection and command
    asyncio.run(serve(args.host, args.port, args.control_port))


if __name__ == "__main__":
    main()
