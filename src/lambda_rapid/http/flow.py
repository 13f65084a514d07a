"""Flow control of one HTTP connection, both ways (the role uvicorn's ``FlowControl`` has).

Reading stops for a reason and resumes once no reason is left: requests pipelined behind the one
being answered (``PIPELINED``), or a request body streamed to a consumer whose socket is full
(``SINK_FULL``, until that consumer's connection drains). Writing: while the transport's send
buffer is over its high-water mark (asyncio's ``pause_writing``), the producer of a streamed
answer waits in ``when_drained`` until it is below again, or the connection is gone.

It knows the transport only, nothing of HTTP; a connection (server.py) builds its own when its
transport is made.
"""

from __future__ import annotations

import asyncio
from typing import Callable, List

PIPELINED = 1  # requests wait behind the one being answered
SINK_FULL = 2  # the body goes to a connection whose send buffer is full (a streamed answer)


class FlowControl:
    __slots__ = ("transport", "reading_paused", "writing_paused", "_waiters")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reading_paused = 0  # why reading is paused: PIPELINED, SINK_FULL bits
        self.writing_paused = False  # the send buffer is over its high-water mark
        self._waiters: List[Callable[[], None]] = []  # called when it is below again

    def pause_reading(self, reason: int) -> None:
        if not self.reading_paused:
            self.transport.pause_reading()
        self.reading_paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.reading_paused & reason:
            self.reading_paused &= ~reason
            if not self.reading_paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def sink_drained(self) -> None:
        """The consumer of the streamed request body takes more again."""
        self.resume_reading(SINK_FULL)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.release()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the send buffer takes more again (at once if it does now, or if
        the connection is closing)."""
        if self.writing_paused and not self.transport.is_closing():
            self._waiters.append(callback)
        else:
            callback()

    def release(self) -> None:
        """Every producer waiting goes on (the buffer drained, or the connection is gone: its bytes
        go nowhere now)."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for callback in waiters:
                callback()
