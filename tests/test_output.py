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
import json
import os
import select
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import BIN, FUNCTIONS_DIR, RIC, daemon_env, free_port, wait_until
from lambda_rapid import config as config_module
from lambda_rapid.daemon import Daemon
from lambda_rapid.http.server import HttpConnection
from lambda_rapid.sandbox.process import OutputSink

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


# ---- the daemon's stdout --------------------------------------------------------------------------

def test_output_sink_never_blocks_and_counts_what_it_drops(caplog):
    loop = asyncio.new_event_loop()
    read_fd, write_fd = os.pipe()
    try:
        sink = OutputSink(loop, write_fd, limit=256 * 1024)
        line = b"%07d" + b"x" * 1016 + b"\n"
        began = time.monotonic()
        for n in range(2000):  # 2 MB into a 64 KB pipe nobody reads
            sink.write(line % n)
        assert time.monotonic() - began < 5  # returned, did not wait for a reader
        assert sink.pending_bytes <= 256 * 1024 + len(line)
        assert sink.dropped_lines > 0 and sink.dropped_bytes == sink.dropped_lines * 1024
        dropped = sink.dropped_lines
        received = bytearray()

        def read_some() -> None:
            received.extend(os.read(read_fd, 1 << 20))

        loop.add_reader(read_fd, read_some)
        deadline = time.monotonic() + 10
        while sink.pending and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.005))
        loop.remove_reader(read_fd)
        assert not sink.pending
        assert f"{dropped} lines" in caplog.text  # said once it drained
        lines = bytes(received).split(b"\n")[:-1]
        assert len(lines) == 2000 - dropped
        assert all(len(ln) == 1023 and ln.endswith(b"x" * 1016) for ln in lines)  # whole lines only
        numbers = [int(ln[:7]) for ln in lines]
        assert numbers == sorted(numbers) and numbers[0] == 0  # in order; the newest ones were dropped
    finally:
        loop.close()
        os.close(read_fd)
        os.close(write_fd)


def test_a_daemon_whose_stdout_nobody_reads_keeps_answering(tmp_path):
    """The daemon's stdout is a pipe that the test does not read for a while: invocations that print
    more than the pipe and the daemon's buffer can hold are still answered, then what was dropped
    is said on stderr once the test reads again."""
    port, runtime_port = free_port(), free_port()
    env = daemon_env(PORT=port, RUNTIME_API_PORT=runtime_port, AWS_LAMBDA_FUNCTION_TIMEOUT="30")
    err = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(BIN / "lambda-runtime-api-daemon"), *RIC, "handlers.flood"], cwd=FUNCTIONS_DIR,
                            env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/2015-03-31/functions/function/invocations"

    def invoke(mb: float) -> int:
        req = urllib.request.Request(url, data=json.dumps({"mb": mb}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status

    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/_/health", timeout=1).status == 200
            except OSError:
                return False

        wait_until(up, 15, message="the daemon")
        statuses = [invoke(2) for _ in range(4)]  # 8 MB printed; nobody reads the daemon's stdout
        assert statuses == [200] * 4
        with ThreadPoolExecutor(1) as pool:
            drained = pool.submit(lambda: sum(len(c) for c in iter(lambda: proc.stdout.read1(1 << 20), b"")))
            wait_until(lambda: b"were dropped" in (tmp_path / "stderr.log").read_bytes(), 30,
                       message="the drop count on stderr")
            assert invoke(0.01) == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert drained.result(15) > 64 * 1024
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        err.close()
