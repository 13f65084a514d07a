"""SnapStart (AWS_LAMBDA_INITIALIZATION_TYPE=snap-start) end to end with the real awslambdaric and
snapshot-restore-py: the init ends with the runtime's GET /runtime/restore/next, the daemon
"restores" at once (no snapshot is taken), the after-restore hooks run, then /next. A failing
after-restore hook (POST /runtime/restore/error) fails the first invocation with AWS's
SnapStartException; the next invocation gets a fresh instance. Telemetry gets AWS's restore events,
and the first REPORT shows Restore Duration and Billed Restore Duration instead of Init Duration.
References: https://docs.aws.amazon.com/lambda/latest/dg/snapstart-runtime-hooks-custom.html,
https://docs.aws.amazon.com/lambda/latest/dg/snapstart-monitoring.html,
https://docs.aws.amazon.com/lambda/latest/dg/telemetry-schema-reference.html
"""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import FUNCTIONS_DIR, PYTHON, RIC, wait_until
from extsupport import ExtLog, make_extensions_dir
from lambda_rapid.reports import Report
from support import lambda_client, metric
from test_runtime_api import HandRuntime

SNAP = RIC + ["snapstart_handlers.handler"]
HOOKS = ["before_snapshot", "after_restore", "handler"]
REPORT = re.compile(r"^REPORT RequestId: (\S+)\tDuration: ([\d.]+) ms\tBilled Duration: (\d+) ms\t"
                    r"Memory Size: \d+ MB\tMax Memory Used: \d+ MB(.*)$", re.M)
RESTORE_FAILED = ("The afterRestore() runtime hook encountered an error. For more information, check the Amazon "
                  "CloudWatch logs.")


def snap_daemon(daemon_factory, command=SNAP, **env):
    return daemon_factory(command, cwd=FUNCTIONS_DIR, AWS_LAMBDA_INITIALIZATION_TYPE="snap-start", **env)


def reports(proc) -> dict:
    return {m.group(1): m for m in REPORT.finditer(proc.stdout)}


def test_report_line_of_a_restored_instance_is_aws_s():
    """Field order and billing as on AWS's REPORT lines of SnapStart functions (e.g. "Duration: 2338.66 ms
    Billed Duration: 2521 ms ... Max Memory Used: 173 MB Restore Duration: 398.97 ms Billed Restore
    Duration: 182 ms", from AWS in a SnapStart sample's `sam logs` output): the first invocation is billed
    Duration + Billed Restore Duration, rounded up. No snapshot is restored here, so the billed part
    is the whole restore."""
    line = Report(2338.66, 3009, 173, None, 181.2).lines("r-1").decode()
    assert line.splitlines()[1] == ("REPORT RequestId: r-1\tDuration: 2338.66 ms\tBilled Duration: 2521 ms\t"
                                    "Memory Size: 3009 MB\tMax Memory Used: 173 MB\tRestore Duration: 181.20 ms\t"
                                    "Billed Restore Duration: 182 ms")
    assert "Init Duration" not in line
    plain = Report(2338.66, 3009, 173, 120.5).lines("r-2").decode()
    assert plain.endswith("Billed Duration: 2339 ms\tMemory Size: 3009 MB\tMax Memory Used: 173 MB\t"
                          "Init Duration: 120.50 ms\n")


def test_hooks_run_in_order_and_the_first_report_shows_the_restore(daemon_factory):
    proc = snap_daemon(daemon_factory, PRINT_REPORTS="true")
    client = lambda_client(proc.url)
    first = client.invoke(FunctionName="function", Payload=b"{}")
    result = json.loads(first["Payload"].read())
    assert result["events"] == HOOKS and result["init_type"] == "snap-start"
    second = client.invoke(FunctionName="function", Payload=b"{}")
    assert json.loads(second["Payload"].read())["events"] == HOOKS + ["handler"]
    ids = [r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"] for r in (first, second)]
    wait_until(lambda: all(i in reports(proc) for i in ids), 10, message="both REPORT lines")
    line = reports(proc)[ids[0]]
    restore = re.fullmatch(r"\tRestore Duration: ([\d.]+) ms\tBilled Restore Duration: (\d+) ms", line.group(4))
    assert restore, line.group(0)
    duration, billed = float(line.group(2)), int(line.group(3))
    restore_ms, billed_restore = float(restore.group(1)), int(restore.group(2))
    assert billed_restore == math.ceil(restore_ms)
    # As on AWS, the first invocation is billed with the restore: Duration + Billed Restore Duration.
    assert billed == math.ceil(duration + billed_restore)
    assert "Init Duration" not in proc.stdout
    assert reports(proc)[ids[1]].group(4) == ""  # later invocations: no cold start to show
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 1


def test_failing_after_restore_hook_fails_the_first_invocation_then_a_fresh_instance_serves(daemon_factory, tmp_path):
    proc = snap_daemon(daemon_factory, FAIL_AFTER_RESTORE_ONCE=str(tmp_path / "failed-once"))
    status, headers, body = proc.invoke({})
    assert status == 400
    assert headers["x-amzn-errortype"] == "SnapStartException"
    assert json.loads(body) == {"Type": "User", "Message": RESTORE_FAILED}
    # The runtime's own error is in the function's log (awslambdaric prints it before it posts it).
    wait_until(lambda: "the after-restore hook failed on purpose" in proc.stdout, 10, message="the hook's error")
    result = lambda_client(proc.url).invoke(FunctionName="function", Payload=b"{}")
    assert "FunctionError" not in result
    assert json.loads(result["Payload"].read())["events"] == HOOKS
    text = proc.metrics()
    assert metric(text, "lambda_instance_spawns_total") == 2
    assert metric(text, 'lambda_instance_kills_total{reason="restore_error"}') == 1
    assert metric(text, 'lambda_invocations_total{outcome="init_error"}') == 1


def test_boto3_raises_snapstart_exception(daemon_factory, tmp_path):
    proc = snap_daemon(daemon_factory, FAIL_AFTER_RESTORE_ONCE=str(tmp_path / "failed-once"))
    client = lambda_client(proc.url)
    with pytest.raises(client.exceptions.SnapStartException) as caught:
        client.invoke(FunctionName="function", Payload=b"{}")
    assert caught.value.response["Error"]["Message"] == RESTORE_FAILED
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def telemetry_daemon(daemon_factory, tmp_path, **env):
    """A SnapStart daemon with a Telemetry API subscriber that waits for the last telemetry after SHUTDOWN."""
    log = ExtLog(tmp_path / "ext.log")
    directory = make_extensions_dir(tmp_path, "linger-sub")
    proc = snap_daemon(daemon_factory, LAMBDA_EXTENSIONS_DIR=str(directory), EXT_LOG=str(log.path), **env)
    return proc, log


def test_telemetry_gets_the_restore_events(daemon_factory, tmp_path):
    proc, log = telemetry_daemon(daemon_factory, tmp_path, AWS_LAMBDA_FUNCTION_NAME="snap-fn")
    status, headers, body = proc.invoke({}, name="snap-fn")
    assert status == 200 and json.loads(body)["events"] == HOOKS
    request_id = headers["x-amzn-requestid"]
    wait_until(lambda: log.telemetry("platform.report"), 10, message="platform.report")
    types = [e["type"] for e in log.telemetry() if e["type"].startswith("platform.")]
    order = ["platform.initRuntimeDone", "platform.initReport", "platform.restoreStart",
             "platform.restoreRuntimeDone", "platform.restoreReport", "platform.start", "platform.report"]
    assert [t for t in types if t in order] == order, types
    for kind in ("platform.initStart", "platform.initRuntimeDone", "platform.initReport"):
        assert log.telemetry(kind)[0]["record"]["initializationType"] == "snap-start"
    (start,) = log.telemetry("platform.restoreStart")
    assert start["record"]["functionName"] == "snap-fn" and start["record"]["functionVersion"] == "$LATEST"
    assert start["record"]["instanceId"] == log.telemetry("platform.initStart")[0]["record"]["instanceId"]
    assert start["record"]["instanceMaxMemory"] == 3008
    (done,) = log.telemetry("platform.restoreRuntimeDone")
    assert done["record"] == {"status": "success"}
    (report,) = log.telemetry("platform.restoreReport")
    assert report["record"]["status"] == "success" and report["record"]["metrics"]["durationMs"] >= 0
    (invoke_report,) = log.telemetry("platform.report")
    metrics = invoke_report["record"]["metrics"]
    assert invoke_report["record"]["requestId"] == request_id
    assert "restoreDurationMs" in metrics and "initDurationMs" not in metrics
    assert metrics["billedDurationMs"] == math.ceil(metrics["durationMs"] + math.ceil(metrics["restoreDurationMs"]))


def test_telemetry_reports_a_failed_restore(daemon_factory, tmp_path):
    proc, log = telemetry_daemon(daemon_factory, tmp_path, FAIL_AFTER_RESTORE_ONCE=str(tmp_path / "failed-once"))
    assert proc.invoke({})[0] == 400
    wait_until(lambda: log.telemetry("platform.restoreReport"), 10, message="platform.restoreReport")
    (done,) = log.telemetry("platform.restoreRuntimeDone")
    assert done["record"] == {"status": "error", "errorType": "Runtime.AfterRestoreError"}
    (report,) = log.telemetry("platform.restoreReport")
    assert report["record"]["status"] == "error" and report["record"]["errorType"] == "Runtime.AfterRestoreError"
    assert not log.telemetry("platform.start")
    # Past its init, the extension was shut down as after a runtime failure.
    wait_until(lambda: log.events("SHUTDOWN"), 10, message="SHUTDOWN to the extension")
    assert log.events("SHUTDOWN")[0]["shutdownReason"] == "failure"


def test_restore_calls_out_of_turn_get_aws_answers(daemon_factory, tmp_path):
    probe_log = tmp_path / "probe.log"
    proc = snap_daemon(daemon_factory, [PYTHON, str(FUNCTIONS_DIR / "restore_probe_runtime.py")],
                       PROBE_LOG=str(probe_log))
    status, _, body = proc.invoke({"served": True})
    assert status == 200 and json.loads(body) == {"served": True}
    answers = {r["call"]: r for r in map(json.loads, probe_log.read_text().splitlines())}
    early = answers["restore_error_too_early"]
    assert early["status"] == 403 and json.loads(early["body"]) == {
        "errorType": "InvalidStateTransition",
        "errorMessage": "State transition from Started to RuntimeRestoreErrorState failed for runtime. "
                        "Error: State transition is not allowed"}
    assert answers["restore_next_by_post"]["status"] == 405
    assert answers["restore_next"] == {"call": "restore_next", "status": 200, "body": ""}
    again = answers["restore_next_again"]
    assert again["status"] == 403 and json.loads(again["body"])["errorMessage"].startswith(
        "State transition from Restoring to Ready failed")


def test_restore_next_from_a_runtime_started_by_hand_is_answered_at_once(daemon_factory):
    proc = snap_daemon(daemon_factory, ["sleep", "300"], AWS_LAMBDA_INIT_TIMEOUT=120)
    runtime = HandRuntime(proc.runtime_port)
    assert runtime.call("GET", "/restore/next", timeout=5)[:3:2] == (200, b"")


def test_without_snap_start_restore_endpoints_are_not_served(daemon_factory):
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_INIT_TIMEOUT=120)
    runtime = HandRuntime(proc.runtime_port)
    assert runtime.call("GET", "/restore/next", timeout=5)[0] == 404
    assert runtime.call("POST", "/restore/error", b"{}", timeout=5)[0] == 404
