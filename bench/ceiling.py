"""The ceiling: N awslambdaric processes against the smallest Runtime API we can write.

Each runtime gets its own server process running a blocking socket loop: it answers every
``GET .../invocation/next`` at once with one canned event (the headers and payload the daemon
sends) and every ``POST .../response`` with 202, counting them. A runtime's requests are strictly
sequential on one keep-alive connection, so finding the end of the head (and the body length of a
POST) is all the parsing needed. There is no client and no daemon work: this measures how fast the
runtimes themselves go round their loop on this machine, which no daemon can beat. (One uvloop
process serving all runtimes measured lower for two and four runtimes, so it is not the ceiling.)

It is driven by ``bench/run.py`` through stdin/stdout, one JSON line per command, so that it
burns CPU only inside measurement windows; between windows every runtime is parked in /next:

    (at start)             prints {"ready": true, ...} once every runtime is parked in /next
    run SECONDS            answers /next for SECONDS, then parks the runtimes; prints the window
    quit                   kills the runtimes and exits

Usage: python bench/ceiling.py --runtimes N --cwd DIR [--handler echo.handler] [--payload JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from array import array
from typing import List

REQUEST_ID = "8476a536-e9f4-11e8-9739-2dfe598c3fcd"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:012345678912:function:echo"
TRACE_ID = "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=0"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACCEPTED = (b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
            b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\ncontent-length: 15\r\n\r\n{\"status\":\"OK\"}")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def canned_event(payload: bytes) -> bytes:
    """The /next answer: the headers the daemon sends (see runtime_api.py), with a far deadline."""
    deadline_ms = int((time.time() + 86400) * 1000)
    return b"".join((
        b"HTTP/1.1 200 OK\r\n",
        b"content-type: application/json\r\n",
        b"Lambda-Runtime-Aws-Request-Id: %s\r\n" % REQUEST_ID.encode(),
        b"Lambda-Runtime-Deadline-Ms: %d\r\n" % deadline_ms,
        b"Lambda-Runtime-Invoked-Function-Arn: %s\r\n" % FUNCTION_ARN.encode(),
        b"Lambda-Runtime-Trace-Id: %s\r\n" % TRACE_ID.encode(),
        b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\n",
        b"content-length: %d\r\n\r\n" % len(payload),
        payload,
    ))


def content_length(buf: bytes, end: int) -> int:
    """The Content-Length of the request head ``buf[:end]`` (0 when absent)."""
    i = buf.find(b"content-length:", 0, end)  # how awslambdaric's client spells it
    if i < 0:
        i = buf[:end].lower().find(b"content-length:")
        if i < 0:
            return 0
    j = buf.find(b"\r\n", i, end + 2)
    return int(buf[i + 15:j])


# ---- messages between the parent and its per-runtime servers ----------------------------------
def send_msg(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv_msg(sock: socket.socket) -> object:
    (n,) = struct.unpack("!I", recv_exact(sock, 4))
    return pickle.loads(recv_exact(sock, n))


def serve_runtime(conn: socket.socket, control: socket.socket, event: bytes) -> None:
    """One runtime's server (in a forked child). Parks the runtime in /next between windows."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv, send, now, clock = conn.recv, conn.sendall, time.monotonic, time.perf_counter
    buf = b""
    end = 0.0  # the current window ends at this monotonic time; 0 = parked, nothing started yet
    count = errors = 0
    latencies = array("d")
    sent = 0.0
    continued = False  # answered this request's Expect: 100-continue
    cpu0 = os.times()
    while True:
        data = recv(65536)
        if not data:
            send_msg(control, {"exited": True})
            return
        buf = buf + data if buf else data
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            if buf[:4] == b"GET ":
                buf = buf[head_end + 4:]
                if now() >= end:
                    if end:
                        cpu1 = os.times()
                        send_msg(control, {"count": count, "errors": errors, "latencies": latencies.tobytes(),
                                           "cpu": cpu1.user + cpu1.system - cpu0.user - cpu0.system})
                    else:
                        send_msg(control, {"parked": True})
                    command = recv_msg(control)  # parked here until the next window (or quit)
                    if command is None:
                        return
                    end = command  # type: ignore[assignment]
                    count = errors = 0
                    latencies = array("d")
                    cpu0 = os.times()
                sent = clock()
                send(event)
                continue
            total = head_end + 4 + content_length(buf, head_end)
            if len(buf) < total:
                if not continued and buf.find(b"100-continue", 0, head_end) >= 0:
                    continued = True
                    send(CONTINUE)
                break
            continued = False
            if buf.find(b"/response ", 0, buf.find(b"\r\n")) < 0:
                errors += 1
            elif now() < end:
                count += 1
                latencies.append(clock() - sent)
            buf = buf[total:]
            send(ACCEPTED)


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def runtime_env(port: int, handler: str, cwd: str) -> dict:
    """What the daemon gives a runtime (SPEC §4), pointed at our server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AMQP_", "_HANDLER"))}
    env.update({
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{port}",
        "_HANDLER": handler,
        "AWS_LAMBDA_FUNCTION_NAME": "echo",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/echo",
        "AWS_LAMBDA_LOG_STREAM_NAME": "ceiling",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LAMBDA_TASK_ROOT": cwd,
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "TZ": os.environ.get("TZ", ":UTC"),
    })
    return env


def percentile(sorted_values, pct: float) -> float:
    if not len(sorted_values):
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(pct / 100 * len(sorted_values))) - 1))
    return sorted_values[k]


def emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class CeilingRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.n = args.runtimes
        self.listener = socket.socket()
        self.runtimes: List[subprocess.Popen] = []
        self.servers: List[int] = []
        self.controls: List[socket.socket] = []
        self.event = canned_event(args.payload.encode())
        self.init_s = 0.0

    def start(self, args: argparse.Namespace) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(30.0)
        env = runtime_env(self.listener.getsockname()[1], args.handler, args.cwd)
        started = time.perf_counter()
        for _ in range(self.n):
            self.runtimes.append(subprocess.Popen(
                [args.python, "-m", "awslambdaric", args.handler], cwd=args.cwd, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True))
        for _ in range(self.n):
            conn, _ = self.listener.accept()
            self._fork_server(conn)
        for control in self.controls:
            reply = recv_msg(control)
            if not reply.get("parked"):  # type: ignore[union-attr]
                raise RuntimeError(f"a runtime did not reach /next: {reply}")
        self.init_s = time.perf_counter() - started

    def _fork_server(self, conn: socket.socket) -> None:
        parent_end, child_end = socket.socketpair()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: serve this one runtime until told to quit
            code = 0
            try:
                self.listener.close()
                parent_end.close()
                for other in self.controls:
                    other.close()
                serve_runtime(conn, child_end, self.event)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        conn.close()
        child_end.close()
        self.servers.append(pid)
        self.controls.append(parent_end)

    def run(self, seconds: float) -> dict:
        runtime_cpu = sum(cpu_ticks(p.pid) for p in self.runtimes)
        start = time.monotonic()
        for control in self.controls:
            send_msg(control, start + seconds)
        replies = [recv_msg(control) for control in self.controls]
        runtime_cpu = sum(cpu_ticks(p.pid) for p in self.runtimes) - runtime_cpu
        if any("count" not in r for r in replies):  # type: ignore[operator]
            raise RuntimeError(f"a runtime stopped during the window: {replies}")
        count = sum(r["count"] for r in replies)  # type: ignore[index]
        latencies = array("d")
        for r in replies:
            latencies.frombytes(r["latencies"])  # type: ignore[index]
        latencies = sorted(latencies)
        return {
            "invocations": count,
            "errors": sum(r["errors"] for r in replies),  # type: ignore[index]
            "seconds": seconds,
            "rate": count / seconds,
            "per_runtime": [r["count"] / seconds for r in replies],  # type: ignore[index]
            "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "server_cpu_us_per_inv": sum(r["cpu"] for r in replies) * 1e6 / max(count, 1),  # type: ignore[index]
            "runtime_cpu_us_per_inv": runtime_cpu / CLK_TCK * 1e6 / max(count, 1),
        }

    def close(self) -> None:
        for control in self.controls:
            try:
                send_msg(control, None)
            except OSError:
                pass
        for p in self.runtimes:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for pid in self.servers:
            os.waitpid(pid, 0)
        self.listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", type=int, required=True)
    parser.add_argument("--cwd", required=True, help="the function's directory")
    parser.add_argument("--handler", default="echo.handler")
    parser.add_argument("--payload", default='{"hello":"world"}')
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs awslambdaric")
    args = parser.parse_args()
    ceiling = CeilingRun(args)
    try:
        ceiling.start(args)
        emit({"ready": True, "init_s": ceiling.init_s, "runtime_pids": [p.pid for p in ceiling.runtimes]})
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            if words[0] == "run" and len(words) == 2:
                emit(ceiling.run(float(words[1])))
            else:
                emit({"error": f"unknown command {line.strip()!r}"})
    except (OSError, EOFError, RuntimeError) as e:
        emit({"ready": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        ceiling.close()


if __name__ == "__main__":
    main()
