"""What the AMQP-RPC consumer remembers of its runs across a dropped channel (``amqp_rpc``).

A request is acked only once its reply is confirmed, so when the connection drops the broker
redelivers every request that ran or runs on the dead channel. ``RunMemory`` keeps, for each of
them, a ``Kept``: its run, its result until a reply is confirmed, whether a reply is being sent;
and the keys of the requests acked lately on the live channel (their acks may not have reached
the broker, so they come back too and are acked again without running). Bounded in count, in
reply bytes held, and in age. A request is known by its key: (correlation_id, reply_to, body
length).

It knows nothing of the broker or the pool: the bookkeeping, and how a copy is answered from a
kept run (``answer_copy``, through the consumer's ``amqp_replies.ReplyPublisher``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Optional

from ..invocation import Invocation, Result
from .amqp_replies import REPLY_WAIT, ReplyPublisher

# Acked requests remembered on the live channel: when it dies, their acks may not have reached the
# broker, so these come back too and are acked again without running (at least this many).
RECENT_ACKS = 1024
# Kept runs of dead channels, waiting for their redelivered copies: bounded in count, in reply
# bytes held, and in age (a copy that comes later than this runs again).
KEPT_COUNT = 10_000
KEPT_BYTES = 64 * 1024 * 1024
KEPT_SECONDS = 600.0
REQUEUE = object()  # a Result stand-in: give the message back to the broker instead of replying


class Kept:
    """A request that ran (or runs) here on a channel that died: what its redelivered copy gets."""

    __slots__ = ("inv", "future", "result", "replied", "sending", "at", "size", "stream")

    def __init__(self, inv: Optional[Invocation], future: Optional[asyncio.Future], result: Optional[Result],
                 replied: bool, stream: Optional[object] = None) -> None:
        self.inv = inv
        self.future = future  # the run's Result while it still runs
        self.result = result  # held only until a reply is confirmed
        self.replied = replied  # a reply was confirmed (or none is wanted): a copy only needs its ack
        self.sending: Optional[asyncio.Future] = None  # a reply being published right now
        self.at = time.monotonic()
        self.size = len(result.body) if result is not None and not replied else 0
        # A streamed response (amqp_stream.ResponseStream) goes on from its own run (on the next
        # channel): a copy only waits for it.
        self.stream = stream


class RunMemory:
    """The kept runs of dead channels (oldest first) and the recent acks of the live one."""

    def __init__(self, recent_acks: int = RECENT_ACKS) -> None:
        self.kept: OrderedDict = OrderedDict()  # key -> Kept, oldest first
        self.kept_bytes = 0
        self.recent: deque = deque(maxlen=max(RECENT_ACKS, recent_acks))

    def __bool__(self) -> bool:
        return bool(self.kept)

    def acked(self, key: Optional[tuple]) -> None:
        """The request of ``key`` is acked on the live channel."""
        if key is not None:
            self.recent.append(key)

    def channel_lost(self) -> None:
        """The live channel died: its recent acks may be lost, so their copies only need an ack."""
        recent, self.recent = self.recent, deque(maxlen=self.recent.maxlen)
        for key in recent:
            if key not in self.kept:
                self.keep(key, Kept(None, None, None, True))

    def find(self, key: tuple) -> Optional[Kept]:
        """The kept run of ``key``, unless there is none or it is too old (then it is forgotten)."""
        kept = self.kept.get(key)
        if kept is None:
            return None
        if time.monotonic() - kept.at <= KEPT_SECONDS:
            return kept
        self.forget(key)  # too old: run it again
        return None

    def hold(self, key: tuple, kept: Kept, result: Result) -> None:
        """Keep ``result`` for a copy of the request until a reply is confirmed (counted in bytes)."""
        kept.result = result
        kept.at = time.monotonic()
        if self.kept.get(key) is kept:
            self.kept_bytes += len(result.body) - kept.size
        kept.size = len(result.body)

    def settled(self, key: tuple, kept: Kept, replied: bool) -> None:
        """A reply attempt ended: once one is confirmed, drop the result (a copy only needs its ack)."""
        if replied:
            kept.replied = True
            if self.kept.get(key) is kept:
                self.kept_bytes -= kept.size
            kept.size = 0
            kept.result = None
        sending, kept.sending = kept.sending, None
        if sending is not None and not sending.done():
            sending.set_result(None)

    def keep(self, key: tuple, kept: Kept) -> None:
        old = self.kept.pop(key, None)
        if old is not None:
            self.kept_bytes -= old.size
        self.kept[key] = kept
        self.kept_bytes += kept.size
        while len(self.kept) > KEPT_COUNT or (self.kept_bytes > KEPT_BYTES and len(self.kept) > 1):
            _, dropped = self.kept.popitem(last=False)
            self.kept_bytes -= dropped.size

    def forget(self, key: tuple) -> None:
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.kept_bytes -= kept.size

    async def answer_copy(self, key: tuple, kept: Kept, replies: ReplyPublisher, reply_to: Optional[str],
                          correlation_id: str) -> bool:
        """Answer a redelivered copy from its kept run: wait for the run (or its stream), send its
        reply unless one was confirmed (or is on its way from the other delivery). True when the
        copy may be acked, which ends the keeping."""
        stream = kept.stream
        if stream is not None:
            # The run streams (or streamed) to its caller from this daemon, over the new channel if
            # it still runs: the copy is acked once the stream has ended, and never runs again here.
            await stream.ended
            return True
        future = kept.future
        if future is not None:
            result = await future  # at once when the run is over
            kept.future = None
            if result is not REQUEUE and not kept.replied and kept.result is None:
                self.hold(key, kept, result)
        while not kept.replied:
            sending = kept.sending
            if sending is not None:  # the other delivery of this request is publishing the reply
                await asyncio.wait([sending], timeout=REPLY_WAIT)
                if kept.sending is sending:
                    kept.sending = None  # no outcome in time: send it from here
                continue
            if kept.result is None or kept.inv is None:
                break  # nothing to send: the run never started (it went back to the queue)
            kept.sending = asyncio.get_event_loop().create_future()
            replied = await replies.publish_result(kept.inv, kept.result, reply_to, correlation_id)
            self.settled(key, kept, replied)
            break
        return kept.replied
