"""Clients for the end-to-end tests: boto3 and raw sockets pointed at a daemon started by conftest."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Optional

import boto3
import botocore.config

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ARN_PREFIX = "arn:aws:lambda:us-east-1:012345678912:function:"


def lambda_client(url: str, read_timeout: float = 30.0):
    """A boto3 Lambda client for a local daemon: fake credentials, and no retries (a retried 429
    or 5xx would hide what the daemon answered)."""
    return boto3.client(
        "lambda", endpoint_url=url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                      read_timeout=read_timeout, connect_timeout=5))


def read_payload(response) -> object:
    return json.loads(response["Payload"].read())


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, shut_write: bool = False) -> bytes:
    """Send raw bytes and return everything the server sends until it closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status_of(raw: bytes) -> Optional[int]:
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


def metric(text: str, name: str) -> float:
    """The value of one sample (``name`` includes labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not found in:\n{text}")


def in_thread(target, *args, **kwargs):
    """Run ``target`` in a daemon thread: (thread, box) where box gets "result" or "error"."""
    box: dict = {}

    def run():
        try:
            box["result"] = target(*args, **kwargs)
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box
