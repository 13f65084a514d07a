"""Pool logic in-process (no processes, no sockets): what the end-to-end tests can't reach cheaply."""

from __future__ import annotations

import asyncio
import sys

from lambda_rapid import config as config_module
from lambda_rapid.instances import Instance
from lambda_rapid.invocation import Invocation
from lambda_rapid.pool import Pool, Waiter


class Recorder(Waiter):
    __slots__ = ("got",)

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance)
        self.got = []

    def send(self, inv: Invocation) -> None:
        self.got.append(inv)


def test_runtimes_started_by_hand_are_not_bounded_by_max_concurrency():
    """100 runtimes started by hand, each busy at once, with MAX_CONCURRENCY=1: all get work and
    all answers come back (the demand record grows with them)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        config = config_module.load([sys.executable, "-m", "awslambdaric", "echo.handler"], {"PATH": "/usr/bin"})
        pool = Pool(config, lambda instance: None, lambda instance, sig: None, lambda data: None)
        waiters = [Recorder(Instance(-(n + 1), external=True)) for n in range(100)]
        for waiter in waiters:
            pool.next(waiter)
        done = []
        for n in range(100):
            inv = Invocation(f"id-{n}", b"{}", arn=config.function_arn, on_done=lambda i, r: done.append(r))
            pool.submit(inv)
        assert [len(w.got) for w in waiters] == [1] * 100
        assert pool.demand.busy == 100
        for waiter in waiters:
            assert pool.respond(waiter.got[0].request_id, b'"ok"')
        assert [r.outcome for r in done] == ["success"] * 100
        assert pool.demand.busy == 0
        assert pool.instances.needed() == 100
    finally:
        loop.close()
