"""The HTTP layer in-process, with httptools and with the pure-Python parser of the single-file
build: requests that ask for a protocol upgrade are served as plain HTTP/1.1 (curl --http2 asks for
h2c), HEAD answers carry no body, ``Expect: 100-continue`` is answered.
"""

from __future__ import annotations

import asyncio

import httptools
import pytest

from lambda_rapid import httpparser, httpserver


class EchoApp:
    """Answers every request with its method, path and body."""

    def body_limit(self, request) -> int:
        return 1 << 20

    def handle(self, request) -> None:
        request.respond(200, b"content-type: text/plain\r\n",
                        b"%s %s %s" % (request.method.encode(), request.path.encode(), request.body))


async def exchange(data: bytes, pieces: int = 1) -> bytes:
    server = httpserver.HttpServer(EchoApp(), request_timeout=5.0)
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


@pytest.fixture(params=["httptools", "pure-python"])
def parser(request, monkeypatch):
    monkeypatch.setattr(httpserver, "httptools", httptools if request.param == "httptools" else httpparser)
    return request.param


def run(data: bytes, pieces: int = 1) -> bytes:
    return asyncio.run(exchange(data, pieces))


H2C = (b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello")


@pytest.mark.parametrize("pieces", [1, 3])
def test_h2c_upgrade_is_served_as_http1(parser, pieces):
    answer = run(H2C + b"GET /y HTTP/1.1\r\nConnection: close\r\n\r\n", pieces)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert b"POST /x hello" in answer
    assert answer.endswith(b"GET /y ")
    assert b"101" not in answer.split(b"\r\n", 1)[0]


def test_websocket_upgrade_is_served_as_http1(parser):
    answer = run(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                 b"GET /z HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    assert b"GET /ws " in answer and answer.endswith(b"GET /z ")


def test_connect_is_refused(parser):
    answer = run(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1") == 1, answer


def test_head_has_no_body(parser):
    answer = run(b"HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\nConnection: close\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert b"content-length: 8\r\n" in first + b"\r\n"  # the GET's length: "HEAD /h "
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    assert rest.endswith(b"GET /g ")


def test_expect_100_continue(parser):
    answer = run(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"POST /e ab")
