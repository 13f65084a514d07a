"""The daemon's AMQP-RPC front door: messages on the function's queue in, replies out.

Thin, like ``http_api``: it hands each request message's headers and body to the Invoke contract
(``contract.parse``), turns the valid call into an Invocation for the pool and the Result into a
reply published to the default exchange with routing key ``reply_to`` (direct reply-to works), the
same ``correlation_id``, ``content_type`` application/json and the headers
``X-Amz-Function-Error`` / ``X-Amz-Log-Result`` / ``X-Amz-Executed-Version``. API-level refusals
(bad client context, oversized body, 429) are replies carrying ``x-amzn-ErrorType``; a message
that cannot be understood is answered, never a crash.

A request marked ``X-Amz-Invoke-Mode: RESPONSE_STREAM`` (InvokeWithResponseStream through the
lambda-server) is answered piece by piece as the runtime streams its /response
(``ResponseStream``): one reply message per piece, numbered, then a final InvokeComplete message
(``eventstream`` names the headers, ``docs/amqp.md`` the format). Without that header a streaming
runtime's pieces are joined into the one reply, as before.

A request is acked only once its reply is confirmed by the broker, so a daemon that dies
mid-invocation loses nothing: the broker redelivers. A request does not run twice *here*: when
the connection drops, every request that ran or runs on the dead channel is kept (``Kept``) with
its run, its result until the reply is confirmed, and whether the ack may be lost; its
redelivered copy is then answered from that run (waiting for it if it still runs), its reply sent
once, and only the copy is acked. Bounded in count, bytes and age.

It never talks to the Invoke API or the Runtime API, only to the pool. Connection upkeep
(attempts, backoff, reconnect) is ``amqp.link.BrokerLink``'s; aiormq internals are
``amqp.aiormq_tuning``'s.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict, deque
from typing import Optional

from pamqp.commands import Basic

from .. import errors
from ..amqp import aiormq_tuning
from ..amqp.aiormq_tuning import NO_DRAIN
from ..amqp.link import BrokerLink, header_text
from ..config import Config
from ..invocation import SUCCESS, Invocation, Result, new_request_id
from ..pool import Pool
from . import contract, eventstream

log = logging.getLogger(__name__)

# Messages one daemon may hold per runtime slot (running + waiting locally). Too few and every
# request pays an ack -> deliver round trip through the broker before a freed runtime gets work
# (measured: 2 per slot gave ~30% fewer replies/s at 8 in flight); too many and one replica hoards
# requests while another idles. 4 keeps a MAX_CONCURRENCY=2 daemon fed at 8 requests in flight.
PREFETCH_PER_SLOT = 4
# A confirmed reply's ack waits for the next reply (it then shares that reply's socket write, see
# aiormq_tuning.CoalescingFrames) or this many seconds, whichever comes first: a loopback write costs
# ~40 us of CPU, as much as the rest of the ack. The delay only holds a prefetch slot a bit longer.
ACK_DELAY = 0.002
# Acked requests remembered on the live channel: when it dies, their acks may not have reached the
# broker, so these come back too and are acked again without running (at least this many).
RECENT_ACKS = 1024
# Kept runs of dead channels, waiting for their redelivered copies: bounded in count, in reply
# bytes held, and in age (a copy that comes later than this runs again).
KEPT_COUNT = 10_000
KEPT_BYTES = 64 * 1024 * 1024
KEPT_SECONDS = 600.0
REPLY_WAIT = 30.0  # longest wait for the other delivery's reply to be confirmed before sending it again
REQUEUE = object()  # a Result stand-in: give the message back to the broker instead of replying
# A streamed response's bytes not yet confirmed by the broker, beyond which the runtime's /response
# is not read until they are (the Runtime API honours it when its HTTP layer has flow control).
STREAM_WINDOW = 4 * eventstream.PIECE_LIMIT
_OCTET_STREAM = "application/octet-stream"


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


class Kept:
    """A request that ran (or runs) here on a channel that died: what its redelivered copy gets."""

    __slots__ = ("inv", "future", "result", "replied", "sending", "at", "size", "stream")

    def __init__(self, inv: Optional[Invocation], future: Optional[asyncio.Future], result: Optional[Result],
                 replied: bool, stream: Optional[ResponseStream] = None) -> None:
        self.inv = inv
        self.future = future  # the run's Result while it still runs
        self.result = result  # held only until a reply is confirmed
        self.replied = replied  # a reply was confirmed (or none is wanted): a copy only needs its ack
        self.sending: Optional[asyncio.Future] = None  # a reply being published right now
        self.at = time.monotonic()
        self.size = len(result.body) if result is not None and not replied else 0
        # A streamed response goes on from its own run (on the next channel): a copy only waits for it.
        self.stream = stream


class AmqpRpc:
    def __init__(self, pool: Pool, config: Config) -> None:
        self.pool = pool
        self.config = config
        self.queue_name = config.function_name
        self.serves = contract.serves_function(config.function_name, config.function_version)
        self.tenant_isolated = config.tenant_isolated
        self.arn = config.function_arn
        self.retry_after = contract.retry_after(config.timeout)
        self.link = BrokerLink(config.amqp_uri or "", "lambda-runtime-api-daemon " + config.function_name,
                               self._setup, self._lost)
        self.consumer_tag: Optional[str] = None
        self.stopping = False
        self.active: set = set()  # Deliveries not yet acked or requeued
        self.kept: OrderedDict = OrderedDict()  # key -> Kept, oldest first
        self.kept_bytes = 0
        self.recent: deque = deque(maxlen=max(RECENT_ACKS, 2 * prefetch_count(config)))
        self.tasks: set = set()
        self.acks: list = []  # Deliveries whose reply is confirmed, their ack not yet written
        self.ack_timer: Optional[asyncio.TimerHandle] = None

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

        task = asyncio.get_event_loop().create_task(again())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _lost(self) -> None:
        """The channel is gone and its unacked messages go back to the queue: give back what has
        not started; keep what ran or runs on it, for its redelivered copy."""
        self.consumer_tag = None
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.cancel()
        self.acks = []  # never written: their keys are in ``recent``
        recent, self.recent = self.recent, deque(maxlen=self.recent.maxlen)
        for key in recent:
            if key not in self.kept:
                self._keep(key, Kept(None, None, None, True))
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
                self._keep(delivery.key, kept)

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
        drained = self._flush_acks(drain=True)
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
            inv, streaming = self._invocation(message)
        except contract.Refusal as refusal:
            self.pool.metrics.outcomes["rejected"] += 1
            code = refusal.api_error.code
            log.info("AMQP request refused (%s): %s", code, refusal.message)
            return await self._answer(delivery, reply_to, correlation_id, refusal.body(), {contract.ERROR_TYPE: code})

        if inv.invocation_type == "DryRun":
            return await self._answer(delivery, reply_to, correlation_id, b"", {contract.REQUEST_ID: inv.request_id})
        if correlation_id:
            key = delivery.key = (correlation_id, reply_to, len(message.body))
            if message.delivery.redelivered and self.kept:
                kept = self.kept.get(key)
                if kept is not None and time.monotonic() - kept.at <= KEPT_SECONDS:
                    log.info("request %s came back after its channel died: answered from its run here, "
                             "not run again", correlation_id)
                    return await self._answer_kept(delivery, key, kept, reply_to, correlation_id)
                if kept is not None:
                    self._forget(key)  # too old: run it again
        future = delivery.future = asyncio.get_event_loop().create_future()
        delivery.inv = inv
        if streaming and reply_to:
            stream = delivery.stream = ResponseStream(self, inv, reply_to, correlation_id)
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
        replied = await self._publish_result(inv, result, reply_to, correlation_id)
        key = delivery.key
        kept = delivery.kept  # the channel may have died while the reply was on its way
        if kept is None:
            if (replied and self._ack(delivery)) or key is None:
                return
            kept = Kept(inv, None, None, replied)
            self._keep(key, kept)
        if not replied:
            self._hold(key, kept, result)
        self._settled(key, kept, replied)

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
            self._keep(key, Kept(delivery.inv, None, None, True, stream))

    async def _answer_kept(self, delivery: Delivery, key: tuple, kept: Kept, reply_to: Optional[str],
                           correlation_id: str) -> None:
        """Answer ``delivery`` from a kept run: wait for the run, send its reply unless one was
        confirmed (or is on its way from the other delivery), then ack, which ends the keeping."""
        stream = kept.stream
        if stream is not None:
            # The run streams (or streamed) to its caller from this daemon, over the new channel if
            # it still runs: the copy is acked once the stream has ended, and never runs again here.
            await stream.ended
            if self._ack(delivery):
                self._forget(key)
            return
        future = kept.future
        if future is not None:
            result = await future  # at once when the run is over
            kept.future = None
            if result is not REQUEUE and not kept.replied and kept.result is None:
                self._hold(key, kept, result)
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
            replied = await self._publish_result(kept.inv, kept.result, reply_to, correlation_id)
            self._settled(key, kept, replied)
            break
        if kept.replied and self._ack(delivery):
            self._forget(key)

    def _hold(self, key: tuple, kept: Kept, result: Result) -> None:
        """Keep ``result`` for a copy of the request until a reply is confirmed (counted in bytes)."""
        kept.result = result
        kept.at = time.monotonic()
        if self.kept.get(key) is kept:
            self.kept_bytes += len(result.body) - kept.size
        kept.size = len(result.body)

    def _settled(self, key: tuple, kept: Kept, replied: bool) -> None:
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

    def _keep(self, key: tuple, kept: Kept) -> None:
        old = self.kept.pop(key, None)
        if old is not None:
            self.kept_bytes -= old.size
        self.kept[key] = kept
        self.kept_bytes += kept.size
        while len(self.kept) > KEPT_COUNT or (self.kept_bytes > KEPT_BYTES and len(self.kept) > 1):
            _, dropped = self.kept.popitem(last=False)
            self.kept_bytes -= dropped.size

    def _forget(self, key: tuple) -> None:
        kept = self.kept.pop(key, None)
        if kept is not None:
            self.kept_bytes -= kept.size

    @staticmethod
    def _resolve(delivery: Delivery, result: object) -> None:
        future = delivery.future
        if future is not None and not future.done():
            future.set_result(result)

    def _invocation(self, message) -> tuple:
        """(the Invocation a request message asks for, whether its caller streams the response);
        a contract.Refusal says why not."""
        props = message.header.properties
        headers = _headers(props.headers)
        mode = headers.get("x-amz-invoke-mode")
        streaming = mode == eventstream.RESPONSE_STREAM
        if mode is not None and not streaming and mode != eventstream.BUFFERED:
            raise contract.Refusal(errors.INVALID_PARAMETER_VALUE, f"Unsupported invoke mode {mode[:100]!r}; use "
                                   f"{eventstream.BUFFERED} or {eventstream.RESPONSE_STREAM}.")
        call = contract.parse(headers, self.queue_name, headers.get("x-amz-qualifier"), message.body,
                              serves=self.serves, region=self.config.region, check_json=False,
                              tenant_isolated=self.tenant_isolated,
                              allowed=contract.STREAM_INVOCATION_TYPES if streaming else contract.INVOCATION_TYPES)
        request_id = contract.request_id(header_text(props.correlation_id), self.pool.is_active)
        inv = Invocation(request_id, call.payload, arn=self.arn, client_context=call.client_context,
                         trace_id=call.trace_id, invocation_type=call.invocation_type, tail=call.tail,
                         qualifier=call.qualifier, tenant_id=call.tenant_id)
        return inv, streaming

    # ---- replies and acks ----------------------------------------------------------------------
    async def _publish_result(self, inv: Invocation, result: Result, reply_to: Optional[str],
                              correlation_id: Optional[str]) -> bool:
        """Publish the reply to ``inv`` (none for an Event): True once confirmed (or none wanted)."""
        if inv.is_event:
            if result.outcome != SUCCESS:
                log.warning("Event invocation %s ended with %s: %s", inv.request_id, result.outcome,
                            result.body[:300])
            return True
        headers = {contract.EXECUTED_VERSION: self.config.function_version, contract.REQUEST_ID: inv.request_id}
        api_error = result.api_error
        if api_error is not None:
            headers[contract.ERROR_TYPE] = api_error.code
            if api_error.retry_after:
                headers[contract.RETRY_AFTER] = self.retry_after
        if result.function_error:
            headers[contract.FUNCTION_ERROR] = contract.UNHANDLED
        if result.log_tail is not None:
            headers[contract.LOG_RESULT] = base64.b64encode(result.log_tail).decode()
        return await self._publish(reply_to, correlation_id, result.body, headers)

    async def _publish(self, reply_to: Optional[str], correlation_id: Optional[str], body: bytes,
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
            self._flush_acks()  # queued right before the reply: one socket write for both
        try:
            await underlay.basic_publish(body, exchange="", routing_key=reply_to, properties=props, **NO_DRAIN)
        except asyncio.CancelledError:
            # aiormq cancels the confirm's future when it gives the connection up (a heartbeat
            # timeout in a network partition): that is a reply not confirmed, not this task being
            # cancelled. Let it propagate it, and the run would be gone before ``_lost`` keeps it,
            # so its redelivered copy would run again here.
            if _being_cancelled():
                raise
            log.warning("reply to %s not confirmed: the AMQP connection was given up; the request stays "
                        "unacked", correlation_id)
            return False
        except Exception as e:
            log.warning("reply to %s not confirmed: %s; the request stays unacked", correlation_id,
                        link.describe(e))
            return False
        return True

    async def _answer(self, delivery: Delivery, reply_to: Optional[str], correlation_id: Optional[str],
                      body: bytes, headers: Optional[dict]) -> None:
        """A reply that needs no run (a refusal, DryRun): publish it, then ack. If the channel dies
        on the way, the copy gets the same answer."""
        if await self._publish(reply_to, correlation_id, body, headers):
            self._ack(delivery)

    def _ack(self, delivery: Delivery) -> bool:
        """Queue the ack of ``delivery`` (written with the next reply, or after ACK_DELAY); False
        when its channel is gone (the broker has requeued it already)."""
        link = self.link
        if delivery.generation != link.generation or link.underlay is None:
            return False
        self.acks.append(delivery)
        if delivery.key is not None:
            self.recent.append(delivery.key)
        if self.ack_timer is None:
            self.ack_timer = asyncio.get_event_loop().call_later(ACK_DELAY, self._flush_acks)
        return True

    def _flush_acks(self, drain: bool = False) -> Optional[asyncio.Future]:
        """Hand the waiting acks to aiormq's writer as one frame batch (a future for its drain
        with ``drain``). Acks whose channel is gone are not sent: ``_lost`` keeps their requests."""
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
        tags = [d.tag for d in acks if d.generation == generation]
        if not tags:
            return None
        drained = asyncio.get_event_loop().create_future() if drain else None
        pending = aiormq_tuning.write_acks(underlay, tags, drained)
        if pending is not None:  # aiormq's write queue is full: queue them in a task
            task = asyncio.get_event_loop().create_task(pending)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return drained

    async def _requeue(self, delivery: Delivery) -> None:
        link = self.link
        if delivery.generation != link.generation or link.underlay is None:
            return
        try:
            await link.underlay.basic_nack(delivery.tag, requeue=True)
        except Exception as e:
            log.warning("requeue of message %d failed: %s", delivery.tag, link.describe(e))


class ResponseStream:
    """A response streamed to its caller, one reply message per piece (``docs/amqp.md``): pieces
    numbered 0, 1, ... in order, then the final InvokeComplete message, all with this run's id.

    One message is in flight at a time: the pieces the runtime streams meanwhile are joined into
    the next one (up to ``eventstream.PIECE_LIMIT``), so a fast runtime costs few messages and a
    slow one's pieces go out as they come. A publish that fails (the connection dropped) is sent
    again, same number, once the link is back (the caller drops a repeat); after REPLY_WAIT without
    a link the stream is given up (the caller's side ends it by its own bound). Past STREAM_WINDOW
    unconfirmed bytes ``piece`` returns the stream, whose ``when_drained`` says when to go on."""

    __slots__ = ("rpc", "inv", "reply_to", "correlation_id", "run", "seq", "parts", "buffered", "sender",
                 "final", "waiters", "ended", "began", "gave_up")

    def __init__(self, rpc: AmqpRpc, inv: Invocation, reply_to: str, correlation_id: str) -> None:
        self.rpc = rpc
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

    # ---- from AmqpRpc ----------------------------------------------------------------------------
    def finish(self, result: Result) -> asyncio.Future:
        """Queue the final message for ``result`` (after any pieces still on their way); the future
        says whether it was confirmed."""
        config = self.rpc.config
        headers = {contract.REQUEST_ID: self.inv.request_id, contract.EXECUTED_VERSION: config.function_version}
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
            rpc = self.rpc
            task = self.sender = asyncio.get_event_loop().create_task(self._send())
            rpc.tasks.add(task)
            task.add_done_callback(rpc.tasks.discard)

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
                        headers[contract.EXECUTED_VERSION] = self.rpc.config.function_version
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
        rpc = self.rpc
        link = rpc.link
        loop = asyncio.get_event_loop()
        give_up_at = None
        while True:
            generation = link.generation
            if await rpc._publish(self.reply_to, self.correlation_id, body, headers, content_type):
                return True
            now = loop.time()
            if give_up_at is None:
                give_up_at = now + REPLY_WAIT
            if now >= give_up_at or rpc.link.closing:
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


def _being_cancelled() -> bool:
    """Whether the running task itself was asked to stop (Python 3.11+ can tell; before, a
    cancellation that reaches us is taken for the connection's)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _headers(table: object) -> dict:
    """Request headers by lower-cased name; string and byte values only (others are ignored)."""
    result: dict = {}
    if not isinstance(table, dict):
        return result
    for key, value in table.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise contract.Refusal(errors.INVALID_REQUEST_CONTENT, f"Header {key!r} is not UTF-8 text.") from None
        elif not isinstance(value, str):
            if str(key).lower().startswith(("x-amz-", "x-amzn-")):
                raise contract.Refusal(errors.INVALID_PARAMETER_VALUE,
                                       f"Header {key!r} must be a string, not {type(value).__name__}.")
            continue
        result[str(key).lower()] = value
    return result
