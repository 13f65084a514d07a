"""The pure-Python request parser (used by the single-file build) against httptools, byte for byte.

Each request is fed whole, one byte at a time and in 3-byte pieces to both parsers; the callbacks
they make (with body and URL pieces joined) must be the same, and a request one refuses the other
refuses too.
"""

from __future__ import annotations

import httptools
import pytest

from lambda_rapid.http import pyparser as httpparser


class Recorder:
    def __init__(self) -> None:
        self.events: list = []
        self.parser = None

    def _append_joined(self, kind: str, data: bytes) -> None:
        if self.events and self.events[-1][0] == kind:
            self.events[-1][1].extend(data)  # a bytearray: joining stays linear
        else:
            self.events.append((kind, bytearray(data)))

    def on_message_begin(self) -> None:
        self.events.append(("begin",))

    def on_url(self, url: bytes) -> None:
        self._append_joined("url", url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.events.append(("header", name, value))

    def on_headers_complete(self) -> None:
        self.events.append(("headers", self.parser.get_method(), self.parser.should_keep_alive()))

    def on_body(self, body: bytes) -> None:
        self._append_joined("body", body)

    def on_message_complete(self) -> None:
        self.events.append(("complete",))


def parse(module, data: bytes, step: int) -> tuple:
    recorder = Recorder()
    parser = module.HttpRequestParser(recorder)
    recorder.parser = parser
    error = None
    try:
        for i in range(0, len(data), step):
            parser.feed_data(data[i:i + step])
    except module.HttpParserUpgrade:
        error = "upgrade"
    except module.HttpParserError:
        error = "error"
    return recorder.events, error


VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nUser-Agent: x\r\n\r\n",
    b"POST /x?y=1&z=%20 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX:  value with trailing space  \r\nX: second\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /again HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: \xff\xfe latin-1 bytes\r\n\r\n",
    b"PUT /2022-07-01/telemetry HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
]

INVALID = [
    b"FOO / HTTP/1.1\r\n\r\n",
    b"garbage\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET /a b HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
]

UPGRADE = [
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("step", [10 ** 6, 1, 3])
@pytest.mark.parametrize("data", VALID + UPGRADE)
def test_same_callbacks_as_httptools(data, step):
    expected = parse(httptools, data, step)
    got = parse(httpparser, data, step)
    assert got == expected
    assert got[1] in (None, "upgrade")


@pytest.mark.parametrize("step", [10 ** 6, 1])
@pytest.mark.parametrize("data", INVALID)
def test_refuses_what_httptools_refuses(data, step):
    assert parse(httptools, data, step)[1] == "error"
    events, error = parse(httpparser, data, step)
    assert error == "error"
    assert ("complete",) not in events


def test_pipelined_requests_and_large_body_in_pieces():
    body = bytes(range(256)) * 4000
    data = (b"POST /a HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    data += b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7000]), body[i:i + 7000]) for i in range(0, len(body), 7000))
    data += b"0\r\n\r\n"
    for step in (65536, 1000, 7):
        events, error = parse(httpparser, data, step)
        assert error is None
        bodies = [e[1] for e in events if e[0] == "body"]
        assert bodies == [body, body]
        assert events.count(("complete",)) == 2
        assert parse(httptools, data, step) == (events, error)


class Stop(Exception):
    pass


class Refusing(Recorder):
    def on_header(self, name: bytes, value: bytes) -> None:
        raise Stop()


def test_callback_exception_is_wrapped_with_context():
    parser = httpparser.HttpRequestParser(Refusing())
    with pytest.raises(httpparser.HttpParserCallbackError) as info:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(info.value.__context__, Stop)
    with pytest.raises(httpparser.HttpParserError):  # a failed parser stays failed
        parser.feed_data(b"GET / HTTP/1.1\r\n\r\n")


def test_unbounded_head_is_refused():
    parser = httpparser.HttpRequestParser(Recorder())
    parser.feed_data(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(httpparser.HttpParserError):
        for _ in range(200):
            parser.feed_data(b"a" * 1024)


@pytest.mark.parametrize("partial", [b"P", b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nX-Slow: "])
def test_a_message_begins_with_its_first_byte(partial):
    """As in llhttp: the connection's request timer starts with on_message_begin, so a client that
    sends half a head (slowloris) is timed out rather than treated as an idle connection."""
    for module in (httptools, httpparser):
        events, error = parse(module, partial, 1)
        assert error is None and events[:1] == [("begin",)], module
    assert parse(httpparser, b"\r\n", 1) == ([], None)
