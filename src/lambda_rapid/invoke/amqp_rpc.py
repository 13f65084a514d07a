"""The daemon's AMQP-RPC front door: messages on the function's queue in, replies out.

Thin, like ``http_api``: each request message is read as the Invoke contract has it
(``amqp_request.RequestReader``), the valid call becomes an Invocation for the pool and its Result
a reply (``amqp_replies.ReplyPublisher``: confirmed, then the request acked). API-level refusals
(bad client context, oversized body, 429) are replies carrying ``x-amzn-ErrorType``; a message
that cannot be understood is answered, never a crash.

A request marked ``X-Amz-Invoke-Mode: RESPONSE_STREAM`` (InvokeWithResponseStream through the
lambda-server) is answered piece by piece as the runtime streams its /response
(``amqp_stream.ResponseStream``): one reply message per piece, numbered, then a final InvokeComplete message
(``eventstream`` names the headers, ``docs/amqp.md`` the format). Without that header a streaming
runtime's pieces are joined into the one reply, as before.

A request is acked only once its reply is confirmed by the broker, so a daemon that dies
mid-invocation loses nothing: the broker redelivers. A request does not run twice *here*: when
the connection drops, every request that ran or runs on the dead channel is kept
(``amqp_memory.RunMemory``) with
its run, its result until the reply is confirmed, and whether the ack may be lost; its
redelivered copy is then answered from that run (waiting for it if it still runs), its reply sent
once, and only the copy is acked. Bounded in count, bytes and age.

It never talks to the Invoke API or the Runtime API, only to the pool. Connection upkeep
(attempts, backoff, reconnect) is ``amqp.link.BrokerLink``'s; aiormq internals are
``amqp.aiormq_tuning``'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from .. import errors
from ..amqp import aiormq_tuning
from ..amqp.link import BrokerLink, header_text
from ..config import Config
from ..invocation import Invocation, Result
from ..pool import Pool
from . import contract
from .amqp_memory import REQUEUE, Kept, RunMemory
from .amqp_replies import ReplyPublisher
from .amqp_request import RequestReader
from .amqp_stream import ResponseStream

log = logging.getLogger(__name__)

# Messages one daemon may hold per runtime slot (running + waiting locally). Too few and every
# request pays an ack -> deliver round trip through the broker before a freed runtime gets work
# (measured: 2 per slot gave ~30% fewer replies/s at 8 in flight); too many and one replica hoards
# requests while another idles. 4 keeps a MAX_CONCURRENCY=2 daemon fed at 8 requests in flight.
PREFETCH_PER_SLOT = 4


def prefetch_count(config: Config) -> int:
    return config.max_concurrency * config.runtime_max_concurrency * PREFETCH_PER_SLOT


class Delivery:
    """One request message from receipt to ack (or requeue)."""

    __slots__ = ("tag", "generation", "inv", "future", "key", "replying", "kept", "stream")

    def __init__(self, tag: int, generation: int) -> None:
        self.tag = tag
        self.generation = generation
        self.inv: Optional[Invocation] = None
        self.future: Optional[asyncio.Future] = None
        self.stream: Optional[ResponseStream] = None  # a response streamed to the caller
        # (correlation_id, reply_to, body length): what recognises a redelivered copy of this request
        self.key: Optional[tuple] = None
        self.replying = False  # its reply is being published
        self.kept: Optional[Kept] = None  # set when its channel died while it ran or replied


class AmqpRpc:
    def __init__(self, pool: Pool, config: Config) -> None:
        self.pool = pool
        self.config = config
        self.queue_name = config.function_name
        self.reader = RequestReader(config, lambda request_id: pool.is_active(request_id))
        self.link = BrokerLink(config.amqp_uri or "", "lambda-runtime-api-daemon " + config.function_name,
                               self._setup, self._lost)
        self.consumer_tag: Optional[str] = None
        self.stopping = False
        self.active: set = set()  # Deliveries not yet acked or requeued
        self.memory = RunMemory(2 * prefetch_count(config))
        self.tasks: set = set()
        self.replies = ReplyPublisher(self.link, config, self._spawn)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect in the background: the HTTP endpoint must not wait for the broker."""
        self.link.start()

    async def _setup(self, channel) -> None:
        underlay = await channel.get_underlay_channel()
        # Per-consumer prefetch (global QoS is refused by quorum queues).
        await channel.set_qos(prefetch_count=prefetch_count(self.config))
        generation = self.link.generation
        aiormq_tuning.on_consumer_cancel(underlay, lambda _frame: self._cancelled_by_broker(channel, generation))
        await self._consume(channel, generation)

    async def _consume(self, channel, generation: int) -> None:
        """Declare the function's queue and consume it (again, after the broker cancelled us)."""
        if self.stopping:
            return
        config = self.config
        durable = config.amqp_durable
        await channel.declare_queue(self.queue_name, durable=durable, auto_delete=not durable,
                                    arguments={"x-queue-type": config.amqp_queue_type})

        tasks = self.tasks
        create_task = asyncio.get_event_loop().create_task

        def on_message(message) -> None:
            # A task of our own: aiormq cancels its consumer tasks when the channel closes, and a
            # running invocation must outlive its channel (its redelivered copy waits for it).
            task = create_task(self._handle(message, generation))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        underlay = await channel.get_underlay_channel()
        ok = await underlay.basic_consume(self.queue_name, on_message, no_ack=False)
        self.consumer_tag = ok.consumer_tag
        log.info("consuming queue %r (prefetch %d, %s %s queue)", self.queue_name, prefetch_count(config),
                 "durable" if durable else "auto-delete", config.amqp_queue_type)

    def _cancelled_by_broker(self, channel, generation: int) -> None:
        """The broker cancelled our consumer (the queue was deleted): declare it again and go on,
        rather than sit on an open connection that receives nothing."""
        if self.stopping or generation != self.link.generation:
            return
        log.warning("the broker cancelled the consumer of queue %r (deleted?); declaring it again",
                    self.queue_name)

        async def again() -> None:
            try:
                await self._consume(channel, generation)
            except Exception as e:
                log.warning("could not consume queue %r again: %s; reconnecting", self.queue_name,
                            self.link.describe(e))
                connection = self.link.connection
                if connection is not None:
                    await connection.close()

        self._spawn(again())

    def _spawn(self, coro) -> asyncio.Task:
        """A task of ours: ``close`` waits for it, and it outlives the channel it started on."""
        task = asyncio.get_event_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _lost(self) -> None:
        """The channel is gone and its unacked messages go back to the queue: give back what has
        not started; keep what ran or runs on it, for its redelivered copy."""
        self.consumer_tag = None
        self.replies.channel_lost()  # acks never written: their keys are in the memory's recent acks
        memory = self.memory
        memory.channel_lost()
        for delivery in list(self.active):
            inv = delivery.inv
            if inv is None or delivery.kept is not None:
                continue
            if inv.instance is None and not inv.done:
                self.pool.abandon(inv)
                self._resolve(delivery, REQUEUE)
            elif delivery.key is not None:
                kept = delivery.kept = Kept(inv, delivery.future, None, False, delivery.stream)
                if delivery.replying:
                    kept.sending = asyncio.get_event_loop().create_future()
                memory.keep(delivery.key, kept)

    async def stop_consuming(self) -> None:
        """Cancel the consumer and give back every message that has not reached a runtime."""
        self.stopping = True
        underlay, tag = self.link.underlay, self.consumer_tag
        self.consumer_tag = None
        if underlay is not None and tag is not None:
            try:
                await asyncio.wait_for(underlay.basic_cancel(tag), 5.0)
            except Exception as e:
                log.warning("could not cancel the AMQP consumer: %s", self.link.describe(e))
        for delivery in list(self.active):
            inv = delivery.inv
            if inv is not None and inv.instance is None and not inv.done:
                self.pool.abandon(inv)
                self._resolve(delivery, REQUEUE)
        if self.active:
            await asyncio.sleep(0)  # let the handlers requeue

    async def close(self) -> None:
        """After the pool drained: let the last replies and acks go out, then close the connection."""
        self.stopping = True
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5.0)
        drained = self.replies.flush_acks(drain=True)
        if drained is not None:
            try:
                await asyncio.wait_for(drained, 2.0)
            except Exception:
                pass
        await self.link.close()

    # ---- one message ---------------------------------------------------------------------------
    async def _handle(self, message, generation: int) -> None:
        delivery = Delivery(message.delivery.delivery_tag, generation)
        self.active.add(delivery)
        try:
            await self._run(message, delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never leave a message unanswered and unacked because of a bug: it would hold a
            # prefetch slot for the life of the channel.
            log.exception("error while handling AMQP message %s", delivery.tag)
            props = message.header.properties
            try:
                await self._answer(delivery, header_text(props.reply_to), props.correlation_id,
                                   errors.SERVICE.body("Internal error while handling the request."),
                                   {contract.ERROR_TYPE: errors.SERVICE.code})
            except Exception:
                log.exception("error while answering AMQP message %s", delivery.tag)
        finally:
            self.active.discard(delivery)

    async def _run(self, message, delivery: Delivery) -> None:
        props = message.header.properties
        reply_to = header_text(props.reply_to)
        correlation_id = props.correlation_id
        if self.stopping or not self.pool.accepting:
            return await self._requeue(delivery)
        try:
            inv, streaming = self.reader.read(message)
        except contract.Refusal as refusal:
            self.pool.metrics.outcomes["rejected"] += 1
            code = refusal.api_error.code
            log.info("AMQP request refused (%s): %s", code, refusal.message)
            return await self._answer(delivery, reply_to, correlation_id, refusal.body(), {contract.ERROR_TYPE: code})

        if inv.invocation_type == "DryRun":
            return await self._answer(delivery, reply_to, correlation_id, b"", {contract.REQUEST_ID: inv.request_id})
        if correlation_id:
            key = delivery.key = (correlation_id, reply_to, len(message.body))
            kept = self.memory.find(key) if message.delivery.redelivered and self.memory else None
            if kept is not None:
                log.info("request %s came back after its channel died: answered from its run here, "
                         "not run again", correlation_id)
                return await self._answer_kept(delivery, key, kept, reply_to, correlation_id)
        future = delivery.future = asyncio.get_event_loop().create_future()
        delivery.inv = inv
        if streaming and reply_to:
            stream = delivery.stream = ResponseStream(self.replies, inv, reply_to, correlation_id)
            inv.on_chunk = stream.piece
        inv.on_done = lambda _inv, result: self._resolve(delivery, result)
        self.pool.submit(inv)
        result = await future
        if result is REQUEUE:
            return  # the broker has it back already
        stream = delivery.stream
        if stream is not None:
            if stream.began or result.api_error is None:
                return await self._end_stream(delivery, stream, result)
            # Refused before anything was streamed (429, shutting down): answered as any request is.
            delivery.stream = None
            if not stream.ended.done():
                stream.ended.set_result(False)
        kept = delivery.kept
        if kept is not None:  # its channel died while it ran: it and its copy share one reply
            kept.stream = None
            return await self._answer_kept(delivery, delivery.key, kept, reply_to, correlation_id)
        if result.api_error is errors.SERVICE:
            return await self._requeue(delivery)
        delivery.replying = True
        replied = await self.replies.publish_result(inv, result, reply_to, correlation_id)
        key = delivery.key
        kept = delivery.kept  # the channel may have died while the reply was on its way
        memory = self.memory
        if kept is None:
            if (replied and self._ack(delivery)) or key is None:
                return
            kept = Kept(inv, None, None, replied)
            memory.keep(key, kept)
        if not replied:
            memory.hold(key, kept, result)
        memory.settled(key, kept, replied)

    async def _end_stream(self, delivery: Delivery, stream: ResponseStream, result: Result) -> None:
        """The run of a streamed response is over: send the final message after the pieces still
        on their way, and ack once it is confirmed. If the channel died meanwhile, the stream goes
        on over the next one and a copy of the request that comes back here waits for it
        (``_answer_kept``), then is acked: it does not run again here."""
        delivery.replying = True
        confirmed = await stream.finish(result)
        if delivery.kept is None and confirmed and self._ack(delivery):
            return
        key = delivery.key
        if delivery.kept is None and key is not None:  # the channel died as the final message went out
            self.memory.keep(key, Kept(delivery.inv, None, None, True, stream))

    async def _answer_kept(self, delivery: Delivery, key: tuple, kept: Kept, reply_to: Optional[str],
                           correlation_id: str) -> None:
        """Answer ``delivery`` from a kept run (``RunMemory.answer_copy``), then ack it, which ends
        the keeping."""
        memory = self.memory
        if await memory.answer_copy(key, kept, self.replies, reply_to, correlation_id) and self._ack(delivery):
            memory.forget(key)

    async def _answer(self, delivery: Delivery, reply_to: Optional[str], correlation_id: Optional[str],
                      body: bytes, headers: Optional[dict]) -> None:
        """A reply that needs no run (a refusal, DryRun): publish it, then ack. If the channel dies
        on the way, the copy gets the same answer."""
        if await self.replies.publish(reply_to, correlation_id, body, headers):
            self._ack(delivery)

    def _ack(self, delivery: Delivery) -> bool:
        """Queue the ack of ``delivery``; False when its channel is gone (the broker requeued it)."""
        if not self.replies.ack(delivery.tag, delivery.generation):
            return False
        self.memory.acked(delivery.key)
        return True

    async def _requeue(self, delivery: Delivery) -> None:
        await self.replies.requeue(delivery.tag, delivery.generation)

    @staticmethod
    def _resolve(delivery: Delivery, result: object) -> None:
        future = delivery.future
        if future is not None and not future.done():
            future.set_result(result)
