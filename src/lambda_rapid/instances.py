"""Runtime instances as the pool sees them: each one's state machine, and the set of managed
instances: started on demand up to MAX_CONCURRENCY, given an init deadline, failed, stopped, and
forgotten when their runtime process exits.

Nothing here knows about HTTP, payloads or extensions. The pool passes in, when it builds the set,
what the set may ask of it: answer the oldest waiting invocation with an init error, and drop the
parked ``/next`` calls of an instance that stops taking work.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Protocol, Sized

from . import errors
from .config import Config
from .hooks import SandboxHooks

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

INIT_ERROR_GRACE = 0.5  # seconds a sandbox that reported an init error has to end by itself before SIGKILL
RETURN_GRACE = 0.02  # seconds a queued invocation waits for a just-answered instance before spawning


class InstanceState(enum.Enum):
    # spawned; its runtime has not asked for work yet (its init runs, and for SnapStart its restore:
    # the sandbox's phases, sandbox/environment.py)
    STARTING = "starting"
    READY = "ready"  # takes invocations
    STOPPING = "stopping"  # out of service for good (``stop_reason`` says why); its processes are ending
    DEAD = "dead"  # its runtime process exited and was reaped


STARTING, READY, STOPPING, DEAD = InstanceState
# Every allowed move; anything else is a bug and raises. An instance never comes back into service.
_TRANSITIONS = {
    STARTING: frozenset((READY, STOPPING, DEAD)),
    READY: frozenset((STOPPING, DEAD)),
    STOPPING: frozenset((DEAD,)),
    DEAD: frozenset(),
}


class StopReason(enum.Enum):
    """Why an instance went out of service (the metrics' ``reason`` label is the value)."""

    IDLE = "idle"
    TIMEOUT = "timeout"
    INIT_ERROR = "init_error"
    INIT_TIMEOUT = "init_timeout"
    SHUTDOWN = "shutdown"
    RELOAD = "reload"  # the function's code changed (RELOAD_ON_CHANGE)
    EXTENSION_CRASH = "extension_crash"
    EXTENSION_ERROR = "extension_error"
    RESTORE_ERROR = "restore_error"  # SnapStart: an after-restore hook failed (POST /runtime/restore/error)
    OTHER_TENANT = "other_tenant"  # idle, and its slot was wanted by a tenant with no instance (tenant_pool.py)
    EXITED = "exited"  # nobody stopped it: its runtime exited by itself


class IllegalTransition(RuntimeError):
    pass


class RuntimeProcess(Protocol):
    """What a launcher gives back for the instance it started."""

    pid: int  # the runtime's pid, which is also its process group id

    def read_output(self) -> None:
        """Forward, now, whatever the runtime has written and the daemon has not read yet (never blocks)."""

    def peak_rss(self) -> int:
        """Peak resident memory of the instance's processes, in bytes."""


class Instance:
    """One runtime process group (or a runtime started by hand, ``external``)."""

    __slots__ = ("number", "external", "state", "timer", "stop_reason", "process", "held", "waiters",
                 "returning", "spawned_at", "init_ms", "idle_since", "restore_started", "restored",
                 "tenant")

    def __init__(self, number: int, external: bool = False, tenant: Optional[str] = None) -> None:
        self.number = number
        self.external = external
        # The one tenant a tenant-isolated function's instance serves, for its whole life (None: not
        # tenant-isolated, or a runtime started by hand that has not run an invocation yet).
        self.tenant = tenant
        self.state = READY if external else STARTING
        self.timer: Optional[asyncio.TimerHandle] = None  # STARTING: the init deadline; STOPPING: the SIGKILL
        self.stop_reason: Optional[StopReason] = None
        self.process: Optional[RuntimeProcess] = None
        self.held: dict = {}  # request_id -> Invocation this instance is running
        self.waiters = 0  # its workers parked in /next
        self.returning = 0  # workers that answered and are on their way back to /next
        self.spawned_at = time.monotonic()
        # Its cold start, not reported yet (goes to its first invocation): the init duration, or for
        # a SnapStart instance (``restored``) the restore's.
        self.init_ms: Optional[float] = None
        self.idle_since = self.spawned_at
        self.restore_started: Optional[float] = None  # SnapStart: when its restore began (monotonic)
        self.restored = False  # SnapStart: it was restored; its first REPORT shows the Restore Duration

    @property
    def pid(self) -> int:
        return 0 if self.process is None else self.process.pid

    def advance(self, state: InstanceState, timer: Optional[asyncio.TimerHandle] = None) -> None:
        """Move to ``state`` (the previous state's timer is cancelled, ``timer`` is the new one's)."""
        if state not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"instance #{self.number}: {self.state.value} -> {state.value}")
        if self.timer is not None:
            self.timer.cancel()
        self.state = state
        self.timer = timer

    def __repr__(self) -> str:
        return f"Instance(#{self.number}, pid={self.pid}, {self.state.value})"


class Demand:
    """The demand record idle scale-down goes by: how many invocations run now (``busy``), and
    when each level of concurrency was last seen."""

    __slots__ = ("busy", "seen")

    def __init__(self, levels: int) -> None:
        self.busy = 0
        self.seen = [0.0] * (levels + 1)

    def rise(self, now: float) -> None:
        self.busy += 1
        if self.busy == len(self.seen):
            self.seen.append(now)  # runtimes started by hand are not bounded by MAX_CONCURRENCY
        else:
            self.seen[self.busy] = now

    def fall(self, now: float) -> None:
        self.seen[self.busy] = now
        self.busy -= 1

    def peak_since(self, horizon: float) -> int:
        """The most invocations that ran at once since ``horizon`` (monotonic time)."""
        seen = self.seen
        for level in range(len(seen) - 1, self.busy, -1):
            if seen[level] > horizon and seen[level] > 0:
                return level
        return self.busy


class InstanceSet:
    """The managed instances (runtimes started by hand are not among them)."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 launcher: Callable[[Instance], RuntimeProcess], killer: Callable[[Instance, int], None],
                 hooks: SandboxHooks, metrics: Metrics, waiting: Sized, demand: Demand,
                 fail_waiting: Callable[[Instance, Callable[[str], bytes], Optional[errors.ApiError]], None],
                 forget_capacity: Callable[[Instance], None]) -> None:
        self.config = config
        self.loop = loop
        self.launcher = launcher  # starts the instance's processes; raises OSError on failure
        self.killer = killer  # signals the instance's process group
        self.hooks = hooks
        self.metrics = metrics
        self.waiting = waiting  # the pool's wait queue (only its length is read here)
        self.demand = demand
        # The instance's init failed: the oldest invocation waiting for it (if any) gets the body built
        # for its request id (an Invoke API error if one is given, else a function error).
        self.fail_waiting = fail_waiting
        self.forget_capacity = forget_capacity  # the instance takes no more work: drop its parked /next
        self.all: List[Instance] = []
        self.starting = 0
        self._late_spawn: Optional[asyncio.TimerHandle] = None
        self._reaper: Optional[asyncio.TimerHandle] = None

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def __getitem__(self, index: int) -> Instance:
        return self.all[index]

    def count(self, state: InstanceState) -> int:
        return sum(1 for i in self.all if i.state is state)

    def _advance(self, instance: Instance, state: InstanceState, timer: Optional[asyncio.TimerHandle] = None) -> None:
        was = instance.state
        instance.advance(state, timer)
        if was is STARTING:
            self.starting -= 1

    # ---- starting ------------------------------------------------------------------------------
    def has_room(self) -> bool:
        return len(self.all) < self.config.max_concurrency

    def can_spawn(self, waiting: int, coming_back: int) -> bool:
        """True if ``waiting`` invocations are more than the capacity already on its way (instances
        starting, and ``coming_back`` workers about to be idle again) and there is room."""
        coming = self.starting * self.config.runtime_max_concurrency + coming_back
        return len(self.all) < self.config.max_concurrency and coming < waiting

    def spawn_soon(self) -> None:
        """Invocations wait while workers that just answered are on their way back to /next: they are
        expected within microseconds, so start another instance only if they wait ``RETURN_GRACE``."""
        if self._late_spawn is None and self.has_room():
            self._late_spawn = self.loop.call_later(RETURN_GRACE, self._spawn_if_still_waiting)

    def _spawn_if_still_waiting(self) -> None:
        self._late_spawn = None
        while self.waiting and self.can_spawn(len(self.waiting), 0):
            if self.spawn() is None:
                break

    def fill(self, coming_back: int) -> None:
        """Start instances for invocations that are waiting and have none coming."""
        while self.waiting and self.can_spawn(len(self.waiting), coming_back):
            if self.spawn() is None and not self.waiting:
                break

    def spawn_to_minimum(self) -> None:
        while len(self.all) < self.config.min_instances:
            if self.spawn() is None:
                break

    def spawn(self, tenant: Optional[str] = None) -> Optional[Instance]:
        """Start an instance (for ``tenant``, of a tenant-isolated function); None if it could not start."""
        used = {i.number for i in self.all}
        number = 0
        while number in used:
            number += 1
        instance = Instance(number, tenant=tenant)
        self.all.append(instance)
        self.starting += 1
        self.metrics.spawns += 1
        try:
            instance.process = self.launcher(instance)
        except OSError as e:
            reason = str(e)
            log.error("could not start the runtime: %s", reason)
            self.all.remove(instance)
            self._advance(instance, DEAD)
            self.metrics.init_failures += 1
            self.fail_waiting(instance, lambda request_id: errors.spawn_error(request_id, reason))
            return None
        instance.timer = self.loop.call_later(self.config.init_timeout, self._init_timed_out, instance)
        return instance

    def ready(self, instance: Instance) -> None:
        """The instance's runtime asked for work for the first time: its init (and restore) is done."""
        self._advance(instance, READY)
        now = time.monotonic()
        if instance.restore_started is not None:
            instance.restored = True
            instance.init_ms = (now - instance.restore_started) * 1000
            log.debug("instance #%d restored in %.1f ms", instance.number, instance.init_ms)
            return
        instance.init_ms = (now - instance.spawned_at) * 1000
        log.debug("instance #%d ready after %.1f ms", instance.number, instance.init_ms)

    def _init_timed_out(self, instance: Instance) -> None:
        instance.timer = None
        if instance.state is not STARTING:
            return
        timeout = self.config.init_timeout
        log.error("instance #%d did not reach /next within %.2f s; killing it", instance.number, timeout)

        def body(request_id: str) -> bytes:
            return (self.hooks.init_timeout_error(instance, request_id)
                    or errors.init_timeout_error(request_id, timeout))

        self.init_failed(instance, body, StopReason.INIT_TIMEOUT)

    def init_failed(self, instance: Instance, make_body: Callable[[str], bytes], reason: StopReason,
                    grace: float = 0.0, api_error: Optional[errors.ApiError] = None) -> None:
        """A starting instance will never be ready: one waiting invocation gets why (a function error,
        or the Invoke API's ``api_error``), the instance stops."""
        if instance.state is not STARTING:
            return
        self.metrics.init_failures += 1
        self.fail_waiting(instance, make_body, api_error)
        self.kill(instance, reason, grace)

    def init_error(self, instance: Instance, body: bytes, error_type: Optional[str]) -> None:
        """The runtime posted /init/error. It is expected to exit; it is killed if it does not."""
        log.warning("instance #%d reported an init error: %s", instance.number, body[:500])
        failure = errors.runtime_error_body(body, error_type)
        if instance.external:
            self.fail_waiting(instance, lambda request_id: failure)
        elif instance.state is STARTING:
            self.init_failed(instance, lambda request_id: failure, StopReason.INIT_ERROR, INIT_ERROR_GRACE)
        else:
            self.kill(instance, StopReason.INIT_ERROR, INIT_ERROR_GRACE)

    # ---- stopping ------------------------------------------------------------------------------
    def kill(self, instance: Instance, reason: StopReason, grace: float = 0.0) -> None:
        """Take the instance out of service and end its process group (after ``grace`` seconds)."""
        if instance.state is DEAD:
            return
        if instance.state is not STOPPING:
            self._stop(instance, reason)
        if grace <= 0:
            self._kill_now(instance)
        elif instance.timer is None:
            instance.timer = self.loop.call_later(grace, self._kill_now, instance)

    def _stop(self, instance: Instance, reason: StopReason) -> None:
        instance.stop_reason = reason
        kills = self.metrics.kills
        kills[reason.value] = kills.get(reason.value, 0) + 1
        self._advance(instance, STOPPING)
        self.forget_capacity(instance)

    def _kill_now(self, instance: Instance) -> None:
        if instance.timer is not None:
            instance.timer.cancel()
            instance.timer = None
        if instance.state is not DEAD:
            self.killer(instance, signal.SIGKILL)

    def start_idle_reaper(self) -> None:
        period = min(max(self.config.idle_timeout / 4, 0.05), 5.0)
        reap = self.stop_idle if self.config.tenant_isolated else self.stop_surplus

        def tick() -> None:
            reap()
            self._reaper = self.loop.call_later(period, tick)

        self._reaper = self.loop.call_later(period, tick)

    def stop_idle_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    def needed(self) -> int:
        """How many instances the load needed within the last idle timeout (0 if none)."""
        level = self.demand.peak_since(time.monotonic() - self.config.idle_timeout)
        return -(-level // self.config.runtime_max_concurrency)

    def stop_surplus(self) -> None:
        """Stop idle instances beyond what the load needed lately, those idle longest first.

        Demand decides how many stay, not each instance's own idle time: with longest-idle-first
        dispatch a steady light load touches every instance, so none would ever sit idle long enough."""
        live = [i for i in self.all if i.state is READY]
        surplus = len(live) - max(self.needed(), self.config.min_instances)
        if surplus <= 0:
            return
        for instance in sorted((i for i in live if not i.held), key=lambda i: i.idle_since)[:surplus]:
            log.info("stopping idle instance #%d (pid %d)", instance.number, instance.pid)
            self.kill(instance, StopReason.IDLE)

    def stop_idle(self) -> None:
        """Stop the instances that have been idle a whole idle timeout (a tenant-isolated function's
        rule: the function's demand says nothing about one tenant's, so each instance goes by its own
        idle time, as AWS reclaims an execution environment)."""
        horizon = time.monotonic() - self.config.idle_timeout
        for instance in [i for i in self.all if i.state is READY and not i.held and i.idle_since <= horizon]:
            log.info("stopping idle instance #%d (pid %d)", instance.number, instance.pid)
            self.kill(instance, StopReason.IDLE)

    def retire_all(self) -> int:
        """The function's code changed: every instance goes out of service. Idle and starting ones are
        killed now (a starting one is no init failure: its waiting invocation gets a fresh instance);
        a busy one finishes its invocations and is killed when it asks for work again (Pool.next).
        Returns how many instances were told to stop."""
        count = 0
        for instance in list(self.all):
            if instance.state is STARTING or instance.state is READY:
                count += 1
                if instance.held:
                    self._stop(instance, StopReason.RELOAD)
                else:
                    self.kill(instance, StopReason.RELOAD)
        return count

    def stop_all(self) -> List[Instance]:
        """The daemon stops: every instance goes out of service (the caller ends their groups)."""
        for instance in self.all:
            if instance.state is STARTING or instance.state is READY:
                self._stop(instance, StopReason.SHUTDOWN)
        return [i for i in self.all if i.pid]

    def exited(self, instance: Instance, status: str) -> None:
        """The instance's runtime process has exited and was reaped."""
        was = instance.state
        if was is DEAD:
            return
        if instance.stop_reason is None:
            instance.stop_reason = StopReason.EXITED
            kills: Dict[str, int] = self.metrics.kills
            kills["exited"] = kills.get("exited", 0) + 1
            log.warning("instance #%d (pid %d) exited: %s", instance.number, instance.pid, status)
        self._advance(instance, DEAD)
        if instance in self.all:
            self.all.remove(instance)
        self.forget_capacity(instance)
        if was is STARTING:
            self.metrics.init_failures += 1
            self.fail_waiting(instance, lambda request_id: errors.exit_error(request_id, status))
