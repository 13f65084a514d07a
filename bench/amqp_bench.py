"""AMQP-RPC and lambda-server benchmarks: the echo handler behind RabbitMQ, MAX_CONCURRENCY=2.

Two paths, each against a real daemon (``lambda-runtime-api-daemon`` with ``AMQP_URI``) started on
free ports with a queue name of its own:

* ``amqp``: an aio-pika client keeps N requests in flight (N = 8 and 32 by default) on the daemon's
  queue, with RabbitMQ direct reply-to, and counts replies per second and p50/p99 latency.
* ``server``: ``lambda-server`` in front, and ``wrk`` (or ``bench/loadgen.py`` without it) with 8
  connections POSTing to ``/2015-03-31/functions/<name>/invocations``.

RabbitMQ must run on 127.0.0.1:5672 (guest/guest) or at ``--amqp-uri``. Each window is short:
the machine is small and shared. Prints one ``BENCH_RESULT {...}`` JSON line per window.

Usage: python bench/amqp_bench.py [--path amqp|server|both] [--seconds 5] [--inflight 8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ECHO_DIR = ROOT / "examples" / "echo" / "echo-lambda"
BIN = Path(sys.executable).parent
PAYLOAD = b'{"key": "value"}'


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: the client shares the machine with what it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


def start(argv: list, env: dict, cwd: Path) -> subprocess.Popen:
    with tempfile.NamedTemporaryFile(prefix="amqp-bench-", suffix=".log", delete=False) as log:
        return subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=subprocess.DEVNULL, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children excluded), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def syscalls(pid: int) -> tuple:
    """(read, write) system calls made so far by a process, from /proc/PID/io: unlike CPU time, these
    counts do not swell when the shared machine is busy, so they show what a change saves."""
    counts = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                counts[key] = int(value)
    except (OSError, ValueError):
        pass
    return counts.get("syscr", 0), counts.get("syscw", 0)


def percentile(values: list, q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, count: int, seconds: float, latencies: list, errors: int = 0, **extra) -> dict:
    result = {"bench": name, "replies_per_s": round(count / seconds, 1), "count": count,
              "seconds": round(seconds, 2), "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
              "p99_ms": round(percentile(latencies, 0.99) * 1000, 2), "errors": errors, **extra}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


# ---- AMQP-RPC client -----------------------------------------------------------------------------

async def amqp_window(uri: str, queue: str, inflight: int, seconds: float, warmup: float, daemon_pid: int) -> dict:
    import aio_pika
    from pamqp.commands import Basic

    connection = await aio_pika.connect(uri)
    channel = await connection.channel(publisher_confirms=False)
    underlay = await channel.get_underlay_channel()
    waiting: dict = {}

    def on_reply(message) -> None:
        future = waiting.pop(message.header.properties.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(message.body)

    await underlay.basic_consume("amq.rabbitmq.reply-to", on_reply, no_ack=True)
    loop = asyncio.get_running_loop()
    latencies = array("d")
    counted = [0, 0]  # replies, bad replies
    measuring = [False]
    stop_at = [0.0]

    async def worker() -> None:
        while loop.time() < stop_at[0]:
            cid = str(uuid.uuid4())
            future = waiting[cid] = loop.create_future()
            started = time.perf_counter()  # (uvloop's loop.time() ticks in whole milliseconds)
            await underlay.basic_publish(PAYLOAD, routing_key=queue, properties=Basic.Properties(
                reply_to="amq.rabbitmq.reply-to", correlation_id=cid, content_type="application/json"))
            body = await asyncio.wait_for(future, 30)
            if measuring[0]:
                latencies.append(time.perf_counter() - started)
                counted[0] += 1
                if body != b'{"key": "value"}':
                    counted[1] += 1

    stop_at[0] = loop.time() + warmup + seconds
    tasks = [loop.create_task(worker()) for _ in range(inflight)]
    await asyncio.sleep(warmup)
    measuring[0] = True
    began = loop.time()
    cpu_daemon, cpu_client, io_daemon = cpu_seconds(daemon_pid), time.process_time(), syscalls(daemon_pid)
    await asyncio.sleep(seconds)
    measuring[0] = False
    elapsed = loop.time() - began
    cpu_daemon, cpu_client = cpu_seconds(daemon_pid) - cpu_daemon, time.process_time() - cpu_client
    io_daemon = [b - a for a, b in zip(io_daemon, syscalls(daemon_pid))]
    await asyncio.gather(*tasks)
    await connection.close()
    per = 1e6 / max(1, counted[0])
    return report(f"amqp-rpc inflight={inflight}", counted[0], elapsed, list(latencies), counted[1],
                  inflight=inflight, daemon_cpu_us_per_reply=round(cpu_daemon * per),
                  client_cpu_us_per_reply=round(cpu_client * per),
                  daemon_reads_per_reply=round(io_daemon[0] / max(1, counted[0]), 2),
                  daemon_writes_per_reply=round(io_daemon[1] / max(1, counted[0]), 2))


# ---- lambda-server with wrk ----------------------------------------------------------------------

def run_wrk(url: str, connections: int, seconds: float, pids: dict) -> dict:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    io_before = {name: syscalls(pid) for name, pid in pids.items() if name != "broker"}
    if shutil.which("wrk") is None:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--connections",
                              str(connections), "--seconds", str(seconds)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        return json.loads(line[-1][len("BENCH_RESULT "):]) if line else {"error": out.stderr[-500:]}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = '{PAYLOAD.decode()}'\n")
    try:
        threads = min(2, connections)  # wrk refuses more threads than connections
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s",
                              script.name, url], capture_output=True, text=True).stdout
    finally:
        os.unlink(script.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return 0.0
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    count = re.search(r"(\d+) requests in", out)
    per = 1e6 / max(1, int(count.group(1)) if count else 1)
    result = {"bench": f"lambda-server c={connections}", "requests_per_s": float(rps.group(1)) if rps else 0.0,
              "p50_ms": ms("50"), "p99_ms": ms("99"), "errors": int(non2xx.group(1)) if non2xx else 0}
    result.update({f"{name}_cpu_us_per_request": round((cpu_seconds(pid) - before[name]) * per)
                   for name, pid in pids.items()})
    for name, counts in io_before.items():
        reads, writes = (b - a for a, b in zip(counts, syscalls(pids[name])))
        result[f"{name}_reads_per_request"] = round(reads * per / 1e6, 2)
        result[f"{name}_writes_per_request"] = round(writes * per / 1e6, 2)
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=("amqp", "server", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", default="8,32")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--amqp-uri", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()

    queue = f"bench-echo-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    daemon_env = dict(env, PORT=str(port), RUNTIME_API_PORT=str(free_port()), AWS_LAMBDA_FUNCTION_NAME=queue,
                      MAX_CONCURRENCY=str(args.max_concurrency), MIN_INSTANCES=str(args.max_concurrency),
                      AMQP_URI=args.amqp_uri + "?connection_attempts=5&retry_delay=1&heartbeat=0")
    daemon = start([str(BIN / "lambda-runtime-api-daemon"), sys.executable, "-m", "awslambdaric", "echo.handler"],
                   daemon_env, ECHO_DIR)
    procs = [daemon]
    try:
        wait_http(f"http://127.0.0.1:{port}/_/ready")
        print(f"daemon pid {daemon.pid}, queue {queue}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # the consumer is set up right after start-up
        if args.path in ("amqp", "both"):
            for n in (int(x) for x in args.inflight.split(",")):
                loop = new_event_loop()
                try:
                    loop.run_until_complete(amqp_window(args.amqp_uri, queue, n, args.seconds, args.warmup,
                                                        daemon.pid))
                finally:
                    loop.close()
        if args.path in ("server", "both"):
            sport = free_port()
            server = start([str(BIN / "lambda-server")], dict(
                env, PORT=str(sport), AMQP_URI=args.amqp_uri + "?connection_attempts=5&retry_delay=1&heartbeat=0"),
                ROOT)
            procs.append(server)
            wait_http(f"http://127.0.0.1:{sport}/_/ready")
            print(f"lambda-server pid {server.pid}", file=sys.stderr, flush=True)
            url = f"http://127.0.0.1:{sport}/2015-03-31/functions/{queue}/invocations"
            pids = {"daemon": daemon.pid, "server": server.pid}
            broker = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True).stdout.split()
            if broker:
                pids["broker"] = int(broker[0])  # shared with whatever else uses it: an upper bound
            run_wrk(url, args.connections, max(1.0, args.warmup), pids)  # warm-up
            run_wrk(url, args.connections, args.seconds, pids)
    finally:
        for proc in reversed(procs):
            stop(proc)
        loop = new_event_loop()  # the daemon's queue is durable: it would outlive the benchmark
        try:
            loop.run_until_complete(delete_queue(args.amqp_uri, queue))
        finally:
            loop.close()
    return 0


async def delete_queue(uri: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(uri)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(main())
