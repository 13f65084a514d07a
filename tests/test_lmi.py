"""Lambda Managed Instances mode (AWS_LAMBDA_MAX_CONCURRENCY set) end to end with the real awslambdaric:
AWS's LMI rules for extensions and the Telemetry API, with AWS's errors for the rest.

* Extensions cannot subscribe to INVOKE ("extensions cannot subscribe to the INVOKE event on Managed
  Instances due to the concurrent execution model"): 403 Extension.InvalidEventType; internal
  extensions may register for no event at all.
* The Telemetry API takes schemaVersion 2025-01-29 only ("Lambda Managed Instances require
  2025-01-29"), others get 400 ValidationError; there is no Logs API (404).
* No platform.runtimeDone; platform.report carries durationMs as its only metric.
References: https://docs.aws.amazon.com/lambda/latest/dg/telemetry-schema-reference.html,
https://docs.aws.amazon.com/lambda/latest/dg/telemetry-api-reference.html; AWS's RAPID for Managed
Instances (aws-lambda-runtime-interface-emulator, internal/lambda-managed-instances).
"""

from __future__ import annotations

import json

from conftest import FUNCTIONS_DIR, RIC, wait_until
from extsupport import ExtLog, make_extensions_dir


def lmi_daemon(daemon_factory, tmp_path, handler="handlers.shout", concurrency=2, **env):
    log = ExtLog(tmp_path / "ext.log")
    directory = make_extensions_dir(tmp_path, "lmi-sub")
    proc = daemon_factory(RIC + [handler], cwd=FUNCTIONS_DIR, LAMBDA_EXTENSIONS_DIR=str(directory),
                          EXT_LOG=str(log.path), AWS_LAMBDA_MAX_CONCURRENCY=concurrency, **env)
    return proc, log


def answer_of(log: ExtLog, what: str) -> dict:
    (rec,) = log.records(what)
    return rec["answer"]


def test_extension_rules_and_telemetry_schema(daemon_factory, tmp_path):
    proc, log = lmi_daemon(daemon_factory, tmp_path)
    status, headers, body = proc.invoke({"lines": 2})
    assert status == 200, body
    request_id = headers["x-amzn-requestid"]
    invoke = answer_of(log, "lmi_invoke")
    assert invoke["status"] == 403 and invoke["body"]["errorType"] == "Extension.InvalidEventType"
    assert invoke["body"]["errorMessage"].startswith("INVOKE: ErrorInvalidEventType")
    (registered,) = log.records("registered")
    assert registered["status"] == 200
    old = answer_of(log, "lmi_old_schema")
    assert old["status"] == 400 and old["body"]["errorType"] == "ValidationError"
    assert "2025-01-29" in old["body"]["errorMessage"]
    assert answer_of(log, "lmi_logs_api")["status"] == 404
    (subscribed,) = log.records("subscribed")
    assert subscribed["status"] == 200 and subscribed["body"] == '"OK"'
    wait_until(lambda: [e for e in log.telemetry("platform.report") if e["record"]["requestId"] == request_id], 10,
               message="platform.report")
    (report,) = log.telemetry("platform.report")
    assert report["record"]["metrics"].keys() == {"durationMs"}
    assert report["record"]["status"] == "success" and report["record"]["tracing"]["type"] == "X-Amzn-Trace-Id"
    types = {e["type"] for e in log.telemetry()}
    assert {"platform.initStart", "platform.initReport", "platform.start", "function"} <= types
    assert "platform.runtimeDone" not in types
    assert not log.events("INVOKE")  # nobody could subscribe to it


def test_internal_extensions_register_for_no_event(daemon_factory, tmp_path):
    proc, _ = lmi_daemon(daemon_factory, tmp_path, handler="lmi_internal.handler", concurrency=1)
    status, _, body = proc.invoke({})
    assert status == 200, body
    answers = json.loads(body)
    for kind in ("invoke", "shutdown"):
        assert answers[kind] == {"status": 403, "body": {"errorType": "Extension.InvalidEventType",
                                                          "errorMessage": "No events allowed for internal extensions"}}
    assert answers["none"]["status"] == 200


def test_without_max_concurrency_the_default_rules_apply(daemon_factory, tmp_path):
    proc = daemon_factory(RIC + ["lmi_internal.handler"], cwd=FUNCTIONS_DIR)
    answers = json.loads(proc.invoke({})[2])
    assert answers["invoke"]["status"] == 200
    assert answers["shutdown"]["body"]["errorType"] == "Extension.InvalidEventType"  # internal: never SHUTDOWN
