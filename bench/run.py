"""HTTP benchmark of the daemon against the ceiling of the same machine, in the same run.

    .venv/bin/python bench/run.py            # full: 3 rounds of 10 s per configuration (~5 min)
    .venv/bin/python bench/run.py --quick    # a smoke run: 1 round of 2 s per configuration

For each configuration (MAX_CONCURRENCY, connections) in (1, 1), (2, 4), (4, 16) it starts the
daemon with the awslambdaric echo handler (examples/echo/echo-lambda) on free ports, warms every
instance up, then alternates measurement windows of

* the ceiling (bench/ceiling.py): the same number of awslambdaric processes against a minimal
  Runtime API that answers /next at once with a canned event (no client, no daemon), and
* the daemon, driven over keep-alive connections by ``wrk`` with bench/post.lua (or, when wrk is
  not installed, by bench/loadgen.py),

and reports the medians: invocations/s, p50/p99 latency, the fraction of the ceiling (paired by
round), the daemon's own CPU time per invocation (/proc/<pid>/stat), its RSS after the load
(/proc/<pid>/status), and the ratio to the Go daemon's published figures. It also measures cold
start: daemon launch to the first successful invoke, polled from the moment of launch.
Results go to bench/results/<time>.json. See bench/README.md for how to read them.
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
from pathlib import Path
from typing import List, Optional, Tuple

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

# The Go daemon on the reference 2-core machine (issue 2): inv/s ranges, and the fraction of that
# machine's ceiling they were (ceiling 2,100-2,850 / 5,900-6,900 / 8,000-9,400 inv/s).
GO_RATE = {(1, 1): (2000.0, 2900.0), (2, 4): (3700.0, 4500.0), (4, 16): (4100.0, 4100.0)}
GO_OF_CEILING = {(1, 1): 0.85, (2, 4): 4100 / 6400, (4, 16): 4100 / 8700}
GO_P99_MS = (0.7, 1.0)  # at (1, 1)
GO_COLD_S = 0.07
GO_RSS_MB = 13.0
# Targets (issue 2): >= 0.95 of the ceiling at (1,1); >= 1.25x the Go figures at (2,4) and (4,16)
# (taken against the top of Go's range); p99 no worse than Go's; cold start <= 0.15 s; RSS <= 25 MB.
TARGET_OF_CEILING_1 = 0.95
TARGET_X_GO = 1.25
TARGET_COLD_S = 0.15
TARGET_RSS_MB = 25.0


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
    """The daemon under test, as a user runs it: ``lambda-runtime-api-daemon python -m awslambdaric echo.handler``."""

    def __init__(self, max_concurrency: int, logs: Path) -> None:
        self.port = free_port()
        runtime_port = free_port()
        self.logs = logs
        self.out = open(logs / f"daemon-{max_concurrency}-{self.port}.out", "wb")  # noqa: SIM115 (closed in stop)
        self.err_path = logs / f"daemon-{max_concurrency}-{self.port}.err"
        self.err = open(self.err_path, "wb")  # noqa: SIM115
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            [*DAEMON_COMMAND, PYTHON, "-m", "awslambdaric", "echo.handler"],
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

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            try:
                if self.request("GET", "/_/health", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise SystemExit(f"the daemon did not come up within {timeout} s:\n{self.stderr_tail()}")

    def metrics(self) -> dict:
        """The /metrics samples we need: {'success': n, 'idle': n, ...}."""
        text = self.request("GET", "/metrics")[1].decode()
        out = {}
        for match in re.finditer(r'^lambda_(invocations_total|instances)\{\w+="(\w+)"\} (\d+)$', text, re.M):
            out[match.group(2)] = int(match.group(3))
        return out

    def instances(self) -> int:
        m = self.metrics()
        return m.get("idle", 0) + m.get("busy", 0)

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
def drive(url: str, connections: int, seconds: int, args: argparse.Namespace) -> dict:
    """Run the load generator once; its BENCH_RESULT plus rate and its own CPU per request."""
    if args.loadgen == "wrk":
        threads = max(1, min(args.wrk_threads, connections))
        command = [args.wrk_path, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                   "--timeout", "10s", "-s", str(BENCH / "post.lua"), url]
    else:
        command = [PYTHON, str(BENCH / "loadgen.py"), "--url", url, "--connections", str(connections),
                   "--seconds", str(seconds), "--payload", args.payload]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env={**os.environ, "BENCH_PAYLOAD": args.payload}, capture_output=True,
                          text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(line[len("BENCH_RESULT "):])
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                               "timeouts"))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["loadgen_cpu_us_per_inv"] = cpu * 1e6 / max(result["requests"], 1)
    return result


def measure_daemon(daemon: Daemon, connections: int, args: argparse.Namespace) -> dict:
    runtimes = children_of(daemon.pid)
    success_before = daemon.metrics().get("success", 0)
    user0, sys0 = cpu_split(daemon.pid)
    runtime_cpu = sum(cpu_ticks(p) for p in runtimes)
    busy0, total0 = machine_ticks()
    result = drive(daemon.url, connections, args.duration, args)
    busy1, total1 = machine_ticks()
    user1, sys1 = cpu_split(daemon.pid)
    runtime_cpu = sum(cpu_ticks(p) for p in runtimes) - runtime_cpu
    n = max(result["requests"], 1)
    result["daemon_cpu_us_per_inv"] = (user1 - user0 + sys1 - sys0) / CLK_TCK * 1e6 / n
    result["daemon_user_us_per_inv"] = (user1 - user0) / CLK_TCK * 1e6 / n
    result["daemon_sys_us_per_inv"] = (sys1 - sys0) / CLK_TCK * 1e6 / n
    result["runtime_cpu_us_per_inv"] = runtime_cpu / CLK_TCK * 1e6 / n
    result["machine_busy"] = (busy1 - busy0) / max(total1 - total0, 1)
    result["daemon_counted"] = daemon.metrics().get("success", 0) - success_before
    result["p50_ms"] = result["p50_us"] / 1000
    result["p99_ms"] = result["p99_us"] / 1000
    return result


def warm_up(daemon: Daemon, max_concurrency: int, connections: int, args: argparse.Namespace) -> int:
    """Drive load until every instance the configuration allows is running (or give up after 3 tries)."""
    for _ in range(3):
        drive(daemon.url, connections, args.warmup, args)
        if daemon.instances() >= max_concurrency:
            break
    return daemon.instances()


def check_echo(daemon: Daemon, payload: str) -> None:
    status, body = daemon.request("POST", INVOKE_PATH, payload.encode())
    if status != 200 or json.loads(body) != json.loads(payload):
        raise SystemExit(f"the echo function answered {status} {body[:200]!r}, not the payload")


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
    raise SystemExit(f"cold start: no successful invoke within the time limit (daemon status "
                     f"{daemon.proc.poll()}):\n{daemon.stderr_tail()}")


def measure_cold(runs: int, payload: str, logs: Path) -> List[dict]:
    body = payload.encode()
    results = []
    for _ in range(runs):
        daemon = Daemon(1, logs)  # timed from daemon.launched, taken just before it is spawned
        request = (f"POST {INVOKE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        try:
            listen_s, response_s = first_response(daemon, request, time.perf_counter() + 30)
            results.append({"listening_s": listen_s, "first_response_s": response_s,
                            "rss_kb": memory_kb(daemon.pid)["VmRSS"]})
        finally:
            daemon.stop()
    return results


# ---- one configuration ------------------------------------------------------------------------
def bench_config(max_concurrency: int, connections: int, args: argparse.Namespace, logs: Path) -> dict:
    print(f"  ({max_concurrency},{connections}): starting the ceiling and the daemon ...", flush=True)
    ceiling = Ceiling(max_concurrency, args.payload)
    daemon = Daemon(max_concurrency, logs)
    try:
        daemon.wait_healthy()
        check_echo(daemon, args.payload)
        instances = warm_up(daemon, max_concurrency, connections, args)
        if instances < max_concurrency:
            print(f"  warning: only {instances} of {max_concurrency} instances after warm-up", flush=True)
        ceiling.run(min(args.warmup, 1.0))  # the ceiling's runtimes warm up too
        rounds = []
        for r in range(args.runs):
            # alternate which goes first so that a drifting machine favours neither
            if r % 2 == 0:
                c = ceiling.run(args.duration)
                d = measure_daemon(daemon, connections, args)
            else:
                d = measure_daemon(daemon, connections, args)
                c = ceiling.run(args.duration)
            d["of_ceiling"] = d["rate"] / c["rate"] if c["rate"] else 0.0
            rounds.append({"ceiling": c, "daemon": d})
            print(f"    round {r + 1}: daemon {d['rate']:,.0f} inv/s (p50 {d['p50_ms']:.2f} ms, "
                  f"p99 {d['p99_ms']:.2f} ms, {d['errors']} errors), ceiling {c['rate']:,.0f} inv/s, "
                  f"{d['of_ceiling']:.2f} of it; daemon CPU {d['daemon_cpu_us_per_inv']:.0f} us/inv", flush=True)
        memory = memory_kb(daemon.pid)
        if daemon.proc.poll() is not None:
            raise SystemExit(f"the daemon died during the run:\n{daemon.stderr_tail()}")
    finally:
        daemon.stop()
        ceiling.close()

    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    return {
        "max_concurrency": max_concurrency,
        "connections": connections,
        "instances": instances,
        "rounds": rounds,
        "rate": med("daemon", "rate"),
        "p50_ms": med("daemon", "p50_ms"),
        "p99_ms": med("daemon", "p99_ms"),
        "of_ceiling": med("daemon", "of_ceiling"),
        "ceiling_rate": med("ceiling", "rate"),
        "ceiling_p50_ms": med("ceiling", "p50_ms"),
        "ceiling_p99_ms": med("ceiling", "p99_ms"),
        "daemon_cpu_us_per_inv": med("daemon", "daemon_cpu_us_per_inv"),
        "daemon_user_us_per_inv": med("daemon", "daemon_user_us_per_inv"),
        "daemon_sys_us_per_inv": med("daemon", "daemon_sys_us_per_inv"),
        "runtime_cpu_us_per_inv": med("daemon", "runtime_cpu_us_per_inv"),
        "ceiling_runtime_cpu_us_per_inv": med("ceiling", "runtime_cpu_us_per_inv"),
        "ceiling_server_cpu_us_per_inv": med("ceiling", "server_cpu_us_per_inv"),
        "loadgen_cpu_us_per_inv": med("daemon", "loadgen_cpu_us_per_inv"),
        "machine_busy": med("daemon", "machine_busy"),
        "errors": sum(r["daemon"]["errors"] for r in rounds),
        "rss_mb": memory["VmRSS"] / 1024,
        "peak_rss_mb": memory["VmHWM"] / 1024,
    }


# ---- report -----------------------------------------------------------------------------------
def label(config: Tuple[int, int]) -> str:
    return f"({config[0]},{config[1]})"


def x_go(config: Tuple[int, int], rate: float) -> str:
    if config not in GO_RATE:
        return "-"
    lo, hi = GO_RATE[config]
    return f"{rate / hi:.2f}" if lo == hi else f"{rate / hi:.2f}-{rate / lo:.2f}"


def x_go_scaled(config: Tuple[int, int], of_ceiling: float) -> str:
    return f"{of_ceiling / GO_OF_CEILING[config]:.2f}" if config in GO_OF_CEILING else "-"


def markdown(results: dict) -> List[str]:
    """The figures as a Markdown table, for the README."""
    lines = ["| config (MAX_CONCURRENCY, connections) | inv/s | p50 ms | p99 ms | ceiling inv/s | of ceiling "
             "| × Go | daemon CPU µs/inv |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["configs"]:
        config = (c["max_concurrency"], c["connections"])
        lines.append(f"| {label(config)} | {c['rate']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                     f"{c['ceiling_rate']:,.0f} | {c['of_ceiling']:.2f} | {x_go(config, c['rate'])} | "
                     f"{c['daemon_cpu_us_per_inv']:.0f} |")
    cold = results["cold_start"]
    rss = max((c["rss_mb"] for c in results["configs"]), default=0.0)
    tail = []
    if cold["runs"]:
        tail.append(f"cold start {cold['first_response_s']:.3f} s (median of {len(cold['runs'])})")
    if results["configs"]:
        tail.append(f"daemon RSS {rss:.1f} MB after load")
    lines.append("")
    lines.append("; ".join(tail) + f". Medians of {results['settings']['runs']} rounds of "
                 f"{results['settings']['duration']} s, {results['settings']['loadgen']}, revision "
                 f"{results['revision']}, {results['machine']['cpus']} CPUs.")
    return lines


def report(results: dict) -> List[str]:
    lines = []
    head = (f"{'config':>8} {'inv/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ceiling':>8} {'of ceil':>7} "
            f"{'x Go':>9} {'x Go*':>6} {'daemon':>7} {'runtime':>8} {'RSS':>6}")
    lines += [head, f"{'':>8} {'':>8} {'':>7} {'':>7} {'inv/s':>8} {'':>7} {'':>9} {'':>6} "
                    f"{'us/inv':>7} {'us/inv':>8} {'MB':>6}"]
    for c in results["configs"]:
        config = (c["max_concurrency"], c["connections"])
        lines.append(
            f"{label(config):>8} {c['rate']:>8,.0f} {c['p50_ms']:>7.2f} {c['p99_ms']:>7.2f} "
            f"{c['ceiling_rate']:>8,.0f} {c['of_ceiling']:>7.2f} {x_go(config, c['rate']):>9} "
            f"{x_go_scaled(config, c['of_ceiling']):>6} "
            f"{c['daemon_cpu_us_per_inv']:>7.0f} {c['runtime_cpu_us_per_inv']:>8.0f} {c['rss_mb']:>6.1f}")
    cold = results["cold_start"]
    if cold["runs"]:
        lines.append(f"cold start (launch to first 200, median of {len(cold['runs'])}): "
                     f"{cold['first_response_s']:.3f} s (listening after {cold['listening_s']:.3f} s); "
                     f"Go {GO_COLD_S} s")
    if results["configs"]:
        rss = max(c["rss_mb"] for c in results["configs"])
        peak = max(c["peak_rss_mb"] for c in results["configs"])
        lines.append(f"daemon RSS after load: {rss:.1f} MB (peak {peak:.1f} MB); Go {GO_RSS_MB:.0f} MB")
    lines.append("x Go = rate / Go's inv/s range (top-bottom); x Go* = our fraction of the ceiling / Go's fraction "
                 "of its machine's ceiling (machine-independent estimate)")
    lines.append("targets (meaningful only on a quiet machine):")
    for check, ok in targets(results):
        lines.append(f"  [{'ok' if ok else 'MISS'}] {check}")
    return lines


def targets(results: dict) -> List[Tuple[str, bool]]:
    by_config = {(c["max_concurrency"], c["connections"]): c for c in results["configs"]}
    checks = []
    one = by_config.get((1, 1))
    if one:
        checks.append((f"(1,1) >= {TARGET_OF_CEILING_1} of the ceiling: {one['of_ceiling']:.2f}",
                       one["of_ceiling"] >= TARGET_OF_CEILING_1))
        checks.append((f"(1,1) p99 <= Go's {GO_P99_MS[1]} ms: {one['p99_ms']:.2f} ms", one["p99_ms"] <= GO_P99_MS[1]))
    for config in ((2, 4), (4, 16)):
        c = by_config.get(config)
        if c:
            need = TARGET_X_GO * GO_RATE[config][1]
            checks.append((f"{label(config)} >= {TARGET_X_GO} x Go ({need:,.0f} inv/s): {c['rate']:,.0f}",
                           c["rate"] >= need))
    cold = results["cold_start"]
    if cold["runs"]:
        checks.append((f"cold start <= {TARGET_COLD_S} s: {cold['first_response_s']:.3f} s",
                       cold["first_response_s"] <= TARGET_COLD_S))
    if results["configs"]:
        rss = max(c["rss_mb"] for c in results["configs"])
        checks.append((f"RSS <= {TARGET_RSS_MB:.0f} MB: {rss:.1f} MB", rss <= TARGET_RSS_MB))
    errors = sum(c["errors"] for c in results["configs"])
    checks.append((f"no failed requests: {errors}", errors == 0))
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
    if load_at_start > 0.5:
        print("warning: the machine is not quiet; absolute figures will be low and noisy", flush=True)
    results: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": load_at_start},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="lambda-rapid-bench-") as tmp:
        logs = Path(tmp)
        cold_runs: List[dict] = []
        if args.cold_runs:
            print("cold start ...", flush=True)
            cold_runs = measure_cold(args.cold_runs, args.payload, logs)
        results["cold_start"] = {
            "runs": cold_runs,
            "first_response_s": statistics.median(r["first_response_s"] for r in cold_runs) if cold_runs else None,
            "listening_s": statistics.median(r["listening_s"] for r in cold_runs) if cold_runs else None,
        }
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
