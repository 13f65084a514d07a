"""The pool of a tenant-isolated function (``TENANT_ISOLATION_MODE=PER_TENANT``, AWS's TenancyConfig):
an instance serves one tenant for its whole life.

AWS: "When a function using tenant isolation mode receives an invoke with a tenant identifier,
Lambda first attempts to locate an available execution environment associated with that tenant
identifier. If no execution environments exist, Lambda creates and assigns a new execution
environment to that tenant" ("Tenant isolation", AWS Lambda Developer Guide); "the execution
environment used for a particular tenant is never reused for other tenants" (the feature's launch
post on the AWS Compute Blog).

The rules of ``Pool`` are kept per tenant, in a ``Lane`` (the tenant's parked workers and its wait
queue): an invocation goes to a parked worker of its own tenant, else waits in its tenant's queue,
and an instance is spawned for that tenant when its waiting invocations outnumber the capacity on
its way. ``MAX_CONCURRENCY`` bounds the instances of all tenants together; when it is reached and a
tenant with waiting invocations has no instance at all, the longest-idle instance of another tenant
is stopped (``StopReason.OTHER_TENANT``), and a freed slot goes first to the tenants with no
instance. Each instance stops after a whole idle timeout of its own (``InstanceSet.stop_idle``).

A runtime started by hand has no tenant until it runs an invocation; from then on it is that
tenant's. The function's tenancy is known when the daemon is built, so the pool of a function that
is not tenant-isolated is the plain ``Pool``, its hot path untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Dict, Optional

from .config import Config
from .deadlines import WaitQueue
from .hooks import NO_SANDBOX, SandboxHooks
from .instances import READY, RETURN_GRACE, STARTING, STOPPING, Instance, RuntimeProcess, StopReason
from .invocation import Invocation
from .pool import Pool, Waiter, take_parked

log = logging.getLogger(__name__)


class Lane:
    """One tenant's share of the pool: its workers parked in ``/next`` and its waiting invocations."""

    __slots__ = ("tenant", "idle", "queue")

    def __init__(self, tenant: str, queue: WaitQueue) -> None:
        self.tenant = tenant
        self.idle: deque = deque()  # Waiters, longest-waiting first
        self.queue = queue


class AllLanes:
    """Every tenant's wait queue seen as one (its length is the pool's queue depth)."""

    __slots__ = ("lanes",)

    def __init__(self, lanes: Dict[str, Lane]) -> None:
        self.lanes = lanes

    def __len__(self) -> int:
        return sum(len(lane.queue) for lane in self.lanes.values())

    def __bool__(self) -> bool:
        return any(lane.queue for lane in self.lanes.values())

    def pop_live(self) -> Optional[Invocation]:
        """An invocation still waiting in any lane (the daemon's exit refuses them all), or None."""
        for lane in self.lanes.values():
            inv = lane.queue.pop_live()
            if inv is not None:
                return inv
        return None


class TenantPool(Pool):
    def __init__(self, config: Config, launcher: Callable[[Instance], RuntimeProcess],
                 killer: Callable[[Instance, int], None], output: Callable[[bytes], None],
                 hooks: SandboxHooks = NO_SANDBOX) -> None:
        self.lanes: Dict[str, Lane] = {}
        super().__init__(config, launcher, killer, output, hooks)
        self._nothing = WaitQueue(self.loop, config.timeout, self._throttle)  # stays empty
        self._late_refill: Optional[asyncio.TimerHandle] = None

    def _wait_queue(self) -> AllLanes:
        return AllLanes(self.lanes)

    def _lane(self, tenant: str) -> Lane:
        lane = self.lanes.get(tenant)
        if lane is None:
            lane = self.lanes[tenant] = Lane(tenant, WaitQueue(self.loop, self.config.timeout, self._throttle))
        return lane

    # ---- front doors ---------------------------------------------------------------------------
    def submit(self, inv: Invocation) -> None:
        if not self.accepting:
            return self._refuse(inv)
        self.accepted[inv.request_id] = inv
        tenant = inv.tenant_id
        lane = self.lanes.get(tenant)
        waiter = self._idle_worker(lane, tenant)
        if waiter is not None:
            self._start(inv, waiter)
            return
        starting, returning = self._coming(tenant)
        waiting = 1 + (len(lane.queue) if lane is not None else 0)
        short = waiting > starting + returning
        room = self.instances.has_room()
        if len(self.queue) >= self.config.max_queued and not (short and room):
            return self._throttle(inv)
        if lane is None:
            lane = self._lane(tenant)
        lane.queue.push(inv)
        if short:
            if room:
                self._spawn(lane)
            else:
                self._make_room()
        elif waiting > starting:
            self._spawn_soon()  # only workers on their way back to /next cover it: see Pool.submit

    def _idle_worker(self, lane: Optional[Lane], tenant: str) -> Optional[Waiter]:
        """A parked worker of ``tenant``, else one of a runtime started by hand that has no tenant
        yet (it becomes ``tenant``'s); None if there is neither."""
        waiter = None if lane is None else take_parked(lane.idle)
        if waiter is None:
            waiter = take_parked(self.idle)
            if waiter is not None:
                waiter.instance.tenant = tenant
        return waiter

    def _queue_of(self, inv: Invocation) -> deque:
        lane = self.lanes.get(inv.tenant_id)
        return self._nothing if lane is None else lane.queue

    # ---- Runtime API ---------------------------------------------------------------------------
    def next(self, waiter: Waiter) -> None:
        if not self._arrived(waiter):
            return
        instance = waiter.instance
        tenant = instance.tenant
        lane = self._oldest_waiting() if tenant is None else self.lanes.get(tenant)
        if lane is not None and lane.queue:
            inv = lane.queue.pop_live()
            if inv is not None:
                instance.tenant = inv.tenant_id
                self._start(inv, waiter)
                return
        instance.waiters += 1
        waiter.parked = True
        (self.idle if tenant is None else self._lane(tenant).idle).append(waiter)
        self._make_room()  # this instance may be the idle one another tenant waits for
        self._check_drained()

    def _oldest_waiting(self) -> Optional[Lane]:
        """The lane whose oldest waiting invocation has waited longest (for a runtime with no tenant)."""
        lanes = [lane for lane in self.lanes.values() if lane.queue]
        return min(lanes, key=lambda lane: lane.queue[0].queued_at) if lanes else None

    # ---- instances -----------------------------------------------------------------------------
    def _coming(self, tenant: str) -> tuple:
        """(workers of instances starting for ``tenant``, its workers on their way back to /next)."""
        starting = returning = 0
        for instance in self.instances:
            if instance.tenant == tenant:
                if instance.state is STARTING:
                    starting += self.config.runtime_max_concurrency
                elif instance.state is READY:
                    returning += instance.returning
        return starting, returning

    def _has_instance(self, tenant: str) -> bool:
        return any(i.tenant == tenant and (i.state is STARTING or i.state is READY) for i in self.instances)

    def _spawn(self, lane: Lane) -> Optional[Instance]:
        instance = self.instances.spawn(lane.tenant)
        if instance is not None:
            log.info("instance #%d (pid %d) serves tenant %r", instance.number, instance.pid, lane.tenant)
        return instance

    def _spawn_soon(self) -> None:
        if self._late_refill is None and self.instances.has_room():
            self._late_refill = self.loop.call_later(RETURN_GRACE, self._refill_late)

    def _refill_late(self) -> None:
        self._late_refill = None
        self._refill(count_returning=False)

    def _refill(self, count_returning: bool = True) -> None:
        """Start instances, while there is room, for the tenants whose waiting invocations have
        none coming: those with no instance at all first, then by how long they have waited. When
        there is no room, make some."""
        self._forget_empty_lanes()
        while self.instances.has_room():
            lane = self._neediest(count_returning)
            if lane is None:
                break
            # Each turn covers one more of the lane's invocations, or (the instance could not
            # start) answers one of them with why: the loop ends.
            self._spawn(lane)
        self._make_room()

    def _neediest(self, count_returning: bool) -> Optional[Lane]:
        best, best_key = None, None
        for lane in self.lanes.values():
            if not lane.queue:
                continue
            starting, returning = self._coming(lane.tenant)
            if len(lane.queue) <= starting + (returning if count_returning else 0):
                continue
            key = (self._has_instance(lane.tenant), lane.queue[0].queued_at)
            if best_key is None or key < best_key:
                best, best_key = lane, key
        return best

    def _make_room(self) -> None:
        """At MAX_CONCURRENCY, stop the longest-idle instance of another tenant for each tenant that
        has waiting invocations and no instance, unless instances already stopping free enough slots."""
        instances = self.instances
        if instances.has_room() or not self.queue:
            return
        needy = {lane.tenant for lane in self.lanes.values()
                 if lane.queue and not self._has_instance(lane.tenant)
                 and not any(w.alive for w in lane.idle)}
        wanted = len(needy) - instances.count(STOPPING)
        if wanted <= 0:
            return
        idle = sorted((i for i in instances if i.state is READY and not i.held and not i.returning
                       and i.tenant not in needy), key=lambda i: i.idle_since)
        for victim in idle[:wanted]:
            log.info("stopping idle instance #%d (pid %d) of tenant %r: its slot is wanted by another tenant",
                     victim.number, victim.pid, victim.tenant)
            instances.kill(victim, StopReason.OTHER_TENANT)

    def _forget_empty_lanes(self) -> None:
        """Drop the lanes of tenants with nothing waiting, nothing parked and no instance."""
        live = {i.tenant for i in self.instances if i.state is STARTING or i.state is READY}
        for tenant in [t for t, lane in self.lanes.items()
                       if not lane.queue and t not in live and not any(w.alive for w in lane.idle)]:
            del self.lanes[tenant]

    def _parked_of(self, instance: Instance) -> deque:
        if instance.tenant is None:
            return self.idle
        lane = self.lanes.get(instance.tenant)
        return self._nothing if lane is None else lane.idle

    def _waiting_for(self, instance: Instance) -> WaitQueue:
        lane = self._oldest_waiting() if instance.tenant is None else self.lanes.get(instance.tenant)
        return self._nothing if lane is None else lane.queue
