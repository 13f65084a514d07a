"""The sandbox lifecycle: what extensions add to an instance's life, as the pool's ``SandboxHooks``
(hooks.py). It keeps every instance's ``Sandbox`` (environment.py) and decides what each event does
to it; two phases have their own module, built here and given what they need: SnapStart's restore
(restore.py: the Runtime API's ``restore/next`` and ``restore/error``) and the shutdown (shutdown.py:
SHUTDOWN and AWS's 2 s for external extensions before SIGKILL; the pool's killer).

* Launch: the runtime is held (SIGSTOP) while the external extensions start in its process group,
  and let go (SIGCONT) once they have all registered; their output and exits, and the runtime's.
* The gate on the runtime's ``/next``: init completes only when every extension waits in
  ``event/next``; after an invocation the instance takes new work only when every extension is back
  there (AWS's post-invoke phase), bounded by the invocation's deadline.
* ``INVOKE`` to the extensions when an invocation starts; the invocation's telemetry when it ends.
* Init failures caused by extensions, answered with ``Extension.*`` errors naming the extension.

Every wait is bounded; a broken extension fails its instance, never the daemon. The Extensions API's
HTTP handlers (extensions_api.py) call in here; the pool is asked for things only through the
``PoolControl`` each sandbox is given when its instance is launched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from .. import errors
from ..config import Config
from ..hooks import PoolControl
from ..instances import DEAD, STARTING, Instance, StopReason
from ..invocation import Invocation, Result
from ..reports import Report
from . import platform_events
from .environment import FAILED, GONE, INITIALIZING, READY, REGISTERING, RESTORING, SHUTTING_DOWN, Extension, Sandbox
from .process import Child, ProcessManager
from .restore import RestorePhase
from .shutdown import INIT_REASONS, SHUTDOWN_REASONS, ShutdownPhase, signal_pid
from .telemetry import Telemetry

if TYPE_CHECKING:
    from ..pool import Waiter

log = logging.getLogger(__name__)

DISABLE_MARKER = "/opt/disable-extensions-jwigqn8j"


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


class SandboxLifecycle:
    """Every instance's sandbox, from its launch until its runtime and extensions have exited."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, procs: ProcessManager,
                 output: Callable[[bytes], None]) -> None:
        self.config = config
        self.loop = loop
        self.procs = procs
        self.output = output
        self.files = find_external_extensions(config.extensions_dir)
        if self.files:
            log.info("external extensions in %s: %s", config.extensions_dir, ", ".join(n for n, _ in self.files))
        self.sandboxes: Dict[Instance, Sandbox] = {}
        self.by_id: Dict[str, Extension] = {}
        self.main = Sandbox(None, None, [], Telemetry(loop, config.managed_instances))
        self.main.telemetry.init_done()
        self.shutdown = ShutdownPhase(loop, procs, self.sandboxes, self.main)
        self.restore = RestorePhase(config, self.sandboxes, self._init_complete, self.shutdown)

    def sandbox_of(self, instance: Instance) -> Optional[Sandbox]:
        return self.main if instance.external else self.sandboxes.get(instance)

    def register(self, ext: Extension) -> None:
        """A registration the Extensions API accepted: the extension is known from now on."""
        ext.sandbox.extensions[ext.name] = ext
        self.by_id[ext.id] = ext

    # ---- processes: launch, output, exits --------------------------------------------------------
    def launch(self, instance: Instance, runtime: Child, env: dict, log_stream: str, pool: PoolControl,
               release: Callable[[], None]) -> None:
        """Right after the runtime process started: hold it, start the external extensions.
        ``release`` frees the instance's listener once the runtime and every extension have exited."""
        sandbox = Sandbox(instance, pool, self.files, Telemetry(self.loop, self.config.managed_instances), release)
        sandbox.instance_id = log_stream
        self.sandboxes[instance] = sandbox
        platform_events.init_start(sandbox.telemetry, self.config, log_stream)
        if not self.files:
            return
        try:
            os.kill(runtime.pid, signal.SIGSTOP)  # the runtime's init starts once the extensions registered
        except ProcessLookupError:
            return
        for name, path in self.files:
            try:
                child = self.procs.spawn(
                    [path], env, self.config.cwd, pgid=runtime.pid,
                    on_output=lambda data: self._extension_output(sandbox, data),
                    on_exit=lambda status, name=name: self._extension_exited(sandbox, name, status))
            except OSError as e:
                log.error("could not start extension %s: %s", path, e)
                self.loop.call_soon(self.fail_init, sandbox, "Extension.LaunchError",
                                    f"could not start extension {name} ({path}): {e.strerror or e}")
                return
            sandbox.children[name] = child
            log.debug("instance #%d: started extension %s (pid %d)", instance.number, name, child.pid)

    def function_output(self, instance: Instance, data: bytes) -> None:
        sandbox = self.sandboxes.get(instance)
        if sandbox is not None:
            sandbox.telemetry.output("function", data)

    def _extension_output(self, sandbox: Sandbox, data: bytes) -> None:
        self.output(data)
        sandbox.telemetry.output("extension", data)

    def runtime_exited(self, instance: Instance) -> None:
        """The runtime of ``instance`` has exited (after the pool has heard of it)."""
        sandbox = self.sandboxes.get(instance)
        if sandbox is None:
            return
        sandbox.held.clear()
        if sandbox.phase is RESTORING:  # it died in its after-restore hooks
            self.restore.end(sandbox, "failure", "Runtime.ExitError")
        if sandbox.children:
            if (sandbox.phase is READY or sandbox.phase is RESTORING) and instance.stop_reason not in INIT_REASONS:
                self.shutdown.begin(sandbox, SHUTDOWN_REASONS.get(instance.stop_reason, "failure"))
            elif sandbox.phase is not SHUTTING_DOWN:
                if sandbox.phase is not FAILED:
                    sandbox.advance(FAILED)
                self.shutdown.kill_group(sandbox)
        self._forget_if_gone(sandbox)

    def _extension_exited(self, sandbox: Sandbox, name: str, status: str) -> None:
        sandbox.children.pop(name, None)
        ext = sandbox.extensions.get(name)
        if ext is not None:
            self._drop(ext)
        instance = sandbox.instance
        if sandbox.phase is FAILED:
            # It reported why and exited, as AWS asks of an extension after init/error: tear down the rest.
            sandbox.pool.kill(instance, StopReason.INIT_ERROR)
        elif sandbox.phase is SHUTTING_DOWN or instance.stop_reason is not None:
            pass  # its instance is stopping anyway
        elif sandbox.initializing:
            self.fail_init(sandbox, "Extension.Crash", f"extension {name} exited before init completed: {status}")
        else:
            log.warning("instance #%d: extension %s exited (%s); stopping the instance", instance.number, name,
                        status)
            sandbox.pool.fail_running(instance, "Extension.Crash", f"extension {name} exited: {status}",
                                      StopReason.EXTENSION_CRASH)
        self._forget_if_gone(sandbox)

    def _drop(self, ext: Extension) -> None:
        ext.exited()
        self.by_id.pop(ext.id, None)

    def _forget_if_gone(self, sandbox: Sandbox) -> None:
        if sandbox.instance.state is not DEAD or sandbox.children:
            return
        sandbox.advance(GONE)
        for ext in sandbox.extensions.values():
            self._drop(ext)
        sandbox.telemetry.close()
        self.sandboxes.pop(sandbox.instance, None)
        sandbox.release()

    # ---- SandboxHooks ----------------------------------------------------------------------------
    def hold_next(self, waiter: Waiter) -> bool:
        instance = waiter.instance
        if instance.external:
            return False
        sandbox = self.sandboxes.get(instance)
        if sandbox is None:
            return False
        phase = sandbox.phase
        if phase is READY:
            if not sandbox.extensions:
                return False  # nothing to wait for, ever: the hot path
        elif phase is RESTORING:
            self.restore.end(sandbox, "success")  # its first /next: the after-restore hooks are done
            return False
        elif not sandbox.initializing:
            return False
        if sandbox.all_waiting():
            if phase is not READY:
                self._init_complete(sandbox)
                if sandbox.phase is RESTORING:  # SnapStart, and the runtime skipped restore/next
                    self.restore.end(sandbox, "success")
            return False
        sandbox.held.append(waiter)
        if phase is READY and sandbox.timer is None:
            # AWS's post-invoke phase: the extensions' work counts against the invocation's timeout.
            remaining = max(0.0, sandbox.deadline_ms / 1000.0 - time.time())
            sandbox.timer = self.loop.call_later(remaining, self._post_invoke_timed_out, sandbox)
        return True

    def dispatching(self, inv: Invocation, instance: Instance) -> bool:
        sandbox = self.main if instance.external else self.sandboxes.get(instance)
        if sandbox is None or not sandbox.extensions:
            return False
        observed = bool(sandbox.telemetry.subscriptions)
        if observed:
            platform_events.invocation_started(sandbox.telemetry, inv, self.config.function_version)
        sandbox.deadline_ms = inv.deadline_ms
        arn = self.config.function_arn if inv.qualifier is None else f"{self.config.function_arn}:{inv.qualifier}"
        sandbox.deliver("INVOKE", {"deadlineMs": inv.deadline_ms, "requestId": inv.request_id,
                                   "invokedFunctionArn": arn,
                                   "tracing": {"type": "X-Amzn-Trace-Id", "value": inv.trace_id}})
        return observed

    def finished(self, inv: Invocation, result: Result, report: Report) -> None:
        sandbox = self.sandbox_of(inv.instance)
        if sandbox is not None:
            try:
                platform_events.invocation_ended(sandbox.telemetry, inv, result, report,
                                                 self.config.managed_instances)
            except Exception:
                log.exception("telemetry for %s failed", inv.request_id)

    def init_timeout_error(self, instance: Instance, request_id: str) -> Optional[bytes]:
        """If the extensions are why the init timed out, say which."""
        sandbox = self.sandboxes.get(instance)
        if sandbox is not None and sandbox.phase is RESTORING:
            # The after-restore hooks outlasted the init timeout (AWS's RAPID reports a restore
            # timeout as Runtime.Unknown: rapid/handlers.go getFirstFatalError).
            self.restore.end(sandbox, "timeout", "Runtime.Unknown")
            sandbox.advance(FAILED)
            return None
        if sandbox is None or not sandbox.initializing:
            return None
        message = sandbox.blame_for_init_timeout(self.config.init_timeout)
        if message is None:
            return None
        sandbox.advance(FAILED)
        platform_events.init_failed(sandbox.telemetry, self.config, "timeout", "Extension.InitTimeout")
        log.error("instance #%d: %s", instance.number, message)
        return errors.function_error("Extension.InitTimeout", f"RequestId: {request_id} Error: {message}")

    # ---- the gate --------------------------------------------------------------------------------
    def changed(self, sandbox: Sandbox) -> None:
        """An extension registered or is back in event/next: let the runtime go on?"""
        instance = sandbox.instance
        if instance is None:
            return
        if sandbox.phase is REGISTERING and sandbox.all_registered():
            sandbox.advance(INITIALIZING)
            if instance.state is not DEAD and instance.pid > 1:
                signal_pid(instance.pid, signal.SIGCONT)
        waiting = sandbox.held or sandbox.restore_next is not None
        if waiting and sandbox.all_waiting() and (sandbox.phase is READY or sandbox.initializing):
            if sandbox.phase is READY:
                sandbox.cancel_timer()
            else:
                self._init_complete(sandbox)
            held, sandbox.held = sandbox.held, []
            for waiter in held:
                if waiter.alive:
                    sandbox.pool.next(waiter)

    def _post_invoke_timed_out(self, sandbox: Sandbox) -> None:
        sandbox.timer = None
        if not sandbox.held or sandbox.phase is not READY:
            return
        log.warning("instance #%d: extension(s) %s did not return to event/next before the invocation's "
                    "deadline; resetting the instance", sandbox.instance.number, ", ".join(sandbox.not_waiting()))
        sandbox.pool.kill(sandbox.instance, StopReason.TIMEOUT)

    def _init_complete(self, sandbox: Sandbox) -> None:
        # Registration is closed from now on.
        sandbox.advance(RESTORING if self.config.snap_start else READY)
        platform_events.init_done(sandbox.telemetry, self.config, (time.monotonic() - sandbox.started) * 1000)
        sandbox.telemetry.init_done()
        if sandbox.phase is RESTORING:
            self.restore.begin(sandbox)

    def fail_init(self, sandbox: Sandbox, error_type: str, message: str, grace: float = 0.0) -> None:
        """The sandbox's init failed because of an extension: the waiting invocation gets why."""
        instance = sandbox.instance
        if instance is None or not sandbox.initializing or instance.state is not STARTING:
            return
        sandbox.advance(FAILED)
        log.error("instance #%d: %s: %s", instance.number, error_type, message)
        platform_events.init_failed(sandbox.telemetry, self.config, "failure", error_type)
        sandbox.pool.fail_init(instance, error_type, message, grace)
