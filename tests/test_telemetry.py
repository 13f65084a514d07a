"""Telemetry API and Logs API end to end: an extension subscribes with its own HTTP listener and
records what the daemon POSTs to it; a listener that never answers must not slow invocations."""

from __future__ import annotations

import statistics
import time

from conftest import FUNCTIONS_DIR, RIC, wait_until
from extsupport import ExtLog, make_extensions_dir


def start(daemon_factory, tmp_path, names, handler="handlers.shout", **env):
    log = ExtLog(tmp_path / "ext.log")
    directory = make_extensions_dir(tmp_path, *names) if names else tmp_path / "none"
    proc = daemon_factory(RIC + [handler], cwd=FUNCTIONS_DIR, LAMBDA_EXTENSIONS_DIR=str(directory),
                          EXT_LOG=str(log.path), **env)
    return proc, log


def test_subscriber_gets_platform_events_and_function_lines(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["telemetry-sub"])
    status, headers, body = proc.invoke({"lines": 3})
    assert status == 200, body
    request_id = headers["x-amzn-requestid"]

    def got_report():
        return [e for e in log.telemetry("platform.report") if e["record"]["requestId"] == request_id]

    wait_until(got_report, 10, message="platform.report")
    assert log.records("subscribed")[0]["status"] == 200
    assert log.records("subscribed")[0]["body"] == '"OK"'
    types = [e["type"] for e in log.telemetry()]
    for expected in ("platform.initStart", "platform.extension", "platform.telemetrySubscription",
                     "platform.initRuntimeDone", "platform.initReport", "platform.start", "platform.runtimeDone",
                     "platform.report", "function", "extension"):
        assert expected in types, (expected, types)
    assert types.index("platform.initStart") < types.index("platform.initRuntimeDone") < types.index("platform.start")
    (start_event,) = log.telemetry("platform.start")
    assert start_event["record"]["requestId"] == request_id and start_event["record"]["version"] == "$LATEST"
    assert start_event["record"]["tracing"]["type"] == "X-Amzn-Trace-Id"
    (done,) = log.telemetry("platform.runtimeDone")
    assert done["record"]["requestId"] == request_id and done["record"]["status"] == "success"
    (report,) = got_report()
    metrics = report["record"]["metrics"]
    assert metrics["memorySizeMB"] == 3008 and metrics["billedDurationMs"] >= 1 and "initDurationMs" in metrics
    lines = [e["record"] for e in log.telemetry("function")]
    assert [f"line {i} of {request_id}" for i in range(3)] == [x for x in lines if request_id in x]
    assert any("[telemetry-sub] registered" in e["record"] for e in log.telemetry("extension"))
    for event in log.telemetry():
        assert event["time"].endswith("Z") and "T" in event["time"]
    # Order within the invocation: start, the function's lines, runtimeDone, report.
    order = [e["type"] for e in log.telemetry() if e["type"] in ("platform.start", "function", "platform.runtimeDone",
                                                                   "platform.report")
             and (e["type"] != "function" or request_id in e["record"])]
    assert order == ["platform.start", "function", "function", "function", "platform.runtimeDone", "platform.report"]


def test_tcp_destination_gets_ndjson(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["tcp-sub"])
    status, headers, _ = proc.invoke({"lines": 2})
    assert status == 200
    request_id = headers["x-amzn-requestid"]
    wait_until(lambda: [e for e in log.telemetry("platform.report") if e["record"]["requestId"] == request_id], 10,
               message="platform.report over TCP")
    assert f"line 1 of {request_id}" in [e["record"] for e in log.telemetry("function")]


def test_function_error_is_reported_in_runtime_done(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["telemetry-sub"], handler="handlers.fail")
    status, headers, _ = proc.invoke({})
    assert status == 200 and headers.get("x-amz-function-error") == "Unhandled"
    wait_until(lambda: log.telemetry("platform.report"), 10, message="platform.report")
    (done,) = log.telemetry("platform.runtimeDone")
    assert done["record"]["status"] == "error" and done["record"]["errorType"] == "ValueError"


def test_logs_api_subscriber_gets_legacy_events(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["logs-sub"])
    status, headers, _ = proc.invoke({"lines": 2})
    assert status == 200
    request_id = headers["x-amzn-requestid"]
    wait_until(lambda: log.telemetry("platform.report"), 10, message="platform.report")
    types = {e["type"] for e in log.telemetry()}
    assert {"platform.start", "platform.end", "platform.report", "platform.runtimeDone", "function",
            "platform.logsSubscription", "platform.extension"} <= types
    assert "platform.initStart" not in types  # a Telemetry API event only
    (end,) = log.telemetry("platform.end")
    assert end["record"] == {"requestId": request_id}
    (start_event,) = log.telemetry("platform.start")
    assert start_event["record"] == {"requestId": request_id, "version": "$LATEST"}
    assert log.telemetry("platform.report")[0]["record"]["metrics"]["memorySizeMB"] == 3008


def test_stalled_subscriber_is_told_what_was_dropped(daemon_factory, tmp_path):
    proc, log = start(daemon_factory, tmp_path, ["stall-sub"], handler="handlers.flood", STALL_SECONDS="6")
    began = time.monotonic()
    status, _, body = proc.invoke({"mb": 2})  # 2048 lines of 1 KB: more than the subscriber's buffer
    assert status == 200, body
    assert time.monotonic() - began < 3.0  # the stalled listener does not hold the invocation
    wait_until(lambda: log.telemetry("platform.logsDropped"), 20, message="platform.logsDropped")
    dropped = log.telemetry("platform.logsDropped")[0]["record"]
    assert dropped["droppedRecords"] > 0 and dropped["droppedBytes"] > 0 and dropped["reason"]


def _latencies(proc, count):
    out = []
    for _ in range(count):
        began = time.perf_counter()
        status, _, _ = proc.invoke({"lines": 20})
        out.append(time.perf_counter() - began)
        assert status == 200
    return out


def test_subscriber_that_never_answers_does_not_slow_invocations(daemon_factory, tmp_path):
    procs = {}
    for kind in ("plain", "telemetry", "deaf"):
        (tmp_path / kind).mkdir()
        procs[kind], log = start(daemon_factory, tmp_path / kind, [] if kind == "plain" else [f"{kind}-sub"])
        if kind != "plain":
            _latencies(procs[kind], 3)
            wait_until(lambda log=log: log.records("subscribed"), 5, message=f"the {kind} subscription")
    medians = {}
    for kind, proc in procs.items():
        latencies = _latencies(proc, 40)
        medians[kind] = statistics.median(latencies)
        print(f"\n{kind:>9}: median {medians[kind] * 1000:.2f} ms, max {max(latencies) * 1000:.1f} ms over 40 invokes")
        assert max(latencies) < 1.0, (kind, max(latencies))
    # The listener that never answers costs nothing compared with one that answers at once.
    assert medians["deaf"] < medians["telemetry"] + 0.02, medians
    assert procs["deaf"].request("GET", "/_/health")[0] == 200
