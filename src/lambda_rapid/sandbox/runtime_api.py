"""The Runtime API (``/2018-06-01/runtime/...``) that runtime processes poll and answer.

Thin: it turns HTTP requests into pool calls and pool events into HTTP responses. Which instance a
call comes from is known from the listener it arrived on (each spawned instance gets its own
``AWS_LAMBDA_RUNTIME_API`` port); calls on the main port come from runtimes started by hand.
Other APIs served on the same port (Extensions, Telemetry) are given as ``routes`` when it is built;
the SnapStart endpoints (``restore/next``, ``restore/error``) are served only for a SnapStart function,
their effects are SnapStart's restore phase's (``restore``, sandbox/restore.py).
Reference: https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html,
https://docs.aws.amazon.com/lambda/latest/dg/snapstart-runtime-hooks-custom.html

Every hand-over of an invocation (each /next answer) carries a fresh ``Lambda-Runtime-Invocation-Id``;
a /response or /error that echoes another one is stale (the runtime still works on a hand-over that
timed out, and the request id was handed out again) and is refused without effect. Runtimes that
echo nothing are not checked. awslambdaric >= 4.0.2 echoes it as ``lambda-runtime-invocation-id``
(its aws-lambda-cpp patch ``aws-lambda-cpp-add-invocation-id.patch``).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Callable, Dict, Mapping, Optional, Protocol

from .. import errors
from ..config import Config
from ..http.server import Request, header
from ..instances import Instance
from ..invocation import Invocation, new_invocation_id
from ..pool import Pool, Waiter

log = logging.getLogger(__name__)
Route = Callable[[Request, Instance], None]

PREFIX = "/2018-06-01/runtime/"
INVOCATION = PREFIX + "invocation/"
NEXT = INVOCATION + "next"
INIT_ERROR = PREFIX + "init/error"
RESTORE_NEXT = PREFIX + "restore/next"
RESTORE_ERROR = PREFIX + "restore/error"
INVOCATION_ID = "lambda-runtime-invocation-id"
ACCEPTED = b'{"status":"OK"}'
_JSON = b"content-type: application/json\r\n"
# A stale answer (its invocation id is not the current hand-over's). AWS documents no answer for it;
# this is AWS's RAPID answer to an answer that comes after its invoke timed out, 410 InvokeTimeout
# (aws-lambda-runtime-interface-emulator, internal/lambda-managed-instances: rendering.RenderInvokeTimeout,
# invoke.InvokeRouter), which AWS's .NET runtime client treats as the cross-wiring rejection
# (aws/aws-lambda-dotnet#2508: "an ErrorRuntimeInvokeTimeout rejection (HTTP 410 Gone)").
STALE_STATUS = 410
STALE_BODY = errors.runtime_api_error("InvokeTimeout", "Invoke timeout")


class Restore(Protocol):
    """What the SnapStart endpoints ask of the sandbox layer (sandbox/restore.py implements it)."""

    def restore_next(self, instance: Instance, waiter: RestoreNext) -> Optional[str]:
        """The runtime of ``instance`` is ready for its snapshot: ``waiter.restored()`` once it is
        restored (the refusal's message instead, if the instance is in no state to restore)."""

    def restore_error(self, instance: Instance, body: bytes, error_type: Optional[str]) -> Optional[str]:
        """An after-restore hook failed; the refusal's message if the instance is not restoring."""


class RestoreNext:
    """A runtime's GET /restore/next, answered (200, no body, as AWS's RAPID) once it is restored."""

    __slots__ = ("request", "alive")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.alive = True

    def restored(self) -> None:
        if self.alive:
            self.alive = False
            self.request.respond(200)

    def gone(self) -> None:
        self.alive = False


class NextRequest(Waiter):
    """A runtime parked in GET /next: the pool answers it with an invocation's event."""

    __slots__ = ("api", "request")

    def __init__(self, api: RuntimeApi, instance: Instance, request: Request) -> None:
        super().__init__(instance)
        self.api = api
        self.request = request

    def send(self, inv: Invocation) -> None:
        api = self.api
        inv.invocation_id = invocation_id = new_invocation_id()
        headers = b"".join((
            _JSON,
            b"Lambda-Runtime-Aws-Request-Id: %s\r\nLambda-Runtime-Deadline-Ms: %d\r\n"
            b"Lambda-Runtime-Invocation-Id: %s\r\n"
            % (inv.request_id.encode(), inv.deadline_ms, invocation_id.encode()),
            api.arn_header if inv.qualifier is None else header(
                "Lambda-Runtime-Invoked-Function-Arn", f"{api.arn}:{inv.qualifier}"),
            header("Lambda-Runtime-Trace-Id", inv.trace_id),
            b"" if inv.client_context is None else header("Lambda-Runtime-Client-Context", inv.client_context),
            # awslambdaric 4.x reads it into context.tenant_id (lambda_runtime_client.py)
            b"" if inv.tenant_id is None else header("Lambda-Runtime-Aws-Tenant-Id", inv.tenant_id),
        ))
        self.request.respond(200, headers, inv.payload)

    def gone(self) -> None:
        self.api.pool.waiter_gone(self)


class RuntimeApi:
    def __init__(self, pool: Pool, config: Config, routes: Optional[Mapping[str, Route]] = None,
                 restore: Optional[Restore] = None) -> None:
        self.pool = pool
        self.config = config
        # SnapStart's endpoints, served only for a SnapStart function (AWS's RAPID registers them
        # only then; any other function gets the 404 of an unknown path, as before).
        self.restore = restore if config.snap_start else None
        self.arn = config.function_arn
        self._external = 0
        # Other APIs served on this port: path prefix -> handler(request, instance).
        self.routes: Dict[str, Route] = dict(routes or {})
        self.arn_header = header("Lambda-Runtime-Invoked-Function-Arn", self.arn)

    # ---- HttpServer application interface ----------------------------------------------------
    def body_limit(self, request: Request) -> int:
        if "lambda-runtime-function-response-mode" in request.headers:
            return self._stream_limit(request)
        return errors.RESPONSE_LIMIT

    def _stream_limit(self, request: Request) -> int:
        """A streamed /response for an invocation whose caller streams too: its body goes to the
        caller piece by piece as it arrives (other callers get it whole, as from any /response)."""
        if request.headers["lambda-runtime-function-response-mode"].lower() != "streaming":
            return errors.RESPONSE_LIMIT
        path = request.path
        if not (path.startswith(INVOCATION) and path.endswith("/response")) or request.method != "POST":
            return errors.RESPONSE_LIMIT
        inv = self.pool.in_flight.get(path[len(INVOCATION):-len("/response")])
        if inv is None or inv.on_chunk is None or not self._answers_for(request, inv.instance):
            return errors.RESPONSE_LIMIT
        if _stale(request, inv):
            return errors.RESPONSE_LIMIT  # never streamed to the caller: refused once it has arrived
        inv.stream_content_type = request.headers.get("content-type")
        request.on_chunk = inv.stream
        return errors.STREAM_RESPONSE_LIMIT

    def instance_of(self, request: Request) -> Instance:
        conn = request.conn
        instance = conn.context
        if instance is None:
            # A runtime started by hand on the main port: extra capacity the daemon cannot kill.
            self._external += 1
            instance = conn.context = Instance(-self._external, external=True)
        return instance

    def handle(self, request: Request) -> None:
        path = request.path
        if path == NEXT:
            if request.method != "GET":
                return self._method_not_allowed(request, "GET")
            return self._next(request)
        if path.startswith(INVOCATION):
            rest = path[len(INVOCATION):]
            request_id, _, action = rest.partition("/")
            if action in ("response", "error") and request_id:
                if request.method != "POST":
                    return self._method_not_allowed(request, "POST")
                return self._result(request, request_id, action)
        elif path == INIT_ERROR:
            if request.method != "POST":
                return self._method_not_allowed(request, "POST")
            self.pool.failures.init_error(self.instance_of(request), request.body,
                                          request.headers.get("lambda-runtime-function-error-type"))
            return request.respond_json(202, ACCEPTED)
        elif path in (RESTORE_NEXT, RESTORE_ERROR) and self.restore is not None:
            return self._restore(request, path)
        else:
            for prefix, route in self.routes.items():
                if path.startswith(prefix):
                    return route(request, self.instance_of(request))
        request.respond_json(404, errors.runtime_api_error("NotFound", f"No route for {path}"))

    # ---- routes ------------------------------------------------------------------------------
    def _next(self, request: Request) -> None:
        waiter = NextRequest(self, self.instance_of(request), request)
        request.on_abandon = waiter.gone
        self.pool.next(waiter)

    def _restore(self, request: Request, path: str) -> None:
        restore = self.restore
        if path == RESTORE_NEXT:
            if request.method != "GET":
                return self._method_not_allowed(request, "GET")
            waiter = RestoreNext(request)
            request.on_abandon = waiter.gone
            refusal = restore.restore_next(self.instance_of(request), waiter)
        else:
            if request.method != "POST":
                return self._method_not_allowed(request, "POST")
            refusal = restore.restore_error(self.instance_of(request), request.body,
                                            request.headers.get("lambda-runtime-function-error-type"))
            if refusal is None:
                return request.respond_json(202, ACCEPTED)
        if refusal is not None:
            # AWS's RAPID: 403 InvalidStateTransition for a restore call out of turn.
            request.respond_json(403, errors.runtime_api_error("InvalidStateTransition", refusal))

    def _result(self, request: Request, request_id: str, action: str) -> None:
        pool = self.pool
        inv = pool.in_flight.get(request_id)
        if inv is None or not self._answers_for(request, inv.instance):
            return self._invalid_id(request, request_id)
        if _stale(request, inv):
            log.info("%s: stale answer refused (invocation id %r, the current one is %s)", request_id,
                     request.headers[INVOCATION_ID][:100], inv.invocation_id)
            return request.respond_json(STALE_STATUS, STALE_BODY)
        if request.too_large:  # request.limit: 6291556 bytes, or 200 MB for a response streamed to its caller
            pool.response_too_large(request_id, request.limit)
            return request.respond_json(413, errors.runtime_api_error(
                "RequestEntityTooLarge", f"Exceeded maximum allowed payload size ({request.limit} bytes)."))
        # Let the runtime go back to /next first: at one connection per runtime, its turnaround,
        # not the caller's, is what bounds the rate.
        request.respond_json(202, ACCEPTED)
        if action == "response":
            if "lambda-runtime-function-error-type" in request.headers:
                # A streaming runtime that fails mid-stream says so in trailers; the body is base64.
                pool.error(request_id, _trailer_error(request.headers),
                           request.headers["lambda-runtime-function-error-type"])
            else:
                pool.respond(request_id, request.body)
        else:
            pool.error(request_id, request.body, request.headers.get("lambda-runtime-function-error-type"))

    @staticmethod
    def _answers_for(request: Request, holder: Instance) -> bool:
        """Only the instance running an invocation may answer it (over its own listener); runtimes
        started by hand answer over the main port, on any connection."""
        source = request.conn.context
        if source is holder:
            return True
        return holder.external and (source is None or source.external)

    def _invalid_id(self, request: Request, request_id: str) -> None:
        log.info("runtime answered unknown or finished request id %r", request_id[:100])
        request.respond_json(400, errors.runtime_api_error(
            "InvalidRequestID", f"Invalid request ID: {request_id[:100]!r} is unknown or already answered"))

    @staticmethod
    def _method_not_allowed(request: Request, allowed: str) -> None:
        request.respond_json(405, errors.runtime_api_error("MethodNotAllowed", f"Use {allowed}"),
                             header("Allow", allowed))


def _stale(request: Request, inv: Invocation) -> bool:
    """The answer echoes an invocation id that is not the one of ``inv``'s current hand-over (an
    answer that echoes none is accepted, as from runtimes older than the header)."""
    echoed = request.headers.get(INVOCATION_ID)
    return echoed is not None and echoed != inv.invocation_id


def _trailer_error(headers: dict) -> bytes:
    """The error body a streaming runtime reported in its trailers (base64-encoded, as the Node.js
    runtime client sends it)."""
    encoded = headers.get("lambda-runtime-function-error-body", "")
    try:
        body = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        body = encoded.encode("latin-1")
    return body
