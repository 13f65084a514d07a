"""The ``platform.*`` events of the Telemetry API (and their Logs API shapes), built from what the
sandbox and the pool know. Record shapes follow AWS's Telemetry API schema reference:
https://docs.aws.amazon.com/lambda/latest/dg/telemetry-schema-reference.html

Pure construction and emission: when each event happens is the lifecycle's business
(lifecycle.py, restore.py, shutdown.py).

``initializationType`` is the function's ``AWS_LAMBDA_INITIALIZATION_TYPE`` (``on-demand``, or
``snap-start`` as AWS's RAPID reports a SnapStart init: telemetry.InferInitType). With
``AWS_LAMBDA_MAX_CONCURRENCY`` set (Lambda Managed Instances) AWS sends no ``platform.runtimeDone`` and
a ``platform.report`` whose metrics are only ``durationMs`` (the schema reference's "Lambda Managed
Instances" notes on both events).
"""

from __future__ import annotations

import json
from typing import Optional

from ..config import Config
from ..invocation import CRASH, FUNCTION_ERROR, SUCCESS, TIMEOUT, Invocation, Result
from ..reports import Report
from .telemetry import Telemetry

PLATFORM = "platform"
RUNTIME_DONE_STATUS = {SUCCESS: "success", FUNCTION_ERROR: "error", TIMEOUT: "timeout", CRASH: "failure"}


def init_start(telemetry: Telemetry, config: Config, instance_id: str) -> None:
    telemetry.emit(PLATFORM, "platform.initStart", {
        "initializationType": config.initialization_type, "phase": "init", "functionName": config.function_name,
        "functionVersion": config.function_version, "instanceId": instance_id,
        "instanceMaxMemory": config.memory_size})


def init_done(telemetry: Telemetry, config: Config, duration_ms: float) -> None:
    init_type = config.initialization_type
    telemetry.emit(PLATFORM, "platform.initRuntimeDone",
                   {"initializationType": init_type, "phase": "init", "status": "success"})
    telemetry.emit(PLATFORM, "platform.initReport", {
        "initializationType": init_type, "phase": "init", "status": "success",
        "metrics": {"durationMs": round(duration_ms, 3)}})


def init_failed(telemetry: Telemetry, config: Config, status: str, error_type: str) -> None:
    """``status``: ``failure`` or ``timeout``."""
    telemetry.emit(PLATFORM, "platform.initRuntimeDone", {
        "initializationType": config.initialization_type, "phase": "init", "status": status,
        "errorType": error_type})


def restore_start(telemetry: Telemetry, config: Config, instance_id: str) -> None:
    """SnapStart: the restore began (the schema reference's ``PlatformRestoreStart``)."""
    telemetry.emit(PLATFORM, "platform.restoreStart", {
        "functionName": config.function_name, "functionVersion": config.function_version,
        "instanceId": instance_id, "instanceMaxMemory": config.memory_size})


def restore_done(telemetry: Telemetry, status: str, duration_ms: float, error_type: Optional[str] = None) -> None:
    """SnapStart: the after-restore hooks ended (``status``: ``success``, or ``error`` for a hook that
    failed, ``failure`` for a runtime that died): ``platform.restoreRuntimeDone`` and
    ``platform.restoreReport``."""
    done = {"status": status}
    report = {"status": status, "metrics": {"durationMs": round(duration_ms, 3)}}
    if error_type:
        done["errorType"] = report["errorType"] = error_type
    telemetry.emit(PLATFORM, "platform.restoreRuntimeDone", done)
    telemetry.emit(PLATFORM, "platform.restoreReport", report)


def extension_registered(telemetry: Telemetry, name: str, events: tuple) -> None:
    record = {"name": name, "state": "Ready", "events": list(events)}
    telemetry.emit(PLATFORM, "platform.extension", record, legacy=("platform.extension", record))


def invocation_started(telemetry: Telemetry, inv: Invocation, version: str) -> None:
    tracing = {"type": "X-Amzn-Trace-Id", "value": inv.trace_id}
    record = {"requestId": inv.request_id, "version": version}
    if inv.tenant_id is not None:
        # A tenant-isolated function's platform.start and platform.report carry the tenant, in the
        # record ("Monitoring Lambda functions with tenant isolation", AWS Lambda Developer Guide).
        record["tenantId"] = inv.tenant_id
    record["tracing"] = tracing
    telemetry.emit(PLATFORM, "platform.start", record,
                   legacy=("platform.start", {"requestId": inv.request_id, "version": version}))


def invocation_ended(telemetry: Telemetry, inv: Invocation, result: Result, report: Report,
                     managed_instances: bool = False) -> None:
    """``platform.runtimeDone``, ``platform.report`` (the same figures as the REPORT line) and the Logs
    API's ``platform.end`` (Lambda Managed Instances: the report only, with ``durationMs`` only)."""
    status = RUNTIME_DONE_STATUS.get(result.outcome, "failure")
    tracing = {"type": "X-Amzn-Trace-Id", "value": inv.trace_id}
    error_type = _error_type(result) if result.function_error else None
    if managed_instances:
        record = {"requestId": inv.request_id, "status": status,
                  "metrics": {"durationMs": round(report.duration_ms, 3)}, "tracing": tracing}
        if error_type:
            record["errorType"] = error_type
        telemetry.emit(PLATFORM, "platform.report", record)
        return
    done = {"requestId": inv.request_id, "status": status, "tracing": tracing,
            "metrics": {"durationMs": round(report.duration_ms, 3), "producedBytes": len(result.body)}}
    if error_type:
        done["errorType"] = error_type
    telemetry.emit(PLATFORM, "platform.runtimeDone", done,
                   legacy=("platform.runtimeDone", {"requestId": inv.request_id, "status": status}))
    metrics = {"durationMs": round(report.duration_ms, 3), "billedDurationMs": report.billed_duration_ms,
               "memorySizeMB": report.memory_size_mb, "maxMemoryUsedMB": report.max_memory_used_mb or 0}
    if report.init_duration_ms is not None:
        metrics["initDurationMs"] = round(report.init_duration_ms, 3)
    if report.restore_duration_ms is not None:
        metrics["restoreDurationMs"] = round(report.restore_duration_ms, 3)
    record = {"requestId": inv.request_id, "status": status, "metrics": metrics, "tracing": tracing}
    if inv.tenant_id is not None:
        record["tenantId"] = inv.tenant_id
    if error_type:
        record["errorType"] = error_type
    telemetry.emit(PLATFORM, "platform.report", record,
                   legacy=("platform.report", {"requestId": inv.request_id, "metrics": metrics}))
    telemetry.emit(PLATFORM, "platform.end", None, legacy=("platform.end", {"requestId": inv.request_id}),
                   only_legacy=True)


def _error_type(result: Result) -> Optional[str]:
    try:
        error_type = json.loads(result.body).get("errorType")
    except (ValueError, AttributeError):
        return None
    return error_type if isinstance(error_type, str) and error_type else None
