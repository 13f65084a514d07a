"""Tenant isolation (``TENANT_ISOLATION_MODE=PER_TENANT``, AWS's TenancyConfig) and the
``$LATEST.PUBLISHED`` qualifier, end to end: the real daemon and awslambdaric, boto3 (its
``TenantId`` parameter), AMQP-RPC with pika, and boto3 through the lambda-server and RabbitMQ.

The handler (tests/functions/tenant_handlers.py) returns its tenant, its pid and every tenant its
process has served, so "tenant B never runs on an instance that has run tenant A" is checked on
what the runtimes themselves saw. The pool's rules in their every order are in test_pool_inprocess.py.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import subprocess
import threading

import botocore.exceptions
import pytest

from amqp_support import (
    RpcClient,
    amqp_daemon,
    queues_deleted,
    require_broker,  # noqa: F401  (autouse: fail clearly when RabbitMQ is not running)
    start_server,
    unique_name,
)
from conftest import BIN, FUNCTIONS_DIR, RIC, daemon_env, free_port, wait_until
from extsupport import ExtLog, alive, make_extensions_dir
from lambda_rapid import config as cfg
from lambda_rapid.invoke.contract import TENANT_ID_NOT_ALLOWED, TENANT_ID_REQUIRED
from support import ARN_PREFIX, lambda_client, metric, read_payload

HANDLER = RIC + ["tenant_handlers.whose"]
PATTERN = "[a-zA-Z0-9\\._:\\/=+\\-@ ]+"


@pytest.fixture(autouse=True)
def _delete_queues():
    """The AMQP daemons' queues are durable: gone after each test (after its daemons stopped)."""
    with queues_deleted():
        yield


def isolated(daemon_factory, **env):
    return daemon_factory(HANDLER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="tenants",
                          TENANT_ISOLATION_MODE="PER_TENANT", **env)


def error_of(call) -> dict:
    """What boto3 raised for a refused call: status, code, message (and Type when AWS modelled it)."""
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call()
    response = info.value.response
    return {"status": response["ResponseMetadata"]["HTTPStatusCode"], "code": response["Error"]["Code"],
            "message": response["Error"]["Message"], "type": response.get("Type")}


def validation_message(value: str, *broken: str) -> str:
    count = "1 validation error detected: " if len(broken) == 1 else f"{len(broken)} validation errors detected: "
    return count + "; ".join(f"Value '{value}' at 'tenantId' failed to satisfy constraint: {b}" for b in broken)


# ---- what the runtime gets ------------------------------------------------------------------------

def test_the_handler_gets_its_tenant_from_every_kind_of_invoke(daemon_factory):
    proc = isolated(daemon_factory, AWS_LAMBDA_LOG_FORMAT="JSON")
    lam = lambda_client(proc.url)
    r = lam.invoke(FunctionName="tenants", TenantId="Blue Tenant/1", LogType="Tail", Payload=b"{}")
    first = read_payload(r)
    assert r["StatusCode"] == 200 and "FunctionError" not in r and r["ExecutedVersion"] == "$LATEST"
    assert first["tenant"] == "Blue Tenant/1" and first["arn"] == ARN_PREFIX + "tenants"
    log = base64.b64decode(r["LogResult"]).decode()
    assert "REPORT RequestId: " + r["ResponseMetadata"]["RequestId"] in log  # Tail and REPORT as usual
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (served,) = [rec for rec in records if rec.get("message") == "serving tenant Blue Tenant/1"]
    assert served["tenantId"] == "Blue Tenant/1"  # awslambdaric's JSON log lines carry the tenant too

    assert lam.invoke(FunctionName="tenants", TenantId="Blue Tenant/1", InvocationType="Event",
                      Payload=b"{}")["StatusCode"] == 202
    assert lam.invoke(FunctionName="tenants", TenantId="Blue Tenant/1", InvocationType="DryRun")["StatusCode"] == 204
    again = read_payload(lam.invoke(FunctionName="tenants", TenantId="Blue Tenant/1", Payload=b"{}"))
    # MAX_CONCURRENCY=1 and the tenant has an instance: the call waits for it (after the Event)
    assert again["pid"] == first["pid"] and again["served"] == ["Blue Tenant/1"] * 3

    stream = lam.invoke_with_response_stream(FunctionName="tenants", TenantId="green", Payload=b"{}")
    body = b"".join(e["PayloadChunk"]["Payload"] for e in stream["EventStream"] if "PayloadChunk" in e)
    green = json.loads(body)
    assert green["tenant"] == "green" and green["served"] == ["green"] and green["pid"] != first["pid"]

    status, headers, raw = proc.invoke({}, name="tenants", headers={"X-Amz-Tenant-Id": "green"})
    assert status == 200 and json.loads(raw)["served"] == ["green", "green"]


def test_tenant_ids_are_required_and_checked_as_aws_does(daemon_factory):
    proc = isolated(daemon_factory)
    lam = lambda_client(proc.url)
    missing = {"status": 400, "code": "InvalidParameterValueException", "message": TENANT_ID_REQUIRED, "type": "User"}
    assert error_of(lambda: lam.invoke(FunctionName="tenants", Payload=b"{}")) == missing
    assert error_of(lambda: lam.invoke(FunctionName="tenants", InvocationType="DryRun")) == missing
    assert error_of(lambda: lam.invoke(FunctionName="tenants", InvocationType="Event", Payload=b"{}")) == missing
    assert error_of(lambda: lam.invoke_with_response_stream(FunctionName="tenants", Payload=b"{}")) == missing

    bad = error_of(lambda: lam.invoke(FunctionName="tenants", TenantId="a*b", Payload=b"{}"))
    assert bad["status"] == 400 and bad["code"] == "ValidationException"
    assert bad["message"] == validation_message("a*b", f"Member must satisfy regular expression pattern: {PATTERN}")
    long = "t" * 257
    too_long = error_of(lambda: lam.invoke(FunctionName="tenants", TenantId=long, Payload=b"{}"))
    assert (too_long["code"], too_long["message"]) == (
        "ValidationException", validation_message(long, "Member must have length less than or equal to 256"))
    # the form is checked before the function is looked up
    assert error_of(lambda: lam.invoke(FunctionName="nobody", TenantId="a*b", Payload=b"{}"))["code"] == \
        "ValidationException"
    status, headers, body = proc.invoke({}, name="tenants", headers={"X-Amz-Tenant-Id": ""})
    assert status == 400 and headers["x-amzn-errortype"] == "ValidationException"
    assert "Member must have length greater than or equal to 1" in json.loads(body)["message"]
    assert json.loads(body)["Type"] == "User" and headers["x-amzn-requestid"]

    assert read_payload(lam.invoke(FunctionName="tenants", TenantId="t" * 256, Payload=b"{}"))["tenant"] == "t" * 256
    assert metric(proc.metrics(), 'lambda_invocations_total{outcome="rejected"}') == 8


def test_a_function_that_is_not_tenant_isolated_refuses_a_tenant_id(daemon_factory):
    proc = daemon_factory(HANDLER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="plain")
    lam = lambda_client(proc.url)
    assert error_of(lambda: lam.invoke(FunctionName="plain", TenantId="blue", Payload=b"{}")) == {
        "status": 400, "code": "InvalidParameterValueException", "message": TENANT_ID_NOT_ALLOWED, "type": "User"}
    assert error_of(lambda: lam.invoke(FunctionName="plain", TenantId="a*b", Payload=b"{}"))["code"] == \
        "ValidationException"
    assert read_payload(lam.invoke(FunctionName="plain", Payload=b"{}"))["tenant"] is None


# ---- an instance serves one tenant for its whole life ---------------------------------------------

def test_tenants_never_share_an_instance_and_max_concurrency_bounds_them_all(daemon_factory):
    proc = isolated(daemon_factory, MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_TIMEOUT=60)
    lam = lambda_client(proc.url, read_timeout=60)
    owner: dict = {}  # pid -> the one tenant it may ever serve
    lock = threading.Lock()

    def call(tenant: str, seconds: float = 0) -> int:
        body = read_payload(lam.invoke(FunctionName="tenants", TenantId=tenant,
                                       Payload=json.dumps({"seconds": seconds}).encode()))
        assert body["tenant"] == tenant and set(body["served"]) == {tenant}, body
        with lock:
            assert owner.setdefault(body["pid"], tenant) == tenant, (body, owner)
        return body["pid"]

    blue = call("blue")
    green = call("green")
    assert green != blue  # blue's instance was idle, but it is blue's
    assert call("blue") == blue and call("green") == green  # each tenant's warm instance
    # Both slots taken and both idle: red makes room by stopping the longest-idle one (blue's).
    red = call("red")
    assert red not in (blue, green)
    wait_until(lambda: not alive(blue), 10, message="blue's runtime stopped")
    assert alive(green) and call("green") == green
    text = proc.metrics()
    assert metric(text, 'lambda_instance_kills_total{reason="other_tenant"}') == 1

    # Six at once, three tenants, two slots: each waits for an instance of its own tenant.
    sampled = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            m = proc.metrics()
            sampled.append(sum(metric(m, f'lambda_instances{{state="{s}"}}') for s in ("starting", "idle", "busy")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        pids = list(pool.map(lambda t: call(t, 0.3), ["blue", "green", "red"] * 2))
    stop.set()
    sampler.join(10)
    assert len(pids) == 6 and sampled and max(sampled) <= 2
    assert len(set(owner.values())) == 3 and len(owner) >= 4  # blue came back on a fresh instance


def test_platform_start_and_report_carry_the_tenant(daemon_factory, tmp_path):
    log = ExtLog(tmp_path / "ext.log")
    directory = make_extensions_dir(tmp_path, "telemetry-sub")
    proc = isolated(daemon_factory, LAMBDA_EXTENSIONS_DIR=str(directory), EXT_LOG=str(log.path))
    status, headers, body = proc.invoke({}, name="tenants", headers={"X-Amz-Tenant-Id": "blue"})
    assert status == 200 and json.loads(body)["tenant"] == "blue"
    request_id = headers["x-amzn-requestid"]

    def report():
        return [e for e in log.telemetry("platform.report") if e["record"]["requestId"] == request_id]

    wait_until(report, 10, message="platform.report")
    (start,) = [e for e in log.telemetry("platform.start") if e["record"]["requestId"] == request_id]
    assert start["record"]["tenantId"] == "blue" and start["record"]["version"] == "$LATEST"
    assert report()[0]["record"]["tenantId"] == "blue"
    assert any("serving tenant blue" in e["record"] for e in log.telemetry("function"))


# ---- AMQP-RPC and the lambda-server ---------------------------------------------------------------

def test_amqp_requests_carry_the_tenant_in_the_same_header(daemon_factory):
    name = unique_name("tenant-amqp")
    amqp_daemon(daemon_factory, name, "tenant_handlers.whose", TENANT_ISOLATION_MODE="PER_TENANT", MAX_CONCURRENCY=2)
    with RpcClient() as rpc:
        props, body = rpc.call(name, b"{}", {"X-Amz-Tenant-Id": "blue"})
        blue = json.loads(body)
        assert blue["tenant"] == "blue" and "x-amzn-ErrorType" not in (props.headers or {})
        props, body = rpc.call(name, b"{}", {"X-Amz-Tenant-Id": "green"})
        assert json.loads(body)["tenant"] == "green" and json.loads(body)["pid"] != blue["pid"]
        props, body = rpc.call(name, b"{}")
        assert props.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
        assert json.loads(body) == {"Type": "User", "message": TENANT_ID_REQUIRED}
        props, body = rpc.call(name, b"{}", {"X-Amz-Tenant-Id": "no*way"})
        assert props.headers["x-amzn-ErrorType"] == "ValidationException"
        assert json.loads(body)["message"] == validation_message(
            "no*way", f"Member must satisfy regular expression pattern: {PATTERN}")
        props, body = rpc.call(name, b"{}", {"X-Amz-Tenant-Id": "blue", "X-Amz-Qualifier": "$LATEST.PUBLISHED"})
        published = json.loads(body)
        assert published["pid"] == blue["pid"] and published["arn"] == f"{ARN_PREFIX}{name}:$LATEST.PUBLISHED"


def test_boto3_through_the_lambda_server_with_tenants(daemon_factory):
    name, plain = unique_name("tenant-srv"), unique_name("plain-srv")
    amqp_daemon(daemon_factory, name, "tenant_handlers.whose", TENANT_ISOLATION_MODE="PER_TENANT")
    amqp_daemon(daemon_factory, plain, "tenant_handlers.whose")
    server = start_server()
    server.wait_ready()
    try:
        lam = lambda_client(server.url)
        r = lam.invoke(FunctionName=name, TenantId="blue", Payload=b"{}")
        assert read_payload(r)["tenant"] == "blue" and r["StatusCode"] == 200
        r = lam.invoke(FunctionName=f"{name}:$LATEST.PUBLISHED", TenantId="blue", Payload=b"{}")
        assert read_payload(r)["arn"] == f"{ARN_PREFIX}{name}:$LATEST.PUBLISHED"
        # the daemon knows its function's tenancy; the lambda-server relays its answer
        assert error_of(lambda: lam.invoke(FunctionName=name, Payload=b"{}")) == {
            "status": 400, "code": "InvalidParameterValueException", "message": TENANT_ID_REQUIRED, "type": "User"}
        assert error_of(lambda: lam.invoke(FunctionName=plain, TenantId="blue", Payload=b"{}"))["message"] == \
            TENANT_ID_NOT_ALLOWED
        assert read_payload(lam.invoke(FunctionName=plain, Payload=b"{}"))["tenant"] is None
        # the lambda-server itself refuses a malformed id, even for a function nobody serves
        bad = error_of(lambda: lam.invoke(FunctionName=unique_name("nobody"), TenantId="a*b", Payload=b"{}"))
        assert (bad["status"], bad["code"]) == (400, "ValidationException")
        assert metric(server.metrics(), 'lambda_server_requests_total{outcome="rejected"}') == 1
    finally:
        server.stop()


# ---- $LATEST.PUBLISHED ----------------------------------------------------------------------------

def test_latest_published_is_accepted_as_a_qualifier_and_in_arns(daemon_factory):
    proc = daemon_factory(HANDLER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="lmi")
    lam = lambda_client(proc.url)
    for kwargs in ({"FunctionName": "lmi", "Qualifier": "$LATEST.PUBLISHED"},
                   {"FunctionName": "lmi:$LATEST.PUBLISHED"},
                   {"FunctionName": f"{ARN_PREFIX}lmi:$LATEST.PUBLISHED"},
                   {"FunctionName": "012345678912:function:lmi:$LATEST.PUBLISHED", "Qualifier": "$LATEST.PUBLISHED"}):
        r = lam.invoke(Payload=b"{}", **kwargs)
        body = read_payload(r)
        assert body["arn"] == f"{ARN_PREFIX}lmi:$LATEST.PUBLISHED", kwargs  # the ARN the caller invoked
        assert r["ExecutedVersion"] == "$LATEST" and body["version"] == "$LATEST"  # one version runs here
    status, headers, raw = proc.request("POST", "/2015-03-31/functions/lmi%3A%24LATEST.PUBLISHED/invocations", b"{}")
    assert status == 200 and json.loads(raw)["arn"].endswith(":$LATEST.PUBLISHED")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="lmi", Qualifier="$LATEST.UNPUBLISHED", Payload=b"{}")


def test_a_daemon_that_is_the_latest_published_version(daemon_factory):
    # An LMI function's unqualified invoke runs $LATEST.PUBLISHED: a daemon configured as that version.
    proc = daemon_factory(HANDLER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="lmi",
                          AWS_LAMBDA_FUNCTION_VERSION="$LATEST.PUBLISHED")
    lam = lambda_client(proc.url)
    r = lam.invoke(FunctionName="lmi", Payload=b"{}")
    body = read_payload(r)
    assert r["ExecutedVersion"] == "$LATEST.PUBLISHED" and body["version"] == "$LATEST.PUBLISHED"
    assert body["arn"] == f"{ARN_PREFIX}lmi"
    assert lam.invoke(FunctionName="lmi", Qualifier="$LATEST", Payload=b"{}")["StatusCode"] == 200


# ---- configuration --------------------------------------------------------------------------------

def test_tenant_isolation_settings():
    command = ["/bin/sh", "h.h"]
    assert cfg.load(command, {"PATH": "/bin"}).tenant_isolated is False
    for value in ("PER_TENANT", "per_tenant", " PER_TENANT "):
        config = cfg.load(command, {"PATH": "/bin", "TENANT_ISOLATION_MODE": value})
        assert config.tenant_isolated and config.tenant_isolation_mode == "PER_TENANT"
    refused = {
        "PER_FUNCTION": {"TENANT_ISOLATION_MODE": "PER_FUNCTION"},
        "": {"TENANT_ISOLATION_MODE": ""},
        "FUNCTION_URL_PORT": {"TENANT_ISOLATION_MODE": "PER_TENANT", "FUNCTION_URL_PORT": "0"},
        "MIN_INSTANCES=1": {"TENANT_ISOLATION_MODE": "PER_TENANT", "MIN_INSTANCES": "1"},
        "snap-start": {"TENANT_ISOLATION_MODE": "PER_TENANT", "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start"},
    }
    for needle, env in refused.items():
        with pytest.raises(cfg.ConfigError) as info:
            cfg.load(command, {"PATH": "/bin", **env})
        assert needle in str(info.value) and "TENANT_ISOLATION_MODE" in str(info.value)


@pytest.mark.parametrize("env,needles", [
    ({"TENANT_ISOLATION_MODE": "SHARED"}, ("TENANT_ISOLATION_MODE='SHARED'", "PER_TENANT")),
    ({"TENANT_ISOLATION_MODE": "PER_TENANT", "FUNCTION_URL_PORT": "0"}, ("FUNCTION_URL_PORT", "function URLs")),
])
def test_startup_errors(env, needles):
    environment = daemon_env(PORT=free_port(), RUNTIME_API_PORT=free_port(), **env)
    done = subprocess.run([str(BIN / "lambda-runtime-api-daemon"), *HANDLER], env=environment, cwd=str(FUNCTIONS_DIR),
                          capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and "Traceback" not in lines[0], done.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
