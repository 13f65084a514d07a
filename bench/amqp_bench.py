"""AMQP-RPC and lambda-server benchmarks: the echo handler behind RabbitMQ, MAX_CONCURRENCY=2.

    .venv/bin/python bench/amqp_bench.py                  # both paths, 3 rounds of 5 s, ours and the ceiling
    .venv/bin/python bench/amqp_bench.py --peer-daemon GO/lambda-runtime-api-daemon \\
        --peer-server GO/lambda-server --peer-label go    # the same, side by side with a peer

Two paths, each against a real daemon (``lambda-runtime-api-daemon`` with ``AMQP_URI``) started on
free ports with a queue name of its own:

* ``amqp``: an aio-pika client keeps N requests in flight (N = 8 by default) on the daemon's
  queue, with RabbitMQ direct reply-to, and counts replies per second and p50/p99 latency.
* ``server``: ``lambda-server`` in front, and ``wrk`` (or ``bench/loadgen.py`` without it) with 8
  connections POSTing to ``/2015-03-31/functions/<name>/invocations``.

With ``--peer-daemon PATH`` and/or ``--peer-server PATH`` a second set (the peer's daemon, or ours
where no peer daemon is given, on a queue of its own; the peer's lambda-server, or ours) is
measured the same way. Rounds alternate: each round measures the ceiling (bench/ceiling.py with
MAX_CONCURRENCY runtimes: how fast the runtimes go round their loop with no daemon at all) and
every workload on every side, in an order that rotates from round to round. Whoever is not being
measured sits idle. The report gives medians: rate, p50/p99, ours ÷ peer (paired by round), CPU
per reply or request of each process (daemon, lambda-server, broker, client; /proc ticks ÷ count)
and RSS after the load. The broker is shared by everything on the machine, so its figure is an
upper bound.

RabbitMQ must run on 127.0.0.1:5672 (guest/guest) or at ``--amqp-uri``. Each window is short:
the machine is small and shared. Prints one ``BENCH_RESULT {...}`` JSON line per window, then the
table; the whole run goes to bench/results/amqp-<time>.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from pathlib import Path
from typing import Dict, List, Optional

from run import (
    CLK_TCK,
    ECHO_DIR,
    RESULTS,
    Ceiling,
    Load,
    children_of,
    cpu_split,
    drive,
    free_port,
    git_revision,
    loadavg,
    memory_kb,
)

BIN = Path(sys.executable).parent
PAYLOAD = '{"key": "value"}'
STALL = 0.25  # a window below this fraction of the same side's best window is reported as stalled


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: the client shares the machine with what it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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


def percentile(values, q: float) -> float:
    if not len(values):
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def emit(result: dict) -> dict:
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return result


class Usage:
    """CPU ticks (and read/write syscalls) of named processes over one window, per reply or request."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.ticks = {name: cpu_split(pid) for name, pid in pids.items()}
        self.io = {name: syscalls(pid) for name, pid in pids.items() if name != "broker"}

    def per(self, count: int) -> dict:
        n = max(1, count)
        out = {}
        for name, pid in self.pids.items():
            (user0, sys0), (user1, sys1) = self.ticks[name], cpu_split(pid)
            out[f"{name}_cpu_us_per_request"] = round((user1 - user0 + sys1 - sys0) / CLK_TCK * 1e6 / n)
            out[f"{name}_user_us_per_request"] = round((user1 - user0) / CLK_TCK * 1e6 / n)
            out[f"{name}_sys_us_per_request"] = round((sys1 - sys0) / CLK_TCK * 1e6 / n)
        for name, (reads, writes) in self.io.items():
            now = syscalls(self.pids[name])
            out[f"{name}_reads_per_request"] = round((now[0] - reads) / n, 2)
            out[f"{name}_writes_per_request"] = round((now[1] - writes) / n, 2)
        return out


# ---- the processes of one side ---------------------------------------------------------------------

class Side:
    """One daemon consuming its own queue, and (for the server path) one lambda-server in front of it."""

    def __init__(self, name: str, daemon: List[str], server: List[str], args: argparse.Namespace,
                 logs: Path) -> None:
        self.name, self.daemon_command, self.server_command = name, daemon, server
        self.args, self.logs = args, logs
        self.queue = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_", "LOG_LEVEL", "PRINT_REPORTS"))}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.uri = args.amqp_uri + "?connection_attempts=5&retry_delay=1&heartbeat=0"
        self.daemon: Optional[subprocess.Popen] = None
        self.server: Optional[subprocess.Popen] = None
        self.server_port = 0
        self.invoke_path = f"/2015-03-31/functions/{self.queue}/invocations"

    def _start(self, role: str, argv: List[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{self.name}-{role}.log", "wb")  # noqa: SIM115 (the child keeps it)
        with log:
            return subprocess.Popen(argv, env=env, cwd=str(ECHO_DIR), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, role: str) -> str:
        return (self.logs / f"{self.name}-{role}.log").read_text(errors="replace")[-2000:]

    def start_daemon(self) -> None:
        mc = str(self.args.max_concurrency)
        env = dict(self.env, PORT=str(free_port()), RUNTIME_API_PORT=str(free_port()), AMQP_URI=self.uri,
                   AWS_LAMBDA_FUNCTION_NAME=self.queue, MAX_CONCURRENCY=mc, MIN_INSTANCES=mc)
        self.daemon = self._start("daemon", [*self.daemon_command, sys.executable, "-m", "awslambdaric",
                                             "echo.handler"], env)

    def start_server(self) -> None:
        self.server_port = free_port()
        self.server = self._start("server", self.server_command,
                                  dict(self.env, PORT=str(self.server_port), AMQP_URI=self.uri))

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}{self.invoke_path}"

    def check_alive(self) -> None:
        for role, proc in (("daemon", self.daemon), ("server", self.server)):
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"{self.name}: the {role} exited with {proc.returncode}:\n{self.log_tail(role)}")

    def wait_server(self, timeout: float = 30.0) -> None:
        """Real invokes through the lambda-server until one echoes (a Go lambda-server answers before its
        broker connection is up, with an empty reply)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            conn = http.client.HTTPConnection("127.0.0.1", self.server_port, timeout=5)
            try:
                conn.request("POST", self.invoke_path, PAYLOAD.encode(), {"Content-Type": "application/json"})
                response = conn.getresponse()
                if response.status == 200 and json.loads(response.read()) == json.loads(PAYLOAD):
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: the lambda-server did not echo within {timeout} s:\n{self.log_tail('server')}")

    def memory(self) -> dict:
        out = {}
        for role, proc in (("daemon", self.daemon), ("server", self.server)):
            if proc is not None and proc.poll() is None:
                kb = memory_kb(proc.pid)
                out[f"{role}_rss_mb"] = round(kb["VmRSS"] / 1024, 1)
                out[f"{role}_peak_rss_mb"] = round(kb["VmHWM"] / 1024, 1)
        return out

    def stop(self) -> None:
        for proc in (self.server, self.daemon):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session (never other processes)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


# ---- AMQP-RPC client -----------------------------------------------------------------------------

class RpcClient:
    """aio-pika on one connection, replies by direct reply-to, matched by correlation id."""

    def __init__(self) -> None:
        self.waiting: Dict[str, asyncio.Future] = {}

    async def open(self, uri: str) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(uri)
        channel = await self.connection.channel(publisher_confirms=False)
        self.underlay = await channel.get_underlay_channel()
        await self.underlay.basic_consume("amq.rabbitmq.reply-to", self._on_reply, no_ack=True)

    def _on_reply(self, message) -> None:
        future = self.waiting.pop(message.header.properties.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, queue: str, timeout: float) -> bytes:
        from pamqp.commands import Basic

        cid = str(uuid.uuid4())
        future = self.waiting[cid] = asyncio.get_running_loop().create_future()
        try:
            await self.underlay.basic_publish(PAYLOAD.encode(), routing_key=queue, properties=Basic.Properties(
                reply_to="amq.rabbitmq.reply-to", correlation_id=cid, content_type="application/json"))
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(cid, None)

    async def close(self) -> None:
        await self.connection.close()


async def wait_consumer(uri: str, side: Side, timeout: float = 30.0) -> None:
    """RPCs until one is answered: the daemon has declared its queue and consumes it."""
    client = RpcClient()
    await client.open(uri)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            side.check_alive()
            try:
                if await client.call(side.queue, 1.0) == PAYLOAD.encode():
                    return
            except asyncio.TimeoutError:
                pass
        raise SystemExit(f"{side.name}: the daemon did not answer on {side.queue} within {timeout} s:\n"
                         f"{side.log_tail('daemon')}")
    finally:
        await client.close()


async def amqp_window(uri: str, queue: str, inflight: int, seconds: float, warmup: float,
                      pids: Dict[str, int]) -> dict:
    client = RpcClient()
    await client.open(uri)
    loop = asyncio.get_running_loop()
    latencies = array("d")
    counted = [0, 0]  # replies, bad replies
    measuring = [False]
    stop_at = loop.time() + warmup + seconds

    async def worker() -> None:
        while loop.time() < stop_at:
            started = time.perf_counter()  # (uvloop's loop.time() ticks in whole milliseconds)
            body = await client.call(queue, 30)
            if measuring[0]:
                latencies.append(time.perf_counter() - started)
                counted[0] += 1
                if body != PAYLOAD.encode():
                    counted[1] += 1

    tasks = [loop.create_task(worker()) for _ in range(inflight)]
    await asyncio.sleep(warmup)
    measuring[0] = True
    began = loop.time()
    usage, cpu_client = Usage(pids), time.process_time()
    await asyncio.sleep(seconds)
    measuring[0] = False
    elapsed = loop.time() - began
    cpu_client = time.process_time() - cpu_client
    per_process = usage.per(counted[0])
    await asyncio.gather(*tasks)
    await client.close()
    return {"rate": round(counted[0] / elapsed, 1), "count": counted[0], "seconds": round(elapsed, 2),
            "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2), "errors": counted[1], **per_process,
            "client_cpu_us_per_request": round(cpu_client * 1e6 / max(1, counted[0]))}


def server_window(url: str, connections: int, seconds: float, pids: Dict[str, int], load: Load) -> dict:
    usage = Usage(pids)
    result = drive(url, connections, seconds, load)
    return {"rate": round(result["rate"], 1), "count": result["requests"], "seconds": result["duration_us"] / 1e6,
            "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "errors": result["errors"],
            **usage.per(result["requests"]), "client_cpu_us_per_request": round(result["loadgen_cpu_us_per_inv"])}


# ---- the run ---------------------------------------------------------------------------------------

async def open_sentinel(uri: str):
    """An idle connection held for the whole run: closed at the end means the broker went away meanwhile
    (a ``rabbitmqctl stop_app`` keeps the broker's pid)."""
    import aio_pika

    return await aio_pika.connect(uri + ("&" if "?" in uri else "?") + "heartbeat=0")  # the loop idles between windows


def broker_pid() -> Optional[int]:
    found = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def run_all(args: argparse.Namespace, sides: List[Side], workloads: List[str]) -> dict:
    uri = args.amqp_uri
    broker = broker_pid()
    ceiling = Ceiling(args.max_concurrency, PAYLOAD)
    rounds: List[dict] = []
    loop = new_event_loop()
    try:
        for side in sides:
            side.start_daemon()
        for side in sides:
            loop.run_until_complete(wait_consumer(uri, side))
            if "server" in workloads:
                side.start_server()
        for side in sides:
            if "server" in workloads:
                side.wait_server()
            print(f"{side.name}: daemon pid {side.daemon.pid}, queue {side.queue}"  # type: ignore[union-attr]
                  + (f", lambda-server pid {side.server.pid}" if side.server else ""), file=sys.stderr, flush=True)
        ceiling.run(min(args.warmup, 1.0))  # the ceiling's runtimes warm up too
        sentinel = loop.run_until_complete(open_sentinel(uri))
        for r in range(args.rounds):
            measured: dict = {"workloads": {}}
            if r % 2 == 0:
                measured["ceiling"] = ceiling.run(args.seconds)
            for w, workload in enumerate(workloads):
                order = sides[(r + w) % len(sides):] + sides[:(r + w) % len(sides)]
                for side in order:
                    pids = {"daemon": side.daemon.pid}  # type: ignore[union-attr]
                    if workload == "server":
                        pids["server"] = side.server.pid  # type: ignore[union-attr]
                    if broker:
                        pids["broker"] = broker
                    if workload == "server":
                        drive(side.server_url, args.connections, max(1.0, args.warmup), args.load)  # warm-up
                        result = server_window(side.server_url, args.connections, args.seconds, pids, args.load)
                    else:
                        result = loop.run_until_complete(amqp_window(
                            uri, side.queue, int(workload.split("=")[1]), args.seconds, args.warmup, pids))
                    side.check_alive()
                    result["instances"] = len(children_of(side.daemon.pid))  # type: ignore[union-attr]
                    emit({"bench": label(workload, args), "side": side.name, "round": r + 1, **result})
                    measured["workloads"].setdefault(workload, {})[side.name] = result
            if r % 2 == 1:
                measured["ceiling"] = ceiling.run(args.seconds)
            emit({"bench": "ceiling", "round": r + 1, **measured["ceiling"]})
            rounds.append(measured)
        memory = {side.name: side.memory() for side in sides}
        loop.run_until_complete(asyncio.sleep(0.05))  # let a closed sentinel connection notice
        broker_restarted = (broker is not None and broker_pid() != broker) or sentinel.is_closed
        loop.run_until_complete(sentinel.close())
    finally:
        loop.close()
        for side in sides:
            side.stop()
            cleanup = asyncio.new_event_loop()  # the daemon's queue is durable: it would outlive the run
            try:
                cleanup.run_until_complete(delete_queue(args.amqp_uri, side.queue))
            except Exception as e:  # noqa: BLE001 - a queue left behind is reported, not fatal
                print(f"could not delete queue {side.queue}: {e}", file=sys.stderr)
            finally:
                cleanup.close()
        ceiling.close()
    return {"rounds": rounds, "memory": memory, "broker_restarted": broker_restarted}


def label(workload: str, args: argparse.Namespace) -> str:
    if workload == "server":
        return f"lambda-server c={args.connections}"
    return f"amqp-rpc {workload}"


METRICS = ("rate", "p50_ms", "p99_ms", "daemon_cpu_us_per_request", "server_cpu_us_per_request",
           "broker_cpu_us_per_request", "client_cpu_us_per_request", "daemon_user_us_per_request",
           "daemon_sys_us_per_request", "server_user_us_per_request", "server_sys_us_per_request",
           "daemon_reads_per_request", "daemon_writes_per_request", "server_reads_per_request",
           "server_writes_per_request")


def summarise(run: dict, sides: List[Side], workloads: List[str]) -> dict:
    rounds = run["rounds"]
    ceiling = {k: statistics.median(r["ceiling"][k] for r in rounds) for k in ("rate", "p50_ms", "p99_ms")}
    out: dict = {"ceiling": ceiling, "workloads": {}}
    for workload in workloads:
        per_side = {}
        for side in sides:
            windows = [r["workloads"][workload][side.name] for r in rounds]
            per_side[side.name] = {k: statistics.median(w[k] for w in windows) for k in METRICS if k in windows[0]}
            per_side[side.name]["errors"] = sum(w["errors"] for w in windows)
            # A window far below the side's best is a stall (e.g. replies lost by the lambda-server hold
            # wrk's connections): say so, since the median only hides one of three.
            best = max(w["rate"] for w in windows)
            per_side[side.name]["stalled_rounds"] = [r + 1 for r, w in enumerate(windows) if w["rate"] < STALL * best]
            per_side[side.name]["of_ceiling"] = statistics.median(
                w["rate"] / r["ceiling"]["rate"] for w, r in zip(windows, rounds) if r["ceiling"]["rate"])
        summary = {"sides": per_side}
        if len(sides) == 2:
            ours, peer = sides[0].name, sides[1].name
            summary["x_peer"] = statistics.median(r["workloads"][workload][ours]["rate"]
                                                  / max(r["workloads"][workload][peer]["rate"], 1e-9) for r in rounds)
        out["workloads"][workload] = summary
    return out


def report(summary: dict, memory: dict, sides: List[Side], workloads: List[str], args: argparse.Namespace) -> List[str]:
    lines = [f"{'workload':<20} {'side':<9} {'rate/s':>8} {'of ceil':>7} {'p50 ms':>7} {'p99 ms':>7} {'daemon':>7} "
             f"{'server':>7} {'broker':>7} {'client':>7}",
             f"{'':<20} {'':<9} {'':>8} {'':>7} {'':>7} {'':>7} {'CPU us per reply / request':>31}"]

    def cell(values: dict, key: str) -> str:
        return f"{values[key]:>7.0f}" if key in values else f"{'-':>7}"

    for workload in workloads:
        s = summary["workloads"][workload]
        name = label(workload, args)
        for side in sides:
            v = s["sides"][side.name]
            lines.append(f"{name:<20} {side.name:<9} {v['rate']:>8,.0f} {v['of_ceiling']:>7.2f} {v['p50_ms']:>7.2f} "
                         f"{v['p99_ms']:>7.2f} {cell(v, 'daemon_cpu_us_per_request')} "
                         f"{cell(v, 'server_cpu_us_per_request')} {cell(v, 'broker_cpu_us_per_request')} "
                         f"{cell(v, 'client_cpu_us_per_request')}")
            name = ""
        if "x_peer" in s:
            a, b = (s["sides"][side.name] for side in sides)
            ratios = [f"{a[k] / b[k]:>7.2f}" if b.get(k) else f"{'-':>7}" for k in
                      ("p50_ms", "p99_ms", "daemon_cpu_us_per_request", "server_cpu_us_per_request",
                       "broker_cpu_us_per_request")]
            lines.append(f"{'':<20} {'ours÷' + sides[1].name:<9} {s['x_peer']:>8.2f} {'':>7} " + " ".join(ratios))
    c = summary["ceiling"]
    lines.append(f"ceiling ({args.max_concurrency} runtimes, no daemon): {c['rate']:,.0f} inv/s, p50 "
                 f"{c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms")
    for side in sides:
        m = memory[side.name]
        text = ", ".join(f"{role} {m[role + '_rss_mb']:.1f} MB (peak {m[role + '_peak_rss_mb']:.1f})"
                         for role in ("daemon", "server") if role + "_rss_mb" in m)
        lines.append(f"RSS after load, {side.name}: {text}")
    failed = ", ".join(f"{side.name} {sum(summary['workloads'][w]['sides'][side.name]['errors'] for w in workloads)}"
                       for side in sides)
    lines.append(f"failed requests (bad replies, wrk errors): {failed}")
    for workload in workloads:
        for side in sides:
            stalled = summary["workloads"][workload]["sides"][side.name]["stalled_rounds"]
            if stalled:
                lines.append(f"WARNING: {label(workload, args)}, {side.name}: round(s) {stalled} ran below "
                             f"{STALL:.0%} of its best round (stalled?)")
    lines.append("broker CPU: the one RabbitMQ shared with everything else on the machine (an upper bound)")
    return lines


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--path", choices=("amqp", "server", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per window (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window (default 1)")
    parser.add_argument("--inflight", default="8", help="AMQP-RPC requests in flight, a list (default 8)")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections to lambda-server (default 8)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--amqp-uri", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--peer-daemon", type=Path, help="a peer daemon (e.g. the Go one) on a queue of its own")
    parser.add_argument("--peer-server", type=Path, help="a peer lambda-server in front of the peer's daemon")
    parser.add_argument("--peer-label", default="peer", help="the peer's name in the report (default: peer)")
    parser.add_argument("--output", type=Path, help="JSON results file (default bench/results/amqp-<time>.json)")
    args = parser.parse_args(argv)
    for name in ("peer_daemon", "peer_server"):
        value = getattr(args, name)
        if value is not None:
            found = shutil.which(str(value))
            if found is None:
                parser.error(f"--{name.replace('_', '-')}: {value} is not an executable")
            setattr(args, name, Path(found).resolve())
    try:
        args.inflight_list = [int(x) for x in args.inflight.split(",")]
    except ValueError:
        parser.error(f"--inflight: expected a list like 8,32, got {args.inflight!r}")
    wrk = shutil.which("wrk")
    # A 2 s wrk timeout: a reply the lambda-server loses then shows up as an error (and its connection is
    # replaced) instead of silently holding one of the few connections for the rest of the window.
    args.load = Load("wrk" if wrk else "python", PAYLOAD, wrk, args.wrk_threads, timeout=2.0)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    workloads = ([f"inflight={n}" for n in args.inflight_list] if args.path in ("amqp", "both") else []) + (
        ["server"] if args.path in ("server", "both") else [])
    ours = ([str(BIN / "lambda-runtime-api-daemon")], [str(BIN / "lambda-server")])
    load_at_start = loadavg()
    print(f"lambda-rapid AMQP benchmark: {os.cpu_count()} CPUs, load average {load_at_start:.2f}, "
          f"{args.rounds} round(s) of {args.seconds} s, MAX_CONCURRENCY={args.max_concurrency}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lambda-rapid-amqp-bench-") as tmp:
        logs = Path(tmp)
        sides = [Side("ours", *ours, args, logs)]
        if args.peer_daemon or args.peer_server:
            peer = ([str(args.peer_daemon)] if args.peer_daemon else ours[0],
                    [str(args.peer_server)] if args.peer_server else ours[1])
            sides.append(Side(args.peer_label, *peer, args, logs))
            print(f"peer ({args.peer_label}): daemon {peer[0][0]}, lambda-server {peer[1][0]}", flush=True)
        run = run_all(args, sides, workloads)
    summary = summarise(run, sides, workloads)
    load_at_end = loadavg()
    lines = report(summary, run["memory"], sides, workloads, args)
    lines.append(f"load average {load_at_start:.2f} at start, {load_at_end:.2f} at end; revision {git_revision()}")
    if run["broker_restarted"]:
        lines.append("WARNING: the broker restarted (or dropped its connections) during the run: not comparable")
    print()
    print("\n".join(lines))
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": load_at_end},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "load"},
        "sides": {side.name: {"daemon": side.daemon_command, "server": side.server_command} for side in sides},
        **run, **summary, "report": lines,
    }
    output = args.output or RESULTS / f"amqp-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {output}")
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
