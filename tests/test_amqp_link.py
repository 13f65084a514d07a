"""BrokerLink's URI handling and retry pacing (pure functions; the reconnects themselves are tested
end to end in test_amqp_rpc.py and test_lambda_server.py)."""

from __future__ import annotations

import asyncio

from lambda_rapid.amqp.link import MAX_BACKOFF, BrokerLink, split_uri


def test_split_uri_takes_out_pika_only_parameters():
    uri, attempts, delay = split_uri("amqp://u:p@h:5672/vh?connection_attempts=20&retry_delay=10&heartbeat=0")
    assert (attempts, delay) == (20, 10.0)
    assert uri == "amqp://u:p@h:5672/vh?heartbeat=0"
    uri, attempts, delay = split_uri("amqp://h/?heartbeat=30.0&name=x")
    assert (attempts, delay) == (1, 2.0)  # pika's defaults
    assert uri == "amqp://h/?heartbeat=30&name=x"


def test_retry_pacing_then_capped_backoff():
    async def make():
        return BrokerLink("amqp://h/?connection_attempts=3&retry_delay=1", "t", setup=None)

    link = asyncio.run(make())
    assert [link.delay(n) for n in (1, 2)] == [1.0, 1.0]
    backoff = [link.delay(n) for n in range(3, 12)]
    assert backoff == sorted(backoff) and backoff[0] > 1.0
    assert max(backoff) == MAX_BACKOFF


def test_password_is_scrubbed_from_error_text():
    async def make():
        return BrokerLink("amqp://user:hunter2@h/", "t", setup=None)

    link = asyncio.run(make())
    assert "hunter2" not in link.describe(RuntimeError("login hunter2 refused"))
    assert "hunter2" not in link.shown



def test_frames_queued_in_one_loop_turn_share_a_socket_write():
    """aiormq's writer sends what the channels queued in the same loop turn in one write, in queue
    order: 8 publishes started together reach the queue in order, in one or two writes. (Fewer than
    aiormq's 10-frame write queue: past that, its channel lock lets one publish through per turn.)"""
    import aio_pika
    import aiormq.connection
    from pamqp.commands import Basic

    from amqp_support import BROKER, require_broker, unique_name  # noqa: F401
    from lambda_rapid.amqp.link import COALESCING, NO_DRAIN

    assert COALESCING
    name = unique_name("link-coalesce")
    writes = []  # one entry per writer.write() of aiormq's connection writer
    generator = aiormq.connection.FrameGenerator

    class Counting(generator):
        async def __anext__(self):
            frame = await super().__anext__()
            writes.append(len(frame.payload))
            return frame

    async def run() -> tuple:
        connection = await aio_pika.connect(BROKER)
        try:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(name, auto_delete=False)
            underlay = await channel.get_underlay_channel()
            before = len(writes)
            await asyncio.gather(*(underlay.basic_publish(str(i).encode(), routing_key=name,
                                                          properties=Basic.Properties(delivery_mode=1), **NO_DRAIN)
                                   for i in range(8)))
            written = len(writes) - before
            bodies = []
            for _ in range(8):
                message = await queue.get(timeout=5)
                bodies.append(int(message.body))
                await message.ack()
            await queue.delete(if_unused=False, if_empty=False)
            return written, bodies
        finally:
            await connection.close()

    aiormq.connection.FrameGenerator = Counting
    try:
        written, bodies = asyncio.run(run())
    finally:
        aiormq.connection.FrameGenerator = generator
    assert bodies == list(range(8))
    assert written <= 2, written  # one per publish without the batching
