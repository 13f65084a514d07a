"""``amqp.aiormq_tuning``: the aiormq/pamqp internals the hot paths use, checked against the
installed (pinned) versions, and what they do against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import aio_pika
import aiormq.connection
import pytest
from pamqp.commands import Basic

from amqp_support import BROKER, require_broker, unique_name  # noqa: F401  (require_broker: autouse)
from lambda_rapid.amqp import aiormq_tuning
from lambda_rapid.amqp.aiormq_tuning import NO_DRAIN, CoalescingFrames

ROOT = Path(__file__).resolve().parent.parent


def test_installed_aiormq_has_every_internal_we_rely_on():
    assert aiormq_tuning.shape_problems() == []
    assert NO_DRAIN == {"wait": False}


def test_pins_match_what_is_installed():
    """The internals were checked against exactly these versions: pyproject.toml must pin them."""
    text = (ROOT / "pyproject.toml").read_text()
    for dist in ("aiormq", "pamqp"):
        pins = re.findall(rf'"{dist}==([^";]+); python_version >= \'3.11\'"', text)
        assert pins == [importlib.metadata.version(dist)], (dist, pins)
        assert re.search(rf'"{dist}==[^";]+; python_version < \'3.11\'"', text), dist


def test_a_library_of_another_shape_is_detected(monkeypatch):
    """If aiormq renamed or reshaped what we replace, the check says so and nothing is replaced."""
    class Renamed:
        def __init__(self, frames):
            self.frames = frames

    monkeypatch.setattr(aiormq_tuning, "_ORIGINAL_FRAMES", Renamed)
    monkeypatch.setattr(aiormq.connection, "FrameGenerator", Renamed)
    problems = aiormq_tuning.shape_problems()
    assert any("takes (queue)" in p for p in problems) and any(".queue and .close_event" in p for p in problems)
    assert aiormq_tuning.coalesce_writes() is False
    assert aiormq.connection.FrameGenerator is Renamed


def test_nothing_is_replaced_at_import():
    probe = ("import aiormq.connection as c; original = c.FrameGenerator; "
             "import lambda_rapid.amqp.link, lambda_rapid.invoke.amqp_rpc, lambda_rapid.server.router; "
             "print(c.FrameGenerator is original); "
             "import lambda_rapid.amqp.aiormq_tuning as t; print(t.coalesce_writes(), c.FrameGenerator is original)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]


def test_coalesce_writes_is_idempotent():
    original = aiormq.connection.FrameGenerator
    try:
        assert aiormq_tuning.coalesce_writes() and aiormq_tuning.coalesce_writes()
        assert aiormq.connection.FrameGenerator is CoalescingFrames
    finally:
        aiormq.connection.FrameGenerator = original


async def _queue_and_publish(name: str, count: int, writes: list) -> tuple:
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(name, auto_delete=False)
        underlay = await channel.get_underlay_channel()
        before = len(writes)
        await asyncio.gather(*(underlay.basic_publish(str(i).encode(), routing_key=name,
                                                      properties=Basic.Properties(delivery_mode=1), **NO_DRAIN)
                               for i in range(count)))
        written = len(writes) - before
        bodies, tags = [], []
        for _ in range(count):
            message = await queue.get(timeout=5, no_ack=False)
            bodies.append(int(message.body))
            tags.append(message.delivery_tag)
        # one batch of acks through the channel's write queue; unacked messages would go back to
        # the queue when the channel closes
        drained = asyncio.get_running_loop().create_future()
        assert aiormq_tuning.write_acks(underlay, tags, drained) is None
        await asyncio.wait_for(drained, 5)
        await channel.close()
        other = await connection.channel()
        left = (await other.declare_queue(name, passive=True)).declaration_result.message_count
        await other.queue_delete(name)
        return written, bodies, left
    finally:
        await connection.close()


def test_frames_queued_in_one_loop_turn_share_a_socket_write():
    """aiormq's writer sends what the channels queued in the same loop turn in one write, in queue
    order: 8 publishes started together reach the queue in order, in one or two writes. (Fewer than
    aiormq's 10-frame write queue: past that, its channel lock lets one publish through per turn.)
    The acks written as one batch ack every message."""
    writes = []  # one entry per writer.write() of aiormq's connection writer
    original = aiormq.connection.FrameGenerator
    assert aiormq_tuning.coalesce_writes()

    class Counting(CoalescingFrames):
        async def __anext__(self):
            frame = await super().__anext__()
            writes.append(len(frame.payload))
            return frame

    aiormq.connection.FrameGenerator = Counting
    try:
        written, bodies, left = asyncio.run(_queue_and_publish(unique_name("tuning-coalesce"), 8, writes))
    finally:
        aiormq.connection.FrameGenerator = original
    assert bodies == list(range(8))
    assert written <= 2, written  # one per publish without the batching
    assert left == 0


def test_broker_errors_are_recognised():
    async def run() -> tuple:
        connection = await aio_pika.connect(BROKER)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            with pytest.raises(Exception) as missing:
                await channel.declare_queue(unique_name("tuning-missing"), passive=True)
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            underlay = await channel.get_underlay_channel()
            with pytest.raises(Exception) as returned:
                await underlay.basic_publish(b"{}", exchange="", routing_key=unique_name("tuning-nobody"),
                                             mandatory=True, properties=Basic.Properties(delivery_mode=1))
            cancels: list = []
            assert aiormq_tuning.on_consumer_cancel(underlay, cancels.append)
            name = unique_name("tuning-cancel")
            queue = await channel.declare_queue(name, auto_delete=False)
            async def ignore(_message) -> None:
                pass

            await queue.consume(ignore)
            other = await connection.channel()
            await other.queue_delete(name)
            for _ in range(100):
                if cancels:
                    break
                await asyncio.sleep(0.02)
            return missing.value, returned.value, cancels
        finally:
            await connection.close()

    missing, returned, cancels = asyncio.run(run())
    assert aiormq_tuning.is_not_found(missing) and not aiormq_tuning.is_returned(missing)
    assert aiormq_tuning.is_returned(returned) and not aiormq_tuning.is_not_found(returned)
    assert cancels, "the broker's consumer cancel was not reported"
