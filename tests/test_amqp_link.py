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
