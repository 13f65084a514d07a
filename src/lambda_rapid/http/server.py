"""A small, fast HTTP/1.1 server on asyncio protocols and httptools (llhttp) callbacks.

It owns framing only: parsing, keep-alive, pipelining order, limits (header bytes, body bytes, slow
clients), flow control and writing responses. It knows nothing about Lambda: each complete request
goes to the application's ``handle(request)``, which answers now or later with
``request.respond(...)``. No task or future is created per request; the hot path is a handful of
callbacks.

``HttpConnection`` (an asyncio protocol) reads: the parser's callbacks build each ``Request``, in
pipelining order, within the limits; it decides keep-alive and closing. A ``Request`` writes its own
answer (whole, or streamed in chunks) and tells its connection when it is done. Flow control, both
ways, is a ``FlowControl`` per connection (flow.py).

The parser is httptools when it is installed; without it (the single-file build carries no C
extensions) ``h11_parser``, which runs h11 behind httptools' interface, so one connection class
serves both. ``BACKEND`` says which one this process uses.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import select
import socket
import struct
import termios
import time
from collections import deque
from http import HTTPStatus
from types import ModuleType
from typing import Callable, Optional

try:
    import httptools as BACKEND
except ImportError:  # no C extensions (single-file build): h11, behind the same interface
    from . import h11_parser as BACKEND

from .flow import PIPELINED, SINK_FULL, FlowControl

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 65536
# An unfinished request head is refused (431) once this much of it is buffered: a header that
# never ends must not grow without bound until the request timeout.
MAX_PARTIAL_HEAD = MAX_HEADER_BYTES + 4096
# While draining, an idle kept-alive connection is closed once it has been idle this long with no
# request bytes waiting: a client that was about to reuse it has sent by then (and a client that
# reuses one later sees it closed first: urllib3, Go's and Node's clients check before reusing).
IDLE_LINGER = 1.0
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_JSON = b"content-type: application/json\r\n"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(now: float) -> str:
    """RFC 9110 IMF-fixdate (what email.utils.formatdate(usegmt=True) gives, without importing email)."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def header(name: str, value: str) -> bytes:
    """One encoded header line; values are sanitised so a caller's bytes can't split headers."""
    if "\r" in value or "\n" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    return f"{name}: {value}\r\n".encode("latin-1", "replace")


def _without_upgrade(request: Request, url: bytes) -> bytes:
    """The head of ``request`` again, without the headers that ask for a protocol upgrade."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode("latin-1"), url)]
    for name, value in request.headers.items():
        if name in ("upgrade", "http2-settings"):
            continue
        if name == "connection":
            value = ",".join(t for t in value.split(",") if t.strip().lower() not in ("upgrade", "http2-settings"))
            if not value.strip():
                continue
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    return b"".join(lines)


class _StopParsing(Exception):
    pass


class Request:
    """One parsed request and its answer. ``respond`` may be called once, now or later, from any
    callback; or the answer is streamed: ``start``, any number of ``write``, then ``end`` (chunked
    transfer coding). The answer's bytes are written here; its connection is told when it is done.

    The body is handed over whole, unless the application sets ``on_chunk`` before it arrives
    (from ``body_limit``, called when the head is complete): then each piece goes to ``on_chunk``
    as it arrives and ``body`` stays empty. Trailer fields are added to ``headers``.
    """

    __slots__ = ("conn", "method", "path", "query", "headers", "body", "keep_alive", "too_large",
                 "limit", "_parts", "_size", "on_abandon", "answered", "on_chunk")

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.method = ""
        self.path = ""
        self.query = ""
        self.headers: dict = {}
        self.body = b""
        self.keep_alive = True
        self.too_large = False
        self.limit = 0
        self._parts: list = []
        self._size = 0
        self.on_abandon: Optional[Callable[[], None]] = None
        self.answered = False
        self.on_chunk: Optional[Callable[[bytes], None]] = None

    def respond(self, status: int, headers: bytes = b"", body: bytes = b"", close: bool = False) -> None:
        if self.answered:
            return
        self.answered = True
        self.on_abandon = None  # often a bound method of an object holding this request: no cycle
        conn = self.conn
        if conn.closed:
            return
        head = self._head(conn, status, headers, close, b"content-length: %d\r\n\r\n" % len(body))
        if self.method == "HEAD":
            body = b""  # the GET's headers, never a body: its bytes would be read as the next response
        transport = conn.transport
        assert transport is not None
        if len(body) < 65536:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        conn.answered(self, close or not self.keep_alive)

    def respond_json(self, status: int, body: bytes, headers: bytes = b"") -> None:
        self.respond(status, _JSON + headers, body)

    def start(self, status: int, headers: bytes = b"") -> None:
        """Send the head of a streamed answer; the body follows with ``write`` and ``end``.
        ``on_abandon`` still fires if the client goes away before ``end``."""
        conn = self.conn
        if not conn.closed:
            conn.transport.write(  # type: ignore[union-attr]
                self._head(conn, status, headers, False, b"transfer-encoding: chunked\r\n\r\n"))

    def write(self, data: bytes) -> Optional[Request]:
        """One piece of a streamed answer, sent at once (as one chunk). Returns this request when
        the client's socket is full (the transport's buffer is over its high-water mark): a
        producer should stop until ``when_drained`` calls back; None otherwise."""
        if data and not self.answered:
            conn = self.conn
            if not conn.closed:
                conn.transport.write(b"%x\r\n%s\r\n" % (len(data), data))  # type: ignore[union-attr]
            if conn.flow.writing_paused:
                return self
        return None

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the client's socket takes more again (or the client is gone)."""
        conn = self.conn
        if conn.closed:
            callback()
        else:
            conn.flow.when_drained(callback)

    def end(self) -> None:
        """Finish a streamed answer."""
        if self.answered:
            return
        self.answered = True
        self.on_abandon = None
        conn = self.conn
        if not conn.closed:
            conn.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            conn.answered(self, not self.keep_alive)

    def _head(self, conn: HttpConnection, status: int, headers: bytes, close: bool, framing: bytes) -> bytes:
        """The head of this request's answer (``framing``: its length, or chunked). On a draining
        server, the answer to a connection's last request closes it (``keep_alive`` becomes False)."""
        server = conn.server
        if server.draining and conn.last_request():
            self.keep_alive = False
        return b"".join((
            _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
            headers,
            server.date_header,
            b"connection: close\r\n" if close or not self.keep_alive else b"",
            framing,
        ))


class HttpConnection(asyncio.Protocol):
    """One client connection: its parser's callbacks make its requests, answered in order."""

    __slots__ = ("server", "app", "transport", "parser", "current", "active", "pending", "started",
                 "idle_since", "header_bytes", "url_parts", "context", "closed", "peer", "upgrading",
                 "partial_head", "ended", "flow")

    def __init__(self, server: HttpServer, context: object = None) -> None:
        self.server = server
        self.app = server.app
        self.transport: Optional[asyncio.Transport] = None
        self.parser = server.backend.HttpRequestParser(self)
        self.current: Optional[Request] = None
        self.active: Optional[Request] = None
        self.pending: deque = deque()
        self.started = 0.0
        self.idle_since = 0.0
        self.header_bytes = 0
        self.url_parts: list = []
        self.context = context  # application data bound to the listener (e.g. its runtime instance)
        self.closed = False
        self.peer = None
        self.upgrading: Optional[Request] = None  # a request asking for Upgrade, parsed again without it
        self.partial_head = 0  # bytes received while a request head is unfinished
        self.ended = False  # a request without keep-alive was read: nothing after it is served
        self.flow: Optional[FlowControl] = None  # from connection_made

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        self.peer = transport.get_extra_info("peername")
        self.idle_since = self.server.now
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except _StopParsing:
            return
        except self.server.backend.HttpParserCallbackError as e:  # (looked up only when raised)
            if isinstance(e.__context__, _StopParsing):
                return
            log.exception("error while handling a request from %s", self.peer)
            self._fail(500, "internal error")
            return
        except self.server.backend.HttpParserUpgrade as e:
            request, self.upgrading = self.upgrading, None
            if request is None:
                self._fail(400, "protocol upgrades are not supported")
                return
            # RFC 9110 7.8: a server may ignore Upgrade (curl --http2 asks for h2c on every request).
            # Parse the request again as plain HTTP/1.1 without its upgrade headers, then the rest.
            self.current = None
            self.parser = self.server.backend.HttpRequestParser(self)
            self.data_received(_without_upgrade(request, b"".join(self.url_parts)) + data[e.args[0]:])
            return
        except self.server.backend.HttpParserError as e:
            if self.ended:
                return  # bytes after a request without keep-alive: it is answered, then the connection closes
            log.info("bad HTTP from %s: %s", self.peer, e)
            self._fail(400, "malformed HTTP request")
            return
        current = self.current
        if current is not None and not current.method:  # a head still unfinished
            self.partial_head += len(data)
            if self.partial_head > MAX_PARTIAL_HEAD:
                self._fail(431, "request headers too large")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.server.connections.discard(self)
        requests = [self.active] if self.active is not None else []
        requests.extend(self.pending)
        self.active = None
        self.pending.clear()
        self.flow.release()  # type: ignore[union-attr]  # a producer paused for it goes on
        for request in requests:
            if request.on_abandon is not None and not request.answered:
                request.answered = True
                try:
                    request.on_abandon()
                except Exception:
                    log.exception("error while abandoning a request")

    def pause_writing(self) -> None:
        self.flow.pause_writing()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.flow.resume_writing()  # type: ignore[union-attr]

    # ---- parser callbacks (httptools', or h11_parser's with the same shape) -------------------
    def on_message_begin(self) -> None:
        self.current = Request(self)
        self.header_bytes = 0
        self.partial_head = 0
        self.url_parts = []
        self.started = self.server.now or 1.0

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        self.url_parts.append(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fail(431, "request headers too large")
            raise _StopParsing()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > MAX_HEADER_BYTES:
            self._fail(431, "request headers too large")
            raise _StopParsing()
        key = name.decode("latin-1").lower()
        headers = self.current.headers  # type: ignore[union-attr]
        text = value.decode("latin-1").rstrip(" \t")  # trailing whitespace is not part of the value
        headers[key] = headers[key] + "," + text if key in headers else text

    def on_headers_complete(self) -> None:
        request = self.current
        assert request is not None
        request.method = self.parser.get_method().decode("latin-1")
        url = self.url_parts[0] if len(self.url_parts) == 1 else b"".join(self.url_parts)
        path, _, query = url.partition(b"?")
        request.path = path.decode("latin-1")
        request.query = query.decode("latin-1")
        request.keep_alive = self.parser.should_keep_alive()
        request.limit = limit = self.app.body_limit(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            request.too_large = True
        if request.method == "CONNECT":
            self._fail(400, "CONNECT is not supported")
            raise _StopParsing()
        if "upgrade" in request.headers and self.parser.should_upgrade():
            self.upgrading = request
            return
        # curl sends "Expect: 100-continue" with bodies over 1 MB and would wait a second for this.
        if ("expect" in request.headers and not request.too_large and self.active is None
                and request.headers["expect"].lower() == "100-continue"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        request = self.current
        if request.too_large:  # type: ignore[union-attr]
            return  # read and drop: the client is answered 413 once it has sent everything
        request._size += len(body)  # type: ignore[union-attr]
        if request._size > request.limit:  # type: ignore[union-attr]
            request.too_large = True  # type: ignore[union-attr]
            request._parts = []  # type: ignore[union-attr]
            return
        if request.on_chunk is not None:  # type: ignore[union-attr]
            self.started = self.server.now or 1.0  # a streamed body times out between pieces, not overall
            sink = request.on_chunk(body)  # type: ignore[union-attr]
            if sink is not None:  # its consumer's socket is full: read no more until it drains
                flow = self.flow
                flow.pause_reading(SINK_FULL)  # type: ignore[union-attr]
                sink.when_drained(flow.sink_drained)  # type: ignore[union-attr]
            return
        request._parts.append(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        request = self.current
        assert request is not None
        self.current = None
        self.started = 0.0
        if not request.keep_alive:
            self.ended = True
        if request is self.upgrading:
            return  # not dispatched: data_received parses it again without the upgrade
        parts = request._parts
        if parts:
            request.body = parts[0] if len(parts) == 1 else b"".join(parts)
            request._parts = []
        if self.active is None:
            self.active = request
            self.app.handle(request)
        else:
            self.pending.append(request)
            self.flow.pause_reading(PIPELINED)  # type: ignore[union-attr]

    # ---- answers, keep-alive ------------------------------------------------------------------
    def answered(self, request: Request, close: bool) -> None:
        """The answer to ``request`` is written: close, or go on with the next pipelined request."""
        transport = self.transport
        assert transport is not None
        if request is self.active:
            self.active = None
        if close:
            self.closed = True
            transport.close()
            return
        self.idle_since = self.server.now
        if self.pending and self.active is None:
            nxt = self.pending.popleft()
            if not self.pending:
                self.flow.resume_reading(PIPELINED)  # type: ignore[union-attr]
            self.active = nxt
            self.app.handle(nxt)

    def last_request(self) -> bool:
        """Whether the request being answered is the last one this connection has: none queued,
        none begun, no byte of another waiting in the socket. Only then may a draining server
        answer it with ``connection: close`` and close: a request already sent gets its answer."""
        if self.pending or self.current is not None:
            return False
        return unread_bytes(self.transport) == 0

    def idle(self) -> bool:
        """No request on this connection: none being answered, queued, begun or waiting unread."""
        return self.active is None and self.last_request()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request we could not parse or accept, then close the connection."""
        if self.closed or self.transport is None:
            return
        body = b'{"message":"%s"}' % message.encode()
        self.transport.write(b"".join((
            _STATUS_LINES[status], _JSON, self.server.date_header,
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body), body)))
        self.close()

    def close(self) -> None:
        """Close now (what is written is still sent); nothing more is read or answered."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def timed_out(self) -> None:
        log.info("closing connection from %s: request not received in time", self.peer)
        self._fail(408, "request timeout")


def unread_bytes(transport: Optional[asyncio.BaseTransport]) -> int:
    """Bytes the peer has sent that are still in the kernel's receive queue (0 without a socket)."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):  # closed, or not a socket (a test's transport)
        return 0


_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: BPF_RET | BPF_K, 0 (keep no byte)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def _refuse_new_connections(listener: socket.socket) -> None:
    """Let no new connection into ``listener``'s accept queue while it is emptied before closing
    (Linux: a socket filter that drops every packet, so SYNs go unanswered; the client's retry
    then finds the port closed: refused). Without it, a connection completing its handshake
    between the last accept and the close would be reset after its client sent a request."""
    try:
        import ctypes

        program = ctypes.create_string_buffer(_DROP_ALL)
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER,
                            struct.pack("HL", 1, ctypes.addressof(program)))
    except (ImportError, OSError):
        pass  # not Linux: the sweep alone (a window of microseconds)


class HttpServer:
    """Listeners sharing one application, connection set and housekeeping timer.

    Shutting down without losing a request: ``start_draining`` (every answer from then on closes
    its connection, unless another request is already on it), then ``stop_accepting`` (new
    connections are refused), then ``close_idle`` (kept-alive connections are closed only while no
    request is on them or waiting in their socket).
    """

    def __init__(self, app, *, request_timeout: float = 30.0, idle_timeout: Optional[float] = None,
                 backend: ModuleType = BACKEND) -> None:
        self.app = app
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.backend = backend  # httptools, or h11_parser: a module with httptools' parser interface
        self.connections: set = set()
        self.servers: list = []
        self.now = 0.0
        self.date_header = b""
        self.draining = False
        self._contexts: dict = {}  # listener -> the context its connections get
        self._timer: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        self.now = now = loop.time()
        self.date_header = b"date: " + http_date(time.time()).encode() + b"\r\n"
        for conn in list(self.connections):
            if conn.started and now - conn.started > self.request_timeout:
                conn.timed_out()
            elif (self.idle_timeout is not None and conn.active is None and not conn.pending
                  and conn.current is None and now - conn.idle_since > self.idle_timeout):
                conn.close()
        self._timer = loop.call_later(1.0, self._tick)

    async def listen(self, host: str, port: int = 0, *, sock=None, context: object = None,
                     backlog: int = 1024) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._tick()
        if sock is not None:
            server = await loop.create_server(lambda: HttpConnection(self, context), sock=sock, backlog=backlog)
        else:
            server = await loop.create_server(lambda: HttpConnection(self, context), host, port,
                                              backlog=backlog, reuse_address=True)
        self.servers.append(server)
        self._contexts[server] = context
        return server

    def forget(self, server: asyncio.AbstractServer) -> None:
        if server in self.servers:
            self.servers.remove(server)
        self._contexts.pop(server, None)
        server.close()

    def unread(self, context: object) -> bool:
        """Whether the listener bound to ``context`` has something not read yet: a connection not
        yet accepted, or bytes waiting in the socket of one of its connections."""
        for server, bound in self._contexts.items():
            if bound is context:
                fds = [s.fileno() for s in server.sockets or ()]
                if fds and select.select(fds, [], [], 0)[0]:
                    return True
        return any(conn.context is context and unread_bytes(conn.transport) for conn in self.connections)

    def start_draining(self) -> None:
        """From now on every answer carries ``connection: close`` and its connection is closed after
        it, unless another request is already on that connection (then that one's answer does)."""
        self.draining = True

    async def stop_accepting(self) -> None:
        """Close the listeners: new connections are refused. Connections the kernel has already
        accepted but we have not are taken first (closing them would reset a client that may have
        sent its request): they are served, and closed like the others."""
        loop = asyncio.get_running_loop()
        # asyncio's loop accepts in a task that gives the connection its protocol a few iterations
        # later, and closing the listener in between drops it: stop it accepting, let those finish.
        # (uvloop accepts in one callback; it has no reader to remove.)
        for server in self.servers:
            for s in server.sockets or ():
                loop.remove_reader(s.fileno())
        for _ in range(5):
            await asyncio.sleep(0)
        taken = []
        for server in self.servers:
            context = self._contexts.get(server)
            listeners = [socket.fromfd(s.fileno(), s.family, s.type) for s in server.sockets or ()]
            server.close()  # our duplicates keep the sockets listening for the sweep below
            for listener in listeners:
                _refuse_new_connections(listener)
                listener.setblocking(False)
                while True:
                    try:
                        sock, _ = listener.accept()
                    except OSError:  # BlockingIOError when the queue is empty
                        break
                    taken.append((sock, context))
                listener.close()
        self.servers.clear()
        self._contexts.clear()
        for sock, context in taken:
            await loop.connect_accepted_socket(
                lambda context=context: HttpConnection(self, context), sock)  # type: ignore[misc]

    async def close_idle(self, timeout: float, linger: float = IDLE_LINGER) -> None:
        """Close connections as they become idle (no request on them, none waiting in their socket,
        for ``linger`` seconds), until none is left or ``timeout`` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            self.now = now = loop.time()  # idle_since is taken from it: keep it fresh meanwhile
            for conn in list(self.connections):
                if conn.closed or conn.transport is None:
                    continue
                if conn.active is None and conn.current is None:
                    if not conn.idle():
                        conn.idle_since = now  # bytes are waiting: the request they are gets read
                    elif now - conn.idle_since >= linger:
                        conn.close()
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for server in self.servers:
            server.close()
        self.servers.clear()

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()
