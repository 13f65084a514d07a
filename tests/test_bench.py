"""The benchmark tools in bench/ still work: short runs (a second of load at most), real processes.

They check that each tool measures what it claims (invocations really counted, no errors, results
written), not how fast anything is: the machine is shared and small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ECHO_DIR, PYTHON, ROOT, wait_until

BENCH = ROOT / "bench"


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_hotpath_drives_the_real_daemon_objects():
    done = subprocess.run([PYTHON, str(BENCH / "hotpath.py"), "--invocations", "300"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # 300 measured + 300 warm-up + the first one, all counted as successes by the pool
    assert "300 invocations (601 counted by the pool)" in done.stdout, done.stdout
    done = subprocess.run([PYTHON, str(BENCH / "hotpath.py"), "--invocations", "100", "--client", "boto3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "us CPU per invocation" in done.stdout


def test_ceiling_counts_responses_and_parks_runtimes_between_windows():
    proc = subprocess.Popen([PYTHON, str(BENCH / "ceiling.py"), "--runtimes", "2", "--cwd", str(ECHO_DIR)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] is True, ready
        pids = ready["runtime_pids"]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        results = []
        for _ in range(2):
            proc.stdin.write("run 0.3\n")
            proc.stdin.flush()
            results.append(json.loads(proc.stdout.readline()))
        for r in results:
            assert r["errors"] == 0, r
            assert r["invocations"] > 10, r
            assert len(r["per_runtime"]) == 2 and all(rate > 0 for rate in r["per_runtime"]), r
            assert 0 < r["p50_ms"] <= r["p99_ms"], r
        # parked between windows: the runtimes burn no CPU while nobody measures
        before = sum(cpu_ticks(p) for p in pids)
        time.sleep(0.3)  # a measurement interval, not a wait for readiness
        busy = sum(cpu_ticks(p) for p in pids) - before
        assert busy <= 2, f"parked runtimes used {busy} clock ticks in 0.3 s"
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(15) == 0
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, message="the ceiling's runtimes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_loadgen_reports_requests_the_daemon_answered(echo_daemon):
    done = subprocess.run([PYTHON, str(BENCH / "loadgen.py"), "--url", echo_daemon.invoke_url(), "--connections", "2",
                           "--seconds", "0.5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT "):])
    assert result["requests"] > 0
    assert result["status_errors"] == result["read_errors"] == result["connect_errors"] == 0, result
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]
    metrics = echo_daemon.metrics()
    success = int(next(x for x in metrics.splitlines() if x.startswith('lambda_invocations_total{outcome="success"}'))
                  .split()[-1])
    assert success >= result["requests"]


@pytest.mark.parametrize("loadgen", ["wrk", "python"])
def test_run_py_measures_daemon_ceiling_and_cold_start(loadgen, tmp_path):
    if loadgen == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    output = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MAX_", "PORT"))}
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--configs", "1x1", "--runs", "1", "--duration", "1",
                           "--warmup", "1", "--cold-runs", "1", "--loadgen", loadgen, "--output", str(output)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    (config,) = results["configs"]
    assert (config["max_concurrency"], config["connections"], config["instances"]) == (1, 1, 1)
    assert config["errors"] == 0
    assert config["rate"] > 0 and config["ceiling_rate"] > 0
    assert config["of_ceiling"] == pytest.approx(config["rate"] / config["ceiling_rate"], rel=1e-6)
    (round_,) = config["rounds"]
    assert round_["daemon"]["daemon_counted"] >= round_["daemon"]["requests"] > 0
    assert config["daemon_cpu_us_per_inv"] > 0 and 1 < config["rss_mb"] < 500
    cold = results["cold_start"]
    assert 0 < cold["listening_s"] <= cold["first_response_s"] < 30
    assert "targets" in done.stdout and "need --peer-daemon" in done.stdout


def bench_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MAX_", "PORT", "AMQP_"))}


def test_run_py_measures_a_peer_daemon_side_by_side(tmp_path):
    """--peer-daemon, with our own daemon standing in for the peer (no Go binary needed)."""
    output = tmp_path / "results.json"
    peer = Path(PYTHON).parent / "lambda-runtime-api-daemon"
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--configs", "2x2", "--runs", "2", "--duration", "1",
                           "--warmup", "1", "--cold-runs", "1", "--loadgen", "python", "--peer-daemon", str(peer),
                           "--peer-label", "self", "--markdown", "--output", str(output)],
                          capture_output=True, text=True, timeout=120, env=bench_env())
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    (config,) = results["configs"]
    peer_side = config["peer"]
    assert config["instances"] == peer_side["instances"] == 2
    assert config["errors"] == peer_side["errors"] == 0
    assert config["rate"] > 0 and peer_side["rate"] > 0 and config["ceiling_rate"] > 0
    for r in config["rounds"]:  # every round measured all three, and the ratio is paired by round
        assert r["peer"]["requests"] > 0 and r["ceiling"]["invocations"] > 0
        assert r["daemon"]["x_peer"] == pytest.approx(r["daemon"]["rate"] / r["peer"]["rate"], rel=1e-6)
    assert config["x_peer"] > 0 and peer_side["daemon_cpu_us_per_inv"] > 0 and 1 < peer_side["rss_mb"] < 500
    cold = results["cold_start"]
    assert 0 < cold["peer"]["listening_s"] <= cold["peer"]["first_response_s"] < 30
    assert 0 < cold["first_response_s"] < 30
    assert "ours÷self" in done.stdout and "x self" in done.stdout
    assert "| self inv/s | ours inv/s | ours ÷ self |" in done.stdout


def test_amqp_bench_measures_both_paths_side_by_side(tmp_path):
    """amqp_bench.py with our own daemon and lambda-server standing in for the peer's."""
    from amqp_support import broker_up

    if not broker_up():
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest); .ci/run starts it")
    output = tmp_path / "amqp.json"
    done = subprocess.run([sys.executable, str(BENCH / "amqp_bench.py"), "--rounds", "1", "--seconds", "1",
                           "--warmup", "0.5", "--inflight", "4", "--connections", "2",
                           "--peer-daemon", str(Path(PYTHON).parent / "lambda-runtime-api-daemon"),
                           "--peer-server", str(Path(PYTHON).parent / "lambda-server"), "--peer-label", "self",
                           "--output", str(output)], capture_output=True, text=True, timeout=120, env=bench_env())
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    assert set(results["workloads"]) == {"inflight=4", "server"}
    (round_,) = results["rounds"]
    assert round_["ceiling"]["invocations"] > 0
    for workload, summary in results["workloads"].items():
        for side in ("ours", "self"):
            window = round_["workloads"][workload][side]
            assert window["count"] > 0 and window["errors"] == 0, window
            assert window["instances"] == 2, window
            assert window["daemon_cpu_us_per_request"] > 0, window
            if workload == "server":
                assert window["server_cpu_us_per_request"] > 0, window
        assert summary["x_peer"] == pytest.approx(
            round_["workloads"][workload]["ours"]["rate"] / round_["workloads"][workload]["self"]["rate"], rel=1e-6)
    for side in ("ours", "self"):
        assert 1 < results["memory"][side]["daemon_rss_mb"] < 500
        assert 1 < results["memory"][side]["server_rss_mb"] < 500
    assert "ours÷self" in done.stdout and "lambda-server c=2" in done.stdout
