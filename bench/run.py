"""HTTP benchmark of the daemon against the ceiling of the same machine and, optionally, a peer daemon.

    .venv/bin/python bench/run.py            # full: 3 rounds of 10 s per configuration (~5 min)
    .venv/bin/python bench/run.py --quick    # a smoke run: 1 round of 2 s per configuration
    .venv/bin/python bench/run.py --peer-daemon /path/to/go/lambda-runtime-api-daemon --peer-label go

For each configuration (MAX_CONCURRENCY, connections) in (1, 1), (2, 4), (4, 16) it starts the
daemon with the awslambdaric echo handler (examples/echo/echo-lambda) on free ports, warms every
instance up, then alternates measurement windows of

* the ceiling (bench/ceiling.py): the same number of awslambdaric processes against a minimal
  Runtime API that answers /next at once with a canned event (no client, no daemon),
* the daemon, driven over keep-alive connections by ``wrk`` with bench/post.lua (or, when wrk is
  not installed, by bench/loadgen.py), and
* with ``--peer-daemon PATH``, another daemon run the same way (``PATH python -m awslambdaric
  echo.handler`` with the same PORT, RUNTIME_API_PORT and MAX_CONCURRENCY), e.g. the Go daemon,

and reports the medians: invocations/s, p50/p99 latency, the fraction of the ceiling and ours
divided by the peer (both paired by round), each daemon's own CPU time per invocation
(/proc/<pid>/stat), its RSS after the load (/proc/<pid>/status). It also measures cold start:
daemon launch to the first successful invoke, polled from the moment of launch (ours and the peer
alternately). Results go to bench/results/<time>.json. See bench/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
ECHO_DIR = ROOT / "examples" / "echo" / "echo-lambda"
RESULTS = BENCH / "results"
PYTHON = sys.executable
DAEMON = Path(sys.executable).parent / "lambda-runtime-api-daemon"
DAEMON_COMMAND = [str(DAEMON)]  # or, with --daemon-src DIR, the package imported from DIR
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIGS = ((1, 1), (2, 4), (4, 16))

# Targets (issue 10), against the peer measured in the same run (--peer-daemon): >= 1.10x its rate
# at every configuration with a p99 no worse; cold start <= 0.07 s (the Go daemon's on this machine
# kind); RSS <= 14 MB for the HTTP-only daemon after load. And (issue 2) >= 0.95 of the ceiling at (1,1).
TARGET_X_PEER = 1.10
TARGET_COLD_S = 0.07
TARGET_RSS_MB = 14.0
TARGET_OF_CEILING_1 = 0.95


# ---- /proc helpers ----------------------------------------------------------------------------
def cpu_split(pid: int) -> Tuple[int, int]:
    """(utime, stime) of one process (all its threads, not its children), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def cpu_ticks(pid: int) -> int:
    return sum(cpu_split(pid))


def children_of(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def machine_ticks() -> Tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def loadavg() -> float:
    return os.getloadavg()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the daemon -------------------------------------------------------------------------------
def daemon_env(port: int, runtime_port: int, max_concurrency: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "AMQP_", "MAX_", "MIN_", "LOG_LEVEL", "PRINT_REPORTS", "USE_STRUCTURED"))}
    env.update(PORT=str(port), RUNTIME_API_PORT=str(runtime_port), INVOKE_API_HOST="127.0.0.1",
               MAX_CONCURRENCY=str(max_concurrency), AWS_LAMBDA_FUNCTION_NAME="echo")
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Daemon:
    """A daemon under test, as a user runs it: ``<command> python -m awslambdaric echo.handler``.

    ``command`` is ours (DAEMON_COMMAND) or the peer's (--peer-daemon). Nothing here relies on
    routes only ours has: readiness is a real invoke, instances are the daemon's child processes,
    and /metrics is read only when the daemon answers it."""

    def __init__(self, command: List[str], max_concurrency: int, logs: Path, side: str = "ours") -> None:
        self.side = side
        self.port = free_port()
        runtime_port = free_port()
        self.logs = logs
        name = f"{side}-{max_concurrency}-{self.port}"
        self.out = open(logs / f"{name}.out", "wb")  # noqa: SIM115 (closed in stop)
        self.err_path = logs / f"{name}.err"
        self.err = open(self.err_path, "wb")  # noqa: SIM115
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            [*command, PYTHON, "-m", "awslambdaric", "echo.handler"],
            cwd=str(ECHO_DIR), env=daemon_env(self.port, runtime_port, max_concurrency),
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err, start_new_session=True)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{self.port}{INVOKE_PATH}"

    def stderr_tail(self) -> str:
        return self.err_path.read_text(errors="replace")[-2000:]

    def request(self, method: str, path: str, body: Optional[bytes] = None, timeout: float = 10.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def wait_serving(self, payload: str, timeout: float = 20.0) -> None:
        """Poll with real invokes until one echoes the payload (a daemon that starts its runtimes
        lazily, like the Go one, starts the first here)."""
        deadline = time.monotonic() + timeout
        answer = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the {self.side} daemon exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            try:
                answer = self.request("POST", INVOKE_PATH, payload.encode(), timeout=5.0)
            except (OSError, http.client.HTTPException):
                time.sleep(0.01)
                continue
            if answer[0] == 200 and json.loads(answer[1]) == json.loads(payload):
                return
            time.sleep(0.01)
        raise SystemExit(f"the {self.side} daemon did not echo the payload within {timeout} s (last answer "
                         f"{answer!r:.200}):\n{self.stderr_tail()}")

    def success_count(self) -> Optional[int]:
        """Successful invocations counted by the daemon itself (/metrics), or None if it has no such route."""
        try:
            status, body = self.request("GET", "/metrics")
        except (OSError, http.client.HTTPException):
            return None
        match = re.search(rb'^lambda_invocations_total\{outcome="success"\} (\d+)$', body, re.M)
        return int(match.group(1)) if status == 200 and match else None

    def instances(self) -> int:
        """Runtime processes running (the daemon's children)."""
        return len(children_of(self.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # anything left in its session (never other processes)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.out.close()
        self.err.close()


# ---- the ceiling ------------------------------------------------------------------------------
class Ceiling:
    """bench/ceiling.py as a child process, driven one window at a time."""

    def __init__(self, runtimes: int, payload: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / "ceiling.py"), "--runtimes", str(runtimes), "--cwd", str(ECHO_DIR),
             "--payload", payload, "--python", PYTHON],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            raise SystemExit(f"the ceiling could not start: {ready}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"the ceiling process ended (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, seconds: float) -> dict:
        self.proc.stdin.write(f"run {seconds}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        result = self._read()
        if "rate" not in result:
            raise SystemExit(f"the ceiling failed: {result}")
        return result

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---- load -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """How to drive an Invoke API: ``wrk`` with bench/post.lua, or bench/loadgen.py."""

    kind: str  # "wrk" or "python"
    payload: str
    wrk_path: Optional[str] = None
    wrk_threads: int = 1
    timeout: float = 10.0  # wrk counts a request unanswered this long as a timeout (an error) and reconnects


def drive(url: str, connections: int, seconds: float, load: Load) -> dict:
    """Run the load generator once; its BENCH_RESULT plus rate and its own CPU per request."""
    if load.kind == "wrk":
        threads = max(1, min(load.wrk_threads, connections))  # wrk refuses more threads than connections
        command = [str(load.wrk_path), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
                   "--timeout", f"{load.timeout:g}s", "-s", str(BENCH / "post.lua"), url]
    else:
        command = [PYTHON, str(BENCH / "loadgen.py"), "--url", url, "--connections", str(connections),
                   "--seconds", str(seconds), "--payload", load.payload]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env={**os.environ, "BENCH_PAYLOAD": load.payload}, capture_output=True,
                          text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(line[len("BENCH_RESULT "):])
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                               "timeouts"))
    result["p50_ms"] = result["p50_us"] / 1000
    result["p99_ms"] = result["p99_us"] / 1000
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["loadgen_cpu_us_per_inv"] = cpu * 1e6 / max(result["requests"], 1)
    return result


def measure_daemon(daemon: Daemon, connections: int, args: argparse.Namespace) -> dict:
    runtimes = children_of(daemon.pid)
    success_before = daemon.success_count()
    user0, sys0 = cpu_split(daemon.pid)
    runtime_cpu = sum(cpu_ticks(p) for p in runtimes)
    busy0, total0 = machine_ticks()
    result = drive(daemon.url, connections, args.duration, args.load)
    busy1, total1 = machine_ticks()
    user1, sys1 = cpu_split(daemon.pid)
    runtime_cpu = sum(cpu_ticks(p) for p in runtimes) - runtime_cpu
    n = max(result["requests"], 1)
    result["daemon_cpu_us_per_inv"] = (user1 - user0 + sys1 - sys0) / CLK_TCK * 1e6 / n
    result["daemon_user_us_per_inv"] = (user1 - user0) / CLK_TCK * 1e6 / n
    result["daemon_sys_us_per_inv"] = (sys1 - sys0) / CLK_TCK * 1e6 / n
    result["runtime_cpu_us_per_inv"] = runtime_cpu / CLK_TCK * 1e6 / n
    result["machine_busy"] = (busy1 - busy0) / max(total1 - total0, 1)
    success_after = daemon.success_count()
    result["daemon_counted"] = (success_after - success_before
                                if success_before is not None and success_after is not None else None)
    return result


def warm_up(daemon: Daemon, max_concurrency: int, connections: int, args: argparse.Namespace) -> int:
    """Drive load until every instance the configuration allows is running (or give up after 3 tries)."""
    for _ in range(3):
        drive(daemon.url, connections, args.warmup, args.load)
        if daemon.instances() >= max_concurrency:
            break
    return daemon.instances()


# ---- cold start -------------------------------------------------------------------------------
def first_response(daemon: Daemon, request: bytes, deadline: float) -> Tuple[float, float]:
    """(seconds to the first accepted connection, seconds to the first 200) since the daemon's launch."""
    listening = 0.0
    origin = daemon.launched
    while time.perf_counter() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10.0)
        except OSError:
            if daemon.proc.poll() is not None:
                break
            time.sleep(0.001)
            continue
        if not listening:
            listening = time.perf_counter() - origin
        try:
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            data = b""
        finally:
            sock.close()
        if data.startswith(b"HTTP/1.1 200"):
            return listening, time.perf_counter() - origin
        time.sleep(0.001)
    raise SystemExit(f"cold start: no successful invoke from the {daemon.side} daemon within the time limit "
                     f"(status {daemon.proc.poll()}):\n{daemon.stderr_tail()}")


def measure_cold(runs: int, payload: str, logs: Path, commands: Dict[str, List[str]]) -> Dict[str, List[dict]]:
    """``runs`` cold starts of each daemon in ``commands`` ({side: command}), alternating which goes first."""
    body = payload.encode()
    results: Dict[str, List[dict]] = {side: [] for side in commands}
    sides = list(commands)
    for i in range(runs):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            daemon = Daemon(commands[side], 1, logs, side)  # timed from daemon.launched, taken just before the spawn
            request = (f"POST {INVOKE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                       ).encode() + body
            try:
                listen_s, response_s = first_response(daemon, request, time.perf_counter() + 30)
                results[side].append({"listening_s": listen_s, "first_response_s": response_s,
                                      "rss_kb": memory_kb(daemon.pid)["VmRSS"]})
            finally:
                daemon.stop()
    return results


def cold_summary(runs: List[dict]) -> dict:
    return {
        "runs": runs,
        "first_response_s": statistics.median(r["first_response_s"] for r in runs) if runs else None,
        "listening_s": statistics.median(r["listening_s"] for r in runs) if runs else None,
        "min_s": min((r["first_response_s"] for r in runs), default=None),
        "max_s": max((r["first_response_s"] for r in runs), default=None),
    }


# ---- one configuration ------------------------------------------------------------------------
DAEMON_KEYS = ("rate", "p50_ms", "p99_ms", "of_ceiling", "daemon_cpu_us_per_inv", "daemon_user_us_per_inv",
               "daemon_sys_us_per_inv", "runtime_cpu_us_per_inv", "loadgen_cpu_us_per_inv", "machine_busy")


def bench_config(max_concurrency: int, connections: int, args: argparse.Namespace, logs: Path) -> dict:
    """Ceiling, our daemon and (with --peer-daemon) the peer, in alternating rounds on one configuration.

    The rounds' order rotates (ceiling, ours, peer; ours, peer, ceiling; ...) so that a drifting
    machine favours none; whoever is not measured is parked (runtimes blocked in /next)."""
    print(f"  ({max_concurrency},{connections}): starting the ceiling and the daemon(s) ...", flush=True)
    ceiling = Ceiling(max_concurrency, args.payload)
    daemons = {"ours": Daemon(DAEMON_COMMAND, max_concurrency, logs, "ours")}
    if args.peer_daemon:
        daemons["peer"] = Daemon([str(args.peer_daemon)], max_concurrency, logs, "peer")
    instances: Dict[str, int] = {}
    memory: Dict[str, dict] = {}
    try:
        for side, daemon in daemons.items():
            daemon.wait_serving(args.payload)
            instances[side] = warm_up(daemon, max_concurrency, connections, args)
            if instances[side] < max_concurrency:
                print(f"  warning: {side}: only {instances[side]} of {max_concurrency} instances after warm-up",
                      flush=True)
        ceiling.run(min(args.warmup, 1.0))  # the ceiling's runtimes warm up too
        sides = ["ceiling", *daemons]
        rounds = []
        for r in range(args.runs):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            measured = {}
            for side in order:
                if side == "ceiling":
                    measured[side] = ceiling.run(args.duration)
                else:
                    measured[side] = measure_daemon(daemons[side], connections, args)
            c = measured["ceiling"]
            for side in daemons:
                measured[side]["of_ceiling"] = measured[side]["rate"] / c["rate"] if c["rate"] else 0.0
            if "peer" in measured:
                peer = measured["peer"]
                measured["ours"]["x_peer"] = measured["ours"]["rate"] / peer["rate"] if peer["rate"] else 0.0
            # "daemon" is ours, as in the results files before --peer-daemon existed
            rounds.append({"ceiling": c, "daemon": measured["ours"], **({"peer": measured["peer"]}
                                                                       if "peer" in measured else {})})
            text = [f"    round {r + 1}: ceiling {c['rate']:,.0f} inv/s"]
            for side in daemons:
                d = measured[side]
                text.append(f"{side} {d['rate']:,.0f} inv/s (p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, "
                            f"{d['errors']} errors, {d['of_ceiling']:.2f} of the ceiling, "
                            f"daemon CPU {d['daemon_cpu_us_per_inv']:.0f} us/inv)")
            print("; ".join(text), flush=True)
        for side, daemon in daemons.items():
            memory[side] = memory_kb(daemon.pid)
            if daemon.proc.poll() is not None:
                raise SystemExit(f"the {side} daemon died during the run:\n{daemon.stderr_tail()}")
    finally:
        for daemon in daemons.values():
            daemon.stop()
        ceiling.close()

    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    def summary(key: str, side: str) -> dict:  # key: the side's name in the rounds
        out = {k: med(key, k) for k in DAEMON_KEYS}
        out.update(errors=sum(r[key]["errors"] for r in rounds), rss_mb=memory[side]["VmRSS"] / 1024,
                   peak_rss_mb=memory[side]["VmHWM"] / 1024)
        return out

    result = {
        "max_concurrency": max_concurrency,
        "connections": connections,
        "instances": instances["ours"],
        "rounds": rounds,
        **summary("daemon", "ours"),
        "ceiling_rate": med("ceiling", "rate"),
        "ceiling_p50_ms": med("ceiling", "p50_ms"),
        "ceiling_p99_ms": med("ceiling", "p99_ms"),
        "ceiling_runtime_cpu_us_per_inv": med("ceiling", "runtime_cpu_us_per_inv"),
        "ceiling_server_cpu_us_per_inv": med("ceiling", "server_cpu_us_per_inv"),
    }
    if "peer" in daemons:
        result["peer"] = {"instances": instances["peer"], **summary("peer", "peer")}
        result["x_peer"] = med("daemon", "x_peer")
    return result


# ---- report -----------------------------------------------------------------------------------
def label(config: Tuple[int, int]) -> str:
    return f"({config[0]},{config[1]})"


def markdown(results: dict) -> List[str]:
    """The figures as a Markdown table, for the README."""
    peer = results["settings"].get("peer_label") if results["settings"].get("peer_daemon") else None
    if peer:
        lines = [f"| HTTP (MAX_CONCURRENCY, connections) | {peer} inv/s | ours inv/s | ours ÷ {peer} | ceiling inv/s "
                 f"| ours p50 / p99 ms | {peer} p50 / p99 ms | daemon CPU µs/inv ours / {peer} |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in results["configs"]:
            q = c["peer"]
            lines.append(f"| {label((c['max_concurrency'], c['connections']))} | {q['rate']:,.0f} | {c['rate']:,.0f} | "
                         f"{c['x_peer']:.2f} | {c['ceiling_rate']:,.0f} | {c['p50_ms']:.2f} / {c['p99_ms']:.2f} | "
                         f"{q['p50_ms']:.2f} / {q['p99_ms']:.2f} | {c['daemon_cpu_us_per_inv']:.0f} / "
                         f"{q['daemon_cpu_us_per_inv']:.0f} |")
    else:
        lines = ["| HTTP (MAX_CONCURRENCY, connections) | inv/s | p50 ms | p99 ms | ceiling inv/s | of ceiling "
                 "| daemon CPU µs/inv |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for c in results["configs"]:
            lines.append(f"| {label((c['max_concurrency'], c['connections']))} | {c['rate']:,.0f} | "
                         f"{c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {c['ceiling_rate']:,.0f} | {c['of_ceiling']:.2f} | "
                         f"{c['daemon_cpu_us_per_inv']:.0f} |")
    tail = []
    cold = results["cold_start"]
    if cold["runs"]:
        text = f"cold start {cold['first_response_s']:.3f} s"
        if peer:
            text += f" ({peer} {cold['peer']['first_response_s']:.3f} s)"
        tail.append(text + f" (median of {len(cold['runs'])})")
    if results["configs"]:
        text = f"daemon RSS {max(c['rss_mb'] for c in results['configs']):.1f} MB after load"
        if peer:
            text += f" ({peer} {max(c['peer']['rss_mb'] for c in results['configs']):.1f} MB)"
        tail.append(text)
    lines.append("")
    lines.append("; ".join(tail) + f". Medians of {results['settings']['runs']} rounds of "
                 f"{results['settings']['duration']} s, alternating, {results['settings']['loadgen']}, revision "
                 f"{results['revision']}, {results['machine']['cpus']} CPUs, load average "
                 f"{results['machine']['load_average_at_start']:.2f} before and "
                 f"{results['machine']['load_average_at_end']:.2f} after.")
    return lines


def report(results: dict) -> List[str]:
    peer = results["settings"]["peer_label"] if results["settings"].get("peer_daemon") else None
    lines = [f"{'config':>8} {'side':<10} {'inv/s':>8} {'of ceil':>7} {'p50 ms':>7} {'p99 ms':>7} {'daemon':>7} "
             f"{'runtime':>8} {'RSS':>6}",
             f"{'':>8} {'':<10} {'':>8} {'':>7} {'':>7} {'':>7} {'us/inv':>7} {'us/inv':>8} {'MB':>6}"]

    def row(config: str, side: str, c: dict) -> str:
        return (f"{config:>8} {side:<10} {c['rate']:>8,.0f} {c['of_ceiling']:>7.2f} {c['p50_ms']:>7.2f} "
                f"{c['p99_ms']:>7.2f} {c['daemon_cpu_us_per_inv']:>7.0f} {c['runtime_cpu_us_per_inv']:>8.0f} "
                f"{c['rss_mb']:>6.1f}")

    for c in results["configs"]:
        config = label((c["max_concurrency"], c["connections"]))
        lines.append(f"{config:>8} {'ceiling':<10} {c['ceiling_rate']:>8,.0f} {1:>7.2f} {c['ceiling_p50_ms']:>7.2f} "
                     f"{c['ceiling_p99_ms']:>7.2f} {'-':>7} {c['ceiling_runtime_cpu_us_per_inv']:>8.0f}")
        lines.append(row("", "ours", c))
        if peer:
            q = c["peer"]
            lines.append(row("", peer, q))
            lines.append(f"{'':>8} {'ours÷' + peer:<10} {c['x_peer']:>8.2f} {'':>7} {c['p50_ms'] / q['p50_ms']:>7.2f} "
                         f"{c['p99_ms'] / q['p99_ms']:>7.2f} "
                         f"{c['daemon_cpu_us_per_inv'] / max(q['daemon_cpu_us_per_inv'], 1e-9):>7.2f} {'':>8} "
                         f"{c['rss_mb'] / q['rss_mb']:>6.2f}")
    cold = results["cold_start"]

    def cold_text(k: dict) -> str:
        return (f"{k['first_response_s']:.3f} s ({k['min_s']:.3f}-{k['max_s']:.3f}, listening after "
                f"{k['listening_s']:.3f} s)")

    if cold["runs"]:
        text = f"cold start (launch to first 200, median of {len(cold['runs'])}): ours {cold_text(cold)}"
        if peer:
            text += (f"; {peer} {cold_text(cold['peer'])}; ours÷{peer} "
                     f"{cold['first_response_s'] / cold['peer']['first_response_s']:.2f}")
        lines.append(text)
    if results["configs"]:
        rss = max(c["rss_mb"] for c in results["configs"])
        peak = max(c["peak_rss_mb"] for c in results["configs"])
        text = f"daemon RSS after load (largest configuration): ours {rss:.1f} MB (peak {peak:.1f} MB)"
        if peer:
            text += (f"; {peer} {max(c['peer']['rss_mb'] for c in results['configs']):.1f} MB "
                     f"(peak {max(c['peer']['peak_rss_mb'] for c in results['configs']):.1f} MB)")
        lines.append(text)
    lines.append(f"load average {results['machine']['load_average_at_start']:.2f} at start, "
                 f"{results['machine']['load_average_at_end']:.2f} at end")
    lines.append("targets (meaningful only on a quiet machine):")
    for check, ok in targets(results):
        lines.append(f"  [{'ok' if ok else 'MISS'}] {check}")
    return lines


def targets(results: dict) -> List[Tuple[str, bool]]:
    peer = results["settings"]["peer_label"] if results["settings"].get("peer_daemon") else None
    checks = []
    for c in results["configs"]:
        config = label((c["max_concurrency"], c["connections"]))
        if (c["max_concurrency"], c["connections"]) == (1, 1):
            checks.append((f"(1,1) >= {TARGET_OF_CEILING_1} of the ceiling: {c['of_ceiling']:.2f}",
                           c["of_ceiling"] >= TARGET_OF_CEILING_1))
        if peer:
            q = c["peer"]
            checks.append((f"{config} >= {TARGET_X_PEER} x {peer}: {c['x_peer']:.2f}", c["x_peer"] >= TARGET_X_PEER))
            checks.append((f"{config} p99 <= {peer}'s {q['p99_ms']:.2f} ms: {c['p99_ms']:.2f} ms",
                           c["p99_ms"] <= q["p99_ms"]))
    cold = results["cold_start"]
    if cold["runs"]:
        checks.append((f"cold start <= {TARGET_COLD_S} s: {cold['first_response_s']:.3f} s",
                       cold["first_response_s"] <= TARGET_COLD_S))
    if results["configs"]:
        rss = max(c["rss_mb"] for c in results["configs"])
        checks.append((f"RSS <= {TARGET_RSS_MB:.0f} MB: {rss:.1f} MB", rss <= TARGET_RSS_MB))
    errors = sum(c["errors"] + c.get("peer", {}).get("errors", 0) for c in results["configs"])
    checks.append((f"no failed requests: {errors}", errors == 0))
    if not peer:
        checks.append(("the targets relative to a peer daemon need --peer-daemon", True))
    return checks


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s, 3 cold starts")
    parser.add_argument("--runs", type=int, help="rounds per configuration (default 3; 1 with --quick)")
    parser.add_argument("--duration", type=int, help="seconds per measurement window (default 10; 2 with --quick)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load (default 2; 1 with --quick)")
    parser.add_argument("--cold-runs", type=int, help="cold starts to measure (default 7; 3 with --quick; 0 = skip)")
    parser.add_argument("--configs", default="1x1,2x4,4x16",
                        help="MAX_CONCURRENCYxCONNECTIONS list (default 1x1,2x4,4x16)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk when installed (auto), or bench/loadgen.py")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: the cores are scarce)")
    parser.add_argument("--payload", default='{"hello":"world"}', help="the JSON event sent to the echo function")
    parser.add_argument("--markdown", action="store_true", help="also print the figures as a Markdown table")
    parser.add_argument("--daemon-src", type=Path,
                        help="run lambda_rapid imported from this directory (A/B of an uncommitted change)")
    parser.add_argument("--peer-daemon", type=Path,
                        help="also measure this daemon (e.g. the Go one), run as PATH python -m awslambdaric "
                             "echo.handler, in alternating rounds with ours")
    parser.add_argument("--peer-label", default="peer", help="the peer's name in the report (default: peer)")
    parser.add_argument("--output", type=Path, help="JSON results file (default bench/results/<time>.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.duration = args.duration or (2 if quick else 10)
    args.warmup = args.warmup or (1 if quick else 2)
    args.cold_runs = args.cold_runs if args.cold_runs is not None else (3 if quick else 7)
    try:
        args.config_list = [tuple(int(x) for x in item.split("x")) for item in args.configs.split(",")]
        assert all(len(c) == 2 and c[0] >= 1 and c[1] >= 1 for c in args.config_list)
    except (ValueError, AssertionError):
        parser.error(f"--configs: expected a list like 1x1,2x4,4x16, got {args.configs!r}")
    args.wrk_path = shutil.which("wrk")
    if args.loadgen == "auto":
        args.loadgen = "wrk" if args.wrk_path else "python"
    elif args.loadgen == "wrk" and not args.wrk_path:
        parser.error("wrk is not installed (apt-get install wrk), use --loadgen python")
    if args.peer_daemon is not None:
        found = shutil.which(str(args.peer_daemon))
        if found is None:
            parser.error(f"--peer-daemon: {args.peer_daemon} is not an executable")
        args.peer_daemon = Path(found).resolve()
    args.load = Load(args.loadgen, args.payload, args.wrk_path, args.wrk_threads)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.daemon_src is not None:
        src = args.daemon_src.resolve()
        if not (src / "lambda_rapid" / "cli.py").exists():
            raise SystemExit(f"--daemon-src: no lambda_rapid package in {src}")
        DAEMON_COMMAND[:] = [PYTHON, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); "
                             "from lambda_rapid.cli import main; sys.exit(main())"]
    elif not DAEMON.exists():
        raise SystemExit(f"{DAEMON} not found: install the project first (pip install -e '.[test]')")
    json.loads(args.payload)
    load_at_start = loadavg()
    print(f"lambda-rapid HTTP benchmark: {os.cpu_count()} CPUs, load average {load_at_start:.2f}, "
          f"load generator {args.loadgen}, {args.runs} round(s) of {args.duration} s per configuration", flush=True)
    if args.peer_daemon:
        print(f"peer ({args.peer_label}): {args.peer_daemon}", flush=True)
    if load_at_start > 0.5:
        print("warning: the machine is not quiet; absolute figures will be low and noisy", flush=True)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": load_at_start},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "load"},
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="lambda-rapid-bench-") as tmp:
        logs = Path(tmp)
        commands = {"ours": DAEMON_COMMAND, **({"peer": [str(args.peer_daemon)]} if args.peer_daemon else {})}
        cold: Dict[str, List[dict]] = {side: [] for side in commands}
        if args.cold_runs:
            print("cold start ...", flush=True)
            cold = measure_cold(args.cold_runs, args.payload, logs, commands)
        results["cold_start"] = cold_summary(cold["ours"])  # ours at the top, as before --peer-daemon
        if args.peer_daemon:
            results["cold_start"]["peer"] = cold_summary(cold["peer"])
        for max_concurrency, connections in args.config_list:
            results["configs"].append(bench_config(max_concurrency, connections, args, logs))
    results["machine"]["load_average_at_end"] = loadavg()
    lines = report(results)
    print()
    print("\n".join(lines))
    results["report"] = lines
    results["markdown"] = markdown(results)
    if args.markdown:
        print()
        print("\n".join(results["markdown"]))
    output = args.output or RESULTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
