"""End-to-end tests of the instance pool with the real daemon and awslambdaric:
on-demand spawn under bursts, longest-idle dispatch, the FIFO wait queue, timeouts that kill the
whole process group, crashes, init errors, init timeouts and spawn failures, none of which may
hang or wedge later invocations.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import FUNCTIONS_DIR, PYTHON, RIC, wait_until
from support import in_thread, lambda_client, metric, read_payload

E2E = RIC + ["e2e_handlers.handler"]


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def queue_depth(proc) -> float:
    return metric(proc.metrics(), "lambda_queue_depth")


# ---- scale and dispatch ------------------------------------------------------------------------

def test_burst_spawns_up_to_max_concurrency(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=3, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    client = lambda_client(proc.url)
    threads = [in_thread(client.invoke, FunctionName="function",
                         Payload=json.dumps({"action": "sleep", "seconds": 1.5})) for _ in range(7)]
    for thread, _ in threads:
        thread.join(60)
    results = [read_payload(box["result"]) for _, box in threads]
    pids = {r["pid"] for r in results}
    assert len(pids) == 3, f"expected exactly MAX_CONCURRENCY=3 instances, got pids {pids}"
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 3


def test_sequential_load_uses_one_instance(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=4)
    client = lambda_client(proc.url)
    pids = {read_payload(client.invoke(FunctionName="function", Payload=json.dumps({"action": "whoami"})))["pid"]
            for _ in range(10)}
    assert len(pids) == 1
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 1


def test_longest_idle_instance_is_used_first(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=3, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    client = lambda_client(proc.url)
    threads = [in_thread(client.invoke, FunctionName="function",
                         Payload=json.dumps({"action": "sleep", "seconds": 1})) for _ in range(3)]
    for thread, _ in threads:
        thread.join(60)
    wait_until(lambda: metric(proc.metrics(), 'lambda_instances{state="idle"}') == 3, 10, message="3 idle")
    order = [read_payload(client.invoke(FunctionName="function", Payload=json.dumps({"action": "whoami"})))["pid"]
             for _ in range(6)]
    assert len(set(order[:3])) == 3, order
    assert order[3:] == order[:3], f"dispatch is not longest-waiting first: {order}"


def test_queue_is_fifo(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1, AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    busy = tmp_path / "busy.txt"
    first = in_thread(proc.invoke, {"action": "marker", "path": str(busy), "seconds": 1})
    wait_until(busy.exists, 15, message="the first invocation to start")
    marker = tmp_path / "order.txt"
    threads = []
    for n in range(5):
        threads.append(in_thread(proc.invoke, {"action": "marker", "path": str(marker), "tag": str(n)}))
        wait_until(lambda n=n: queue_depth(proc) >= n + 1 or marker.exists(), 10, message=f"invocation {n} queued")
    for thread, box in [first, *threads]:
        thread.join(30)
        assert box["result"][0] == 200
    assert [line.split()[1] for line in marker.read_text().splitlines()] == ["0", "1", "2", "3", "4"]


# ---- timeouts ----------------------------------------------------------------------------------

def test_timeout_kills_the_whole_process_group_and_a_fresh_instance_follows(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=1, MAX_CONCURRENCY=1)
    pids_file = tmp_path / "pids.txt"
    status, headers, body = proc.invoke({"action": "spawn_and_hang", "path": str(pids_file)})
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "Sandbox.Timedout"
    runtime_pid, grandchild_pid = map(int, pids_file.read_text().split())
    wait_until(lambda: not alive(runtime_pid) and not alive(grandchild_pid), 10,
               message="the runtime and its grandchild to be killed")
    status, _, body = proc.invoke({"action": "whoami"})
    assert status == 200
    assert json.loads(body)["pid"] != runtime_pid
    assert metric(proc.metrics(), 'lambda_instance_kills_total{reason="timeout"}') == 1


def test_invocation_queued_behind_a_timeout_runs_on_a_fresh_instance(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=3, MAX_CONCURRENCY=1)
    first_pid = json.loads(proc.invoke({"action": "whoami"})[2])["pid"]
    busy = tmp_path / "busy.txt"
    first = in_thread(proc.invoke, {"action": "marker", "path": str(busy), "seconds": 60})
    wait_until(busy.exists, 15, message="the first invocation to start")
    time.sleep(1.0)  # the second arrives well into the first's 3 s, so its own wait stays under 3 s
    second = in_thread(proc.invoke, {"action": "whoami"})
    first[0].join(20)
    second[0].join(20)
    assert json.loads(first[1]["result"][2])["errorType"] == "Sandbox.Timedout"
    status, headers, body = second[1]["result"]
    assert status == 200 and "x-amz-function-error" not in headers, body
    assert json.loads(body)["pid"] != first_pid


def test_timeout_counts_execution_not_queueing(daemon_factory, tmp_path):
    # Two 1.2 s invocations on one instance with a 2 s timeout: the second waits ~1.2 s in the queue
    # and then runs 1.2 s; it succeeds because its timeout starts when the runtime gets it.
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=2, MAX_CONCURRENCY=1)
    proc.invoke({"action": "echo"})
    threads = [in_thread(proc.invoke, {"action": "sleep", "seconds": 1.2}) for _ in range(2)]
    for thread, _ in threads:
        thread.join(20)
    for _, box in threads:
        status, headers, body = box["result"]
        assert status == 200 and "x-amz-function-error" not in headers, body


# ---- crashes -----------------------------------------------------------------------------------

def test_crash_fails_at_once_and_queued_work_still_runs(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=30, MAX_CONCURRENCY=1)
    first_pid = json.loads(proc.invoke({"action": "whoami"})[2])["pid"]
    started = time.monotonic()
    crash = in_thread(proc.invoke, {"action": "crash", "code": 1})
    wait_until(lambda: queue_depth(proc) == 0 and metric(proc.metrics(), "lambda_in_flight") == 1
               or not crash[0].is_alive(), 10)
    queued = [in_thread(proc.invoke, {"action": "whoami"}) for _ in range(2)]
    crash[0].join(20)
    status, headers, body = crash[1]["result"]
    assert headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorMessage"].endswith("Runtime exited with error: exit status 1")
    for thread, box in queued:
        thread.join(20)
        status, headers, body = box["result"]
        assert status == 200 and "x-amz-function-error" not in headers, body
        assert json.loads(body)["pid"] != first_pid
    assert time.monotonic() - started < 15
    assert metric(proc.metrics(), 'lambda_invocations_total{outcome="crash"}') == 1


def test_instance_dying_while_idle_is_forgotten(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    pid = json.loads(proc.invoke({"action": "whoami"})[2])["pid"]
    os.kill(pid, 9)
    wait_until(lambda: metric(proc.metrics(), 'lambda_instances{state="idle"}') == 0, 10,
               message="the dead instance to be forgotten")
    started = time.monotonic()
    status, headers, body = proc.invoke({"action": "whoami"})
    assert status == 200 and "x-amz-function-error" not in headers, body
    assert json.loads(body)["pid"] != pid
    assert time.monotonic() - started < 10


# ---- init failures -----------------------------------------------------------------------------

def test_init_error_then_fresh_init_each_time_and_no_hang(daemon_factory):
    proc = daemon_factory(RIC + ["init_error.handler"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    client = lambda_client(proc.url)
    for attempt in range(1, 4):
        started = time.monotonic()
        r = client.invoke(FunctionName="function", Payload=b"{}")
        assert time.monotonic() - started < 10
        assert r["FunctionError"] == "Unhandled"
        assert read_payload(r)["errorMessage"] == "cannot initialise"
        assert metric(proc.metrics(), "lambda_instance_spawns_total") == attempt
    # Not invoked: no crash loop.
    time.sleep(1.0)
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 3


def test_init_error_with_several_waiting_invocations(daemon_factory):
    proc = daemon_factory(RIC + ["init_error.handler"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=30,
                          MAX_CONCURRENCY=1)
    client = lambda_client(proc.url)
    started = time.monotonic()
    threads = [in_thread(client.invoke, FunctionName="function", Payload=b"{}") for _ in range(4)]
    for thread, _ in threads:
        thread.join(30)
    assert time.monotonic() - started < 20
    for _, box in threads:
        r = box["result"]
        assert r["FunctionError"] == "Unhandled"
        assert read_payload(r)["errorMessage"] == "cannot initialise"


def test_init_timeout(daemon_factory):
    proc = daemon_factory(RIC + ["slow_init.handler"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_INIT_TIMEOUT=1,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=5, SLOW_INIT_SECONDS=60)
    for _ in range(2):
        started = time.monotonic()
        status, headers, body = proc.invoke({})
        elapsed = time.monotonic() - started
        assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
        error = json.loads(body)
        assert error["errorType"] == "Sandbox.Timedout"
        assert error["errorMessage"] == (f"RequestId: {headers['x-amzn-requestid']} Error: "
                                         "Init phase timed out after 1.00 seconds")
        assert 0.9 <= elapsed < 5
    wait_until(lambda: metric(proc.metrics(), 'lambda_instance_kills_total{reason="init_timeout"}') == 2, 5)
    wait_until(lambda: metric(proc.metrics(), 'lambda_instances{state="starting"}') == 0, 5)


def test_init_that_exits_without_reporting(daemon_factory, tmp_path):
    script = tmp_path / "bootstrap"
    script.write_text("#!/bin/sh\necho 'about to fail'\nexit 7\n")
    script.chmod(0o755)
    proc = daemon_factory([str(script)], cwd=tmp_path, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    started = time.monotonic()
    status, headers, body = proc.invoke({})
    assert time.monotonic() - started < 10
    assert headers["x-amz-function-error"] == "Unhandled"
    error = json.loads(body)
    assert error["errorType"] == "Runtime.ExitError"
    assert error["errorMessage"].endswith("Runtime exited with error: exit status 7")
    assert headers["x-amzn-requestid"] in error["errorMessage"]


# ---- spawn failures ----------------------------------------------------------------------------

@pytest.fixture
def runnable_script(tmp_path) -> Path:
    script = tmp_path / "run-runtime"
    script.write_text(f"#!/bin/sh\nexec {PYTHON} -m awslambdaric e2e_handlers.handler\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("breakage", ["chmod", "remove"])
def test_spawn_failure_is_reported_and_does_not_wedge(daemon_factory, runnable_script, breakage):
    proc = daemon_factory([str(runnable_script)], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=30,
                          MAX_CONCURRENCY=1)
    backup = runnable_script.with_suffix(".bak")
    if breakage == "chmod":
        runnable_script.chmod(0o644)
    else:
        shutil.move(runnable_script, backup)
    try:
        threads = [in_thread(proc.invoke, {"action": "echo"}) for _ in range(3)]
        for thread, _ in threads:
            thread.join(20)
        for _, box in threads:
            status, headers, body = box["result"]
            assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
            assert json.loads(body)["errorType"] == "Runtime.InvalidEntrypoint"
    finally:
        if breakage == "chmod":
            runnable_script.chmod(0o755)
        else:
            shutil.move(backup, runnable_script)
    assert runnable_script.stat().st_mode & stat.S_IXUSR
    status, headers, body = proc.invoke({"action": "echo", "again": True})
    assert status == 200 and json.loads(body)["again"] is True
    assert proc.proc.poll() is None


def test_invocations_waiting_for_a_starting_instance_count_against_the_queue(daemon_factory, tmp_path):
    # MAX_QUEUED_INVOCATIONS counts everything not yet handed to a runtime, including the
    # invocation waiting for the instance it caused to start.
    script = tmp_path / "slow-start"
    script.write_text(f"#!/bin/sh\nsleep 1.5\nexec {PYTHON} -m awslambdaric e2e_handlers.handler\n")
    script.chmod(0o755)
    proc = daemon_factory([str(script)], cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1, MAX_QUEUED_INVOCATIONS=2,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    threads = [in_thread(proc.invoke, {"action": "echo"}) for _ in range(5)]
    for thread, _ in threads:
        thread.join(30)
    statuses = sorted(box["result"][0] for _, box in threads)
    assert statuses == [200, 200, 429, 429, 429]


def test_many_concurrent_callers_each_get_their_own_answer(daemon_factory):
    """Keep-alive clients in parallel, more than the instances: nothing lost, nothing misrouted."""
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    clients = 16
    per_client = 15
    failures: list = []

    def caller(c: int) -> None:
        client = lambda_client(proc.url)
        for k in range(per_client):
            tag = f"{c}-{k}"
            r = client.invoke(FunctionName="function", Payload=json.dumps({"action": "echo", "tag": tag}))
            body = read_payload(r)
            rid = r["ResponseMetadata"]["RequestId"]
            if r["StatusCode"] != 200 or body != {"action": "echo", "tag": tag} or not rid:
                failures.append((tag, r["StatusCode"], body))

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    text = proc.metrics()
    assert metric(text, 'lambda_invocations_total{outcome="success"}') == clients * per_client
    assert metric(text, "lambda_instance_spawns_total") <= 2
