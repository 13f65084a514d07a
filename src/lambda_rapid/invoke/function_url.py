"""Lambda Function URLs: the listener on ``FUNCTION_URL_PORT`` where any request (any method, path,
query, headers and body) becomes an invocation of the function.

Thin, like ``http_api.py``: translate the HTTP request into AWS's Function URL event (payload
format 2.0), submit an Invocation to the pool, and turn the function's result into the HTTP
response as AWS's Function URLs do. With ``FUNCTION_URL_INVOKE_MODE=RESPONSE_STREAM`` the runtime's
streamed ``/response`` goes to the caller piece by piece as it arrives; when the runtime sends
AWS's HTTP-integration prelude (what ``awslambda.HttpResponseStream.from`` writes: JSON metadata,
8 NUL bytes, then the body) the status, headers and cookies come from it. The daemon imports this
module only when ``FUNCTION_URL_PORT`` is set.

Where each rule comes from (AWS's pages unless said otherwise):
- the event's fields: "Invoking Lambda function URLs", Request payload format;
- repeated headers and query keys comma-joined, every cookie of the request in ``cookies``:
  "Create AWS Lambda proxy integrations for HTTP APIs in API Gateway", payload format 2.0 (the
  format Function URLs follow);
- the result's mapping (``statusCode``, ``headers``, ``cookies`` -> Set-Cookie, ``body``,
  ``isBase64Encoded``; no ``statusCode``: 200 application/json): "Invoking Lambda function URLs",
  Response payload format and Cookies;
- what AWS answers where the pages say nothing (a function error is 502 "Internal Server Error"; a
  string result is sent as the string itself and other JSON values re-serialised compactly; a dict
  ``body`` is sent as its JSON; ``accountId`` ``anonymous``; the cookie header kept in ``headers``
  too; absent ``body``, ``cookies``, ``queryStringParameters`` when empty): responses recorded
  from real function URLs (LocalStack's AWS-validated snapshot tests, aws-lambda-go's lambdaurl
  test data, Powertools' Function URL events).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
import urllib.parse
from typing import Any, Optional

from .. import errors
from ..config import Config
from ..http.server import Request, header
from ..invocation import SUCCESS, Invocation, Result, new_request_id, new_trace_id
from ..pool import Pool

log = logging.getLogger(__name__)

RESPONSE_STREAM = "RESPONSE_STREAM"
# The content type of a streamed /response that starts with the prelude (aws-lambda-ric's
# HttpResponseStream.from sets it; so must any other runtime that sends a prelude).
PRELUDE_TYPE = "application/vnd.awslambda.http-integration-response"
PRELUDE_DELIMITER = b"\0" * 8
PRELUDE_LIMIT = 65536  # bytes of prelude waited for before the stream is judged malformed
INTERNAL_ERROR = b"Internal Server Error"
_JSON = b"content-type: application/json\r\n"
_OCTET_STREAM = b"content-type: application/octet-stream\r\n"
_COMPACT = (",", ":")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110 field-name
# Request headers that belong to the hop between the caller and us, not to the function (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade"))
# Response headers the HTTP layer writes itself: the function's would contradict the framing.
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive", "date"))


# ---- the request: AWS's Function URL event -----------------------------------------------------

def is_text(content_type: str) -> bool:
    """Whether a body of this type goes into the event as text (else base64). AWS: "If the content
    type of the request is binary, the body is base64-encoded"; text/*, JSON and XML types are not
    (AWS's Function URL launch material names application/json and text/*; LocalStack's
    AWS-validated tests add XML, and a multipart body arrives base64-encoded)."""
    mime = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    if kind == "text":
        return True
    return subtype in ("json", "xml", "javascript") or subtype.endswith(("+json", "+xml"))


def query_parameters(query: str) -> dict:
    """``queryStringParameters``: values decoded, a repeated key's values joined with commas."""
    params: dict = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        params[name] = params[name] + "," + value if name in params else value
    return params


def request_cookies(value: Optional[str]) -> list:
    """``cookies``: each ``name=value`` of the Cookie header, in order."""
    if not value:
        return []
    return [part.strip() for part in value.split(";") if part.strip()]


def event_time(now: float) -> str:
    """``requestContext.time`` as AWS writes it: ``12/Mar/2020:19:03:58 +0000``."""
    t = time.gmtime(now)
    return (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:"
            f"{t.tm_sec:02d} +0000")


def _domain(host: str) -> str:
    """The Host header without its port (AWS's domainName never has one)."""
    if host.startswith("["):
        return host[:host.find("]") + 1] or host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def _text(value: str) -> str:
    """A header value the HTTP layer decoded as latin-1, read as the UTF-8 it usually is."""
    if value.isascii():
        return value
    return value.encode("latin-1").decode("utf-8", "replace")


def url_event(request: Any, *, request_id: str, trace_id: str, source_ip: str, port: int, now: float) -> dict:
    """The Function URL event (payload format 2.0) for ``request`` (anything with ``method``,
    ``path``, ``query``, ``headers`` (lower-cased names, repeated values comma-joined, as the
    HTTP layer gives them) and ``body``)."""
    named = {t.strip() for t in request.headers.get("connection", "").lower().split(",")}
    headers = {name: _text(value) for name, value in request.headers.items()
               if name not in _HOP_BY_HOP and name not in named}
    # What AWS's front end adds, as recorded Function URL events show (no TLS here: no x-amzn-tls-*).
    forwarded = headers.get("x-forwarded-for")
    headers["x-forwarded-for"] = f"{forwarded}, {source_ip}" if forwarded else source_ip
    headers["x-forwarded-proto"] = "http"
    headers["x-forwarded-port"] = str(port)
    headers["x-amzn-trace-id"] = trace_id
    domain = _domain(headers.get("host", "")) or "localhost"
    prefix = domain.split(".", 1)[0]

    event: dict = {"version": "2.0", "routeKey": "$default", "rawPath": request.path,
                   "rawQueryString": request.query}
    cookies = request_cookies(headers.get("cookie"))
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if request.query:
        event["queryStringParameters"] = query_parameters(request.query)
    event["requestContext"] = {
        "accountId": "anonymous",  # AuthType NONE: no caller identity
        "apiId": prefix,
        "domainName": domain,
        "domainPrefix": prefix,
        "http": {"method": request.method, "path": request.path, "protocol": "HTTP/1.1",
                 "sourceIp": source_ip, "userAgent": headers.get("user-agent", "")},
        "requestId": request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": event_time(now),
        "timeEpoch": int(now * 1000),
    }
    body = request.body
    encoded = False
    if body:
        text = None
        if is_text(headers.get("content-type", "")):
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                pass  # not text after all: JSON can carry it only as base64
        if text is None:
            text, encoded = base64.b64encode(body).decode("ascii"), True
        event["body"] = text
    event["isBase64Encoded"] = encoded
    return event


# ---- the response: the function's result as HTTP ------------------------------------------------

class BadResponse(Exception):
    """The function answered with something that cannot be an HTTP response: AWS answers 502."""


def status_of(value: Any) -> int:
    """``statusCode`` as a number (AWS accepts ``"418"`` as well as ``418``)."""
    if isinstance(value, bool):
        raise BadResponse(f"statusCode {value!r} is not a number")
    if (isinstance(value, str) and value.strip().isdigit()) or (isinstance(value, float) and value.is_integer()):
        value = int(value)
    if not isinstance(value, int) or not 100 <= value <= 599:
        raise BadResponse(f"statusCode {value!r} is not an HTTP status")
    return value


def header_lines(headers: Any, cookies: Any, default_type: bytes) -> bytes:
    """The response's header lines: ``headers`` as given (names that are not HTTP tokens, and the
    framing the HTTP layer owns, left out), each of ``cookies`` as a Set-Cookie line, and
    ``default_type`` when the function set no Content-Type."""
    lines = []
    typed = False
    if isinstance(headers, dict):
        for name, value in headers.items():
            if value is None or not isinstance(name, str) or not _TOKEN.match(name):
                continue
            lower = name.lower()
            if lower in _FRAMING:
                continue
            typed = typed or lower == "content-type"
            lines.append(header(name, value if isinstance(value, str) else json.dumps(value)))
    if isinstance(cookies, list):
        lines.extend(header("Set-Cookie", c) for c in cookies if isinstance(c, str))
    head = b"".join(lines)
    return head if typed else default_type + head


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=_COMPACT, ensure_ascii=False).encode("utf-8", "replace")


def http_response(payload: bytes) -> tuple:
    """(status, header lines, body) for a function's successful result; raises BadResponse."""
    try:
        doc = json.loads(payload)
    except ValueError:
        raise BadResponse("the result is not JSON") from None
    if not isinstance(doc, dict) or "statusCode" not in doc:
        # "If your function returns valid JSON and doesn't return a statusCode": 200, the JSON.
        body = doc.encode("utf-8", "replace") if isinstance(doc, str) else _dumps(doc)
        return 200, _JSON, body
    status = status_of(doc["statusCode"])
    head = header_lines(doc.get("headers"), doc.get("cookies"), _JSON)
    body = doc.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        if doc.get("isBase64Encoded") is True:
            try:
                data = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise BadResponse("isBase64Encoded is true but the body is not base64") from None
        else:
            data = body.encode("utf-8", "replace")
    else:
        data = _dumps(body)
    return status, head, data


def answer(result: Result) -> tuple:
    """(status, header lines, body) of the HTTP response for how an invocation ended."""
    api_error = result.api_error
    if api_error is not None:  # refused before it ran (429, 503): Lambda's own error
        return api_error.status, _JSON + header("x-amzn-ErrorType", api_error.code), result.body
    if result.outcome != SUCCESS or result.function_error:
        return 502, _JSON, INTERNAL_ERROR  # function error, timeout, crash, init error
    try:
        return http_response(result.body)
    except BadResponse as e:
        log.info("function URL: the function's response is not an HTTP response (%s): 502", e)
        return 502, _JSON, INTERNAL_ERROR


# ---- the front door ----------------------------------------------------------------------------

class FunctionUrlApi:
    """The HttpServer application of the Function URL listener."""

    def __init__(self, pool: Pool, config: Config) -> None:
        self.pool = pool
        self.config = config
        self.streaming = config.function_url_invoke_mode == RESPONSE_STREAM
        self.arn = config.function_arn

    def body_limit(self, request: Request) -> int:
        return errors.SYNC_REQUEST_LIMIT  # the event goes to a RequestResponse invoke

    def handle(self, request: Request) -> None:
        request_id = new_request_id()
        rid = header("x-amzn-RequestId", request_id)
        if request.too_large:
            return self._too_large(request, rid)
        conn = request.conn
        sockname = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        trace_id = request.headers.get("x-amzn-trace-id") or new_trace_id()
        event = url_event(request, request_id=request_id, trace_id=trace_id,
                          source_ip=conn.peer[0] if conn.peer else "",
                          port=sockname[1] if sockname else self.config.function_url_port or 0, now=time.time())
        payload = json.dumps(event, separators=_COMPACT, ensure_ascii=False).encode("utf-8", "replace")
        if len(payload) > errors.SYNC_REQUEST_LIMIT:  # a body near the limit, once base64-encoded
            return self._too_large(request, rid)
        inv = Invocation(request_id, payload, arn=self.arn, trace_id=trace_id)
        if self.streaming:
            stream = StreamedAnswer(request, rid, inv)
            inv.on_chunk = stream.chunk
            inv.on_done = stream.done

            def abandon() -> None:
                inv.on_chunk = None
                self.pool.abandon(inv)

            request.on_abandon = abandon
        else:
            inv.on_done = lambda _inv, result: _respond(request, rid, result)
            request.on_abandon = lambda: self.pool.abandon(inv)
        self.pool.submit(inv)

    def _too_large(self, request: Request, rid: bytes) -> None:
        self.pool.metrics.outcomes["rejected"] += 1
        api_error = errors.REQUEST_TOO_LARGE
        request.respond_json(api_error.status, api_error.body(errors.request_too_large_message(
            errors.SYNC_REQUEST_LIMIT)), rid + header("x-amzn-ErrorType", api_error.code))


def _respond(request: Request, rid: bytes, result: Result) -> None:
    status, head, body = answer(result)
    request.respond(status, head + rid, body)


class StreamedAnswer:
    """RESPONSE_STREAM: the runtime's streamed /response relayed to the caller as it arrives. The
    status line and headers go out with the first piece of the body: from the prelude when the
    stream is the HTTP-integration type, else 200 with the stream's own Content-Type."""

    __slots__ = ("request", "rid", "inv", "started", "prelude", "closed", "head_only")

    def __init__(self, request: Request, rid: bytes, inv: Invocation) -> None:
        self.request = request
        self.rid = rid
        self.inv = inv
        self.started = False
        self.prelude: Optional[bytearray] = None  # the prelude so far, until its delimiter arrives
        self.closed = False  # answered (502 for a malformed prelude): the rest is dropped
        self.head_only: Optional[tuple] = None  # HEAD: (status, headers) sent once the function ends

    def chunk(self, data: bytes) -> None:
        if self.closed:
            return
        if self.started:
            if self.head_only is None:
                self.request.write(data)
            return
        content_type = self.inv.stream_content_type
        if self.prelude is None:
            if (content_type or "").partition(";")[0].strip().lower() != PRELUDE_TYPE:
                self._start(200, _OCTET_STREAM if not content_type else header("content-type", content_type))
                self.chunk(data)
                return
            self.prelude = bytearray()
        buffer = self.prelude
        buffer += data
        end = buffer.find(PRELUDE_DELIMITER)
        if end < 0:
            if len(buffer) > PRELUDE_LIMIT:
                self._fail(f"no prelude delimiter in the first {PRELUDE_LIMIT} bytes")
            return
        try:
            metadata = json.loads(bytes(buffer[:end]))
            if not isinstance(metadata, dict):
                raise BadResponse("the prelude is not a JSON object")
            status = status_of(metadata.get("statusCode", 200))
        except (ValueError, BadResponse) as e:
            return self._fail(f"malformed prelude: {e}")
        rest = bytes(buffer[end + len(PRELUDE_DELIMITER):])
        self.prelude = None
        self._start(status, header_lines(metadata.get("headers"), metadata.get("cookies"), _OCTET_STREAM))
        if rest:
            self.chunk(rest)

    def _start(self, status: int, head: bytes) -> None:
        self.started = True
        if self.request.method == "HEAD":
            self.head_only = (status, head)  # a HEAD answer has no body, so nothing is streamed
        else:
            self.request.start(status, head + self.rid)

    def _fail(self, reason: str) -> None:
        log.info("function URL: the streamed response is not an HTTP response (%s): 502", reason)
        self.closed = True
        self.request.respond(502, _JSON + self.rid, INTERNAL_ERROR)

    def done(self, _inv: Invocation, result: Result) -> None:
        if self.closed:
            return
        self.closed = True
        if self.started:
            if result.outcome != SUCCESS or result.function_error:
                # The status line is gone: the body just ends where the function stopped.
                log.info("function URL: request %s failed mid-stream (%s)", _inv.request_id, result.outcome)
            if self.head_only is not None:
                status, head = self.head_only
                return self.request.respond(status, head + self.rid)
            return self.request.end()
        if self.prelude is not None:
            return self._fail("the stream ended inside its prelude")
        if result.api_error is not None or result.outcome != SUCCESS or result.function_error:
            status, head, body = answer(result)
            return self.request.respond(status, head + self.rid, body)
        # Nothing was streamed. An ordinary /response (from a runtime that does not stream) is sent as
        # it is, its statusCode not read, as AWS does in RESPONSE_STREAM mode.
        content_type = self.inv.stream_content_type
        if content_type is None:
            head = _JSON
        elif content_type.partition(";")[0].strip().lower() == PRELUDE_TYPE:
            head = _OCTET_STREAM  # a prelude stream with nothing in it
        else:
            head = header("content-type", content_type)
        self.request.respond(200, head + self.rid, result.body)
