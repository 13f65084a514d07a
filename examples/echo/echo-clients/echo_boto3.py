#!/usr/bin/env python3
"""Invoke the echo Lambda with boto3: a plain loop, or a thread pool with ``--threads N``.

    python3 echo_boto3.py --function echo-lambda --endpoint http://localhost:8080 --iterations 1000
    python3 echo_boto3.py --threads 8 --iterations 5000

Each reply is checked against the payload sent; the rate is printed at the end. Works against the
daemon, the Lambda Server, or AWS itself (omit --endpoint; real credentials are then needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config


def make_client(endpoint: str, threads: int):
    options = {}
    if endpoint:
        # A local daemon checks no signature, but botocore insists on some credentials.
        options = {"endpoint_url": endpoint, "aws_access_key_id": "local", "aws_secret_access_key": "local"}
    return boto3.client("lambda", region_name="us-east-1", **options, config=botocore.config.Config(
        max_pool_connections=max(10, threads), retries={"total_max_attempts": 1},
        read_timeout=900, tcp_keepalive=True))


def invoke_once(client, function: str, i: int) -> bool:
    payload = {"key": "value", "i": i}
    response = client.invoke(FunctionName=function, Payload=json.dumps(payload).encode())
    body = response["Payload"].read()
    if response.get("FunctionError") or json.loads(body) != payload:
        print(f"unexpected reply to {i}: {response.get('FunctionError')} {body[:200]!r}", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", default="echo-lambda", help="function name or ARN (default: echo-lambda)")
    parser.add_argument("--endpoint", default="http://localhost:8080", help="Invoke API URL ('' = AWS)")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="1 = a plain loop (default)")
    args = parser.parse_args(argv)

    client = make_client(args.endpoint, args.threads)
    started = time.perf_counter()
    if args.threads <= 1:
        ok = sum(invoke_once(client, args.function, i) for i in range(args.iterations))
    else:
        with ThreadPoolExecutor(args.threads) as pool:
            ok = sum(pool.map(lambda i: invoke_once(client, args.function, i), range(args.iterations)))
    elapsed = time.perf_counter() - started
    mode = "loop" if args.threads <= 1 else f"{args.threads} threads"
    print(f"boto3 ({mode}): {args.iterations} invocations in {elapsed:.2f} s: "
          f"{args.iterations / elapsed:.1f} invocations/s, {args.iterations - ok} failed")
    return 0 if ok == args.iterations else 1


if __name__ == "__main__":
    sys.exit(main())
