"""What flows through the system: an Invocation (made by a front door, run by the pool) and the
Result it ends with. Neither knows about HTTP or AMQP: a front door attaches ``on_done``.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from typing import Callable, Optional

SUCCESS = "success"
FUNCTION_ERROR = "function_error"
TIMEOUT = "timeout"
CRASH = "crash"
INIT_ERROR = "init_error"
THROTTLED = "throttled"
REJECTED = "rejected"
OUTCOMES = (SUCCESS, FUNCTION_ERROR, TIMEOUT, CRASH, INIT_ERROR, THROTTLED, REJECTED)

TAIL_BYTES = 4096
_bits = random.Random().getrandbits  # seeded from os.urandom once
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_SET = (0x4 << 76) | (0x2 << 62)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def new_request_id() -> str:
    """A random (version 4) UUID in its usual text form. Request ids need to be unique, not secret:
    the PRNG avoids a getrandom() system call per invocation."""
    h = f"{(_bits(128) & _UUID_CLEAR) | _UUID_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_INVOCATION_PREFIX = new_request_id()[:24]  # "8-4-4-4-" of a random UUID, drawn once per daemon
_invocation_count = itertools.count(1)


def new_invocation_id() -> str:
    """A fresh ``Lambda-Runtime-Invocation-Id`` (one per hand-over to a runtime): UUID-shaped, a random
    per-daemon prefix and a counter, so it never repeats within a daemon and costs no random draw."""
    return f"{_INVOCATION_PREFIX}{next(_invocation_count):012x}"


def is_uuid(text: str) -> bool:
    return len(text) == 36 and _UUID.match(text) is not None


def new_trace_id() -> str:
    """An X-Ray trace header, as Lambda generates when the caller sent none."""
    r = f"{_bits(160):040x}"
    return f"Root=1-{int(time.time()):08x}-{r[:24]};Parent={r[24:]};Sampled=0"


class Result:
    """How an invocation ended. ``function_error`` marks 200 + X-Amz-Function-Error: Unhandled."""

    __slots__ = ("outcome", "body", "function_error", "log_tail", "api_error")

    def __init__(self, outcome: str, body: bytes, function_error: bool = False, api_error=None) -> None:
        self.outcome = outcome
        self.body = body
        self.function_error = function_error
        self.log_tail: Optional[bytes] = None
        self.api_error = api_error  # an errors.ApiError when the call was refused (429, 503)

    def __repr__(self) -> str:
        return f"Result({self.outcome}, {self.body[:60]!r})"


class Invocation:
    """One call of the function, from its front door's acceptance to its Result."""

    __slots__ = ("request_id", "payload", "client_context", "trace_id", "invocation_type", "tail",
                 "qualifier", "arn", "on_done", "done", "instance", "deadline_ms",
                 "queued_at", "started_at", "log", "on_chunk", "stream_content_type", "observed",
                 "init_duration_ms", "invocation_id", "tenant_id")

    def __init__(self, request_id: str, payload: bytes, *, arn: str, client_context: Optional[str] = None,
                 trace_id: Optional[str] = None, invocation_type: str = "RequestResponse", tail: bool = False,
                 qualifier: Optional[str] = None, on_done: Optional[Callable[[Invocation, Result], None]] = None,
                 tenant_id: Optional[str] = None) -> None:
        self.request_id = request_id
        self.payload = payload
        self.client_context = client_context
        self.trace_id = trace_id or new_trace_id()
        self.invocation_type = invocation_type
        self.tail = tail
        self.qualifier = qualifier
        self.arn = arn
        self.on_done = on_done
        self.done = False
        self.instance = None
        self.deadline_ms = 0
        self.queued_at = 0.0
        self.started_at = 0.0
        self.log: Optional[bytearray] = None  # this invocation's log lines (kept when someone reads them)
        # Set by a front door that streams the response: gets the bytes a runtime streams, as they come.
        self.on_chunk: Optional[Callable[[bytes], None]] = None
        self.stream_content_type: Optional[str] = None  # the Content-Type of the runtime's streamed /response
        self.observed = False  # the sandbox asked for this invocation's Report (telemetry subscribers)
        # The cold start of its instance, if it is the first one there: the init, or for a SnapStart
        # instance (``instance.restored``) the restore.
        self.init_duration_ms: Optional[float] = None
        # Lambda-Runtime-Invocation-Id of its current hand-over to a runtime (None until handed over):
        # an answer that echoes another one is stale (sandbox/runtime_api.py).
        self.invocation_id: Optional[str] = None
        self.tenant_id = tenant_id  # X-Amz-Tenant-Id of a tenant-isolated function's invocation

    @property
    def is_event(self) -> bool:
        return self.invocation_type == "Event"

    def add_log(self, data: bytes) -> None:
        buf = self.log
        if buf is None:
            return
        buf += data
        if len(buf) > 2 * TAIL_BYTES:
            del buf[:-TAIL_BYTES]

    def stream(self, data: bytes) -> Optional[object]:
        """A piece of a streamed response; dropped once the invocation has ended (timed out, crashed).
        Returns what ``on_chunk`` returns: the caller's request while its socket is full (backpressure)."""
        callback = self.on_chunk
        if callback is not None and not self.done:
            return callback(data)
        return None

    def finish(self, result: Result) -> None:
        """Deliver the result once; later calls (a late response after a timeout) are ignored."""
        if self.done:
            return
        self.done = True
        self.payload = b""  # the runtime has it; don't keep it while the invocation is remembered
        callback = self.on_done
        if callback is not None:
            self.on_done = None
            callback(self, result)
