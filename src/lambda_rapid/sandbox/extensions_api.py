"""The Extensions API (``/2020-01-01/extension/``) and the Telemetry and Logs API subscriptions
(``PUT /2022-07-01/telemetry``, ``PUT /2020-08-15/logs``): HTTP in, AWS's answers and errors out.
Reference: https://docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html

Thin: requests are validated here, their effects on the sandbox (the register gate, init failures,
stopping an instance) are lifecycle.py's. Calls arrive on the instance's own Runtime API listener,
so the sandbox of a call is known exactly; the main port has one shared sandbox for runtimes and
extensions started by hand.

With ``AWS_LAMBDA_MAX_CONCURRENCY`` set, AWS's Lambda Managed Instances rules apply: extensions cannot
subscribe to ``INVOKE`` ("extensions cannot subscribe to the INVOKE event on Managed Instances due to
the concurrent execution model", https://docs.aws.amazon.com/lambda/latest/dg/telemetry-schema-reference.html),
internal extensions to nothing, and there is no Logs API; the answers are those of AWS's RAPID for
Managed Instances (aws-lambda-runtime-interface-emulator, internal/lambda-managed-instances:
rapi/handler/agentregister.go, core/externalagent.go ValidateExternalAgentEvent, rapi/router.go).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Dict, Optional

from ..config import ACCOUNT_ID, Config
from ..http.server import Request, header
from ..instances import INIT_ERROR_GRACE, Instance, StopReason
from ..invocation import is_uuid
from . import platform_events
from .environment import FAILED, GONE, READY, RESTORING, SHUTTING_DOWN, Extension
from .lifecycle import SandboxLifecycle
from .telemetry import SubscribeError

log = logging.getLogger(__name__)

PREFIX = "/2020-01-01/extension/"
TELEMETRY_PATH = "/2022-07-01/telemetry"
LOGS_PATH = "/2020-08-15/logs"
MAX_EXTENSIONS = 10
EVENTS = ("INVOKE", "SHUTDOWN")
MANAGED_INSTANCES_EVENTS = ("SHUTDOWN",)  # of external extensions; internal ones may register for none
ACCEPTED = b'{"status":"OK"}'


def api_error(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}).encode()


class ExtensionsApi:
    def __init__(self, config: Config, lifecycle: SandboxLifecycle) -> None:
        self.config = config
        self.lifecycle = lifecycle

    def routes(self) -> Dict[str, Callable[[Request, Instance], None]]:
        """What this API serves on the Runtime API port: path prefix -> handler(request, instance)."""
        return {PREFIX: self.handle, TELEMETRY_PATH: self.subscribe_telemetry, LOGS_PATH: self.subscribe_logs}

    # ---- /2020-01-01/extension/... ---------------------------------------------------------------
    def handle(self, request: Request, instance: Instance) -> None:
        action = request.path[len(PREFIX):]
        routes = {"register": ("POST", self._register), "event/next": ("GET", self._next),
                  "init/error": ("POST", self._init_error), "exit/error": ("POST", self._exit_error)}
        route = routes.get(action)
        if route is None:
            return request.respond_json(404, api_error("NotFound", f"No route for {request.path}"))
        method, handler = route
        if request.method != method:
            return request.respond_json(405, api_error("MethodNotAllowed", f"Use {method}"), header("Allow", method))
        handler(request, instance)

    def _forbidden(self, request: Request, error_type: str, message: str) -> None:
        log.info("extensions API %s refused: %s: %s", request.path, error_type, message)
        request.respond_json(403, api_error(error_type, message))

    def _register(self, request: Request, instance: Instance) -> None:
        name = request.headers.get("lambda-extension-name", "").strip()
        if not name:
            return self._forbidden(request, "Extension.InvalidExtensionName", "Empty extension name")
        try:
            doc = json.loads(request.body)
        except ValueError as e:
            return self._forbidden(request, "InvalidRequestFormat", f"could not parse the body as JSON: {e}")
        if not isinstance(doc, dict):
            return self._forbidden(request, "InvalidRequestFormat", "the body must be a JSON object")
        events = doc.get("events", [])
        if events is None:
            events = []
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            return self._forbidden(request, "InvalidRequestFormat", "events must be a list of strings")
        sandbox = self.lifecycle.sandbox_of(instance)
        if sandbox is None or sandbox.phase in (FAILED, SHUTTING_DOWN, GONE):
            return self._forbidden(request, "Extension.RegistrationClosed", "Extension registration closed already")
        external = name in sandbox.files or sandbox.instance is None
        # Validate everything before changing anything: a refused registration leaves no trace.
        if self.config.managed_instances:
            if not external and events:
                return self._forbidden(request, "Extension.InvalidEventType",
                                       "No events allowed for internal extensions")
            for event in events:
                if event not in MANAGED_INSTANCES_EVENTS:
                    return self._forbidden(request, "Extension.InvalidEventType",
                                           f"{event}: ErrorInvalidEventType (on Lambda Managed Instances "
                                           "extensions can register for SHUTDOWN only)")
        for event in events:
            if event not in EVENTS:
                return self._forbidden(request, "Extension.InvalidEventType",
                                       f"{event}: unknown event type; use INVOKE or SHUTDOWN")
            if event == "SHUTDOWN" and not external:
                return self._forbidden(request, "Extension.InvalidEventType",
                                       "SHUTDOWN: internal extensions cannot subscribe to SHUTDOWN")
        if name in sandbox.extensions:
            return self._forbidden(request, "Extension.InvalidExtensionState",
                                   f"State transition from Registered to Registered failed for extension {name}. "
                                   f"Error: extension {name} is already registered")
        if not sandbox.initializing and sandbox.instance is not None:
            return self._forbidden(request, "Extension.RegistrationClosed", "Extension registration closed already")
        if len(sandbox.extensions) >= MAX_EXTENSIONS:
            self._forbidden(request, "Extension.TooManyExtensions", f"Extension limit ({MAX_EXTENSIONS}) reached")
            self.lifecycle.fail_init(sandbox, "Extension.TooManyExtensions",
                                     f"extension {name} would be number {MAX_EXTENSIONS + 1}; at most "
                                     f"{MAX_EXTENSIONS} extensions are allowed")
            return
        ext = Extension(name, external, tuple(dict.fromkeys(events)), sandbox)
        self.lifecycle.register(ext)
        log.info("%s: %s extension %s registered, subscribed to %s", sandbox.label(),
                 "external" if external else "internal", name, list(ext.events))
        platform_events.extension_registered(sandbox.telemetry, name, ext.events)
        body = {"functionName": self.config.function_name, "functionVersion": self.config.function_version,
                "handler": self.config.handler}
        if "accountId" in request.headers.get("lambda-extension-accept-feature", ""):
            body["accountId"] = ACCOUNT_ID
        request.respond_json(200, json.dumps(body).encode(), header("Lambda-Extension-Identifier", ext.id))
        self.lifecycle.changed(sandbox)

    def _identify(self, request: Request, instance: Instance) -> Optional[Extension]:
        identifier = request.headers.get("lambda-extension-identifier", "").strip()
        if not identifier:
            self._forbidden(request, "Extension.MissingExtensionIdentifier",
                            "Missing Lambda-Extension-Identifier header")
            return None
        if not is_uuid(identifier):
            self._forbidden(request, "Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")
            return None
        ext = self.lifecycle.by_id.get(identifier.lower())
        if ext is None or ext.sandbox is not self.lifecycle.sandbox_of(instance):
            self._forbidden(request, "Extension.UnknownExtensionIdentifier", f"Unknown extension {identifier}")
            return None
        return ext

    def _next(self, request: Request, instance: Instance) -> None:
        ext = self._identify(request, instance)
        if ext is not None and ext.wait(request):
            self.lifecycle.changed(ext.sandbox)

    def _error_report(self, request: Request, instance: Instance) -> Optional[tuple]:
        ext = self._identify(request, instance)
        if ext is None:
            return None
        error_type = request.headers.get("lambda-extension-function-error-type", "").strip()
        if not error_type:
            self._forbidden(request, "Extension.MissingHeader", "Lambda-Extension-Function-Error-Type not found")
            return None
        message = ""
        try:
            doc = json.loads(request.body or b"{}")
            if isinstance(doc, dict):
                message = str(doc.get("errorMessage") or "")
        except ValueError:
            message = request.body[:500].decode("utf-8", "replace")
        return ext, error_type, message

    def _init_error(self, request: Request, instance: Instance) -> None:
        report = self._error_report(request, instance)
        if report is None:
            return
        ext, error_type, message = report
        sandbox = ext.sandbox
        if not sandbox.initializing and sandbox.phase is not FAILED:
            return self._forbidden(request, "Extension.InvalidExtensionState",
                                   f"State transition from Ready to InitError failed for extension {ext.name}. "
                                   f"Error: init has already completed")
        # AWS answers, and the extension "should exit after it receives the response": the sandbox is
        # torn down when it has exited or after INIT_ERROR_GRACE, never before the 202 is on its way.
        request.respond_json(202, ACCEPTED)
        kind = error_type if error_type.startswith("Extension.") else "Extension.InitError"
        self.lifecycle.fail_init(sandbox, kind, f"extension {ext.name} reported an init error: {error_type}"
                                 + (f": {message}" if message else ""), grace=INIT_ERROR_GRACE)

    def _exit_error(self, request: Request, instance: Instance) -> None:
        report = self._error_report(request, instance)
        if report is None:
            return
        ext, error_type, message = report
        request.respond_json(202, ACCEPTED)
        sandbox = ext.sandbox
        text = f"extension {ext.name} reported an exit error: {error_type}" + (f": {message}" if message else "")
        if sandbox.instance is None:
            log.warning("%s", text)
        elif sandbox.initializing:
            kind = error_type if error_type.startswith("Extension.") else "Extension.ExitError"
            self.lifecycle.fail_init(sandbox, kind, text, grace=INIT_ERROR_GRACE)
        elif sandbox.phase is READY or sandbox.phase is RESTORING:
            log.warning("instance #%d: %s; stopping the instance", sandbox.instance.number, text)
            sandbox.pool.fail_running(sandbox.instance, "Extension.ExitError", text, StopReason.EXTENSION_ERROR)

    # ---- Telemetry and Logs API subscriptions ----------------------------------------------------
    def subscribe_telemetry(self, request: Request, instance: Instance) -> None:
        self._subscribe(request, instance, "telemetry")

    def subscribe_logs(self, request: Request, instance: Instance) -> None:
        if self.config.managed_instances:
            # Lambda Managed Instances have no Logs API: AWS's RAPID for them routes no such path.
            return request.respond_json(404, api_error(
                "NotFound", f"No route for {request.path}: Lambda Managed Instances have no Logs API; "
                            "subscribe with the Telemetry API (schemaVersion 2025-01-29)"))
        self._subscribe(request, instance, "logs")

    def _subscribe(self, request: Request, instance: Instance, api: str) -> None:
        path = TELEMETRY_PATH if api == "telemetry" else LOGS_PATH
        if request.path.rstrip("/") != path:
            return request.respond_json(404, api_error("NotFound", f"No route for {request.path}"))
        if request.method != "PUT":
            return request.respond_json(405, api_error("MethodNotAllowed", "Use PUT"), header("Allow", "PUT"))
        ext = self._identify(request, instance)
        if ext is None:
            return
        try:
            ext.sandbox.telemetry.subscribe(ext.id, ext.name, api, request.body)
        except SubscribeError as e:
            log.info("%s subscription of extension %s refused: %s", api, ext.name, e.message)
            return request.respond_json(e.status, api_error(e.error_type, e.message))
        request.respond_json(200, b'"OK"')
