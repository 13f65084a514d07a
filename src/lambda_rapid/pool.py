"""The instance pool: which runtime instance runs which invocation. Longest-idle dispatch, spawning
on demand, the bounded FIFO wait queue, idle scale-down and draining are decided here.

The pool knows nothing about HTTP, AMQP or extensions. Front doors call :meth:`Pool.submit`; the
Runtime API calls :meth:`Pool.next`, :meth:`Pool.respond`, :meth:`Pool.error`.
It is built from its collaborators: ``launcher`` (starts an instance's processes), ``killer`` (signals
its group), ``output`` (the daemon's stdout) and ``hooks`` (the sandbox layer, see hooks.py). The
instances themselves are kept by an ``InstanceSet``, the two deadline queues by deadlines.py. What
goes wrong is ``InstanceFailures``' (failures.py, built here): an execution timeout, a runtime's exit,
what the sandbox layer reports; the process layer calls ``pool.failures.instance_exited`` and each
sandbox is given ``pool.failures`` as its ``PoolControl``. A tenant-isolated function's pool
(tenant_pool.py) keeps these rules per tenant; it overrides the few methods below that say where
work waits and parks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable, Optional

from . import errors
from .config import Config
from .deadlines import RunDeadlines, WaitQueue
from .failures import InstanceFailures
from .hooks import NO_SANDBOX, SandboxHooks
from .instances import READY, STARTING, STOPPING, Demand, Instance, InstanceSet, RuntimeProcess, StopReason
from .invocation import FUNCTION_ERROR, INIT_ERROR, REJECTED, SUCCESS, THROTTLED, Invocation, Result
from .metrics import Metrics
from .reports import FunctionLog

log = logging.getLogger(__name__)


class Waiter:
    """A runtime (or one of its workers) parked in GET /next; the Runtime API's subclass implements
    ``send``, which answers it with an invocation's event."""

    __slots__ = ("instance", "alive", "parked")

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.alive = True
        self.parked = False  # in the pool's idle list (counted in instance.waiters)

    def send(self, inv: Invocation) -> None:
        raise NotImplementedError


def take_parked(idle: deque) -> Optional[Waiter]:
    """The longest-parked runtime of ``idle`` still waiting, taken out of it; None if there is none."""
    while idle:
        waiter = idle.popleft()
        if waiter.alive:
            waiter.instance.waiters -= 1
            return waiter
    return None


class Pool:
    def __init__(self, config: Config, launcher: Callable[[Instance], RuntimeProcess],
                 killer: Callable[[Instance, int], None], output: Callable[[bytes], None],
                 hooks: SandboxHooks = NO_SANDBOX) -> None:
        self.config = config
        self.hooks = hooks
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.timeout = config.timeout
        self.metrics = Metrics()
        self.idle: deque = deque()  # Waiters, longest-waiting first
        self.queue = self._wait_queue()
        self.in_flight: dict = {}  # request_id -> Invocation handed to a runtime
        self.accepted: dict = {}  # request_id -> every Invocation not yet finished
        self.demand = Demand(config.max_concurrency * config.runtime_max_concurrency)
        self.draining = Drain(self.loop, self.accepted)
        self._check_drained = self.draining.check  # wherever an accepted invocation may have ended
        self.instances = InstanceSet(config, self.loop, launcher, killer, hooks, self.metrics, self.queue,
                                     self.demand, fail_waiting=self._fail_waiting,
                                     forget_capacity=self._forget_capacity)
        self.failures = InstanceFailures(self.instances, self.in_flight, config.timeout, end=self._end,
                                         refill=self._refill, check_drained=self._check_drained, next=self.next)
        self.running = RunDeadlines(self.loop, config.timeout, self.failures.timed_out)
        self.returning = 0  # sum of Instance.returning: capacity that is about to be idle again
        self.accepting = True
        self.reports = config.print_reports
        self.log = FunctionLog(config.function_version, config.memory_size, output, config.print_reports)

    def _wait_queue(self) -> WaitQueue:
        """Where invocations wait for an instance (all of them; its length is the queue depth)."""
        return WaitQueue(self.loop, self.config.timeout, self._throttle)

    # ---- front doors ---------------------------------------------------------------------------
    def is_active(self, request_id: str) -> bool:
        return request_id in self.accepted

    def submit(self, inv: Invocation) -> None:
        """Run ``inv`` as soon as an instance is free; its ``on_done`` gets the Result."""
        if not self.accepting:
            return self._refuse(inv)
        self.accepted[inv.request_id] = inv
        idle = self.idle
        while idle:  # take_parked(idle), inline: the hot path
            waiter = idle.popleft()
            if waiter.alive:
                waiter.instance.waiters -= 1
                self._start(inv, waiter)
                return
        instances = self.instances
        spawn = instances.can_spawn(len(self.queue) + 1, self.returning)
        if len(self.queue) >= self.config.max_queued and not spawn:
            return self._throttle(inv)
        self.queue.push(inv)
        if spawn:
            instances.spawn()
        elif self.returning:
            instances.spawn_soon()

    def abandon(self, inv: Invocation) -> None:
        """The caller went away: drop it if it has not started; a running one runs to its end."""
        inv.on_done = None
        if inv.instance is None and not inv.done:
            try:
                self._queue_of(inv).remove(inv)
            except ValueError:
                return
            inv.done = True
            self.accepted.pop(inv.request_id, None)

    def _queue_of(self, inv: Invocation) -> deque:
        """The queue ``inv`` waits in (if it waits)."""
        return self.queue

    def _refuse(self, inv: Invocation) -> None:
        """The daemon is shutting down: 503."""
        self.metrics.outcomes[REJECTED] += 1
        inv.finish(Result(REJECTED, errors.SERVICE.body("The daemon is shutting down."), api_error=errors.SERVICE))

    def _throttle(self, inv: Invocation) -> None:
        """No room in the wait queue, or waited a whole function timeout for an instance: 429, as
        Lambda throttles."""
        self.accepted.pop(inv.request_id, None)
        self.metrics.outcomes[THROTTLED] += 1
        inv.finish(Result(THROTTLED, errors.throttled_body(), api_error=errors.TOO_MANY_REQUESTS))

    # ---- dispatch ------------------------------------------------------------------------------
    def _start(self, inv: Invocation, waiter: Waiter) -> None:
        instance = waiter.instance
        inv.instance = instance
        instance.held[inv.request_id] = inv
        self.in_flight[inv.request_id] = inv
        now = time.monotonic()
        inv.started_at = now
        inv.deadline_ms = int((time.time() + self.timeout) * 1000)
        self.running.add(inv)
        self.demand.rise(now)
        if instance.init_ms is not None:
            inv.init_duration_ms, instance.init_ms = instance.init_ms, None
        if inv.tail or self.reports:
            self.log.start(inv)
        inv.observed = self.hooks.dispatching(inv, instance)
        waiter.send(inv)

    def _end(self, inv: Invocation, result: Result) -> None:
        """``inv``, held by a runtime, ends with ``result`` (it has been taken out of ``in_flight``)."""
        instance = inv.instance
        measured = inv.observed or inv.tail or self.reports
        if measured and instance.process is not None:
            # The runtime wrote its last lines before it answered, but the loop may not have read them
            # yet: read them now, while they are still this invocation's (Tail, REPORT order, telemetry).
            instance.process.read_output()
        instance.held.pop(inv.request_id, None)
        if instance.state is READY and not instance.external:
            instance.returning += 1
            self.returning += 1
        now = time.monotonic()
        self.demand.fall(now)
        instance.idle_since = now
        self.accepted.pop(inv.request_id, None)
        self.metrics.observe(now - inv.started_at)
        self.metrics.outcomes[result.outcome] += 1
        if measured:
            report = self.log.measure(inv, now)
            if inv.tail or self.reports:
                self.log.end(inv, result, report)
            if inv.observed:
                self.hooks.finished(inv, result, report)
        inv.finish(result)
        self.running.prune()
        self._check_drained()

    # ---- Runtime API ---------------------------------------------------------------------------
    def next(self, waiter: Waiter) -> None:
        """A runtime asks for work (GET /next)."""
        if not self._arrived(waiter):
            return
        if self.queue:
            inv = self.queue.pop_live()
            if inv is not None:
                self._start(inv, waiter)
                return
        waiter.instance.waiters += 1
        waiter.parked = True
        self.idle.append(waiter)
        self._check_drained()

    def _arrived(self, waiter: Waiter) -> bool:
        """Whether a runtime's /next may be given work (else it is dropped, or held by the sandbox);
        the first one of a starting instance makes it ready, one of a worker that answered brings its
        capacity back."""
        instance = waiter.instance
        state = instance.state
        if state is not READY and state is not STARTING:
            waiter.alive = False
            if state is STOPPING and instance.stop_reason is StopReason.RELOAD and not instance.held:
                self.instances.kill(instance, StopReason.RELOAD)  # retired while busy: its work has ended
            return False
        if self.hooks.hold_next(waiter):
            return False
        if instance.returning:
            instance.returning -= 1
            self.returning -= 1
        elif state is STARTING:
            self.instances.ready(instance)
        return True

    def waiter_gone(self, waiter: Waiter) -> None:
        """The runtime's /next connection closed before it was given work."""
        if waiter.alive:
            waiter.alive = False
            if waiter.parked:
                waiter.instance.waiters -= 1

    def respond(self, request_id: str, body: bytes) -> bool:
        return self._answer(request_id, SUCCESS, body)

    def error(self, request_id: str, body: bytes, error_type: Optional[str]) -> bool:
        return self._answer(request_id, FUNCTION_ERROR, errors.runtime_error_body(body, error_type))

    def response_too_large(self, request_id: str, limit: int = errors.RESPONSE_LIMIT) -> bool:
        return self._answer(request_id, FUNCTION_ERROR, errors.response_too_large_error(limit))

    def _answer(self, request_id: str, outcome: str, body: bytes) -> bool:
        inv = self.in_flight.pop(request_id, None)
        if inv is None:
            return False
        self._end(inv, Result(outcome, body, outcome != SUCCESS))
        return True

    # ---- instances -----------------------------------------------------------------------------
    def _refill(self) -> None:
        """An instance is gone: start instances for invocations that wait and have none coming."""
        self.instances.fill(self.returning)

    def _parked_of(self, instance: Instance) -> deque:
        """Where the workers of ``instance`` park."""
        return self.idle

    def _forget_capacity(self, instance: Instance) -> None:
        """The instance will take no more work: drop its parked and returning workers."""
        if instance.waiters:
            for waiter in self._parked_of(instance):
                if waiter.instance is instance:
                    waiter.alive = False
            instance.waiters = 0
        self.returning -= instance.returning
        instance.returning = 0

    def _fail_waiting(self, instance: Instance, make_body: Callable[[str], bytes],
                      api_error: Optional[errors.ApiError] = None) -> None:
        """The init of ``instance`` failed: the oldest invocation waiting for it (if any) gets the
        error built for it (a function error, or the Invoke API's ``api_error``)."""
        victim = self._waiting_for(instance).pop_live()
        body = make_body("" if victim is None else victim.request_id)
        if victim is None:
            return
        self.accepted.pop(victim.request_id, None)
        self.metrics.outcomes[INIT_ERROR] += 1
        victim.finish(Result(INIT_ERROR, body, api_error is None, api_error=api_error))
        self._check_drained()

    def _waiting_for(self, instance: Instance) -> WaitQueue:
        """The invocations ``instance`` would take."""
        return self.queue

    # ---- shutdown ------------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """New invocations get 503 from now on (the daemon is stopping)."""
        self.accepting = False
        self.instances.stop_idle_reaper()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, and wait (up to ``deadline`` seconds) for accepted invocations to end."""
        self.stop_accepting()
        await self.draining.wait(deadline)

    def reject_queued(self) -> None:
        """The daemon stops: what still waits for an instance gets 503."""
        while (inv := self.queue.pop_live()) is not None:
            self.accepted.pop(inv.request_id, None)
            self._refuse(inv)

    # ---- replacing every instance --------------------------------------------------------------
    def retire_all(self) -> int:
        """Replace every instance (the function's code changed): idle and starting ones stop now, busy
        ones take no more work and stop once their invocations have ended; waiting and later
        invocations get fresh instances, nothing accepted is refused or failed. Runtimes started by
        hand are not ours to stop. Returns how many instances were told to stop."""
        return self.instances.retire_all()


class Drain:
    """The daemon's stop waits for every accepted invocation to end (``accepted``: the pool's, request
    id -> invocation not finished yet), or for a deadline."""

    __slots__ = ("loop", "accepted", "_done")

    def __init__(self, loop: asyncio.AbstractEventLoop, accepted: dict) -> None:
        self.loop = loop
        self.accepted = accepted
        self._done: Optional[asyncio.Future] = None

    async def wait(self, deadline: float) -> None:
        """Until no accepted invocation is left, or ``deadline`` seconds."""
        if not self.accepted:
            return
        self._done = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._done), deadline)
        except asyncio.TimeoutError:
            log.warning("%d invocations still running at shutdown", len(self.accepted))

    def check(self) -> None:
        """An accepted invocation may have ended: the wait is over if it was the last."""
        done = self._done
        if done is not None and not self.accepted and not done.done():
            done.set_result(None)
