"""One execution environment ("sandbox") as the extensions see it: its phase, its extensions and
their states, with the allowed transitions of each in one table.

A spawned instance's sandbox holds its runtime, the external extensions (the executables of
``LAMBDA_EXTENSIONS_DIR``, in the runtime's process group), internal extensions (registered from
inside the runtime) and its telemetry. The main port's sandbox (``instance`` None) is where runtimes
and extensions started by hand meet; it is always ``READY``. State only: what happens on each
move is decided by lifecycle.py (and its restore.py, shutdown.py).
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from ..http.server import Request, header
from ..instances import IllegalTransition, Instance
from .telemetry import Telemetry

if TYPE_CHECKING:
    from ..hooks import PoolControl
    from ..pool import Waiter
    from .runtime_api import RestoreNext

_JSON = b"content-type: application/json\r\n"


class SandboxPhase(enum.Enum):
    REGISTERING = "registering"  # the runtime is held (SIGSTOP) until every external extension registered
    INITIALIZING = "initializing"  # the runtime's init runs; its first /next waits for every extension
    # SnapStart: init done and "snapshot taken" (none is: the process lives on); the runtime was told
    # it is restored (restore/next answered) and runs its after-restore hooks until its first /next
    RESTORING = "restoring"
    READY = "ready"  # init done; after each invocation /next waits until the extensions are back
    FAILED = "failed"  # the init failed: nothing is held or delivered any more; the group is torn down
    SHUTTING_DOWN = "shutting_down"  # SHUTDOWN sent; what is left of the group is killed after the grace
    GONE = "gone"  # the runtime and every extension have exited


REGISTERING, INITIALIZING, RESTORING, READY, FAILED, SHUTTING_DOWN, GONE = SandboxPhase
_PHASES = {
    REGISTERING: frozenset((INITIALIZING, FAILED, SHUTTING_DOWN, GONE)),
    INITIALIZING: frozenset((READY, RESTORING, FAILED, SHUTTING_DOWN, GONE)),
    RESTORING: frozenset((READY, FAILED, SHUTTING_DOWN, GONE)),
    READY: frozenset((SHUTTING_DOWN, GONE)),
    FAILED: frozenset((GONE,)),
    SHUTTING_DOWN: frozenset((GONE,)),
    GONE: frozenset(),
}


class ExtensionState(enum.Enum):
    REGISTERED = "registered"  # registered; not waiting in event/next (not yet, or busy with an event)
    WAITING = "waiting"  # waiting in event/next for an event (AWS: Ready)
    EXITED = "exited"  # its process exited, or its sandbox is gone


_EXTENSION_STATES = {
    ExtensionState.REGISTERED: frozenset((ExtensionState.WAITING, ExtensionState.EXITED)),
    ExtensionState.WAITING: frozenset((ExtensionState.REGISTERED, ExtensionState.EXITED)),
    ExtensionState.EXITED: frozenset(),
}


class Extension:
    """One registered extension (external: a file of the extensions dir; internal: in the runtime)."""

    __slots__ = ("id", "name", "external", "events", "sandbox", "state", "request", "queue")

    def __init__(self, name: str, external: bool, events: tuple, sandbox: Sandbox) -> None:
        self.id = str(uuid.uuid4())
        self.name = name
        self.external = external
        self.events = events
        self.sandbox = sandbox
        self.state = ExtensionState.REGISTERED
        self.request: Optional[Request] = None  # its event/next call, while WAITING
        self.queue: deque = deque()  # events not yet taken

    def _move(self, state: ExtensionState) -> None:
        if state not in _EXTENSION_STATES[self.state]:
            raise IllegalTransition(f"extension {self.name}: {self.state.value} -> {state.value}")
        self.state = state

    def wait(self, request: Request) -> bool:
        """Its event/next call: answered at once with a queued event (False), or parked (True)."""
        if self.queue:
            self._respond(request, self.queue.popleft())
            return False
        previous = self.request
        if previous is not None and previous is not request and not previous.answered:
            previous.on_abandon = None
        self.request = request
        if self.state is not ExtensionState.WAITING:
            self._move(ExtensionState.WAITING)

        def gone() -> None:
            if self.request is request:
                self.request = None
                self._move(ExtensionState.REGISTERED)

        request.on_abandon = gone
        return True

    def deliver(self, body: bytes) -> None:
        """An event: to its waiting event/next call, or queued for its next one."""
        if self.state is ExtensionState.EXITED:
            return
        request = self.request
        if self.state is ExtensionState.WAITING and request is not None and not request.answered:
            self.request = None
            self._move(ExtensionState.REGISTERED)
            self._respond(request, body)
        else:
            self.queue.append(body)

    def exited(self) -> None:
        if self.state is not ExtensionState.EXITED:
            self._move(ExtensionState.EXITED)
        self.request = None

    @staticmethod
    def _respond(request: Request, body: bytes) -> None:
        request.respond(200, _JSON + header("Lambda-Extension-Event-Identifier", str(uuid.uuid4())), body)


class Sandbox:
    """The extension side of one instance (``instance`` None: the main port's hand-started world)."""

    def __init__(self, instance: Optional[Instance], pool: Optional[PoolControl], files: List[tuple],
                 telemetry: Telemetry, release: Optional[Callable[[], None]] = None) -> None:
        self.instance = instance
        self.pool = pool  # what this sandbox may ask of the pool (None on the main port: nothing)
        # Releases the instance's own Runtime API listener: its extensions use it until they exit.
        self.release = release
        self.files = dict(files)  # external extension name -> path
        self.children: dict = {}  # external extension name -> its process (Child) while it runs
        self.extensions: Dict[str, Extension] = {}
        self.telemetry = telemetry
        self.instance_id = ""  # the Telemetry API's instanceId (its log stream name)
        self.phase = READY if instance is None else REGISTERING if files else INITIALIZING
        # READY: the post-invoke deadline; SHUTTING_DOWN: the group's SIGKILL.
        self.timer: Optional[asyncio.TimerHandle] = None
        self.held: List[Waiter] = []  # runtime /next calls held until the extensions are ready
        self.deadline_ms = 0  # of the invocation last handed to the extensions
        self.started = time.monotonic()
        # SnapStart: the runtime's GET /restore/next, held until the init is complete
        self.restore_next: Optional[RestoreNext] = None
        self.restore_started = 0.0  # SnapStart: when the restore began (monotonic)

    def advance(self, phase: SandboxPhase, timer: Optional[asyncio.TimerHandle] = None) -> None:
        """Move to ``phase`` (the previous phase's timer is cancelled, ``timer`` is the new one's)."""
        if phase not in _PHASES[self.phase]:
            raise IllegalTransition(f"{self.label()}: {self.phase.value} -> {phase.value}")
        self.cancel_timer()
        self.phase = phase
        self.timer = timer

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def initializing(self) -> bool:
        return self.phase is REGISTERING or self.phase is INITIALIZING

    def all_registered(self) -> bool:
        return all(name in self.extensions for name in self.files)

    def all_waiting(self) -> bool:
        return self.all_registered() and all(e.state is ExtensionState.WAITING for e in self.extensions.values())

    def not_waiting(self) -> List[str]:
        return [e.name for e in self.extensions.values() if e.state is not ExtensionState.WAITING]

    def blame_for_init_timeout(self, timeout: float) -> Optional[str]:
        """Why the init timed out, if an extension is to blame (None: the runtime is)."""
        missing = [name for name in self.files if name not in self.extensions]
        if missing:
            return f"extension {', '.join(missing)} did not register within the init timeout ({timeout:.2f} s)"
        late = self.not_waiting()
        if late:
            return f"extension {', '.join(late)} did not call event/next within the init timeout ({timeout:.2f} s)"
        return None

    def deliver(self, event_type: str, fields: dict, replace: bool = False) -> None:
        """An event to every extension subscribed to its type (``replace``: instead of what is queued)."""
        body = json.dumps({"eventType": event_type, **fields}).encode()
        for ext in self.extensions.values():
            if event_type in ext.events:
                if replace:
                    ext.queue.clear()
                ext.deliver(body)

    def label(self) -> str:
        return "main port" if self.instance is None else f"instance #{self.instance.number}"
