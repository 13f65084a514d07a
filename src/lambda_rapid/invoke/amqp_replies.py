"""The AMQP-RPC consumer's way out: replies published with confirms, acks deferred and batched.

A reply goes to the default exchange with routing key ``reply_to`` (direct reply-to works), the
request's ``correlation_id``, ``content_type`` application/json and the headers
``X-Amz-Function-Error`` / ``X-Amz-Log-Result`` / ``X-Amz-Executed-Version`` (``docs/amqp.md``).
``publish`` returns once the broker confirmed it. A confirmed reply's ack is queued and written
with the next reply (one socket write for both, ``aiormq_tuning.CoalescingFrames``) or after
ACK_DELAY. It knows the link and the contract's header names, not the pool nor the runs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Callable, Optional

from pamqp.commands import Basic

from ..amqp import aiormq_tuning
from ..amqp.link import BrokerLink
from ..config import Config
from ..invocation import SUCCESS, Invocation, Result
from . import contract

log = logging.getLogger(__name__)

# A confirmed reply's ack waits for the next reply (it then shares that reply's socket write, see
# aiormq_tuning.CoalescingFrames) or this many seconds, whichever comes first: a loopback write costs
# ~40 us of CPU, as much as the rest of the ack. The delay only holds a prefetch slot a bit longer.
ACK_DELAY = 0.002
REPLY_WAIT = 30.0  # longest wait for the other delivery's reply to be confirmed before sending it again


class ReplyPublisher:
    def __init__(self, link: BrokerLink, config: Config, spawn: Callable) -> None:
        self.link = link
        self.function_version = config.function_version
        self.retry_after = contract.retry_after(config.timeout)
        self.spawn = spawn  # runs a coroutine as a task the consumer waits for when it closes
        self.acks: list = []  # (tag, generation) whose reply is confirmed, their ack not yet written
        self.ack_timer: Optional[asyncio.TimerHandle] = None

    def channel_lost(self) -> None:
        """The channel is gone: the waiting acks are never written (the broker requeued them)."""
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.cancel()
        self.acks = []

    async def publish_result(self, inv: Invocation, result: Result, reply_to: Optional[str],
                             correlation_id: Optional[str]) -> bool:
        """Publish the reply to ``inv`` (none for an Event): True once confirmed (or none wanted)."""
        if inv.is_event:
            if result.outcome != SUCCESS:
                log.warning("Event invocation %s ended with %s: %s", inv.request_id, result.outcome,
                            result.body[:300])
            return True
        headers = {contract.EXECUTED_VERSION: self.function_version, contract.REQUEST_ID: inv.request_id}
        api_error = result.api_error
        if api_error is not None:
            headers[contract.ERROR_TYPE] = api_error.code
            if api_error.retry_after:
                headers[contract.RETRY_AFTER] = self.retry_after
        if result.function_error:
            headers[contract.FUNCTION_ERROR] = contract.UNHANDLED
        if result.log_tail is not None:
            headers[contract.LOG_RESULT] = base64.b64encode(result.log_tail).decode()
        return await self.publish(reply_to, correlation_id, result.body, headers)

    async def publish(self, reply_to: Optional[str], correlation_id: Optional[str], body: bytes,
                      headers: Optional[dict], content_type: str = "application/json") -> bool:
        """Publish one reply (when one is wanted) and wait for the broker's confirm."""
        if not reply_to:
            return True
        link = self.link
        underlay = link.underlay
        if underlay is None:
            log.warning("reply to %s waits: no AMQP connection (the broker redelivers the request if its "
                        "queue survived, and the copy is answered from this run)", correlation_id)
            return False
        props = Basic.Properties(content_type=content_type, correlation_id=correlation_id,
                                 headers=headers or None, delivery_mode=1)
        if self.acks:
            self.flush_acks()  # queued right before the reply: one socket write for both
        try:
            await aiormq_tuning.publish(underlay, body, reply_to, props)
        except asyncio.CancelledError:
            # aiormq cancels the confirms when it gives the connection up (a heartbeat timeout, as in
            # a network partition): a reply not confirmed, not this task being cancelled. Let it
            # propagate, and the run would be gone before the lost connection's handler keeps it,
            # so its redelivered copy would run again here.
            if aiormq_tuning.being_cancelled():
                raise
            log.warning("reply to %s not confirmed: the AMQP connection was given up; the request stays "
                        "unacked", correlation_id)
            return False
        except Exception as e:
            log.warning("reply to %s not confirmed: %s; the request stays unacked", correlation_id,
                        link.describe(e))
            return False
        return True

    def ack(self, tag: int, generation: int) -> bool:
        """Queue the ack of ``tag`` (written with the next reply, or after ACK_DELAY); False when
        its channel is gone (the broker has requeued it already)."""
        link = self.link
        if generation != link.generation or link.underlay is None:
            return False
        self.acks.append((tag, generation))
        if self.ack_timer is None:
            self.ack_timer = asyncio.get_event_loop().call_later(ACK_DELAY, self.flush_acks)
        return True

    def flush_acks(self, drain: bool = False) -> Optional[asyncio.Future]:
        """Hand the waiting acks to aiormq's writer as one frame batch (a future for its drain
        with ``drain``). Acks whose channel is gone are not sent: the consumer keeps their requests."""
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.cancel()
        if not self.acks:
            return None
        link = self.link
        underlay = link.underlay
        acks, self.acks = self.acks, []
        if underlay is None or underlay.is_closed:
            return None
        generation = link.generation
        tags = [tag for tag, of in acks if of == generation]
        if not tags:
            return None
        drained = asyncio.get_event_loop().create_future() if drain else None
        pending = aiormq_tuning.write_acks(underlay, tags, drained)
        if pending is not None:  # aiormq's write queue is full: queue them in a task
            self.spawn(pending)
        return drained

    async def requeue(self, tag: int, generation: int) -> None:
        link = self.link
        if generation != link.generation or link.underlay is None:
            return
        try:
            await link.underlay.basic_nack(tag, requeue=True)
        except Exception as e:
            log.warning("requeue of message %d failed: %s", tag, link.describe(e))
