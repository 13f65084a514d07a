"""A streamed response (InvokeWithResponseStream) in its two wire forms.

**AWS's event stream** (``application/vnd.amazon.eventstream``), as the Invoke API sends it:
``PayloadChunk`` events carrying the function's bytes, then one ``InvokeComplete``. A message is a
prelude (total length, headers length, CRC32 of those 8 bytes), the headers (name length, name,
value type 7 = string, value length, value), the payload and a CRC32 of everything before it;
integers are big-endian.

**Over AMQP-RPC** (``docs/amqp.md``): a request with ``X-Amz-Invoke-Mode: RESPONSE_STREAM`` is
answered with one reply message per piece, numbered from 0 (``X-Stream-Sequence``, ``X-Stream-Run``),
then a final ``InvokeComplete`` message whose body is the InvokeComplete JSON document. The daemon
(``amqp_rpc``) writes them; the lambda-server (``server.router``) puts them back in order with a
:class:`Resequencer` and re-frames them as the event stream above.

Pure: no I/O, no knowledge of HTTP, AMQP connections or the pool.
"""

from __future__ import annotations

import json
import struct
from typing import Optional
from zlib import crc32

_PRELUDE = struct.Struct(">II")
_CRC = struct.Struct(">I")


def message(headers: bytes, payload: bytes) -> bytes:
    """One event stream message from its encoded ``headers`` and its ``payload``."""
    prelude = _PRELUDE.pack(16 + len(headers) + len(payload), len(headers))
    prelude += _CRC.pack(crc32(prelude))
    body = prelude + headers + payload
    return body + _CRC.pack(crc32(body))


def _event_headers(event_type: str, content_type: str) -> bytes:
    parts = []
    for name, value in ((":event-type", event_type), (":content-type", content_type), (":message-type", "event")):
        n, v = name.encode(), value.encode()
        parts.append(struct.pack(">B", len(n)) + n + struct.pack(">BH", 7, len(v)) + v)
    return b"".join(parts)


_CHUNK_HEADERS = _event_headers("PayloadChunk", "application/octet-stream")
_COMPLETE_HEADERS = _event_headers("InvokeComplete", "application/json")


def payload_chunk(data: bytes) -> bytes:
    """A ``PayloadChunk`` event: boto3 gives ``data`` back as ``event["PayloadChunk"]["Payload"]``."""
    return message(_CHUNK_HEADERS, data)


def invoke_complete(error_code: Optional[str] = None, error_details: Optional[str] = None,
                    log_result: Optional[str] = None) -> bytes:
    """The ``InvokeComplete`` event that ends every stream (with the error, if the invocation failed)."""
    return message(_COMPLETE_HEADERS, complete_document(error_code, error_details, log_result))


def complete_document(error_code: Optional[str] = None, error_details: Optional[str] = None,
                      log_result: Optional[str] = None) -> bytes:
    """The JSON of an ``InvokeComplete`` (AWS's InvokeWithResponseStreamCompleteEvent: ErrorCode,
    ErrorDetails, LogResult, each only when there is one)."""
    doc = {}
    if error_code is not None:
        doc["ErrorCode"] = error_code
    if error_details is not None:
        doc["ErrorDetails"] = error_details
    if log_result is not None:
        doc["LogResult"] = log_result
    return json.dumps(doc, separators=(",", ":")).encode()


def complete_fields(document: bytes) -> tuple:
    """(ErrorCode, ErrorDetails, LogResult) of an InvokeComplete JSON document; the string members
    only (a member of another type, or a document that is not a JSON object, counts as absent)."""
    try:
        doc = json.loads(document)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return None, None, None
    return tuple(value if isinstance(value, str) else None
                 for value in (doc.get("ErrorCode"), doc.get("ErrorDetails"), doc.get("LogResult")))


def error_fields(body: bytes) -> tuple:
    """(ErrorCode, ErrorDetails) of InvokeComplete from a function error body: its errorType and
    errorMessage when it is the usual JSON object, else ``Unhandled`` and the body as text."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errorType"), str):
        message = doc.get("errorMessage")
        return doc["errorType"], message if isinstance(message, str) else json.dumps(message)
    return "Unhandled", body.decode("utf-8", "replace")


# ---- the same stream over AMQP-RPC -------------------------------------------------------------

INVOKE_MODE = "X-Amz-Invoke-Mode"  # request header; AWS's InvokeMode names (BUFFERED, RESPONSE_STREAM)
BUFFERED = "BUFFERED"
RESPONSE_STREAM = "RESPONSE_STREAM"
SEQUENCE = "X-Stream-Sequence"  # reply header: 0, 1, 2, ... in the order the caller must see them
RUN = "X-Stream-Run"  # reply header: which run of the request (a redelivered request runs again)
EVENT = "X-Stream-Event"  # reply header: PAYLOAD_CHUNK or INVOKE_COMPLETE (the last message)
DEADLINE_IN_MS = "X-Stream-Deadline-In-Ms"  # on message 0: ms until the invocation's deadline
PAYLOAD_CHUNK = "PayloadChunk"
INVOKE_COMPLETE = "InvokeComplete"
# Largest piece message: pieces the runtime streams faster than the broker takes them are joined
# up to this size, and a bigger one is split (RabbitMQ refuses messages over its max_message_size).
PIECE_LIMIT = 1024 * 1024
HELD_LIMIT = 64  # messages that came early (a gap before them) held at most, per stream

RERUN = "rerun"  # Resequencer.accept: another run of the request after pieces of this one went out
OVERFLOW = "overflow"  # ... more than HELD_LIMIT messages wait behind a gap that does not fill


class Resequencer:
    """One stream's reply messages, given back in sequence order: repeats (a piece published again
    after a connection loss) are dropped, early ones held until the gap before them fills.

    The first run heard of is followed. Messages of another run mean the request was delivered
    again (its daemon died or lost its connection) and runs anew: before anything was given back
    the newer run is followed instead (the caller sees one clean run), after it the stream cannot
    go on (the caller has part of one run's output; the other's may differ) and ``accept`` says
    RERUN. A run left behind is ignored from then on."""

    __slots__ = ("run", "next", "held", "given", "left")

    def __init__(self) -> None:
        self.run: Optional[str] = None
        self.next = 0
        self.held: dict = {}  # sequence number -> message, for the ones that came early
        self.given = False  # something of ``run`` was given back
        self.left: set = set()  # runs given up for a newer one

    def accept(self, run: str, seq: int, item: object):
        """The messages now due, in order (a list, often just ``[item]``), or RERUN / OVERFLOW."""
        if run != self.run:
            if run in self.left:
                return []
            if self.run is not None:
                if self.given:
                    return RERUN
                self.left.add(self.run)
            self.run, self.next, self.held = run, 0, {}
        if seq < self.next or seq in self.held:
            return []  # a repeat
        if seq > self.next:
            self.held[seq] = item
            return OVERFLOW if len(self.held) > HELD_LIMIT else []
        due = [item]
        self.next = seq = seq + 1
        held = self.held
        while held and seq in held:
            due.append(held.pop(seq))
            self.next = seq = seq + 1
        self.given = True
        return due
