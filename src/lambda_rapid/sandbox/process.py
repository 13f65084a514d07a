"""Child processes: start each runtime in its own process group with its output captured, signal
whole groups, and reap every child (as PID 1 that includes orphans re-parented to us).

Nothing here knows about invocations: callers pass ``on_output(bytes)`` and ``on_exit(status)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
from collections import deque
from typing import Callable, Dict, Optional, Sequence

log = logging.getLogger(__name__)

READ_CHUNK = 65536
MAX_PARTIAL_LINE = 65536
PENDING_LIMIT = 4 << 20  # bytes of output kept while stdout is not read; beyond that it is dropped
_SIGNAL_NAMES = {
    signal.SIGKILL: "killed", signal.SIGTERM: "terminated", signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted", signal.SIGINT: "interrupt", signal.SIGHUP: "hangup", signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception", signal.SIGILL: "illegal instruction", signal.SIGPIPE: "broken pipe",
    signal.SIGQUIT: "quit", signal.SIGUSR1: "user defined signal 1", signal.SIGUSR2: "user defined signal 2",
}


def describe_status(wait_status: int) -> str:
    """An exit status in the words AWS uses (Go's ProcessState): 'exit status 1', 'signal: killed'."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return "signal: " + _SIGNAL_NAMES.get(sig, f"signal {sig}")
    return f"exit status {os.WEXITSTATUS(wait_status)}"


def _new_process_group() -> None:
    os.setpgid(0, 0)


class OutputSink:
    """The daemon's stdout, for runtime and report lines: written whole and in order, and never
    blocking the loop. While nobody reads stdout, up to ``limit`` bytes wait in memory; output
    beyond that is dropped (whole writes, so no line is cut) and counted, and the count is logged
    once stdout drains."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int = 1, limit: int = PENDING_LIMIT) -> None:
        self.loop = loop
        self.fd = _nonblocking(fd)
        self.limit = limit
        self.pending: deque = deque()  # memoryviews not written yet, oldest first
        self.pending_bytes = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._written: Optional[asyncio.Future] = None  # set when all that waits is written (at exit)

    def write(self, data: bytes) -> None:
        if self.pending:
            self._keep(memoryview(data))
            return
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            return  # nobody will ever read it (EPIPE, EIO): like a write to a closed terminal
        if n < len(data):
            self._keep(memoryview(data)[n:])
            self.loop.add_writer(self.fd, self._flush)

    def _keep(self, data: memoryview) -> None:
        if self.pending and self.pending_bytes + len(data) > self.limit:
            self.dropped_lines += data.tobytes().count(b"\n")
            self.dropped_bytes += len(data)
            return
        self.pending.append(data)
        self.pending_bytes += len(data)

    def _flush(self) -> None:
        pending = self.pending
        while pending:
            data = pending[0]
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                return
            except OSError:
                n = len(data)  # gone for good: drop what waits
            self.pending_bytes -= n
            if n < len(data):
                pending[0] = data[n:]
                return
            pending.popleft()
        self.loop.remove_writer(self.fd)
        self._report_dropped()
        if self._written is not None and not self._written.done():
            self._written.set_result(None)

    def _report_dropped(self) -> None:
        if self.dropped_bytes:
            log.warning("stdout was not read for a while: %d lines (%d bytes) of runtime output were dropped",
                        self.dropped_lines, self.dropped_bytes)
            self.dropped_lines = self.dropped_bytes = 0

    async def flush(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for what waits to be written (the daemon is exiting)."""
        if self.pending:
            self._written = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._written), timeout)
            except asyncio.TimeoutError:
                log.warning("stdout is not read: %d bytes of runtime output not written at exit", self.pending_bytes)
        self._report_dropped()


def _nonblocking(fd: int) -> int:
    """A descriptor that writes to what ``fd`` refers to without ever blocking. Pipes, terminals and
    sockets can stall; a pipe or terminal is opened again through /proc (its own open file, so the
    one we share with whoever started us keeps its blocking mode); a socket is made non-blocking.
    Regular files never stall: ``fd`` itself."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return fd
    if stat.S_ISREG(mode):
        return fd
    if not stat.S_ISSOCK(mode):
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass
    os.set_blocking(fd, False)
    return fd


class Child:
    """One started process: its pid (= its process group id) and its captured output pipe."""

    __slots__ = ("pid", "fd", "on_output", "on_exit", "partial", "popen", "manager", "status", "pidfd")

    def __init__(self, manager: ProcessManager, popen: subprocess.Popen, fd: int,
                 on_output: Callable[[bytes], None], on_exit: Callable[[str], None]) -> None:
        self.manager = manager
        self.popen = popen
        self.pid = popen.pid
        self.fd = fd
        self.on_output = on_output
        self.on_exit = on_exit
        self.partial = b""
        self.status: Optional[str] = None
        self.pidfd = -1

    def read_available(self) -> None:
        """Read whatever the child has written so far, forwarding whole lines."""
        fd = self.fd
        if fd < 0:
            return
        while True:
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close_output()
                return
            self._feed(data)
            if len(data) < READ_CHUNK:
                return

    def _feed(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
            self.partial = b""
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            if cut == 0 and len(data) < MAX_PARTIAL_LINE:
                self.partial = data
                return
            if cut:
                self.partial = data[cut:]
                data = data[:cut]
        self.on_output(data)

    def close_output(self) -> None:
        if self.fd >= 0:
            self.manager.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self.partial:
            rest, self.partial = self.partial, b""
            self.on_output(rest + b"\n")


class ProcessManager:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.children: Dict[int, Child] = {}
        self.own_pgid = os.getpgrp()
        self.on_orphan: Optional[Callable[[int], None]] = None

    def install(self) -> None:
        """Watch for exits. Each child is watched through a pidfd (exact, no signal handler: uvloop
        keeps SIGCHLD for itself); without pidfd support children are polled. As PID 1 we also reap
        orphans that were re-parented to us."""
        self._poll_timer = None
        if os.getpid() == 1 or not hasattr(os, "pidfd_open"):
            self._schedule_poll()

    def _schedule_poll(self) -> None:
        self._poll_timer = self.loop.call_later(0.05 if not hasattr(os, "pidfd_open") else 0.5, self._poll)

    def _poll(self) -> None:
        for pid in list(self.children):
            self._reap_pid(pid)
        if os.getpid() == 1:
            self._reap_orphans()
        self._schedule_poll()

    def _reap_orphans(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            if info.si_pid in self.children:
                self._reap_pid(info.si_pid)
                continue
            try:
                os.waitpid(info.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if self.on_orphan is not None:
                self.on_orphan(info.si_pid)

    def _watch(self, child: Child) -> None:
        try:
            child.pidfd = os.pidfd_open(child.pid)
        except (AttributeError, OSError):
            return  # polled instead
        self.loop.add_reader(child.pidfd, self._reap_pid, child.pid)

    def spawn(self, argv: Sequence[str], env: dict, cwd: str, on_output: Callable[[bytes], None],
              on_exit: Callable[[str], None], pgid: Optional[int] = None) -> Child:
        """Start ``argv`` in a new process group (or join ``pgid``). Raises OSError if it can't run."""
        read_fd, write_fd = os.pipe()
        try:
            kwargs: dict = {}
            if pgid is None:
                # A new group in our session (not setsid): extensions must be able to join it.
                kwargs["preexec_fn"] = _new_process_group
            else:
                kwargs["preexec_fn"] = lambda: os.setpgid(0, pgid)
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                                     cwd=cwd, env=env, close_fds=True, **kwargs)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        child = Child(self, popen, read_fd, on_output, on_exit)
        self.children[child.pid] = child
        self.loop.add_reader(read_fd, child.read_available)
        self._watch(child)
        return child

    def signal_group(self, pgid: int, sig: int) -> None:
        # Never our own group, init's, or with pgid 0 (killpg(0) is the caller's own group: the daemon's).
        if pgid <= 1 or pgid == self.own_pgid:
            log.error("refusing to signal process group %d", pgid)
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.error("cannot signal process group %d: %s", pgid, e)

    def _reap_pid(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done == 0:
            return
        del self.children[pid]
        if child.pidfd >= 0:
            self.loop.remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = -1
        child.popen.returncode = os.waitstatus_to_exitcode(status) if hasattr(
            os, "waitstatus_to_exitcode") else status
        child.status = describe_status(status)
        child.read_available()
        try:
            child.on_exit(child.status)
        except Exception:
            log.exception("error while handling the exit of pid %d", pid)

    def reap(self) -> None:
        """Reap every child that has exited (used at shutdown)."""
        for pid in list(self.children):
            self._reap_pid(pid)
        if os.getpid() == 1:
            self._reap_orphans()


def peak_rss_of_group(pid: int) -> int:
    """Peak resident memory (bytes) of ``pid`` and its descendants (VmHWM summed), 0 if gone."""
    total = 0
    stack = [pid]
    seen = set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", "rb") as f:
                    stack.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total
