"""The AWS Lambda Invoke API over HTTP, as boto3, the AWS CLI and curl call it.

Thin: hand the request's headers, path and body to the Invoke contract (``contract.parse_http``),
turn the valid call into an Invocation for the pool, and render the Result with AWS's status codes,
headers and error shapes; a response-streaming invoke gets the same checks and its answer as an
event stream (``eventstream.py``), piece by piece as the runtime streams it. Also serves
``/_/health``, ``/_/ready``, ``/metrics`` and (OpenFaaS) ``POST /``.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Callable, Optional

from ..config import Config
from ..http.server import Request, header
from ..invocation import SUCCESS, Invocation, Result, new_request_id
from ..pool import Pool
from . import contract, eventstream
from .contract import STREAM_PREFIX, STREAM_SUFFIX, function_in_path

log = logging.getLogger(__name__)

_JSON = b"content-type: application/json\r\n"
_FUNCTION_ERROR = header(contract.FUNCTION_ERROR, contract.UNHANDLED)
_LOG_RESULT = f"{contract.LOG_RESULT}: ".encode()


class InvokeApi:
    def __init__(self, pool: Pool, config: Config, metrics: Optional[Callable[[], bytes]] = None,
                 ready: Optional[Callable[[], bool]] = None) -> None:
        self.pool = pool
        self.config = config
        self.serves = contract.serves_function(config.function_name, config.function_version)
        self.tenant_isolated = config.tenant_isolated
        self.arn = config.function_arn
        self.retry_after = header(contract.RETRY_AFTER, contract.retry_after(config.timeout))
        self.metrics = metrics
        self.ready: Callable[[], bool] = ready or (lambda: pool.accepting)
        version = header(contract.EXECUTED_VERSION, config.function_version)
        self._ok_headers = _JSON + version
        self._stream_headers = b"content-type: application/vnd.amazon.eventstream\r\n" + version

    # ---- HttpServer application interface ----------------------------------------------------
    def body_limit(self, request: Request) -> int:
        return contract.body_limit(request.headers.get("x-amz-invocation-type"))

    def handle(self, request: Request) -> None:
        path = request.path
        name = function_in_path(path)
        streaming = False
        if name is None:
            name = function_in_path(path, STREAM_PREFIX, STREAM_SUFFIX)
            streaming = name is not None
        if name is not None:
            if request.method != "POST":
                return self._plain_error(request, 405, "Method Not Allowed", header("Allow", "POST"))
            return self.invoke(request, name, streaming)
        if path == "/_/health":
            return self._get(request, lambda: request.respond(200, b"content-type: text/plain\r\n" + _rid(), b"OK"))
        elif path == "/_/ready":
            return self._get(request, lambda: self._ready(request))
        elif path == "/metrics" and self.metrics is not None:
            return self._get(request, lambda: request.respond(
                200, b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n" + _rid(), self.metrics()))
        elif path == "/" and self.config.enable_openfaas:
            if request.method != "POST":
                return self._plain_error(request, 405, "Method Not Allowed", header("Allow", "POST"))
            return self.invoke(request, "function")
        self._plain_error(request, 404, "Not Found")

    @staticmethod
    def _get(request: Request, answer: Callable[[], None]) -> None:
        if request.method not in ("GET", "HEAD"):
            return InvokeApi._plain_error(request, 405, "Method Not Allowed", header("Allow", "GET"))
        answer()

    def _ready(self, request: Request) -> None:
        if self.ready():
            request.respond(200, b"content-type: text/plain\r\n" + _rid(), b"OK")
        else:
            request.respond(503, b"content-type: text/plain\r\n" + _rid(), b"Not Ready")

    @staticmethod
    def _plain_error(request: Request, status: int, message: str, extra: bytes = b"") -> None:
        request.respond_json(status, json.dumps({"message": message}).encode(), _rid() + extra)

    # ---- invoke ------------------------------------------------------------------------------
    def invoke(self, request: Request, raw_name: str, streaming: bool = False) -> None:
        headers = request.headers
        request_id = contract.request_id(headers.get("amz-sdk-invocation-id"), self.pool.is_active)
        rid = header(contract.REQUEST_ID, request_id)
        try:
            call = contract.parse_http(
                headers, raw_name, request.query, request.body, request.too_large, serves=self.serves,
                region=self.config.region, tenant_isolated=self.tenant_isolated,
                allowed=contract.STREAM_INVOCATION_TYPES if streaming else contract.INVOCATION_TYPES)
        except contract.Refusal as refusal:
            return self._error(request, rid, refusal)
        invocation_type = call.invocation_type
        if invocation_type == "DryRun":
            return request.respond(204, rid)

        inv = Invocation(request_id, call.payload, arn=self.arn, client_context=call.client_context,
                         trace_id=call.trace_id, invocation_type=invocation_type, tail=call.tail,
                         qualifier=call.qualifier, tenant_id=call.tenant_id)
        if invocation_type == "Event":
            return self._invoke_event(request, rid, inv)
        if streaming:
            return self._invoke_streaming(request, rid, inv)
        inv.on_done = lambda _inv, result: self._reply(request, rid, result)
        request.on_abandon = lambda: self.pool.abandon(inv)
        self.pool.submit(inv)

    def _invoke_event(self, request: Request, rid: bytes, inv: Invocation) -> None:
        refused: list = []
        inv.on_done = lambda _inv, result: refused.append(result)
        self.pool.submit(inv)
        if refused and refused[0].api_error is not None:
            return self._reply(request, rid, refused[0])
        if not inv.done:
            inv.on_done = _event_done
        request.respond(202, rid)

    def _invoke_streaming(self, request: Request, rid: bytes, inv: Invocation) -> None:
        stream = _StreamReply(request, self._stream_headers + rid)
        inv.on_chunk = stream.chunk
        inv.on_done = lambda _inv, result: self._stream_done(request, rid, stream, result)

        def abandon() -> None:
            inv.on_chunk = None
            self.pool.abandon(inv)

        request.on_abandon = abandon
        self.pool.submit(inv)

    def _stream_done(self, request: Request, rid: bytes, stream: _StreamReply, result: Result) -> None:
        if result.api_error is not None and not stream.started:
            return self._reply(request, rid, result)  # refused (429, 503): an ordinary error response
        log_result = None if result.log_tail is None else base64.b64encode(result.log_tail).decode()
        if result.outcome == SUCCESS:
            if result.body:  # answered with an ordinary (not streamed) /response: one chunk
                stream.chunk(result.body)
            complete = eventstream.invoke_complete(log_result=log_result)
        else:
            code, details = eventstream.error_fields(result.body)
            complete = eventstream.invoke_complete(code, details, log_result)
        if not stream.started:
            stream.start()
        request.write(complete)
        request.end()

    def _reply(self, request: Request, rid: bytes, result: Result) -> None:
        api_error = result.api_error
        if api_error is not None:
            extra = rid + header(contract.ERROR_TYPE, api_error.code)
            if api_error.retry_after:
                extra += self.retry_after
            return request.respond_json(api_error.status, result.body, extra)
        headers = self._ok_headers + rid
        if result.function_error:
            headers += _FUNCTION_ERROR
        if result.log_tail is not None:
            headers += _LOG_RESULT + base64.b64encode(result.log_tail) + b"\r\n"
        request.respond(200, headers, result.body)

    def _error(self, request: Request, rid: bytes, refusal: contract.Refusal) -> None:
        self.pool.metrics.outcomes["rejected"] += 1
        code = refusal.api_error.code
        log.info("invoke refused (%s): %s", code, refusal.message)
        request.respond_json(refusal.api_error.status, refusal.body(), rid + header(contract.ERROR_TYPE, code))


def _rid() -> bytes:
    """A fresh x-amzn-RequestId header: AWS puts one on every response, errors and probes included."""
    return header(contract.REQUEST_ID, new_request_id())


class _StreamReply:
    """A response-streaming invoke's answer: 200 and the event stream's head go out with the first
    piece of the function's response (or with the end, if nothing was streamed)."""

    __slots__ = ("request", "headers", "started")

    def __init__(self, request: Request, headers: bytes) -> None:
        self.request = request
        self.headers = headers
        self.started = False

    def start(self) -> None:
        self.started = True
        self.request.start(200, self.headers)

    def chunk(self, data: bytes) -> Optional[Request]:
        """Send one piece; returns the caller's request while its socket is full, and the runtime's
        streamed /response is not read until it drains (a slow reader is not buffered for)."""
        if not data:
            return None
        if not self.started:
            self.start()
        return self.request.write(eventstream.payload_chunk(data))


def _event_done(inv: Invocation, result: Result) -> None:
    if result.outcome != SUCCESS:
        log.warning("Event invocation %s ended with %s: %s", inv.request_id, result.outcome, result.body[:300])
