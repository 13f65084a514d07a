"""In-process microbenchmark: the daemon's own user-space cost of one invocation, without the kernel.

It builds the real daemon (``Daemon(config)``: pool, Invoke API, Runtime API, HTTP layer) but
starts no process and opens no socket: both connections get a transport that only records what is
written. One invocation is the three exchanges of the hot path, fed as raw bytes:

    client  POST /2015-03-31/functions/function/invocations   -> the parked runtime gets the event
    runtime POST /2018-06-01/runtime/invocation/<id>/response -> the client gets 200, the runtime 202
    runtime GET  /2018-06-01/runtime/invocation/next          -> parked again

The figure (microseconds per invocation) is the Python and C-extension work the daemon does per
invocation; a real run adds 3 reads, 3 writes and ~2 epoll waits on loopback sockets (kernel time)
on top. Use it to compare hot-path changes quickly and repeatably, even on a busy machine
(it runs on one core and takes a few seconds). ``--profile`` prints a cProfile of the loop.

    .venv/bin/python bench/hotpath.py [--invocations 50000] [--profile] [--src DIR]

``--src DIR`` imports ``lambda_rapid`` from DIR instead of ``src/`` (e.g. a copy with one file
taken from ``git show HEAD:...``), to compare two versions of the hot path.

It reaches into the daemon's internals (``Daemon._launch``, ``HttpConnection``): when they
change, this file may need the same change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# --src DIR measures another copy of the package (an A/B comparison of a hot-path change).
_SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv[:-1] else str(ROOT / "src")
sys.path.insert(0, _SRC)

from lambda_rapid import config as config_module  # noqa: E402
from lambda_rapid.daemon import Daemon  # noqa: E402
from lambda_rapid.http.server import HttpConnection  # noqa: E402

PAYLOAD = b'{"hello":"world"}'
INVOKE = (b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD)) + PAYLOAD
# What boto3 1.43 sends for lambda.invoke (signed; the signature is not checked).
BOTO3_INVOKE = (
    b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Accept-Encoding: identity\r\nX-Amz-Invocation-Type: RequestResponse\r\nX-Amz-Log-Type: None\r\n"
    b"User-Agent: Boto3/1.43.11 md/Botocore#1.41.11 ua/2.1 os/linux#6.18.44 md/arch#x86_64 lang/python#3.11.7 "
    b"md/pyimpl#CPython m/Z,b,D cfg/retry-mode#legacy Botocore/1.41.11\r\n"
    b"X-Amz-Date: 20261127T164500Z\r\n"
    b"X-Amz-Content-SHA256: 93a23971a914e5eacbf0a8d25154cda309c3c1c72fbb9914d47c60f3cb681588\r\n"
    b"Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261127/us-east-1/lambda/aws4_request, "
    b"SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-invocation-type;x-amz-log-type, "
    b"Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7\r\n"
    b"amz-sdk-invocation-id: 0b7ff1a4-3e51-4c8c-a1b6-8d4b0a0e3c1a\r\namz-sdk-request: attempt=1\r\n"
    b"Content-Length: %d\r\n\r\n" % len(PAYLOAD)) + PAYLOAD
# Byte for byte what awslambdaric 4.2.2 sends.
NEXT = (b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nAccept: */*\r\n"
        b"User-Agent: aws-lambda-python/3.11.7-4.2.2\r\n\r\n")
RESPONSE = (b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nAccept: */*\r\n"
            b"content-type: application/json\r\nUser-Agent: aws-lambda-python/3.11.7-4.2.2\r\n"
            b"content-length: %d\r\n\r\n%s")
ID_HEADER = b"Lambda-Runtime-Aws-Request-Id: "


class NoProcess:
    """The instance's "process": the benchmark plays its runtime itself."""

    pid = 0

    def read_output(self) -> None:
        pass

    def peak_rss(self) -> int:
        return 0


class BenchDaemon(Daemon):
    def _launch(self, instance):  # no process: we play the runtime ourselves
        return NoProcess()


class RecordingTransport(asyncio.Transport):
    """Keeps the last bytes written; everything else is a no-op."""

    def __init__(self) -> None:
        super().__init__()
        self.last = b""
        self.writes = 0

    def write(self, data) -> None:  # type: ignore[override]
        self.last = bytes(data)
        self.writes += 1

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def build() -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_", "PRINT_"))}
    env["AWS_LAMBDA_FUNCTION_NAME"] = "echo"
    config = config_module.load([sys.executable, "-m", "awslambdaric", "echo.handler"], env,
                                cwd=str(ROOT / "examples" / "echo" / "echo-lambda"))
    daemon = BenchDaemon(config)
    client, runtime = RecordingTransport(), RecordingTransport()
    invoke_conn = HttpConnection(daemon.invoke_http)
    invoke_conn.connection_made(client)
    invoke_conn.data_received(INVOKE)  # queues the first invocation and "spawns" instance #0
    instance = daemon.pool.instances[0]
    runtime_conn = HttpConnection(daemon.runtime_http, instance)
    runtime_conn.connection_made(runtime)
    return daemon, invoke_conn, runtime_conn, client, runtime


def one_round(invoke_conn, runtime_conn, client, runtime, first: bool) -> None:
    if not first:
        invoke_conn.data_received(INVOKE)
    event = runtime.last
    i = event.find(ID_HEADER) + len(ID_HEADER)
    request_id = event[i:event.find(b"\r\n", i)]
    runtime_conn.data_received(RESPONSE % (request_id, len(PAYLOAD), PAYLOAD))
    runtime_conn.data_received(NEXT)


def run(n: int, profile: bool) -> None:
    daemon, invoke_conn, runtime_conn, client, runtime = build()
    runtime_conn.data_received(NEXT)  # instance ready: it takes the queued invocation at once
    one_round(invoke_conn, runtime_conn, client, runtime, first=True)
    if not client.last.startswith(b"HTTP/1.1 200") or not client.last.endswith(PAYLOAD):
        raise SystemExit(f"unexpected answer to the first invocation: {client.last[:300]!r}")
    for _ in range(min(n, 2000)):  # warm up
        one_round(invoke_conn, runtime_conn, client, runtime, first=False)
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        one_round(invoke_conn, runtime_conn, client, runtime, first=False)
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - started
    if profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if not client.last.startswith(b"HTTP/1.1 200") or not client.last.endswith(PAYLOAD):
        raise SystemExit(f"unexpected answer: {client.last[:300]!r}")
    success = daemon.pool.metrics.outcomes.get("success", 0)
    print(f"{n} invocations ({success} counted by the pool): {cpu / n * 1e6:.1f} us CPU per invocation "
          f"({elapsed / n * 1e6:.1f} us wall), {3 * n / cpu:,.0f} HTTP exchanges per CPU second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invocations", type=int, default=50000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the measured loop")
    parser.add_argument("--client", choices=("wrk", "boto3"), default="wrk",
                        help="the invoke request: wrk's (3 headers, as bench/run.py) or boto3's (11 headers)")
    parser.add_argument("--src", default=_SRC, help="directory to import lambda_rapid from (default: src/)")
    args = parser.parse_args()
    if args.client == "boto3":
        global INVOKE
        INVOKE = BOTO3_INVOKE
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    print(f"lambda_rapid from {Path(config_module.__file__).parent}")
    try:
        run(args.invocations, args.profile)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
