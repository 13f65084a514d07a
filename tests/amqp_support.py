"""Helpers for the AMQP tests: a plain pika RPC client, queue probes, daemon and lambda-server start-up.

Everything talks to the real RabbitMQ on 127.0.0.1:5672 (guest/guest). Every test names its own
queue (function), so tests can run side by side with other engineers' tests. The daemons' queues
are durable by default and outlive them: ``queues_deleted`` deletes what ``amqp_daemon`` started.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pika
import pytest

from conftest import BIN, FUNCTIONS_DIR, RIC, ROOT, Proc, daemon_env, free_port, wait_until

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
# Short retry pacing so the tests see reconnects within seconds.
AMQP_URI = BROKER + "?connection_attempts=3&retry_delay=0.5&heartbeat=0"


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def broker_up() -> bool:
    try:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER + "?connection_attempts=1&socket_timeout=2"))
    except pika.exceptions.AMQPError:
        return False
    conn.close()
    return True


@pytest.fixture(autouse=True, scope="module")
def require_broker():
    if not broker_up():
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 (guest/guest); .ci/run starts it")


def consumers(queue: str) -> int:
    """Consumers on ``queue`` (-1 when it does not exist). A passive declare of a missing queue
    closes its channel, so each probe uses a connection of its own."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER + "?connection_attempts=1&socket_timeout=2"))
    except pika.exceptions.AMQPError:
        return -1
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return -1
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


def queue_depth(queue: str) -> int:
    """Messages ready in ``queue`` (-1 when it does not exist)."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(BROKER + "?connection_attempts=1&socket_timeout=2"))
    except pika.exceptions.AMQPError:
        return -1
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return -1
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


def wait_consumers(queue: str, count: int = 1, timeout: float = 15.0) -> None:
    wait_until(lambda: consumers(queue) >= count, timeout, 0.05, f"{count} consumer(s) on {queue}")


CREATED: list = []  # queues declared by the daemons ``amqp_daemon`` started for the running test


def amqp_daemon(daemon_factory, name: str, handler: str = "handlers.echo", command: Optional[list] = None,
                cwd: Path = FUNCTIONS_DIR, **env) -> Proc:
    """A daemon of function ``name`` consuming its queue: awslambdaric with a tests/functions
    ``handler``, or the runtime ``command`` given."""
    proc = daemon_factory(RIC + [handler] if command is None else command, cwd=cwd, AWS_LAMBDA_FUNCTION_NAME=name,
                          **{"AMQP_URI": AMQP_URI, **env})
    CREATED.append(name)
    wait_consumers(name)
    return proc


def delete_queue(name: str) -> None:
    """Delete ``name`` (and whatever waits in it); nothing when it does not exist."""
    conn = pika.BlockingConnection(pika.URLParameters(BROKER + "?connection_attempts=3&retry_delay=1"))
    try:
        conn.channel().queue_delete(name)
    except pika.exceptions.ChannelClosedByBroker:
        pass
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


@contextlib.contextmanager
def queues_deleted() -> Iterator[None]:
    """Delete, on the way out, the queues of the daemons started meanwhile (use it around their
    whole life: an autouse fixture is set up before ``daemon_factory``, so torn down after it)."""
    try:
        yield
    finally:
        while CREATED:
            delete_queue(CREATED.pop())


class RpcClient:
    """A plain pika client, as the seed's echo-clients do it: direct reply-to, correlation ids."""

    def __init__(self, uri: str = BROKER) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(uri))
        self.channel = self.conn.channel()
        self.replies: dict = {}
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)

    def _on_reply(self, _channel, _method, props, body) -> None:
        self.replies[props.correlation_id] = (props, body)

    def send(self, queue: str, body: bytes, headers: Optional[dict] = None, correlation_id: Optional[str] = None,
             reply: bool = True, persistent: bool = False) -> str:
        cid = correlation_id if correlation_id is not None else str(uuid.uuid4())
        props = pika.BasicProperties(reply_to="amq.rabbitmq.reply-to" if reply else None, correlation_id=cid,
                                     content_type="application/json", headers=headers,
                                     delivery_mode=2 if persistent else 1)
        self.channel.basic_publish("", queue, body, props)
        return cid

    def wait(self, cid: str, timeout: float = 20.0):
        """(properties, body) of the reply to ``cid``; AssertionError if none comes in time."""
        deadline = time.monotonic() + timeout
        while cid not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply to {cid} within {timeout}s")
            self.conn.process_data_events(min(left, 0.05))
        return self.replies.pop(cid)

    def call(self, queue: str, body: bytes, headers: Optional[dict] = None, timeout: float = 20.0, **kw):
        return self.wait(self.send(queue, body, headers, **kw), timeout)

    def close(self) -> None:
        try:
            self.conn.close()
        except pika.exceptions.AMQPError:
            pass

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(*, wait: bool = True, **env_overrides) -> Proc:
    """Start ``lambda-server`` on a free port (env overrides as keyword arguments)."""
    port = free_port()
    env = daemon_env(PORT=port, **{"AMQP_URI": AMQP_URI, **env_overrides})
    proc = Proc([str(BIN / "lambda-server")], env, ROOT, port, None)
    if wait:
        proc.wait_healthy()
    return proc


def metric(proc: Proc, name: str) -> float:
    """The value of one sample line (``name`` includes its labels) on ``/metrics``, 0 if absent."""
    for line in proc.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rabbitmqctl(*args: str) -> None:
    rabbitmqctl_out(*args)


def rabbitmqctl_out(*args: str) -> str:
    """What ``rabbitmqctl -q ARGS`` prints (it fails the test when the command fails)."""
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120, text=True,
                          env=dict(os.environ, HOME=os.environ.get("HOME", "/root"))).stdout


def functions_dir() -> Path:
    return Path(__file__).resolve().parent / "functions"


class BrokerPath:
    """A TCP path to RabbitMQ for one daemon, which the test can cut (its connections closed at both
    ends, new ones closed at once) and restore: a network outage between that daemon and the
    broker, with the broker and everyone else's connections untouched. Bytes pass as they are."""

    def __init__(self, target: tuple = ("127.0.0.1", 5672)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.closed = False
        self.lock = threading.Lock()
        self.sockets: list = []
        self.frozen: set = set()  # sockets of connections that pass nothing any more (a partition)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def uri(self, query: str = "connection_attempts=3&retry_delay=0.5&heartbeat=0") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/?{query}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if src in self.frozen:
                    continue  # partitioned: the bytes are lost on the way
                dst.sendall(data)
        except OSError:
            pass
        if src in self.frozen:
            return  # nothing gets through a partition, not even the end of the connection
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        """A network partition: the connections open now pass no byte either way and are never seen
        to close (each side finds out only by its heartbeat); new connections pass as usual."""
        with self.lock:
            self.frozen.update(self.sockets)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)

    def __enter__(self) -> BrokerPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
