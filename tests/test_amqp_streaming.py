"""Response streaming through the broker: InvokeWithResponseStream -> lambda-server -> RabbitMQ ->
daemon -> a streaming runtime, and back piece by piece (docs/amqp.md, "Response streaming").

Real processes and the real broker on 127.0.0.1:5672, a function (queue) name per test. Runtimes:
``functions/streaming_runtime.py`` (hand-written, streams what the event says), the Node.js
runtime client's ``awslambda.streamifyResponse``, awslambdaric (which does not stream), and a
runtime played by the test on the daemon's Runtime API port. Clients: boto3's
``invoke_with_response_stream`` against the lambda-server, pika as a non-streaming AMQP-RPC
client, aio-pika sending the streaming header itself. The lambda-server's handling of what the
real daemon cannot be made to send on demand (pieces out of order, repeats, a second run, gaps, a
daemon that does not stream) is checked against replies a test publishes by hand, on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import aio_pika
import pika
import pytest

from amqp_support import (
    BROKER,
    BrokerPath,
    RpcClient,
    amqp_daemon,
    consumers,
    metric,
    queues_deleted,
    require_broker,  # noqa: F401  (autouse: fail clearly when RabbitMQ is not running)
    start_server,
    unique_name,
    wait_consumers,
)
from conftest import wait_until
from lambda_rapid import errors
from lambda_rapid.invoke import eventstream
from support import UUID_RE, lambda_client
from test_runtime_api import HandRuntime
from test_runtimes import node_ric  # noqa: F401  (a fixture)
from test_streaming import NODE_HANDLER, STREAMER, StreamClient, StreamingResponse, payload_of

STREAM_PATH = "/2021-11-15/functions/{}/response-streaming-invocations"
STREAM_HEADER = {"X-Amz-Invoke-Mode": "RESPONSE_STREAM"}


@pytest.fixture
def server_factory():
    started: list = []

    def factory(**kwargs):
        proc = start_server(**kwargs)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture(autouse=True)
def _delete_queues():
    with queues_deleted():
        yield


def event(**kw) -> bytes:
    return json.dumps(kw).encode()


def timed_events(client: StreamClient, timeout: float = 60.0) -> list:
    """(seconds since now, event) for each event of ``client`` until its stream ends."""
    start = time.monotonic()
    out = []
    while True:
        item = client.next_event(timeout)
        if item is None:
            assert not client.error, client.error
            return out
        out.append((time.monotonic() - start, item))


def runtime_pids(daemon) -> list:
    """The daemon's direct children (its runtime instances, each leading its own process group)."""
    pid = daemon.proc.pid
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def kill_daemon(daemon) -> None:
    """SIGKILL the daemon (no goodbye to the broker but the TCP close), then its orphaned runtimes."""
    children = runtime_pids(daemon)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    for child in children:
        try:
            os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---- boto3 through the lambda-server ----------------------------------------------------------

def test_pieces_reach_boto3_through_the_broker_as_the_runtime_streams_them(daemon_factory, server_factory):
    name = unique_name("st-order")
    amqp_daemon(daemon_factory, name, command=STREAMER)
    server = server_factory()
    client = StreamClient(server.url, name, Payload=event(chunks=["one ", "two ", "three"], gap=0.6))
    timed = timed_events(client)
    events = [e for _, e in timed]
    assert events == [{"PayloadChunk": {"Payload": b"one "}}, {"PayloadChunk": {"Payload": b"two "}},
                      {"PayloadChunk": {"Payload": b"three"}}, {"InvokeComplete": {}}]
    first_at, last_at = timed[0][0], timed[2][0]
    print(f"\nstreaming_runtime via lambda-server: first chunk {first_at * 1000:.0f} ms, "
          f"last chunk {last_at * 1000:.0f} ms (runtime gaps 2 x 600 ms)")
    # The first piece came before the runtime had waited its two gaps to send the last one.
    assert last_at - first_at >= 1.0, timed
    response = client.response
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert response["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
    assert UUID_RE.match(response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"])
    assert metric(server, 'lambda_server_requests_total{outcome="success"}') == 1
    assert metric(server, "lambda_server_in_flight") == 0


def test_large_pieces_arrive_whole_and_in_order(daemon_factory, server_factory):
    """Pieces bigger than one AMQP message are split, and a fast runtime's pieces may be joined:
    the bytes arrive as they were, in order."""
    name = unique_name("st-big")
    amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    server = server_factory()
    chunks = ["a" * 10, "b" * 1_500_000, "c" * 3, "d" * 2_500_000, "e"]
    events = StreamClient(server.url, name, Payload=event(chunks=chunks)).all_events(60)
    assert payload_of(events) == "".join(chunks).encode()
    assert events[-1] == {"InvokeComplete": {}}
    assert all(len(e["PayloadChunk"]["Payload"]) <= eventstream.PIECE_LIMIT for e in events[:-1])


@pytest.mark.timeout(900)
def test_node_streamify_response_through_the_lambda_server(request, daemon_factory, server_factory, tmp_path):
    node = request.getfixturevalue("node_ric")
    (tmp_path / "stream.mjs").write_text(NODE_HANDLER)
    name = unique_name("st-node")
    amqp_daemon(daemon_factory, name, command=[str(node), "stream.handler"], cwd=tmp_path,
                AWS_LAMBDA_INIT_TIMEOUT=60, AWS_LAMBDA_FUNCTION_TIMEOUT=30)
    server = server_factory()
    client = StreamClient(server.url, name, Payload=event(parts=["alpha ", "beta ", "gamma"], gap=500))
    timed = timed_events(client)
    events = [e for _, e in timed]
    assert [e["PayloadChunk"]["Payload"] for e in events[:-1]] == [b"alpha ", b"beta ", b"gamma"]
    assert events[-1] == {"InvokeComplete": {}}
    first_at, last_at = timed[0][0], timed[-2][0]
    print(f"\nNode.js streamifyResponse via lambda-server: first chunk {first_at * 1000:.0f} ms, "
          f"last chunk {last_at * 1000:.0f} ms (handler gaps 2 x 500 ms)")
    assert last_at - first_at >= 0.8, timed

    events = StreamClient(server.url, name, Payload=event(parts=["some"], fail=True)).all_events()
    assert payload_of(events) == b"some"
    assert events[-1] == {"InvokeComplete": {"ErrorCode": "TypeError", "ErrorDetails": "node broke mid-stream"}}
    # The same function invoked the ordinary way through the lambda-server: one joined answer.
    response = lambda_client(server.url).invoke(FunctionName=name, Payload=event(parts=["a", "b"]))
    assert response["Payload"].read() == b"ab" and "FunctionError" not in response


def test_runtime_that_does_not_stream_gives_one_payload_chunk(daemon_factory, server_factory):
    name = unique_name("st-echo")
    amqp_daemon(daemon_factory, name)
    fail = unique_name("st-fail")
    amqp_daemon(daemon_factory, fail, "handlers.fail")
    server = server_factory()
    events = StreamClient(server.url, name, Payload=event(hello="stream"), LogType="Tail").all_events()
    assert [list(e) for e in events] == [["PayloadChunk"], ["InvokeComplete"]]
    assert json.loads(events[0]["PayloadChunk"]["Payload"]) == {"hello": "stream"}
    complete = events[1]["InvokeComplete"]
    assert "ErrorCode" not in complete
    assert "REPORT RequestId: " in base64.b64decode(complete["LogResult"]).decode()

    events = StreamClient(server.url, fail).all_events()
    assert events == [{"InvokeComplete": {"ErrorCode": "ValueError", "ErrorDetails": "boom"}}]
    assert metric(server, 'lambda_server_requests_total{outcome="function_error"}') == 1


def test_function_error_mid_stream_ends_with_its_error_code(daemon_factory, server_factory):
    name = unique_name("st-err")
    amqp_daemon(daemon_factory, name, command=STREAMER)
    server = server_factory()
    events = StreamClient(server.url, name, Payload=event(chunks=["half"], then="error"), LogType="Tail").all_events()
    assert payload_of(events) == b"half"
    complete = events[-1]["InvokeComplete"]
    assert (complete["ErrorCode"], complete["ErrorDetails"]) == ("Stream.Broke", "midway")
    assert "streaming runtime handles" in base64.b64decode(complete["LogResult"]).decode()


def test_runtime_crash_and_timeout_mid_stream_end_with_error_events(daemon_factory, server_factory):
    name = unique_name("st-crash")
    amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=1)
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=120)
    events = StreamClient(server.url, name, Payload=event(chunks=["x"], then="exit")).all_events()
    assert events[0] == {"PayloadChunk": {"Payload": b"x"}}
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "Runtime.ExitError"
    assert "Runtime exited with error: exit status 1" in complete["ErrorDetails"]

    events = StreamClient(server.url, name, Payload=event(chunks=["y"], then="hang")).all_events()
    assert events[0] == {"PayloadChunk": {"Payload": b"y"}}
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "Sandbox.Timedout"  # the daemon's timeout, relayed
    assert complete["ErrorDetails"].endswith("Task timed out after 1.00 seconds")
    # A fresh instance streams the next one.
    events = StreamClient(server.url, name, Payload=event(chunks=["ok"])).all_events()
    assert payload_of(events) == b"ok" and events[-1] == {"InvokeComplete": {}}


def test_daemon_killed_mid_stream_ends_the_stream_by_the_function_deadline(daemon_factory, server_factory):
    name = unique_name("st-kill")
    daemon = amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=3)
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=300)  # the fail-safe is not what ends it
    client = StreamClient(server.url, name, Payload=event(chunks=["x"], then="hang"))
    assert client.next_event(30) == {"PayloadChunk": {"Payload": b"x"}}
    killed_at = time.monotonic()
    kill_daemon(daemon)
    events = client.all_events(60)
    waited = time.monotonic() - killed_at
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "ServiceException"
    assert "of the function's deadline" in complete["ErrorDetails"], complete
    assert waited < 60, waited  # bounded by the 3 s deadline plus the grace, not the 300 s fail-safe
    assert metric(server, 'lambda_server_requests_total{outcome="stream_cut"}') == 1
    assert metric(server, "lambda_server_in_flight") == 0


def test_daemon_killed_mid_stream_with_another_daemon_on_the_queue(daemon_factory, server_factory):
    """The broker hands the request to the other daemon, which runs it again: the stream, already
    half sent from the first run, ends with an error event when the second run's first piece comes."""
    name = unique_name("st-kill2")
    daemons = [amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=5)
               for _ in range(2)]
    wait_consumers(name, 2)
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=300)
    client = StreamClient(server.url, name, Payload=event(chunks=["x"], then="hang"))
    assert client.next_event(30) == {"PayloadChunk": {"Payload": b"x"}}
    first = next(d for d in daemons if "streaming runtime handles" in d.stdout)
    kill_daemon(first)
    events = client.all_events(30)
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "ServiceException"
    assert "ran again" in complete["ErrorDetails"], complete
    other = next(d for d in daemons if d is not first)
    assert "streaming runtime handles" in other.stdout


def test_daemon_connection_cut_mid_stream_the_stream_goes_on(daemon_factory, server_factory):
    """The daemon's broker connection drops between two pieces: the piece it could not publish
    goes out after it reconnected, the caller gets every piece once and in order, and the request
    the broker redelivers to it is not run a second time."""
    name = unique_name("st-cut")
    with BrokerPath() as path:
        daemon = amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=60,
                             AMQP_URI=path.uri())
        server = server_factory()
        client = StreamClient(server.url, name, Payload=event(chunks=["p0 ", "p1 ", "p2 ", "p3"], gap=1.0))
        assert client.next_event(30) == {"PayloadChunk": {"Payload": b"p0 "}}
        path.cut()
        wait_until(lambda: consumers(name) == 0, 15, message="the broker saw the daemon go")
        wait_until(lambda: "waits: no AMQP connection" in daemon.stderr or "not confirmed" in daemon.stderr, 15,
                   message="a piece the daemon could not publish")
        path.restore()
        events = client.all_events(60)
    assert payload_of(events) == b"p1 p2 p3"
    assert events[-1] == {"InvokeComplete": {}}
    rid = client.response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    wait_until(lambda: "not run again" in daemon.stderr, 15, message="the redelivered request answered from its run")
    assert daemon.stdout.count(f"streaming runtime handles {rid}") == 1


def test_broker_lost_by_the_lambda_server_mid_stream(daemon_factory, server_factory):
    name = unique_name("st-srvcut")
    amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=4)
    with BrokerPath() as path:
        server = server_factory(AMQP_URI=path.uri())
        client = StreamClient(server.url, name, Payload=event(chunks=["a"], then="hang"))
        assert client.next_event(30) == {"PayloadChunk": {"Payload": b"a"}}
        path.cut()
        events = client.all_events(30)
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "ServiceException"
    assert "message broker was lost mid-stream" in complete["ErrorDetails"]
    assert metric(server, 'lambda_server_requests_total{outcome="broker_lost"}') == 1


def test_stream_over_the_limit_is_cut_by_the_daemon(daemon_factory, server_factory):
    """The runtime streams past the streamed response limit: what the caller gets ends with
    Function.ResponseSizeTooLarge (the daemon stops reading at the limit)."""
    name = unique_name("st-size")
    daemon = amqp_daemon(daemon_factory, name, command=["sleep", "300"], AWS_LAMBDA_INIT_TIMEOUT=300,
                         AWS_LAMBDA_FUNCTION_TIMEOUT=300)
    server = server_factory()
    runtime = HandRuntime(daemon.runtime_port)
    client = StreamClient(server.url, name)
    _, headers, _ = runtime.next()
    stream = StreamingResponse(daemon.runtime_port, headers["lambda-runtime-aws-request-id"])
    piece = b"z" * (1 << 20)
    sent = 0
    received = 0
    try:
        while sent <= errors.STREAM_RESPONSE_LIMIT:
            stream.send(piece)
            sent += len(piece)
            while not client.events.empty():  # keep the reader going: boto3 holds what it read
                item = client.events.get()
                assert item is not None and "PayloadChunk" in item, item
                received += len(item["PayloadChunk"]["Payload"])
        stream.finish()
    except OSError:
        pass  # the daemon answered 413 and closed the runtime's connection
    last = None
    while True:
        item = client.next_event(120)
        if item is None:
            break
        if "PayloadChunk" in item:
            received += len(item["PayloadChunk"]["Payload"])
        last = item
    assert not client.error, client.error
    assert last["InvokeComplete"]["ErrorCode"] == "Function.ResponseSizeTooLarge"
    assert received <= errors.STREAM_RESPONSE_LIMIT


def test_lambda_server_stopped_mid_stream(daemon_factory, server_factory):
    """SIGTERM: the stream gets the shutdown grace (here the 2 s fail-safe), then an error event;
    the lambda-server exits 0."""
    name = unique_name("st-stop")
    amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=6, MIN_INSTANCES=1)
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=2)
    client = StreamClient(server.url, name, Payload=event(chunks=["a"], then="hang"))
    assert client.next_event(30) == {"PayloadChunk": {"Payload": b"a"}}
    server.signal(signal.SIGTERM)
    events = client.all_events(30)
    assert events[-1] == {"InvokeComplete": {"ErrorCode": "ServiceException",
                                             "ErrorDetails": "lambda-server is shutting down."}}
    assert server.wait(15) == 0


# ---- the Invoke checks on the streaming route of the lambda-server ----------------------------

def test_streaming_route_checks_and_refusals(daemon_factory, server_factory):
    name = unique_name("st-checks")
    amqp_daemon(daemon_factory, name)
    server = server_factory()
    lam = lambda_client(server.url)
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke_with_response_stream(FunctionName=unique_name("st-nobody"))
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke_with_response_stream(FunctionName=name, Qualifier="7")  # the daemon's refusal, relayed
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke_with_response_stream(FunctionName=name, Payload=b"not json")
    assert lam.invoke_with_response_stream(FunctionName=name, InvocationType="DryRun")["StatusCode"] == 204
    path = STREAM_PATH.format(name)
    status, headers, _ = server.request("POST", path, b"{}", {"X-Amz-Invocation-Type": "Event"})
    assert status == 400 and headers["x-amzn-errortype"] == "InvalidParameterValueException"
    status, headers, _ = server.request("GET", path)
    assert status == 405 and headers["allow"] == "POST"
    events = StreamClient(server.url, f"arn:aws:lambda:eu-west-1:111122223333:function:{name}:$LATEST",
                          Payload=b'{"n": 1}').all_events()
    assert json.loads(payload_of(events)) == {"n": 1}


def test_throttled_streaming_invoke_is_a_429(daemon_factory, server_factory):
    name = unique_name("st-429")
    amqp_daemon(daemon_factory, name, command=STREAMER, MAX_CONCURRENCY=1, MAX_QUEUED_INVOCATIONS=0,
                AWS_LAMBDA_FUNCTION_TIMEOUT=4)
    server = server_factory()
    busy = StreamClient(server.url, name, Payload=event(chunks=["busy"], then="hang"))
    assert busy.next_event(30) == {"PayloadChunk": {"Payload": b"busy"}}
    lam = lambda_client(server.url)
    with pytest.raises(lam.exceptions.TooManyRequestsException):
        lam.invoke_with_response_stream(FunctionName=name)
    assert busy.all_events()[-1]["InvokeComplete"]["ErrorCode"] == "Sandbox.Timedout"


def test_fail_safe_timeout_before_anything_streams(server_factory):
    """A queue that nobody consumes: the lambda-server's fail-safe ends the stream as a timeout."""
    name = unique_name("st-idle")
    declare_queue(name)
    try:
        server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=1)
        events = StreamClient(server.url, name).all_events(30)
    finally:
        delete(name)
    complete = events[-1]["InvokeComplete"]
    assert complete["ErrorCode"] == "Sandbox.Timedout"
    assert complete["ErrorDetails"].endswith("Task timed out after 1.00 seconds")
    assert metric(server, 'lambda_server_requests_total{outcome="timeout"}') == 1


# ---- AMQP-RPC clients -------------------------------------------------------------------------

def test_non_streaming_amqp_client_gets_one_joined_reply(daemon_factory):
    name = unique_name("st-pika")
    amqp_daemon(daemon_factory, name, command=STREAMER)
    with RpcClient() as rpc:
        props, body = rpc.call(name, event(chunks=["a", "b", "c"], gap=0.1))
        assert body == b"abc"
        assert props.content_type == "application/json"
        assert "X-Amz-Function-Error" not in props.headers
        assert not any(k.startswith("X-Stream-") for k in props.headers)
        props, body = rpc.call(name, event(chunks=["half"], then="error"))
        assert props.headers["X-Amz-Function-Error"] == "Unhandled"
        assert json.loads(body) == {"errorType": "Stream.Broke", "errorMessage": "midway"}
        props, body = rpc.call(name, b"{}", {"X-Amz-Invoke-Mode": "BUFFERED"})
        assert body == b""  # no chunks: an empty streamed response
        props, body = rpc.call(name, b"{}", {"X-Amz-Invoke-Mode": "SIDEWAYS"})
        assert props.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
        props, body = rpc.call(name, b"{}", {**STREAM_HEADER, "X-Amz-Invocation-Type": "Event"})
        assert props.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"


async def _stream_over_amqp(queue: str, payload: bytes, headers: dict, timeout: float = 30.0) -> list:
    """Publish one request with aio-pika and collect (seconds, message) of its replies until the
    InvokeComplete message (or an ordinary reply)."""
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel()
        replies = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        got: asyncio.Queue = asyncio.Queue()

        async def on_reply(message) -> None:
            got.put_nowait((time.monotonic(), message))

        await replies.consume(on_reply, no_ack=True)
        cid = str(uuid.uuid4())
        start = time.monotonic()
        await channel.default_exchange.publish(
            aio_pika.Message(payload, correlation_id=cid, reply_to="amq.rabbitmq.reply-to", headers=headers),
            routing_key=queue)
        out = []
        while True:
            at, message = await asyncio.wait_for(got.get(), timeout)
            assert message.correlation_id == cid
            out.append((at - start, message))
            if message.headers.get(eventstream.EVENT, eventstream.INVOKE_COMPLETE) == eventstream.INVOKE_COMPLETE:
                return out
    finally:
        await connection.close()


def test_aio_pika_client_with_the_streaming_header_gets_numbered_pieces(daemon_factory):
    name = unique_name("st-aiopika")
    amqp_daemon(daemon_factory, name, command=STREAMER, AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    timed = asyncio.run(_stream_over_amqp(name, event(chunks=["first", "second", "third"], gap=0.5), STREAM_HEADER))
    messages = [m for _, m in timed]
    assert [m.body for m in messages[:-1]] == [b"first", b"second", b"third"]
    assert [m.headers[eventstream.SEQUENCE] for m in messages] == [0, 1, 2, 3]
    assert [m.headers[eventstream.EVENT] for m in messages] == ["PayloadChunk"] * 3 + ["InvokeComplete"]
    assert len({m.headers[eventstream.RUN] for m in messages}) == 1
    assert all(m.content_type == "application/octet-stream" for m in messages[:-1])
    head = messages[0].headers
    assert UUID_RE.match(head["x-amzn-RequestId"]) and head["X-Amz-Executed-Version"] == "$LATEST"
    assert 0 < head[eventstream.DEADLINE_IN_MS] <= 10_000
    final = messages[-1]
    assert final.content_type == "application/json" and json.loads(final.body) == {}
    assert "X-Amz-Function-Error" not in final.headers
    assert timed[2][0] - timed[0][0] >= 0.8  # each piece as the runtime sent it, not all at the end

    timed = asyncio.run(_stream_over_amqp(name, event(chunks=["x"], then="error"),
                                          {**STREAM_HEADER, "X-Amz-Log-Type": "Tail"}))
    final = timed[-1][1]
    assert final.headers["X-Amz-Function-Error"] == "Unhandled"
    document = json.loads(final.body)
    assert (document["ErrorCode"], document["ErrorDetails"]) == ("Stream.Broke", "midway")
    assert document["LogResult"] == final.headers["X-Amz-Log-Result"]
    # A refusal is an ordinary reply (no stream headers), as for any request.
    timed = asyncio.run(_stream_over_amqp(name, b"{}", {**STREAM_HEADER, "X-Amz-Qualifier": "9"}))
    assert len(timed) == 1
    assert timed[0][1].headers["x-amzn-ErrorType"] == "ResourceNotFoundException"


# ---- the lambda-server against replies published by hand ------------------------------------

def declare_queue(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    try:
        conn.channel().queue_declare(name, auto_delete=False)
    finally:
        conn.close()


def delete(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    try:
        conn.channel().queue_delete(name)
    finally:
        conn.close()


class HandDaemon:
    """A queue of the test's own where it takes the lambda-server's request and answers it with
    messages it writes itself (the wire format of docs/amqp.md, or deliberately not)."""

    def __init__(self) -> None:
        self.name = unique_name("st-hand")
        self.conn = pika.BlockingConnection(pika.URLParameters(BROKER))
        self.channel = self.conn.channel()
        self.channel.queue_declare(self.name, auto_delete=False)
        self.props = None

    def take(self, timeout: float = 15.0):
        """The next request (its properties and body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.name, auto_ack=True)
            if method is not None:
                self.props = props
                return props, body
            self.conn.process_data_events(0.02)
        raise AssertionError("no request reached the queue")

    def send(self, body: bytes = b"", seq=None, run: str = "run-1", final: bool = False, **headers) -> None:
        if seq is not None:
            headers[eventstream.SEQUENCE] = seq
            headers[eventstream.RUN] = run
            headers[eventstream.EVENT] = eventstream.INVOKE_COMPLETE if final else eventstream.PAYLOAD_CHUNK
        props = pika.BasicProperties(correlation_id=self.props.correlation_id, headers=headers)
        self.channel.basic_publish("", self.props.reply_to, body, props)

    def close(self) -> None:
        try:
            self.channel.queue_delete(self.name)
        finally:
            self.conn.close()


@pytest.fixture
def hand_daemon():
    daemon = HandDaemon()
    yield daemon
    daemon.close()


def test_request_published_with_the_streaming_header(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name, Payload=b'{"k": 1}', LogType="Tail")
    props, body = hand_daemon.take()
    assert body == b'{"k": 1}'
    assert props.headers["X-Amz-Invoke-Mode"] == "RESPONSE_STREAM"
    assert props.headers["X-Amz-Log-Type"] == "Tail"
    assert props.reply_to.startswith("amq.rabbitmq.reply-to")
    hand_daemon.send(b"", seq=0, final=True, **{"X-Amz-Log-Result": "bG9n"})
    assert client.all_events() == [{"InvokeComplete": {}}]  # the document's LogResult, not the header's


def test_out_of_order_and_repeated_pieces_are_put_back_in_order(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b"two", seq=2)
    hand_daemon.send(b"zero", seq=0, **{"x-amzn-RequestId": hand_daemon.props.correlation_id})
    assert client.next_event() == {"PayloadChunk": {"Payload": b"zero"}}
    hand_daemon.send(b"zero", seq=0)  # a repeat (published again after a reconnect)
    hand_daemon.send(b'{"LogResult": "bG9n"}', seq=4, final=True)
    hand_daemon.send(b"one", seq=1)
    hand_daemon.send(b"three", seq=3)
    events = client.all_events()
    assert [e["PayloadChunk"]["Payload"] for e in events[:-1]] == [b"one", b"two", b"three"]
    assert events[-1] == {"InvokeComplete": {"LogResult": "bG9n"}}


def test_a_second_run_before_any_piece_went_out_replaces_the_first(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b"old one", seq=1, run="run-1")  # early: waits for its piece 0, which never comes
    hand_daemon.send(b"new zero", seq=0, run="run-2")
    hand_daemon.send(b"old zero", seq=0, run="run-1")  # the left run is ignored from now on
    hand_daemon.send(b"", seq=1, run="run-2", final=True)
    events = client.all_events()
    assert events == [{"PayloadChunk": {"Payload": b"new zero"}}, {"InvokeComplete": {}}]


def test_a_second_run_after_pieces_went_out_cuts_the_stream(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b"first run", seq=0, run="run-1")
    assert client.next_event() == {"PayloadChunk": {"Payload": b"first run"}}
    hand_daemon.send(b"second run", seq=0, run="run-2")
    events = client.all_events()
    assert events[-1]["InvokeComplete"]["ErrorCode"] == "ServiceException"
    assert "ran again" in events[-1]["InvokeComplete"]["ErrorDetails"]
    assert metric(server, 'lambda_server_requests_total{outcome="stream_cut"}') == 1


def test_ordinary_replies_to_a_streaming_invoke(server_factory, hand_daemon):
    """A daemon that does not stream (the Go daemon, an older one) answers with one reply."""
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b'{"whole": true}', **{"X-Amz-Log-Result": "bG9n", "X-Amz-Executed-Version": "$LATEST"})
    assert client.all_events() == [{"PayloadChunk": {"Payload": b'{"whole": true}'}},
                                   {"InvokeComplete": {"LogResult": "bG9n"}}]

    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b'{"errorType": "Oops", "errorMessage": "whole error"}', **{"X-Amz-Function-Error": "Unhandled"})
    assert client.all_events() == [{"InvokeComplete": {"ErrorCode": "Oops", "ErrorDetails": "whole error"}}]

    lam = lambda_client(server.url)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(e=_raises(lambda: lam.invoke_with_response_stream(
        FunctionName=hand_daemon.name))), daemon=True)
    thread.start()
    hand_daemon.take()
    hand_daemon.send(errors.throttled_body(), **{"x-amzn-ErrorType": "TooManyRequestsException", "Retry-After": "3"})
    thread.join(30)
    assert type(box["e"]).__name__ == "TooManyRequestsException"
    assert box["e"].response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "3"


def _raises(call):
    try:
        call()
    except Exception as e:
        return e
    return None


def test_silence_without_a_deadline_is_bounded_by_the_fail_safe(server_factory, hand_daemon):
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=2)
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b"then nothing", seq=0)  # no deadline header
    events = client.all_events(30)
    assert events[0] == {"PayloadChunk": {"Payload": b"then nothing"}}
    assert "sent nothing for 2 s" in events[-1]["InvokeComplete"]["ErrorDetails"]


def test_deadline_bound_and_bad_messages(server_factory, hand_daemon):
    server = server_factory(AWS_LAMBDA_FUNCTION_TIMEOUT=300)
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    hand_daemon.send(b"bad", seq="zero")  # not a number: ignored
    hand_daemon.send(b"start", seq=0, **{eventstream.DEADLINE_IN_MS: 500})
    assert client.next_event() == {"PayloadChunk": {"Payload": b"start"}}
    events = client.all_events(60)
    assert "of the function's deadline" in events[-1]["InvokeComplete"]["ErrorDetails"]


def test_a_gap_that_never_fills_cuts_the_stream(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    for seq in range(1, eventstream.HELD_LIMIT + 2):
        hand_daemon.send(b"late", seq=seq)
    events = client.all_events()
    assert events == [{"InvokeComplete": {"ErrorCode": "ServiceException", "ErrorDetails":
                                          "Pieces of the streamed response went missing; the stream is cut."}}]


def test_stream_over_the_limit_is_cut_by_the_lambda_server(server_factory, hand_daemon):
    server = server_factory()
    client = StreamClient(server.url, hand_daemon.name)
    hand_daemon.take()
    piece = b"q" * eventstream.PIECE_LIMIT
    pieces = errors.STREAM_RESPONSE_LIMIT // len(piece) + 1
    received = 0
    for seq in range(pieces):
        hand_daemon.send(piece, seq=seq)
        while not client.events.empty():
            item = client.events.get()
            assert item is not None
            if "PayloadChunk" in item:
                received += len(item["PayloadChunk"]["Payload"])
    events = client.all_events(60)
    received += len(payload_of(events))
    assert received <= errors.STREAM_RESPONSE_LIMIT
    assert events[-1]["InvokeComplete"]["ErrorCode"] == "Function.ResponseSizeTooLarge"


# ---- the resequencing rule, in-process -----------------------------------------------------------

def test_resequencer_rules():
    order = eventstream.Resequencer()
    assert order.accept("a", 1, "a1") == []
    assert order.accept("a", 0, "a0") == ["a0", "a1"]
    assert order.accept("a", 1, "again") == []
    assert order.accept("a", 3, "a3") == []
    assert order.accept("a", 3, "a3 again") == []
    assert order.accept("a", 2, "a2") == ["a2", "a3"]
    assert order.accept("b", 0, "b0") is eventstream.RERUN

    order = eventstream.Resequencer()
    assert order.accept("a", 2, "a2") == []
    assert order.accept("b", 0, "b0") == ["b0"]  # nothing of a went out: b is followed
    assert order.accept("a", 0, "a0") == []  # a was left
    assert order.accept("b", 1, "b1") == ["b1"]

    order = eventstream.Resequencer()
    for seq in range(1, eventstream.HELD_LIMIT + 1):
        assert order.accept("a", seq, seq) == []
    assert order.accept("a", eventstream.HELD_LIMIT + 1, 0) is eventstream.OVERFLOW


def test_pieces_are_joined_and_split_at_the_message_limit():
    from lambda_rapid.invoke.amqp_rpc import ResponseStream

    limit = eventstream.PIECE_LIMIT
    stream = ResponseStream.__new__(ResponseStream)  # only its queue of pieces is used here
    stream.parts = [b"a" * 10, b"b" * (limit - 20), b"c" * 30, b"d" * (2 * limit + 5)]
    taken = []
    while stream.parts:
        taken.append(stream._take())
    assert [len(t) for t in taken] == [limit, limit, limit, 25]
    assert taken[0] == b"a" * 10 + b"b" * (limit - 20) + b"c" * 10
    assert b"".join(taken) == b"a" * 10 + b"b" * (limit - 20) + b"c" * 30 + b"d" * (2 * limit + 5)
