"""End-to-end tests of the Runtime API: what a runtime sees on /next, the status codes of /response,
/error and /init/error, the environment each runtime gets, runtimes started by hand against the
main RUNTIME_API_PORT, and AWS_LAMBDA_MAX_CONCURRENCY pass-through.
Reference: https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html

The "hand runtime" tests play the runtime themselves with raw HTTP on the main Runtime API port; the
daemon's own command there (``sleep``) never reaches /next, so every invocation goes to the test.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import time
import uuid

import pytest

from conftest import FUNCTIONS_DIR, RIC
from support import ARN_PREFIX, UUID_RE, in_thread, lambda_client, metric, read_payload

E2E = RIC + ["e2e_handlers.handler"]
TRACE_RE = re.compile(r"^Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0$")
PREFIX = "/2018-06-01/runtime"


class HandRuntime:
    """A runtime played by the test over raw HTTP, pointed at the daemon's main Runtime API port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: bytes = None, headers=None, timeout: float = 30.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, PREFIX + path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def next(self, timeout: float = 30.0):
        return self.call("GET", "/invocation/next", timeout=timeout)

    def respond(self, request_id: str, body: bytes):
        return self.call("POST", f"/invocation/{request_id}/response", body)

    def error(self, request_id: str, body: bytes, error_type: str = None):
        headers = {"Lambda-Runtime-Function-Error-Type": error_type} if error_type else {}
        return self.call("POST", f"/invocation/{request_id}/error", body, headers)


@pytest.fixture
def hand(daemon_factory):
    """A daemon whose own instances never become ready, and a HandRuntime on its main port."""
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_FUNCTION_NAME="rt-fn", AWS_LAMBDA_INIT_TIMEOUT=120,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=30, MAX_CONCURRENCY=1)
    return proc, HandRuntime(proc.runtime_port)


def test_next_headers_and_byte_exact_response(hand):
    proc, runtime = hand
    context = {"custom": {"who": "test"}, "env": {"e": 1}, "client": {}}
    payload = json.dumps({"a": 1, "b": "ü"}).encode()
    thread, box = in_thread(proc.invoke, raw=payload, name="rt-fn", headers={
        "X-Amz-Client-Context": base64.b64encode(json.dumps(context).encode()).decode()})
    status, headers, body = runtime.next()
    got_at_ms = time.time() * 1000
    assert status == 200
    assert body == payload
    assert headers["content-type"] == "application/json"
    rid = headers["lambda-runtime-aws-request-id"]
    assert UUID_RE.match(rid)
    assert abs(int(headers["lambda-runtime-deadline-ms"]) - (got_at_ms + 30_000)) < 3000
    assert headers["lambda-runtime-invoked-function-arn"] == f"{ARN_PREFIX}rt-fn"
    assert TRACE_RE.match(headers["lambda-runtime-trace-id"]), headers["lambda-runtime-trace-id"]
    assert json.loads(headers["lambda-runtime-client-context"]) == context

    result = b"\x00not json at all \xff\r\n"
    status, headers_, body_ = runtime.respond(rid, result)
    assert status == 202
    assert json.loads(body_) == {"status": "OK"}
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert status == 200
    assert caller_body == result
    assert caller_headers["x-amzn-requestid"] == rid
    # Answering twice is an invalid request id.
    status, _, body_ = runtime.respond(rid, b"{}")
    assert status == 400
    assert json.loads(body_)["errorType"] == "InvalidRequestID"


def test_next_with_qualifier_and_trace_id_passed_through(hand):
    proc, runtime = hand
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    thread, box = in_thread(proc.invoke, {"x": 1}, name="rt-fn:$LATEST", headers={"X-Amzn-Trace-Id": trace})
    status, headers, _ = runtime.next()
    assert status == 200
    assert headers["lambda-runtime-invoked-function-arn"] == f"{ARN_PREFIX}rt-fn:$LATEST"
    assert headers["lambda-runtime-trace-id"] == trace
    assert "lambda-runtime-client-context" not in headers
    # Invoked under the generic name: the ARN still carries the configured name.
    assert runtime.respond(headers["lambda-runtime-aws-request-id"], b"1")[0] == 202
    thread.join(10)
    thread, box = in_thread(proc.invoke, {}, name="function")
    status, headers, _ = runtime.next()
    assert headers["lambda-runtime-invoked-function-arn"] == f"{ARN_PREFIX}rt-fn"
    assert runtime.respond(headers["lambda-runtime-aws-request-id"], b"2")[0] == 202
    thread.join(10)
    assert box["result"][2] == b"2"


def test_error_post_reaches_the_caller(hand):
    proc, runtime = hand
    thread, box = in_thread(proc.invoke, {}, name="rt-fn")
    _, headers, _ = runtime.next()
    rid = headers["lambda-runtime-aws-request-id"]
    error = json.dumps({"errorType": "Custom.Err", "errorMessage": "it broke", "stackTrace": []}).encode()
    status, _, body = runtime.error(rid, error, "Custom.Err")
    assert status == 202 and json.loads(body) == {"status": "OK"}
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert status == 200
    assert caller_headers["x-amz-function-error"] == "Unhandled"
    assert caller_body == error
    assert runtime.error(rid, error)[0] == 400


def test_error_without_body_gets_a_useful_body(hand):
    proc, runtime = hand
    thread, box = in_thread(proc.invoke, {}, name="rt-fn")
    _, headers, _ = runtime.next()
    assert runtime.error(headers["lambda-runtime-aws-request-id"], b"", "Runtime.Custom")[0] == 202
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert caller_headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(caller_body)["errorType"] == "Runtime.Custom"


def test_unknown_request_id(hand):
    _, runtime = hand
    for rid in (str(uuid.uuid4()), "not-a-uuid", "x" * 300):
        for action in ("response", "error"):
            status, headers, body = runtime.call("POST", f"/invocation/{rid}/{action}", b"{}")
            assert status == 400
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["errorType"] == "InvalidRequestID"


@pytest.mark.parametrize("method,path,allowed", [
    ("POST", "/invocation/next", "GET"),
    ("PUT", "/invocation/next", "GET"),
    ("GET", "/invocation/abc/response", "POST"),
    ("GET", "/invocation/abc/error", "POST"),
    ("GET", "/init/error", "POST"),
])
def test_wrong_method(hand, method, path, allowed):
    _, runtime = hand
    status, headers, body = runtime.call(method, path, b"" if method != "GET" else None)
    assert status == 405
    assert headers["allow"] == allowed
    json.loads(body)


@pytest.mark.parametrize("path", ["/nope", "/invocation/abc/other", "/invocation//response", "/init"])
def test_unknown_route(hand, path):
    _, runtime = hand
    assert hand[1].call("POST", path, b"{}")[0] == 404


def test_response_over_6mb(hand):
    proc, runtime = hand
    thread, box = in_thread(proc.invoke, {}, name="rt-fn")
    _, headers, _ = runtime.next()
    rid = headers["lambda-runtime-aws-request-id"]
    status, _, body = runtime.respond(rid, b"x" * (6_291_556 + 1))
    assert status == 413
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert status == 200
    assert caller_headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(caller_body)["errorType"] == "Function.ResponseSizeTooLarge"
    # The id is finished: a second (small) answer is refused.
    assert runtime.respond(rid, b"{}")[0] == 400


def test_response_at_the_limit_is_accepted(hand):
    proc, runtime = hand
    thread, box = in_thread(proc.invoke, {}, name="rt-fn")
    _, headers, _ = runtime.next()
    assert runtime.respond(headers["lambda-runtime-aws-request-id"], b"y" * 6_291_556)[0] == 202
    thread.join(20)
    assert len(box["result"][2]) == 6_291_556


def test_init_error_from_a_hand_runtime(hand):
    proc, runtime = hand
    status, _, body = runtime.call("POST", "/init/error", b'{"errorType":"X","errorMessage":"y"}',
                                   {"Lambda-Runtime-Function-Error-Type": "X"})
    assert status == 202
    assert json.loads(body) == {"status": "OK"}
    assert proc.request("GET", "/_/health")[0] == 200


def test_next_waits_until_there_is_work(hand):
    proc, runtime = hand
    thread, box = in_thread(runtime.next)
    thread.join(0.5)
    assert thread.is_alive(), "/next must long-poll while there is no invocation"
    caller, caller_box = in_thread(proc.invoke, {"late": True}, name="rt-fn")
    thread.join(10)
    status, headers, body = box["result"]
    assert status == 200 and json.loads(body) == {"late": True}
    runtime.respond(headers["lambda-runtime-aws-request-id"], b"ok")
    caller.join(10)
    assert caller_box["result"][2] == b"ok"


def test_abandoned_next_does_not_swallow_an_invocation(hand):
    """A runtime that gave up on /next (connection closed) must not be handed work."""
    proc, runtime = hand
    with pytest.raises(OSError):
        runtime.next(timeout=0.3)
    thread, box = in_thread(proc.invoke, {"n": 1}, name="rt-fn")
    status, headers, body = runtime.next()
    assert json.loads(body) == {"n": 1}
    runtime.respond(headers["lambda-runtime-aws-request-id"], b"done")
    thread.join(10)
    assert box["result"][2] == b"done"


# ---- runtimes started by hand with the real awslambdaric --------------------------------------

def test_awslambdaric_started_by_hand_serves_invocations(hand):
    proc, _ = hand
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{proc.runtime_port}"
    runtime = subprocess.Popen(RIC + ["e2e_handlers.handler"], cwd=str(FUNCTIONS_DIR), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = lambda_client(proc.url)
        for n in range(3):
            r = client.invoke(FunctionName="rt-fn", Payload=json.dumps({"action": "whoami", "n": n}))
            me = read_payload(r)
            assert me["pid"] == runtime.pid
            assert me["event"]["n"] == n
            assert me["arn"] == f"{ARN_PREFIX}rt-fn"
        r = client.invoke(FunctionName="rt-fn", Payload=json.dumps({"action": "fail"}))
        assert r["FunctionError"] == "Unhandled"
        # The daemon cannot kill a hand runtime: it is never counted as one of its instances.
        assert metric(proc.metrics(), 'lambda_instances{state="busy"}') == 0
    finally:
        runtime.kill()
        runtime.wait(5)


# ---- the environment of spawned runtimes ------------------------------------------------------

def whoami(proc, **kwargs):
    r = lambda_client(proc.url).invoke(FunctionName="function", Payload=json.dumps({"action": "whoami"}), **kwargs)
    assert "FunctionError" not in r, r["Payload"].read()
    return read_payload(r)


def test_runtime_environment(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="env-fn",
                          AWS_LAMBDA_FUNCTION_MEMORY_SIZE=512, AMQP_USERNAME="secret-user",
                          AMQP_PASSWORD="secret-password", MY_OWN_VARIABLE="kept")
    me = whoami(proc)
    env = me["env"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "env-fn"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/env-fn"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["LAMBDA_TASK_ROOT"] == str(FUNCTIONS_DIR)
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["_HANDLER"] == "e2e_handlers.handler"
    assert env["_INSTANCE"] == "0"
    assert env["TZ"] == ":UTC"
    assert env["MY_OWN_VARIABLE"] == "kept"
    host, port = env["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) not in (proc.port, proc.runtime_port)
    for secret in ("AMQP_URI", "AMQP_USERNAME", "AMQP_PASSWORD"):
        assert secret not in env
    assert "AWS_LAMBDA_MAX_CONCURRENCY" not in env
    assert me["memory_limit_in_mb"] == "512"
    assert me["log_group_name"] == "/aws/lambda/env-fn"
    assert me["function_name"] == "env-fn"
    assert me["arn"] == f"{ARN_PREFIX}env-fn"
    assert 0 < me["deadline_ms_left"] <= 3000


def test_amqp_uri_is_not_passed_to_the_runtime(daemon_factory):
    name = f"env-amqp-{uuid.uuid4().hex[:12]}"
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME=name,
                          AMQP_URI="amqp://127.0.0.1:5672/?connection_attempts=2&retry_delay=1&heartbeat=0",
                          AMQP_USERNAME="guest", AMQP_PASSWORD="guest")
    env = whoami(proc)["env"]
    assert not [k for k in env if k.startswith("AMQP_")]
    assert "guest" not in json.dumps(env)


def test_user_set_values_win(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, TZ="America/New_York", AWS_LAMBDA_LOG_GROUP_NAME="/custom/group",
                          AWS_LAMBDA_LOG_STREAM_NAME="my-stream", LAMBDA_TASK_ROOT=str(tmp_path),
                          AWS_REGION="eu-west-2", AWS_LAMBDA_INITIALIZATION_TYPE="provisioned-concurrency",
                          AWS_LAMBDA_RUNTIME_API="127.0.0.1:1")
    me = whoami(proc)
    env = me["env"]
    assert env["TZ"] == "America/New_York"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/custom/group"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"] == "my-stream"
    assert env["LAMBDA_TASK_ROOT"] == str(tmp_path)
    assert env["AWS_REGION"] == "eu-west-2"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-2"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"
    # ... except the Runtime API address, which is always the instance's own.
    assert env["AWS_LAMBDA_RUNTIME_API"] != "127.0.0.1:1"
    assert me["arn"] == "arn:aws:lambda:eu-west-2:012345678912:function:e2e_handlers"


def test_each_instance_is_its_own_process_group(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR)
    me = whoami(proc)
    assert me["pgid"] == me["pid"]
    assert me["pgid"] != os.getpgid(proc.proc.pid)


def test_deadline_counts_from_the_hand_over(daemon_factory):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=2)
    me = whoami(proc)
    assert 1000 < me["deadline_ms_left"] <= 2000


def test_runtime_max_concurrency_passthrough(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_MAX_CONCURRENCY=2, MAX_CONCURRENCY=1,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    env = whoami(proc)["env"]
    assert env["AWS_LAMBDA_MAX_CONCURRENCY"] == "2"
    client = lambda_client(proc.url)
    started = time.monotonic()
    threads = [in_thread(client.invoke, FunctionName="function",
                         Payload=json.dumps({"action": "sleep", "seconds": 2})) for _ in range(2)]
    for thread, _ in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    results = [read_payload(box["result"]) for _, box in threads]
    assert all(r["slept"] == 2 for r in results)
    assert elapsed < 3.8, f"two 2 s invocations took {elapsed:.1f} s: not run in parallel"
    assert metric(proc.metrics(), "lambda_instance_spawns_total") == 1
    # Both ran in workers of the one instance's process group.
    assert len({r["pid"] for r in results}) == 2
    pgids = {os.getpgid(r["pid"]) for r in results}
    assert len(pgids) == 1



def test_hand_runtime_that_never_answers_times_out(daemon_factory):
    """The daemon cannot kill a runtime started by hand: the caller gets the timeout, the runtime's
    late answer is refused, and the hand runtime keeps serving."""
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_INIT_TIMEOUT=120, AWS_LAMBDA_FUNCTION_TIMEOUT=1)
    runtime = HandRuntime(proc.runtime_port)
    thread, box = in_thread(proc.invoke, {"n": 1})
    _, headers, _ = runtime.next()
    rid = headers["lambda-runtime-aws-request-id"]
    thread.join(10)
    status, caller_headers, body = box["result"]
    assert caller_headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body)["errorType"] == "Sandbox.Timedout"
    assert runtime.respond(rid, b"late")[0] == 400
    thread, box = in_thread(proc.invoke, {"n": 2})
    _, headers, body = runtime.next()
    assert json.loads(body) == {"n": 2}
    assert runtime.respond(headers["lambda-runtime-aws-request-id"], b"on time")[0] == 202
    thread.join(10)
    assert box["result"][2] == b"on time"


def test_only_the_instance_running_an_invocation_may_answer_it(daemon_factory):
    """A process on the main port (or another instance's port) cannot answer an invocation that a
    spawned instance is running: 400, and the real runtime's answer still reaches the caller."""
    proc = daemon_factory(RIC + ["handlers.sleep"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    request_id = str(uuid.uuid4())
    thread, box = in_thread(proc.invoke, {"seconds": 1.0}, headers={"Amz-Sdk-Invocation-Id": request_id})
    deadline = time.monotonic() + 10
    while 'lambda_instances{state="busy"} 1' not in proc.metrics():
        assert time.monotonic() < deadline, "the invocation never started"
        time.sleep(0.02)
    intruder = HandRuntime(proc.runtime_port)
    status, _, body = intruder.respond(request_id, b'"forged"')
    assert status == 400
    assert json.loads(body)["errorType"] == "InvalidRequestID"
    thread.join(15)
    status, headers, body = box["result"]
    assert status == 200
    assert json.loads(body)["slept"] == 1.0
    assert headers["x-amzn-requestid"] == request_id
