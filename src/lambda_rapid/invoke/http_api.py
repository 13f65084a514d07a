"""The AWS Lambda Invoke API over HTTP, as boto3, the AWS CLI and curl call it.

Thin: validate the request as AWS does (function name, qualifier, invocation type, payload, client
context), turn it into an Invocation for the pool, and render the Result with AWS's status codes,
headers and error shapes; a response-streaming invoke gets the same checks and its answer as an
event stream (``eventstream.py``), piece by piece as the runtime streams it. Also serves
``/_/health``, ``/_/ready``, ``/metrics`` and (OpenFaaS) ``POST /``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import urllib.parse
from typing import Callable, Optional

from .. import errors
from ..config import ACCOUNT_ID, Config
from ..http.server import Request, header
from ..invocation import SUCCESS, Invocation, Result, is_uuid, new_request_id
from ..pool import Pool
from . import eventstream

log = logging.getLogger("lambda_rapid.invoke.http_api")

PREFIX = "/2015-03-31/functions/"
SUFFIX = "/invocations"
STREAM_PREFIX = "/2021-11-15/functions/"
STREAM_SUFFIX = "/response-streaming-invocations"
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
STREAM_INVOCATION_TYPES = ("RequestResponse", "DryRun")  # InvokeWithResponseStream has no Event
LOG_TYPES = ("None", "Tail")
_JSON = b"content-type: application/json\r\n"
_FUNCTION_ERROR = b"X-Amz-Function-Error: Unhandled\r\n"
BAD_CONTEXT = "Client context must be a valid Base64-encoded JSON object."


def function_in_path(path: str, prefix: str = PREFIX, suffix: str = SUFFIX) -> Optional[str]:
    """The {FunctionName} segment of an invoke route, or None when ``path`` is not that route."""
    if path.startswith(prefix) and path.endswith(suffix):
        name = path[len(prefix):-len(suffix)]
        if name and "/" not in name:
            return name
    return None


def parse_function_name(raw: str) -> tuple:
    """(name, qualifier) from a name, NAME:Q, partial ARN or full ARN; name None if malformed."""
    parts = raw.split(":")
    n = len(parts)
    if parts[0] == "arn":
        if n in (7, 8) and parts[1].startswith("aws") and parts[2] == "lambda" and parts[5] == "function":
            return parts[6], parts[7] if n == 8 else None
        return None, None
    if n in (3, 4) and parts[1] == "function":
        return parts[2], parts[3] if n == 4 else None
    if n == 2:
        return parts[0], parts[1]
    if n == 1:
        return parts[0], None
    return None, None


class InvalidInvoke(Exception):
    """An Invoke API call AWS would refuse: which error, and its message."""

    def __init__(self, api_error: errors.ApiError, message: str) -> None:
        super().__init__(message)
        self.api_error = api_error
        self.message = message


class UnknownFunction(Exception):
    """The call names a function (or qualifier) that is not served here: a 404."""

    def __init__(self, name: str, qualifier: Optional[str]) -> None:
        super().__init__(name)
        self.name = name
        self.qualifier = qualifier


class InvokeCall:
    """A valid Invoke API call, before it becomes an Invocation (daemon) or a message (lambda-server)."""

    __slots__ = ("name", "qualifier", "invocation_type", "tail", "encoded_context", "client_context",
                 "payload", "trace_id")


def invoke_body_limit(request: Request) -> int:
    """AWS's request size limits: 1 MB for an Event, 6 MB otherwise."""
    if request.headers.get("x-amz-invocation-type") == "Event":
        return errors.EVENT_REQUEST_LIMIT
    return errors.SYNC_REQUEST_LIMIT


def request_id_for(headers: dict, in_use: Callable[[str], bool]) -> str:
    """The SDK's Amz-Sdk-Invocation-Id when it is a UUID not already in flight, else a new id."""
    sdk_id = headers.get("amz-sdk-invocation-id")
    if sdk_id is not None and is_uuid(sdk_id) and not in_use(sdk_id.lower()):
        return sdk_id.lower()
    return new_request_id()


def parse_invoke(request: Request, raw_name: str, serves: Callable[[str, Optional[str]], bool],
                 allowed_types: tuple = INVOCATION_TYPES) -> InvokeCall:
    """Validate an Invoke API call in the order AWS does; raises InvalidInvoke or UnknownFunction.
    ``serves(name, qualifier)`` says whether this front door knows the function."""
    headers = request.headers
    call = InvokeCall()
    call.invocation_type = invocation_type = headers.get("x-amz-invocation-type", "RequestResponse")
    if invocation_type not in allowed_types:
        raise InvalidInvoke(errors.INVALID_PARAMETER_VALUE, f"Unsupported invocation type {invocation_type!r}; "
                                                            f"use one of {', '.join(allowed_types)}.")
    if request.too_large:
        raise InvalidInvoke(errors.REQUEST_TOO_LARGE, errors.request_too_large_message(request.limit))

    name, qualifier = parse_function_name(urllib.parse.unquote(raw_name))
    query_qualifier = None
    if request.query:
        values = urllib.parse.parse_qs(request.query).get("Qualifier")
        if values:
            query_qualifier = values[0]
    if qualifier is not None and query_qualifier is not None and qualifier != query_qualifier:
        raise InvalidInvoke(errors.INVALID_PARAMETER_VALUE,
                            "The derived qualifier from the function name does not match the specified qualifier.")
    qualifier = qualifier if qualifier is not None else query_qualifier
    if not name or not serves(name, qualifier):
        raise UnknownFunction(name or raw_name, qualifier)
    call.name, call.qualifier = name, qualifier

    log_type = headers.get("x-amz-log-type", "None")
    if log_type not in LOG_TYPES:
        raise InvalidInvoke(errors.INVALID_PARAMETER_VALUE, f"Unsupported log type {log_type!r}; use None or Tail.")
    call.tail = log_type == "Tail"

    call.encoded_context = encoded = headers.get("x-amz-client-context") or None
    call.client_context = None
    if encoded:
        call.client_context = decode_client_context(encoded)
        if call.client_context is None:
            raise InvalidInvoke(errors.INVALID_REQUEST_CONTENT, BAD_CONTEXT)

    payload = request.body
    if not payload.strip():
        payload = b"{}"  # AWS hands an empty payload to the function as {}
    else:
        try:
            json.loads(payload)
        except ValueError as e:
            raise InvalidInvoke(errors.INVALID_REQUEST_CONTENT, "Could not parse request body into json: Could "
                                                                f"not parse payload into json: {e}") from None
    call.payload = payload
    call.trace_id = headers.get("x-amzn-trace-id")
    return call


class InvokeApi:
    def __init__(self, pool: Pool, config: Config, metrics: Optional[Callable[[], bytes]] = None) -> None:
        self.pool = pool
        self.config = config
        self.names = ("function", config.function_name)
        self.versions = ("$LATEST", config.function_version)
        self.metrics = metrics
        self.ready: Callable[[], bool] = lambda: pool.accepting
        self._ok_headers = _JSON + header("X-Amz-Executed-Version", config.function_version)
        self._stream_headers = (b"content-type: application/vnd.amazon.eventstream\r\n"
                                + header("X-Amz-Executed-Version", config.function_version))

    # ---- HttpServer application interface ----------------------------------------------------
    def body_limit(self, request: Request) -> int:
        return invoke_body_limit(request)

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
        request_id = request_id_for(request.headers, self.pool.is_active)
        rid = header("x-amzn-RequestId", request_id)
        try:
            call = parse_invoke(request, raw_name, self._serves,
                                STREAM_INVOCATION_TYPES if streaming else INVOCATION_TYPES)
        except InvalidInvoke as e:
            return self._error(request, rid, e.api_error, e.message)
        except UnknownFunction as e:
            arn = f"arn:aws:lambda:{self.config.region}:{ACCOUNT_ID}:function:{e.name}"
            if e.qualifier is not None:
                arn += f":{e.qualifier}"
            return self._error(request, rid, errors.RESOURCE_NOT_FOUND, errors.not_found_message(arn))
        invocation_type = call.invocation_type
        if invocation_type == "DryRun":
            return request.respond(204, rid)

        inv = Invocation(request_id, call.payload, arn=self.config.function_arn, client_context=call.client_context,
                         trace_id=call.trace_id, invocation_type=invocation_type, tail=call.tail,
                         qualifier=call.qualifier)
        if invocation_type == "Event":
            return self._invoke_event(request, rid, inv)
        if streaming:
            return self._invoke_streaming(request, rid, inv)
        inv.on_done = lambda _inv, result: self._reply(request, rid, result)
        request.on_abandon = lambda: self.pool.abandon(inv)
        self.pool.submit(inv)

    def _serves(self, name: str, qualifier: Optional[str]) -> bool:
        return name in self.names and (qualifier is None or qualifier in self.versions)

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
            code, details = _error_fields(result.body)
            complete = eventstream.invoke_complete(code, details, log_result)
        if not stream.started:
            stream.start()
        request.write(complete)
        request.end()

    def _reply(self, request: Request, rid: bytes, result: Result) -> None:
        api_error = result.api_error
        if api_error is not None:
            extra = rid + header("x-amzn-ErrorType", api_error.code)
            if api_error.retry_after:
                extra += header("Retry-After", str(max(1, int(self.config.timeout))))
            return request.respond_json(api_error.status, result.body, extra)
        headers = self._ok_headers + rid
        if result.function_error:
            headers += _FUNCTION_ERROR
        if result.log_tail is not None:
            headers += b"X-Amz-Log-Result: " + base64.b64encode(result.log_tail) + b"\r\n"
        request.respond(200, headers, result.body)

    def _error(self, request: Request, rid: bytes, api_error: errors.ApiError, message: str) -> None:
        self.pool.metrics.outcomes["rejected"] += 1
        log.info("invoke refused (%s): %s", api_error.code, message)
        request.respond_json(api_error.status, api_error.body(message),
                             rid + header("x-amzn-ErrorType", api_error.code))


def _rid() -> bytes:
    """A fresh x-amzn-RequestId header: AWS puts one on every response, errors and probes included."""
    return header("x-amzn-RequestId", new_request_id())


def decode_client_context(encoded: str) -> Optional[str]:
    """The decoded client context (JSON object text), or None when it is not valid."""
    try:
        raw = base64.b64decode(encoded, validate=True)
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    # latin-1 keeps the UTF-8 bytes as they are when the header is written out
    return raw.decode("latin-1").replace("\r", "").replace("\n", "")


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


def _error_fields(body: bytes) -> tuple:
    """(ErrorCode, ErrorDetails) of InvokeComplete from a function error body: its errorType and
    errorMessage when it is the usual JSON object, else ``Unhandled`` and the body as text."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errorType"), str):
        message = doc.get("errorMessage")
        return doc["errorType"], message if isinstance(message, str) else json.dumps(message)
    return "Unhandled", body.decode("utf-8", "replace")


def _event_done(inv: Invocation, result: Result) -> None:
    if result.outcome != "success":
        log.warning("Event invocation %s ended with %s: %s", inv.request_id, result.outcome, result.body[:300])
