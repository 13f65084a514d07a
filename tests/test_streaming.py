"""Response streaming: InvokeWithResponseStream (bytes the runtime streams reach the caller as they
come, framed as AWS's event stream; up to 200 MB; a slow caller slows the runtime down).

The runtime side is played by the test over raw sockets on the main Runtime API port (a chunked
POST with ``Lambda-Runtime-Function-Response-Mode: streaming``, as the Node.js runtime client sends
it), or by ``functions/streaming_runtime.py``, a custom runtime the daemon spawns (for crashes and
timeouts). The client is boto3's ``invoke_with_response_stream``, which checks the event stream's
CRCs; awslambdaric (which does not stream) shows how an ordinary /response is delivered.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import queue
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

from conftest import FUNCTIONS_DIR, PYTHON, RIC, wait_until
from lambda_rapid.invoke import eventstream
from support import UUID_RE, lambda_client, metric
from test_runtime_api import HandRuntime
from test_runtimes import node_ric  # noqa: F401  (a fixture)

STREAMER = [PYTHON, str(FUNCTIONS_DIR / "streaming_runtime.py"), "streaming_runtime.handler"]
STREAM_PATH = "/2021-11-15/functions/{}/response-streaming-invocations"


# ---- helpers ---------------------------------------------------------------------------------

class StreamingResponse:
    """A runtime's streamed POST .../response over a raw socket, one chunk at a time."""

    def __init__(self, port: int, request_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock.sendall(
            b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" % request_id.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self, trailers: bytes = b"") -> bytes:
        """End the body (with trailer fields) and return the daemon's answer."""
        self.sock.sendall(b"0\r\n" + trailers + b"\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
            more = self.sock.recv(65536)
            if not more:
                break
            reply += more
        self.sock.close()
        return reply


class StreamClient:
    """boto3's invoke_with_response_stream in a thread; every event goes to ``events`` as it arrives."""

    def __init__(self, url: str, name: str = "function", **kwargs) -> None:
        self.events: queue.Queue = queue.Queue()
        self.response: dict = {}
        self.error: list = []
        self.thread = threading.Thread(target=self._run, args=(url, name, kwargs), daemon=True)
        self.thread.start()

    def _run(self, url: str, name: str, kwargs: dict) -> None:
        try:
            response = lambda_client(url).invoke_with_response_stream(FunctionName=name, **kwargs)
            self.response.update(response)
            for event in response["EventStream"]:
                self.events.put(event)
        except Exception as e:  # the test asserts on it
            self.error.append(e)
        self.events.put(None)

    def next_event(self, timeout: float = 15.0):
        return self.events.get(timeout=timeout)

    def all_events(self, timeout: float = 30.0) -> list:
        out = []
        while True:
            event = self.events.get(timeout=timeout)
            if event is None:
                assert not self.error, self.error
                return out
            out.append(event)


def payload_of(events: list) -> bytes:
    return b"".join(e["PayloadChunk"]["Payload"] for e in events if "PayloadChunk" in e)


@pytest.fixture
def hand(daemon_factory):
    """A daemon whose own instance never becomes ready, and a HandRuntime on its main port."""
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_FUNCTION_NAME="st-fn", AWS_LAMBDA_INIT_TIMEOUT=120,
                          AWS_LAMBDA_FUNCTION_TIMEOUT=30, MAX_CONCURRENCY=1)
    return proc, HandRuntime(proc.runtime_port)


# ---- framing ---------------------------------------------------------------------------------

def test_event_stream_messages_decode_with_botocore_and_their_crcs_check():
    data = eventstream.payload_chunk(b"\x00bytes\xff") + eventstream.invoke_complete("E.T", "went wrong", "bG9n")
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    first, second = list(buffer)
    assert first.headers == {":event-type": "PayloadChunk", ":content-type": "application/octet-stream",
                             ":message-type": "event"}
    assert first.payload == b"\x00bytes\xff"
    assert second.headers[":event-type"] == "InvokeComplete"
    assert json.loads(second.payload) == {"ErrorCode": "E.T", "ErrorDetails": "went wrong", "LogResult": "bG9n"}
    # A flipped payload byte fails the message CRC: the framing is checked, not just split.
    broken = bytearray(eventstream.payload_chunk(b"abc"))
    broken[-5] ^= 1
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(broken))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


# ---- hand-played streaming runtime -----------------------------------------------------------

def test_chunks_reach_the_client_before_the_runtime_sends_the_last_one(hand):
    proc, runtime = hand
    client = StreamClient(proc.url, "st-fn", Payload=b'{"q":1}')
    status, headers, body = runtime.next()
    assert status == 200 and json.loads(body) == {"q": 1}
    rid = headers["lambda-runtime-aws-request-id"]
    stream = StreamingResponse(proc.runtime_port, rid)
    stream.send(b"first ")
    assert client.next_event() == {"PayloadChunk": {"Payload": b"first "}}
    stream.send(b"second ")
    assert client.next_event() == {"PayloadChunk": {"Payload": b"second "}}
    assert client.events.empty()  # nothing more before the runtime says more
    stream.send(b"last")
    reply = stream.finish()
    assert reply.startswith(b"HTTP/1.1 202"), reply
    events = client.all_events()
    assert payload_of(events) == b"last"
    assert events[-1] == {"InvokeComplete": {}}
    response = client.response
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert response["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
    http_headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert http_headers["x-amzn-requestid"] == rid
    assert http_headers["transfer-encoding"] == "chunked"
    # The invocation is over: answering it again is an invalid request id.
    assert runtime.respond(rid, b"{}")[0] == 400


def test_error_trailers_mid_stream_end_with_invoke_complete_error(hand):
    proc, runtime = hand
    client = StreamClient(proc.url, "st-fn")
    _, headers, _ = runtime.next()
    rid = headers["lambda-runtime-aws-request-id"]
    stream = StreamingResponse(proc.runtime_port, rid)
    stream.send(b"partial")
    assert client.next_event() == {"PayloadChunk": {"Payload": b"partial"}}
    error = json.dumps({"errorType": "Custom.Failure", "errorMessage": "gave up halfway", "trace": []})
    reply = stream.finish(b"Lambda-Runtime-Function-Error-Type: Custom.Failure\r\n"
                          b"Lambda-Runtime-Function-Error-Body: %s\r\n" % base64.b64encode(error.encode()))
    assert reply.startswith(b"HTTP/1.1 202"), reply
    events = client.all_events()
    assert events == [{"InvokeComplete": {"ErrorCode": "Custom.Failure", "ErrorDetails": "gave up halfway"}}]
    assert 'outcome="function_error"} 1' in proc.metrics()


def test_runtime_error_post_before_any_byte_is_an_invoke_complete_error(hand):
    proc, runtime = hand
    client = StreamClient(proc.url, "st-fn")
    _, headers, _ = runtime.next()
    rid = headers["lambda-runtime-aws-request-id"]
    assert runtime.error(rid, b'{"errorType":"Bad.Thing","errorMessage":"no"}', "Bad.Thing")[0] == 202
    events = client.all_events()
    assert events == [{"InvokeComplete": {"ErrorCode": "Bad.Thing", "ErrorDetails": "no"}}]
    assert client.response["StatusCode"] == 200


def test_streamed_response_to_an_ordinary_invoke_arrives_whole(hand):
    proc, runtime = hand
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(r=proc.invoke({}, name="st-fn")), daemon=True)
    thread.start()
    _, headers, _ = runtime.next()
    stream = StreamingResponse(proc.runtime_port, headers["lambda-runtime-aws-request-id"])
    stream.send(b'{"a":')
    stream.send(b'1}')
    assert stream.finish().startswith(b"HTTP/1.1 202")
    thread.join(15)
    status, caller_headers, body = box["r"]
    assert status == 200 and body == b'{"a":1}'
    assert "x-amz-function-error" not in caller_headers


def test_client_that_leaves_mid_stream_changes_nothing_else(hand):
    proc, runtime = hand
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as client:
        client.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                       % STREAM_PATH.format("st-fn").encode())
        _, headers, _ = runtime.next()
        rid = headers["lambda-runtime-aws-request-id"]
        stream = StreamingResponse(proc.runtime_port, rid)
        stream.send(b"one")
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-type: application/vnd.amazon.eventstream" in head.lower()
    stream.send(b"two, to nobody")
    assert stream.finish().startswith(b"HTTP/1.1 202")
    # The daemon serves the next streaming invoke as usual.
    client2 = StreamClient(proc.url, "st-fn")
    _, headers, _ = runtime.next()
    stream = StreamingResponse(proc.runtime_port, headers["lambda-runtime-aws-request-id"])
    stream.send(b"again")
    stream.finish()
    events = client2.all_events()
    assert payload_of(events) == b"again" and events[-1] == {"InvokeComplete": {}}


# ---- real runtimes ---------------------------------------------------------------------------

def test_awslambdaric_response_is_one_payload_chunk_and_its_errors_are_invoke_complete(daemon_factory):
    proc = daemon_factory(RIC + ["handlers.echo"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="echo-fn")
    client = StreamClient(proc.url, "echo-fn", Payload=json.dumps({"hello": "stream"}).encode(), LogType="Tail")
    events = client.all_events()
    assert [list(e) for e in events] == [["PayloadChunk"], ["InvokeComplete"]]
    assert json.loads(events[0]["PayloadChunk"]["Payload"]) == {"hello": "stream"}
    tail = base64.b64decode(events[1]["InvokeComplete"]["LogResult"]).decode()
    assert "REPORT RequestId: " in tail
    assert "ErrorCode" not in events[1]["InvokeComplete"]

    proc = daemon_factory(RIC + ["handlers.fail"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="fail-fn")
    events = StreamClient(proc.url, "fail-fn").all_events()
    assert len(events) == 1
    complete = events[0]["InvokeComplete"]
    assert complete["ErrorCode"] == "ValueError" and complete["ErrorDetails"] == "boom"


def test_connection_is_reused_after_a_streamed_answer(daemon_factory):
    proc = daemon_factory(RIC + ["handlers.echo"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="echo-fn")
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
    try:
        for i in range(3):
            conn.request("POST", STREAM_PATH.format("echo-fn"), body=json.dumps({"i": i}).encode())
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
            buffer = EventStreamBuffer()
            buffer.add_data(response.read())  # http.client undoes the chunked coding
            messages = list(buffer)
            assert [m.headers[":event-type"] for m in messages] == ["PayloadChunk", "InvokeComplete"]
            assert json.loads(messages[0].payload) == {"i": i}
            conn.request("GET", "/_/health")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"OK")
    finally:
        conn.close()


def test_spawned_streaming_runtime_streams_with_gaps(daemon_factory):
    proc = daemon_factory(STREAMER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="streamer")
    event = {"chunks": ["a" * 10, "b" * 100_000, "c"], "gap": 0.3}
    started = time.monotonic()
    client = StreamClient(proc.url, "streamer", Payload=json.dumps(event).encode())
    first = client.next_event(timeout=30)
    first_at = time.monotonic() - started
    events = [first] + client.all_events()
    done_at = time.monotonic() - started
    assert payload_of(events) == ("a" * 10 + "b" * 100_000 + "c").encode()
    assert events[0] == {"PayloadChunk": {"Payload": b"a" * 10}}
    assert events[-1] == {"InvokeComplete": {}}
    # The first piece came before the runtime had waited its two gaps (0.6 s) to send the last one.
    assert done_at - first_at >= 0.45, (first_at, done_at)
    # Ordinary invoke of the same runtime: the streamed body arrives whole.
    status, _, body = proc.invoke(event, name="streamer")
    assert status == 200 and body == ("a" * 10 + "b" * 100_000 + "c").encode()


def test_runtime_that_exits_mid_stream_ends_the_stream_with_exit_error_at_once(daemon_factory):
    proc = daemon_factory(STREAMER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="streamer",
                          AWS_LAMBDA_FUNCTION_TIMEOUT=60)
    started = time.monotonic()
    client = StreamClient(proc.url, "streamer", Payload=json.dumps({"chunks": ["x"], "then": "exit"}).encode())
    events = client.all_events()
    assert time.monotonic() - started < 30  # at once, not after the 60 s timeout
    assert events[0] == {"PayloadChunk": {"Payload": b"x"}}
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "Runtime.ExitError"
    assert "Runtime exited with error: exit status 1" in complete["ErrorDetails"]
    # A fresh instance serves the next one.
    events = StreamClient(proc.url, "streamer", Payload=b'{"chunks": ["ok"]}').all_events()
    assert payload_of(events) == b"ok" and events[-1] == {"InvokeComplete": {}}


def test_runtime_that_stalls_mid_stream_times_out(daemon_factory):
    proc = daemon_factory(STREAMER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="streamer",
                          AWS_LAMBDA_FUNCTION_TIMEOUT=1)
    client = StreamClient(proc.url, "streamer", Payload=json.dumps({"chunks": ["x"], "then": "hang"}).encode())
    events = client.all_events()
    assert events[0] == {"PayloadChunk": {"Payload": b"x"}}
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "Sandbox.Timedout"
    assert complete["ErrorDetails"].endswith("Task timed out after 1.00 seconds")
    assert 'outcome="timeout"} 1' in proc.metrics()


def test_runtime_error_trailers_from_a_spawned_runtime(daemon_factory):
    proc = daemon_factory(STREAMER, cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="streamer")
    events = StreamClient(proc.url, "streamer",
                          Payload=json.dumps({"chunks": ["half"], "then": "error"}).encode()).all_events()
    assert payload_of(events) == b"half"
    assert events[-1] == {"InvokeComplete": {"ErrorCode": "Stream.Broke", "ErrorDetails": "midway"}}
    # The ordinary invoke of a stream that fails: a function error with the runtime's error body.
    status, headers, body = proc.invoke({"chunks": ["half"], "then": "error"}, name="streamer")
    assert status == 200 and headers["x-amz-function-error"] == "Unhandled"
    assert json.loads(body) == {"errorType": "Stream.Broke", "errorMessage": "midway"}


# ---- the same request checks as Invoke ---------------------------------------------------------

def test_streaming_route_applies_the_invoke_checks(daemon_factory):
    proc = daemon_factory(RIC + ["handlers.echo"], cwd=FUNCTIONS_DIR, AWS_LAMBDA_FUNCTION_NAME="echo-fn")
    client = lambda_client(proc.url)
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="other-fn")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="echo-fn", Qualifier="7")
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke_with_response_stream(FunctionName="echo-fn", Payload=b"not json")
    response = client.invoke_with_response_stream(FunctionName="echo-fn", InvocationType="DryRun")
    assert response["StatusCode"] == 204
    path = STREAM_PATH.format("echo-fn")
    status, headers, body = proc.request("POST", path, b"{}", {"X-Amz-Invocation-Type": "Event"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    assert UUID_RE.match(headers["x-amzn-requestid"])
    status, headers, _ = proc.request("GET", path)
    assert status == 405 and headers["allow"] == "POST"
    # Names the ordinary route accepts work here too: a full ARN with a qualifier.
    events = StreamClient(proc.url, "arn:aws:lambda:eu-west-1:111122223333:function:echo-fn:$LATEST",
                          Payload=b'{"n": 1}').all_events()
    assert json.loads(payload_of(events)) == {"n": 1}


def test_streaming_invoke_is_throttled_like_any_other(daemon_factory):
    proc = daemon_factory(["sleep", "300"], AWS_LAMBDA_FUNCTION_NAME="st-fn", MAX_CONCURRENCY=1,
                          MAX_QUEUED_INVOCATIONS=0, AWS_LAMBDA_INIT_TIMEOUT=120, AWS_LAMBDA_FUNCTION_TIMEOUT=60)
    runtime = HandRuntime(proc.runtime_port)
    first = StreamClient(proc.url, "st-fn")  # holds the only instance slot (a runtime that never starts)
    wait_until(lambda: metric(proc.metrics(), "lambda_queue_depth") == 1, 10, message="the first invoke queued")
    client = lambda_client(proc.url)
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke_with_response_stream(FunctionName="st-fn")
    # The first one is served by a runtime started by hand.
    _, headers, _ = runtime.next()
    stream = StreamingResponse(proc.runtime_port, headers["lambda-runtime-aws-request-id"])
    stream.send(b"served")
    stream.finish()
    assert payload_of(first.all_events()) == b"served"


# ---- the Node.js runtime client (aws-lambda-ric 3.x), which streams for real ------------------

NODE_HANDLER = """
export const handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
  responseStream.setContentType("text/plain");
  for (const part of event.parts || []) {
    responseStream.write(part);
    await new Promise((resolve) => setTimeout(resolve, event.gap || 0));
  }
  if (event.fail) {
    throw new TypeError("node broke mid-stream");
  }
  responseStream.end();
});
"""


@pytest.mark.timeout(900)
def test_node_streamify_response(request, daemon_factory, tmp_path):
    node = request.getfixturevalue("node_ric")  # installs aws-lambda-ric if needed (test_runtimes.py)
    (tmp_path / "stream.mjs").write_text(NODE_HANDLER)
    proc = daemon_factory([str(node), "stream.handler"], cwd=tmp_path, AWS_LAMBDA_FUNCTION_NAME="node-stream",
                          AWS_LAMBDA_INIT_TIMEOUT=60)
    event = {"parts": ["alpha ", "beta ", "gamma"], "gap": 400}
    started = time.monotonic()
    client = StreamClient(proc.url, "node-stream", Payload=json.dumps(event).encode())
    first = client.next_event(timeout=60)
    first_at = time.monotonic() - started
    events = [first] + client.all_events()
    assert time.monotonic() - started - first_at >= 0.6  # the rest came in the runtime's own time
    assert [e["PayloadChunk"]["Payload"] for e in events[:-1]] == [b"alpha ", b"beta ", b"gamma"]
    assert events[-1] == {"InvokeComplete": {}}

    events = StreamClient(proc.url, "node-stream",
                          Payload=json.dumps({"parts": ["some"], "fail": True}).encode()).all_events()
    assert payload_of(events) == b"some"
    assert events[-1] == {"InvokeComplete": {"ErrorCode": "TypeError", "ErrorDetails": "node broke mid-stream"}}
    # Invoked the ordinary way, the same streaming function answers whole.
    status, headers, body = proc.invoke({"parts": ["a", "b"]}, name="node-stream", timeout=60)
    assert (status, body) == (200, b"ab") and "x-amz-function-error" not in headers


@pytest.mark.timeout(600)
def test_streaming_on_the_pure_python_parser():
    """This file again with httptools and uvloop hidden (as the single-file build runs): the pure
    parser must hand over body pieces and trailers the same way."""
    root = FUNCTIONS_DIR.parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(root / "tools" / "pure-python")
    r = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                        "tests/test_streaming.py", "-k", "not pure_python and not node"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=580)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# ---- size and backpressure -------------------------------------------------------------------

MB = 1024 * 1024


def rss_of(pid: int) -> int:
    """Resident set size of a process, in bytes (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class EventStreamReader:
    """A response-streaming invoke read from a raw socket: the chunked coding undone, the event
    stream walked by its message lengths (cheap enough for 200 MB), payload bytes counted."""

    def __init__(self, port: int, name: str, payload: bytes = b"{}", rcvbuf: int = 64 * 1024) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                          % (STREAM_PATH.format(name).encode(), len(payload), payload))
        self.raw = bytearray()  # received, not yet de-chunked
        self.events = bytearray()  # de-chunked event stream, not yet walked
        self.payload_bytes = 0
        self.complete = None  # InvokeComplete's JSON
        self.head = b""

    def read(self, size: int) -> bool:
        """Read up to ``size`` bytes; False once the stream is over."""
        data = self.sock.recv(size)
        if not data:
            return False
        self.raw += data
        if not self.head:
            if b"\r\n\r\n" not in self.raw:
                return True
            self.head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
            self.raw = bytearray(rest)
        ended = False
        while True:  # undo the chunked coding
            end = self.raw.find(b"\r\n")
            if end < 0:
                break
            size_of = int(self.raw[:end], 16)
            if len(self.raw) < end + 2 + size_of + 2:
                break
            ended = size_of == 0
            self.events += self.raw[end + 2:end + 2 + size_of]
            del self.raw[:end + 2 + size_of + 2]
            if ended:
                break
        while len(self.events) >= 12:  # walk the event stream
            total, headers_length = struct.unpack(">II", self.events[:8])
            if len(self.events) < total:
                break
            message = bytes(self.events[:total])
            del self.events[:total]
            payload = message[12 + headers_length:-4]
            if b"InvokeComplete" in message[12:12 + headers_length]:
                self.complete = json.loads(payload)
            else:
                self.payload_bytes += len(payload)
        return not ended

    def read_to_end(self) -> None:
        while self.read(1 << 20):
            pass
        self.sock.close()


def stream_in_background(port: int, request_id: str, total: int, piece: int = 256 * 1024) -> dict:
    """The runtime's side: ``total`` bytes streamed in pieces from a thread; its result in the dict."""
    out: dict = {}

    def run() -> None:
        stream = StreamingResponse(port, request_id)
        stream.sock.settimeout(60)
        block = bytes(range(256)) * (piece // 256)
        sent = 0
        while sent < total:
            n = min(piece, total - sent)
            stream.send(block[:n])
            sent += n
        out["reply"] = stream.finish()

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_a_slow_reader_makes_the_daemon_read_the_stream_slower_not_buffer_it(hand):
    """150 MB streamed to a caller that reads about 1 MB/s for 5 s, then fast: while the caller's
    socket is full the daemon stops reading the runtime's /response, so its memory stays flat."""
    proc, runtime = hand
    pid = proc.proc.pid
    total = 150 * MB
    reader = EventStreamReader(proc.port, "st-fn")
    _, headers, _ = runtime.next()
    idle = rss_of(pid)
    sender = stream_in_background(proc.runtime_port, headers["lambda-runtime-aws-request-id"], total)
    peak = idle
    slow_until = time.monotonic() + 5
    while time.monotonic() < slow_until:  # ~1 MB/s: 64 KiB every 1/16 s
        assert reader.read(64 * 1024)
        peak = max(peak, rss_of(pid))
        time.sleep(1 / 16)
    assert reader.payload_bytes < 10 * MB  # it really was slow
    while reader.read(1 << 20):
        peak = max(peak, rss_of(pid))
    sender["thread"].join(30)
    assert sender["reply"].startswith(b"HTTP/1.1 202"), sender["reply"]
    assert reader.payload_bytes == total and reader.complete == {}
    assert peak - idle < 8 * MB, f"the daemon grew by {(peak - idle) / MB:.1f} MB while streaming"
    print(f"daemon RSS: {idle / MB:.1f} MB idle, {peak / MB:.1f} MB at most while streaming")


def test_streams_up_to_200_mb_and_past_that_response_size_too_large(hand):
    proc, runtime = hand
    limit = 200 * MB
    assert limit == 209_715_200
    for total, expected in ((limit, {}), (limit + 1, None)):
        reader = EventStreamReader(proc.port, "st-fn")
        _, headers, _ = runtime.next()
        sender = stream_in_background(proc.runtime_port, headers["lambda-runtime-aws-request-id"], total,
                                      piece=1 * MB)
        reader.read_to_end()
        sender["thread"].join(60)
        if expected is not None:
            assert reader.payload_bytes == total and reader.complete == expected
            assert sender["reply"].startswith(b"HTTP/1.1 202"), sender["reply"]
        else:
            assert reader.complete == {
                "ErrorCode": "Function.ResponseSizeTooLarge",
                "ErrorDetails": "Response payload size exceeded maximum allowed payload size (209715200 bytes)."}
            assert reader.payload_bytes <= limit
            reply = sender["reply"]
            assert reply.startswith(b"HTTP/1.1 413") and b"(209715200 bytes)" in reply, reply
