"""Lambda-Runtime-Invocation-Id: every hand-over of an invocation gets a fresh one, and an answer that
echoes one that is not current (a runtime still busy with a hand-over that timed out, after the
request id was handed out again) is refused with AWS's RAPID answer for a late answer, 410
InvokeTimeout, and changes nothing. Answers that echo none are accepted (older runtimes).

Hand-played runtimes (raw HTTP on the main Runtime API port) cover buffered and streamed answers;
two awslambdaric processes started by hand show that the real runtime client echoes the header
(awslambdaric >= 4.0.2) and that the caller gets the answer of the runtime that holds its invocation.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import uuid

from botocore.eventstream import EventStreamBuffer

from conftest import FUNCTIONS_DIR, RIC, wait_until
from support import UUID_RE, in_thread, metric
from test_runtime_api import HandRuntime

STALE = {"errorType": "InvokeTimeout", "errorMessage": "Invoke timeout"}


def hand_daemon(daemon_factory, timeout: float = 30):
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_FUNCTION_NAME="iid-fn", AWS_LAMBDA_INIT_TIMEOUT=120,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=timeout, MAX_CONCURRENCY=1)
    return proc, HandRuntime(proc.runtime_port)


def answer(runtime: HandRuntime, request_id: str, action: str, body: bytes, invocation_id: str = None):
    headers = {} if invocation_id is None else {"Lambda-Runtime-Invocation-Id": invocation_id}
    status, _, reply = runtime.call("POST", f"/invocation/{request_id}/{action}", body, headers)
    return status, json.loads(reply)


def test_every_hand_over_carries_a_fresh_invocation_id(daemon_factory):
    proc, runtime = hand_daemon(daemon_factory)
    seen = set()
    for n in range(3):
        thread, box = in_thread(proc.invoke, {"n": n}, name="iid-fn")
        status, headers, _ = runtime.next()
        assert status == 200
        invocation_id = headers["lambda-runtime-invocation-id"]
        assert UUID_RE.match(invocation_id), invocation_id
        assert invocation_id != headers["lambda-runtime-aws-request-id"]
        seen.add(invocation_id)
        # The current id is accepted; so is an answer that echoes none (runtimes older than the header).
        echoed = invocation_id if n % 2 else None
        assert answer(runtime, headers["lambda-runtime-aws-request-id"], "response", b'"ok"', echoed) == (
            202, {"status": "OK"})
        thread.join(10)
        assert box["result"][0] == 200 and box["result"][2] == b'"ok"'
    assert len(seen) == 3


def test_stale_answer_to_a_request_id_handed_out_again_is_refused(daemon_factory):
    """Invocation A times out while a hand runtime still holds it; B comes with the same request id and
    is handed out again: A's answers (/response and /error) are refused and B gets its own answer."""
    proc, runtime = hand_daemon(daemon_factory, timeout=1)
    request_id = str(uuid.uuid4())
    thread, box = in_thread(proc.invoke, {"call": "A"}, name="iid-fn", headers={"Amz-Sdk-Invocation-Id": request_id})
    _, headers, body = runtime.next()
    assert json.loads(body) == {"call": "A"} and headers["lambda-runtime-aws-request-id"] == request_id
    first = headers["lambda-runtime-invocation-id"]
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert caller_headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(caller_body)["errorType"] == "Sandbox.Timedout"

    thread, box = in_thread(proc.invoke, {"call": "B"}, name="iid-fn", headers={"Amz-Sdk-Invocation-Id": request_id})
    _, headers, body = runtime.next()
    assert json.loads(body) == {"call": "B"} and headers["lambda-runtime-aws-request-id"] == request_id
    second = headers["lambda-runtime-invocation-id"]
    assert second != first
    assert answer(runtime, request_id, "response", b'"from A"', first) == (410, STALE)
    error = json.dumps({"errorType": "Late.Error", "errorMessage": "from A"}).encode()
    assert answer(runtime, request_id, "error", error, first) == (410, STALE)
    assert answer(runtime, request_id, "response", b"x" * 7_000_000, first) == (410, STALE)  # not "too large"
    assert thread.is_alive(), "a stale answer must not end the invocation"
    assert metric(proc.metrics(), "lambda_in_flight") == 1
    assert answer(runtime, request_id, "response", b'"from B"', second) == (202, {"status": "OK"})
    thread.join(10)
    status, caller_headers, caller_body = box["result"]
    assert status == 200 and caller_body == b'"from B"' and "x-amz-function-error" not in caller_headers
    # Finished: any further answer is an unknown request id, as before.
    assert answer(runtime, request_id, "response", b'"again"', second)[0] == 400


def test_stale_streamed_answer_never_reaches_a_streaming_caller(daemon_factory):
    proc, runtime = hand_daemon(daemon_factory, timeout=1)
    request_id = str(uuid.uuid4())
    thread, box = in_thread(proc.invoke, {"call": "A"}, name="iid-fn", headers={"Amz-Sdk-Invocation-Id": request_id})
    _, headers, _ = runtime.next()
    first = headers["lambda-runtime-invocation-id"]
    thread.join(10)
    assert json.loads(box["result"][2])["errorType"] == "Sandbox.Timedout"

    def stream_call():
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
        conn.request("POST", "/2021-11-15/functions/iid-fn/response-streaming-invocations", b'{"call":"B"}',
                     {"Amz-Sdk-Invocation-Id": request_id, "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()

    caller, caller_box = in_thread(stream_call)
    _, headers, _ = runtime.next()
    second = headers["lambda-runtime-invocation-id"]
    assert streamed_answer(proc.runtime_port, request_id, first, [b"stale-1", b"stale-2"]) == (410, STALE)
    assert caller.is_alive()
    assert streamed_answer(proc.runtime_port, request_id, second, [b"fresh-1", b"fresh-2"]) == (202, {"status": "OK"})
    caller.join(10)
    status, raw = caller_box["result"]
    assert status == 200
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    chunks = [m.payload for m in buffer if m.headers[":event-type"] == "PayloadChunk"]
    assert b"".join(chunks) == b"fresh-1fresh-2"


def streamed_answer(port: int, request_id: str, invocation_id: str, chunks: list) -> tuple:
    """A streamed POST .../response (chunked, as the Node.js runtime client sends it) echoing an id."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
                     b"Lambda-Runtime-Invocation-Id: %s\r\nContent-Type: application/octet-stream\r\n\r\n"
                     % (request_id.encode(), invocation_id.encode()))
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        reply = b""
        while not reply.endswith(b"}"):
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)


def test_awslambdaric_echoes_the_invocation_id_and_the_caller_gets_its_own_answer(daemon_factory, tmp_path):
    """Two awslambdaric runtimes started by hand. A's handler outlives A's timeout; B reuses A's request
    id and goes to the other runtime. A's late answer (awslambdaric echoes A's invocation id) must not
    become B's: it is refused, and B's caller gets B's answer from the runtime that ran B."""
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_FUNCTION_NAME="iid-fn", AWS_LAMBDA_INIT_TIMEOUT=120,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=3, MAX_CONCURRENCY=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_LAMBDA_RUNTIME_API"] = f"127.0.0.1:{proc.runtime_port}"
    runtimes = [subprocess.Popen(RIC + ["crosswire.wait_then_echo"], cwd=str(FUNCTIONS_DIR), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                for _ in range(2)]
    try:
        # Both serve before the test begins: two invocations are handed out at once, one to each.
        warm = tmp_path / "warm"
        calls = [in_thread(proc.invoke, {"wait_for": str(warm), "warm": n}, name="iid-fn") for n in range(2)]
        wait_until(lambda: metric(proc.metrics(), "lambda_in_flight") == 2, 30, message="both runtimes serving")
        warm.touch()
        for thread, _ in calls:
            thread.join(15)
        assert len({json.loads(box["result"][2])["pid"] for _, box in calls}) == 2
        request_id = str(uuid.uuid4())
        release_a, release_b = tmp_path / "release-a", tmp_path / "release-b"
        thread_a, box_a = in_thread(proc.invoke, {"wait_for": str(release_a), "call": "A"}, name="iid-fn",
                                    headers={"Amz-Sdk-Invocation-Id": request_id})
        thread_a.join(15)
        assert json.loads(box_a["result"][2])["errorType"] == "Sandbox.Timedout"
        thread_b, box_b = in_thread(proc.invoke, {"wait_for": str(release_b), "call": "B"}, name="iid-fn",
                                    headers={"Amz-Sdk-Invocation-Id": request_id})
        wait_until(lambda: metric(proc.metrics(), "lambda_in_flight") == 1, 10, message="B handed out")
        release_a.touch()  # A's handler returns: awslambdaric posts A's answer, echoing A's invocation id
        wait_until(lambda: f"{request_id}: stale answer refused" in proc.stderr, 10, message="the refusal")
        assert thread_b.is_alive()
        release_b.touch()
        thread_b.join(15)
        status, headers, body = box_b["result"]
        assert status == 200 and "x-amz-function-error" not in headers, body
        result = json.loads(body)
        assert result["event"]["call"] == "B" and result["request_id"] == request_id
        assert result["pid"] in {r.pid for r in runtimes}
    finally:
        for runtime in runtimes:
            runtime.kill()
            runtime.wait(5)
