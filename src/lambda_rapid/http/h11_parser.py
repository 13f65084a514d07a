"""The request parser for when httptools (C) is not installed: h11 does the parsing, behind
httptools' interface.

The single-file build (``bin/lambda-runtime-api-daemon``) carries no C extensions, so
``http.server`` falls back to this module. It has the shape of ``httptools.HttpRequestParser``:
it calls ``on_message_begin``, ``on_url``, ``on_header``, ``on_headers_complete``, ``on_body`` and
``on_message_complete`` on the connection it serves, answers ``get_method``,
``get_http_version``, ``should_keep_alive`` and ``should_upgrade``, and raises
:class:`HttpParserError`, :class:`HttpParserCallbackError` (a callback raised; the callback's
exception is the ``__context__``) or :class:`HttpParserUpgrade` (the offset of what follows).

h11 validates the request line and header fields and decodes the body (Content-Length or
chunked, with trailers). Around it, this module keeps the two backends framing every request
the same way: it finds the end of each request head itself and, before h11 sees it, refuses what
llhttp (httptools) refuses and h11 would let through (bare CR or LF, obsolete line folding,
control characters, unknown methods, a second Content-Length, Content-Length together with
Transfer-Encoding, a Transfer-Encoding llhttp rejects), and lets through what llhttp accepts and
h11 would refuse (a missing or repeated Host, empty lines before a request, several spaces in the
request line, HTTP/1.0 keep-alive, any coding list ending in ``chunked``). Keep-alive and upgrade
are decided by llhttp's rules. Each request gets its own ``h11.Connection``: h11 would wait for
our answer before reading a pipelined request, we read on (the connection queues them).
"""

from __future__ import annotations

import re
from typing import Optional

import h11

__all__ = ["HttpParserCallbackError", "HttpParserError", "HttpParserUpgrade", "HttpRequestParser"]

# Bytes buffered for an incomplete request head before it is refused. The connection answers 431
# long before (at 64 KiB): this only bounds the parser on its own.
MAX_BUFFERED_HEAD = 256 * 1024

# The request methods llhttp knows (others are refused there: refused here too).
METHODS = frozenset(m.encode() for m in (
    "DELETE", "GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "TRACE", "COPY", "LOCK", "MKCOL", "MOVE",
    "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND", "ACL", "REPORT", "MKACTIVITY",
    "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PATCH", "PURGE", "MKCALENDAR",
    "LINK", "UNLINK", "SOURCE", "QUERY",
))
VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0", b"HTTP/2.0": "2.0", b"HTTP/0.9": "0.9"}
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_EMPTY_LINES = re.compile(rb"[\r\n]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# llhttp takes an origin-form path, "*" or an absolute URL; h11 would take any visible characters.
_TARGET = re.compile(rb"[/*]|[A-Za-z][A-Za-z0-9+.-]*://")
_MAX_CONTENT_LENGTH = 2 ** 64 - 1


class HttpParserError(Exception):
    """The bytes are not a valid HTTP/1.x request."""


class HttpParserCallbackError(HttpParserError):
    """A callback raised; the original exception is this one's ``__context__``."""


class HttpParserUpgrade(HttpParserError):
    """The request asks for a protocol upgrade (or is a CONNECT); the argument is the offset, in
    the data last fed, of the bytes after its head."""


class HttpRequestParser:
    __slots__ = ("_cb", "_buffer", "_scanned", "_in_body", "_remaining", "_body", "_method", "_version",
                 "_keep_alive", "_upgrade", "_begun",
                 "_closed", "_dead")

    def __init__(self, protocol: object) -> None:
        self._cb = {name: getattr(protocol, name, None) for name in (
            "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete")}
        self._buffer = bytearray()  # bytes of a request head not yet complete
        self._scanned = 0  # how much of it is already checked (a head fed byte by byte stays linear)
        self._in_body = False  # between the head of a request and its end
        self._remaining = 0  # of a Content-Length body
        self._body: Optional[h11.Connection] = None  # reads a chunked body
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._upgrade = False
        self._begun = False
        self._closed = False  # a request without keep-alive was read: nothing may follow
        self._dead = False

    # ---- httptools' interface ----------------------------------------------------------------
    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return self._version

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def feed_data(self, data: bytes) -> None:
        if self._dead:
            raise HttpParserError("the parser is in an error state")
        try:
            self._feed(bytes(data))
        except HttpParserError:
            self._dead = True
            raise
        except h11.ProtocolError as e:
            self._dead = True
            raise HttpParserError(str(e)) from None

    # ---- parsing -----------------------------------------------------------------------------
    def _call(self, name: str, *args) -> None:
        callback = self._cb[name]
        if callback is not None:
            try:
                callback(*args)
            except Exception as e:
                raise HttpParserCallbackError(f"the {name} callback failed") from e

    def _feed(self, data: bytes) -> None:
        if self._closed:
            if data:
                raise HttpParserError("data after a request without keep-alive")  # as llhttp
            return
        buf = self._buffer
        buf += data
        if self._in_body and not self._read_body():
            return
        while buf and not self._closed:
            if not self._begun:
                # Empty lines before a request line are skipped (RFC 9112 section 2.2), as llhttp does.
                skip = _EMPTY_LINES.match(buf).end()
                if skip:
                    del buf[:skip]
                if not buf:
                    return
                # As llhttp: a message begins with its first byte, so the connection's request timer
                # runs from there (a client sending half a head is timed out, not taken as idle).
                self._begun = True
                self._call("on_message_begin")
            scanned = max(0, self._scanned - 3)
            end = buf.find(b"\r\n\r\n", scanned)
            bare = _BARE_CR_OR_LF.search(buf, max(0, scanned - 1), len(buf) if end < 0 else end + 4)
            if bare is not None and not (end < 0 and bare.start() == len(buf) - 1 and buf[-1] == 13):
                raise HttpParserError("CR or LF alone in the request head")  # (a CR last may get its LF next)
            if end < 0:
                if len(buf) > MAX_BUFFERED_HEAD:
                    raise HttpParserError("request head too large")
                self._scanned = len(buf)
                return
            head = bytes(buf[:end])
            del buf[:end + 4]  # (from the front of a bytearray: no copy of the rest)
            self._scanned = 0
            self._begun = False
            self._start(head, len(data) - len(buf))  # what follows the head came with this data
            if not self._read_body():
                return
        if self._closed and buf:
            raise HttpParserError("data after a request without keep-alive")  # as llhttp

    def _start(self, head: bytes, offset: int) -> None:
        """Check one request head, hand it over, and set up the reader of its body (``offset``:
        where the bytes after the head start in the data being fed, for an upgrade)."""
        if _CONTROL.search(head):
            raise HttpParserError("control character in the request head")
        lines = head.split(b"\r\n")
        if lines[0].startswith(b" ") or lines[0].endswith(b" "):
            raise HttpParserError("invalid request line")
        parts = [p for p in lines[0].split(b" ") if p]  # llhttp takes several spaces between the parts
        if len(parts) == 2:
            parts.append(b"HTTP/0.9")  # a request line without a version: llhttp reads HTTP/0.9
        if len(parts) != 3:
            raise HttpParserError("invalid request line")
        method, target, version = parts
        if method not in METHODS:
            raise HttpParserError("invalid method")
        if version not in VERSIONS:
            raise HttpParserError("invalid HTTP version")
        if not _TARGET.match(target) and method != b"CONNECT":
            raise HttpParserError("invalid request target")

        headers = []
        lengths = length = hosts = 0
        codings: list = []
        connection: list = []
        upgrade_header = False
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                raise HttpParserError("obsolete line folding")
            name, _, value = line.partition(b":")
            value = value.lstrip(b" \t")  # llhttp keeps trailing whitespace: so do we
            lower = name.lower()
            if lower == b"content-length":
                lengths += 1
                digits = value.rstrip(b" \t")
                if lengths > 1 or not digits.isdigit() or int(digits) > _MAX_CONTENT_LENGTH:
                    raise HttpParserError("invalid or repeated Content-Length")
                length = int(digits)
            elif lower == b"transfer-encoding":
                codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
            elif lower in (b"connection", b"proxy-connection"):
                connection.extend(t.strip(b" \t").lower() for t in value.split(b","))
            elif lower == b"upgrade":
                upgrade_header = True
            elif lower == b"host":
                hosts += 1
            headers.append((name, value))
        if codings:
            # As llhttp: a coding list must end with "chunked", which may not appear before.
            if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                raise HttpParserError("invalid Transfer-Encoding")
            if lengths:
                raise HttpParserError("Content-Length together with Transfer-Encoding")

        # h11 checks the request line and each field, and reads a chunked body. It gets the head
        # as it is, or, where llhttp accepts what h11 would refuse, with one space apart, one
        # Host, one coding.
        request_line = b"%s %s %s" % (method, target, b"HTTP/1.1" if version == b"HTTP/1.1" else b"HTTP/1.0")
        if request_line == lines[0] and hosts == 1 and not codings:
            h11_head = head
        else:
            h11_lines = [request_line]
            host_seen = False
            for line, (name, _) in zip(lines[1:], headers):
                lower = name.lower()
                if lower == b"transfer-encoding" or (lower == b"host" and host_seen):
                    continue
                host_seen = host_seen or lower == b"host"
                h11_lines.append(line)
            if codings:
                h11_lines.append(b"transfer-encoding: chunked")
            if not hosts:
                h11_lines.append(b"host: ")
            h11_head = b"\r\n".join(h11_lines)
        body = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BUFFERED_HEAD)
        body.receive_data(h11_head + b"\r\n\r\n")
        if type(body.next_event()) is not h11.Request:
            raise HttpParserError("invalid request head")

        self._method = method
        self._version = VERSIONS[version]
        # llhttp's rules: HTTP/1.1 keeps the connection unless "close"; others only with "keep-alive".
        if self._version == "1.1":
            self._keep_alive = b"close" not in connection
        else:
            self._keep_alive = b"keep-alive" in connection
        self._upgrade = method == b"CONNECT" or (upgrade_header and b"upgrade" in connection)
        cb = self._cb
        try:  # the head's callbacks at once, as httptools makes them (one wrapper, not one each)
            if cb["on_url"] is not None:
                cb["on_url"](target)
            on_header = cb["on_header"]
            if on_header is not None:
                for name, value in headers:
                    on_header(name, value)
            if cb["on_headers_complete"] is not None:
                cb["on_headers_complete"]()
        except Exception as e:
            raise HttpParserCallbackError("a callback failed") from e
        if self._upgrade:
            # As llhttp: the request ends with its head, and parsing stops at the bytes after it.
            self._finish()
            raise HttpParserUpgrade(offset)
        self._in_body = True
        if codings:
            self._body = body  # h11 decodes the chunks
        else:
            # A Content-Length body (or none) is just counted: h11 has checked the head.
            self._body = None
            self._remaining = length

    def _read_body(self) -> bool:
        """Hand over what the buffer has of the current body; True once it is complete (what
        follows it stays in the buffer)."""
        buf = self._buffer
        body = self._body
        if body is None:
            take = min(self._remaining, len(buf))
            if take:
                self._remaining -= take
                piece = bytes(buf[:take])
                del buf[:take]
                self._call("on_body", piece)
            if self._remaining:
                return False
            self._in_body = False
            self._finish()
            return True
        if buf:
            body.receive_data(bytes(buf))
            buf.clear()
        while True:
            event = body.next_event()
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Data:
                self._call("on_body", bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                trailers = event.headers.raw_items()
                for name, value in trailers:
                    # As llhttp: trailers may not reframe the message, nor carry control characters.
                    if name.lower() in (b"content-length", b"transfer-encoding") or _CONTROL.search(value):
                        raise HttpParserError("invalid trailer field")
                for name, value in trailers:  # chunked trailers, reported as llhttp reports them
                    self._call("on_header", name, value)
                buf += body.trailing_data[0]
                self._body = None
                self._in_body = False
                self._finish()
                return True
            else:
                raise HttpParserError(f"unexpected {event!r}")

    def _finish(self) -> None:
        if not self._keep_alive:
            self._closed = True
        self._call("on_message_complete")
