"""Lifecycle and observability: idle scale-down, eager start, graceful shutdown, logs,
reports, health, metrics, OpenFaaS and the init-container copy. Real daemon, real awslambdaric."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, FUNCTIONS_DIR, RIC, daemon_env, free_port, start_daemon, wait_until


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def metric(text: str, name: str) -> float:
    m = re.search(r"^" + re.escape(name) + r" ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_idle_instance_stopped_and_next_invoke_works(daemon_factory):
    d = daemon_factory(RIC + ["handlers.whoami"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_IDLETIMEOUT="1")
    status, _, body = d.invoke({})
    assert status == 200
    first = json.loads(body)["pid"]
    assert alive(first)
    wait_until(lambda: not alive(first), timeout=6, message="idle instance to stop")
    assert 'lambda_instance_kills_total{reason="idle"} 1' in d.metrics()
    status, _, body = d.invoke({})
    assert status == 200
    assert json.loads(body)["pid"] != first


def test_steady_light_load_shrinks_the_pool(daemon_factory):
    """A burst grows the pool to 3; a steady one-at-a-time load afterwards needs only one."""
    d = daemon_factory(RIC + ["handlers.sleep"], cwd=FUNCTIONS_DIR, MAX_CONCURRENCY="3",
                       AWS_LAMBDA_FUNCTION_IDLETIMEOUT="1.5")
    threads = [threading.Thread(target=d.invoke, args=({"seconds": 0.5},)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pids = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, _, body = d.invoke({"seconds": 0.05})
        assert status == 200
        pids.add(json.loads(body)["pid"])
    spawns = metric(d.metrics(), "lambda_instance_spawns_total")
    assert spawns == 3
    text = d.metrics()
    assert 'lambda_instance_kills_total{reason="idle"} 2' in text, text
    # the last second of the steady load ran on one instance only
    recent = set()
    for _ in range(5):
        recent.add(json.loads(d.invoke({"seconds": 0.01})[2])["pid"])
    assert len(recent) == 1


def test_min_instances_warm_before_first_invoke(daemon_factory):
    d = daemon_factory(RIC + ["handlers.whoami"], cwd=FUNCTIONS_DIR, MIN_INSTANCES="2", MAX_CONCURRENCY="3",
                       AWS_LAMBDA_FUNCTION_IDLETIMEOUT="0.5")
    d.wait_ready()
    text = d.metrics()
    assert 'lambda_instances{state="idle"} 2' in text
    assert metric(text, "lambda_instance_spawns_total") == 2
    # kept warm: the idle timeout never takes the pool below MIN_INSTANCES
    time.sleep(1.5)
    text = d.metrics()
    assert 'lambda_instances{state="idle"} 2' in text
    status, _, body = d.invoke({})
    assert status == 200
    assert "Init Duration" not in d.stdout  # no cold start was paid by the invocation
    assert metric(d.metrics(), "lambda_instance_spawns_total") == 2


def test_ready_is_503_until_min_instances_are_up(daemon_factory):
    d = daemon_factory(RIC + ["slow_init.handler"], cwd=FUNCTIONS_DIR, MIN_INSTANCES="1", SLOW_INIT_SECONDS="1.5")
    assert d.request("GET", "/_/ready")[0] == 503
    assert d.request("GET", "/_/health")[0] == 200
    d.wait_ready(timeout=10)


def test_sigterm_during_invocation_completes_it_and_exits_zero(daemon_factory):
    d = daemon_factory(RIC + ["handlers.sleep"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="5")
    results = {}

    def call():
        results["first"] = d.invoke({"seconds": 1.5})

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: 'lambda_instances{state="busy"} 1' in d.metrics(), message="busy instance")
    pid_text = d.request("GET", "/metrics")[2]
    assert pid_text
    d.signal(signal.SIGTERM)
    wait_until(lambda: d.request("GET", "/_/ready")[0] == 503, timeout=3, message="ready to turn 503")
    status, headers, body = d.invoke({"seconds": 0})
    assert status == 503
    assert headers["x-amzn-errortype"] == "ServiceException"
    t.join(10)
    status, _, body = results["first"]
    assert status == 200
    runtime_pid = json.loads(body)["pid"]
    assert d.wait(10) == 0
    assert not alive(runtime_pid)


def test_sigterm_answers_queued_invocations(daemon_factory):
    d = daemon_factory(RIC + ["handlers.sleep"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="5")
    results = []
    threads = [threading.Thread(target=lambda: results.append(d.invoke({"seconds": 0.7}))) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: metric(d.metrics(), "lambda_queue_depth") == 2, message="two queued")
    d.signal(signal.SIGTERM)
    for t in threads:
        t.join(15)
    assert sorted(r[0] for r in results) == [200, 200, 200]
    assert d.wait(10) == 0


def test_second_signal_shortens_the_grace(daemon_factory):
    d = daemon_factory(RIC + ["handlers.sleep"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="30")
    t = threading.Thread(target=lambda: d.invoke({"seconds": 20}))
    t.start()
    wait_until(lambda: 'lambda_instances{state="busy"} 1' in d.metrics(), message="busy instance")
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    d.signal(signal.SIGINT)
    assert d.wait(10) == 0
    assert time.monotonic() - started < 6
    t.join(5)


def test_pid1_style_reaping_leaves_no_zombies(daemon_factory, tmp_path):
    """The handler forks a grandchild that outlives it; after shutdown nothing of the group is left."""
    d = daemon_factory(RIC + ["handlers.whoami"], cwd=FUNCTIONS_DIR)
    status, _, body = d.invoke({})
    info = json.loads(body)
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert not alive(info["pid"])
    assert not alive(info["pgid"])


def test_runtime_output_goes_to_stdout_in_order(daemon_factory):
    d = daemon_factory(RIC + ["handlers.shout"], cwd=FUNCTIONS_DIR)
    status, headers, body = d.invoke({"lines": 50})
    rid = headers["x-amzn-requestid"]
    assert status == 200
    wait_until(lambda: f"line 49 of {rid}" in d.stdout, message="output")
    lines = [ln for ln in d.stdout.splitlines() if ln.endswith(rid) and ln.startswith("line ")]
    assert lines == [f"line {i} of {rid}" for i in range(50)]


def test_flood_of_output_does_not_grow_daemon_memory(daemon_factory):
    d = daemon_factory(RIC + ["handlers.flood"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="60")
    d.invoke({"mb": 1})
    before = rss_kb(d.proc.pid)
    status, _, _ = d.invoke({"mb": 100}, timeout=90)
    assert status == 200
    after = rss_kb(d.proc.pid)
    assert after - before < 20 * 1024, (before, after)
    assert os.path.getsize(d._out.name) > 100 * 1024 * 1024


REPORT = re.compile(
    r"^REPORT RequestId: (?P<id>[0-9a-f-]{36})\tDuration: (?P<duration>[0-9.]+) ms\t"
    r"Billed Duration: (?P<billed>[0-9]+) ms\tMemory Size: (?P<size>[0-9]+) MB\t"
    r"Max Memory Used: (?P<used>[0-9]+) MB(\tInit Duration: (?P<init>[0-9.]+) ms)?$", re.M)


def test_reports_have_real_figures(daemon_factory):
    d = daemon_factory(RIC + ["handlers.allocate"], cwd=FUNCTIONS_DIR, PRINT_REPORTS="true",
                       AWS_LAMBDA_FUNCTION_MEMORY_SIZE="512", AWS_LAMBDA_FUNCTION_TIMEOUT="20")
    ids = []
    for mb in (1, 150):
        status, headers, _ = d.invoke({"mb": mb})
        assert status == 200
        ids.append(headers["x-amzn-requestid"])
    wait_until(lambda: len(REPORT.findall(d.stdout)) == 2, message="two REPORT lines")
    out = d.stdout
    assert f"START RequestId: {ids[0]} Version: $LATEST" in out
    assert f"END RequestId: {ids[0]}" in out
    reports = {m["id"]: m for m in REPORT.finditer(out)}
    first, second = reports[ids[0]], reports[ids[1]]
    assert first["init"] is not None and second["init"] is None
    assert float(first["init"]) > 1
    assert first["size"] == "512"
    assert int(first["billed"]) >= float(first["duration"])
    assert int(second["used"]) - int(first["used"]) >= 100, (first["used"], second["used"])


def test_json_logs_parse(daemon_factory):
    d = daemon_factory(USE_STRUCTURED_LOGGING="true", LOG_LEVEL="debug")
    assert d.invoke({})[0] == 200
    d.stop()
    lines = [ln for ln in d.stderr.splitlines() if ln.strip()]
    assert lines
    docs = [json.loads(ln) for ln in lines]
    assert {"time", "level", "msg"} <= set(docs[0])
    assert any(doc["level"] == "DEBUG" for doc in docs)


def test_log_level_filters(daemon_factory):
    d = daemon_factory(LOG_LEVEL="error")
    assert d.invoke({})[0] == 200
    d.stop()
    assert "INFO" not in d.stderr


def test_metrics_move_under_load(daemon_factory):
    d = daemon_factory()
    before = d.metrics()
    for _ in range(5):
        assert d.invoke({})[0] == 200
    d.invoke(raw=b"not json")
    after = d.metrics()
    assert metric(after, 'lambda_invocations_total{outcome="success"}') == \
        metric(before, 'lambda_invocations_total{outcome="success"}') + 5
    assert metric(after, "lambda_invocation_duration_seconds_count") >= 5
    assert metric(after, "lambda_instance_spawns_total") == 1
    assert metric(after, 'lambda_invocations_total{outcome="rejected"}') >= 1
    assert "# TYPE lambda_invocation_duration_seconds histogram" in after


def test_openfaas_route(daemon_factory):
    d = daemon_factory(ENABLE_OPENFAAS="true")
    status, _, body = d.request("POST", "/", json.dumps({"a": 1}).encode())
    assert status == 200 and json.loads(body) == {"a": 1}
    plain = daemon_factory()
    assert plain.request("POST", "/", b"{}")[0] == 404


def test_kubernetes_init_container_copies_and_exits(tmp_path):
    exe = tmp_path / "lambda-runtime-api-daemon-copytest"
    exe.write_bytes(b"#!/bin/sh\necho hello\n")
    exe.chmod(0o750)
    env = daemon_env(KUBERNETES_INIT_CONTAINER="", LAMBDA_RAPID_EXECUTABLE=str(exe))
    r = subprocess.run([str(BIN / "lambda-runtime-api-daemon")], env=env, capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    copied = Path("/tmp") / exe.name
    try:
        assert copied.read_bytes() == exe.read_bytes()
        assert copied.stat().st_mode & 0o777 == 0o750
    finally:
        copied.unlink()


@pytest.mark.parametrize("bad", ["PRINT_REPORTS=maybe", "USE_STRUCTURED_LOGGING=perhaps", "MIN_INSTANCES=-1",
                                 "AWS_LAMBDA_FUNCTION_IDLETIMEOUT=0"])
def test_lifecycle_settings_validated(bad):
    name, value = bad.split("=")
    env = daemon_env(PORT=free_port(), RUNTIME_API_PORT=free_port(), **{name: value})
    r = subprocess.run([str(BIN / "lambda-runtime-api-daemon"), *RIC, "echo.handler"], env=env,
                       capture_output=True, timeout=20, text=True)
    assert r.returncode != 0
    assert name in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_start_daemon_helper_cleans_up():
    d = start_daemon()
    d.stop()
    assert d.proc.returncode == 0


def _zombies_of(ppid: int) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == ppid:
            found.append(int(entry))
    return found


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(), reason="needs root and unshare")
def test_as_pid1_orphans_are_reaped(tmp_path):
    """Run the daemon as PID 1 of a new PID namespace (as a container entrypoint): the orphaned
    grandchildren of the runtime are re-parented to it and must not stay zombies."""
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", str(BIN / "lambda-runtime-api-daemon"),
                             *RIC, "handlers.orphan"], cwd=FUNCTIONS_DIR, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        import urllib.request
        url = f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"

        def invoke():
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=10) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(invoke, timeout=15, message="first invoke through the PID-1 daemon")
        for _ in range(3):
            assert invoke()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        daemon_pid = int(children[0])  # unshare's child: PID 1 inside the namespace
        time.sleep(1.5)  # the grandchildren exit after 0.3 s; the daemon reaps within 0.5 s
        assert _zombies_of(daemon_pid) == []
        os.kill(daemon_pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
