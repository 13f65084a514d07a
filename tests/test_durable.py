"""Durable functions (issue 12 section 4): AWS's durable execution SDK runs under our daemon, with
AWS's emulator of the durable control plane (``dex-local-runner`` from
aws-durable-execution-sdk-python-testing) as its Lambda endpoint.

The emulator invokes the handler through our Invoke API (each invocation marked with its
``X-Dex-Handler-Invoke`` header, qualified as ``name:qualifier`` when the execution is); the
function checkpoints to the emulator at ``AWS_ENDPOINT_URL_LAMBDA``. ``functions/durable_handlers.py``
takes two steps, waits, waits for a callback the test completes from outside, and retries a step
that fails its first attempt; each of those ends one invocation and the emulator starts the next
through our daemon. Nothing here re-implements the control plane: the SDK and the emulator are
AWS's, from PyPI, pinned in the test extras.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import urllib.request
import uuid

import pytest

from conftest import BIN, FUNCTIONS_DIR, RIC, daemon_env, free_port, wait_until
from support import ARN_PREFIX, metric

pytest.importorskip("aws_durable_execution_sdk_python_testing", reason="needs the test extras (Python 3.11+)")

import boto3  # noqa: E402
import botocore.config  # noqa: E402

DEX = str(BIN / "dex-local-runner")
FUNCTION = "durable-order"
EVENT = {"order": "o-1", "items": [3, 4]}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class Emulator:
    """``dex-local-runner start-server`` on ``port``, invoking functions at ``lambda_endpoint``."""

    def __init__(self, port: int, lambda_endpoint: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="dex-", suffix=".log", delete=False)  # noqa: SIM115
        self.env = daemon_env(**CREDENTIALS, AWS_DEX_LOCAL_RUNNER_ENDPOINT=self.url)
        self.proc = subprocess.Popen(
            [DEX, "start-server", "--host", "127.0.0.1", "--port", str(self.port), "--lambda-endpoint",
             lambda_endpoint, "--store-type", "memory", "--invocation-timeout", "60"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(self._healthy, 30, 0.1, "the emulator's /health")
        self.client = boto3.client(
            "lambda", endpoint_url=self.url, region_name="us-west-2", aws_access_key_id="testing",
            aws_secret_access_key="testing", config=botocore.config.Config(retries={"total_max_attempts": 1}))

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dex-local-runner exited {self.proc.returncode}: {self.output}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def history(self, arn: str) -> list:
        return self.client.get_durable_execution_history(DurableExecutionArn=arn)["Events"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def durable(daemon_factory):
    """Our daemon serving the durable function (its AWS_ENDPOINT_URL_LAMBDA is the emulator), and
    the emulator invoking it through our Invoke API."""
    emulator_port = free_port()
    daemon = daemon_factory(RIC + ["durable_handlers.handler"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME=FUNCTION,
                            AWS_LAMBDA_FUNCTION_VERSION="7", AWS_LAMBDA_FUNCTION_TIMEOUT=60,
                            AWS_ENDPOINT_URL_LAMBDA=f"http://127.0.0.1:{emulator_port}", **CREDENTIALS)
    emulator = Emulator(emulator_port, daemon.url)
    yield daemon, emulator
    emulator.stop()


def run_to_completion(daemon, emulator: Emulator, arn: str) -> dict:
    """Complete the execution's callback from outside once it is waiting, then wait for the end."""
    def callback_id():
        started = [e for e in emulator.history(arn) if e["EventType"] == "CallbackStarted"]
        return started and started[0]["CallbackStartedDetails"]["CallbackId"]

    token = wait_until(callback_id, 60, 0.1, "the callback to start")
    emulator.client.send_durable_execution_callback_success(CallbackId=token, Result=b"alice")

    def finished():
        execution = emulator.client.get_durable_execution(DurableExecutionArn=arn)
        return execution if execution["Status"] != "RUNNING" else None

    execution = wait_until(finished, 60, 0.1, "the execution to end")
    assert execution["Status"] == "SUCCEEDED", (execution, emulator.output[-3000:], daemon.stderr[-3000:])
    return execution


def check_history(daemon, emulator: Emulator, arn: str, name: str) -> None:
    events = emulator.history(arn)
    steps = [(e["EventType"], e.get("Name")) for e in events if e["EventType"] != "InvocationCompleted"]
    assert steps == [
        ("ExecutionStarted", name),
        ("StepStarted", "price"), ("StepSucceeded", "price"),
        ("WaitStarted", "cool-down"), ("WaitSucceeded", "cool-down"),
        ("CallbackStarted", "approval"), ("CallbackSucceeded", "approval"),
        ("StepStarted", "charge"), ("StepFailed", "charge"),  # the first attempt, then the retry
        ("StepStarted", "charge"), ("StepSucceeded", "charge"),
        ("ExecutionSucceeded", name),
    ], steps
    failed = next(e for e in events if e["EventType"] == "StepFailed")
    assert "attempt 1 declined" in json.dumps(failed["StepFailedDetails"])
    # Each suspension (wait, callback, retry) ended an invocation; every one ran through our daemon.
    invocations = sum(1 for e in events if e["EventType"] == "InvocationCompleted")
    assert invocations >= 4
    assert metric(daemon.metrics(), 'lambda_invocations_total{outcome="success"}') == invocations


def test_durable_execution_started_with_dex_local_runner_invoke(durable):
    """The commands of the README: dex-local-runner invoke starts the execution; it runs to SUCCEEDED."""
    daemon, emulator = durable
    done = subprocess.run([DEX, "invoke", "--function-name", FUNCTION, "--input", json.dumps(EVENT)],
                          env=emulator.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    arn = json.loads(done.stdout)["ExecutionArn"]
    execution = run_to_completion(daemon, emulator, arn)
    assert json.loads(execution["Result"]) == {
        "order": "o-1", "total": 7, "approved_by": "alice", "payment": {"charged": 7, "attempt": 2},
        "invoked_arn": ARN_PREFIX + FUNCTION}
    assert execution["FunctionArn"].endswith(f":function:{FUNCTION}:$LATEST")
    check_history(daemon, emulator, arn, f"{FUNCTION}-execution")  # the name dex-local-runner invoke gives


def test_qualified_durable_execution(durable):
    """An execution of a version: the emulator invokes ``name:7`` and the function sees that ARN."""
    daemon, emulator = durable
    start = {"AccountId": "123456789012", "FunctionName": FUNCTION, "FunctionQualifier": "7",
             "ExecutionName": "qualified-order", "ExecutionTimeoutSeconds": 300,
             "ExecutionRetentionPeriodDays": 1, "InvocationId": str(uuid.uuid4()), "Input": json.dumps(EVENT)}
    request = urllib.request.Request(emulator.url + "/start-durable-execution", data=json.dumps(start).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as r:
        arn = json.loads(r.read())["ExecutionArn"]
    execution = run_to_completion(daemon, emulator, arn)
    assert json.loads(execution["Result"])["invoked_arn"] == ARN_PREFIX + FUNCTION + ":7"
    assert execution["FunctionArn"].endswith(f":function:{FUNCTION}:7")
    check_history(daemon, emulator, arn, "qualified-order")
