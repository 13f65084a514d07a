#!/usr/bin/env python3
"""Invoke the echo Lambda from asyncio with aiobotocore, ``--concurrency`` invocations at a time.

    python3 echo_aiobotocore.py --function echo-lambda --endpoint http://localhost:8080 --iterations 1000

aiobotocore is the asyncio botocore that aioboto3 wraps: ``aioboto3.Session().client("lambda")``
gives this same client object, so the code below is what an aioboto3 user writes after that line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session


async def run(function: str, endpoint: str, iterations: int, concurrency: int) -> int:
    options = {}
    if endpoint:
        options = {"endpoint_url": endpoint, "aws_access_key_id": "local", "aws_secret_access_key": "local"}
    config = AioConfig(max_pool_connections=max(10, concurrency), retries={"total_max_attempts": 1},
                       read_timeout=900)
    session = get_session()
    failed = 0
    async with session.create_client("lambda", region_name="us-east-1", config=config, **options) as client:
        todo = iter(range(iterations))

        async def worker() -> None:
            nonlocal failed
            for i in todo:
                payload = {"key": "value", "i": i}
                response = await client.invoke(FunctionName=function, Payload=json.dumps(payload).encode())
                async with response["Payload"] as stream:
                    body = await stream.read()
                if response.get("FunctionError") or json.loads(body) != payload:
                    print(f"unexpected reply to {i}: {body[:200]!r}", file=sys.stderr)
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", default="echo-lambda", help="function name or ARN (default: echo-lambda)")
    parser.add_argument("--endpoint", default="http://localhost:8080", help="Invoke API URL ('' = AWS)")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="invocations in flight at once")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    failed = asyncio.run(run(args.function, args.endpoint, args.iterations, args.concurrency))
    elapsed = time.perf_counter() - started
    print(f"aiobotocore (asyncio, {args.concurrency} at a time): {args.iterations} invocations in {elapsed:.2f} s: "
          f"{args.iterations / elapsed:.1f} invocations/s, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
