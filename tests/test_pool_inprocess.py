"""The pool's rules in-process: the real Pool built from recording collaborators (launcher, killer,
output, hooks) and runtimes played by the test. No process, no socket: each rule is checked
exactly, including the ones end-to-end tests can only reach through timing.

Timers (init deadline, execution timeout, queue expiry) are the pool's own, on a real event loop
with short timeouts; tests wait for their effect with a bounded poll, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import List, Optional

import pytest

from lambda_rapid import config as config_module
from lambda_rapid.instances import DEAD, READY, STARTING, STOPPING, IllegalTransition, Instance, StopReason
from lambda_rapid.invocation import CRASH, INIT_ERROR, SUCCESS, THROTTLED, TIMEOUT, Invocation, Result
from lambda_rapid.pool import Pool, Waiter
from lambda_rapid.reports import Report
from lambda_rapid.tenant_pool import TenantPool


class Runtime(Waiter):
    """One GET /next of a runtime the test plays: records the invocation it is given."""

    __slots__ = ("got",)

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance)
        self.got: Optional[Invocation] = None

    def send(self, inv: Invocation) -> None:
        self.got = inv


class FakeProcess:
    """An instance's runtime process: output it has "written" reaches the daemon only when read."""

    def __init__(self, pid: int, deliver) -> None:
        self.pid = pid
        self.unread: List[bytes] = []
        self.deliver = deliver

    def write(self, data: bytes) -> None:
        self.unread.append(data)

    def read_output(self) -> None:
        while self.unread:
            self.deliver(self.unread.pop(0))

    def peak_rss(self) -> int:
        return 41 * 1048576


class Hooks:
    """Sandbox hooks that ask for every Report and record what they are given."""

    def __init__(self) -> None:
        self.reports: List[tuple] = []  # (request id, outcome, Report)

    def hold_next(self, waiter) -> bool:
        return False

    def dispatching(self, inv, instance) -> bool:
        return True

    def finished(self, inv, result, report) -> None:
        self.reports.append((inv.request_id, result.outcome, report))

    def init_timeout_error(self, instance, request_id):
        return None


class Harness:
    def __init__(self, hooks=None, **env) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        settings = {"PATH": "/usr/bin", **{k: str(v) for k, v in env.items()}}
        self.config = config_module.load([sys.executable, "-m", "awslambdaric", "echo.handler"], settings)
        self.launched: List[Instance] = []
        self.killed: List[tuple] = []  # (instance number, signal)
        self.stdout: List[bytes] = []
        self.fail_launch: Optional[OSError] = None
        kwargs = {} if hooks is None else {"hooks": hooks}
        pool_class = TenantPool if self.config.tenant_isolated else Pool  # as the daemon chooses
        self.pool = pool_class(self.config, self.launch, self.kill, self.stdout.append, **kwargs)

    def close(self) -> None:
        self.loop.close()

    # ---- collaborators -------------------------------------------------------------------------
    def launch(self, instance: Instance) -> FakeProcess:
        if self.fail_launch is not None:
            raise self.fail_launch
        self.launched.append(instance)
        return FakeProcess(1000 + len(self.launched), lambda data: self.output(instance, data))

    def kill(self, instance: Instance, sig: int) -> None:
        self.killed.append((instance.number, sig))

    def output(self, instance: Instance, data: bytes) -> None:
        """What the daemon does with a runtime's output: its stdout, and the log of what it runs."""
        self.stdout.append(data)
        for inv in instance.held.values():
            inv.add_log(data)

    # ---- playing the front door and the runtimes -----------------------------------------------
    def invoke(self, payload: bytes = b"{}", tail: bool = False, kind: str = "RequestResponse",
               tenant: Optional[str] = None) -> List[Result]:
        results: List[Result] = []
        inv = Invocation(f"req-{time.monotonic_ns()}", payload, arn=self.config.function_arn, tail=tail,
                         invocation_type=kind, on_done=lambda i, r: results.append(r), tenant_id=tenant)
        self.pool.submit(inv)
        return results

    def next(self, instance: Instance) -> Runtime:
        runtime = Runtime(instance)
        self.pool.next(runtime)
        return runtime

    def run_until(self, predicate, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the pool")
            self.loop.run_until_complete(asyncio.sleep(0.005))


@pytest.fixture
def harness():
    made: List[Harness] = []

    def make(hooks=None, **env) -> Harness:
        h = Harness(hooks, **env)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def warm(h: Harness, count: int) -> List[Instance]:
    """``count`` instances started and parked in /next, in that order."""
    while len(h.launched) < count:
        h.pool.instances.spawn()
    for instance in h.launched[:count]:
        h.next(instance)
    return h.launched[:count]


# ---- dispatch ------------------------------------------------------------------------------------

def test_dispatch_goes_to_the_longest_idle_instance(harness):
    h = harness(MAX_CONCURRENCY=3)
    a, b, c = warm(h, 3)
    order = []
    for _ in range(6):
        results = h.invoke()
        (inv,) = [i for inst in (a, b, c) for i in inst.held.values()]
        order.append(inv.instance.number)
        assert h.pool.respond(inv.request_id, b'"ok"')
        h.next(inv.instance)  # back in /next: now the most recently idle
        assert results[0].outcome == SUCCESS
    assert order == [a.number, b.number, c.number] * 2


def test_an_invocation_with_no_idle_instance_spawns_one_up_to_max_concurrency(harness):
    h = harness(MAX_CONCURRENCY=2)
    h.invoke()
    h.invoke()
    h.invoke()
    assert len(h.launched) == 2  # the third waits: no room for another instance
    assert len(h.pool.queue) == 3
    runtime = h.next(h.launched[0])
    assert runtime.got is not None and h.launched[0].state is READY
    assert len(h.pool.queue) == 2


def test_a_just_answered_instance_is_waited_for_instead_of_a_cold_start(harness):
    h = harness(MAX_CONCURRENCY=2)
    (instance,) = warm(h, 1)
    h.invoke()
    (inv,) = instance.held.values()
    h.pool.respond(inv.request_id, b"1")  # on its way back to /next
    second = h.invoke()
    assert len(h.launched) == 1 and len(h.pool.queue) == 1
    h.next(instance)
    assert second == [] and len(h.pool.queue) == 0 and len(instance.held) == 1
    h.loop.run_until_complete(asyncio.sleep(0.05))  # past the grace: nothing to start any more
    assert len(h.launched) == 1


def test_the_queue_is_bounded_and_beyond_it_callers_get_429(harness):
    h = harness(MAX_CONCURRENCY=1, MAX_QUEUED_INVOCATIONS=1)
    first = h.invoke()  # starts the only instance and waits for it
    second = h.invoke()
    assert first == []
    assert [r.outcome for r in second] == [THROTTLED]
    assert second[0].api_error.status == 429
    assert h.pool.metrics.outcomes[THROTTLED] == 1


def test_an_invocation_that_waits_a_whole_timeout_gets_429_but_an_event_waits_on(harness):
    h = harness(MAX_CONCURRENCY=1, AWS_LAMBDA_FUNCTION_TIMEOUT="0.1", AWS_LAMBDA_INIT_TIMEOUT="30")
    waiting = h.invoke()
    event = h.invoke(kind="Event")
    h.run_until(lambda: waiting)
    assert waiting[0].outcome == THROTTLED
    assert event == [] and len(h.pool.queue) == 1
    runtime = h.next(h.launched[0])
    assert runtime.got.is_event


# ---- failures ------------------------------------------------------------------------------------

def test_timeout_ends_the_invocation_and_kills_the_instance(harness):
    h = harness(AWS_LAMBDA_FUNCTION_TIMEOUT="0.05")
    (instance,) = warm(h, 1)
    results = h.invoke()
    (inv,) = instance.held.values()
    h.run_until(lambda: results)
    assert results[0].outcome == TIMEOUT and results[0].function_error
    assert json.loads(results[0].body)["errorType"] == "Sandbox.Timedout"
    assert h.killed == [(instance.number, signal.SIGKILL)]
    assert instance.state is STOPPING and instance.stop_reason is StopReason.TIMEOUT
    assert not h.pool.respond(inv.request_id, b"late")  # too late: ignored
    assert h.pool.metrics.kills == {"timeout": 1}


def test_a_crash_fails_the_running_invocation_at_once_and_a_fresh_instance_takes_the_queue(harness):
    h = harness(MAX_CONCURRENCY=1)
    (instance,) = warm(h, 1)
    running = h.invoke()
    queued = h.invoke()
    h.pool.failures.instance_exited(instance, "exit status 1")
    assert [r.outcome for r in running] == [CRASH]
    error = json.loads(running[0].body)
    assert error["errorType"] == "Runtime.ExitError" and "exit status 1" in error["errorMessage"]
    assert instance.state is DEAD and queued == []
    assert len(h.launched) == 2  # started for the invocation still waiting
    assert h.next(h.launched[1]).got is not None


def test_an_init_error_answers_one_waiting_invocation_and_the_next_gets_a_fresh_init(harness):
    h = harness(MAX_CONCURRENCY=1)
    first, second = h.invoke(), h.invoke()
    (instance,) = h.launched
    h.pool.failures.init_error(instance, b'{"errorType":"Runtime.ImportModuleError","errorMessage":"no module"}', None)
    assert [r.outcome for r in first] == [INIT_ERROR] and second == []
    assert json.loads(first[0].body)["errorType"] == "Runtime.ImportModuleError"
    assert instance.state is STOPPING and instance.stop_reason is StopReason.INIT_ERROR
    assert h.killed == []  # it is given a moment to exit by itself
    h.run_until(lambda: h.killed)
    assert h.killed == [(instance.number, signal.SIGKILL)]
    h.pool.failures.instance_exited(instance, "signal: killed")
    assert second == [] and len(h.launched) == 2  # a fresh init for the one still waiting


def test_an_init_timeout_answers_one_waiting_invocation(harness):
    h = harness(AWS_LAMBDA_INIT_TIMEOUT="0.05", AWS_LAMBDA_FUNCTION_TIMEOUT="30")
    results = h.invoke()
    h.run_until(lambda: results)
    assert results[0].outcome == INIT_ERROR
    assert "Init phase timed out after 0.05 seconds" in json.loads(results[0].body)["errorMessage"]
    assert h.killed == [(h.launched[0].number, signal.SIGKILL)]


def test_a_spawn_failure_answers_one_waiting_invocation(harness):
    h = harness()
    h.fail_launch = PermissionError(13, "Permission denied")
    results = h.invoke()
    assert [r.outcome for r in results] == [INIT_ERROR]
    assert json.loads(results[0].body)["errorType"] == "Runtime.InvalidEntrypoint"
    assert len(h.pool.instances) == 0 and h.pool.metrics.init_failures == 1


def test_an_instance_exiting_during_init_answers_one_waiting_invocation(harness):
    h = harness()
    results = h.invoke()
    h.pool.failures.instance_exited(h.launched[0], "exit status 2")
    assert json.loads(results[0].body)["errorType"] == "Runtime.ExitError"
    assert h.pool.metrics.init_failures == 1


# ---- idle scale-down -----------------------------------------------------------------------------

def test_idle_scale_down_keeps_what_the_load_needed_within_the_idle_timeout(harness):
    h = harness(MAX_CONCURRENCY=3, AWS_LAMBDA_FUNCTION_IDLETIMEOUT="0.2")
    instances = warm(h, 3)
    for _ in range(3):
        h.invoke()  # three at once
    for instance in instances:
        (inv,) = instance.held.values()
        h.pool.respond(inv.request_id, b"1")
        h.next(instance)
    h.pool.instances.stop_surplus()
    assert h.killed == []  # three were needed a moment ago
    peak_at = time.monotonic()
    used = []
    while time.monotonic() < peak_at + 0.25:  # then a steady load of one at a time, on every instance in turn
        h.invoke()
        (inv,) = [i for inst in instances for i in inst.held.values()]
        used.append(inv.instance)
        h.pool.respond(inv.request_id, b"1")
        h.next(inv.instance)
        h.loop.run_until_complete(asyncio.sleep(0.01))
    assert len(set(used)) == 3  # longest-idle dispatch touched them all
    h.pool.instances.stop_surplus()
    assert len(h.killed) == 2  # demand, not each instance's idle time, decides
    kept = [i for i in instances if i.state is READY]
    assert kept == [used[-1]]  # the most recently used one stays
    assert all(i.stop_reason is StopReason.IDLE for i in instances if i not in kept)


def test_idle_scale_down_never_goes_below_min_instances(harness):
    h = harness(MAX_CONCURRENCY=3, MIN_INSTANCES=2, AWS_LAMBDA_FUNCTION_IDLETIMEOUT="0.05")
    h.pool.instances.spawn_to_minimum()
    assert len(h.launched) == 2
    for instance in h.launched:
        h.next(instance)
    h.pool.instances.stop_surplus()  # no load at all: only the minimum stays
    assert h.killed == []


# ---- what the sandbox and the log see --------------------------------------------------------------

def test_lines_written_before_the_answer_belong_to_the_invocation_even_if_not_read_yet(harness):
    """The runtime prints, then answers; the daemon handles the answer before it read the pipe
    (what happens under load). The line must still be in the Tail and before END."""
    h = harness(PRINT_REPORTS="true")
    (instance,) = warm(h, 1)
    results = h.invoke(tail=True)
    (inv,) = instance.held.values()
    instance.process.write(b"last words\n")  # in the pipe, not read yet
    h.pool.respond(inv.request_id, b'"ok"')
    tail = results[0].log_tail.decode()
    assert tail.startswith(f"START RequestId: {inv.request_id}")
    assert "last words\n" in tail and tail.index("last words") < tail.index("END RequestId")
    printed = b"".join(h.stdout).decode()
    assert printed.index("last words") < printed.index("END RequestId")


def test_the_report_is_measured_once_for_the_report_line_and_the_sandbox(harness):
    hooks = Hooks()
    h = harness(hooks=hooks, PRINT_REPORTS="true")
    (instance,) = warm(h, 1)
    h.invoke()
    (inv,) = instance.held.values()
    h.pool.respond(inv.request_id, b"1")
    ((request_id, outcome, report),) = hooks.reports
    assert request_id == inv.request_id and outcome == SUCCESS and isinstance(report, Report)
    assert report.lines(request_id).decode() in b"".join(h.stdout).decode()
    assert report.max_memory_used_mb == 41
    assert report.init_duration_ms is not None  # the instance's first invocation
    h.next(instance)
    h.invoke()
    (inv,) = instance.held.values()
    h.pool.respond(inv.request_id, b"2")
    assert hooks.reports[1][2].init_duration_ms is None
    assert "Init Duration" not in b"".join(h.stdout).decode().split("REPORT")[-1]


# ---- the instance state machine ------------------------------------------------------------------

def test_instance_states_move_only_forward():
    instance = Instance(0)
    assert instance.state is STARTING
    instance.advance(READY)
    with pytest.raises(IllegalTransition):
        instance.advance(STARTING)
    instance.advance(STOPPING)
    with pytest.raises(IllegalTransition):
        instance.advance(READY)
    instance.advance(DEAD)
    with pytest.raises(IllegalTransition):
        instance.advance(STOPPING)


# ---- replacing every instance (RELOAD_ON_CHANGE) -------------------------------------------------

def test_retire_all_stops_idle_instances_now_and_busy_ones_after_their_invocation(harness):
    h = harness(MAX_CONCURRENCY=3)
    busy, idle = warm(h, 2)
    results = h.invoke()
    (inv,) = busy.held.values() or idle.held.values()
    busy, idle = inv.instance, (idle if inv.instance is busy else busy)
    assert h.pool.retire_all() == 2
    assert h.killed == [(idle.number, signal.SIGKILL)] and busy.state is STOPPING
    h.pool.failures.instance_exited(idle, "signal: killed")
    later = h.invoke()  # new work never goes to the retiring instance: a fresh one starts for it
    assert len(h.launched) == 3 and len(busy.held) == 1
    assert h.pool.respond(inv.request_id, b'"old"') and results[0].outcome == SUCCESS
    assert len(h.killed) == 1  # its invocation ended as usual; it is stopped when it asks for more
    back = h.next(busy)
    assert h.killed[-1] == (busy.number, signal.SIGKILL) and back.got is None and not back.alive
    h.pool.failures.instance_exited(busy, "signal: killed")
    fresh = h.next(h.launched[2])
    assert fresh.got is not None and later == []
    assert h.pool.metrics.kills == {"reload": 2} and h.pool.metrics.init_failures == 0


def test_retire_all_replaces_a_starting_instance_without_failing_its_waiting_invocation(harness):
    h = harness(MAX_CONCURRENCY=1)
    results = h.invoke()
    (starting,) = h.launched
    assert h.pool.retire_all() == 1
    assert starting.state is STOPPING and h.killed == [(starting.number, signal.SIGKILL)]
    assert results == []  # not answered with an init error
    late = h.next(starting)  # the old runtime reaching /next before the kill lands gets nothing
    assert late.got is None and not late.alive
    h.pool.failures.instance_exited(starting, "signal: killed")
    assert starting.state is DEAD and len(h.launched) == 2
    fresh = h.next(h.launched[1])
    assert fresh.got is not None and h.pool.respond(fresh.got.request_id, b'"new"')
    assert [r.outcome for r in results] == [SUCCESS] and h.pool.metrics.init_failures == 0


def test_retire_all_keeps_min_instances_warm_and_leaves_runtimes_started_by_hand(harness):
    h = harness(MIN_INSTANCES=1, MAX_CONCURRENCY=2)
    h.pool.instances.spawn_to_minimum()
    (old,) = warm(h, 1)
    by_hand = Runtime(Instance(-1, external=True))
    h.pool.next(by_hand)
    assert h.pool.retire_all() == 1 and h.killed == [(old.number, signal.SIGKILL)]
    assert len(h.launched) == 1  # the slot is still taken until the old one has exited
    h.pool.failures.instance_exited(old, "signal: killed")
    assert len(h.launched) == 2  # its replacement, warm before any invocation
    h.invoke()  # the runtime started by hand was parked longest: it still gets work
    assert by_hand.got is not None


def test_a_retired_busy_instance_that_times_out_is_killed_once(harness):
    h = harness(AWS_LAMBDA_FUNCTION_TIMEOUT=0.05)
    (instance,) = warm(h, 1)
    results = h.invoke()
    assert h.pool.retire_all() == 1 and h.killed == []
    h.run_until(lambda: results)
    assert results[0].outcome == TIMEOUT and h.killed == [(instance.number, signal.SIGKILL)]
    h.pool.failures.instance_exited(instance, "signal: killed")
    assert h.pool.metrics.kills == {"reload": 1}
    assert h.pool.retire_all() == 0


# ---- tenant isolation (TENANT_ISOLATION_MODE=PER_TENANT: tenant_pool.TenantPool) ------------------

def tenants(**env) -> dict:
    return {"TENANT_ISOLATION_MODE": "PER_TENANT", **env}


def serve(h: Harness, instance: Instance) -> Invocation:
    """The runtime of ``instance`` asks for work, gets an invocation, answers it and asks again."""
    runtime = h.next(instance)
    inv = runtime.got
    assert inv is not None, f"{instance} got nothing"
    assert h.pool.respond(inv.request_id, b'"ok"')
    return inv


def live(h: Harness) -> List[Instance]:
    return [i for i in h.pool.instances if i.state is not DEAD]


def test_a_tenant_never_gets_an_instance_that_ran_another_tenant(harness):
    h = harness(**tenants(MAX_CONCURRENCY=3))
    assert isinstance(h.pool, TenantPool)
    first = h.invoke(tenant="blue")
    (blue,) = h.launched
    assert blue.tenant == "blue" and serve(h, blue).tenant_id == "blue" and first[0].outcome == SUCCESS
    h.next(blue)  # parked, idle
    green = h.invoke(tenant="green")
    assert len(h.launched) == 2 and h.launched[1].tenant == "green"  # blue's idle instance is not used
    assert blue.held == {} and green == []
    assert serve(h, h.launched[1]).tenant_id == "green" and green[0].outcome == SUCCESS
    again = h.invoke(tenant="blue")  # blue's own idle instance takes it: no spawn
    assert len(h.launched) == 2 and [i.tenant_id for i in blue.held.values()] == ["blue"]
    assert h.pool.respond(next(iter(blue.held)), b'"ok"') and again[0].outcome == SUCCESS


def test_invocations_of_one_tenant_wait_for_its_instances_not_another_tenants(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    h.invoke(tenant="a")
    h.invoke(tenant="b")
    a, b = h.launched
    busy = h.next(a).got
    serve(h, b)
    h.next(b)  # b is idle
    queued = h.invoke(tenant="a")  # no room, but tenant a has an instance: it waits for it
    assert len(h.launched) == 2 and h.killed == [] and b.held == {} and queued == []
    assert h.pool.respond(busy.request_id, b'"ok"')
    assert h.next(a).got.tenant_id == "a" and h.killed == []


def test_at_max_concurrency_the_longest_idle_instance_of_another_tenant_makes_room(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    for tenant in ("a", "b"):
        h.invoke(tenant=tenant)
    a, b = h.launched
    serve(h, b)
    serve(h, a)
    h.next(b)
    h.next(a)  # both idle; b has been idle longer
    assert a.idle_since > b.idle_since
    results = h.invoke(tenant="c")
    assert h.killed == [(b.number, signal.SIGKILL)] and b.state is STOPPING and b.stop_reason is StopReason.OTHER_TENANT
    assert len(h.launched) == 2 and results == []  # the slot is free once b's runtime has exited
    h.invoke(tenant="c")  # one more for c: the one stopping instance already makes room for it
    assert h.killed == [(b.number, signal.SIGKILL)]
    h.pool.failures.instance_exited(b, "signal: killed")
    c = h.launched[2]
    assert c.tenant == "c" and a.state is READY and len(live(h)) == 2
    assert serve(h, c).tenant_id == "c" and serve(h, c).tenant_id == "c"
    assert [r.outcome for r in results] == [SUCCESS] and h.pool.metrics.kills == {"other_tenant": 1}


def test_busy_instances_are_never_stopped_for_another_tenant(harness):
    h = harness(**tenants(MAX_CONCURRENCY=1))
    h.invoke(tenant="a")
    (a,) = h.launched
    running = h.next(a).got
    waiting = h.invoke(tenant="b")
    assert h.killed == [] and len(h.launched) == 1  # a is busy: b waits
    assert h.pool.respond(running.request_id, b'"ok"')
    assert h.killed == []  # a's worker is on its way back to /next: not idle yet
    h.next(a)  # a is idle now, and b has no instance: a makes room
    assert h.killed == [(a.number, signal.SIGKILL)] and a.stop_reason is StopReason.OTHER_TENANT
    h.pool.failures.instance_exited(a, "signal: killed")
    (_, b) = h.launched
    assert b.tenant == "b" and serve(h, b).tenant_id == "b" and waiting[0].outcome == SUCCESS


def test_max_concurrency_bounds_the_instances_of_all_tenants(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    results = {t: h.invoke(tenant=t) for t in "abcd"}
    assert [i.tenant for i in h.launched] == ["a", "b"] and h.killed == []  # starting ones are not idle
    served = []
    while len(served) < 4:
        for instance in [i for i in live(h) if i.state is not STOPPING]:
            runtime = h.next(instance)  # takes its tenant's invocation, or parks (and may be stopped)
            if runtime.got is not None:
                served.append((instance, runtime.got.tenant_id))
                assert h.pool.respond(runtime.got.request_id, b'"ok"')
        for instance in [i for i in live(h) if i.state is STOPPING]:
            h.pool.failures.instance_exited(instance, "signal: killed")
        assert len(live(h)) <= 2
    assert sorted(t for _, t in served) == ["a", "b", "c", "d"]
    assert all(r[0].outcome == SUCCESS for r in results.values())
    assert all(instance.tenant == t for instance, t in served) and len(h.launched) == 4
    assert h.pool.metrics.kills == {"other_tenant": 2}


def test_a_runtime_started_by_hand_serves_the_first_tenant_it_gets(harness):
    h = harness(**tenants(MAX_CONCURRENCY=1))
    by_hand = Instance(-1, external=True)
    h.next(by_hand)
    first = h.invoke(tenant="a")
    assert by_hand.tenant == "a" and h.launched == [] and len(by_hand.held) == 1
    assert h.pool.respond(next(iter(by_hand.held)), b'"ok"') and first[0].outcome == SUCCESS
    h.next(by_hand)
    h.invoke(tenant="b")
    assert len(h.launched) == 1 and h.launched[0].tenant == "b" and by_hand.held == {}
    h.invoke(tenant="a")
    assert [i.tenant_id for i in by_hand.held.values()] == ["a"]


def test_an_init_failure_answers_an_invocation_of_the_failed_instances_tenant(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    a_results = h.invoke(tenant="a")
    b_results = h.invoke(tenant="b")
    a, b = h.launched
    h.pool.failures.init_error(b, b'{"errorType":"Runtime.ImportModuleError","errorMessage":"no module"}', None)
    assert a_results == [] and [r.outcome for r in b_results] == [INIT_ERROR]
    assert serve(h, a).tenant_id == "a" and a_results[0].outcome == SUCCESS


def test_an_instance_that_could_not_start_fails_its_tenants_invocation(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    h.invoke(tenant="a")
    h.fail_launch = OSError("exec format error")
    b_results = h.invoke(tenant="b")
    assert len(b_results) == 1 and b"exec format error" in b_results[0].body
    assert len(h.pool.lanes["a"].queue) == 1 and len(h.pool.queue) == 1  # a's still waits for its instance
    assert h.pool.metrics.init_failures == 1


def test_a_tenant_waiting_without_an_instance_is_throttled_after_a_timeout(harness):
    h = harness(**tenants(MAX_CONCURRENCY=1, AWS_LAMBDA_FUNCTION_TIMEOUT=0.2))
    h.invoke(tenant="a")
    (a,) = h.launched
    h.next(a)  # a runs; it times out after 0.2 s, and so does b's wait
    waiting = h.invoke(tenant="b")
    h.run_until(lambda: waiting)
    assert waiting[0].outcome == THROTTLED and waiting[0].api_error is not None


def test_abandoned_and_refused_invocations_leave_their_tenants_queue(harness):
    h = harness(**tenants(MAX_CONCURRENCY=1))
    h.invoke(tenant="a")
    results: List[Result] = []
    gone = Invocation("req-gone", b"{}", arn=h.config.function_arn, tenant_id="b",
                      on_done=lambda i, r: results.append(r))
    h.pool.submit(gone)
    h.invoke(tenant="b")
    assert len(h.pool.queue) == 3
    h.pool.abandon(gone)
    assert len(h.pool.queue) == 2 and not h.pool.is_active("req-gone")
    h.pool.stop_accepting()
    h.pool.reject_queued()
    assert len(h.pool.queue) == 0 and results == []


def test_idle_instances_of_a_tenant_isolated_function_stop_by_their_own_idle_time(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2, AWS_LAMBDA_FUNCTION_IDLETIMEOUT=60))
    for tenant in ("a", "b"):
        h.invoke(tenant=tenant)
    a, b = h.launched
    serve(h, a)
    serve(h, b)
    h.next(a)
    h.next(b)
    h.pool.instances.stop_idle()
    assert h.killed == []  # a demand of one at a time would make one of them surplus: not here
    a.idle_since -= 61
    h.pool.instances.stop_idle()
    assert h.killed == [(a.number, signal.SIGKILL)] and a.stop_reason is StopReason.IDLE and b.state is READY


def test_a_tenants_instance_with_several_workers_takes_that_many_before_another_starts(harness):
    h = harness(**tenants(MAX_CONCURRENCY=3, AWS_LAMBDA_MAX_CONCURRENCY=2))
    h.invoke(tenant="a")
    h.invoke(tenant="a")
    assert [i.tenant for i in h.launched] == ["a"]  # one starting instance covers two invocations
    h.invoke(tenant="b")
    h.invoke(tenant="a")
    assert [i.tenant for i in h.launched] == ["a", "b", "a"]
    first = h.launched[0]
    got = [h.next(first).got, h.next(first).got]
    assert [inv.tenant_id for inv in got] == ["a", "a"] and len(first.held) == 2


def test_a_tenants_worker_on_its_way_back_is_waited_for_briefly(harness):
    h = harness(**tenants(MAX_CONCURRENCY=2))
    h.invoke(tenant="a")
    (a,) = h.launched
    inv = h.next(a).got
    assert h.pool.respond(inv.request_id, b'"ok"')  # its worker is on its way back to /next
    comes_back = h.invoke(tenant="a")
    assert len(h.launched) == 1
    assert h.next(a).got is not None and comes_back == []  # it came back in time: no second instance
    assert h.pool.respond(next(iter(a.held)), b'"ok"') and comes_back[0].outcome == SUCCESS
    stays_away = h.invoke(tenant="a")
    h.run_until(lambda: len(h.launched) == 2)  # it did not come back within RETURN_GRACE: another starts
    assert h.launched[1].tenant == "a" and stays_away == []
    assert h.next(h.launched[1]).got.tenant_id == "a"
