#!/usr/bin/env python3
"""Invoke the echo Lambda over AMQP-RPC with pika, ``--concurrency`` requests in flight.

    python3 echo_amqp.py --function echo-lambda --uri amqp://guest:guest@localhost:5672/ --iterations 1000

The wire format (SPEC section 8): publish the payload to the default exchange with routing key =
the function name, ``reply_to`` = ``amq.rabbitmq.reply-to`` (RabbitMQ's direct reply-to, no reply
queue to declare) and a ``correlation_id``; the daemon answers to ``reply_to`` with the same
``correlation_id``, the function's result as the body and ``X-Amz-Function-Error`` in the headers
when the function failed. Requests are published ``mandatory``: if no daemon has declared the
function's queue, the broker returns the message and this client says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import pika

REPLY_TO = "amq.rabbitmq.reply-to"


class EchoClient:
    def __init__(self, uri: str, function: str) -> None:
        self.function = function
        self.connection = pika.BlockingConnection(pika.URLParameters(uri))
        self.channel = self.connection.channel()
        self.pending: dict = {}
        self.failed = 0
        self.unroutable = 0
        # Direct reply-to: consume the pseudo-queue (no ack) before the first publish.
        self.channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True)
        self.channel.add_on_return_callback(self._on_return)

    def publish(self, i: int) -> None:
        payload = {"key": "value", "i": i}
        correlation_id = str(uuid.uuid4())
        self.pending[correlation_id] = payload
        self.channel.basic_publish(
            exchange="", routing_key=self.function, body=json.dumps(payload).encode(), mandatory=True,
            properties=pika.BasicProperties(reply_to=REPLY_TO, correlation_id=correlation_id,
                                            content_type="application/json"))

    def _on_reply(self, channel, method, properties, body: bytes) -> None:
        payload = self.pending.pop(properties.correlation_id, None)
        if payload is None:
            return  # not ours (or a late reply after a timeout)
        error = (properties.headers or {}).get("X-Amz-Function-Error")
        if error or json.loads(body) != payload:
            print(f"unexpected reply to {payload['i']}: {error} {body[:200]!r}", file=sys.stderr)
            self.failed += 1

    def _on_return(self, channel, method, properties, body: bytes) -> None:
        if self.pending.pop(properties.correlation_id, None) is not None:
            self.unroutable += 1
            self.failed += 1

    def run(self, iterations: int, concurrency: int, timeout: float) -> None:
        sent = 0
        last_progress = time.monotonic()
        while sent < iterations or self.pending:
            while sent < iterations and len(self.pending) < concurrency:
                self.publish(sent)
                sent += 1
            before = len(self.pending)
            self.connection.process_data_events(time_limit=0.1)
            if len(self.pending) < before:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > timeout:
                print(f"no reply for {timeout:g} s: {len(self.pending)} requests unanswered", file=sys.stderr)
                self.failed += len(self.pending)
                self.pending.clear()

    def close(self) -> None:
        self.connection.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", default="echo-lambda", help="function name = queue name (default: echo-lambda)")
    parser.add_argument("--uri", default="amqp://guest:guest@localhost:5672/%2F", help="AMQP broker URI")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this long without a reply")
    args = parser.parse_args(argv)

    client = EchoClient(args.uri, args.function)
    started = time.perf_counter()
    try:
        client.run(args.iterations, max(1, args.concurrency), args.timeout)
    finally:
        client.close()
    elapsed = time.perf_counter() - started
    if client.unroutable:
        print(f"{client.unroutable} requests were returned by the broker: no queue named {args.function!r} "
              "(is a daemon running with AMQP_URI set?)", file=sys.stderr)
    print(f"AMQP-RPC (pika, {args.concurrency} in flight): {args.iterations} invocations in {elapsed:.2f} s: "
          f"{args.iterations / elapsed:.1f} invocations/s, {client.failed} failed")
    return 0 if client.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
