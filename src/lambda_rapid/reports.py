"""What Lambda writes around an invocation in the function's log (``START``, ``END``, ``REPORT``),
the log tail a caller asks for with ``LogType=Tail``, and the figures of the ``REPORT`` line,
measured once per invocation for the REPORT line and the Telemetry API's ``platform.report`` alike.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from .invocation import TAIL_BYTES, Invocation, Result


class Report:
    """The figures of one finished invocation, measured once (by the pool) for both its REPORT line
    and the Telemetry API's ``platform.report``."""

    __slots__ = ("duration_ms", "memory_size_mb", "max_memory_used_mb", "init_duration_ms", "restore_duration_ms")

    def __init__(self, duration_ms: float, memory_size_mb: int, max_memory_used_mb: Optional[int],
                 init_duration_ms: Optional[float], restore_duration_ms: Optional[float] = None) -> None:
        self.duration_ms = duration_ms
        self.memory_size_mb = memory_size_mb
        self.max_memory_used_mb = max_memory_used_mb  # None: not known (a runtime started by hand)
        self.init_duration_ms = init_duration_ms  # only on the first invocation of an instance
        # Instead of the init's, on the first invocation of a SnapStart instance (AWS prints no Init
        # Duration there: https://docs.aws.amazon.com/lambda/latest/dg/snapstart-monitoring.html)
        self.restore_duration_ms = restore_duration_ms

    @property
    def billed_restore_duration_ms(self) -> int:
        """What AWS bills of a restore: loading the runtime and its after-restore hooks, which is all
        of ours (no snapshot is restored), in whole milliseconds."""
        return 0 if self.restore_duration_ms is None else math.ceil(self.restore_duration_ms)

    @property
    def billed_duration_ms(self) -> int:
        # AWS bills the restore with the first invocation: its Billed Duration is Duration plus the
        # Billed Restore Duration, rounded up, as AWS's REPORT lines of SnapStart functions show
        # (e.g. "Duration: 2338.66 ms  Billed Duration: 2521 ms ... Billed Restore Duration: 182 ms").
        if self.restore_duration_ms is not None:
            return max(1, math.ceil(self.duration_ms + self.billed_restore_duration_ms))
        return max(1, math.ceil(self.duration_ms))

    def lines(self, request_id: str) -> bytes:
        """The END and REPORT lines, as Lambda writes them to the function's log."""
        memory = "" if self.max_memory_used_mb is None else f"\tMax Memory Used: {self.max_memory_used_mb} MB"
        init = "" if self.init_duration_ms is None else f"\tInit Duration: {self.init_duration_ms:.2f} ms"
        if self.restore_duration_ms is not None:
            init = (f"\tRestore Duration: {self.restore_duration_ms:.2f} ms"
                    f"\tBilled Restore Duration: {self.billed_restore_duration_ms} ms")
        return (f"END RequestId: {request_id}\n"
                f"REPORT RequestId: {request_id}\tDuration: {self.duration_ms:.2f} ms\t"
                f"Billed Duration: {self.billed_duration_ms} ms\tMemory Size: {self.memory_size_mb} MB"
                f"{memory}{init}\n").encode()


class FunctionLog:
    """Frames invocations in the function's log: on the daemon's stdout (``PRINT_REPORTS``) and in
    the tail of those that asked for it (``inv.tail``). Lines the runtime prints in between are
    added by the output capture (``Invocation.add_log``)."""

    def __init__(self, version: str, memory_size_mb: int, output: Callable[[bytes], None], to_stdout: bool) -> None:
        self.version = version
        self.memory_size_mb = memory_size_mb
        self.output = output
        self.to_stdout = to_stdout

    def start(self, inv: Invocation) -> None:
        line = f"START RequestId: {inv.request_id} Version: {self.version}\n".encode()
        if self.to_stdout:
            self.output(line)
        if inv.tail:
            inv.log = bytearray(line)

    def measure(self, inv: Invocation, now: float) -> Report:
        instance = inv.instance
        process = instance.process
        memory = None if process is None else max(1, round(process.peak_rss() / 1048576))
        cold = inv.init_duration_ms
        if cold is not None and instance.restored:  # a SnapStart instance: its cold start was a restore
            return Report((now - inv.started_at) * 1000, self.memory_size_mb, memory, None, cold)
        return Report((now - inv.started_at) * 1000, self.memory_size_mb, memory, cold)

    def end(self, inv: Invocation, result: Result, report: Report) -> None:
        lines = report.lines(inv.request_id)
        if self.to_stdout:
            self.output(lines)
        if inv.log is not None:
            inv.log += lines
            result.log_tail = bytes(inv.log[-TAIL_BYTES:])
