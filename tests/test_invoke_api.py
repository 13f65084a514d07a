"""End-to-end tests of the Invoke API: the real daemon, the real awslambdaric, and boto3, the AWS CLI
(v1), curl and raw HTTP as clients: names and qualifiers, invocation and log types, size limits,
client context, request ids, AWS's error shapes, Event and DryRun, Tail, probes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import botocore.exceptions
import pytest

from conftest import BIN, FUNCTIONS_DIR, RIC, start_daemon, wait_until
from support import ARN_PREFIX, UUID_RE, lambda_client, metric, read_payload

NAME = "e2e-fn"
E2E = RIC + ["e2e_handlers.handler"]


@pytest.fixture(scope="module")
def daemon():
    """One daemon serving the dispatching handler, shared by the tests that don't break instances."""
    proc = start_daemon(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME=NAME, MAX_CONCURRENCY=2)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(daemon):
    return lambda_client(daemon.url)


def invoke_in_thread(target, *args, **kwargs):
    """Run ``target`` in a thread; returns (thread, box) where box['result'] / box['error'] is set."""
    box: dict = {}

    def run():
        try:
            box["result"] = target(*args, **kwargs)
        except Exception as e:  # handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# ---- success and function-level errors --------------------------------------------------------

def test_success_boto3(client):
    r = client.invoke(FunctionName=NAME, Payload=json.dumps({"action": "echo", "key": "välue"}))
    assert r["StatusCode"] == 200
    assert "FunctionError" not in r
    assert r["ExecutedVersion"] == "$LATEST"
    headers = r["ResponseMetadata"]["HTTPHeaders"]
    assert headers["content-type"] == "application/json"
    assert UUID_RE.match(headers["x-amzn-requestid"])
    assert read_payload(r) == {"action": "echo", "key": "välue"}


def test_success_body_is_the_runtimes_bytes(daemon):
    # awslambdaric serialises a str result with json.dumps: the exact bytes it posted come back.
    status, headers, body = daemon.invoke({"action": "echo", "s": "a\u00e9\u4e2d"}, name=NAME)
    assert status == 200
    assert body == json.dumps({"action": "echo", "s": "a\u00e9\u4e2d"}).encode()


def test_empty_body_reaches_the_function_as_empty_object(daemon):
    status, _, body = daemon.request("POST", f"/2015-03-31/functions/{NAME}/invocations", b"")
    assert status == 200
    assert json.loads(body) == {}


def test_function_error(client):
    r = client.invoke(FunctionName=NAME, Payload=json.dumps({"action": "fail"}))
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    error = read_payload(r)
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "boom"
    assert isinstance(error["stackTrace"], list)


def test_init_error_is_returned_with_function_error(daemon_factory):
    proc = daemon_factory(RIC + ["init_error.handler"], cwd=FUNCTIONS_DIR)
    r = lambda_client(proc.url).invoke(FunctionName="function", Payload=b"{}")
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    error = read_payload(r)
    assert error["errorType"] == "RuntimeError"
    assert error["errorMessage"] == "cannot initialise"


def test_timeout_body_exactly(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="1")
    proc.invoke({"action": "echo"})  # warm: the timeout must measure execution only
    started = time.monotonic()
    status, headers, body = proc.invoke({"action": "sleep", "seconds": 30})
    elapsed = time.monotonic() - started
    assert status == 200
    assert headers["x-amz-function-error"] == "Unhandled"
    rid = headers["x-amzn-requestid"]
    assert body == (b'{"errorType":"Sandbox.Timedout","errorMessage":"RequestId: %s Error: Task timed out after '
                    b'1.00 seconds"}' % rid.encode())
    assert 0.9 <= elapsed < 6


def test_fractional_timeout_is_reported_with_two_decimals(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="0.5")
    r = lambda_client(proc.url).invoke(FunctionName="function", Payload=json.dumps({"action": "sleep", "seconds": 30}))
    error = read_payload(r)
    assert r["FunctionError"] == "Unhandled"
    assert error["errorType"] == "Sandbox.Timedout"
    assert error["errorMessage"].endswith("Error: Task timed out after 0.50 seconds")


@pytest.mark.parametrize("action,status_text", [("crash", "exit status 3"), ("kill_self", "signal: killed")])
def test_runtime_died_mid_invocation_is_reported_at_once(daemon_factory, action, status_text):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="30")
    proc.invoke({"action": "echo"})
    started = time.monotonic()
    status, headers, body = proc.invoke({"action": action})
    elapsed = time.monotonic() - started
    assert status == 200
    assert headers["x-amz-function-error"] == "Unhandled"
    rid = headers["x-amzn-requestid"]
    assert json.loads(body) == {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {rid} Error: Runtime exited with error: {status_text}"}
    assert elapsed < 10, "a crash must be reported at once, not after the 30 s timeout"


def test_response_over_6mb(daemon):
    status, headers, body = daemon.invoke({"action": "big", "size": 7 * 1024 * 1024}, name=NAME)
    assert status == 200
    assert headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body) == {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes)."}
    # The instance is still usable afterwards.
    status, _, body = daemon.invoke({"action": "echo", "after": "big"}, name=NAME)
    assert status == 200 and json.loads(body)["after"] == "big"


def test_response_just_under_the_limit_passes(daemon):
    size = 6_291_556 - 2  # json.dumps adds the two quotes
    status, headers, body = daemon.invoke({"action": "big", "size": size}, name=NAME)
    assert status == 200
    assert "x-amz-function-error" not in headers
    assert len(body) == 6_291_556


# ---- Event, DryRun, Tail ----------------------------------------------------------------------

def test_event_is_accepted_and_runs_later(client, tmp_path):
    marker = tmp_path / "event.txt"
    r = client.invoke(FunctionName=NAME, InvocationType="Event",
                      Payload=json.dumps({"action": "marker", "path": str(marker), "tag": "evt"}))
    assert r["StatusCode"] == 202
    assert r["Payload"].read() == b""
    rid = r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    wait_until(marker.exists, 15, message="the Event invocation to run")
    assert wait_until(lambda: marker.read_text().strip(), 5) == f"{rid} evt"


def test_events_wait_for_a_busy_instance_longer_than_the_timeout(daemon_factory, tmp_path):
    # Queued Events are never dropped: they wait past the function timeout for an instance.
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT="3", MAX_CONCURRENCY=1)
    client = lambda_client(proc.url)
    busy = tmp_path / "busy.txt"
    thread, box = invoke_in_thread(proc.invoke, {"action": "marker", "path": str(busy), "seconds": 2})
    wait_until(busy.exists, 15, message="the first invocation to start")
    marker = tmp_path / "events.txt"
    for n in range(3):
        r = client.invoke(FunctionName="function", InvocationType="Event",
                          Payload=json.dumps({"action": "marker", "path": str(marker), "tag": str(n),
                                              "seconds": 0.8}))
        assert r["StatusCode"] == 202
    thread.join(20)
    assert box["result"][0] == 200
    wait_until(lambda: marker.exists() and len(marker.read_text().splitlines()) == 3, 20,
               message="all three Events to run")
    assert [line.split()[1] for line in marker.read_text().splitlines()] == ["0", "1", "2"]


def test_dry_run_answers_204_and_does_not_run_the_function(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1)
    client = lambda_client(proc.url)
    marker = tmp_path / "dry.txt"
    r = client.invoke(FunctionName="function", InvocationType="DryRun",
                      Payload=json.dumps({"action": "marker", "path": str(marker)}))
    assert r["StatusCode"] == 204
    assert r["Payload"].read() == b""
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 0
    # Anything the DryRun had queued would run before this (FIFO, one instance).
    proc.invoke({"action": "echo"})
    assert not marker.exists()


def test_dry_run_still_validates(client):
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="other", InvocationType="DryRun", Payload=b"{}")


def test_tail_log_result(client):
    r = client.invoke(FunctionName=NAME, LogType="Tail", Payload=json.dumps({"action": "shout", "lines": 3}))
    assert r["StatusCode"] == 200
    rid = r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    log = base64.b64decode(r["LogResult"]).decode()
    lines = log.splitlines()
    assert lines[0] == f"START RequestId: {rid} Version: $LATEST"
    for i in range(3):
        assert f"line {i} of {rid}" in log
    assert f"END RequestId: {rid}" in lines
    report = [line for line in lines if line.startswith("REPORT ")]
    assert len(report) == 1
    assert report[0].startswith(f"REPORT RequestId: {rid}\tDuration: ")
    assert "\tBilled Duration: " in report[0] and "\tMemory Size: 3008 MB" in report[0]
    assert log.index("line 2 of") < log.index("END RequestId")


def test_tail_keeps_only_the_last_4kb(client):
    r = client.invoke(FunctionName=NAME, LogType="Tail", Payload=json.dumps({"action": "shout", "lines": 500}))
    log = base64.b64decode(r["LogResult"])
    assert len(log) <= 4096
    assert b"line 499 of" in log and b"REPORT RequestId" in log
    assert b"line 0 of" not in log


def test_no_log_result_without_tail(client):
    r = client.invoke(FunctionName=NAME, Payload=json.dumps({"action": "shout"}))
    assert "LogResult" not in r


def test_tail_on_function_error(client):
    r = client.invoke(FunctionName=NAME, LogType="Tail", Payload=json.dumps({"action": "fail"}))
    assert r["FunctionError"] == "Unhandled"
    log = base64.b64decode(r["LogResult"]).decode()
    assert "boom" in log and "REPORT RequestId" in log


# ---- client context and trace id reach the function -------------------------------------------

def test_client_context_reaches_the_function(client):
    context = {"custom": {"k": "v"}, "env": {"platform": "test"}}
    r = client.invoke(FunctionName=NAME, Payload=json.dumps({"action": "whoami"}),
                      ClientContext=base64.b64encode(json.dumps(context).encode()).decode())
    me = read_payload(r)
    assert me["client_context"] == {"k": "v"}
    assert me["client_context_env"] == {"platform": "test"}


# ---- API-level errors -------------------------------------------------------------------------

def assert_api_error(status, headers, body, code, http_status, member="message"):
    assert status == http_status
    assert headers["x-amzn-errortype"] == code
    assert UUID_RE.match(headers["x-amzn-requestid"])
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["Type"] == "User"
    return doc[member]


@pytest.mark.parametrize("payload", [b"hello", b"{", b"{'a': 1}", b"\xff\xfe"])
def test_payload_not_json(daemon, payload):
    status, headers, body = daemon.invoke(name=NAME, raw=payload)
    message = assert_api_error(status, headers, body, "InvalidRequestContentException", 400)
    assert message.startswith("Could not parse request body into json: ")


def test_payload_not_json_boto3(client):
    with pytest.raises(client.exceptions.InvalidRequestContentException) as e:
        client.invoke(FunctionName=NAME, Payload=b"hello")
    assert e.value.response["Error"]["Message"].startswith("Could not parse request body into json")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


@pytest.mark.parametrize("context", ["not base64!", base64.b64encode(b"not json").decode(),
                                     base64.b64encode(b"[1, 2]").decode(), base64.b64encode(b'"s"').decode()])
def test_bad_client_context(client, context):
    with pytest.raises(client.exceptions.InvalidRequestContentException) as e:
        client.invoke(FunctionName=NAME, Payload=b"{}", ClientContext=context)
    assert e.value.response["Error"]["Message"] == "Client context must be a valid Base64-encoded JSON object."
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_unknown_function(client, daemon):
    with pytest.raises(client.exceptions.ResourceNotFoundException) as e:
        client.invoke(FunctionName="nope", Payload=b"{}")
    assert e.value.response["Error"]["Message"] == f"Function not found: {ARN_PREFIX}nope"
    status, headers, body = daemon.invoke(name="nope")
    message = assert_api_error(status, headers, body, "ResourceNotFoundException", 404, member="Message")
    assert message == f"Function not found: {ARN_PREFIX}nope"


@pytest.mark.parametrize("kwargs", [{"FunctionName": NAME, "Qualifier": "7"},
                                    {"FunctionName": f"{NAME}:prod"},
                                    {"FunctionName": f"arn:aws:lambda:us-east-1:123456789012:function:{NAME}:2"},
                                    {"FunctionName": "arn:aws:lambda:us-east-1:123456789012:function:other"}])
def test_unknown_qualifier_or_function(client, kwargs):
    with pytest.raises(client.exceptions.ResourceNotFoundException) as e:
        client.invoke(Payload=b"{}", **kwargs)
    assert e.value.response["Error"]["Message"].startswith(f"Function not found: {ARN_PREFIX}")


@pytest.mark.parametrize("name", [
    "function",
    NAME,
    f"{NAME}:$LATEST",
    f"123456789012:function:{NAME}",
    f"123456789012:function:{NAME}:$LATEST",
    f"arn:aws:lambda:eu-west-1:123456789012:function:{NAME}",
    f"arn:aws:lambda:us-east-1:012345678912:function:{NAME}:$LATEST",
    urllib.parse.quote(f"arn:aws:lambda:eu-west-1:123456789012:function:{NAME}", safe=""),
    urllib.parse.quote(f"{NAME}:$LATEST", safe=""),
])
def test_name_forms_accepted_raw_http(daemon, name):
    status, headers, body = daemon.invoke({"action": "echo", "n": name}, name=name)
    assert status == 200, body
    assert json.loads(body)["n"] == name


@pytest.mark.parametrize("name", ["function", NAME, f"{NAME}:$LATEST", f"123456789012:function:{NAME}",
                                  f"arn:aws:lambda:ap-south-1:999999999999:function:{NAME}:$LATEST"])
def test_name_forms_accepted_boto3(client, name):
    r = client.invoke(FunctionName=name, Payload=json.dumps({"action": "echo"}))
    assert r["StatusCode"] == 200


def test_qualifier_in_query(daemon, client):
    r = client.invoke(FunctionName=NAME, Qualifier="$LATEST", Payload=json.dumps({"action": "whoami"}))
    assert read_payload(r)["arn"] == f"{ARN_PREFIX}{NAME}:$LATEST"
    status, _, body = daemon.request("POST", f"/2015-03-31/functions/{NAME}/invocations?Qualifier=%24LATEST",
                                     json.dumps({"action": "whoami"}).encode())
    assert status == 200
    assert json.loads(body)["arn"] == f"{ARN_PREFIX}{NAME}:$LATEST"


def test_qualifier_conflict(daemon, client):
    with pytest.raises(client.exceptions.InvalidParameterValueException) as e:
        client.invoke(FunctionName=f"{NAME}:$LATEST", Qualifier="3", Payload=b"{}")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    status, headers, body = daemon.request("POST", f"/2015-03-31/functions/{NAME}:1/invocations?Qualifier=2", b"{}")
    assert_api_error(status, headers, body, "InvalidParameterValueException", 400)


def test_configured_version_is_accepted_and_reported(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="v-fn", AWS_LAMBDA_FUNCTION_VERSION="7")
    client = lambda_client(proc.url)
    r = client.invoke(FunctionName="v-fn", Qualifier="7", Payload=json.dumps({"action": "whoami"}))
    assert r["ExecutedVersion"] == "7"
    me = read_payload(r)
    assert me["arn"] == f"{ARN_PREFIX}v-fn:7"
    assert me["function_version"] == "7"
    r = client.invoke(FunctionName="v-fn:$LATEST", Payload=b"{}")
    assert r["StatusCode"] == 200
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="v-fn", Qualifier="8", Payload=b"{}")


def test_request_over_6mb(daemon, client):
    payload = json.dumps("x" * (6_291_456 - 1)).encode()  # one byte over the limit
    assert len(payload) == 6_291_457
    status, headers, body = daemon.invoke(name=NAME, raw=payload)
    message = assert_api_error(status, headers, body, "RequestEntityTooLargeException", 413)
    assert message == "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    # boto3 has no modelled class for AWS's real code: it raises a ClientError carrying it.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client.invoke(FunctionName=NAME, Payload=payload)
    assert e.value.response["Error"]["Code"] == "RequestEntityTooLargeException"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413


def test_request_at_the_6mb_limit_is_accepted(daemon):
    payload = json.dumps("x" * (6_291_456 - 2)).encode()
    assert len(payload) == 6_291_456
    status, headers, body = daemon.invoke(name=NAME, raw=payload)
    assert status == 200
    assert body == payload


def test_event_over_1mb(daemon, client):
    payload = json.dumps({"action": "echo", "pad": "x" * 1_048_576}).encode()
    status, headers, body = daemon.invoke(name=NAME, raw=payload, headers={"X-Amz-Invocation-Type": "Event"})
    message = assert_api_error(status, headers, body, "RequestEntityTooLargeException", 413)
    assert message == "Request must be smaller than 1048576 bytes for the InvokeFunction operation"
    # The same payload is fine synchronously.
    status, _, _ = daemon.invoke(name=NAME, raw=payload)
    assert status == 200


def test_bad_invocation_and_log_types(daemon):
    status, headers, body = daemon.invoke(name=NAME, headers={"X-Amz-Invocation-Type": "Sometimes"})
    assert_api_error(status, headers, body, "InvalidParameterValueException", 400)
    status, headers, body = daemon.invoke(name=NAME, headers={"X-Amz-Log-Type": "Verbose"})
    assert_api_error(status, headers, body, "InvalidParameterValueException", 400)


def test_429_when_queue_is_full(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_QUEUED_INVOCATIONS=0, MAX_CONCURRENCY=1,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    client = lambda_client(proc.url)
    busy = tmp_path / "busy.txt"
    thread, box = invoke_in_thread(proc.invoke, {"action": "marker", "path": str(busy), "seconds": 1.5})
    wait_until(busy.exists, 15, message="the first invocation to start")
    started = time.monotonic()
    with pytest.raises(client.exceptions.TooManyRequestsException) as e:
        client.invoke(FunctionName="function", Payload=b"{}")
    assert time.monotonic() - started < 1.0, "no waiting allowed with MAX_QUEUED_INVOCATIONS=0"
    response = e.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert response["Error"]["Message"] == "Rate Exceeded."
    assert response["ResponseMetadata"]["HTTPHeaders"]["retry-after"]
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    # An Event is refused the same way (nothing is accepted that cannot be queued).
    status, headers, _ = proc.invoke(headers={"X-Amz-Invocation-Type": "Event"})
    assert status == 429 and headers["x-amzn-errortype"] == "TooManyRequestsException"
    thread.join(20)
    assert box["result"][0] == 200
    assert metric(proc.metrics(), 'lambda_invocations_total{outcome="throttled"}') == 2


def test_429_after_waiting_a_whole_timeout_without_an_instance(daemon_factory):
    # The only instance takes 30 s to init: queued invocations give up after the 1 s function timeout.
    proc = daemon_factory(RIC + ["slow_init.handler"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=1,
                          AWS_LAMBDA_INIT_TIMEOUT=20, MAX_CONCURRENCY=1)
    client = lambda_client(proc.url)
    started = time.monotonic()
    threads = [invoke_in_thread(client.invoke, FunctionName="function", Payload=b"{}") for _ in range(2)]
    for thread, _ in threads:
        thread.join(15)
    elapsed = time.monotonic() - started
    for _, box in threads:
        assert isinstance(box.get("error"), client.exceptions.TooManyRequestsException), box
    assert 0.9 <= elapsed < 5


# ---- routes, methods, request ids -------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method(daemon, method):
    status, headers, body = daemon.request(method, f"/2015-03-31/functions/{NAME}/invocations")
    assert status == 405
    assert headers["allow"] == "POST"
    assert "message" in json.loads(body)
    assert headers["x-amzn-requestid"]


@pytest.mark.parametrize("path", ["/", "/nope", "/2015-03-31/functions/", "/2015-03-31/functions//invocations",
                                  f"/2015-03-31/functions/{NAME}/invocations/extra",
                                  "/2018-06-01/runtime/invocation/next"])
def test_unknown_path(daemon, path):
    status, headers, body = daemon.request("POST", path, b"{}")
    assert status == 404
    assert "message" in json.loads(body)
    assert headers["x-amzn-requestid"]


def test_every_invoke_response_has_a_request_id(daemon, tmp_path):
    cases = [
        ({}, json.dumps({"action": "echo"}).encode()),
        ({}, json.dumps({"action": "fail"}).encode()),
        ({"X-Amz-Invocation-Type": "Event"}, json.dumps({"action": "echo"}).encode()),
        ({"X-Amz-Invocation-Type": "DryRun"}, b"{}"),
        ({}, b"nope"),
        ({"X-Amz-Client-Context": "!!"}, b"{}"),
    ]
    seen = set()
    for headers, body in cases:
        status, response_headers, _ = daemon.invoke(name=NAME, raw=body, headers=headers)
        rid = response_headers["x-amzn-requestid"]
        assert UUID_RE.match(rid), (status, rid)
        seen.add(rid)
    assert len(seen) == len(cases)
    for path in ("/_/health", "/_/ready", "/metrics"):
        assert daemon.request("GET", path)[1]["x-amzn-requestid"]


def test_request_id_reaches_the_function(client):
    r = client.invoke(FunctionName=NAME, Payload=json.dumps({"action": "whoami"}))
    assert read_payload(r)["request_id"] == r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]


def test_health_and_ready(daemon):
    assert daemon.request("GET", "/_/health")[0] == 200
    assert daemon.request("GET", "/_/ready")[0] == 200
    assert daemon.request("POST", "/_/health", b"")[0] == 405


# ---- the seed's examples ----------------------------------------------------------------------

@pytest.fixture
def seed_echo(daemon_factory):
    return daemon_factory(AWS_LAMBDA_FUNCTION_NAME="echo-lambda")


def curl(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-i", *args], capture_output=True, timeout=30)


def split_curl(out: bytes):
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode().lower(), body


def test_seed_curl_examples(seed_echo):
    base = f"{seed_echo.url}/2015-03-31/functions"
    status, _, body = split_curl(curl("-XPOST", f"{base}/function/invocations", "-d", '{"key": "value"}').stdout)
    assert status == 200 and json.loads(body) == {"key": "value"}
    status, _, body = split_curl(curl("-XPOST", f"{base}/echo-lambda/invocations", "-d", '{"key": "value"}').stdout)
    assert status == 200 and json.loads(body) == {"key": "value"}
    status, _, body = split_curl(curl("-XPOST", f"{base}/echo-lambda/invocations", "-d", '"hello"').stdout)
    assert status == 200 and body == b'"hello"'
    status, head, body = split_curl(curl("-XPOST", f"{base}/echo-lambda/invocations", "-d", "hello").stdout)
    assert status == 400
    assert "x-amzn-errortype: invalidrequestcontentexception" in head
    assert json.loads(body)["message"].startswith("Could not parse request body into json")


def test_curl_large_payload_gets_100_continue(daemon, tmp_path):
    # curl asks "Expect: 100-continue" for bodies over 1 MB; without an answer it stalls a second.
    payload = json.dumps({"action": "echo", "pad": "x" * 2_000_000})
    (tmp_path / "big.json").write_text(payload)
    done = subprocess.run(["curl", "-v", "-s", "-o", str(tmp_path / "out.json"), "-XPOST",
                           daemon.invoke_url(NAME), "-d", f"@{tmp_path / 'big.json'}"], capture_output=True, timeout=30)
    trace = done.stderr.decode()
    assert "Expect: 100-continue" in trace
    assert "HTTP/1.1 100 Continue" in trace
    assert "Done waiting for 100-continue" not in trace
    assert json.loads((tmp_path / "out.json").read_text())["pad"] == "x" * 2_000_000


def aws_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_MAX_ATTEMPTS="1", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return subprocess.run([str(BIN / "aws"), "lambda", "invoke", *args], capture_output=True, timeout=60,
                          cwd=str(cwd), env=env)


def test_seed_aws_cli_line(seed_echo, tmp_path):
    # AWS CLI v1 has no --cli-binary-format: it sends the payload as given.
    done = aws_cli("--endpoint-url", seed_echo.url, "--function-name", "echo-lambda",
                   "--payload", '{ "key": "value" }', "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"StatusCode": 200, "ExecutedVersion": "$LATEST"}
    assert json.loads((tmp_path / "out.json").read_text()) == {"key": "value"}


def test_aws_cli_function_error_and_tail(daemon, tmp_path):
    done = aws_cli("--endpoint-url", daemon.url, "--function-name", NAME, "--log-type", "Tail",
                   "--payload", '{"action": "fail"}', "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["StatusCode"] == 200 and out["FunctionError"] == "Unhandled"
    assert b"REPORT RequestId" in base64.b64decode(out["LogResult"])
    assert json.loads((tmp_path / "out.json").read_text())["errorMessage"] == "boom"


def test_aws_cli_unknown_function(daemon, tmp_path):
    done = aws_cli("--endpoint-url", daemon.url, "--function-name", "nope", "--payload", "{}", "out.json",
                   cwd=tmp_path)
    assert done.returncode != 0
    assert b"ResourceNotFoundException" in done.stderr
