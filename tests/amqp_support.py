"""Helpers for the AMQP tests: a plain pika RPC client, queue probes and lambda-server start-up.

Everything talks to the real RabbitMQ on 127.0.0.1:5672 (guest/guest). Every test names its own
queue (function), so tests can run side by side with other engineers' tests.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

import pika
import pytest

from conftest import BIN, ROOT, Proc, daemon_env, free_port, wait_until

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


def wait_consumers(queue: str, count: int = 1, timeout: float = 15.0) -> None:
    wait_until(lambda: consumers(queue) >= count, timeout, 0.05, f"{count} consumer(s) on {queue}")


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
             reply: bool = True) -> str:
        cid = correlation_id if correlation_id is not None else str(uuid.uuid4())
        props = pika.BasicProperties(reply_to="amq.rabbitmq.reply-to" if reply else None, correlation_id=cid,
                                     content_type="application/json", headers=headers)
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
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120,
                   env=dict(os.environ, HOME=os.environ.get("HOME", "/root")))


def functions_dir() -> Path:
    return Path(__file__).resolve().parent / "functions"
