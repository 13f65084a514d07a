"""The seam between the pool and the sandbox layer (extensions, telemetry), both ways, as protocols.

``SandboxHooks`` is what the pool calls at fixed points of an instance's and an invocation's life;
it is passed to the pool when the pool is built (``NoSandbox``, the default, adds nothing: no
extensions, no telemetry). ``PoolControl`` is what a sandbox may ask of the pool (``pool.failures``,
failures.py, is the one each sandbox is given when its instance is launched). Nothing else
crosses: the sandbox layer never touches the pool's queues or counters, the pool never knows what
an extension is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from .instances import Instance, StopReason, Waiter
    from .invocation import Invocation, Report, Result


class SandboxHooks(Protocol):
    def hold_next(self, waiter: Waiter) -> bool:
        """A runtime of ``waiter.instance`` asks for work. True holds it back (the sandbox is not ready:
        its extensions have not all registered or are not back in ``event/next``); the sandbox then
        calls :meth:`PoolControl.next` with the same waiter when it is."""

    def dispatching(self, inv: Invocation, instance: Instance) -> bool:
        """``inv`` is about to be handed to a runtime of ``instance``. True asks for :meth:`finished`
        with the invocation's figures when it ends."""

    def finished(self, inv: Invocation, result: Result, report: Report) -> None:
        """An invocation :meth:`dispatching` asked about has ended (before its front door hears of it)."""

    def init_timeout_error(self, instance: Instance, request_id: str) -> Optional[bytes]:
        """``instance`` did not finish its init in time: the error to answer when the sandbox, not the
        runtime, is to blame (None: the runtime's ``Sandbox.Timedout``-style init timeout)."""


class NoSandbox:
    """The hooks of a daemon without extensions or telemetry: nothing held, nothing observed."""

    def hold_next(self, waiter: Waiter) -> bool:
        return False

    def dispatching(self, inv: Invocation, instance: Instance) -> bool:
        return False

    def finished(self, inv: Invocation, result: Result, report: Report) -> None:
        pass

    def init_timeout_error(self, instance: Instance, request_id: str) -> Optional[bytes]:
        return None


NO_SANDBOX = NoSandbox()


class PoolControl(Protocol):
    def next(self, waiter: Waiter) -> None:
        """Let a runtime's held ``/next`` go on (see :meth:`SandboxHooks.hold_next`)."""

    def kill(self, instance: Instance, reason: StopReason, grace: float = 0.0) -> None:
        """Take ``instance`` out of service and end its process group (after ``grace`` seconds)."""

    def fail_init(self, instance: Instance, error_type: str, message: str, grace: float = 0.0) -> None:
        """The sandbox's init failed (an extension's fault): one waiting invocation gets
        ``error_type``/``message``; the instance is stopped (its group killed after ``grace`` s)."""

    def fail_restore(self, instance: Instance, message: str, grace: float = 0.0) -> None:
        """SnapStart: an after-restore hook of ``instance`` failed: one waiting invocation gets the
        Invoke API's ``SnapStartException`` with ``message``; the instance is stopped."""

    def fail_running(self, instance: Instance, error_type: str, message: str, reason: StopReason) -> None:
        """Something outside the runtime broke a running instance: its invocations end with
        ``error_type``/``message`` and the instance is stopped."""
