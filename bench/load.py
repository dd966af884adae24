"""The benchmark's load generator: asyncio, raw keep-alive HTTP/1.1 to 127.0.0.1, no HTTP library.

Run as its own process, so its CPU is not the orchestrator's:

    python -m bench.load --port P --path /api/notifications/send --key KEY --mode closed \
        --concurrency 16 --duration 20
    python -m bench.load --port P --path /api/notifications/send --key KEY --mode open --rate 100 --duration 20

Closed loop: C connections, each sending its next request as soon as the last is answered, until
--requests are sent or --duration passes. Open loop: requests start at a fixed rate whatever the
answers do, on as many connections as that needs; each latency counts from the moment the request
was due, so a stalled server cannot hide its stall (no coordinated omission). SIGTERM or SIGINT
stops issuing requests; those in flight finish and the results are printed all the same.

Prints one JSON object: requests, ok (2xx), by status code, connection errors, throughput,
latency percentiles in ms, and for batches how many items were accepted. --ids-out writes one JSON
line per accepted notification: its id, and the wall-clock time its request was written.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import signal
import sys
import time
from collections import Counter

KINDS = ("send", "batch", "bare")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def summarize_ms(latencies: list[float]) -> dict:
    """p50/p95/p99/max/mean in milliseconds of latencies given in seconds."""
    values = sorted(latencies)
    out = {name: (round(v * 1000, 2) if (v := percentile(values, q)) is not None else None)
           for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))}
    out["mean"] = round(sum(values) / len(values) * 1000, 2) if values else None
    return out


class Bodies:
    """Request bodies: each notification gets its own address, so no per-recipient cap applies."""

    def __init__(self, kind: str, tag: str, priority: str, batch_size: int, total_items: int = 0):
        self.kind, self.tag, self.priority, self.batch_size = kind, tag, priority, batch_size
        self.remaining = total_items or math.inf  # batches: the last one is cut to what is left
        self._items = itertools.count()

    def _item(self) -> str:
        n = next(self._items)
        return (f'{{"to":"{self.tag}-{n}@bench.example","subject":"bench {self.tag} {n}",'
                f'"text":"Hello from the notifier benchmark.","priority":"{self.priority}"}}')

    def next(self) -> tuple[bytes, int]:
        """The next body and how many notifications it asks for."""
        if self.kind == "batch":
            size = int(min(self.batch_size, self.remaining))
            self.remaining -= size
            items = ",".join(self._item() for _ in range(size))
            return f'{{"notifications":[{items}]}}'.encode(), size
        return self._item().encode(), 1


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened by the caller when the server closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.closed = False
        self.used = 0

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length, chunked, close = 0, False, False
        for line in raw.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        payload = await (self._chunked() if chunked else self.reader.readexactly(length))
        self.used += 1
        if close:
            self.close()
        return status, payload

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


STALE = (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)


class Run:
    """One load run: sends requests and keeps what happened to each."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.bodies = Bodies(args.kind, args.tag, args.priority, args.batch_size, args.total_items)
        self.head_prefix = (f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                            f"Content-Type: application/json\r\n"
                            + (f"X-API-Key: {args.key}\r\n" if args.key else "")).encode()
        self.latencies: list[float] = []
        self.status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.items_requested = 0
        self.items_accepted = 0
        self.item_status: Counter[str] = Counter()
        self.ids: list[tuple[str, float]] = []
        self.connections_opened = 0
        self.stop = asyncio.Event()
        self.max_lag = 0.0

    def head(self, body: bytes) -> bytes:
        return self.head_prefix + b"Content-Length: %d\r\n\r\n" % len(body)

    async def connect(self) -> Connection:
        self.connections_opened += 1
        return await Connection.open(self.args.host, self.args.port)

    async def exchange(self, conn: Connection | None, body: bytes) -> tuple[Connection, int, bytes, float]:
        """Send body on conn (or a new connection); a kept-alive connection the server had already
        closed is replaced once. Returns the connection, the status, the body and the write time."""
        head = self.head(body)
        if conn is None or conn.closed:
            conn = await self.connect()
        wall = time.time()
        try:
            status, payload = await conn.request(head, body)
        except STALE:
            if not conn.used:
                raise
            conn.close()
            conn = await self.connect()
            wall = time.time()
            status, payload = await conn.request(head, body)
        return conn, status, payload, wall

    def record(self, status: int, payload: bytes, latency: float, wall: float, items: int) -> None:
        self.latencies.append(latency)
        self.status[status] += 1
        self.items_requested += items
        if not 200 <= status < 300:
            return
        if self.args.kind == "batch":
            try:
                results = json.loads(payload).get("results", [])
            except ValueError:
                self.errors["unparseable batch response"] += 1
                return
            for result in results:
                if result.get("id"):
                    self.items_accepted += 1
                    self.item_status[result.get("status", "?")] += 1
                    if self.args.ids_out:
                        self.ids.append((result["id"], wall))
                else:
                    self.item_status["error:" + str((result.get("error") or {}).get("code", "?"))] += 1
        else:
            self.items_accepted += items
            if self.args.ids_out:
                self.ids.append((json.loads(payload)["id"], wall))

    async def closed_loop(self) -> None:
        counter = itertools.count()
        limit = self.args.requests or math.inf
        deadline = time.monotonic() + self.args.duration if self.args.duration else math.inf

        async def client():
            conn = None
            while not self.stop.is_set() and next(counter) < limit and time.monotonic() < deadline:
                body, items = self.bodies.next()
                started = time.perf_counter()
                try:
                    conn, status, payload, wall = await self.exchange(conn, body)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.errors[type(exc).__name__] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    await asyncio.sleep(0.01)
                    continue
                self.record(status, payload, time.perf_counter() - started, wall, items)
            if conn is not None:
                conn.close()

        await asyncio.gather(*(client() for _ in range(self.args.concurrency)))

    async def open_loop(self) -> None:
        idle: list[Connection] = []
        slots = asyncio.Semaphore(self.args.max_connections)
        tasks: set[asyncio.Task] = set()

        async def one(due: float):
            body, items = self.bodies.next()
            async with slots:
                conn = idle.pop() if idle else None
                try:
                    conn, status, payload, wall = await self.exchange(conn, body)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.errors[type(exc).__name__] += 1
                    if conn is not None:
                        conn.close()
                    return
                self.record(status, payload, time.perf_counter() - due, wall, items)
                if not conn.closed:
                    idle.append(conn)

        total = self.args.requests or math.inf
        if self.args.duration:
            total = min(total, int(self.args.duration * self.args.rate))
        start = time.perf_counter()
        for i in itertools.count():
            if i >= total or self.stop.is_set():
                break
            due = start + i / self.args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            self.max_lag = max(self.max_lag, time.perf_counter() - due)
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for conn in idle:
            conn.close()

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        started = time.perf_counter()
        await (self.open_loop() if self.args.mode == "open" else self.closed_loop())
        elapsed = time.perf_counter() - started
        ok = sum(n for code, n in self.status.items() if 200 <= code < 300)
        result = {
            "mode": self.args.mode,
            "kind": self.args.kind,
            "requests": sum(self.status.values()),
            "ok": ok,
            "status": {str(code): n for code, n in sorted(self.status.items())},
            "errors": dict(self.errors),
            "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(ok / elapsed, 1) if elapsed else None,
            "items_requested": self.items_requested,
            "items_accepted": self.items_accepted,
            "items_per_s": round(self.items_accepted / elapsed, 1) if elapsed else None,
            "item_status": dict(self.item_status),
            "latency_ms": summarize_ms(self.latencies),
            "connections_opened": self.connections_opened,
        }
        if self.args.mode == "open":
            result["offered_rate"] = self.args.rate
            result["max_start_lag_ms"] = round(self.max_lag * 1000, 2)
        if self.args.ids_out:
            with open(self.args.ids_out, "w") as fh:
                for notification_id, wall in self.ids:
                    fh.write(json.dumps({"id": notification_id, "start": wall}) + "\n")
        return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--key", default="", help="sent as X-API-Key")
    parser.add_argument("--kind", choices=KINDS, default="send")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (closed loop)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many requests (0: no bound)")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: no bound)")
    parser.add_argument("--rate", type=float, default=100, help="requests per second offered (open loop)")
    parser.add_argument("--max-connections", type=int, default=256, help="open loop: connections at most")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--total-items", type=int, default=0, help="batches: notifications in all (cuts the last)")
    parser.add_argument("--priority", default="default")
    parser.add_argument("--tag", default="bench", help="makes this run's addresses distinct")
    parser.add_argument("--ids-out", help="write each accepted notification's id and request time here")
    args = parser.parse_args(argv)
    if not args.requests and not args.duration:
        parser.error("give --requests or --duration (or both): every run is bounded")
    return args


def main(argv: list[str] | None = None) -> None:
    result = asyncio.run(Run(parse_args(argv)).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
