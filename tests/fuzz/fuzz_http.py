"""atheris harness: the HTTP server's connection (lambda_rapid/http/server.py) fed arbitrary bytes.

The target is ``HttpConnection.data_received`` with a fake transport, so it runs whichever parser
backend server.py picks: ``--backend=httptools`` (the default: llhttp through httptools) or
``--backend=fallback`` (``import httptools`` made to fail, as in the single-file build, so the
pure-Python fallback parses). The first input byte says how the rest is cut into reads (all at
once, or pieces of 1-64 bytes); the rest is what a client sends.

A crash is an exception escaping the connection or an error the server logs (its code raised in
a parser callback). A finding (recorded, see harness.py, and fuzzing goes on) is a broken invariant:
every answer well-formed and complete, answers in request order, exactly one answer per request
handled while the connection was open, no request handed over once the connection is closed (after
a ``connection: close`` answer), at most one refusal (4xx/5xx with ``connection: close``, last),
nothing written after close, no request handed over with both Content-Length and
Transfer-Encoding (the request-smuggling shape; trailer fields count, as they end up in the same
headers), bodies of the length announced.

Usage: see harness.py (``python tests/fuzz/fuzz_http.py --backend=fallback -max_total_time=30 DIR``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque

import harness

BACKEND = "fallback" if "--backend=fallback" in sys.argv else "httptools"
BODY_LIMIT = 2048
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) [^\r\n]*$")


def load():
    if BACKEND == "fallback":
        sys.modules["httptools"] = None  # type: ignore[assignment]  # what a build without C extensions sees
    from lambda_rapid.http import server

    return server


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.written_after_close = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close += len(data)
            return
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class App:
    """Answers at once, streams (``/stream``), or holds the answer until the input is consumed
    (``/defer``, so later pipelined requests queue behind it)."""

    def __init__(self) -> None:
        self.methods: list = []
        self.deferred: deque = deque()
        self.expected = 0
        self.violations: list = []

    def body_limit(self, request) -> int:
        return BODY_LIMIT

    def handle(self, request) -> None:
        self.violations.extend(check_request(request))
        seq = len(self.methods)
        self.methods.append(request.method)
        if request.path.startswith("/defer"):
            request.on_abandon = lambda: None
            self.deferred.append((request, seq))
            return
        self.answer(request, seq)

    def answer(self, request, seq: int) -> None:
        if not request.conn.closed:
            self.expected += 1
        if request.path.startswith("/stream"):
            request.start(200, b"x-seq: %d\r\n" % seq)
            request.write(b"piece")
            request.end()
        else:
            request.respond(200, b"x-seq: %d\r\n" % seq, b"len=%d" % len(request.body))


def check_request(request) -> list:
    headers = request.headers
    problems = []
    if request.conn.closed:
        problems.append("request handed over after the connection was closed")
    if not TOKEN.match(request.method):
        problems.append(f"method {request.method!r} handled")
    if "content-length" in headers and "transfer-encoding" in headers:
        problems.append("request handed over with both Content-Length and Transfer-Encoding")
    if request.too_large:
        return problems
    if len(request.body) > request.limit:
        problems.append("body over the limit handed over")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and request.on_chunk is None and len(request.body) != int(length):
        problems.append("body length differs from Content-Length")
    return problems


def parse_answers(out: bytes, methods: list) -> list:
    """(status, headers) of each final answer in ``out``; AssertionError if any is malformed."""
    answers = []
    pos = 0
    while pos < len(out):
        end = out.find(b"\r\n\r\n", pos)
        assert end >= 0, f"incomplete answer head: {bytes(out[pos:pos + 200])!r}"
        lines = bytes(out[pos:end]).split(b"\r\n")
        match = STATUS_LINE.match(lines[0])
        assert match, f"bad status line {lines[0]!r}"
        status = int(match.group(1))
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            assert sep and name, f"bad header line {line!r}"
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        pos = end + 4
        if 100 <= status < 200:
            continue
        seq = int(headers["x-seq"]) if "x-seq" in headers else None
        if headers.get("transfer-encoding") == "chunked":
            while True:
                line_end = out.find(b"\r\n", pos)
                assert line_end >= 0, "incomplete chunk"
                size = int(bytes(out[pos:line_end]), 16)
                pos = line_end + 2 + size + 2
                assert pos <= len(out), "chunk cut short"
                if size == 0:
                    break
        else:
            length = int(headers["content-length"])
            if not (seq is not None and methods[seq] == "HEAD"):
                pos += length
            assert pos <= len(out), "body cut short"
        answers.append((status, headers, seq))
    return answers


def make_input(server):
    errors = Errors()
    logging.getLogger("lambda_rapid").addHandler(errors)
    logging.getLogger("lambda_rapid").setLevel(logging.INFO)
    logging.getLogger("lambda_rapid").propagate = False

    def one_input(data: bytes) -> None:
        if not data:
            return
        mode, stream = data[0], data[1:]
        errors.records.clear()
        app = App()
        http = server.HttpServer(app)
        conn = server.HttpConnection(http)
        transport = FakeTransport()
        conn.connection_made(transport)
        step = (len(stream) or 1) if mode < 128 else (mode & 63) + 1
        pos = 0
        while pos < len(stream) and not conn.closed:
            if transport.paused:  # a transport delivers nothing while paused: answer what holds it up
                if not app.deferred:
                    break
                app.answer(*app.deferred.popleft())
                continue
            conn.data_received(stream[pos:pos + step])
            pos += step
        while app.deferred:
            request, seq = app.deferred.popleft()
            app.answer(request, seq)
        conn.connection_lost(None)
        if errors.records:  # the server's own code raised: a crash
            raise RuntimeError(f"the server logged an error: {errors.records}")
        try:
            check_answers(app, transport)
        except AssertionError as e:
            app.violations.append(str(e))
        harness.finding(app.violations, data)

    return one_input


def check_answers(app: App, transport: FakeTransport) -> None:
    assert not transport.written_after_close, "bytes written after close"
    answers = parse_answers(bytes(transport.out), app.methods)
    seqs = [seq for _status, _headers, seq in answers if seq is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"answers out of order: {seqs}"
    assert len(seqs) == app.expected, f"{len(seqs)} answers for {app.expected} requests handled"
    refusals = [(i, a) for i, a in enumerate(answers) if a[2] is None]
    assert len(refusals) <= 1, f"{len(refusals)} refusals"
    if refusals:
        index, (status, headers, _seq) = refusals[0]
        assert index == len(answers) - 1, "a refusal that is not the last answer"
        assert status >= 400 and headers.get("connection") == "close", f"refusal {status} {headers}"
        assert transport.closed, "connection left open after a refusal"


def targets(server) -> dict:
    found = {"http/server.py (connection, request)": [server.HttpConnection, server.Request, server.HttpServer]}
    # The pure-Python parser (or the adapter to the library behind the fallback), when it is in use.
    for name, module in sorted(sys.modules.items()):
        if module is not None and name.startswith("lambda_rapid.http.") and module is not server:
            found[name.replace("lambda_rapid.", "")] = [module]
    return found


def request(method: str, path: str, headers: str = "", body: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: x\r\n{headers}\r\n".encode() + body


INVOKE = "/2015-03-31/functions/function/invocations"
SEEDS = [
    b"\x00" + request("POST", INVOKE, "content-length: 2\r\n", b"{}"),
    b"\x85" + request("POST", INVOKE, "content-length: 2\r\n", b"{}") + request("GET", "/_/health"),
    b"\x00" + request("POST", INVOKE, "transfer-encoding: chunked\r\n", b"4\r\nabcd\r\n0\r\nx-trailer: 1\r\n\r\n"),
    b"\x81" + request("POST", INVOKE, "transfer-encoding: chunked\r\n", b"2;ext=1\r\nab\r\n0\r\n\r\n"),
    b"\x00" + request("POST", INVOKE, "expect: 100-continue\r\ncontent-length: 3\r\n", b"abc"),
    b"\x00" + request("GET", "/", "connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AA\r\n"),
    b"\x00" + request("HEAD", "/_/health") + request("GET", "/_/ready"),
    b"\x00" + request("POST", "/defer", "content-length: 1\r\n", b"1") + request("GET", "/a") + request("GET", "/b"),
    b"\x00" + request("GET", "/stream") + request("GET", "/defer") + request("GET", "/stream"),
    b"\x00" + b"GET /old HTTP/1.0\r\n\r\n",
    b"\x00" + request("GET", "/", "connection: close\r\n") + request("GET", "/after-close"),
    b"\x00" + request("POST", INVOKE, "content-length: 5000\r\n", b"x" * 5000),
    b"\x00" + request("POST", INVOKE, "transfer-encoding: chunked\r\n", b"1000\r\n" + b"y" * 4096 + b"\r\n0\r\n\r\n"),
    b"\x00" + b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com\r\n\r\n",
    b"\x00" + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"\x00" + request("POST", INVOKE, "content-length: 3\r\ntransfer-encoding: chunked\r\n", b"0\r\n\r\n"),
    b"\x00" + request("POST", INVOKE, "content-length: 2\r\ncontent-length: 3\r\n", b"abc"),
    b"\x00" + request("GET", "/path?q=1&r=%20", "x-a: 1\r\nx-a: 2\r\nx-b:\t v \t\r\n"),
    b"\x00" + b"GET / HTTP/1.1\nhost: x\n\n",
    b"\x00" + b"\r\n" + request("GET", "/after-crlf"),
]

if __name__ == "__main__":
    harness.main(load, make_input, SEEDS, targets)
