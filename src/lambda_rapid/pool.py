"""The instance pool: which runtime instance runs which invocation, and what happens when things
go wrong. Spawning on demand, longest-idle dispatch, the bounded FIFO wait queue, execution
timeouts, crashes, init failures, idle scale-down and draining all live here.

The pool knows nothing about HTTP or AMQP. Front doors call :meth:`Pool.submit`; the Runtime API
calls :meth:`Pool.next`, :meth:`Pool.respond`, :meth:`Pool.error`, :meth:`Pool.init_error`; the
process layer calls :meth:`Pool.instance_exited`. Starting a process is delegated to ``launcher``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Callable, Optional

from . import errors
from .config import Config
from .histogram import Histogram
from .invocation import (
    CRASH,
    FUNCTION_ERROR,
    INIT_ERROR,
    OUTCOMES,
    REJECTED,
    SUCCESS,
    THROTTLED,
    TIMEOUT,
    Invocation,
    Result,
)

log = logging.getLogger("lambda_rapid.pool")

STARTING, READY, FAILED, DEAD = "starting", "ready", "failed", "dead"
RETURN_GRACE = 0.02  # seconds a queued invocation waits for a just-answered instance before spawning


class Waiter:
    """A runtime (or one of its workers) parked in GET /next; the Runtime API's subclass implements
    ``send``, which answers it with an invocation's event."""

    __slots__ = ("instance", "alive")

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.alive = True

    def send(self, inv: Invocation) -> None:
        raise NotImplementedError


class Instance:
    """One runtime process group (or a runtime started by hand, ``external``)."""

    __slots__ = ("number", "external", "state", "pid", "held", "waiters", "spawned_at", "ready_at",
                 "init_duration_ms", "init_failure", "init_timer", "idle_since", "kill_reason", "first_report",
                 "close", "drain", "peak_rss", "stop_timer", "log_stream", "returning")

    def __init__(self, number: int, external: bool = False) -> None:
        self.number = number
        self.external = external
        self.state = READY if external else STARTING
        self.pid = 0
        self.held: dict = {}  # request_id -> Invocation this instance is running
        self.waiters = 0  # its workers parked in /next
        self.spawned_at = time.monotonic()
        self.ready_at = 0.0
        self.init_duration_ms: Optional[float] = None
        self.init_failure: Optional[bytes] = None  # what the runtime posted to /init/error
        self.init_timer: Optional[asyncio.TimerHandle] = None
        self.idle_since = time.monotonic()
        self.kill_reason: Optional[str] = None
        self.first_report = True
        self.close: Optional[Callable[[], None]] = None  # releases the instance's listener
        self.drain: Optional[Callable[[], None]] = None  # reads output already written by the runtime
        self.peak_rss: Optional[Callable[[], int]] = None  # peak RSS of the group in bytes
        self.stop_timer: Optional[asyncio.TimerHandle] = None
        self.log_stream = ""
        self.returning = 0  # workers that answered and are on their way back to /next

    def __repr__(self) -> str:
        return f"Instance(#{self.number}, pid={self.pid}, {self.state})"


class Metrics:
    """Counters the pool keeps for /metrics; plain numbers, cheap to bump on the hot path."""

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.spawns = 0
        self.kills: dict = {}
        self.init_failures = 0
        self.durations = Histogram()
        self.observe = self.durations.observe


class Pool:
    def __init__(self, config: Config, launcher: Callable[[Instance], None],
                 killer: Callable[[Instance, int], None], output: Callable[[bytes], None]) -> None:
        self.config = config
        self.launcher = launcher  # starts the instance's processes; raises OSError on failure
        self.killer = killer  # signals the instance's process group
        self.output = output  # the daemon's stdout (report lines)
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.timeout = config.timeout
        self.idle: deque = deque()  # Waiters, longest-waiting first
        self.queue: deque = deque()  # Invocations waiting for an instance
        self.in_flight: dict = {}  # request_id -> Invocation handed to a runtime
        self.accepted: dict = {}  # request_id -> every Invocation not yet finished
        self.instances: list = []  # managed instances (not external ones)
        self.starting = 0
        self.returning = 0  # sum of Instance.returning: capacity that is about to be idle again
        self.busy = 0
        self.level_seen = [0.0] * (config.max_concurrency * config.runtime_max_concurrency + 1)
        self.accepting = True
        self.metrics = Metrics()
        self.reports = config.print_reports
        self.dispatch_hook: Optional[Callable[[Invocation, Waiter, Callable[[], None]], None]] = None
        # Says why an init timed out when something else than the runtime is to blame (extensions).
        self.explain_init_timeout: Optional[Callable[[Instance, str], Optional[bytes]]] = None
        self._drained: Optional[asyncio.Future] = None
        self._idle_timer: Optional[asyncio.TimerHandle] = None
        self._late_spawn: Optional[asyncio.TimerHandle] = None
        # Every invocation has the same timeout, so deadlines come in start (and queue) order: one
        # timer for the oldest of each, instead of a timer per invocation, keeps the hot path lean.
        self.running: deque = deque()  # invocations in the order they were handed to a runtime
        self._run_timer: Optional[asyncio.TimerHandle] = None
        self._queue_timer: Optional[asyncio.TimerHandle] = None

    # ---- front doors ---------------------------------------------------------------------------
    def is_active(self, request_id: str) -> bool:
        return request_id in self.accepted

    def submit(self, inv: Invocation) -> None:
        """Run ``inv`` as soon as an instance is free; its ``on_done`` gets the Result."""
        if not self.accepting:
            self._reject(inv, REJECTED, errors.SERVICE, "The daemon is shutting down.")
            return
        self.accepted[inv.request_id] = inv
        idle = self.idle
        while idle:
            waiter = idle.popleft()
            if waiter.alive:
                waiter.instance.waiters -= 1
                self._start(inv, waiter)
                return
        spawn = self._can_spawn(extra=1)
        if len(self.queue) >= self.config.max_queued and not spawn:
            del self.accepted[inv.request_id]
            self._reject(inv, THROTTLED, errors.TOO_MANY_REQUESTS, "Rate Exceeded.")
            return
        self._enqueue(inv)
        if spawn:
            self._spawn()
        elif self.returning and self._late_spawn is None and len(self.instances) < self.config.max_concurrency:
            # An instance that just answered is expected back in /next within microseconds; only if
            # it is not back soon is a new instance worth its cold start.
            self._late_spawn = self.loop.call_later(RETURN_GRACE, self._spawn_if_still_waiting)

    def abandon(self, inv: Invocation) -> None:
        """The caller went away: drop it if it has not started; a running one runs to its end."""
        inv.on_done = None
        if inv.instance is None and not inv.done:
            try:
                self.queue.remove(inv)
            except ValueError:
                return
            inv.done = True
            self.accepted.pop(inv.request_id, None)

    def _reject(self, inv: Invocation, outcome: str, api_error: errors.ApiError, message: str) -> None:
        self.metrics.outcomes[outcome] += 1
        body = errors.throttled_body() if api_error is errors.TOO_MANY_REQUESTS else api_error.body(message)
        inv.finish(Result(outcome, body, api_error=api_error))

    def _enqueue(self, inv: Invocation) -> None:
        inv.queued_at = time.monotonic()
        self.queue.append(inv)
        if self._queue_timer is None and not inv.is_event:
            self._queue_timer = self.loop.call_later(self.timeout, self._expire_queue)

    def _expire_queue(self) -> None:
        """Invocations that waited a whole function timeout for an instance get 429 (Events wait on)."""
        self._queue_timer = None
        now = time.monotonic()
        limit = now - self.timeout
        queue = self.queue
        if queue and queue[0].queued_at <= limit:
            expired = [i for i in queue if i.queued_at <= limit and not i.is_event and not i.done]
            if expired:
                gone = set(map(id, expired))
                self.queue = queue = deque(i for i in queue if id(i) not in gone and not i.done)
                for inv in expired:
                    self.accepted.pop(inv.request_id, None)
                    self._reject(inv, THROTTLED, errors.TOO_MANY_REQUESTS, "Rate Exceeded.")
        for inv in queue:
            if not inv.is_event and not inv.done:
                self._queue_timer = self.loop.call_later(max(inv.queued_at + self.timeout - now, 0.001),
                                                         self._expire_queue)
                break

    # ---- dispatch ------------------------------------------------------------------------------
    def _start(self, inv: Invocation, waiter: Waiter) -> None:
        instance = waiter.instance
        inv.instance = instance
        instance.held[inv.request_id] = inv
        self.in_flight[inv.request_id] = inv
        now = time.monotonic()
        inv.started_at = now
        inv.deadline_ms = int((time.time() + self.timeout) * 1000)
        self.running.append(inv)
        if self._run_timer is None:
            self._run_timer = self.loop.call_later(self.timeout, self._expire_running)
        self.busy += 1
        if self.busy == len(self.level_seen):
            self.level_seen.append(now)  # runtimes started by hand are not bounded by MAX_CONCURRENCY
        else:
            self.level_seen[self.busy] = now
        if inv.tail or self.reports:
            start = f"START RequestId: {inv.request_id} Version: {self.config.function_version}\n".encode()
            if self.reports:
                self.output(start)
            if inv.tail:
                inv.log = bytearray(start)
        hook = self.dispatch_hook
        if hook is None:
            waiter.send(inv)
        else:
            hook(inv, waiter, lambda: waiter.send(inv))

    def _release(self, inv: Invocation) -> None:
        instance = inv.instance
        instance.held.pop(inv.request_id, None)
        if instance.kill_reason is None and instance.state == READY and not instance.external:
            instance.returning += 1
            self.returning += 1
        now = time.monotonic()
        self.level_seen[self.busy] = now
        self.busy -= 1
        instance.idle_since = time.monotonic()
        self.accepted.pop(inv.request_id, None)
        self.metrics.observe(now - inv.started_at)

    def _finish(self, inv: Invocation, result: Result) -> None:
        self.metrics.outcomes[result.outcome] += 1
        if inv.tail or self.reports:
            self._report(inv, result)
        inv.finish(result)
        running = self.running
        while running and running[0].done:
            running.popleft()
        if self._drained is not None and not self.accepted:
            self._set_drained()

    def _report(self, inv: Invocation, result: Result) -> None:
        instance = inv.instance
        if instance.drain is not None:
            instance.drain()  # lines the runtime printed before it answered belong to this invocation
        duration = (time.monotonic() - inv.started_at) * 1000
        memory = ""
        if instance.peak_rss is not None:
            memory = f"\tMax Memory Used: {max(1, round(instance.peak_rss() / 1048576))} MB"
        init = ""
        if instance.first_report and instance.init_duration_ms is not None:
            init = f"\tInit Duration: {instance.init_duration_ms:.2f} ms"
        instance.first_report = False
        lines = (f"END RequestId: {inv.request_id}\n"
                 f"REPORT RequestId: {inv.request_id}\tDuration: {duration:.2f} ms\t"
                 f"Billed Duration: {max(1, math.ceil(duration))} ms\tMemory Size: {self.config.memory_size} MB"
                 f"{memory}{init}\n").encode()
        if self.reports:
            self.output(lines)
        if inv.log is not None:
            inv.log += lines
            result.log_tail = bytes(inv.log[-4096:])

    # ---- Runtime API ---------------------------------------------------------------------------
    def next(self, waiter: Waiter) -> None:
        """A runtime asks for work (GET /next)."""
        instance = waiter.instance
        if instance.state in (FAILED, DEAD) or instance.kill_reason is not None:
            waiter.alive = False
            return
        if instance.returning:
            instance.returning -= 1
            self.returning -= 1
        elif instance.state == STARTING:
            self._ready(instance)
        queue = self.queue
        while queue:
            inv = queue.popleft()
            if not inv.done:
                self._start(inv, waiter)
                return
        instance.waiters += 1
        self.idle.append(waiter)
        if self._drained is not None and not self.accepted:
            self._set_drained()

    def waiter_gone(self, waiter: Waiter) -> None:
        """The runtime's /next connection closed before it was given work."""
        if waiter.alive:
            waiter.alive = False
            waiter.instance.waiters -= 1

    def holder(self, request_id: str) -> Optional[Instance]:
        """The instance running ``request_id``, or None if no runtime holds it."""
        inv = self.in_flight.get(request_id)
        return None if inv is None else inv.instance

    def respond(self, request_id: str, body: bytes) -> bool:
        inv = self.in_flight.pop(request_id, None)
        if inv is None:
            return False
        self._release(inv)
        self._finish(inv, Result(SUCCESS, body))
        return True

    def error(self, request_id: str, body: bytes, error_type: Optional[str]) -> bool:
        inv = self.in_flight.pop(request_id, None)
        if inv is None:
            return False
        self._release(inv)
        self._finish(inv, Result(FUNCTION_ERROR, errors.runtime_error_body(body, error_type), True))
        return True

    def response_too_large(self, request_id: str, limit: int = errors.RESPONSE_LIMIT) -> bool:
        inv = self.in_flight.pop(request_id, None)
        if inv is None:
            return False
        self._release(inv)
        self._finish(inv, Result(FUNCTION_ERROR, errors.response_too_large_error(limit), True))
        return True

    def init_error(self, instance: Instance, body: bytes, error_type: Optional[str]) -> None:
        """The runtime failed its init. It is expected to exit; we make sure it does."""
        log.warning("instance #%d reported an init error: %s", instance.number, body[:500])
        if instance.external:
            victim = self._pop_queued()
            if victim is not None:
                self._fail_init(victim, errors.runtime_error_body(body, error_type))
            return
        instance.init_failure = errors.runtime_error_body(body, error_type)
        if instance.state == STARTING:
            # Answer now; the exit that follows only cleans up.
            self._init_failed(instance, instance.init_failure)
        self.kill(instance, "init_error", grace=0.5)

    # ---- instances -----------------------------------------------------------------------------
    def _can_spawn(self, extra: int = 0, count_returning: bool = True) -> bool:
        coming = self.starting * self.config.runtime_max_concurrency
        if count_returning:
            coming += self.returning
        return len(self.instances) < self.config.max_concurrency and coming < len(self.queue) + extra

    def _spawn_if_still_waiting(self) -> None:
        self._late_spawn = None
        while self.queue and self._can_spawn(count_returning=False):
            if self._spawn() is None:
                break

    def _free_number(self) -> int:
        used = {i.number for i in self.instances}
        n = 0
        while n in used:
            n += 1
        return n

    def _spawn(self) -> Optional[Instance]:
        instance = Instance(self._free_number())
        self.instances.append(instance)
        self.starting += 1
        self.metrics.spawns += 1
        try:
            self.launcher(instance)
        except OSError as e:
            log.error("could not start the runtime: %s", e)
            self.instances.remove(instance)
            self.starting -= 1
            instance.state = DEAD
            self.metrics.init_failures += 1
            victim = self._pop_queued()
            if victim is not None:
                self._fail_init(victim, errors.spawn_error(victim.request_id, str(e)))
            return None
        instance.init_timer = self.loop.call_later(self.config.init_timeout, self._init_timed_out, instance)
        return instance

    def spawn_to_minimum(self) -> None:
        while len(self.instances) < self.config.min_instances and self.accepting:
            if self._spawn() is None:
                break

    def _fill(self) -> None:
        """Start instances for invocations that are waiting and have none coming."""
        while self.queue and self._can_spawn():
            if self._spawn() is None and not self.queue:
                break

    def _ready(self, instance: Instance) -> None:
        instance.state = READY
        self.starting -= 1
        instance.ready_at = time.monotonic()
        instance.init_duration_ms = (instance.ready_at - instance.spawned_at) * 1000
        if instance.init_timer is not None:
            instance.init_timer.cancel()
            instance.init_timer = None
        log.debug("instance #%d ready after %.1f ms", instance.number, instance.init_duration_ms)

    def _init_timed_out(self, instance: Instance) -> None:
        instance.init_timer = None
        if instance.state != STARTING:
            return
        log.error("instance #%d did not reach /next within %.2f s; killing it", instance.number,
                  self.config.init_timeout)
        victim = self.queue[0] if self.queue else None
        body = errors.init_timeout_error(victim.request_id if victim else "", self.config.init_timeout)
        if self.explain_init_timeout is not None:
            body = self.explain_init_timeout(instance, victim.request_id if victim else "") or body
        self._init_failed(instance, body)
        self.kill(instance, "init_timeout")

    def _init_failed(self, instance: Instance, body: bytes) -> None:
        """A starting instance will never be ready: answer one waiting invocation with why."""
        if instance.state != STARTING:
            return
        instance.state = FAILED  # out of service; its process may live until it is reaped
        self.starting -= 1
        self.metrics.init_failures += 1
        if instance.init_timer is not None:
            instance.init_timer.cancel()
            instance.init_timer = None
        victim = self._pop_queued()
        if victim is not None:
            self._fail_init(victim, body)

    def _pop_queued(self) -> Optional[Invocation]:
        queue = self.queue
        while queue:
            inv = queue.popleft()
            if not inv.done:
                return inv
        return None

    def _fail_init(self, inv: Invocation, body: bytes) -> None:
        self.accepted.pop(inv.request_id, None)
        self.metrics.outcomes[INIT_ERROR] += 1
        inv.finish(Result(INIT_ERROR, body, True))
        if self._drained is not None and not self.accepted:
            self._set_drained()

    def _expire_running(self) -> None:
        self._run_timer = None
        now = time.monotonic()
        running = self.running
        while running:
            inv = running[0]
            if inv.done:
                running.popleft()
            elif inv.started_at + self.timeout <= now + 0.0005:
                running.popleft()
                self._timed_out(inv)
            else:
                self._run_timer = self.loop.call_later(inv.started_at + self.timeout - now, self._expire_running)
                return

    def _timed_out(self, inv: Invocation) -> None:
        if self.in_flight.pop(inv.request_id, None) is None:
            return
        instance = inv.instance
        self._release(inv)
        log.info("%s Task timed out after %.2f seconds", inv.request_id, self.timeout)
        self._finish(inv, Result(TIMEOUT, errors.timeout_error(inv.request_id, self.timeout), True))
        if not instance.external:
            self.kill(instance, "timeout")

    def kill(self, instance: Instance, reason: str, grace: float = 0.0) -> None:
        """Take the instance out of service and end its process group (after ``grace`` seconds)."""
        if instance.state == DEAD:
            return
        if instance.kill_reason is None:
            instance.kill_reason = reason
            self.metrics.kills[reason] = self.metrics.kills.get(reason, 0) + 1
        self._forget_capacity(instance)
        if grace > 0:
            instance.stop_timer = self.loop.call_later(grace, self.killer, instance, 9)
        else:
            self.killer(instance, 9)

    def _forget_capacity(self, instance: Instance) -> None:
        """The instance will take no more work: drop its parked and returning workers."""
        if instance.waiters:
            for waiter in self.idle:
                if waiter.instance is instance:
                    waiter.alive = False
            instance.waiters = 0
        self.returning -= instance.returning
        instance.returning = 0

    def instance_exited(self, instance: Instance, status: str) -> None:
        """The instance's runtime process has exited (reaped)."""
        if instance.state == DEAD:
            return
        was_starting = instance.state == STARTING
        if was_starting:
            self._init_failed(instance, instance.init_failure or errors.exit_error(
                self.queue[0].request_id if self.queue else "", status))
        instance.state = DEAD
        if instance.init_timer is not None:
            instance.init_timer.cancel()
        if instance.stop_timer is not None:
            instance.stop_timer.cancel()
        if instance in self.instances:
            self.instances.remove(instance)
        self._forget_capacity(instance)
        if instance.kill_reason is None:
            self.metrics.kills["exited"] = self.metrics.kills.get("exited", 0) + 1
            log.warning("instance #%d (pid %d) exited: %s", instance.number, instance.pid, status)
        if instance.drain is not None:
            instance.drain()
        for inv in list(instance.held.values()):
            if self.in_flight.pop(inv.request_id, None) is not None:
                self._release(inv)
                self._finish(inv, Result(CRASH, errors.exit_error(inv.request_id, status), True))
        instance.held.clear()
        if instance.close is not None:
            instance.close()
        self._fill()
        if self._drained is not None and not self.accepted:
            self._set_drained()

    # ---- idle scale-down -----------------------------------------------------------------------
    def start_idle_reaper(self) -> None:
        period = min(max(self.config.idle_timeout / 4, 0.05), 5.0)

        def tick() -> None:
            self.stop_surplus()
            self._idle_timer = self.loop.call_later(period, tick)

        self._idle_timer = self.loop.call_later(period, tick)

    def needed_instances(self) -> int:
        """How many instances the load needed within the last idle timeout (0 if none)."""
        horizon = time.monotonic() - self.config.idle_timeout
        seen = self.level_seen
        level = self.busy
        for k in range(len(seen) - 1, level, -1):
            if seen[k] > horizon and seen[k] > 0:
                level = k
                break
        per_instance = self.config.runtime_max_concurrency
        return -(-level // per_instance)

    def stop_surplus(self) -> None:
        keep = max(self.needed_instances(), self.config.min_instances)
        live = [i for i in self.instances if i.state == READY and i.kill_reason is None]
        surplus = len(live) - keep
        if surplus <= 0:
            return
        # Demand decides how many stay, not each instance's own idle time: with longest-idle-first
        # dispatch a steady light load touches every instance, so none would ever sit idle long enough.
        candidates = sorted((i for i in live if not i.held), key=lambda i: i.idle_since)
        for instance in candidates[:surplus]:
            log.info("stopping idle instance #%d (pid %d)", instance.number, instance.pid)
            self.kill(instance, "idle")

    # ---- shutdown ------------------------------------------------------------------------------
    async def drain(self, deadline: float) -> None:
        """Stop accepting, and wait (up to ``deadline`` seconds) for accepted invocations to end."""
        self.accepting = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.accepted:
            return
        self._drained = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), deadline)
        except asyncio.TimeoutError:
            log.warning("%d invocations still running at shutdown", len(self.accepted))

    def _set_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def reject_queued(self) -> None:
        while self.queue:
            inv = self.queue.popleft()
            if not inv.done:
                self.accepted.pop(inv.request_id, None)
                self._reject(inv, REJECTED, errors.SERVICE, "The daemon is shutting down.")

