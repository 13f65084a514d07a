"""The project's own HTTP load generator, used by ``bench/run.py`` when ``wrk`` is not installed.

Like ``wrk -s post.lua``: C keep-alive connections, each sending the next POST as soon as the
previous answer is complete, for a fixed time; prints the same ``BENCH_RESULT {...}`` line.
It runs on uvloop protocols with a minimal response parser, but it is Python: it needs a good
share of a core at a few thousand requests per second, so on a small machine the figures it gives
are lower bounds. Prefer wrk (Debian package ``wrk``).

Usage: python bench/loadgen.py --url http://127.0.0.1:8080/path --connections C --seconds S
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from array import array
from typing import List, Optional


class Stats:
    def __init__(self) -> None:
        self.latencies = array("d")
        self.status_errors = 0
        self.read_errors = 0
        self.connect_errors = 0
        self.running = True


class ClientConnection(asyncio.Protocol):
    def __init__(self, request: bytes, stats: Stats, closed: asyncio.Future) -> None:
        self.request = request
        self.stats = stats
        self.closed = closed
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        self.sent = time.perf_counter()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15:j if j >= 0 else end])
            total = end + 4 + length
            if len(buf) < total:
                break
            status = buf[9:12]
            buf = buf[total:]
            stats = self.stats
            if not stats.running:
                self.transport.close()  # type: ignore[union-attr]
                return
            stats.latencies.append(time.perf_counter() - self.sent)
            if status[:1] != b"2":
                stats.status_errors += 1
            self._send()
        self.buf = buf

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.stats.running:
            self.stats.read_errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


def percentile_us(sorted_values: List[float], pct: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, int(round(pct / 100 * len(sorted_values))) - 1))
    return int(sorted_values[k] * 1e6)


async def drive(url: str, connections: int, seconds: float, payload: bytes) -> dict:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    loop = asyncio.get_running_loop()
    stats = Stats()
    closed: List[asyncio.Future] = []
    started = time.perf_counter()
    for _ in range(connections):
        future = loop.create_future()
        try:
            await loop.create_connection(lambda f=future: ClientConnection(request, stats, f), host, port)
        except OSError:
            stats.connect_errors += 1
            continue
        closed.append(future)
    await asyncio.sleep(max(0.0, seconds - (time.perf_counter() - started)))
    stats.running = False
    duration = time.perf_counter() - started
    await asyncio.wait(closed, timeout=5.0)
    latencies = sorted(stats.latencies)
    return {
        "requests": len(latencies),
        "duration_us": int(duration * 1e6),
        "connect_errors": stats.connect_errors,
        "read_errors": stats.read_errors,
        "write_errors": 0,
        "status_errors": stats.status_errors,
        "timeouts": 0,
        "p50_us": percentile_us(latencies, 50),
        "p90_us": percentile_us(latencies, 90),
        "p99_us": percentile_us(latencies, 99),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "mean_us": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--payload", default='{"hello":"world"}')
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    try:
        result = loop.run_until_complete(drive(args.url, args.connections, args.seconds, args.payload.encode()))
    finally:
        loop.close()
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
