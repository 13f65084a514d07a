"""What happens to the pool's invocations when an instance fails or goes away, other than by its
runtime's own answers: the execution timeout, the runtime's exit (a crash, or the end of an instance
that was stopped), and what the sandbox layer reports (hooks.PoolControl: an extension's init failure,
a failed SnapStart restore, a running instance broken from outside, a stop).

The invocations the instance held end with why (``Sandbox.Timedout``, ``Runtime.ExitError``, the
sandbox's error); the one waiting for a starting instance gets its init error (through the
``InstanceSet``); the instance is stopped. It keeps no state of its own: the pool's in-flight
invocations, its instances and its ways of ending an invocation and of refilling are given to it
when the pool is built (pool.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Dict, Optional

from . import errors
from .instances import DEAD, Instance, InstanceSet, StopReason
from .invocation import CRASH, FUNCTION_ERROR, TIMEOUT, Invocation, Result

if TYPE_CHECKING:
    from .pool import Waiter

log = logging.getLogger(__name__)


class InstanceFailures:
    """The pool's answers to an instance failing; the ``PoolControl`` each sandbox is given."""

    def __init__(self, instances: InstanceSet, in_flight: Dict[str, Invocation], timeout: float,
                 end: Callable[[Invocation, Result], None], refill: Callable[[], None],
                 check_drained: Callable[[], None], next: Callable[[Waiter], None]) -> None:
        self.instances = instances
        self.in_flight = in_flight  # the pool's: request id -> invocation a runtime holds
        self.timeout = timeout
        self.end = end  # the pool's end of a held invocation (taken out of in_flight first)
        self.refill = refill  # the pool's: start instances for waiting invocations that have none coming
        self.check_drained = check_drained
        self.next = next  # PoolControl.next is the pool's own: a held /next goes on

    def timed_out(self, inv: Invocation) -> None:
        """``inv`` has run a whole function timeout: it ends, its instance is reset."""
        if self.in_flight.pop(inv.request_id, None) is None:
            return
        instance = inv.instance
        log.info("%s Task timed out after %.2f seconds", inv.request_id, self.timeout)
        self.end(inv, Result(TIMEOUT, errors.timeout_error(inv.request_id, self.timeout), True))
        if not instance.external:
            self.instances.kill(instance, StopReason.TIMEOUT)

    def init_error(self, instance: Instance, body: bytes, error_type: Optional[str]) -> None:
        """The runtime posted /init/error (it is expected to exit; it is killed if it does not)."""
        self.instances.init_error(instance, body, error_type)

    def instance_exited(self, instance: Instance, status: str) -> None:
        """The instance's runtime process has exited (reaped)."""
        if instance.state is DEAD:
            return
        process = instance.process
        if process is not None:
            process.read_output()  # its last lines belong to the invocations it held
        self.instances.exited(instance, status)
        self._end_held(instance, lambda inv: Result(CRASH, errors.exit_error(inv.request_id, status), True))
        self.refill()
        if instance.stop_reason is StopReason.RELOAD:
            self.instances.spawn_to_minimum()  # its replacement, if MIN_INSTANCES wants one warm
        self.check_drained()

    def _end_held(self, instance: Instance, result_of: Callable[[Invocation], Result]) -> None:
        for inv in list(instance.held.values()):
            if self.in_flight.pop(inv.request_id, None) is not None:
                self.end(inv, result_of(inv))

    # ---- what a sandbox may ask (hooks.PoolControl) --------------------------------------------
    def kill(self, instance: Instance, reason: StopReason, grace: float = 0.0) -> None:
        self.instances.kill(instance, reason, grace)

    def fail_init(self, instance: Instance, error_type: str, message: str, grace: float = 0.0) -> None:
        self.instances.init_failed(instance, lambda request_id: errors.function_error(
            error_type, f"RequestId: {request_id} Error: {message}"), StopReason.INIT_ERROR, grace)

    def fail_restore(self, instance: Instance, message: str, grace: float = 0.0) -> None:
        body = errors.SNAP_START.body(message)
        self.instances.init_failed(instance, lambda request_id: body, StopReason.RESTORE_ERROR, grace,
                                   api_error=errors.SNAP_START)

    def fail_running(self, instance: Instance, error_type: str, message: str, reason: StopReason) -> None:
        self._end_held(instance, lambda inv: Result(FUNCTION_ERROR, errors.function_error(
            error_type, f"RequestId: {inv.request_id} Error: {message}"), True))
        self.instances.kill(instance, reason)
