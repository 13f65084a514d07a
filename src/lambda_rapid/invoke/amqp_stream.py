"""A response streamed to its AMQP-RPC caller, one reply message per piece (``docs/amqp.md``).

A request marked ``X-Amz-Invoke-Mode: RESPONSE_STREAM`` (InvokeWithResponseStream through the
lambda-server) is answered piece by piece as the runtime streams its /response: one reply message
per piece, numbered, then a final InvokeComplete message (``eventstream`` names the headers). It
publishes through ``amqp_replies.ReplyPublisher``; the consumer (``amqp_rpc``) acks the request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Optional

from ..invocation import SUCCESS, Invocation, Result, new_request_id
from . import contract, eventstream
from .amqp_replies import REPLY_WAIT, ReplyPublisher

log = logging.getLogger(__name__)

# A streamed response's bytes not yet confirmed by the broker, beyond which the runtime's /response
# is not read until they are (the Runtime API honours it when its HTTP layer has flow control).
STREAM_WINDOW = 4 * eventstream.PIECE_LIMIT
_OCTET_STREAM = "application/octet-stream"


class ResponseStream:
    """A response streamed to its caller, one reply message per piece (``docs/amqp.md``): pieces
    numbered 0, 1, ... in order, then the final InvokeComplete message, all with this run's id.

    One message is in flight at a time: the pieces the runtime streams meanwhile are joined into
    the next one (up to ``eventstream.PIECE_LIMIT``), so a fast runtime costs few messages and a
    slow one's pieces go out as they come. A publish that fails (the connection dropped) is sent
    again, same number, once the link is back (the caller drops a repeat); after REPLY_WAIT without
    a link the stream is given up (the caller's side ends it by its own bound). Past STREAM_WINDOW
    unconfirmed bytes ``piece`` returns the stream, whose ``when_drained`` says when to go on."""

    __slots__ = ("publisher", "inv", "reply_to", "correlation_id", "run", "seq", "parts", "buffered", "sender",
                 "final", "waiters", "ended", "began", "gave_up")

    def __init__(self, publisher: ReplyPublisher, inv: Invocation, reply_to: str, correlation_id: str) -> None:
        self.publisher = publisher
        self.inv = inv
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.run = new_request_id()
        self.seq = 0  # number of the next message
        self.parts: list = []  # pieces not yet published, in order
        self.buffered = 0  # bytes in ``parts`` and in flight
        self.sender: Optional[asyncio.Task] = None
        self.final: Optional[tuple] = None  # (body, headers) of the last message, once the run is over
        self.waiters: list = []  # when_drained callbacks
        self.ended: asyncio.Future = asyncio.get_event_loop().create_future()  # True: final confirmed
        self.began = False  # a piece was handed over: the caller's stream has started
        self.gave_up = False

    # ---- from the Runtime API (Invocation.on_chunk) --------------------------------------------
    def piece(self, data: bytes) -> Optional[ResponseStream]:
        if not data or self.final is not None or self.gave_up:
            return None
        self.began = True
        self.parts.append(bytes(data))
        self.buffered += len(data)
        self._send_soon()
        return self if self.buffered > STREAM_WINDOW else None

    def when_drained(self, callback) -> None:
        """Call ``callback`` once the unconfirmed bytes are below the window again (or never will be)."""
        if self.buffered <= STREAM_WINDOW or self.gave_up or self.ended.done():
            callback()
        else:
            self.waiters.append(callback)

    # ---- from the consumer (amqp_rpc) ----------------------------------------------------------
    def finish(self, result: Result) -> asyncio.Future:
        """Queue the final message for ``result`` (after any pieces still on their way); the future
        says whether it was confirmed."""
        headers = {contract.REQUEST_ID: self.inv.request_id,
                   contract.EXECUTED_VERSION: self.publisher.function_version}
        log_result = None
        if result.log_tail is not None:
            log_result = headers[contract.LOG_RESULT] = base64.b64encode(result.log_tail).decode()
        if result.outcome == SUCCESS:
            if result.body:  # answered with an ordinary (not streamed) /response: one piece
                self.piece(result.body)
            document = eventstream.complete_document(log_result=log_result)
        else:
            code, details = eventstream.error_fields(result.body)
            if result.api_error is not None:
                code = result.api_error.code
            document = eventstream.complete_document(code, details, log_result)
            headers[contract.FUNCTION_ERROR] = contract.UNHANDLED
        self.final = (document, headers)
        self._send_soon()
        return self.ended

    def _send_soon(self) -> None:
        if self.sender is None and not self.gave_up:
            self.sender = self.publisher.spawn(self._send())

    async def _send(self) -> None:
        try:
            while not self.gave_up:
                headers = {eventstream.SEQUENCE: self.seq, eventstream.RUN: self.run}
                if self.parts:
                    body = self._take()
                    headers[eventstream.EVENT] = eventstream.PAYLOAD_CHUNK
                    if self.seq == 0:
                        inv = self.inv
                        headers[contract.REQUEST_ID] = inv.request_id
                        headers[contract.EXECUTED_VERSION] = self.publisher.function_version
                        if inv.deadline_ms:
                            headers[eventstream.DEADLINE_IN_MS] = max(0, inv.deadline_ms - int(time.time() * 1000))
                    content_type = _OCTET_STREAM
                elif self.final is not None:
                    body, extra = self.final
                    headers[eventstream.EVENT] = eventstream.INVOKE_COMPLETE
                    headers.update(extra)
                    content_type = "application/json"
                else:
                    return
                if not await self._deliver(body, headers, content_type):
                    return self._give_up()
                self.seq += 1
                if headers[eventstream.EVENT] == eventstream.INVOKE_COMPLETE:
                    self.ended.set_result(True)
                    return self._drained()
                self.buffered -= len(body)
                if self.buffered <= STREAM_WINDOW:
                    self._drained()
        finally:
            self.sender = None

    def _take(self) -> bytes:
        """The next piece message: the waiting pieces joined, up to PIECE_LIMIT bytes."""
        parts, limit = self.parts, eventstream.PIECE_LIMIT
        first = parts[0]
        if len(first) >= limit or len(parts) == 1:
            if len(first) > limit:
                parts[0] = first[limit:]
                return first[:limit]
            del parts[0]
            return first
        out = bytearray()
        while parts and len(out) + len(parts[0]) <= limit:
            out += parts.pop(0)
        if parts and len(out) < limit:
            room = limit - len(out)
            out += parts[0][:room]
            parts[0] = parts[0][room:]
        return bytes(out)

    async def _deliver(self, body: bytes, headers: dict, content_type: str) -> bool:
        """Publish one message until it is confirmed, across reconnects; False after REPLY_WAIT
        without a connection that takes it."""
        publisher = self.publisher
        link = publisher.link
        loop = asyncio.get_event_loop()
        give_up_at = None
        while True:
            generation = link.generation
            if await publisher.publish(self.reply_to, self.correlation_id, body, headers, content_type):
                return True
            now = loop.time()
            if give_up_at is None:
                give_up_at = now + REPLY_WAIT
            if now >= give_up_at or link.closing:
                return False
            # Wait for the next channel: the link may not have noticed the loss yet.
            while link.generation == generation or link.underlay is None:
                left = give_up_at - loop.time()
                if left <= 0 or link.closing:
                    return False
                try:
                    await asyncio.wait_for(link.connected.wait(), left)
                except asyncio.TimeoutError:
                    return False
                if link.generation == generation:
                    await asyncio.sleep(0.05)  # connected, but still the channel that failed
            log.info("stream of %s goes on over the new connection from message %d", self.inv.request_id, self.seq)

    def _give_up(self) -> None:
        log.warning("stream of %s given up at message %d: no AMQP connection for %.0f s", self.inv.request_id,
                    self.seq, REPLY_WAIT)
        self.gave_up = True
        self.parts = []
        self.buffered = 0
        if not self.ended.done():
            self.ended.set_result(False)
        self._drained()

    def _drained(self) -> None:
        waiters, self.waiters = self.waiters, []
        for callback in waiters:
            callback()
