"""SnapStart's restore phase (``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``): between a sandbox's init
and its first invocation, as the runtime's ``restore/next`` and ``restore/error`` see it.

The init ends when the runtime asks for ``restore/next`` (after its before-snapshot hooks) and every
extension waits; no snapshot is taken, so the instance is "restored" at once: ``restore/next`` is
answered, the runtime runs its after-restore hooks and the restore ends with its first ``/next``
(or with ``restore/error``, which fails the invocation waiting for it with ``SnapStartException``).
Telemetry gets ``platform.restoreStart``, ``platform.restoreRuntimeDone`` and ``platform.restoreReport``.
https://docs.aws.amazon.com/lambda/latest/dg/snapstart-runtime-hooks-custom.html

It owns only the restore's start, end and refusals; when the init is complete (the gate) and what
happens to the sandbox afterwards are lifecycle.py's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional

from ..config import Config
from ..instances import INIT_ERROR_GRACE, Instance
from . import platform_events
from .environment import INITIALIZING, READY, REGISTERING, RESTORING, Sandbox
from .shutdown import ShutdownPhase

if TYPE_CHECKING:
    from .runtime_api import RestoreNext

log = logging.getLogger(__name__)

# The error an invocation gets when its instance's after-restore hook failed (botocore's Lambda
# model, SnapStartException); the runtime's own error is in the function's log.
RESTORE_FAILED = ("The afterRestore() runtime hook encountered an error. For more information, check the Amazon "
                  "CloudWatch logs.")
# AWS's RAPID names of the runtime's states, for a restore call out of turn (core/runtime_state_names.go).
RUNTIME_STATE_NAMES = {REGISTERING: "Started", INITIALIZING: "Started", RESTORING: "Restoring", READY: "Running"}


class RestorePhase:
    """The Runtime API's SnapStart endpoints (runtime_api.Restore) and the restore's start and end."""

    def __init__(self, config: Config, sandboxes: Dict[Instance, Sandbox], init_complete: Callable[[Sandbox], None],
                 shutdown: ShutdownPhase) -> None:
        self.config = config
        self.sandboxes = sandboxes  # the lifecycle's: instance -> its sandbox
        self.init_complete = init_complete  # the gate's: the runtime and every extension are ready
        self.shutdown = shutdown

    def restore_next(self, instance: Instance, waiter: RestoreNext) -> Optional[str]:
        """GET /restore/next: the runtime's init (and its before-snapshot hooks) is done. Its answer
        waits for the extensions, as the first /next does; then the instance is restored at once."""
        if instance.external:
            waiter.restored()  # a runtime started by hand: nothing to snapshot, nothing reported
            return None
        sandbox = self.sandboxes.get(instance)
        held = None if sandbox is None else sandbox.restore_next
        if sandbox is None or not sandbox.initializing or (held is not None and held.alive):
            return _out_of_turn(sandbox, "Ready")
        sandbox.restore_next = waiter
        if sandbox.all_waiting():
            self.init_complete(sandbox)
        return None

    def restore_error(self, instance: Instance, body: bytes, error_type: Optional[str]) -> Optional[str]:
        """POST /restore/error: an after-restore hook failed (awslambdaric exits right after the 202).
        The invocation waiting for this instance gets SnapStartException; the next one a fresh instance."""
        if instance.external:
            log.warning("a runtime started by hand reported a restore error: %s", body[:500])
            return None
        sandbox = self.sandboxes.get(instance)
        if sandbox is None or sandbox.phase is not RESTORING:
            return _out_of_turn(sandbox, "RuntimeRestoreErrorState")
        error_type = error_type or "Runtime.Unknown"
        log.error("instance #%d: after-restore hook failed (%s): %s", instance.number, error_type, body[:500])
        self.end(sandbox, "error", error_type)
        # Its extensions are past their init (registered before the "snapshot"): they get SHUTDOWN
        # (failure) and their 2 s, with the telemetry sent, as when a runtime fails after init.
        self.shutdown.begin(sandbox, "failure")
        sandbox.pool.fail_restore(instance, RESTORE_FAILED, INIT_ERROR_GRACE)
        return None

    def begin(self, sandbox: Sandbox) -> None:
        """Init is complete; the snapshot would be taken now and restored later: at once, here."""
        sandbox.restore_started = time.monotonic()
        sandbox.instance.restore_started = sandbox.restore_started  # its first REPORT: the Restore Duration
        platform_events.restore_start(sandbox.telemetry, self.config, sandbox.instance_id)
        waiter, sandbox.restore_next = sandbox.restore_next, None
        if waiter is not None:
            waiter.restored()

    def end(self, sandbox: Sandbox, status: str, error_type: Optional[str] = None) -> None:
        """The after-restore hooks ended; a successful restore makes the sandbox READY (after a failed
        one the caller tears it down)."""
        if status == "success":
            sandbox.advance(READY)
        platform_events.restore_done(sandbox.telemetry, status, (time.monotonic() - sandbox.restore_started) * 1000,
                                     error_type)


def _out_of_turn(sandbox: Optional[Sandbox], to: str) -> str:
    state = "Running" if sandbox is None else RUNTIME_STATE_NAMES.get(sandbox.phase, "Running")
    return f"State transition from {state} to {to} failed for runtime. Error: State transition is not allowed"
