"""The HTTP layer on an in-memory transport: framing, pipelining order, limits, bad input, draining,
flow control; and on real sockets. Everything runs on both parser backends, httptools and h11 (the
single-file build's), and the two must answer every input of this file byte for byte the same:
requests asking for a protocol upgrade are served as plain HTTP/1.1 (curl --http2 asks for h2c),
HEAD answers carry no body, ``Expect: 100-continue`` is answered."""

from __future__ import annotations

import asyncio
import re
import select
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest

from conftest import FUNCTIONS_DIR, RIC
from lambda_rapid.http import h11_parser
from lambda_rapid.http import server as httpserver

try:
    import httptools
except ImportError:  # hidden by tools/pure-python: only the h11 backend is there to test
    httptools = None

BACKENDS = {name: module for name, module in (("httptools", httptools), ("h11", h11_parser)) if module}
DEFAULT = httpserver.BACKEND


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name):
        return ("127.0.0.1", 1)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class App:
    def __init__(self, answer: bool = True) -> None:
        self.seen = []
        self.answer = answer

    def body_limit(self, request) -> int:
        return 100

    def handle(self, request) -> None:
        self.seen.append((request.method, request.path, request.query, dict(request.headers), request.body,
                          request.keep_alive, request.too_large))
        if self.answer:
            request.respond(200, b"", b"ok")


def run(chunks, answer: bool = True, backend=DEFAULT):
    app = App(answer)
    server = httpserver.HttpServer(app, backend=backend)
    conn = httpserver.HttpConnection(server)
    transport = Transport()
    conn.connection_made(transport)
    for chunk in chunks:
        conn.data_received(chunk)
    return app.seen, bytes(transport.out), transport.closed


CASES = [
    [b"POST /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"],
    [b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: h\r\nUser-Agent: x/1\r\n\r\n"],
    # pipelined, then split in odd places
    [b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /3 HTTP/1.1\r\n\r\n"],
    [b"POST /p HTTP/1.1\r\nContent-Le", b"ngth: 4\r\n\r\nab", b"cd"],
    # chunked body, HTTP/1.0, Connection: close, repeated header, spaces around values
    [b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
    [b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n"],
    [b"GET /close HTTP/1.1\r\nConnection: close\r\n\r\n"],
    [b"GET /dup HTTP/1.1\r\nX-A: 1\r\nX-A: 2\r\n\r\n"],
    [b"GET /ws HTTP/1.1\r\nX-Pad:    padded value  \t\r\nX-Empty:\r\n\r\n"],
    # over the body limit: answered, body dropped
    [b"POST /big HTTP/1.1\r\nContent-Length: 150\r\n\r\n" + b"x" * 150],
]


EXPECTED = [
    [("POST", "/a/b", "x=1&y=2", {"host": "h", "content-type": "application/json", "content-length": "7"},
      b'{"a":1}', True, False)],
    [("GET", "/2018-06-01/runtime/invocation/next", "", {"host": "h", "user-agent": "x/1"}, b"", True, False)],
    [("GET", "/1", "", {"host": "h"}, b"", True, False),
     ("POST", "/2", "", {"content-length": "2"}, b"{}", True, False),
     ("GET", "/3", "", {}, b"", True, False)],
    [("POST", "/p", "", {"content-length": "4"}, b"abcd", True, False)],
    [("POST", "/c", "", {"transfer-encoding": "chunked"}, b"abc", True, False)],
    [("GET", "/old", "", {"host": "h"}, b"", False, False)],
    [("GET", "/close", "", {"connection": "close"}, b"", False, False)],
    [("GET", "/dup", "", {"x-a": "1,2"}, b"", True, False)],
    [("GET", "/ws", "", {"x-pad": "padded value", "x-empty": ""}, b"", True, False)],
    [("POST", "/big", "", {"content-length": "150"}, b"", True, True)],
]


@pytest.mark.parametrize("chunks,expected", list(zip(CASES, EXPECTED)))
def test_requests_are_framed_and_parsed(chunks, expected):
    seen, out, closed = run(chunks)
    assert seen == expected
    assert out.count(b"HTTP/1.1 200 OK") == len(expected)
    assert closed == (not expected[-1][5])


@pytest.mark.parametrize("bad", [
    b"GET /x HTTP/1.1\r\nBad Header: 1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX: a\x01b\r\n\r\n",
])
def test_bad_requests_get_400_and_close(bad):
    seen, out, closed = run([bad])
    assert seen == []
    assert out.startswith(b"HTTP/1.1 400"), out
    assert closed


def test_pipelined_requests_wait_for_the_active_one():
    seen, out, _ = run([b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"], answer=False)
    assert [s[1] for s in seen] == ["/1"]
    assert out == b""


# ---- on real sockets, with both parsers --------------------------------------------------------

class EchoApp:
    """Answers every request with its method, path and body."""

    def body_limit(self, request) -> int:
        return 1 << 20

    def handle(self, request) -> None:
        request.respond(200, b"content-type: text/plain\r\n",
                        b"%s %s %s" % (request.method.encode(), request.path.encode(), request.body))


async def exchange(data: bytes, pieces: int = 1, backend=DEFAULT) -> bytes:
    server = httpserver.HttpServer(EchoApp(), request_timeout=5.0, backend=backend)
    listener = await server.listen("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
        await asyncio.sleep(0.01)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    server.close()
    server.close_connections()
    return answer


@pytest.fixture(params=list(BACKENDS))
def parser(request):
    return BACKENDS[request.param]


def run_socket(data: bytes, pieces: int = 1, backend=DEFAULT) -> bytes:
    return asyncio.run(exchange(data, pieces, backend))


H2C = (b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello")


@pytest.mark.parametrize("pieces", [1, 3])
def test_h2c_upgrade_is_served_as_http1(parser, pieces):
    answer = run_socket(H2C + b"GET /y HTTP/1.1\r\nConnection: close\r\n\r\n", pieces, parser)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert b"POST /x hello" in answer
    assert answer.endswith(b"GET /y ")
    assert b"101" not in answer.split(b"\r\n", 1)[0]


def test_websocket_upgrade_is_served_as_http1(parser):
    answer = run_socket(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                 b"GET /z HTTP/1.1\r\nConnection: close\r\n\r\n", backend=parser)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert b"GET /ws " in answer and answer.endswith(b"GET /z ")


def test_connect_is_refused(parser):
    answer = run_socket(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", backend=parser)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1") == 1, answer


def test_head_has_no_body(parser):
    answer = run_socket(b"HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\nConnection: close\r\n\r\n", backend=parser)
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert b"content-length: 8\r\n" in first + b"\r\n"  # the GET's length: "HEAD /h "
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.endswith(b"GET /g ")


def test_expect_100_continue(parser):
    answer = run_socket(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
                        backend=parser)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"POST /e ab")


async def slow_clients(request_timeout: float, backend) -> tuple:
    """Three slow clients against a server with a short request timeout: (answers, requests seen)."""
    app = EchoApp()
    seen: list = []
    app.handle = lambda request: seen.append(request.path)  # type: ignore[method-assign]
    server = httpserver.HttpServer(app, request_timeout=request_timeout, backend=backend)
    listener = await server.listen("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    heads = [b"POST /half-head HTTP/1.1\r\nX-Slow: ",
             b"POST /partial-body HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 60,
             b"POST /trickle HTTP/1.1\r\nX-Trickle: "]
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in heads]
    for (_, writer), head in zip(conns, heads):
        writer.write(head)
    answers = [b""] * len(conns)

    async def trickle() -> None:
        writer = conns[2][1]
        for _ in range(30):  # progress alone must not keep a request alive
            await asyncio.sleep(0.2)
            if writer.is_closing():
                return
            writer.write(b"t")

    async def read(k: int) -> None:
        answers[k] = await conns[k][0].read()

    trickler = asyncio.ensure_future(trickle())
    await asyncio.wait_for(asyncio.gather(*(read(k) for k in range(len(conns)))), 10)
    trickler.cancel()
    for _, writer in conns:
        writer.close()
    server.close()
    server.close_connections()
    return answers, seen


def test_slow_clients_get_408_and_never_reach_the_app(parser):
    # The daemon uses a 60 s request timeout (tests/test_security.py waits it out once, end to end).
    started = time.monotonic()
    answers, seen = asyncio.run(slow_clients(1.0, parser))
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    assert seen == []
    assert time.monotonic() - started < 8


# ---- both backends, byte for byte ------------------------------------------------------------

def _corpus() -> list:
    from test_httpparser import INVALID, UPGRADE, VALID

    inputs = [b"".join(chunks) for chunks in CASES] + VALID + INVALID + UPGRADE
    inputs += [
        b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"40\r\n" + b"y" * 64 + b"\r\n" + b"40\r\n"
        + b"y" * 64 + b"\r\n0\r\n\r\nGET /after-big HTTP/1.1\r\n\r\n",
        b"GET /" + b"u" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(700)) + b"\r\n",
        b"GET / HTTP/1.1\r\nX-Slow: " + b"s" * (httpserver.MAX_PARTIAL_HEAD + 10),  # never ends
        b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
        b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n",  # too large: no 100
        b"GET /h2 HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n\r\n",
    ]
    return inputs


@pytest.mark.skipif(httptools is None, reason="compares with httptools, hidden here (tools/pure-python)")
@pytest.mark.parametrize("step", [10 ** 6, 1, 7])
def test_both_backends_answer_every_input_the_same(step):
    """Method, path, query, headers, body, keep-alive, the limits, pipelining, upgrades and
    refusals as the application sees them, and the bytes written back: the same for both."""
    for data in _corpus():
        chunks = [data[i:i + step] for i in range(0, len(data), step)]
        expected = run(chunks, backend=httptools)
        assert run(chunks, backend=h11_parser) == expected, data[:200]


def test_an_unfinished_head_is_refused_at_the_limit(parser):
    seen, out, closed = run([b"GET / HTTP/1.1\r\nX-Slow: "] + [b"s" * 1024] * 80, backend=parser)
    assert seen == [] and out.startswith(b"HTTP/1.1 431 ") and closed


def test_bytes_after_a_request_without_keep_alive_are_ignored(parser):
    app = App(answer=False)
    server = httpserver.HttpServer(app, backend=parser)
    conn = httpserver.HttpConnection(server)
    transport = Transport()
    conn.connection_made(transport)
    conn.data_received(b"GET /1 HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert [s[1] for s in app.seen] == ["/1"] and transport.out == b"" and not transport.closed
    conn.active.respond(200, b"", b"ok")  # answered later: it still gets its answer, then the close
    assert transport.out.startswith(b"HTTP/1.1 200 OK\r\n") and transport.closed


# ---- draining --------------------------------------------------------------------------------

def _connection(parser, app=None):
    server = httpserver.HttpServer(app or App(answer=False), backend=parser)
    conn = httpserver.HttpConnection(server)
    transport = Transport()
    conn.connection_made(transport)
    return server, conn, transport


def test_draining_answers_close_the_connection(parser):
    server, conn, transport = _connection(parser)
    conn.data_received(b"GET /1 HTTP/1.1\r\n\r\n")
    server.start_draining()
    conn.active.respond(503, b"", b"no")
    assert b"connection: close\r\n" in transport.out and transport.closed


def test_draining_keeps_a_connection_open_for_a_request_already_on_it(parser):
    server, conn, transport = _connection(parser)
    conn.data_received(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    server.start_draining()
    conn.active.respond(503, b"", b"first")  # /2 is queued behind it: it must get its answer too
    assert b"connection: close" not in transport.out and not transport.closed
    conn.active.respond(503, b"", b"second")
    assert transport.out.count(b"HTTP/1.1 503") == 2 and transport.out.endswith(b"second")
    assert transport.out.count(b"connection: close") == 1 and transport.closed


def test_draining_a_streamed_answer_closes_after_its_end(parser):
    server, conn, transport = _connection(parser)
    conn.data_received(b"GET /s HTTP/1.1\r\n\r\n")
    server.start_draining()
    request = conn.active
    request.start(200)
    request.write(b"piece")
    request.end()
    assert b"connection: close\r\n" in transport.out and transport.out.endswith(b"0\r\n\r\n") and transport.closed


def test_close_idle_spares_connections_with_a_request_on_them():
    async def scenario() -> tuple:
        app = App(answer=False)
        server = httpserver.HttpServer(app)
        listener = await server.listen("127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(b"GET /busy HTTP/1.1\r\n\r\n")
        while len(server.connections) < 2 or not app.seen:
            await asyncio.sleep(0.01)
        server.start_draining()
        await server.stop_accepting()
        closing = asyncio.ensure_future(server.close_idle(5.0, linger=0.1))
        idle_gone = await asyncio.wait_for(idle_reader.read(), 5)  # closed: EOF, no bytes
        busy = next(c for c in server.connections if c.active is not None)
        busy.active.respond(200, b"", b"late answer")
        answer = await asyncio.wait_for(busy_reader.read(), 5)
        await closing
        refused = False
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            refused = True
        for writer in (idle_writer, busy_writer):
            writer.close()
        server.close()
        return idle_gone, answer, refused, len(server.connections)

    idle_gone, answer, refused, left = asyncio.run(scenario())
    assert idle_gone == b""
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in answer
    assert answer.endswith(b"late answer")
    assert refused and left == 0


# ---- flow control ----------------------------------------------------------------------------

class StreamingApp(App):
    """Hands every body piece of a request to ``sink`` (a streamed answer on another connection)."""

    def __init__(self) -> None:
        super().__init__(answer=False)
        self.sink = None

    def body_limit(self, request) -> int:
        request.on_chunk = lambda data: self.sink.write(data)
        return 1 << 30


def test_a_full_consumer_pauses_the_producer_until_it_drains(parser):
    app = StreamingApp()
    _, client, client_transport = _connection(parser)
    client.data_received(b"GET /stream HTTP/1.1\r\n\r\n")
    app.sink = client.active
    app.sink.start(200)
    _, runtime, runtime_transport = _connection(parser, app)
    runtime.data_received(b"POST /r HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    assert not runtime_transport.paused
    client.pause_writing()  # what asyncio calls when the client's send buffer is over its high-water mark
    runtime.data_received(b"3\r\ndef\r\n")
    assert runtime_transport.paused
    client.resume_writing()
    assert not runtime_transport.paused
    client.pause_writing()
    runtime.data_received(b"3\r\nghi\r\n")
    client.connection_lost(None)  # a consumer that goes away lets the producer go on too
    assert not runtime_transport.paused
    assert b"abc" in client_transport.out and b"def" in client_transport.out


# ---- a real daemon drained under load ----------------------------------------------------------

INVOKE = (b"POST /2015-03-31/functions/function/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")


def _read_answer(sock) -> Optional[tuple]:
    """(status, head, body) of one response, or None when the connection ends before a whole one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return int(head.split(b" ", 2)[1]), head.lower(), body


def _closed_by_server(sock) -> bool:
    """What HTTP clients check before reusing a kept-alive connection (urllib3's is_connection_dropped)."""
    return bool(select.select([sock], [], [], 0)[0]) and sock.recv(1, socket.MSG_PEEK) == b""


def _hammer(port: int, started: threading.Event, deadline: float) -> Counter:
    """Invoke over one kept-alive connection after another until connections are refused: every
    request sent must get a whole answer (counted by status) or its connection be refused."""
    counts: Counter = Counter()
    sock = None
    while time.monotonic() < deadline:
        if sock is not None and _closed_by_server(sock):
            counts["reconnect"] += 1
            sock.close()
            sock = None
        fresh = sock is None
        if sock is None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            except ConnectionRefusedError:
                counts["refused"] += 1
                return counts
        try:
            sock.sendall(INVOKE)
            answer = _read_answer(sock)
        except OSError:  # reset: the request was sent and not answered
            answer = None
        if answer is None:
            counts["empty"] += 1
            counts["empty-fresh" if fresh else "empty-reused"] += 1
            sock.close()
            sock = None
            continue
        status, head, _ = answer
        counts[status] += 1
        started.set()
        if b"connection: close" in head:
            sock.close()
            sock = None
    counts["unfinished"] += 1
    return counts


def test_sigterm_drain_under_load_answers_every_request_or_refuses_it(daemon_factory):
    """Kept-alive connections hammering the Invoke API while SIGTERM arrives: during the drain every
    answer carries ``connection: close``; at exit idle connections are closed only while no request
    is on them, after the listener stopped accepting. No request may meet a silent close."""
    proc = daemon_factory(RIC + ["handlers.echo"], cwd=FUNCTIONS_DIR, MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_TIMEOUT=10)
    started = threading.Event()
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(_hammer, proc.port, started, deadline) for _ in range(16)]
        assert started.wait(20), "no answer before the signal"
        time.sleep(0.3)  # all 16 connections busy
        proc.signal(signal.SIGTERM)
        counts = sum((c.result(40) for c in clients), Counter())
    assert proc.wait(15) == 0
    assert counts["empty"] == 0, counts
    assert counts["unfinished"] == 0, counts
    assert counts[200] > 16 and counts["refused"] == 16, counts
    print(dict(counts))
