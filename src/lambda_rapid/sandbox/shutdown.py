"""The sandbox's shutdown phase: how an instance with external extensions is stopped.

While its extensions are past their init, stopping an instance (whatever the reason: idle, timeout,
a failure, the daemon's exit) sends ``SHUTDOWN`` to them, with the reason, and leaves them AWS's
2,000 ms before what is left of the process group is killed; the runtime goes at once. Without
live extensions the group is signalled at once. This is the pool's ``killer``; the SHUTDOWN event's
reasons follow https://docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html#runtimes-lifecycle-shutdown.

It decides nothing else: which sandboxes exist and when a runtime or extension exited is
lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Dict

from ..instances import DEAD, Instance, StopReason
from .environment import FAILED, GONE, READY, RESTORING, SHUTTING_DOWN, Sandbox
from .process import ProcessManager

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0  # AWS: 2,000 ms for a function with external extensions
# Why an instance is stopped -> AWS's SHUTDOWN reason (anything else: "failure").
SHUTDOWN_REASONS = {StopReason.IDLE: "spindown", StopReason.SHUTDOWN: "spindown", StopReason.RELOAD: "spindown",
                    StopReason.OTHER_TENANT: "spindown", StopReason.TIMEOUT: "timeout"}
# Stopped during their init: the extensions get no SHUTDOWN, the group is killed at once.
INIT_REASONS = (StopReason.INIT_ERROR, StopReason.INIT_TIMEOUT)


class ShutdownPhase:
    """SHUTDOWN to a sandbox's extensions, then SIGKILL to what is left of its group after the grace."""

    def __init__(self, loop: asyncio.AbstractEventLoop, procs: ProcessManager, sandboxes: Dict[Instance, Sandbox],
                 main: Sandbox) -> None:
        self.loop = loop
        self.procs = procs
        self.sandboxes = sandboxes  # the lifecycle's: instance -> its sandbox
        self.main = main  # the main port's sandbox (hand-started extensions): told at the daemon's exit

    def kill(self, instance: Instance, sig: int) -> None:
        """The pool's killer: with external extensions alive after init, SHUTDOWN them first and
        SIGKILL what is left after 2 s; the runtime goes at once."""
        sandbox = self.sandboxes.get(instance)
        if (sandbox is not None and sandbox.children and instance.stop_reason not in INIT_REASONS
                and sandbox.phase in (READY, RESTORING, SHUTTING_DOWN)):
            self.begin(sandbox, SHUTDOWN_REASONS.get(instance.stop_reason, "failure"))
            if instance.pid in self.procs.children:
                signal_pid(instance.pid, signal.SIGKILL)
            return
        if sandbox is not None and sandbox.initializing:
            sandbox.advance(FAILED)
        if instance.pid:
            self.procs.signal_group(instance.pid, sig)

    def begin(self, sandbox: Sandbox, reason: str) -> None:
        """SHUTDOWN (``reason``) to the sandbox's extensions, instead of any event they have not taken;
        its group is killed after the grace."""
        if sandbox.phase is SHUTTING_DOWN or sandbox.phase is GONE or sandbox.phase is FAILED:
            return
        deadline_ms = int((time.time() + SHUTDOWN_GRACE) * 1000)
        sandbox.deliver("SHUTDOWN", {"shutdownReason": reason, "deadlineMs": deadline_ms}, replace=True)
        sandbox.telemetry.flush()
        timer = None
        if sandbox.instance is not None:
            log.info("instance #%d: SHUTDOWN (%s) sent to its extensions", sandbox.instance.number, reason)
            timer = self.loop.call_later(SHUTDOWN_GRACE, self.kill_group, sandbox)
        sandbox.advance(SHUTTING_DOWN, timer)

    def kill_group(self, sandbox: Sandbox) -> None:
        """SIGKILL to every process left in the sandbox's group."""
        if sandbox.phase is SHUTTING_DOWN:
            sandbox.timer = None
        instance = sandbox.instance
        # The group id is the runtime's pid; it stays valid as long as one of our children is in it.
        if instance is not None and (sandbox.children or instance.state is not DEAD) and instance.pid > 1:
            self.procs.signal_group(instance.pid, signal.SIGKILL)

    async def stop_all(self) -> None:
        """Daemon exit: SHUTDOWN to every extension, then wait (up to 2 s) for them to exit."""
        self.begin(self.main, "spindown")
        sandboxes = [s for s in self.sandboxes.values() if s.children and s.phase is not FAILED]
        for sandbox in sandboxes:
            self.begin(sandbox, "spindown")
        deadline = self.loop.time() + SHUTDOWN_GRACE
        while any(s.children for s in sandboxes) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for sandbox in sandboxes:
            for child in list(sandbox.children.values()):
                signal_pid(child.pid, signal.SIGKILL)


def signal_pid(pid: int, sig: int) -> None:
    """``sig`` to one process, if it still exists."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
