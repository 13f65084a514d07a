"""The pool's two deadline queues: invocations waiting for an instance (``WaitQueue``) and
invocations running in one (``RunDeadlines``).

Every invocation has the same timeout, so deadlines come in queue (and start) order: one timer for
the oldest of each queue, instead of a timer per invocation, keeps the hot path lean. Both are
deques, so the pool's hot path tests and pops them at C speed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Optional

from .invocation import Invocation


class _DeadlineQueue(deque):
    """Invocations in the order their deadlines come (all ``timeout`` after they entered), with the
    one timer for the oldest; one whose deadline has passed goes to ``on_expired``."""

    __slots__ = ("loop", "timeout", "on_expired", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_expired: Callable[[Invocation], None]) -> None:
        super().__init__()
        self.loop = loop
        self.timeout = timeout
        self.on_expired = on_expired
        self._timer: Optional[asyncio.TimerHandle] = None


class WaitQueue(_DeadlineQueue):
    """Invocations waiting for an instance, oldest first. One that has waited a whole function
    timeout goes to ``on_expired`` (the pool answers 429); Event invocations wait on."""

    __slots__ = ()

    def push(self, inv: Invocation) -> None:
        inv.queued_at = time.monotonic()
        self.append(inv)
        if self._timer is None and not inv.is_event:
            self._timer = self.loop.call_later(self.timeout, self._expire)

    def pop_live(self) -> Optional[Invocation]:
        """The oldest invocation still waiting (abandoned ones are skipped), or None."""
        while self:
            inv = self.popleft()
            if not inv.done:
                return inv
        return None

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        limit = now - self.timeout
        if self and self[0].queued_at <= limit:
            expired = [i for i in self if i.queued_at <= limit and not i.is_event and not i.done]
            if expired:
                gone = set(map(id, expired))
                kept = [i for i in self if id(i) not in gone and not i.done]
                self.clear()
                self.extend(kept)
                for inv in expired:
                    self.on_expired(inv)
        for inv in self:
            if not inv.is_event and not inv.done:
                self._timer = self.loop.call_later(max(inv.queued_at + self.timeout - now, 0.001), self._expire)
                break


class RunDeadlines(_DeadlineQueue):
    """Invocations handed to a runtime, in the order they started; one that has run a whole function
    timeout goes to ``on_expired`` (the pool ends it with ``Sandbox.Timedout``)."""

    __slots__ = ()

    def add(self, inv: Invocation) -> None:
        """``inv`` has just started (``inv.started_at`` is set)."""
        self.append(inv)
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout, self._expire)

    def prune(self) -> None:
        """Forget the finished invocations at the head (so finished ones are not kept until the timer)."""
        while self and self[0].done:
            self.popleft()

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self:
            inv = self[0]
            if inv.done:
                self.popleft()
            elif inv.started_at + self.timeout <= now + 0.0005:
                self.popleft()
                self.on_expired(inv)
            else:
                self._timer = self.loop.call_later(inv.started_at + self.timeout - now, self._expire)
                return
