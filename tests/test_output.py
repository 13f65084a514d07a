"""Runtime output: which invocation a line belongs to (Tail, REPORT order), and the daemon's stdout
(OutputSink), which must never block the loop, even when nobody reads it.

The attribution test builds the real daemon in-process (pool, Runtime and Invoke APIs, HTTP layer,
a real runtime process and its real output pipe) and feeds both connections by hand, so the moment
the daemon handles the runtime's answer is exact: the line is in the pipe, not yet read.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import select
import signal
import time

from lambda_rapid import config as config_module
from lambda_rapid.daemon import Daemon
from lambda_rapid.http.server import HttpConnection

ID_HEADER = b"Lambda-Runtime-Aws-Request-Id: "


class Transport(asyncio.Transport):
    """Keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data) -> None:  # type: ignore[override]
        self.written += bytes(data)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def open_fifo_for_writing(path: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # the runtime has not opened it yet


def test_tail_has_the_line_the_runtime_printed_just_before_answering(tmp_path):
    """The runtime prints a line, then posts /response; the daemon handles the /response before its
    loop has read the runtime's pipe (as happens under load). The line belongs to the invocation."""
    fifo = tmp_path / "say"
    os.mkfifo(fifo)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    env = {"PATH": os.environ["PATH"], "AWS_LAMBDA_FUNCTION_NAME": "tail"}
    # The "runtime": prints what the test writes into the fifo, when the test writes it.
    config = config_module.load(["/bin/sh", "-c", f'cat "{fifo}"; exec sleep 60'], env, cwd=str(tmp_path))
    daemon = Daemon(config)
    client, runtime = Transport(), Transport()
    invoke = HttpConnection(daemon.invoke_http)
    invoke.connection_made(client)
    invoke.data_received(b"POST /2015-03-31/functions/tail/invocations HTTP/1.1\r\nHost: x\r\n"
                         b"X-Amz-Log-Type: Tail\r\nContent-Length: 2\r\n\r\n{}")
    instance = daemon.pool.instances[0]
    try:
        api = HttpConnection(daemon.runtime_http, instance)
        api.connection_made(runtime)
        api.data_received(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n")
        event = runtime.written
        start = event.index(ID_HEADER) + len(ID_HEADER)
        request_id = event[start:event.index(b"\r\n", start)]
        fd = open_fifo_for_writing(str(fifo))
        os.write(fd, b"the last line before the answer\n")
        os.close(fd)
        pipe = daemon.procs.children[instance.pid].fd
        assert select.select([pipe], [], [], 10)[0], "the runtime did not print"  # printed, not read
        api.data_received(b"POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 4\r\n\r\n\"ok\"" % request_id)
        head, _, body = client.written.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), client.written
        assert body == b'"ok"'
        encoded = [line.split(b": ", 1)[1] for line in head.split(b"\r\n")
                   if line.lower().startswith(b"x-amz-log-result:")]
        tail = base64.b64decode(encoded[0]).decode()
        assert "the last line before the answer\n" in tail, tail
        assert tail.index("the last line") < tail.index("END RequestId")
    finally:
        os.killpg(instance.pid, signal.SIGKILL)
        os.waitpid(instance.pid, 0)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
