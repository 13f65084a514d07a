"""The Lambda Server's Invoke API: each HTTP invoke becomes an AMQP-RPC request routed by function name.

Per invoke it validates with the Invoke contract (``invoke.contract``: name, qualifier, invocation
type, payload, client context, sizes), registers the request id *before* publishing (so no reply
can beat it), publishes to the default exchange with routing key = function name, ``mandatory`` set
and ``reply_to`` = RabbitMQ direct reply-to, and turns the reply back into the AWS response. A
returned (unroutable) request means no daemon serves that name: 404 at once. ``Event`` is published
persistent and answered 202 once the broker confirmed it; ``DryRun`` 204 when the function's queue
exists (any queue type: the passive declare and the mandatory publish do not care).

A response-streaming invoke (InvokeWithResponseStream) is published with ``X-Amz-Invoke-Mode:
RESPONSE_STREAM``; the daemon answers with one message per piece, numbered, then a final
InvokeComplete message (``eventstream`` names the headers). Each is relayed as AWS's event stream
the moment it is due (``Relay``: in sequence order, repeats dropped, a run of the request that
started over after its daemon was lost ends the stream with an error event). An ordinary reply
(a refusal, or a daemon that does not stream) becomes a whole answer in the same framing.

Every wait is bounded: a reply that never comes ends in the fail-safe timeout body, a stream whose
daemon goes quiet ends with an error event a few seconds after the function's deadline, a stream
is cut at the streamed response limit, a lost broker connection fails every waiting request at
once (502, or an error event once the stream has started), and new requests get 503 until the link
is back (``amqp.link.BrokerLink`` reconnects by itself). It runs no function and has no pool, and
knows the daemon only by the wire format (``docs/amqp.md``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from typing import Optional

from pamqp.commands import Basic

from .. import errors
from ..amqp import aiormq_tuning
from ..amqp.aiormq_tuning import NO_DRAIN
from ..amqp.link import BrokerLink, header_text
from ..histogram import Histogram
from ..http.server import Request, header
from ..invocation import new_request_id
from ..invoke import contract, eventstream
from .config import ServerConfig

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_JSON = b"content-type: application/json\r\n"
_TEXT = b"content-type: text/plain\r\n"
_FUNCTION_ERROR = header(contract.FUNCTION_ERROR, contract.UNHANDLED)
# A daemon that sends no Retry-After with its 429 (older ones, the Go daemon): retry in a second.
_RETRY_AFTER = contract.retry_after(0)
OUTCOMES = ("success", "function_error", "event_accepted", "dry_run", "not_found", "timeout", "api_error",
            "rejected", "unavailable", "broker_lost", "stream_cut")
# A function that answered within this many seconds and is now unroutable has lost its queue for a
# moment (a broker restart drops non-durable queues until the daemons re-declare them): 503, not 404.
RECENTLY_SERVED = 60.0
# A stream's daemon sends its final message at the function's deadline at the latest (it times the
# invocation out then): this much later, a stream still open has lost its daemon.
STREAM_GRACE = 3.0
_EVENT_STREAM = b"content-type: application/vnd.amazon.eventstream\r\n"
_SERVICE_EXCEPTION = errors.SERVICE.code


class Pending:
    """A RequestResponse invoke waiting for its reply (or, streaming, for the end of its stream)."""

    __slots__ = ("request", "rid", "timer", "started", "name", "relay")

    def __init__(self, request: Request, rid: str, name: str, relay: Optional[Relay] = None) -> None:
        self.request = request
        self.rid = rid
        self.name = name
        self.timer: Optional[asyncio.TimerHandle] = None
        self.started = time.monotonic()
        self.relay = relay


class Relay:
    """A response-streaming invoke's answer as its messages arrive: the event stream's head goes
    out with the first message due, each piece as a PayloadChunk, the final one as InvokeComplete."""

    __slots__ = ("order", "began", "size", "timed")

    def __init__(self) -> None:
        self.order = eventstream.Resequencer()
        self.began = False  # the 200 and the event stream's head are written
        self.size = 0  # payload bytes relayed
        self.timed = False  # the bound is the daemon's deadline (from message 0), not the fail-safe


class Metrics:
    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.replies = Histogram()
        self.observe = self.replies.observe


class Router:
    """The HttpServer application of lambda-server, and the owner of its broker link."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.get_event_loop()
        self.link = BrokerLink(config.amqp_uri, "lambda-server", self._setup, self._lost)
        self.pending: dict = {}  # request id (correlation_id) -> Pending
        self.served: dict = {}  # function name -> when a daemon last answered for it (monotonic)
        self.tasks: set = set()
        self.metrics = Metrics()
        self.accepting = True

    # ---- broker side -------------------------------------------------------------------------
    async def _setup(self, channel) -> None:
        underlay = await channel.get_underlay_channel()
        # Direct reply-to: the consumer must exist (no_ack) on the channel that publishes requests.
        await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)

    def _lost(self) -> None:
        """Nothing waiting can get its reply any more (direct reply-to dies with the channel)."""
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if p.relay is not None and p.relay.began:
                self._cut(p, "The connection to the message broker was lost mid-stream; the invocation may or may "
                             "not have completed.", "broker_lost")
                continue
            self._api_error(p.request, p.rid, errors.BAD_GATEWAY,
                            "The connection to the message broker was lost; the invocation may or may not have "
                            "run.", "broker_lost")

    def _on_reply(self, message) -> None:
        props = message.header.properties
        pending = self.pending
        p = pending.get(props.correlation_id)
        if p is None:
            log.debug("reply for %s: nobody is waiting (timed out or gone)", props.correlation_id)
            return
        if p.relay is not None:
            return self._on_stream_message(p, message)
        del pending[props.correlation_id]
        self._answer(p, message)

    def _answer(self, p: Pending, message) -> None:
        """The HTTP answer to ``p`` from its (one) reply."""
        props = message.header.properties
        if p.timer is not None:
            p.timer.cancel()
        now = time.monotonic()
        self.metrics.observe(now - p.started)
        self.served[p.name] = now
        headers = props.headers or {}
        request = p.request
        rid = header(contract.REQUEST_ID, header_text(headers.get(contract.REQUEST_ID)) or p.rid)
        error_type = header_text(headers.get(contract.ERROR_TYPE))
        if error_type:
            api_error = errors.API_ERRORS.get(error_type, errors.SERVICE)
            self.metrics.outcomes["api_error"] += 1
            extra = rid + header(contract.ERROR_TYPE, api_error.code)
            if api_error.retry_after:
                extra += header(contract.RETRY_AFTER, header_text(headers.get(contract.RETRY_AFTER)) or _RETRY_AFTER)
            return request.respond_json(api_error.status, message.body, extra)
        version = header_text(headers.get(contract.EXECUTED_VERSION)) or "$LATEST"
        out = _JSON + rid + header(contract.EXECUTED_VERSION, version)
        if headers.get(contract.FUNCTION_ERROR) is not None:
            out += _FUNCTION_ERROR
            self.metrics.outcomes["function_error"] += 1
        else:
            self.metrics.outcomes["success"] += 1
        tail = headers.get(contract.LOG_RESULT)
        if tail is not None:
            out += header(contract.LOG_RESULT, header_text(tail) or "")
        request.respond(200, out, message.body)

    # ---- HttpServer application interface ----------------------------------------------------
    def body_limit(self, request: Request) -> int:
        return contract.body_limit(request.headers.get("x-amz-invocation-type"))

    def handle(self, request: Request) -> None:
        path = request.path
        name = contract.function_in_path(path)
        streaming = False
        if name is None:
            name = contract.function_in_path(path, contract.STREAM_PREFIX, contract.STREAM_SUFFIX)
            streaming = name is not None
        if name is not None:
            if request.method != "POST":
                return _plain(request, 405, "Method Not Allowed", header("Allow", "POST"))
            return self.invoke(request, name, streaming)
        if path == "/_/health":
            return _get(request, lambda: request.respond(200, _TEXT, b"OK"))
        elif path == "/_/ready":
            return _get(request, lambda: request.respond(200, _TEXT, b"OK") if self.ready()
                        else request.respond(503, _TEXT, b"Not Ready"))
        elif path == "/metrics":
            return _get(request, lambda: request.respond(
                200, b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n", self.render_metrics()))
        elif path == "/" and self.config.enable_openfaas and request.method == "POST":
            # OpenFaaS' watchdog route names no function, so there is nothing to route it to.
            return self._api_error(request, new_request_id(), errors.RESOURCE_NOT_FOUND,
                                   "lambda-server routes by function name: use "
                                   "/2015-03-31/functions/{FunctionName}/invocations", "not_found")
        _plain(request, 404, "Not Found")

    def ready(self) -> bool:
        return self.accepting and self.link.is_up

    # ---- invoke ------------------------------------------------------------------------------
    def invoke(self, request: Request, raw_name: str, streaming: bool = False) -> None:
        headers = request.headers
        rid = contract.request_id(headers.get("amz-sdk-invocation-id"), self.pending.__contains__)
        try:
            # Whether the function is tenant-isolated is the daemon's to say: only the id's form is checked here.
            call = contract.parse_http(
                headers, raw_name, request.query, request.body, request.too_large, serves=_routable,
                region=self.config.region, tenant_isolated=None,
                allowed=contract.STREAM_INVOCATION_TYPES if streaming else contract.INVOCATION_TYPES)
        except contract.Refusal as refusal:
            outcome = "not_found" if refusal.api_error is errors.RESOURCE_NOT_FOUND else "rejected"
            return self._refuse(request, rid, refusal, outcome)
        name, qualifier, payload, invocation_type = call.name, call.qualifier, call.payload, call.invocation_type
        if not self.accepting or not self.link.is_up:
            return self._api_error(request, rid, errors.SERVICE,
                                   "The message broker is not reachable; try again later.", "unavailable")
        if invocation_type == "DryRun":
            return self._spawn(self._dry_run(request, rid, name, qualifier))

        amqp_headers = {}
        if call.encoded_context:
            amqp_headers["X-Amz-Client-Context"] = call.encoded_context
        if call.trace_id:
            amqp_headers["X-Amzn-Trace-Id"] = call.trace_id
        if call.tail:
            amqp_headers["X-Amz-Log-Type"] = "Tail"
        if qualifier is not None:
            amqp_headers["X-Amz-Qualifier"] = qualifier
        if call.tenant_id is not None:
            amqp_headers[contract.TENANT_ID] = call.tenant_id
        event = invocation_type == "Event"
        if event:
            amqp_headers["X-Amz-Invocation-Type"] = "Event"
        if streaming:
            amqp_headers[eventstream.INVOKE_MODE] = eventstream.RESPONSE_STREAM
        # An Event is answered 202 once confirmed, so it must survive a broker restart (persistent, in
        # a durable queue; quorum queues keep every message). A RequestResponse caller is answered
        # 502 when the broker goes away, and its reply-to dies with our channel: transient is enough.
        props = Basic.Properties(
            content_type="application/json", correlation_id=rid, delivery_mode=2 if event else 1,
            reply_to=None if event else DIRECT_REPLY_TO,
            timestamp=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
            headers=amqp_headers or None)
        if not event:
            p = Pending(request, rid, name, Relay() if streaming else None)
            self.pending[rid] = p  # before publishing: a reply may come before the publish confirm
            p.timer = self.loop.call_later(self.config.timeout, self._timed_out, p)
            request.on_abandon = lambda: self._abandon(p)
        self._spawn(self._publish(request, rid, name, qualifier, payload, props, event))

    async def _publish(self, request: Request, rid: str, name: str, qualifier: Optional[str], payload: bytes,
                       props: Basic.Properties, event: bool) -> None:
        underlay = self.link.underlay
        try:
            if underlay is None:
                raise ConnectionError("no broker connection")
            await underlay.basic_publish(payload, exchange="", routing_key=name, mandatory=True, properties=props,
                                         **NO_DRAIN)
        except Exception as e:
            if aiormq_tuning.is_returned(e):
                # Returned by the broker: no queue is bound to that name, so no daemon serves it.
                log.info("%s: no queue for function %r", rid, name)
                self._forget(rid)
                seen = self.served.get(name)
                if seen is not None and time.monotonic() - seen < RECENTLY_SERVED:
                    return self._api_error(request, rid, errors.SERVICE,
                                           f"No daemon is consuming the queue of function {name} at the moment; "
                                           "try again shortly.", "unavailable")
                self.served.pop(name, None)
                return self._refuse(request, rid, contract.not_found(self.config.region, name, qualifier),
                                    "not_found")
            if request.answered:
                return
            log.warning("%s: publish to %r failed: %s", rid, name, self.link.describe(e))
            self._forget(rid)
            return self._api_error(request, rid, errors.BAD_GATEWAY,
                                   "The request could not be handed to the message broker.", "broker_lost")
        if event:
            self.served[name] = time.monotonic()  # confirmed and not returned: a queue took it
            self.metrics.outcomes["event_accepted"] += 1
            request.respond(202, header("x-amzn-RequestId", rid))

    async def _dry_run(self, request: Request, rid: str, name: str, qualifier: Optional[str]) -> None:
        """204 when the function's queue exists. A passive declare of a missing queue closes its
        channel, so it gets a channel of its own."""
        connection = self.link.connection
        channel = None
        try:
            if connection is None:
                raise ConnectionError("no broker connection")
            channel = await connection.channel(publisher_confirms=False)
            await channel.declare_queue(name, passive=True)
        except Exception as e:
            if aiormq_tuning.is_not_found(e):
                return self._refuse(request, rid, contract.not_found(self.config.region, name, qualifier),
                                    "not_found")
            log.warning("%s: DryRun check of %r failed: %s", rid, name, self.link.describe(e))
            return self._api_error(request, rid, errors.BAD_GATEWAY, "The message broker could not be asked.",
                                   "broker_lost")
        finally:
            if channel is not None and not channel.is_closed:
                try:
                    await channel.close()
                except Exception:
                    pass
        self.metrics.outcomes["dry_run"] += 1
        request.respond(204, header("x-amzn-RequestId", rid))

    # ---- response streams ----------------------------------------------------------------------
    def _on_stream_message(self, p: Pending, message) -> None:
        headers = message.header.properties.headers or {}
        seq = headers.get(eventstream.SEQUENCE)
        if seq is None:  # an ordinary reply: a refusal, or a daemon that does not stream
            return self._stream_reply(p, message, headers)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            log.warning("%s: stream message with a bad %s %r: ignored", p.rid, eventstream.SEQUENCE, seq)
            return
        relay = p.relay
        assert relay is not None
        due = relay.order.accept(header_text(headers.get(eventstream.RUN)) or "", seq, message)
        if due is eventstream.RERUN:
            return self._cut(p, "The daemon streaming the response was lost and the request ran again from "
                                "the start elsewhere; the stream is cut.")
        if due is eventstream.OVERFLOW:
            return self._cut(p, "Pieces of the streamed response went missing; the stream is cut.")
        for item in due:
            if self._relay(p, relay, item):
                return

    def _relay(self, p: Pending, relay: Relay, message) -> bool:
        """Relay one message that is due; True when the stream is over."""
        headers = message.header.properties.headers or {}
        request = p.request
        if not relay.began:
            self._begin(p, relay, headers)
        body = message.body
        if header_text(headers.get(eventstream.EVENT)) == eventstream.INVOKE_COMPLETE:
            code, details, log_result = eventstream.complete_fields(body)
            self._finish(p)
            self.metrics.outcomes["success" if code is None else "function_error"] += 1
            request.write(eventstream.invoke_complete(code, details, log_result))
            request.end()
            return True
        relay.size += len(body)
        if relay.size > errors.STREAM_RESPONSE_LIMIT:
            self._cut(p, f"Response payload size exceeded maximum allowed payload size "
                         f"({errors.STREAM_RESPONSE_LIMIT} bytes).", code="Function.ResponseSizeTooLarge")
            return True
        if body:
            request.write(eventstream.payload_chunk(body))
        if not relay.timed:
            # Bound the rest by the invocation's deadline when the daemon says it (message 0 does),
            # else by the fail-safe timeout of silence.
            deadline_in = headers.get(eventstream.DEADLINE_IN_MS)
            relay.timed = isinstance(deadline_in, int) and not isinstance(deadline_in, bool)
            wait = deadline_in / 1000 + STREAM_GRACE if relay.timed else self.config.timeout
            if p.timer is not None:
                p.timer.cancel()
            p.timer = self.loop.call_later(wait, self._timed_out, p)
        return False

    def _begin(self, p: Pending, relay: Relay, headers: Optional[dict]) -> None:
        """Write the 200 and the event stream's head (the ids from the daemon's first message, if
        it is one: None when the lambda-server ends the stream on its own)."""
        relay.began = True
        if headers is None:
            headers = {}
        else:
            now = time.monotonic()
            self.metrics.observe(now - p.started)
            self.served[p.name] = now
        rid = header_text(headers.get(contract.REQUEST_ID)) or p.rid
        version = header_text(headers.get(contract.EXECUTED_VERSION)) or "$LATEST"
        p.request.start(200, _EVENT_STREAM + header(contract.REQUEST_ID, rid) + header(contract.EXECUTED_VERSION,
                                                                                        version))

    def _stream_reply(self, p: Pending, message, headers: dict) -> None:
        """An ordinary (not streamed) reply to a streaming invoke: an API error before the stream
        began, else the whole answer as one PayloadChunk and the InvokeComplete."""
        relay = p.relay
        assert relay is not None
        if relay.began:  # from another run (a daemon that does not stream) while this one streamed
            return self._cut(p, "The daemon streaming the response was lost and the request ran again elsewhere; "
                                "the stream is cut.")
        if header_text(headers.get(contract.ERROR_TYPE)):
            self._finish(p)
            return self._answer(p, message)
        body = message.body
        tail = header_text(headers.get(contract.LOG_RESULT))
        if headers.get(contract.FUNCTION_ERROR) is not None:
            code, details = eventstream.error_fields(body)
            self.metrics.outcomes["function_error"] += 1
            complete, body = eventstream.invoke_complete(code, details, tail), b""
        else:
            self.metrics.outcomes["success"] += 1
            complete = eventstream.invoke_complete(log_result=tail)
        self._stream_whole(p, body, complete, headers)

    def _stream_whole(self, p: Pending, body: bytes, complete: bytes, headers: Optional[dict]) -> None:
        """A stream that is over before it began: its head, ``body`` as one piece, ``complete``."""
        relay = p.relay
        assert relay is not None
        self._finish(p)
        self._begin(p, relay, headers)
        if body:
            p.request.write(eventstream.payload_chunk(body))
        p.request.write(complete)
        p.request.end()

    def _cut(self, p: Pending, details: str, outcome: str = "stream_cut", code: str = _SERVICE_EXCEPTION) -> None:
        """End a stream that cannot go on with an InvokeComplete carrying the error."""
        relay = p.relay
        assert relay is not None
        self._finish(p)
        self.metrics.outcomes[outcome] += 1
        log.info("%s: stream cut: %s", p.rid, details)
        if not relay.began:
            self._begin(p, relay, None)
        p.request.write(eventstream.invoke_complete(code, details))
        p.request.end()

    def _finish(self, p: Pending) -> None:
        if self.pending.get(p.rid) is p:
            del self.pending[p.rid]
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None

    def _timed_out(self, p: Pending) -> None:
        p.timer = None
        if self.pending.get(p.rid) is not p:
            return
        relay = p.relay
        if relay is not None and relay.began:
            if relay.timed:
                return self._cut(p, f"The daemon streaming the response sent no end within {STREAM_GRACE:g} s of "
                                    "the function's deadline; the stream is cut.")
            return self._cut(p, f"The daemon streaming the response sent nothing for {self.config.timeout:g} s; "
                                "the stream is cut.")
        del self.pending[p.rid]
        self.metrics.outcomes["timeout"] += 1
        log.info("%s: no reply within %.2f s", p.rid, self.config.timeout)
        body = errors.timeout_error(p.rid, self.config.timeout)
        if relay is not None:
            code, details = eventstream.error_fields(body)
            return self._stream_whole(p, b"", eventstream.invoke_complete(code, details), None)
        p.request.respond(200, _JSON + header(contract.REQUEST_ID, p.rid) + _FUNCTION_ERROR, body)

    def _abandon(self, p: Pending) -> None:
        """The HTTP client went away: stop waiting (the function still runs, as on AWS)."""
        if self.pending.get(p.rid) is p:
            del self.pending[p.rid]
            if p.timer is not None:
                p.timer.cancel()

    def _forget(self, rid: str) -> None:
        p = self.pending.pop(rid, None)
        if p is not None and p.timer is not None:
            p.timer.cancel()

    def _refuse(self, request: Request, rid: str, refusal: contract.Refusal, outcome: str = "rejected") -> None:
        self._api_error(request, rid, refusal.api_error, refusal.message, outcome)

    def _api_error(self, request: Request, rid: str, api_error: errors.ApiError, message: str,
                   outcome: str = "rejected") -> None:
        """Answer with an API error of the lambda-server's own (never a 429: it throttles nothing)."""
        if request.answered:
            return
        self.metrics.outcomes[outcome] += 1
        extra = header(contract.REQUEST_ID, rid) + header(contract.ERROR_TYPE, api_error.code)
        request.respond_json(api_error.status, api_error.body(message), extra)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- shutdown ----------------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Stop taking invokes; give the waiting ones up to ``grace`` seconds, then answer 503."""
        self.accepting = False
        deadline = self.loop.time() + grace
        while (self.pending or self.tasks) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if p.timer is not None:
                p.timer.cancel()
            if p.relay is not None and p.relay.began:
                self._cut(p, "lambda-server is shutting down.", "unavailable")
                continue
            self._api_error(p.request, p.rid, errors.SERVICE, "lambda-server is shutting down.", "unavailable")

    # ---- metrics -----------------------------------------------------------------------------
    def render_metrics(self) -> bytes:
        m = self.metrics
        out = ["# HELP lambda_server_requests_total Invoke requests by how they ended.",
               "# TYPE lambda_server_requests_total counter"]
        out += [f'lambda_server_requests_total{{outcome="{k}"}} {v}' for k, v in m.outcomes.items()]
        out += m.replies.lines("lambda_server_reply_seconds", "Time from publish to the daemon's reply.")
        out += ["# HELP lambda_server_in_flight Invokes waiting for a reply.",
                "# TYPE lambda_server_in_flight gauge",
                f"lambda_server_in_flight {len(self.pending)}",
                "# HELP lambda_server_broker_connected 1 while the broker connection is up.",
                "# TYPE lambda_server_broker_connected gauge",
                f"lambda_server_broker_connected {1 if self.link.is_up else 0}"]
        return ("\n".join(out) + "\n").encode()


def _get(request: Request, answer) -> None:
    if request.method not in ("GET", "HEAD"):
        return _plain(request, 405, "Method Not Allowed", header("Allow", "GET"))
    answer()


def _plain(request: Request, status: int, message: str, extra: bytes = b"") -> None:
    request.respond_json(status, json.dumps({"message": message}).encode(),
                         header(contract.REQUEST_ID, new_request_id()) + extra)


def _routable(name: str, qualifier: Optional[str]) -> bool:
    """Any name can be routed (the broker says whether a daemon serves it) that fits a routing key,
    an AMQP short string of at most 255 bytes."""
    return len(name.encode()) <= 255
