"""A pure-Python HTTP/1.1 request parser with the httptools interface that ``httpserver`` uses.

It exists for the single-file build (``bin/lambda-runtime-api-daemon``), which cannot carry C
extensions: ``httpserver`` imports this module only when ``import httptools`` fails, and the
httptools path stays as it is. Like httptools it calls ``on_message_begin``, ``on_url``,
``on_header``, ``on_headers_complete``, ``on_body``, ``on_message_complete`` on the protocol object
it is given, and raises :class:`HttpParserError`, :class:`HttpParserCallbackError` (when a callback
raises; the callback's exception is the ``__context__``) or :class:`HttpParserUpgrade`. Bodies
are framed by ``Content-Length`` or ``Transfer-Encoding: chunked``; anything ambiguous (both,
duplicate differing lengths, an unknown transfer coding) is refused, as llhttp refuses it.

It knows nothing about limits on header or body size beyond a bound on what it buffers: the
connection enforces those through the callbacks, exactly as with httptools.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["HttpParserCallbackError", "HttpParserError", "HttpParserUpgrade", "HttpRequestParser"]

# Bytes buffered for an incomplete request head or chunk-size line before the request is refused.
MAX_BUFFERED_HEAD = 128 * 1024
MAX_CHUNK_LINE = 4096

METHODS = frozenset(m.encode() for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    "COPY", "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND",
    "UNBIND", "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE",
    "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY",
))
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^\x00-\x20\x7f]+) HTTP/(\d)\.(\d)")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class HttpParserError(Exception):
    """The bytes are not a valid HTTP/1.x request."""


class HttpParserCallbackError(HttpParserError):
    """A callback raised; the original exception is this one's ``__context__``."""


class HttpParserUpgrade(HttpParserError):
    """The request asks for a protocol upgrade (or is a CONNECT); the argument is the offset."""


# Parser states.
_HEAD, _LENGTH_BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_DATA_END, _TRAILERS, _DEAD = range(7)


class HttpRequestParser:
    __slots__ = ("_protocol", "_buffer", "_state", "_remaining", "_method", "_version", "_keep_alive",
                 "_upgrade", "_begun", "_cb")

    def __init__(self, protocol: object) -> None:
        self._protocol = protocol
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._method = b""
        self._version = (1, 1)
        self._keep_alive = True
        self._upgrade = False
        self._begun = False
        # Bound callbacks (or None) looked up once, as httptools does.
        self._cb = {name: getattr(protocol, name, None) for name in (
            "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body",
            "on_message_complete")}

    # ---- httptools' public interface ---------------------------------------------------------
    def get_method(self) -> bytes:
        return self._method

    def get_http_version(self) -> str:
        return f"{self._version[0]}.{self._version[1]}"

    def should_keep_alive(self) -> bool:
        return self._keep_alive

    def should_upgrade(self) -> bool:
        return self._upgrade

    def feed_data(self, data: bytes) -> None:
        if self._state == _DEAD:
            raise HttpParserError("the parser is in an error state")
        try:
            self._feed(data)
        except HttpParserError:
            self._state = _DEAD
            raise

    # ---- parsing -----------------------------------------------------------------------------
    def _call(self, name: str, *args) -> None:
        callback = self._cb[name]
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as e:
            # Raised inside the handler so the callback's exception becomes __context__.
            raise HttpParserCallbackError(f"the {name} callback failed") from e

    def _feed(self, data: bytes) -> None:
        buf = self._buffer
        prior = len(buf)  # bytes of earlier feeds still buffered (a head cut across packets)
        buf += data
        pos = 0
        while True:
            state = self._state
            if state == _HEAD:
                # Empty lines before a request line are tolerated (RFC 9112 section 2.2).
                while buf.startswith(b"\r\n", pos):
                    pos += 2
                if not self._begun and len(buf) > pos and buf[pos:] != b"\r":
                    # As llhttp: a message begins with its first byte, so the connection's request
                    # timer runs from there (a slow client sending half a head is timed out).
                    self._begun = True
                    self._call("on_message_begin")
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_BUFFERED_HEAD:
                        raise HttpParserError("request head too large")
                    if _BARE_LF.search(buf, pos):
                        raise HttpParserError("bare LF in the request head")
                    break
                head = bytes(buf[pos:end])
                pos = end + 4
                if _BARE_LF.search(head):
                    raise HttpParserError("bare LF in the request head")
                self._parse_head(head)
                if self._upgrade:
                    # As httptools: the request is complete, then the parser stops with the offset.
                    self._call("on_message_complete")
                    del buf[:pos]
                    self._state = _DEAD
                    raise HttpParserUpgrade(pos - prior)  # as httptools: an offset into ``data``
            elif state == _LENGTH_BODY:
                if pos >= len(buf):
                    break
                pos = self._body(buf, pos)
                if self._remaining == 0:
                    self._finish_message()
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE:
                        raise HttpParserError("chunk size line too long")
                    break
                line = bytes(buf[pos:end])
                pos = end + 2
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_text) or len(size_text) > 16:
                    raise HttpParserError("invalid chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if pos >= len(buf):
                    break
                pos = self._body(buf, pos)
                if self._remaining == 0:
                    self._state = _CHUNK_DATA_END
            elif state == _CHUNK_DATA_END:
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HttpParserError("chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_BUFFERED_HEAD:
                        raise HttpParserError("trailers too large")
                    break
                line = bytes(buf[pos:end])
                pos = end + 2
                if not line:
                    self._finish_message()
                else:
                    name, value = self._header_line(line)
                    self._call("on_header", name, value)
            else:  # pragma: no cover - _DEAD is handled in feed_data
                raise HttpParserError("the parser is in an error state")
        del buf[:pos]

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise HttpParserError("invalid request line")
        method, url, major, minor = match.groups()
        if method not in METHODS:
            raise HttpParserError("invalid method")
        if (major, minor) not in ((b"1", b"0"), (b"1", b"1"), (b"2", b"0")):
            raise HttpParserError("unsupported HTTP version")
        self._method = method
        self._version = (int(major), int(minor))
        self._remaining = 0
        if not self._begun:
            self._begun = True
            self._call("on_message_begin")
        self._call("on_url", url)

        length: Optional[int] = None
        chunked = False
        connection = b""
        upgrade_header = False
        on_header = self._cb["on_header"]
        for line in lines[1:]:
            name, value = self._header_line(line)
            lower = name.lower()
            if lower == b"content-length":
                digits = value.rstrip(b" \t")
                if not digits.isdigit() or len(digits) > 18:
                    raise HttpParserError("invalid Content-Length")
                if length is not None:
                    raise HttpParserError("duplicate Content-Length")  # as llhttp, even when equal
                length = int(digits)
            elif lower == b"transfer-encoding":
                codings = [c.strip(b" \t").lower() for c in value.split(b",")]
                if codings[-1] != b"chunked" or b"chunked" in codings[:-1] or chunked:
                    raise HttpParserError("unsupported Transfer-Encoding")
                chunked = True
            elif lower == b"connection":
                connection += b"," + value.lower()
            elif lower == b"upgrade":
                upgrade_header = True
            if on_header is not None:
                try:
                    on_header(name, value)
                except Exception as e:
                    raise HttpParserCallbackError("the on_header callback failed") from e
            if chunked and length is not None:
                raise HttpParserError("Content-Length together with Transfer-Encoding")

        tokens = {t.strip(b" \t") for t in connection.split(b",")}
        if self._version == (1, 1):
            self._keep_alive = b"close" not in tokens
        else:
            self._keep_alive = b"keep-alive" in tokens
        self._upgrade = method == b"CONNECT" or (upgrade_header and b"upgrade" in tokens)

        self._call("on_headers_complete")
        if self._upgrade:
            return
        if chunked:
            self._state = _CHUNK_SIZE
        elif length:
            self._remaining = length
            self._state = _LENGTH_BODY
        else:
            self._finish_message()

    @staticmethod
    def _header_line(line: bytes) -> tuple:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also refuses obsolete line folding (a line starting with whitespace).
            raise HttpParserError("invalid header line")
        value = value.lstrip(b" \t")  # llhttp keeps trailing whitespace: so do we
        if _BAD_VALUE.search(value):
            raise HttpParserError("invalid character in a header value")
        return name, value

    def _body(self, buf: bytearray, pos: int) -> int:
        """Hand over what ``buf`` holds of the current body (or chunk) from ``pos``; the new position."""
        take = min(len(buf) - pos, self._remaining)
        self._remaining -= take
        self._call("on_body", bytes(buf[pos:pos + take]))
        return pos + take

    def _finish_message(self) -> None:
        self._state = _HEAD
        self._begun = False
        self._call("on_message_complete")
