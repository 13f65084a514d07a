"""AWS event stream framing (``application/vnd.amazon.eventstream``), as InvokeWithResponseStream
sends it: ``PayloadChunk`` events carrying the function's bytes, then one ``InvokeComplete``.

A message is a prelude (total length, headers length, CRC32 of those 8 bytes), the headers (name
length, name, value type 7 = string, value length, value), the payload and a CRC32 of everything
before it; integers are big-endian. Pure encoding: no I/O, no knowledge of HTTP or the pool.
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
    doc = {}
    if error_code is not None:
        doc["ErrorCode"] = error_code
    if error_details is not None:
        doc["ErrorDetails"] = error_details
    if log_result is not None:
        doc["LogResult"] = log_result
    return message(_COMPLETE_HEADERS, json.dumps(doc, separators=(",", ":")).encode())
