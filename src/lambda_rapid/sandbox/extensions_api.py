"""The Extensions API (``/2020-01-01/extension/``) and the extension lifecycle of each instance.

Each spawned instance is a *sandbox*: its runtime process, the external extensions (every
executable in ``LAMBDA_EXTENSIONS_DIR``) started in the runtime's process group while the runtime is
held (SIGSTOP) until they have all registered, internal extensions that register from inside the
runtime, and the instance's telemetry (telemetry.py). Calls arrive on the instance's own Runtime
API listener, so the sandbox of a call is known exactly; the main port has one shared sandbox for
runtimes and extensions started by hand.

What this module adds to the pool, through seams the pool and the Runtime API offer:
* a gate on the runtime's ``/next``: init completes only when every extension has registered and
  is waiting in ``event/next``; after an invocation the instance takes new work only when every
  extension is back in ``event/next`` (bounded by the invocation's deadline);
* ``INVOKE`` events (pool ``dispatch_hook``), ``SHUTDOWN`` events on every kind of stop (wrapping
  the pool's killer) with AWS's 2 s for external extensions before SIGKILL;
* init failures caused by extensions, answered with ``Extension.*`` errors naming the extension.
Every wait is bounded; a broken extension fails its instance, never the daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import deque
from typing import Callable, Dict, List, Optional

from .. import errors
from ..config import ACCOUNT_ID, Config
from ..http.server import Request, header
from ..invocation import CRASH, FUNCTION_ERROR, SUCCESS, TIMEOUT, Invocation, Result, is_uuid
from ..pool import Instance, Pool, Waiter
from .telemetry import SubscribeError, Telemetry

log = logging.getLogger("lambda_rapid.extensions")

PREFIX = "/2020-01-01/extension/"
TELEMETRY_PATH = "/2022-07-01/telemetry"
LOGS_PATH = "/2020-08-15/logs"
MAX_EXTENSIONS = 10
SHUTDOWN_GRACE = 2.0  # AWS: 2,000 ms for a function with external extensions
DISABLE_MARKER = "/opt/disable-extensions-jwigqn8j"
EVENTS = ("INVOKE", "SHUTDOWN")
ACCEPTED = b'{"status":"OK"}'
_JSON = b"content-type: application/json\r\n"
# Why an instance is stopped (pool kill reason) -> AWS's SHUTDOWN reason.
SHUTDOWN_REASONS = {"idle": "spindown", "shutdown": "spindown", "reload": "spindown", "timeout": "timeout"}
INIT_REASONS = ("init_error", "init_timeout")
RUNTIME_DONE_STATUS = {SUCCESS: "success", FUNCTION_ERROR: "error", TIMEOUT: "timeout", CRASH: "failure"}


def api_error(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}).encode()


def find_external_extensions(directory: str) -> List[tuple]:
    """(name, path) of every executable file in ``directory``, sorted by name (as AWS starts them)."""
    if os.path.exists(DISABLE_MARKER):
        log.info("extensions disabled: %s exists", DISABLE_MARKER)
        return []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if not os.access(path, os.X_OK):
            log.warning("ignoring %s in the extensions directory: not executable", path)
            continue
        found.append((name, path))
    return found


class Extension:
    """One registered extension (external: a file of the extensions dir; internal: in the runtime)."""

    __slots__ = ("id", "name", "external", "events", "sandbox", "request", "queue", "ready", "exited",
                 "shutdown_sent")

    def __init__(self, name: str, external: bool, events: tuple, sandbox: Sandbox) -> None:
        self.id = str(uuid.uuid4())
        self.name = name
        self.external = external
        self.events = events
        self.sandbox = sandbox
        self.request: Optional[Request] = None  # its event/next call, while it waits
        self.queue: deque = deque()  # events not yet taken
        self.ready = False  # waiting in event/next with nothing to do
        self.exited = False
        self.shutdown_sent = False


class Sandbox:
    """The extension side of one instance (``instance`` None: the main port's hand-started world)."""

    def __init__(self, instance: Optional[Instance], files: List[tuple], telemetry: Telemetry) -> None:
        self.instance = instance
        self.files = dict(files)  # external extension name -> path
        self.children: dict = {}  # external extension name -> process (Child) while it runs
        self.extensions: Dict[str, Extension] = {}
        self.telemetry = telemetry
        self.init_done = instance is None
        self.plain = False  # init done and no extension: nothing to gate or deliver (the hot path)
        self.continued = not files  # the runtime has been let go (SIGCONT)
        self.failed = False
        self.runtime_alive = instance is not None
        self.held: list = []  # (Waiter, Request, its on_abandon) of runtime /next calls held by the gate
        self.hold_timer: Optional[asyncio.TimerHandle] = None
        self.deadline_ms = 0
        self.shutting_down = False
        self.kill_timer: Optional[asyncio.TimerHandle] = None
        self.started = time.monotonic()
        self.first_report = True

    def all_registered(self) -> bool:
        return all(name in self.extensions for name in self.files)

    def all_ready(self) -> bool:
        return self.all_registered() and all(e.ready for e in self.extensions.values())

    def live_children(self) -> bool:
        return bool(self.children)

    def label(self) -> str:
        return "main port" if self.instance is None else f"instance #{self.instance.number}"


class ExtensionsApi:
    def __init__(self, config: Config, pool: Pool, runtime_api, procs, output: Callable[[bytes], None]) -> None:
        self.config = config
        self.pool = pool
        self.procs = procs
        self.output = output
        self.loop = pool.loop
        self.files = find_external_extensions(config.extensions_dir)
        if self.files:
            log.info("external extensions in %s: %s", config.extensions_dir, ", ".join(n for n, _ in self.files))
        self.sandboxes: Dict[Instance, Sandbox] = {}
        self.by_id: Dict[str, Extension] = {}
        self.main = Sandbox(None, [], Telemetry(self.loop))
        self.main.telemetry.init_done()
        self.arn = config.function_arn
        self._kill = pool.killer
        # Seams: routes on the Runtime API port, the /next gate, dispatch, kills, init timeouts.
        runtime_api.routes[PREFIX] = self.handle
        runtime_api.routes[TELEMETRY_PATH] = self.subscribe_telemetry
        runtime_api.routes[LOGS_PATH] = self.subscribe_logs
        runtime_api.next_gate = self.gate
        pool.dispatch_hook = self.dispatch
        pool.killer = self.kill
        pool.explain_init_timeout = self.explain_init_timeout

    # ---- instances: launch, output, exit -------------------------------------------------------
    def launch(self, instance: Instance, child, env: dict) -> None:
        """Called right after the runtime process started: hold it, start the external extensions."""
        sandbox = Sandbox(instance, self.files, Telemetry(self.loop))
        self.sandboxes[instance] = sandbox
        sandbox.telemetry.emit("platform", "platform.initStart", {
            "initializationType": "on-demand", "phase": "init", "functionName": self.config.function_name,
            "functionVersion": self.config.function_version, "instanceId": instance.log_stream,
            "instanceMaxMemory": self.config.memory_size})
        original_exit = child.on_exit

        def on_exit(status: str) -> None:
            original_exit(status)
            self._runtime_exited(sandbox, status)

        child.on_exit = on_exit
        if not self.files:
            return
        try:
            os.kill(child.pid, signal.SIGSTOP)  # the runtime's init starts once the extensions registered
        except ProcessLookupError:
            return
        for name, path in self.files:
            try:
                ext_child = self.procs.spawn(
                    [path], env, self.config.cwd, pgid=child.pid,
                    on_output=lambda data: self._extension_output(sandbox, data),
                    on_exit=lambda status, name=name: self._extension_exited(sandbox, name, status))
            except OSError as e:
                log.error("could not start extension %s: %s", path, e)
                self.loop.call_soon(self._fail_init, sandbox, "Extension.LaunchError",
                                    f"could not start extension {name} ({path}): {e.strerror or e}")
                return
            sandbox.children[name] = ext_child
            log.debug("instance #%d: started extension %s (pid %d)", instance.number, name, ext_child.pid)

    def function_output(self, instance: Instance, data: bytes) -> None:
        sandbox = self.sandboxes.get(instance)
        if sandbox is not None:
            sandbox.telemetry.output("function", data)

    def _extension_output(self, sandbox: Sandbox, data: bytes) -> None:
        self.output(data)
        sandbox.telemetry.output("extension", data)

    def _runtime_exited(self, sandbox: Sandbox, status: str) -> None:
        sandbox.runtime_alive = False
        self._cancel_hold(sandbox)
        sandbox.held.clear()
        instance = sandbox.instance
        if sandbox.live_children():
            if not sandbox.init_done or instance.kill_reason in INIT_REASONS:
                self._kill_group(sandbox)
            else:
                self._begin_shutdown(sandbox, SHUTDOWN_REASONS.get(instance.kill_reason or "", "failure"))
        self._maybe_forget(sandbox)

    def _extension_exited(self, sandbox: Sandbox, name: str, status: str) -> None:
        sandbox.children.pop(name, None)
        ext = sandbox.extensions.get(name)
        if ext is not None:
            self._drop(ext)
        instance = sandbox.instance
        if sandbox.shutting_down or not sandbox.runtime_alive or instance.kill_reason is not None:
            self._maybe_forget(sandbox)
            return
        if instance.state == "starting":
            self._fail_init(sandbox, "Extension.Crash", f"extension {name} exited before init completed: {status}")
        else:
            log.warning("instance #%d: extension %s exited (%s); stopping the instance", instance.number, name,
                        status)
            self._fail_running(instance, "Extension.Crash", f"extension {name} exited: {status}")
            self.pool.kill(instance, "extension_crash")
        self._maybe_forget(sandbox)

    def _drop(self, ext: Extension) -> None:
        ext.exited = True
        ext.ready = False
        ext.request = None
        self.by_id.pop(ext.id, None)

    def _maybe_forget(self, sandbox: Sandbox) -> None:
        if sandbox.runtime_alive or sandbox.live_children():
            return
        if sandbox.kill_timer is not None:
            sandbox.kill_timer.cancel()
            sandbox.kill_timer = None
        for ext in sandbox.extensions.values():
            self._drop(ext)
        sandbox.telemetry.close()
        self.sandboxes.pop(sandbox.instance, None)

    # ---- the gate on the runtime's /next -------------------------------------------------------
    def gate(self, waiter: Waiter, request: Request) -> bool:
        """True when the runtime's /next must wait (we call pool.next later); False to go on now."""
        instance = waiter.instance
        if instance.external:
            return False
        sandbox = self.sandboxes.get(instance)
        if sandbox is None or sandbox.plain or sandbox.failed or not sandbox.runtime_alive:
            return False
        if sandbox.all_ready():
            if not sandbox.init_done:
                self._init_complete(sandbox)
            return False

        def gone() -> None:
            waiter.alive = False

        sandbox.held.append((waiter, request, request.on_abandon))
        request.on_abandon = gone
        if sandbox.init_done and sandbox.hold_timer is None:
            # AWS's post-invoke phase: the extensions' work counts against the invocation's timeout.
            remaining = max(0.0, sandbox.deadline_ms / 1000.0 - time.time())
            sandbox.hold_timer = self.loop.call_later(remaining, self._post_invoke_timed_out, sandbox)
        return True

    def _check(self, sandbox: Sandbox) -> None:
        """Something changed (a registration, an extension back in event/next): open the gate?"""
        instance = sandbox.instance
        if instance is None or sandbox.failed:
            return
        if not sandbox.continued and sandbox.all_registered():
            sandbox.continued = True
            if sandbox.runtime_alive and instance.pid > 1:
                try:
                    os.kill(instance.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        if sandbox.held and sandbox.all_ready():
            if not sandbox.init_done:
                self._init_complete(sandbox)
            self._cancel_hold(sandbox)
            held, sandbox.held = sandbox.held, []
            for waiter, request, on_abandon in held:
                if waiter.alive:
                    request.on_abandon = on_abandon  # the Runtime API's own again
                    self.pool.next(waiter)

    def _cancel_hold(self, sandbox: Sandbox) -> None:
        if sandbox.hold_timer is not None:
            sandbox.hold_timer.cancel()
            sandbox.hold_timer = None

    def _post_invoke_timed_out(self, sandbox: Sandbox) -> None:
        sandbox.hold_timer = None
        if not sandbox.held or sandbox.instance is None:
            return
        late = [e.name for e in sandbox.extensions.values() if not e.ready]
        log.warning("instance #%d: extension(s) %s did not return to event/next before the invocation's "
                    "deadline; resetting the instance", sandbox.instance.number, ", ".join(late))
        self.pool.kill(sandbox.instance, "timeout")

    def _init_complete(self, sandbox: Sandbox) -> None:
        sandbox.init_done = True
        sandbox.plain = not sandbox.extensions  # registration is closed from now on
        duration = (time.monotonic() - sandbox.started) * 1000
        telemetry = sandbox.telemetry
        telemetry.emit("platform", "platform.initRuntimeDone",
                       {"initializationType": "on-demand", "phase": "init", "status": "success"})
        telemetry.emit("platform", "platform.initReport", {
            "initializationType": "on-demand", "phase": "init", "status": "success",
            "metrics": {"durationMs": round(duration, 3)}})
        telemetry.init_done()

    # ---- init failures -------------------------------------------------------------------------
    def _fail_init(self, sandbox: Sandbox, error_type: str, message: str) -> None:
        instance = sandbox.instance
        if instance is None or sandbox.failed or instance.state != "starting":
            return
        sandbox.failed = True
        queued = [inv for inv in self.pool.queue if not inv.done]
        request_id = queued[0].request_id if queued else ""
        log.error("instance #%d: %s: %s", instance.number, error_type, message)
        sandbox.telemetry.emit("platform", "platform.initRuntimeDone", {
            "initializationType": "on-demand", "phase": "init", "status": "failure", "errorType": error_type})
        self.pool._init_failed(instance, errors.function_error(error_type, f"RequestId: {request_id} Error: {message}"))
        self.pool.kill(instance, "init_error")

    def _fail_running(self, instance: Instance, error_type: str, message: str) -> None:
        """An extension failed mid-invocation: the invocations running on its instance fail with why."""
        for inv in list(instance.held.values()):
            self.pool.error(inv.request_id, errors.function_error(
                error_type, f"RequestId: {inv.request_id} Error: {message}"), error_type)

    def explain_init_timeout(self, instance: Instance, request_id: str) -> Optional[bytes]:
        """The init timed out: if extensions are why, say which (pool ``explain_init_timeout``)."""
        sandbox = self.sandboxes.get(instance)
        if sandbox is None:
            return None
        timeout = self.config.init_timeout
        missing = [name for name in sandbox.files if name not in sandbox.extensions]
        if missing:
            message = (f"extension {', '.join(missing)} did not register within the init timeout "
                       f"({timeout:.2f} s)")
        else:
            late = [e.name for e in sandbox.extensions.values() if not e.ready]
            if not late:
                return None
            message = (f"extension {', '.join(late)} did not call event/next within the init timeout "
                       f"({timeout:.2f} s)")
        sandbox.failed = True
        sandbox.telemetry.emit("platform", "platform.initRuntimeDone", {
            "initializationType": "on-demand", "phase": "init", "status": "timeout",
            "errorType": "Extension.InitTimeout"})
        log.error("instance #%d: %s", instance.number, message)
        return errors.function_error("Extension.InitTimeout", f"RequestId: {request_id} Error: {message}")

    # ---- events ------------------------------------------------------------------------------
    def dispatch(self, inv: Invocation, waiter: Waiter, proceed: Callable[[], None]) -> None:
        """Pool dispatch hook: INVOKE to the extensions, platform.start, then the runtime's event."""
        instance = waiter.instance
        sandbox = self.main if instance.external else self.sandboxes.get(instance)
        if sandbox is not None and not sandbox.plain:
            if sandbox.telemetry.subscriptions:
                self._trace_invocation(sandbox, instance, inv)
            if sandbox.extensions:
                sandbox.deadline_ms = inv.deadline_ms
                arn = self.arn if inv.qualifier is None else f"{self.arn}:{inv.qualifier}"
                body = json.dumps({
                    "eventType": "INVOKE", "deadlineMs": inv.deadline_ms, "requestId": inv.request_id,
                    "invokedFunctionArn": arn, "tracing": {"type": "X-Amzn-Trace-Id", "value": inv.trace_id},
                }).encode()
                for ext in sandbox.extensions.values():
                    if "INVOKE" in ext.events and not ext.exited:
                        self._send(ext, body)
        proceed()

    def _send(self, ext: Extension, body: bytes) -> None:
        ext.ready = False
        request = ext.request
        if request is not None and not request.answered:
            ext.request = None
            request.respond(200, _JSON + header("Lambda-Extension-Event-Identifier", str(uuid.uuid4())), body)
        else:
            ext.request = None
            ext.queue.append(body)

    def _trace_invocation(self, sandbox: Sandbox, instance: Instance, inv: Invocation) -> None:
        version = self.config.function_version
        tracing = {"type": "X-Amzn-Trace-Id", "value": inv.trace_id}
        sandbox.telemetry.emit("platform", "platform.start",
                               {"requestId": inv.request_id, "version": version, "tracing": tracing},
                               legacy=("platform.start", {"requestId": inv.request_id, "version": version}))
        original = inv.on_done

        def done(inv: Invocation, result: Result) -> None:
            try:
                self._invocation_done(sandbox, instance, inv, result)
            except Exception:
                log.exception("telemetry for %s failed", inv.request_id)
            if original is not None:
                original(inv, result)

        inv.on_done = done

    def _invocation_done(self, sandbox: Sandbox, instance: Instance, inv: Invocation, result: Result) -> None:
        duration = (time.monotonic() - inv.started_at) * 1000
        status = RUNTIME_DONE_STATUS.get(result.outcome, "failure")
        tracing = {"type": "X-Amzn-Trace-Id", "value": inv.trace_id}
        done = {"requestId": inv.request_id, "status": status, "tracing": tracing,
                "metrics": {"durationMs": round(duration, 3), "producedBytes": len(result.body)}}
        error_type = None
        if result.function_error:
            try:
                error_type = json.loads(result.body).get("errorType")
            except (ValueError, AttributeError):
                error_type = None
            if error_type:
                done["errorType"] = error_type
        telemetry = sandbox.telemetry
        telemetry.emit("platform", "platform.runtimeDone", done,
                       legacy=("platform.runtimeDone", {"requestId": inv.request_id, "status": status}))
        metrics = {"durationMs": round(duration, 3), "billedDurationMs": max(1, math.ceil(duration)),
                   "memorySizeMB": self.config.memory_size, "maxMemoryUsedMB": 0}
        if instance.peak_rss is not None:
            metrics["maxMemoryUsedMB"] = max(1, round(instance.peak_rss() / 1048576))
        if sandbox.first_report and instance.init_duration_ms is not None:
            metrics["initDurationMs"] = round(instance.init_duration_ms, 3)
        sandbox.first_report = False
        report = {"requestId": inv.request_id, "status": status, "metrics": metrics, "tracing": tracing}
        if error_type:
            report["errorType"] = error_type
        telemetry.emit("platform", "platform.report", report,
                       legacy=("platform.report", {"requestId": inv.request_id, "metrics": metrics}))
        telemetry.emit("platform", "platform.end", None, legacy=("platform.end", {"requestId": inv.request_id}),
                       only_legacy=True)

    # ---- stopping ------------------------------------------------------------------------------
    def kill(self, instance: Instance, sig: int) -> None:
        """Pool killer: with external extensions alive, SHUTDOWN them first and SIGKILL after 2 s."""
        sandbox = self.sandboxes.get(instance)
        if (sandbox is None or not sandbox.live_children() or not sandbox.init_done
                or instance.kill_reason in INIT_REASONS):
            self._kill(instance, sig)
            return
        self._begin_shutdown(sandbox, SHUTDOWN_REASONS.get(instance.kill_reason or "", "failure"))
        if instance.pid > 1 and instance.pid in self.procs.children:
            try:
                os.kill(instance.pid, signal.SIGKILL)  # the runtime goes now; its extensions get the grace
            except ProcessLookupError:
                pass

    def _begin_shutdown(self, sandbox: Sandbox, reason: str) -> None:
        if sandbox.shutting_down:
            return
        sandbox.shutting_down = True
        deadline_ms = int((time.time() + SHUTDOWN_GRACE) * 1000)
        body = json.dumps({"eventType": "SHUTDOWN", "shutdownReason": reason, "deadlineMs": deadline_ms}).encode()
        for ext in sandbox.extensions.values():
            if "SHUTDOWN" in ext.events and not ext.exited and not ext.shutdown_sent:
                ext.shutdown_sent = True
                ext.queue.clear()
                self._send(ext, body)
        sandbox.telemetry.flush()
        if sandbox.instance is not None:
            log.info("instance #%d: SHUTDOWN (%s) sent to its extensions", sandbox.instance.number, reason)
            if sandbox.kill_timer is None:
                sandbox.kill_timer = self.loop.call_later(SHUTDOWN_GRACE, self._kill_group, sandbox)

    def _kill_group(self, sandbox: Sandbox) -> None:
        sandbox.kill_timer = None
        instance = sandbox.instance
        # The group id is the runtime's pid; it stays valid as long as one of our children is in it.
        if instance is not None and (sandbox.live_children() or sandbox.runtime_alive) and instance.pid > 1:
            self.procs.signal_group(instance.pid, signal.SIGKILL)

    async def shutdown(self) -> None:
        """Daemon exit: SHUTDOWN to every extension, then wait (up to 2 s) for them to exit."""
        self.pool.accepting = False
        sandboxes = [s for s in self.sandboxes.values() if s.live_children()]
        self._begin_shutdown(self.main, "spindown")
        if not sandboxes:
            return
        for sandbox in sandboxes:
            self._begin_shutdown(sandbox, "spindown")
        deadline = self.loop.time() + SHUTDOWN_GRACE
        while any(s.live_children() for s in sandboxes) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for sandbox in sandboxes:
            if sandbox.live_children():
                for child in list(sandbox.children.values()):
                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    # ---- HTTP: /2020-01-01/extension/... -------------------------------------------------------
    def _sandbox_of(self, instance: Instance) -> Optional[Sandbox]:
        if instance.external:
            return self.main
        return self.sandboxes.get(instance)

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
        sandbox = self._sandbox_of(instance)
        if sandbox is None or sandbox.failed or sandbox.shutting_down:
            return self._forbidden(request, "Extension.RegistrationClosed", "Extension registration closed already")
        external = name in sandbox.files or sandbox.instance is None
        # Validate everything before changing anything (the Go daemon's half-registered handles).
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
        if sandbox.init_done and sandbox.instance is not None:
            return self._forbidden(request, "Extension.RegistrationClosed", "Extension registration closed already")
        if len(sandbox.extensions) >= MAX_EXTENSIONS:
            self._forbidden(request, "Extension.TooManyExtensions", f"Extension limit ({MAX_EXTENSIONS}) reached")
            self._fail_init(sandbox, "Extension.TooManyExtensions",
                            f"extension {name} would be number {MAX_EXTENSIONS + 1}; at most {MAX_EXTENSIONS} "
                            f"extensions are allowed")
            return
        ext = Extension(name, external, tuple(dict.fromkeys(events)), sandbox)
        sandbox.extensions[name] = ext
        self.by_id[ext.id] = ext
        log.info("%s: %s extension %s registered, subscribed to %s", sandbox.label(),
                 "external" if external else "internal", name, list(ext.events))
        sandbox.telemetry.emit("platform", "platform.extension",
                               {"name": name, "state": "Ready", "events": list(ext.events)},
                               legacy=("platform.extension", {"name": name, "state": "Ready",
                                                              "events": list(ext.events)}))
        body = {"functionName": self.config.function_name, "functionVersion": self.config.function_version,
                "handler": self.config.handler}
        if "accountId" in request.headers.get("lambda-extension-accept-feature", ""):
            body["accountId"] = ACCOUNT_ID
        request.respond_json(200, json.dumps(body).encode(), header("Lambda-Extension-Identifier", ext.id))
        self._check(sandbox)

    def _identify(self, request: Request, instance: Instance) -> Optional[Extension]:
        identifier = request.headers.get("lambda-extension-identifier", "").strip()
        if not identifier:
            self._forbidden(request, "Extension.MissingExtensionIdentifier",
                            "Missing Lambda-Extension-Identifier header")
            return None
        if not is_uuid(identifier):
            self._forbidden(request, "Extension.InvalidExtensionIdentifier", "Invalid Lambda-Extension-Identifier")
            return None
        ext = self.by_id.get(identifier.lower())
        if ext is None or ext.sandbox is not self._sandbox_of(instance):
            self._forbidden(request, "Extension.UnknownExtensionIdentifier", f"Unknown extension {identifier}")
            return None
        return ext

    def _next(self, request: Request, instance: Instance) -> None:
        ext = self._identify(request, instance)
        if ext is None:
            return
        if ext.queue:
            ext.ready = False
            body = ext.queue.popleft()
            return request.respond(200, _JSON + header("Lambda-Extension-Event-Identifier", str(uuid.uuid4())), body)
        previous = ext.request
        if previous is not None and previous is not request and not previous.answered:
            previous.on_abandon = None
        ext.request = request

        def gone() -> None:
            if ext.request is request:
                ext.request = None
                ext.ready = False

        request.on_abandon = gone
        ext.ready = True
        self._check(ext.sandbox)

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
        if sandbox.init_done:
            return self._forbidden(request, "Extension.InvalidExtensionState",
                                   f"State transition from Ready to InitError failed for extension {ext.name}. "
                                   f"Error: init has already completed")
        request.respond_json(202, ACCEPTED)
        kind = error_type if error_type.startswith("Extension.") else "Extension.InitError"
        self._fail_init(sandbox, kind, f"extension {ext.name} reported an init error: {error_type}"
                        + (f": {message}" if message else ""))

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
            return
        if not sandbox.init_done:
            kind = error_type if error_type.startswith("Extension.") else "Extension.ExitError"
            self._fail_init(sandbox, kind, text)
        elif not sandbox.shutting_down:
            log.warning("instance #%d: %s; stopping the instance", sandbox.instance.number, text)
            self._fail_running(sandbox.instance, "Extension.ExitError", text)
            self.pool.kill(sandbox.instance, "extension_error")

    # ---- HTTP: Telemetry and Logs API subscriptions --------------------------------------------
    def subscribe_telemetry(self, request: Request, instance: Instance) -> None:
        self._subscribe(request, instance, "telemetry")

    def subscribe_logs(self, request: Request, instance: Instance) -> None:
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
