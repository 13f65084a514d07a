"""Bad input and security against the real daemon: garbage on the Invoke API port, the main Runtime
API port and an instance's own Runtime API port (answered 400 and closed, the daemon serving on);
header limits (431 past 64 KiB); slow clients; bodies never fully sent; callers that go away;
request ids taken from clients only when they are UUIDs not in flight. tests/test_zipapp.py runs
this file again on the h11 parser (httptools hidden), as the single-file build runs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid

import pytest

from conftest import FUNCTIONS_DIR, RIC, start_daemon, wait_until
from support import UUID_RE, lambda_client, raw_exchange, read_payload, status_of

E2E = RIC + ["e2e_handlers.handler"]

GARBAGE = [
    b"GARBAGE\r\n\r\n",
    b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
    b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
]


@pytest.fixture(scope="module")
def daemon():
    proc = start_daemon(E2E, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="sec-fn", MAX_CONCURRENCY=2,
                        AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    yield proc
    proc.stop()


def still_serves(proc, name="sec-fn"):
    status, _, body = proc.invoke({"action": "echo", "ok": 1}, name=name, timeout=20)
    assert status == 200 and json.loads(body)["ok"] == 1


def instance_port(proc) -> int:
    status, _, body = proc.invoke({"action": "whoami"}, name="sec-fn")
    return int(json.loads(body)["env"]["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)[1])


# ---- garbage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_on_the_invoke_port(daemon, garbage):
    answer = raw_exchange(daemon.port, garbage, timeout=5)
    assert status_of(answer) == 400, answer[:200]
    assert b"connection: close" in answer.lower()
    still_serves(daemon)


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_on_the_runtime_ports(daemon, garbage):
    port = instance_port(daemon)
    for target in (daemon.runtime_port, port):
        answer = raw_exchange(target, garbage, timeout=5)
        assert status_of(answer) == 400, answer[:200]
    still_serves(daemon)
    assert instance_port(daemon) == port, "garbage on an instance's port must not cost the instance"


def test_upgrade_requests_are_served_as_plain_http(daemon):
    started = time.monotonic()
    answer = raw_exchange(daemon.port, b"GET /_/health HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                                       b"GET /_/health HTTP/1.1\r\nConnection: close\r\n\r\n", timeout=10)
    assert time.monotonic() - started < 5, "the connection must end, not hang"
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert b"101 Switching" not in answer
    still_serves(daemon)


def test_curl_http2_upgrade_attempt_is_served(daemon):
    # curl --http2 on http:// asks every request to upgrade to h2c; an HTTP/1.1 server may ignore it.
    done = subprocess.run(["curl", "-s", "--http2", "-XPOST", daemon.invoke_url("sec-fn"), "-d",
                           '{"action": "echo", "v": 1}', "--next", "--http2", "-XPOST", daemon.invoke_url("sec-fn"),
                           "-d", '{"action": "echo", "v": 2}'], capture_output=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout == b'{"action": "echo", "v": 1}{"action": "echo", "v": 2}'


@pytest.mark.parametrize("path", ["/_/health", "/metrics", "/nope", "/2015-03-31/functions/sec-fn/invocations"])
def test_head_answers_have_no_body(daemon, path):
    answer = raw_exchange(daemon.port, b"HEAD %s HTTP/1.1\r\n\r\nGET /_/health HTTP/1.1\r\nConnection: close\r\n\r\n"
                          % path.encode())
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 ")
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert rest.endswith(b"\r\n\r\nOK")


def test_half_request_then_close_on_every_port(daemon):
    for port in (daemon.port, daemon.runtime_port, instance_port(daemon)):
        assert raw_exchange(port, b"POST /2015-03-31/functions/function/invo", timeout=2, shut_write=True) == b""
    still_serves(daemon)


def test_invalid_json_and_unknown_ids_change_nothing(daemon):
    port = instance_port(daemon)
    for target in (daemon.runtime_port, port):
        for rid, status in ((str(uuid.uuid4()), 400), ("%00", 400), ("../../etc/passwd", 404)):
            answer = raw_exchange(target, b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\n"
                                          b"Content-Length: 2\r\nConnection: close\r\n\r\n{}" % rid.encode())
            assert status_of(answer) == status, answer[:200]
    still_serves(daemon)


def test_runtime_api_is_not_served_on_the_invoke_port(daemon):
    for path in ("/2018-06-01/runtime/invocation/next", "/2018-06-01/runtime/init/error"):
        assert daemon.request("GET", path)[0] == 404
        assert daemon.request("POST", path, b"{}")[0] == 404


def test_pipelined_invokes_are_answered_in_order(daemon):
    requests = b"".join(
        b"POST /2015-03-31/functions/sec-fn/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body) for body in (json.dumps({"action": "echo", "n": n}).encode() for n in range(5)))
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as s:
        s.sendall(requests + b"GET /_/health HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
              for part in data.split(b"HTTP/1.1 200 OK")[1:6]]
    assert [b["n"] for b in bodies] == [0, 1, 2, 3, 4]
    assert data.rstrip().endswith(b"OK")


# ---- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["one-big-header", "many-headers", "long-url"])
def test_headers_over_64kb(daemon, shape):
    if shape == "one-big-header":
        head = b"POST /2015-03-31/functions/sec-fn/invocations HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n"
    elif shape == "many-headers":
        head = b"POST /2015-03-31/functions/sec-fn/invocations HTTP/1.1\r\n" + b"".join(
            b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(700))
    else:
        head = b"POST /2015-03-31/functions/sec-fn/invocations?q=" + b"c" * 70_000 + b" HTTP/1.1\r\n"
    request = head + b"Content-Length: 2\r\n\r\n{}"
    for port in (daemon.port, daemon.runtime_port):
        answer = raw_exchange(port, request, timeout=10)
        assert status_of(answer) == 431, answer[:200]
    still_serves(daemon)


def test_headers_just_under_the_limit_are_fine(daemon):
    status, _, body = daemon.invoke({"action": "echo", "k": 2}, name="sec-fn", headers={"X-Pad": "p" * 60_000})
    assert status == 200 and json.loads(body)["k"] == 2


def test_slow_clients_hold_nothing_and_never_reach_a_runtime(daemon_factory, tmp_path):
    """Slowloris: connections that never finish their headers or body hold nothing: others are served
    meanwhile, and a body that was never completed never reaches the function. (That the daemon closes
    them with 408 after its 60 s request timeout is shown on the same HTTP layer with a 1 s timeout in
    tests/test_httpserver.py, for both parsers: waiting 60 s here would cost the suite a minute twice.)"""
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1)
    marker = tmp_path / "slow.txt"
    body = json.dumps({"action": "marker", "path": str(marker)}).encode()
    slow = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
            if i % 2:
                s.sendall(b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body[:-5]))
            else:
                s.sendall(b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nX-Slow: ")
            slow.append(s)
        for _ in range(3):
            started = time.monotonic()
            still_serves(proc, name="function")
            assert time.monotonic() - started < 5
            for s in slow[::2]:
                s.sendall(b"x")  # a header value that keeps growing, slowly
        assert proc.request("GET", "/_/health")[0] == 200
        assert "lambda_queue_depth 0" in proc.metrics()
    finally:
        for s in slow:
            s.close()
    still_serves(proc, name="function")
    assert not marker.exists()


def test_incomplete_body_never_reaches_the_runtime(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1)
    marker = tmp_path / "partial.txt"
    body = json.dumps({"action": "marker", "path": str(marker)}).encode()
    for cut in (1, len(body) // 2, len(body) - 1):
        answer = raw_exchange(proc.port, b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\n"
                                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:cut]),
                              timeout=2, shut_write=True)
        assert answer == b""
    # A complete one afterwards runs, and is the only one that ever did.
    status, headers, _ = proc.invoke(raw=body)
    assert status == 200
    assert marker.read_text().split() == [headers["x-amzn-requestid"]]


def test_caller_gone_while_queued_is_dropped(daemon_factory, tmp_path):
    proc = daemon_factory(E2E, cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=1, AWS_LAMBDA_FUNCTION_TIMEOUT=20)
    busy = tmp_path / "busy.txt"
    box: dict = {}
    first = threading.Thread(target=lambda: box.update(r=proc.invoke(
        {"action": "marker", "path": str(busy), "seconds": 1.5})), daemon=True)
    first.start()
    wait_until(busy.exists, 15, message="the first invocation to start")
    marker = tmp_path / "gone.txt"
    body = json.dumps({"action": "marker", "path": str(marker)}).encode()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as s:
        s.sendall(b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        wait_until(lambda: "lambda_queue_depth 1" in proc.metrics(), 5, message="the invocation to queue")
    first.join(20)
    assert box["r"][0] == 200
    still_serves(proc, name="function")
    assert not marker.exists()


# ---- request ids ------------------------------------------------------------------------------

def test_client_uuid_is_used_as_request_id(daemon):
    rid = str(uuid.uuid4())
    status, headers, body = daemon.invoke({"action": "whoami"}, name="sec-fn", headers={"Amz-Sdk-Invocation-Id": rid})
    assert headers["x-amzn-requestid"] == rid
    assert json.loads(body)["request_id"] == rid
    upper = str(uuid.uuid4()).upper()
    status, headers, body = daemon.invoke({"action": "whoami"}, name="sec-fn",
                                          headers={"Amz-Sdk-Invocation-Id": upper})
    assert headers["x-amzn-requestid"] == upper.lower()


def test_boto3_invocation_id_becomes_the_request_id(daemon):
    r = lambda_client(daemon.url).invoke(FunctionName="sec-fn", Payload=json.dumps({"action": "whoami"}))
    assert read_payload(r)["request_id"] == r["ResponseMetadata"]["RequestId"]


@pytest.mark.parametrize("bad", ["not-a-uuid", "../../x", "12345678-1234-1234-1234-1234567890123",
                                 "12345678-1234-1234-1234-12345678901g", "x" * 5000, ""])
def test_non_uuid_invocation_id_is_not_used(daemon, bad):
    status, headers, body = daemon.invoke({"action": "whoami"}, name="sec-fn", headers={"Amz-Sdk-Invocation-Id": bad})
    assert status == 200
    rid = headers["x-amzn-requestid"]
    assert rid != bad and UUID_RE.match(rid)
    assert json.loads(body)["request_id"] == rid


def test_invocation_id_in_flight_is_not_reused(daemon):
    rid = str(uuid.uuid4())
    box: dict = {}
    first = threading.Thread(target=lambda: box.update(r=daemon.invoke(
        {"action": "sleep", "seconds": 1.5}, name="sec-fn", headers={"Amz-Sdk-Invocation-Id": rid})), daemon=True)
    first.start()
    wait_until(lambda: "lambda_in_flight 1" in daemon.metrics() or not first.is_alive(), 10)
    status, headers, body = daemon.invoke({"action": "whoami", "second": True}, name="sec-fn",
                                          headers={"Amz-Sdk-Invocation-Id": rid})
    assert status == 200
    second_rid = headers["x-amzn-requestid"]
    assert second_rid != rid and UUID_RE.match(second_rid)
    assert json.loads(body)["event"]["second"] is True
    first.join(20)
    status, headers, body = box["r"]
    assert headers["x-amzn-requestid"] == rid
    assert json.loads(body)["slept"] == 1.5
    # Finished: the id may be used again.
    status, headers, _ = daemon.invoke({"action": "echo"}, name="sec-fn", headers={"Amz-Sdk-Invocation-Id": rid})
    assert headers["x-amzn-requestid"] == rid
