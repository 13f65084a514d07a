"""The fault suite: the real daemon, lambda-server, awslambdaric and RabbitMQ under load and faults.

One command, bounded in time and count, that runs and reports with figures (docs/reliability.md
explains each figure and holds the latest ones)::

    .venv/bin/python bench/faults.py            # everything, ~10 minutes
    .venv/bin/python bench/faults.py --quick    # smoke run, ~2 minutes
    .venv/bin/python bench/faults.py --only soak,drain --soak-invokes 20000

Scenarios (``--only`` takes these names):

* ``soak``: N invokes (default 100,000) on keep-alive connections, each payload unique and checked
  in the echo: misrouted answers, the daemon's RSS and open file descriptors before and after.
* ``crash``, ``timeout``: a storm of invocations whose runtime exits (resp. hangs past the timeout
  with a grandchild in its process group): every call answered once, time to answer, processes left.
* ``drain``: SIGTERM while keep-alive clients keep sending: answers before and after the signal,
  empty replies (EOF after a request was sent), refused connections.
* ``outage``: ``rabbitmqctl stop_app`` / ``start_app`` under AMQP-RPC load and under lambda-server
  load, for every queue type the daemon offers (detected by trying its settings): confirmed
  requests never answered, duplicate runs (the function records each run), duplicate replies,
  time to recover.
* ``sigkill``: SIGKILL of one of two daemons consuming one queue.
* ``partition``: the daemons in a network namespace of our own, reaching the broker over a veth
  link (a socat relay in the root namespace, bound to our veth address, forwards to the broker on
  127.0.0.1); the link goes down for 10 s, then up: nothing confirmed lost, reconnect without a
  restart, the Invoke API inside the namespace answers throughout.
* ``fuzz``: the atheris harnesses in tests/fuzz/ (HTTP connection with the httptools backend and
  with the pure-Python fallback, Invoke API validation): inputs tried, coverage, crashes.

Traffic goes to loopback and to the veth addresses of the namespace this script creates, nowhere
else. Every process it starts runs in a session of its own and is killed with its whole session at
the end; the namespace and the veth link are deleted; a stopped broker is always started again; the
queues it declared are deleted. That also happens on Ctrl-C, SIGTERM or an error. The broker is
shared with whoever else uses it: outages are kept to a few seconds, one per scenario.

Prints a summary, writes every figure to bench/results/faults-<UTC time>.json and, with
``--markdown``, the figures as Markdown for docs/reliability.md. Exit status 0 when every target
is met, 1 when one is missed, 2 when the suite could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FUZZ = ROOT / "tests" / "fuzz"
PYTHON = sys.executable
BIN = Path(sys.executable).parent
DAEMON = BIN / "lambda-runtime-api-daemon"
SERVER = BIN / "lambda-server"
HANDLER = "faults_function.handler"  # bench/faults_function.py
BROKER_URI = "amqp://guest:guest@127.0.0.1:5672/"
# Fast reconnects for the programs under test: the outages here last seconds.
FAST_RETRY = "?connection_attempts=1000&retry_delay=0.5&heartbeat=0"
INVOKE_PATH = "/2015-03-31/functions/{}/invocations"
SCENARIOS = ("soak", "crash", "timeout", "drain", "outage", "sigkill", "partition", "fuzz")
AMQP_SCENARIOS = ("outage", "sigkill", "partition")
# Settings tried to find the queue types the daemon offers; identical results count once.
QUEUE_CANDIDATES = (
    {},
    {"AMQP_DURABLE_QUEUE": "true"},
    {"AMQP_DURABLE_QUEUE": "false"},
    {"AMQP_QUEUE_TYPE": "classic"},
    {"AMQP_QUEUE_TYPE": "quorum"},
)


def log(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- what we start, and how it is all taken down again ------------------------------------------

class Child:
    """A program under test, in a session of its own (so it and everything it starts can be found
    again: the daemon's runtimes live in process groups of their own inside its session)."""

    def __init__(self, label: str, argv: list, env: dict, cwd: Path, workdir: Path,
                 netns: Optional[str] = None) -> None:
        self.label = label
        self.out_path = workdir / f"{label}.out"
        self.err_path = workdir / f"{label}.err"
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]  # ip execs the program: same pid
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=str(cwd), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def members(self) -> list:
        """Processes of this session other than the session leader: (pid, state, name)."""
        return [p for p in session_processes(self.pid) if p[0] != self.pid]

    def terminate(self, timeout: float = 20.0) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the whole session, the process groups its members made included."""
        for pid, _state, _name in session_processes(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def session_processes(sid: int) -> list:
    """(pid, state, name) of every process whose session id is ``sid`` (zombies included)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            found.append((int(entry), fields[0], name))
    return found


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Cleanup:
    """Everything the suite changed outside its own process, undone in reverse, at most once each."""

    def __init__(self) -> None:
        self.children: list = []
        self.netns: list = []
        self.links: list = []
        self.queues: set = set()
        self.broker_stopped = False

    def child(self, *args, **kwargs) -> Child:
        c = Child(*args, **kwargs)
        self.children.append(c)
        return c

    def run(self) -> None:
        for attempt in range(3):
            if not self.broker_stopped:
                break
            log("starting the broker again (rabbitmqctl start_app)")
            try:
                start_broker()
            except Exception as e:  # e.g. a stop_app still under way in another thread
                log(f"!! could not start the broker again: {e}")
                if attempt == 2:
                    log("!! run `rabbitmqctl start_app` by hand")
                else:
                    time.sleep(3)
        for c in reversed(self.children):
            c.kill()
        self.children.clear()
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        self.links.clear()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.netns.clear()
        if self.queues:
            try:
                asyncio.run(delete_queues(sorted(self.queues)))
                self.queues.clear()
            except Exception as e:
                log(f"could not delete the test queues {sorted(self.queues)}: {e}")


CLEANUP = Cleanup()


def rabbitmqctl(*args: str, timeout: float = 90.0) -> str:
    # Its own session: a Ctrl-C on the suite must not kill a start_app half-way.
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout,
                          start_new_session=True, env=dict(os.environ, HOME=os.environ.get("HOME", "/root")))
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def stop_broker() -> None:
    CLEANUP.broker_stopped = True
    rabbitmqctl("stop_app")


def start_broker() -> None:
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    CLEANUP.broker_stopped = False


# ---- the programs under test --------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_", "FAULTS_"))}
    env.pop("PORT", None)
    env.pop("RUNTIME_API_PORT", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Daemon:
    """``lambda-runtime-api-daemon`` serving bench/faults_function.py under awslambdaric."""

    def __init__(self, ctx: Context, label: str, name: str = "function", netns: Optional[str] = None,
                 host: str = "127.0.0.1", **env) -> None:
        self.port = free_port()
        self.host = host  # where this process reaches the daemon's Invoke API
        self.name = name
        self.run_log = ctx.workdir / f"{label}.runs"
        self.tag = env.pop("FAULTS_TAG", label)
        full = program_env(PORT=self.port, RUNTIME_API_PORT=free_port(), AWS_LAMBDA_FUNCTION_NAME=name,
                           FAULTS_RUN_LOG=self.run_log, FAULTS_TAG=self.tag, **env)
        argv = [str(DAEMON), PYTHON, "-m", "awslambdaric", HANDLER]
        self.child = CLEANUP.child(label, argv, full, BENCH, ctx.workdir, netns=netns)
        self.pid = self.child.pid

    async def healthy(self, timeout: float = 30.0) -> None:
        await wait_http(self.host, self.port, timeout, self.child)


async def wait_http(host: str, port: int, timeout: float, child: Child, path: str = "/_/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.label} exited with {child.proc.returncode}: {child.stderr[-2000:]}")
        conn = Http(host, port)
        reply = await conn.request("GET", path, timeout=2.0)
        conn.close()
        if reply.status == 200:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{child.label}: {path} not 200 within {timeout}s: {child.stderr[-2000:]}")


def read_runs(path: Path) -> dict:
    """Every recorded run: id -> [(tag, pid), ...]."""
    runs: dict = {}
    try:
        text = path.read_text()
    except OSError:
        return runs
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            runs.setdefault(parts[0], []).append((parts[1], parts[2]))
    return runs


# ---- an HTTP/1.1 client that accounts for every byte ---------------------------------------------

class Reply:
    __slots__ = ("status", "outcome", "headers", "body", "seconds", "close")

    def __init__(self, status: int, outcome: str, headers: Optional[dict] = None, body: bytes = b"",
                 seconds: float = 0.0, close: bool = False) -> None:
        self.status = status  # 0 when there was no answer
        # "answer"; "refused" / "connect_error" (no connection); "empty" (EOF after the request was
        # sent, not one byte of answer); "reset"; "truncated" (part of an answer); "timeout"
        self.outcome = outcome
        self.headers = headers or {}
        self.body = body
        self.seconds = seconds
        self.close = close


class Http:
    """One keep-alive connection. Requests are sent whole and answers read exactly (Content-Length),
    so an answer that never comes, comes twice or comes on the wrong connection is seen."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def open(self, timeout: float = 5.0) -> Optional[str]:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=1 << 22), timeout)
        except ConnectionRefusedError:
            return "refused"
        except (OSError, asyncio.TimeoutError):
            return "connect_error"
        return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: bytes = b"",
                      timeout: float = 30.0) -> Reply:
        if self.writer is None:
            error = await self.open()
            if error is not None:
                return Reply(0, error)
        assert self.reader is not None and self.writer is not None
        data = b"%s %s HTTP/1.1\r\nhost: %s:%d\r\n%scontent-length: %d\r\n\r\n%s" % (
            method.encode(), path.encode(), self.host.encode(), self.port, headers, len(body), body)
        start = time.monotonic()
        try:
            self.writer.write(data)
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head[9:12])
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
            length = int(fields.get("content-length", "0"))
            content = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        except asyncio.IncompleteReadError as e:
            self.close()
            return Reply(0, "empty" if not e.partial else "truncated", seconds=time.monotonic() - start)
        except (ConnectionResetError, BrokenPipeError):
            self.close()
            return Reply(0, "reset", seconds=time.monotonic() - start)
        except asyncio.TimeoutError:
            self.close()
            return Reply(0, "timeout", seconds=time.monotonic() - start)
        except (OSError, ValueError):
            self.close()
            return Reply(0, "truncated", seconds=time.monotonic() - start)
        close = fields.get("connection", "").lower() == "close"
        if close:
            self.close()
        return Reply(status, "answer", fields, content, time.monotonic() - start, close)

    async def invoke(self, name: str, body: bytes, request_id: Optional[str] = None,
                     timeout: float = 30.0) -> Reply:
        headers = b"content-type: application/json\r\n"
        if request_id is not None:
            headers += b"amz-sdk-invocation-id: %s\r\n" % request_id.encode()
        return await self.request("POST", INVOKE_PATH.format(name), body, headers, timeout)

    async def stray_bytes(self, wait: float = 0.2) -> int:
        """Bytes the server sent that no request asked for (an answer given twice)."""
        if self.reader is None:
            return 0
        try:
            data = await asyncio.wait_for(self.reader.read(65536), wait)
        except (asyncio.TimeoutError, OSError):
            return 0
        return len(data)


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value * 1000, 1)


def error_type(reply: Reply) -> str:
    """x-amzn-ErrorType, else the errorType of a function error body, else ''."""
    if "x-amzn-errortype" in reply.headers:
        return reply.headers["x-amzn-errortype"]
    if "x-amz-function-error" in reply.headers:
        try:
            return json.loads(reply.body).get("errorType", "?")
        except (ValueError, AttributeError):
            return "?"
    return ""


# ---- scenario: soak -----------------------------------------------------------------------------

async def soak(ctx: Context) -> dict:
    args = ctx.args
    total = args.soak_invokes
    warmup = min(2000, max(100, total // 20))
    daemon = Daemon(ctx, "soak", MAX_CONCURRENCY=args.soak_concurrency)
    await daemon.healthy()
    counts = {"sent": 0, "ok": 0, "misrouted_body": 0, "misrouted_request_id": 0, "bad_status": 0,
              "no_answer": 0}
    latencies: list = []
    deadline = time.monotonic() + args.soak_max_seconds
    todo = [warmup + total]

    async def worker() -> None:
        conn = Http(daemon.host, daemon.port)
        while todo[0] > 0 and time.monotonic() < deadline:
            todo[0] -= 1
            rid = str(uuid.uuid4())
            reply = await conn.invoke("function", b'{"id":"%s"}' % rid.encode(), rid)
            counts["sent"] += 1
            if reply.outcome != "answer":
                counts["no_answer"] += 1
                continue
            if reply.status != 200:
                counts["bad_status"] += 1
                continue
            try:
                echoed = json.loads(reply.body).get("id")
            except (ValueError, AttributeError):
                echoed = None
            if echoed != rid:
                counts["misrouted_body"] += 1
            elif reply.headers.get("x-amzn-requestid") != rid:
                counts["misrouted_request_id"] += 1
            else:
                counts["ok"] += 1
            if len(latencies) < 200_000:
                latencies.append(reply.seconds)
        conn.close()

    samples: list = []
    baseline: dict = {}

    async def sampler() -> None:
        while True:
            done = counts["sent"]
            sample = {"invokes": done, "rss_kb": rss_kb(daemon.pid), "fds": fd_count(daemon.pid),
                      "t": round(time.monotonic() - started, 1)}
            if not baseline and done >= warmup:
                baseline.update(sample)
            samples.append(sample)
            await asyncio.sleep(1.0)

    started = time.monotonic()
    watcher = asyncio.get_running_loop().create_task(sampler())
    await asyncio.gather(*(worker() for _ in range(args.soak_connections)))
    elapsed = time.monotonic() - started
    watcher.cancel()
    end = {"invokes": counts["sent"], "rss_kb": rss_kb(daemon.pid), "fds": fd_count(daemon.pid)}
    if not baseline:
        baseline.update(samples[0] if samples else end)
    rc = await asyncio.to_thread(daemon.child.terminate)
    measured = counts["sent"] - baseline["invokes"]
    return {
        "invokes": counts["sent"], "measured_after_warmup": measured, "connections": args.soak_connections,
        "max_concurrency": args.soak_concurrency, "seconds": round(elapsed, 1),
        "invokes_per_s": round(counts["sent"] / elapsed, 0) if elapsed else None,
        **counts, "misrouted": counts["misrouted_body"] + counts["misrouted_request_id"],
        "p50_ms": ms(percentile(latencies, 0.5)), "p99_ms": ms(percentile(latencies, 0.99)),
        "rss_kb_start": baseline["rss_kb"], "rss_kb_end": end["rss_kb"],
        "rss_kb_max": max([s["rss_kb"] for s in samples] + [end["rss_kb"]]),
        "rss_growth_kb": end["rss_kb"] - baseline["rss_kb"],
        "fds_start": baseline["fds"], "fds_end": end["fds"], "fd_growth": end["fds"] - baseline["fds"],
        "stopped_early": counts["sent"] < warmup + total, "exit_status": rc,
        "samples": samples[:: max(1, len(samples) // 20)],
    }


# ---- scenarios: crash storm and timeout storm ------------------------------------------------------

async def storm(ctx: Context, label: str, action: str, calls: int, expect: str, connections: int, **env) -> dict:
    daemon = Daemon(ctx, label, **env)
    await daemon.healthy()
    body = json.dumps({"action": action}).encode()
    todo = [calls]
    results: list = []
    conns: list = []

    async def worker() -> None:
        conn = Http(daemon.host, daemon.port)
        conns.append(conn)
        while todo[0] > 0:
            todo[0] -= 1
            rid = str(uuid.uuid4())
            reply = await conn.invoke("function", body, rid, timeout=60.0)
            results.append((rid, reply))

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.monotonic() - started
    stray = sum(await asyncio.gather(*(c.stray_bytes() for c in conns)))
    for c in conns:
        c.close()
    after_last = daemon.child.members()
    # Processes still there when the storm is over: poll until only live runtimes remain (bounded).
    settle_deadline = time.monotonic() + 10.0
    while True:
        members = daemon.child.members()
        zombies = [m for m in members if m[1] == "Z"]
        sleepers = [m for m in members if m[2] == "sleep"]
        runtimes = [m for m in members if m[1] != "Z" and m[2] != "sleep"]
        if (not zombies and not sleepers and len(runtimes) <= int(env.get("MAX_CONCURRENCY", 1))) \
                or time.monotonic() > settle_deadline:
            break
        await asyncio.sleep(0.05)
    settled_s = time.monotonic() - started - elapsed
    rc = await asyncio.to_thread(daemon.child.terminate)
    left_after_exit = daemon.child.members()
    outcomes: dict = {}
    misrouted = 0
    latencies = []
    for rid, reply in results:
        key = reply.outcome if reply.outcome != "answer" else f"{reply.status} {error_type(reply) or 'ok'}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if reply.outcome == "answer":
            latencies.append(reply.seconds)
            if reply.headers.get("x-amzn-requestid") != rid:
                misrouted += 1
    expected = outcomes.get(f"200 {expect}", 0)
    return {
        "calls": calls, "connections": connections, "max_concurrency": int(env.get("MAX_CONCURRENCY", 1)),
        "timeout_s": float(env.get("AWS_LAMBDA_FUNCTION_TIMEOUT", 3)), "seconds": round(elapsed, 1),
        "answered": len(latencies), "answered_as_expected": expected, "expected_answer": f"200 {expect}",
        "unanswered": calls - len(latencies), "misrouted": misrouted, "stray_bytes": stray, "outcomes": outcomes,
        "p50_ms": ms(percentile(latencies, 0.5)), "p99_ms": ms(percentile(latencies, 0.99)),
        "max_ms": ms(max(latencies) if latencies else None),
        "processes_after_last_answer": len(after_last),
        "zombies_after_last_answer": sum(1 for m in after_last if m[1] == "Z"),
        "grandchildren_after_last_answer": sum(1 for m in after_last if m[2] == "sleep"),
        "processes_settled": len(members), "zombies_settled": len(zombies), "grandchildren_settled": len(sleepers),
        "settle_ms": ms(settled_s), "left_after_exit": len(left_after_exit), "exit_status": rc,
    }


async def crash_storm(ctx: Context) -> dict:
    """More callers than runtimes: a crash is answered at once, so the queued calls get fresh runtimes."""
    return await storm(ctx, "crash", "crash", ctx.args.crash_calls, "Runtime.ExitError", ctx.args.storm_connections,
                       MAX_CONCURRENCY=max(1, ctx.args.storm_connections // 2))


async def timeout_storm(ctx: Context) -> dict:
    """One runtime per caller: a call queued behind a hanging one would wait past its own timeout and
    get 429 (no runtime freed in time), which is not what this storm measures. The timeout leaves
    room for the cold start of the runtime that replaces a killed one (a queued call waits at most
    one function timeout, cold start included)."""
    return await storm(ctx, "timeout", "hang", ctx.args.timeout_calls, "Sandbox.Timedout", ctx.args.storm_connections,
                       MAX_CONCURRENCY=ctx.args.storm_connections, AWS_LAMBDA_FUNCTION_TIMEOUT=1.0)


# ---- scenario: SIGTERM drain under load ------------------------------------------------------------

async def drain(ctx: Context) -> dict:
    args = ctx.args
    daemon = Daemon(ctx, "drain", MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_TIMEOUT=5)
    await daemon.healthy()
    signalled: list = []
    records: list = []  # (sent_at, reply)
    deadline = time.monotonic() + args.drain_load_seconds + 30.0

    async def worker() -> None:
        conn = Http(daemon.host, daemon.port)
        while time.monotonic() < deadline:
            rid = str(uuid.uuid4())
            body = json.dumps({"action": "record", "id": rid, "seconds": 0.1}).encode()
            sent = time.monotonic()
            reply = await conn.invoke("function", body, rid, timeout=30.0)
            records.append((sent, rid, reply))
            if reply.outcome in ("refused", "connect_error"):
                return  # the daemon is gone: what a client then sees, and all it can
            if reply.outcome != "answer":
                conn.close()

    workers = [asyncio.get_running_loop().create_task(worker()) for _ in range(args.drain_connections)]
    await asyncio.sleep(args.drain_load_seconds)
    signalled.append(time.monotonic())
    daemon.child.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(daemon.child.proc.wait, 30)
    exited = time.monotonic()
    await asyncio.wait(workers, timeout=35.0)
    for w in workers:
        w.cancel()
    t_sig = signalled[0]
    runs = read_runs(daemon.run_log)
    before: dict = {}
    after: dict = {}
    for sent, _rid, r in records:
        counts = before if sent + r.seconds < t_sig else after
        key = str(r.status) if r.outcome == "answer" else r.outcome
        counts[key] = counts.get(key, 0) + 1
        if r.outcome == "answer" and r.status != 200 and not r.close:
            counts[f"{r.status} kept alive"] = counts.get(f"{r.status} kept alive", 0) + 1
    empty = [(sent, rid) for sent, rid, r in records if r.outcome == "empty"]
    return {
        "connections": args.drain_connections, "load_seconds_before_signal": args.drain_load_seconds,
        "answered_200_before_signal": before.get("200", 0), "before_signal": before, "after_signal": after,
        "empty_replies": len(empty), "resets": after.get("reset", 0), "truncated": after.get("truncated", 0),
        "empty_replies_that_ran": sum(1 for _s, rid in empty if rid in runs),
        "refused_connections": after.get("refused", 0),
        "drain_seconds": round(exited - t_sig, 2), "exit_status": rc,
        "left_after_exit": len(daemon.child.members()),
    }


# ---- AMQP load: a client that keeps a ledger of every request -----------------------------------

class Req:
    __slots__ = ("sent", "state", "replies", "first_reply", "error", "status")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        # AMQP: "confirmed" (acked by the broker), "returned" (unroutable), "nacked", "unconfirmed"
        # (the connection went before the confirm: fate unknown). HTTP: "sent".
        self.state = "publishing"
        self.replies = 0
        self.first_reply: Optional[float] = None
        self.error = ""
        self.status = 0


class AmqpLoad:
    """N requests in flight on a function's queue, persistent and mandatory, with publisher confirms,
    replies on a durable queue of our own (so replies sent while this client is reconnecting wait
    for it). It reconnects by itself; a slot whose reply is late moves on after ``slot_wait``."""

    def __init__(self, queue: str, inflight: int, run_seconds: float, slot_wait: float = 2.0,
                 uri: str = BROKER_URI) -> None:
        self.uri = uri
        self.queue = queue
        self.reply_queue = f"{queue}.replies"
        CLEANUP.queues.add(self.reply_queue)
        self.inflight = inflight
        self.run_seconds = run_seconds
        self.slot_wait = slot_wait
        self.reqs: dict = {}
        self.waiters: dict = {}
        self.stray_replies = 0
        self.connections = 0
        self.channel = None
        self.ready = asyncio.Event()
        self.publishing = True
        self.tasks: list = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._keep_connected()))
        await asyncio.wait_for(self.ready.wait(), 30)
        self.tasks.extend(loop.create_task(self._worker()) for _ in range(self.inflight))

    async def _keep_connected(self) -> None:
        import aiormq

        while True:
            conn = None
            try:
                conn = await asyncio.wait_for(aiormq.connect(self.uri), 5)
                channel = await conn.channel(publisher_confirms=True)
                await channel.queue_declare(self.reply_queue, durable=True, arguments={"x-expires": 600_000})
                await channel.basic_consume(self.reply_queue, self._on_reply, no_ack=True)
                self.connections += 1
                self.channel = channel
                self.ready.set()
                await conn.closing
            except asyncio.CancelledError:
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), 2)
                    except Exception:
                        pass
                raise
            except Exception:
                pass
            self.ready.clear()
            self.channel = None
            await asyncio.sleep(0.2)

    async def _on_reply(self, message) -> None:
        cid = message.header.properties.correlation_id
        req = self.reqs.get(cid)
        if req is None:
            self.stray_replies += 1
            return
        req.replies += 1
        if req.first_reply is None:
            req.first_reply = time.monotonic()
            headers = message.header.properties.headers or {}
            for key, value in headers.items():
                if key.lower() in ("x-amzn-errortype", "x-amz-function-error"):
                    req.error = value.decode() if isinstance(value, bytes) else str(value)
        waiter = self.waiters.pop(cid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _worker(self) -> None:
        import aiormq
        from pamqp.commands import Basic

        loop = asyncio.get_running_loop()
        while self.publishing:
            if not self.ready.is_set():
                try:
                    await asyncio.wait_for(self.ready.wait(), 0.5)
                except asyncio.TimeoutError:
                    continue
            channel = self.channel
            if channel is None:
                continue
            rid = str(uuid.uuid4())
            req = self.reqs[rid] = Req(time.monotonic())
            waiter = self.waiters[rid] = loop.create_future()
            body = json.dumps({"action": "record", "id": rid, "seconds": self.run_seconds}).encode()
            props = aiormq.spec.Basic.Properties(correlation_id=rid, reply_to=self.reply_queue, delivery_mode=2,
                                                 content_type="application/json")
            try:
                result = await asyncio.wait_for(
                    channel.basic_publish(body, routing_key=self.queue, properties=props, mandatory=True), 10)
            except aiormq.exceptions.PublishError:  # returned: no queue of that name (aiormq raises it)
                req.state = "returned"
                self.waiters.pop(rid, None)
                await asyncio.sleep(0.05)
                continue
            except Exception:
                req.state = "unconfirmed"
                self.waiters.pop(rid, None)
                await asyncio.sleep(0.05)  # the connection is going: don't spin until it is gone
                continue
            if isinstance(result, Basic.Ack):
                req.state = "confirmed"
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), self.slot_wait)
                except asyncio.TimeoutError:
                    pass
            else:
                req.state = "returned" if isinstance(result, aiormq.abc.DeliveredMessage) else "nacked"
                await asyncio.sleep(0.05)  # refused: don't spin
            self.waiters.pop(rid, None)

    async def finish(self, grace: float) -> None:
        """Stop publishing, then wait (at most ``grace`` s) for every confirmed request's reply."""
        self.publishing = False
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if all(r.replies or r.state != "confirmed" for r in self.reqs.values()):
                break
            await asyncio.sleep(0.1)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def summary(self, runs: dict, t_cut: Optional[float] = None, t_back: Optional[float] = None) -> dict:
        reqs = self.reqs
        states: dict = {}
        for r in reqs.values():
            states[r.state] = states.get(r.state, 0) + 1
        confirmed = [rid for rid, r in reqs.items() if r.state == "confirmed"]
        unanswered = [rid for rid in confirmed if not reqs[rid].replies]
        result = {
            "published": len(reqs), "confirmed": len(confirmed), "returned": states.get("returned", 0),
            "nacked": states.get("nacked", 0), "unconfirmed": states.get("unconfirmed", 0),
            "confirmed_never_answered": len(unanswered),
            "confirmed_never_answered_never_ran": sum(1 for rid in unanswered if rid not in runs),
            "answered": sum(1 for r in reqs.values() if r.replies),
            "error_replies": sum(1 for r in reqs.values() if r.error),
            "duplicate_replies": sum(r.replies - 1 for r in reqs.values() if r.replies > 1),
            "stray_replies": self.stray_replies, "client_connections": self.connections,
            **run_counts(runs, reqs),
        }
        if t_cut is not None and t_back is not None:
            # Nothing is answered while the path is cut: the first reply after it is back is the
            # recovery (daemon and client reconnected); a new request's first answer comes next.
            later = [r.first_reply for r in reqs.values() if r.first_reply and r.first_reply > t_back]
            result["recover_s"] = round(min(later) - t_back, 2) if later else None
            fresh = [r.first_reply for r in reqs.values() if r.sent >= t_back and r.first_reply]
            result["new_request_answered_s"] = round(min(fresh) - t_back, 2) if fresh else None
            stuck = [r.first_reply - r.sent for r in reqs.values() if r.sent < t_cut and r.first_reply
                     and r.first_reply > t_cut]
            result["longest_wait_s"] = round(max(stuck), 2) if stuck else None
        return result


def run_counts(runs: dict, reqs: dict) -> dict:
    """Duplicate runs of our requests: in all, and of one request twice in the same daemon."""
    ours = {rid: r for rid, r in runs.items() if rid in reqs}
    twice = [rid for rid, r in ours.items() if len(r) > 1]
    same_daemon = [rid for rid, r in ours.items() if len({tag for tag, _pid in r}) < len(r)]
    return {"runs": sum(len(r) for r in ours.values()), "duplicate_runs": len(twice),
            "duplicate_runs_same_daemon": len(same_daemon)}


class HttpLoad:
    """N keep-alive connections invoking a function through lambda-server, each request recorded."""

    def __init__(self, host: str, port: int, function: str, connections: int, run_seconds: float) -> None:
        self.host, self.port, self.function = host, port, function
        self.connections = connections
        self.run_seconds = run_seconds
        self.reqs: dict = {}
        self.publishing = True
        self.tasks: list = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._worker()) for _ in range(self.connections)]

    async def _worker(self) -> None:
        conn = Http(self.host, self.port)
        while self.publishing:
            rid = str(uuid.uuid4())
            req = self.reqs[rid] = Req(time.monotonic())
            req.state = "sent"
            body = json.dumps({"action": "record", "id": rid, "seconds": self.run_seconds}).encode()
            reply = await conn.invoke(self.function, body, rid, timeout=60.0)
            if reply.outcome != "answer":
                req.error = reply.outcome
                await asyncio.sleep(0.05)
                continue
            req.status = reply.status
            req.error = error_type(reply)
            req.replies = 1
            req.first_reply = time.monotonic()
            if reply.status != 200 or req.error:
                await asyncio.sleep(0.05)  # an outage answer: don't spin
        conn.close()

    async def finish(self, grace: float) -> None:
        self.publishing = False
        await asyncio.wait(self.tasks, timeout=grace)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def summary(self, runs: dict, t_cut: float, t_back: float) -> dict:
        answers: dict = {}
        for r in self.reqs.values():
            key = (f"{r.status} {r.error}".strip() if r.status else r.error) or "in flight at the end"
            answers[key] = answers.get(key, 0) + 1
        ok_after = [r.first_reply for r in self.reqs.values()
                    if r.sent >= t_back and r.status == 200 and not r.error]
        failed_ran = sum(1 for rid, r in self.reqs.items() if (r.status != 200 or r.error) and rid in runs)
        return {
            "sent": len(self.reqs), "answers": answers,
            "no_answer": sum(1 for r in self.reqs.values() if not r.status),
            # no answer at all, or lambda-server's fail-safe timeout: the request went nowhere
            "lost": sum(1 for r in self.reqs.values() if not r.status or r.error == "Sandbox.Timedout"),
            "not_ok_but_ran": failed_ran,
            "recover_s": round(min(ok_after) - t_back, 2) if ok_after else None,
            **run_counts(runs, self.reqs),
        }


async def broker_queue(name: str) -> Optional[tuple]:
    """(messages, consumers) of a queue, None when it does not exist or the broker is away."""
    import aiormq

    try:
        conn = await asyncio.wait_for(aiormq.connect(BROKER_URI), 5)
    except Exception:
        return None
    try:
        channel = await conn.channel()
        ok = await channel.queue_declare(name, passive=True)
        return ok.message_count, ok.consumer_count
    except Exception:
        return None
    finally:
        try:
            await asyncio.wait_for(conn.close(), 2)
        except Exception:
            pass


async def wait_consumers(name: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await broker_queue(name)
        if info is not None and info[1] >= count:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{count} consumer(s) on queue {name} not seen within {timeout}s")


async def delete_queues(names: list) -> None:
    import aiormq

    conn = await asyncio.wait_for(aiormq.connect(BROKER_URI), 5)
    try:
        for name in names:
            channel = await conn.channel()
            try:
                await channel.queue_delete(name)
            except Exception:
                pass
    finally:
        await conn.close()


def list_queues() -> dict:
    """name -> (type, durable, auto_delete) for every queue on the broker (which may be restarting:
    it is shared, and others test outages too)."""
    for attempt in range(10):
        try:
            out = rabbitmqctl("-q", "list_queues", "name", "type", "durable", "auto_delete", "--no-table-headers")
            break
        except RuntimeError:
            if attempt == 9:
                raise
            time.sleep(3)
    queues = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            queues[parts[0]] = (parts[1], parts[2] == "true", parts[3] == "true")
    return queues


def queue_name(prefix: str) -> str:
    name = f"faults-{prefix}-{uuid.uuid4().hex[:8]}"
    CLEANUP.queues.add(name)
    return name


def kind_of(props: tuple) -> str:
    qtype, durable, auto_delete = props
    if qtype == "quorum":
        return "quorum"
    return f"{qtype} {'durable' if durable else 'transient'}{' auto-delete' if auto_delete else ''}"


async def queue_variants(ctx: Context) -> list:
    """The queue types the daemon offers: start it with each candidate setting, look at what it
    declared, keep one setting per distinct kind. [(kind, env), ...], the recommended one flagged."""
    if ctx.variants is not None:
        return ctx.variants
    candidates = list(QUEUE_CANDIDATES) + ctx.extra_candidates
    daemons = []
    for i, env in enumerate(candidates):
        name = queue_name(f"probe{i}")
        daemons.append((env, name, Daemon(ctx, f"probe{i}", name, AMQP_URI=BROKER_URI + FAST_RETRY, **env)))
    for env, name, d in daemons:
        try:
            await d.healthy()
            await wait_consumers(name, 1, 20)
        except RuntimeError as e:
            log(f"queue setting {env or 'default'} not usable: {str(e)[:200]}")
    declared = await asyncio.to_thread(list_queues)
    for _env, _name, d in daemons:
        await asyncio.to_thread(d.child.terminate)
    seen: dict = {}
    for env, name, _d in daemons:
        props = declared.get(name)
        if props is None:
            continue
        kind = kind_of(props)
        if kind not in seen:
            seen[kind] = {"kind": kind, "env": env, "default": not env, "durable": props[1] or props[0] == "quorum",
                          "auto_delete": props[2]}
    variants = list(seen.values())
    # What we recommend measuring "nothing lost" against: quorum when offered, else a durable queue.
    best = next((v for v in variants if v["kind"] == "quorum"), None) \
        or next((v for v in variants if v["durable"] and not v["auto_delete"]), None)
    for v in variants:
        v["recommended"] = v is best
    ctx.variants = variants
    log("queue types offered: " + "; ".join(f"{v['kind']} ({env_text(v['env'])})" for v in variants))
    return variants


def env_text(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "no queue setting"


def variant_key(v: dict) -> str:
    return re.sub(r"[^a-z]+", "-", v["kind"]).strip("-")


# ---- scenario: broker outage (AMQP-RPC and lambda-server) -----------------------------------------

async def outage(ctx: Context) -> dict:
    args = ctx.args
    variants = await queue_variants(ctx)
    uri = BROKER_URI + FAST_RETRY
    server_port = free_port()
    server = CLEANUP.child("outage-server", [str(SERVER)],
                           program_env(PORT=server_port, AMQP_URI=uri, AWS_LAMBDA_FUNCTION_TIMEOUT=args.server_timeout),
                           ROOT, ctx.workdir)
    setups = []
    for v in variants:
        key = variant_key(v)
        qa, qs = queue_name(f"out-amqp-{key}"), queue_name(f"out-srv-{key}")
        da = Daemon(ctx, f"outage-amqp-{key}", qa, MAX_CONCURRENCY=2, AMQP_URI=uri, **v["env"])
        ds = Daemon(ctx, f"outage-srv-{key}", qs, MAX_CONCURRENCY=2, AMQP_URI=uri, **v["env"])
        setups.append((v, qa, qs, da, ds))
    await wait_http("127.0.0.1", server_port, 30, server, "/_/ready")
    for _v, qa, qs, da, ds in setups:
        await da.healthy()
        await ds.healthy()
        await wait_consumers(qa, 1)
        await wait_consumers(qs, 1)
    loads = []
    for v, qa, qs, da, ds in setups:
        amqp = AmqpLoad(qa, args.inflight, args.run_seconds)
        await amqp.start()
        http = HttpLoad("127.0.0.1", server_port, qs, args.inflight, args.run_seconds)
        http.start()
        loads.append((v, da, ds, amqp, http))
    await asyncio.sleep(args.lead_seconds)
    t_cut = time.monotonic()
    log(f"broker outage: stop_app, {args.outage_seconds:g} s, start_app")
    try:
        await asyncio.to_thread(stop_broker)
        t_stopped = time.monotonic()
        await asyncio.sleep(args.outage_seconds)
    finally:
        await asyncio.to_thread(start_broker)
    t_back = time.monotonic()
    await asyncio.sleep(args.tail_seconds)
    grace = args.server_timeout + 5.0
    await asyncio.gather(*(load.finish(grace) for _v, _da, _ds, amqp, http in loads for load in (amqp, http)))
    results = []
    for v, da, ds, amqp, http in loads:
        results.append({
            "queue": v["kind"], "setting": env_text(v["env"]), "recommended": v["recommended"],
            "amqp_rpc": amqp.summary(read_runs(da.run_log), t_cut, t_back),
            "lambda_server": http.summary(read_runs(ds.run_log), t_cut, t_back),
            "daemon_restarted": not (da.child.alive() and ds.child.alive()),
        })
    for _v, da, ds, _a, _h in loads:
        await asyncio.to_thread(da.child.terminate)
        await asyncio.to_thread(ds.child.terminate)
    await asyncio.to_thread(server.terminate)
    return {"inflight": args.inflight, "run_seconds": args.run_seconds, "stop_app_s": round(t_stopped - t_cut, 1),
            "outage_s": round(t_back - t_cut, 1), "variants": results}


# ---- scenario: SIGKILL of one of two daemons on a queue --------------------------------------------

async def sigkill(ctx: Context) -> dict:
    args = ctx.args
    variants = await queue_variants(ctx)
    uri = BROKER_URI + FAST_RETRY
    setups = []
    for v in variants:
        key = variant_key(v)
        q = queue_name(f"kill-{key}")
        a = Daemon(ctx, f"kill-{key}-A", q, MAX_CONCURRENCY=2, AMQP_URI=uri, FAULTS_TAG="A", **v["env"])
        b = Daemon(ctx, f"kill-{key}-B", q, MAX_CONCURRENCY=2, AMQP_URI=uri, FAULTS_TAG="B", **v["env"])
        setups.append((v, q, a, b))
    for _v, q, a, b in setups:
        await a.healthy()
        await b.healthy()
        await wait_consumers(q, 2)
    loads = []
    for v, q, a, b in setups:
        load = AmqpLoad(q, args.inflight, args.run_seconds)
        await load.start()
        loads.append((v, a, b, load))
    await asyncio.sleep(args.lead_seconds)
    t_kill = time.monotonic()
    for _v, a, _b, _l in loads:
        os.kill(a.pid, signal.SIGKILL)
    log("SIGKILL sent to daemon A of each pair")
    await asyncio.sleep(args.tail_seconds)
    await asyncio.gather(*(load.finish(20.0) for _v, _a, _b, load in loads))
    results = []
    for v, a, b, load in loads:
        runs = read_runs(a.run_log)
        for rid, more in read_runs(b.run_log).items():
            runs.setdefault(rid, []).extend(more)
        summary = load.summary(runs, t_kill, t_kill)
        left = [m for m in a.child.members() if m[1] != "Z"]
        results.append({"queue": v["kind"], "setting": env_text(v["env"]), "recommended": v["recommended"],
                        **summary, "takeover_s": summary.pop("longest_wait_s"), "recover_s": summary.pop("recover_s"),
                        "killed_daemon_processes_left": len(left), "survivor_alive": b.child.alive()})
    for _v, a, b, _l in loads:
        await asyncio.to_thread(b.child.terminate)
        a.child.kill()
    return {"inflight": args.inflight, "run_seconds": args.run_seconds, "variants": results}


# ---- scenario: network partition between the daemons and the broker -------------------------------

def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Namespace:
    """A network namespace of our own with a veth link to the root namespace (a /30 of its own)."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.name = f"lrfaults-{tag}"
        self.outer = f"lrf{tag}o"
        self.inner = f"lrf{tag}i"
        net = 200 + tag % 50
        self.outer_ip = f"10.251.{net}.1"
        self.inner_ip = f"10.251.{net}.2"

    def create(self) -> None:
        ip("netns", "add", self.name)
        CLEANUP.netns.append(self.name)
        ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        CLEANUP.links.append(self.outer)
        ip("link", "set", self.inner, "netns", self.name)
        ip("addr", "add", f"{self.outer_ip}/30", "dev", self.outer)
        ip("link", "set", self.outer, "up")
        ip("-n", self.name, "addr", "add", f"{self.inner_ip}/30", "dev", self.inner)
        ip("-n", self.name, "link", "set", self.inner, "up")
        ip("-n", self.name, "link", "set", "lo", "up")

    def cut(self) -> None:
        ip("link", "set", self.outer, "down")

    def heal(self) -> None:
        ip("link", "set", self.outer, "up")


async def partition(ctx: Context) -> dict:
    args = ctx.args
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("socat"):
        return {"skipped": "needs root, ip and socat"}
    variants = await queue_variants(ctx)
    ns = Namespace()
    await asyncio.to_thread(ns.create)
    relay = CLEANUP.child("partition-relay", ["socat", f"TCP-LISTEN:5672,bind={ns.outer_ip},reuseaddr,fork",
                                              "TCP:127.0.0.1:5672"], program_env(), ROOT, ctx.workdir)
    uri = (f"amqp://guest:guest@{ns.outer_ip}:5672/?connection_attempts=1000&retry_delay=0.5"
           f"&heartbeat={args.partition_heartbeat}")
    setups = []
    for v in variants:
        key = variant_key(v)
        q = queue_name(f"part-{key}")
        d = Daemon(ctx, f"partition-{key}", q, netns=ns.name, host=ns.inner_ip, MAX_CONCURRENCY=2, AMQP_URI=uri,
                   **v["env"])
        setups.append((v, q, d))
    for _v, q, d in setups:
        await d.healthy()
        await wait_consumers(q, 1)
    loads = []
    for v, q, d in setups:
        load = AmqpLoad(q, args.inflight, args.run_seconds)
        await load.start()
        loads.append((v, d, load))
    probe_out = ctx.workdir / "partition-probe.jsonl"
    probe_seconds = args.lead_seconds + args.partition_seconds + args.partition_tail
    ports = ",".join(str(d.port) for _v, _q, d in setups)
    probe = CLEANUP.child("partition-probe", [PYTHON, str(Path(__file__).resolve()), "--probe-http", ports,
                                              "--probe-seconds", str(probe_seconds), "--probe-out", str(probe_out)],
                          program_env(), ROOT, ctx.workdir, netns=ns.name)
    await asyncio.sleep(args.lead_seconds)
    log(f"partition: veth link down for {args.partition_seconds:g} s")
    t_cut = time.monotonic()
    try:
        await asyncio.to_thread(ns.cut)
        await asyncio.sleep(args.partition_seconds)
    finally:
        await asyncio.to_thread(ns.heal)
    t_back = time.monotonic()
    await asyncio.sleep(args.partition_tail)
    await asyncio.gather(*(load.finish(30.0) for _v, _d, load in loads))
    await asyncio.to_thread(probe.proc.wait, probe_seconds + 30)
    probes = []
    if probe_out.exists():
        probes = [json.loads(line) for line in probe_out.read_text().splitlines() if line.strip()]
    results = []
    for v, d, load in loads:
        summary = load.summary(read_runs(d.run_log), t_cut, t_back)
        mine = [p for p in probes if p["port"] == d.port]
        during = [p for p in mine if t_cut <= p["t"] <= t_back]
        info = await broker_queue(d.name)
        results.append({
            "queue": v["kind"], "setting": env_text(v["env"]), "recommended": v["recommended"], **summary,
            "daemon_restarted": not d.child.alive(), "pid_unchanged": d.child.alive() and d.child.pid == d.pid,
            "broker_connections_made": d.child.stderr.count(": connected to "),
            "consumers_after": info[1] if info else None,
            "http_during_cut": {"sent": len(during), "answered_200": sum(1 for p in during if p["status"] == 200)},
            "http_total": {"sent": len(mine), "answered_200": sum(1 for p in mine if p["status"] == 200)},
        })
    for _v, d, _l in loads:
        await asyncio.to_thread(d.child.terminate)
    relay.kill()
    return {"inflight": args.inflight, "run_seconds": args.run_seconds, "cut_s": round(t_back - t_cut, 1),
            "heartbeat_s": args.partition_heartbeat, "namespace": ns.name,
            "addresses": f"{ns.outer_ip} (root side, relay to 127.0.0.1:5672) / {ns.inner_ip} (daemons)",
            "variants": results}


async def probe_http(ports: list, seconds: float, out: Path) -> None:
    """Run inside the namespace: an invoke to each daemon every 50 ms, one line per answer."""
    deadline = time.monotonic() + seconds
    with open(out, "w") as f:
        while time.monotonic() < deadline:
            for port in ports:
                conn = Http("127.0.0.1", port)
                start = time.monotonic()
                reply = await conn.invoke("function", b'{"probe":1}', timeout=2.0)
                conn.close()
                f.write(json.dumps({"t": start, "port": port, "outcome": reply.outcome, "status": reply.status,
                                    "ms": ms(reply.seconds)}) + "\n")
            f.flush()
            await asyncio.sleep(0.05)


# ---- scenario: fuzzing (atheris harnesses in tests/fuzz) --------------------------------------------

HARNESSES = (
    ("http (httptools)", "fuzz_http.py", ["--backend=httptools"]),
    ("http (pure-Python fallback)", "fuzz_http.py", ["--backend=fallback"]),
    ("invoke validation", "fuzz_invoke.py", []),
)


def fuzz(ctx: Context) -> dict:
    args = ctx.args
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {"skipped": "atheris is not installed (pip install -e '.[test]')"}
    results = []
    for label, script, extra in HARNESSES:
        corpus = ctx.workdir / f"corpus-{script[:-3]}-{len(results)}"
        corpus.mkdir()
        subprocess.run([PYTHON, str(FUZZ / script), *extra, "--write-seeds", str(corpus)], check=True, timeout=60)
        seeds = len(list(corpus.iterdir()))
        artifacts = ctx.workdir / f"artifacts-{len(results)}"
        artifacts.mkdir()
        findings = ctx.workdir / f"findings-{len(results)}"
        findings.mkdir()
        flags = [f"-max_total_time={args.fuzz_seconds}", f"-artifact_prefix={artifacts}/", "-timeout=20",
                 "-rss_limit_mb=3072", "-print_final_stats=1", f"-seed={args.fuzz_seed}"]
        if args.fuzz_runs:
            flags.append(f"-runs={args.fuzz_runs}")
        argv = [PYTHON, str(FUZZ / script), *extra, *flags, str(corpus)]
        log(f"fuzz {label}: {args.fuzz_seconds:g} s")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.fuzz_seconds + 120,
                              env=dict(os.environ, FUZZ_FINDINGS=str(findings)))
        out = done.stderr + done.stdout
        (ctx.workdir / f"fuzz-{len(results)}.log").write_text(out)
        stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", out)}
        cov = re.findall(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", out)
        crashes = [p.name for p in artifacts.iterdir()]
        kinds = [json.loads(p.read_text()) for p in sorted(findings.iterdir())]
        coverage = subprocess.run([PYTHON, str(FUZZ / script), *extra, "--line-coverage", str(corpus)],
                                  capture_output=True, text=True, timeout=600)
        try:
            lines = json.loads(coverage.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            lines = {"error": coverage.stderr[-500:]}
        results.append({
            "target": label, "seconds": args.fuzz_seconds, "exit_status": done.returncode,
            "inputs_tried": stats.get("number_of_executed_units", int(cov[-1][0]) if cov else 0),
            "exec_per_s": stats.get("average_exec_per_sec"), "seed_inputs": seeds,
            "edges_covered": int(cov[-1][1]) if cov else None, "features": int(cov[-1][2]) if cov else None,
            "corpus": len(list(corpus.iterdir())), "crashes": len(crashes), "crash_files": crashes[:5],
            "python_crash": "Uncaught Python exception" in out, "line_coverage": lines,
            "findings": len(kinds),
            "finding_kinds": [{"message": k["message"], "seen_at_least": k["seen"], "input_base64": k["input"]}
                              for k in kinds],
        })
    return {"harnesses": results}


# ---- running it all ----------------------------------------------------------------------------------

class Context:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.variants: Optional[list] = None
        self.extra_candidates = [dict(kv.split("=", 1) for kv in spec.split(",")) for spec in args.queue_setting]


# Connections the AMQP client of each scenario makes when nothing else touches the broker: more
# means the shared broker went away during the run (someone else's outage), and its figures show that.
EXPECTED_CLIENT_CONNECTIONS = {"outage": 2, "sigkill": 1, "partition": 1}


def disturbed(name: str, v: dict) -> bool:
    figures = v.get("amqp_rpc", v)
    return figures.get("client_connections", 0) > EXPECTED_CLIENT_CONNECTIONS.get(name, 1)


def targets(results: dict) -> list:
    """(target, met, figure) for each of issue 11's "done when" figures that this run measured."""
    checks = []
    if "soak" in results and "error" not in results["soak"]:
        s = results["soak"]
        checks.append(("soak: 0 misrouted answers", s["misrouted"] == 0 and s["no_answer"] == 0,
                       f"{s['misrouted']} misrouted, {s['no_answer']} unanswered of {s['invokes']}"))
    for name in ("crash", "timeout"):
        s = results.get(name)
        if s and "error" not in s:
            checks.append((f"{name} storm: every call answered once, nothing left behind",
                           s["unanswered"] == 0 and s["misrouted"] == 0 and s["stray_bytes"] == 0
                           and s["left_after_exit"] == 0,
                           f"{s['answered_as_expected']}/{s['calls']} {s['expected_answer']}, "
                           f"{s['left_after_exit']} processes left"))
    s = results.get("drain")
    if s and "error" not in s:
        checks.append(("drain: 0 empty replies", s["empty_replies"] == 0 and s["resets"] == 0,
                       f"{s['empty_replies']} empty replies, {s['resets']} resets"))
    for name in ("outage", "sigkill", "partition"):
        s = results.get(name)
        if not s or "variants" not in s:
            continue
        for v in s["variants"]:
            figures = v.get("amqp_rpc", v)
            if disturbed(name, v):
                checks.append((f"{name} [{v['queue']}]: the shared broker stayed up but for our own faults", False,
                               f"the client had to reconnect {figures['client_connections'] - 1} time(s): someone "
                               f"else restarted the broker during the run; run it again"))
            same = figures["duplicate_runs_same_daemon"]
            checks.append((f"{name} [{v['queue']}]: 0 duplicate runs within one daemon", same == 0,
                           f"{same} (of {figures['duplicate_runs']} duplicate runs)"))
            if v["recommended"]:
                lost = figures["confirmed_never_answered"]
                checks.append((f"{name} [{v['queue']}, recommended]: 0 lost confirmed requests", lost == 0,
                               f"{lost} of {figures['confirmed']} confirmed never answered"))
            server = v.get("lambda_server")
            if server is not None:
                same = server["duplicate_runs_same_daemon"]
                checks.append((f"{name} [{v['queue']}] via lambda-server: 0 duplicate runs within one daemon",
                               same == 0, f"{same} (of {server['duplicate_runs']} duplicate runs)"))
                if v["recommended"]:
                    checks.append((f"{name} [{v['queue']}, recommended] via lambda-server: every request answered",
                                   server["lost"] == 0, f"{server['lost']} of {server['sent']} lost"))
            if name == "partition":
                during = v["http_during_cut"]
                checks.append((f"partition [{v['queue']}]: reconnects without a restart, HTTP served during the cut",
                               v["pid_unchanged"] and v["consumers_after"] == 1
                               and during["answered_200"] == during["sent"],
                               f"pid unchanged: {v['pid_unchanged']}, consumers after: {v['consumers_after']}, "
                               f"HTTP during cut {during['answered_200']}/{during['sent']}"))
    s = results.get("fuzz")
    if s and "harnesses" in s:
        for h in s["harnesses"]:
            checks.append((f"fuzz {h['target']}: 0 crashes, 0 broken invariants",
                           h["crashes"] == 0 and not h["python_crash"] and h["exit_status"] == 0 and not h["findings"],
                           f"{h['crashes']} crashes, {h['findings']} kinds of broken invariant in "
                           f"{h['inputs_tried']:,} inputs"))
    return checks


def machine() -> dict:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"revision": rev.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uptime": uptime, "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def label(name: str, v: dict) -> str:
    """A queue type as a table shows it: recommended, and whether someone else's outage spoiled it."""
    text = v["queue"] + (" (recommended)" if v["recommended"] else "")
    return text + (" **disturbed: the broker restarted during the run**" if disturbed(name, v) else "")


def markdown(report: dict) -> str:
    """The figures as Markdown tables (what docs/reliability.md shows)."""
    m, r = report["machine"], report["results"]
    out = [f"Run {m['date']}, revision `{m['revision']}`, Python {m['python']}, {m['cpus']} CPUs.",
           f"Load: `{report['uptime_before']}` (before), `{m['uptime']}` (after). "
           f"Command: `{report['command']}`; total {report['seconds']:.0f} s.", ""]
    s = r.get("soak")
    if s and "error" not in s:
        out += ["| soak | invokes | misrouted | unanswered | inv/s | p50 / p99 ms | daemon RSS KB start → end (max) "
                "| fds start → end |", "|---|---|---|---|---|---|---|---|",
                f"| {s['connections']} connections, MAX_CONCURRENCY={s['max_concurrency']} | {s['invokes']:,} | "
                f"{s['misrouted']} | {s['no_answer']} | {s['invokes_per_s']:,.0f} | {s['p50_ms']} / {s['p99_ms']} | "
                f"{s['rss_kb_start']:,} → {s['rss_kb_end']:,} ({s['rss_kb_max']:,}) | "
                f"{s['fds_start']} → {s['fds_end']} |",
                ""]
    rows = [(n, r[n]) for n in ("crash", "timeout") if r.get(n) and "error" not in r[n]]
    if rows:
        out += ["| storm | calls | answered as expected | unanswered / misrouted / stray | p50 / p99 / max ms "
                "| left right after / settled / after exit |", "|---|---|---|---|---|---|"]
        for n, s in rows:
            out.append(f"| {n} (MAX_CONCURRENCY={s['max_concurrency']}, timeout {s['timeout_s']:g} s, "
                       f"{s['connections']} connections) | {s['calls']} | {s['answered_as_expected']} "
                       f"`{s['expected_answer']}` | {s['unanswered']} / {s['misrouted']} / {s['stray_bytes']} | "
                       f"{s['p50_ms']} / {s['p99_ms']} / {s['max_ms']} | {s['processes_after_last_answer']} "
                       f"({s['zombies_after_last_answer']} zombies, "
                       f"{s['grandchildren_after_last_answer']} grandchildren)"
                       f" / {s['processes_settled']} / {s['left_after_exit']} |")
        out.append("")
    s = r.get("drain")
    if s and "error" not in s:
        after = ", ".join(f"{k}: {v}" for k, v in sorted(s["after_signal"].items()))
        out += ["| drain | 200 before SIGTERM | after SIGTERM | empty replies (of which ran) | drain s | exit |",
                "|---|---|---|---|---|---|",
                f"| {s['connections']} keep-alive connections, MAX_CONCURRENCY=2 | {s['answered_200_before_signal']} | "
                f"{after} | {s['empty_replies']} ({s['empty_replies_that_ran']}) | {s['drain_seconds']} | "
                f"{s['exit_status']} |", ""]
    s = r.get("outage")
    if s and "variants" in s:
        out += [f"Broker outage: stop_app → start_app {s['outage_s']} s, {s['inflight']} in flight per path, "
                f"function runs {s['run_seconds']} s.", "",
                "| queue (setting) | AMQP-RPC: confirmed / never answered | duplicate runs (same daemon) | duplicate "
                "replies | recover s | lambda-server: sent / no answer / answers | duplicate runs | recover s |",
                "|---|---|---|---|---|---|---|---|"]
        for v in s["variants"]:
            a, h = v["amqp_rpc"], v["lambda_server"]
            answers = ", ".join(f"{k}: {n}" for k, n in sorted(h["answers"].items()))
            out.append(f"| {label('outage', v)} (`{v['setting']}`) | "
                       f"{a['confirmed']} / {a['confirmed_never_answered']} | {a['duplicate_runs']} "
                       f"({a['duplicate_runs_same_daemon']}) | {a['duplicate_replies']} | {a['recover_s']} | "
                       f"{h['sent']} / {h['no_answer']} / {answers} | {h['duplicate_runs']} | {h['recover_s']} |")
        out.append("")
    s = r.get("sigkill")
    if s and "variants" in s:
        out += ["| SIGKILL of one of two daemons: queue | confirmed / never answered | duplicate runs (same daemon) "
                "| duplicate replies | longest wait s | processes of the killed daemon left |",
                "|---|---|---|---|---|---|"]
        for v in s["variants"]:
            out.append(f"| {label('sigkill', v)} | {v['confirmed']} / "
                       f"{v['confirmed_never_answered']} | {v['duplicate_runs']} ({v['duplicate_runs_same_daemon']}) | "
                       f"{v['duplicate_replies']} | {v['takeover_s']} | {v['killed_daemon_processes_left']} |")
        out.append("")
    s = r.get("partition")
    if s and "variants" in s:
        out += [f"Partition: veth link down {s['cut_s']} s, heartbeat {s['heartbeat_s']} s, {s['inflight']} in flight.",
                "", "| queue | confirmed / never answered | duplicate runs (same daemon) | duplicate replies "
                "| recover s | restarted | connections made | HTTP 200 during the cut |",
                "|---|---|---|---|---|---|---|---|"]
        for v in s["variants"]:
            d = v["http_during_cut"]
            out.append(f"| {label('partition', v)} | {v['confirmed']} / "
                       f"{v['confirmed_never_answered']} | {v['duplicate_runs']} ({v['duplicate_runs_same_daemon']}) | "
                       f"{v['duplicate_replies']} | {v['recover_s']} | {'yes' if v['daemon_restarted'] else 'no'} | "
                       f"{v['broker_connections_made']} | {d['answered_200']}/{d['sent']} |")
        out.append("")
    s = r.get("fuzz")
    if s and "harnesses" in s:
        out += ["| fuzz target | seconds | inputs tried | crashes | broken invariants | edges / features "
                "| lines covered |", "|---|---|---|---|---|---|---|"]
        for h in s["harnesses"]:
            lines = "; ".join(f"{k} {v['covered']}/{v['lines']}" for k, v in h["line_coverage"].items()
                              if isinstance(v, dict))
            broken = "; ".join(f"{k['message']} (≥{k['seen_at_least']})" for k in h["finding_kinds"]) or "0"
            out.append(f"| {h['target']} | {h['seconds']} | {h['inputs_tried']:,} | {h['crashes']} | {broken} | "
                       f"{h['edges_covered']} / {h['features']} | {lines} |")
        out.append("")
    checks = report["targets"]
    if checks:
        out += ["| target | met | figure |", "|---|---|---|"]
        out += [f"| {name} | {'yes' if ok else '**no**'} | {figure} |" for name, ok, figure in checks]
    return "\n".join(out)


async def run_async(ctx: Context, selected: list, results: dict) -> None:
    functions = {"soak": soak, "crash": crash_storm, "timeout": timeout_storm, "drain": drain, "outage": outage,
                 "sigkill": sigkill, "partition": partition}
    for name in selected:
        if name == "fuzz":
            continue
        if name in AMQP_SCENARIOS and not await asyncio.to_thread(broker_up):
            results[name] = {"skipped": "RabbitMQ is not reachable on 127.0.0.1:5672"}
            continue
        log(f"{name} ...")
        started = time.monotonic()
        try:
            results[name] = await asyncio.wait_for(functions[name](ctx), ctx.args.scenario_limit)
        except Exception as e:  # one scenario's failure is a figure too; the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        results[name]["scenario_seconds"] = round(time.monotonic() - started, 1)
        log(f"{name}: {summary_line(name, results[name])}")
        for c in CLEANUP.children:  # nothing of one scenario survives into the next
            c.kill()
        CLEANUP.children.clear()


def broker_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        return True
    except OSError:
        return False


def summary_line(name: str, s: dict) -> str:
    if "error" in s or "skipped" in s:
        return s.get("error") or f"skipped: {s['skipped']}"
    if name == "soak":
        return (f"{s['invokes']} invokes, {s['misrouted']} misrouted, RSS {s['rss_kb_start']} -> {s['rss_kb_end']} KB, "
                f"fds {s['fds_start']} -> {s['fds_end']}")
    if name in ("crash", "timeout"):
        return (f"{s['answered_as_expected']}/{s['calls']} answered {s['expected_answer']}, p99 {s['p99_ms']} ms, "
                f"{s['left_after_exit']} left after exit")
    if name == "drain":
        return (f"{s['answered_200_before_signal']} before, after {s['after_signal']}, "
                f"{s['empty_replies']} empty replies")
    if name == "fuzz" and "harnesses" in s:
        return "; ".join(f"{h['target']}: {h['inputs_tried']:,} inputs, {h['crashes']} crashes, {h['findings']} kinds "
                         f"of broken invariant" for h in s["harnesses"])
    if "variants" in s:
        parts = []
        for v in s["variants"]:
            f = v.get("amqp_rpc", v)
            parts.append(f"[{v['queue']}] lost {f['confirmed_never_answered']}/{f['confirmed']}, dup runs "
                         f"{f['duplicate_runs']} (same daemon {f['duplicate_runs_same_daemon']}), dup replies "
                         f"{f['duplicate_replies']}" + (" (DISTURBED: broker restarted by someone else)"
                                                        if disturbed(name, v) else ""))
        return "; ".join(parts)
    return json.dumps(s)[:300]


def parse_args(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/reliability.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small counts and short windows (~2 min)")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    p.add_argument("--soak-invokes", type=int, help="invokes in the soak (default 100000, quick 3000)")
    p.add_argument("--soak-connections", type=int, default=4, help="keep-alive connections in the soak")
    p.add_argument("--soak-concurrency", type=int, default=2, help="MAX_CONCURRENCY of the soak daemon")
    p.add_argument("--soak-max-seconds", type=float, default=360.0, help="the soak stops here whatever its count")
    p.add_argument("--crash-calls", type=int, help="calls in the crash storm (default 200, quick 40)")
    p.add_argument("--timeout-calls", type=int, help="calls in the timeout storm (default 60, quick 16)")
    p.add_argument("--storm-connections", type=int, default=8, help="keep-alive connections in the storms")
    p.add_argument("--drain-connections", type=int, default=8, help="keep-alive connections in the drain")
    p.add_argument("--drain-load-seconds", type=float, default=3.0, help="load before SIGTERM in the drain")
    p.add_argument("--inflight", type=int, default=8, help="requests in flight per path (outage, sigkill, partition)")
    p.add_argument("--run-seconds", type=float, default=0.2, help="how long the function runs per request")
    p.add_argument("--lead-seconds", type=float, help="load before the fault (default 4, quick 2)")
    p.add_argument("--outage-seconds", type=float, help="seconds between stop_app and start_app (default 5, quick 3)")
    p.add_argument("--tail-seconds", type=float, help="load after the fault (default 6, quick 3)")
    p.add_argument("--server-timeout", type=float, default=15.0, help="lambda-server AWS_LAMBDA_FUNCTION_TIMEOUT")
    p.add_argument("--partition-seconds", type=float, help="seconds the veth link stays down (default 10, quick 5)")
    p.add_argument("--partition-tail", type=float, default=12.0, help="load after the link is back up")
    p.add_argument("--partition-heartbeat", type=int, default=2, help="AMQP heartbeat (s) of the partitioned daemons")
    p.add_argument("--queue-setting", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                   help="another daemon setting to try when finding the queue types it offers")
    p.add_argument("--fuzz-seconds", type=int, help="seconds per atheris harness (default 45, quick 5)")
    p.add_argument("--fuzz-runs", type=int, default=0, help="also stop each harness after this many inputs")
    p.add_argument("--fuzz-seed", type=int, default=1, help="libFuzzer's -seed (0: a random one)")
    p.add_argument("--scenario-limit", type=float, default=600.0, help="hard limit on one scenario (s)")
    p.add_argument("--output", type=Path, help="JSON results (default bench/results/faults-<UTC time>.json)")
    p.add_argument("--markdown", action="store_true", help="also print the figures as Markdown")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, run records, corpora)")
    p.add_argument("--probe-http", help=argparse.SUPPRESS)  # internal: the HTTP probe run inside the namespace
    p.add_argument("--probe-seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"soak_invokes": (100_000, 3000), "crash_calls": (200, 40), "timeout_calls": (60, 16),
                "lead_seconds": (4.0, 2.0), "tail_seconds": (6.0, 3.0), "partition_seconds": (10.0, 5.0),
                "outage_seconds": (5.0, 3.0),
                "fuzz_seconds": (45, 5)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    return args


async def cancel_the_rest() -> None:
    """Cancel every task still running but this one, and let them unwind (bounded)."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=120)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("aiormq", "aio_pika"):  # our clients' reconnect attempts are expected here, not news
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.probe_http:
        ports = [int(p) for p in args.probe_http.split(",")]
        asyncio.run(probe_http(ports, args.probe_seconds, args.probe_out))
        return 0
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in selected if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if not DAEMON.exists():
        print(f"{DAEMON} not found: run ./scripts/setup.sh first", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="lambda-rapid-faults-"))
    ctx = Context(args, workdir)
    report = {"command": "python bench/faults.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "results": {}}
    started = time.monotonic()
    random.seed()
    try:
        loop = new_event_loop()
        main_task = loop.create_task(run_async(ctx, selected, report["results"]))
        interrupted: list = []

        def on_loop_signal() -> None:
            # Cancel the scenario so that its finally blocks run (start a stopped broker, bring a
            # link up); a second signal does not cut that short. CLEANUP.run() does the rest.
            if not interrupted:
                log("interrupted: cleaning up")
                main_task.cancel()
            interrupted.append(True)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, on_loop_signal)
        try:
            loop.run_until_complete(main_task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.run_until_complete(cancel_the_rest())
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            loop.close()
        if interrupted:
            raise KeyboardInterrupt()
        if "fuzz" in selected:
            log("fuzz ...")
            try:
                report["results"]["fuzz"] = fuzz(ctx)
            except Exception as e:
                report["results"]["fuzz"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    except KeyboardInterrupt:
        return 130
    finally:
        CLEANUP.run()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["machine"] = machine()
    report["targets"] = targets(report["results"])
    output = args.output or ROOT / "bench" / "results" / f"faults-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nfault suite: {report['seconds']:.0f} s, revision {report['machine']['revision']}, "
          f"load {report['machine']['uptime'].split('load average:')[-1].strip()}")
    for name, s in report["results"].items():
        print(f"  {name:10s} {summary_line(name, s)}")
    print()
    for name, ok, figure in report["targets"]:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {figure}")
    if args.markdown:
        print("\n" + markdown(report))
    print(f"\nresults: {output}")
    if args.keep:
        print(f"work directory (logs, run records, corpora): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    errors = [n for n, s in report["results"].items() if "error" in s]
    if errors:
        return 2
    return 0 if all(ok for _n, ok, _f in report["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
