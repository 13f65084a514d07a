"""The daemon's AMQP-RPC front door: messages on the function's queue in, replies out (SPEC section 8).

Thin, like ``invoke_api``: it turns each request message into an Invocation for the pool and the
Result into a reply published to the default exchange with routing key ``reply_to`` (direct
reply-to works), the same ``correlation_id``, ``content_type`` application/json and the headers
``X-Amz-Function-Error`` / ``X-Amz-Log-Result`` / ``X-Amz-Executed-Version``. A request is acked
only once its reply is confirmed by the broker, so a daemon that dies mid-invocation loses nothing:
the broker redelivers (and a copy redelivered after a connection cut is answered from the run
still going here, not run twice). API-level refusals (bad client context, oversized body, 429) are replies
carrying ``x-amzn-ErrorType``; a message that cannot be understood is answered, never a crash.

It never talks to the Invoke API or the Runtime API, only to the pool. Connection upkeep
(attempts, backoff, reconnect) is ``amqp_link.BrokerLink``'s.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import OrderedDict
from typing import Optional

from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from .. import errors
from ..amqp.link import NO_DRAIN, BrokerLink, header_text
from ..config import Config
from ..invocation import Invocation, is_uuid, new_request_id
from ..pool import Pool
from .http_api import INVOCATION_TYPES, LOG_TYPES, decode_client_context

log = logging.getLogger("lambda_rapid.amqp")

# Messages one daemon may hold per runtime slot (running + waiting locally). Too few and every
# request pays an ack -> deliver round trip through the broker before a freed runtime gets work
# (measured: 2 per slot gave ~30% fewer replies/s at 8 in flight); too many and one replica hoards
# requests while another idles (the Go daemon's 5, its bug 23). 4 keeps a MAX_CONCURRENCY=2
# daemon fed at 8 requests in flight.
PREFETCH_PER_SLOT = 4
FINISHED_KEPT = 1000  # answered-but-unacked runs remembered for their redelivered copies
# A confirmed reply's ack waits for the next reply (it then shares that reply's socket write, see
# amqp_link.CoalescingFrames) or this many seconds, whichever comes first: a loopback write costs
# ~40 us of CPU, as much as the rest of the ack. The delay only holds a prefetch slot a bit longer.
ACK_DELAY = 0.002
BAD_CONTEXT = "Client context must be a valid Base64-encoded JSON object."
REQUEUE = object()  # a Result stand-in: give the message back to the broker instead of replying


def prefetch_count(config: Config) -> int:
    return config.max_concurrency * config.runtime_max_concurrency * PREFETCH_PER_SLOT


class Refusal(Exception):
    """A request the daemon answers with an API error instead of running it."""

    def __init__(self, api_error: errors.ApiError, message: str) -> None:
        super().__init__(message)
        self.api_error = api_error
        self.message = message


class Delivery:
    """One request message from receipt to ack (or requeue)."""

    __slots__ = ("tag", "generation", "inv", "future", "key", "adopted")

    def __init__(self, tag: int, generation: int) -> None:
        self.tag = tag
        self.generation = generation
        self.inv: Optional[Invocation] = None
        self.future: Optional[asyncio.Future] = None
        self.key: Optional[tuple] = None  # (correlation_id, reply_to): recognises a redelivered copy
        self.adopted = False  # a redelivered copy answers for this run


class AmqpRpc:
    def __init__(self, pool: Pool, config: Config) -> None:
        self.pool = pool
        self.config = config
        self.queue_name = config.function_name
        self.versions = ("$LATEST", config.function_version)
        self.link = BrokerLink(config.amqp_uri or "", "lambda-runtime-api-daemon " + config.function_name,
                               self._setup, self._lost)
        self.consumer_tag: Optional[str] = None
        self.stopping = False
        self.active: set = set()  # Deliveries not yet acked or requeued
        # Work whose channel died while its function ran: the broker redelivers the request, and
        # the copy is answered from that run instead of running the function twice.
        self.orphans: dict = {}  # key -> Delivery still running
        self.finished: OrderedDict = OrderedDict()  # key -> (Invocation, Result, replied) awaiting its copy
        self.tasks: set = set()
        self.acks: list = []  # Deliveries whose reply is confirmed, their ack not yet written
        self.ack_timer: Optional[asyncio.TimerHandle] = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect in the background: the HTTP endpoint must not wait for the broker."""
        self.link.start()

    async def _setup(self, channel) -> None:
        underlay = await channel.get_underlay_channel()
        await channel.set_qos(prefetch_count=prefetch_count(self.config))
        generation = self.link.generation
        cancelled = getattr(underlay, "on_consumer_cancel_callbacks", None)  # aiormq >= 7
        if cancelled is not None:
            cancelled.add(lambda _frame: self._cancelled_by_broker(channel, generation))
        await self._consume(channel, generation)

    async def _consume(self, channel, generation: int) -> None:
        """Declare the function's queue and consume it (again, after the broker cancelled us)."""
        if self.stopping:
            return
        durable = self.config.amqp_durable
        await channel.declare_queue(self.queue_name, durable=durable, auto_delete=not durable)

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
        log.info("consuming queue %r (prefetch %d, %s)", self.queue_name, prefetch_count(self.config),
                 "durable" if durable else "auto-delete")

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
        """The channel is gone and its unacked messages go back to the queue: drop what has not
        started; remember what is running, so that its redelivered copy can wait for it."""
        self.consumer_tag = None
        self._acks_lost()
        for delivery in list(self.active):
            inv = delivery.inv
            if inv is None or inv.done:
                continue
            if inv.instance is None:
                self.pool.abandon(inv)
                self._resolve(delivery, REQUEUE)
            elif delivery.key is not None:
                self.orphans[delivery.key] = delivery

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
                                   {"x-amzn-ErrorType": errors.SERVICE.code})
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
            inv = self._invocation(message)
        except Refusal as refusal:
            self.pool.metrics.outcomes["rejected"] += 1
            log.info("AMQP request refused (%s): %s", refusal.api_error.code, refusal.message)
            body = refusal.api_error.body(refusal.message)
            headers = {"x-amzn-ErrorType": refusal.api_error.code}
            return await self._answer(delivery, reply_to, correlation_id, body, headers)

        if inv.invocation_type == "DryRun":
            return await self._answer(delivery, reply_to, correlation_id, b"", {"x-amzn-RequestId": inv.request_id})
        if correlation_id:
            delivery.key = (correlation_id, reply_to)
            if message.delivery.redelivered and await self._answer_copy(delivery, reply_to, correlation_id):
                return
        loop = asyncio.get_event_loop()
        future = delivery.future = loop.create_future()
        delivery.inv = inv
        inv.on_done = lambda _inv, result: self._resolve(delivery, result)
        self.pool.submit(inv)
        result = await future
        if delivery.key is not None and self.orphans.get(delivery.key) is delivery:
            del self.orphans[delivery.key]
        if delivery.adopted or result is REQUEUE:
            return  # its redelivered copy answers (adopted), or the broker has it back already
        if result.api_error is errors.SERVICE:
            return await self._requeue(delivery)
        acked = await self._reply(delivery, inv, result, reply_to, correlation_id)
        if not acked and delivery.key is not None and delivery.generation != self.link.generation:
            self.finished[delivery.key] = (inv, result, acked is not None)
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)

    async def _answer_copy(self, delivery: Delivery, reply_to: Optional[str], correlation_id: str) -> bool:
        """A redelivered request whose first delivery ran here on a channel that has since died:
        answer it from that run (waiting for it if it is still going) rather than run it again."""
        key = delivery.key
        orphan = self.orphans.pop(key, None)
        if orphan is not None and orphan.future is not None and not orphan.future.done():
            orphan.adopted = True
            log.info("request %s came back while it still runs here: it will be answered from that run",
                     correlation_id)
            result = await orphan.future
            if result is REQUEUE:
                return False
            await self._reply(delivery, orphan.inv, result, reply_to, correlation_id)
            return True
        done = self.finished.pop(key, None)
        if done is None:
            return False
        inv, result, replied = done
        log.info("request %s came back after it ran here: acked without running it again", correlation_id)
        if replied:
            await self._answer(delivery, None, None, b"", None)  # its reply went out already: just ack
        else:
            await self._reply(delivery, inv, result, reply_to, correlation_id)
        return True

    async def _reply(self, delivery: Delivery, inv: Invocation, result, reply_to: Optional[str],
                     correlation_id: Optional[str]) -> Optional[bool]:
        if inv.is_event:
            if result.outcome != "success":
                log.warning("Event invocation %s ended with %s: %s", inv.request_id, result.outcome,
                            result.body[:300])
            return await self._answer(delivery, None, None, b"", None)
        headers = {"X-Amz-Executed-Version": self.config.function_version, "x-amzn-RequestId": inv.request_id}
        if result.api_error is not None:
            headers["x-amzn-ErrorType"] = result.api_error.code
        if result.function_error:
            headers["X-Amz-Function-Error"] = "Unhandled"
        if result.log_tail is not None:
            headers["X-Amz-Log-Result"] = base64.b64encode(result.log_tail).decode()
        return await self._answer(delivery, reply_to, correlation_id, result.body, headers)

    @staticmethod
    def _resolve(delivery: Delivery, result: object) -> None:
        future = delivery.future
        if future is not None and not future.done():
            future.set_result(result)

    def _invocation(self, message) -> Invocation:
        """The Invocation a request message asks for, or a Refusal saying why not."""
        props = message.header.properties
        headers = _headers(props.headers)
        invocation_type = headers.get("x-amz-invocation-type") or "RequestResponse"
        if invocation_type not in INVOCATION_TYPES:
            raise Refusal(errors.INVALID_PARAMETER_VALUE,
                          f"Unsupported invocation type {invocation_type!r}; use one of {', '.join(INVOCATION_TYPES)}.")
        log_type = headers.get("x-amz-log-type") or "None"
        if log_type not in LOG_TYPES:
            raise Refusal(errors.INVALID_PARAMETER_VALUE, f"Unsupported log type {log_type!r}; use None or Tail.")
        qualifier = headers.get("x-amz-qualifier")
        if qualifier is not None and qualifier not in self.versions:
            raise Refusal(errors.RESOURCE_NOT_FOUND,
                          errors.not_found_message(f"{self.config.function_arn}:{qualifier}"))
        body = message.body
        limit = errors.EVENT_REQUEST_LIMIT if invocation_type == "Event" else errors.SYNC_REQUEST_LIMIT
        if len(body) > limit:
            raise Refusal(errors.REQUEST_TOO_LARGE, errors.request_too_large_message(limit))
        client_context = None
        encoded = headers.get("x-amz-client-context")
        if encoded:
            client_context = decode_client_context(encoded)
            if client_context is None:
                raise Refusal(errors.INVALID_REQUEST_CONTENT, BAD_CONTEXT)
        correlation_id = header_text(props.correlation_id) or ""
        if is_uuid(correlation_id) and not self.pool.is_active(correlation_id.lower()):
            request_id = correlation_id.lower()
        else:
            request_id = new_request_id()
        if not body.strip():
            body = b"{}"  # as AWS hands an empty payload to the function
        return Invocation(request_id, body, arn=self.config.function_arn, client_context=client_context,
                          trace_id=headers.get("x-amzn-trace-id") or None, invocation_type=invocation_type,
                          tail=log_type == "Tail", qualifier=qualifier)

    # ---- replies and acks ----------------------------------------------------------------------
    async def _answer(self, delivery: Delivery, reply_to: Optional[str], correlation_id: Optional[str],
                      body: bytes, headers: Optional[dict]) -> Optional[bool]:
        """Publish the reply (when one is wanted), wait for the broker's confirm, then ack.
        True: acked; False: replied (or no reply wanted) but not acked; None: the reply is lost."""
        link = self.link
        underlay = link.underlay
        if reply_to:
            if underlay is None:
                log.warning("reply to %s lost: no AMQP connection (the broker redelivers the request if its "
                            "queue survived)", correlation_id)
                return None
            props = Basic.Properties(content_type="application/json", correlation_id=correlation_id,
                                     headers=headers or None, delivery_mode=1)
            if self.acks:
                self._flush_acks()  # queued right before the reply: one socket write for both
            try:
                await underlay.basic_publish(body, exchange="", routing_key=reply_to, properties=props,
                                             **NO_DRAIN)
            except Exception as e:
                log.warning("reply to %s not confirmed: %s; the request stays unacked", correlation_id,
                            link.describe(e))
                return None
        if delivery.generation != link.generation or link.underlay is None:
            return False  # the request's channel is gone: the broker has requeued it already
        self.acks.append(delivery)
        if self.ack_timer is None:
            self.ack_timer = asyncio.get_event_loop().call_later(ACK_DELAY, self._flush_acks)
        return True

    def _flush_acks(self, drain: bool = False) -> Optional[asyncio.Future]:
        """Hand the waiting acks to aiormq's writer as one frame batch (a future for its drain
        with ``drain``). Acks whose channel is gone are not sent: see ``_acks_lost``."""
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.cancel()
        if not self.acks:
            return None
        link = self.link
        underlay = link.underlay
        if underlay is None or underlay.is_closed:
            self._acks_lost()
            return None
        acks, self.acks = self.acks, []
        generation = link.generation
        frames = [Basic.Ack(delivery_tag=d.tag) for d in acks if d.generation == generation]
        if not frames:
            return None
        drained = asyncio.get_event_loop().create_future() if drain else None
        batch = ChannelFrame.marshall(channel_number=underlay.number, frames=frames, drain_future=drained)
        try:
            underlay.write_queue.put_nowait(batch)
        except asyncio.QueueFull:  # aiormq's queue is short (10 batches): wait for room in a task
            task = asyncio.get_event_loop().create_task(underlay.write_queue.put(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return drained

    def _acks_lost(self) -> None:
        """The channel died before these acks were written: the broker redelivers the requests,
        so remember them as answered; their copies are then acked without running again."""
        timer, self.ack_timer = self.ack_timer, None
        if timer is not None:
            timer.cancel()
        acks, self.acks = self.acks, []
        for delivery in acks:
            if delivery.key is not None:
                self.finished[delivery.key] = (delivery.inv, None, True)
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    async def _requeue(self, delivery: Delivery) -> None:
        link = self.link
        if delivery.generation != link.generation or link.underlay is None:
            return
        try:
            await link.underlay.basic_nack(delivery.tag, requeue=True)
        except Exception as e:
            log.warning("requeue of message %d failed: %s", delivery.tag, link.describe(e))


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
                raise Refusal(errors.INVALID_REQUEST_CONTENT, f"Header {key!r} is not UTF-8 text.") from None
        elif not isinstance(value, str):
            if str(key).lower().startswith(("x-amz-", "x-amzn-")):
                raise Refusal(errors.INVALID_PARAMETER_VALUE,
                              f"Header {key!r} must be a string, not {type(value).__name__}.")
            continue
        result[str(key).lower()] = value
    return result
