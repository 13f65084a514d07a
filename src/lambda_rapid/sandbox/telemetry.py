"""Telemetry API (``PUT /2022-07-01/telemetry``) and Logs API (``PUT /2020-08-15/logs``) for one
instance: its extensions' subscriptions, the AWS-shaped events the instance produces, and their
batched delivery to each subscriber's local HTTP (or TCP) listener.

Delivery is asynchronous and bounded: each subscription has a capped buffer and one sender task.
A slow, dead or silent subscriber loses events (counted, then reported to it as
``platform.logsDropped``); it never slows an invocation. Nothing here knows about the pool: the
extensions layer calls :meth:`Telemetry.emit` and :meth:`Telemetry.output`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections import deque
from typing import Dict, Optional

log = logging.getLogger(__name__)

TELEMETRY_SCHEMAS = ("2022-07-01", "2022-12-13", "2025-01-29")
# Lambda Managed Instances accept only the newest ("Lambda Managed Instances require 2025-01-29":
# https://docs.aws.amazon.com/lambda/latest/dg/telemetry-api-reference.html; AWS's RAPID for them
# validates against a schema with that one value: telemetry-subscription-schema.json).
MANAGED_INSTANCES_SCHEMAS = ("2025-01-29",)
STREAMS = ("platform", "function", "extension")
# AWS's buffering defaults and bounds (name: (default, minimum, maximum)), Telemetry and Logs API.
BUFFERING = {"maxItems": (10000, 1000, 10000), "maxBytes": (262144, 262144, 1048576),
             "timeoutMs": (1000, 25, 30000)}
# Destinations must be inside the "sandbox"; AWS's examples use sandbox.localdomain.
LOCAL_HOSTS = {"sandbox.localdomain": "127.0.0.1", "sandbox": "127.0.0.1", "localhost": "127.0.0.1",
               "127.0.0.1": "127.0.0.1", "::1": "::1", "0.0.0.0": "127.0.0.1"}
POST_TIMEOUT = 5.0  # a subscriber that has not answered a batch by then loses it
ATTEMPTS = 3  # tries per batch when the listener is not there (yet) or answers an error
PENDING_FACTOR = 4  # a subscription holds at most this many batches' worth of events
BACKLOG_LIMIT = 2000  # events kept from the instance's start until its init completes
DROPPED_REASON = "Consumer seems to have fallen behind as it has not acknowledged receipt of logs."


def timestamp(epoch: Optional[float] = None) -> str:
    t = time.time() if epoch is None else epoch
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class SubscribeError(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class Event:
    """One telemetry event, encoded once per API shape on first use."""

    __slots__ = ("time", "type", "stream", "record", "legacy", "_encoded", "_legacy_encoded")

    def __init__(self, stream: str, type_: str, record, legacy=None) -> None:
        self.time = timestamp()
        self.stream = stream
        self.type = type_
        self.record = record
        self.legacy = legacy  # (type, record) for the Logs API, or None: the Logs API has no such event
        self._encoded: Optional[bytes] = None
        self._legacy_encoded: Optional[bytes] = None

    def encoded(self, api: str) -> Optional[bytes]:
        if api == "telemetry":
            if self._encoded is None:
                self._encoded = json.dumps({"time": self.time, "type": self.type, "record": self.record},
                                           separators=(",", ":")).encode()
            return self._encoded
        if self.legacy is None:
            return None
        if self._legacy_encoded is None:
            type_, record = self.legacy
            self._legacy_encoded = json.dumps({"time": self.time, "type": type_, "record": record},
                                              separators=(",", ":")).encode()
        return self._legacy_encoded


def parse_subscription(api: str, body: bytes, managed_instances: bool = False) -> dict:
    """Validate a subscribe request body; raise SubscribeError with AWS's error on any problem."""
    def invalid(message: str) -> SubscribeError:
        return SubscribeError(400, "ValidationError", message)

    try:
        doc = json.loads(body or b"null")
    except ValueError as e:
        raise invalid(f"could not parse the request body as JSON: {e}") from None
    if not isinstance(doc, dict):
        raise invalid("the request body must be a JSON object")
    problems = []
    if api == "telemetry":
        schema = doc.get("schemaVersion")
        if managed_instances and schema not in MANAGED_INSTANCES_SCHEMAS:
            problems.append(f"schemaVersion must be {MANAGED_INSTANCES_SCHEMAS[0]} on Lambda Managed Instances "
                            "(AWS_LAMBDA_MAX_CONCURRENCY is set)")
        elif schema not in TELEMETRY_SCHEMAS:
            problems.append(f"schemaVersion must be one of {', '.join(TELEMETRY_SCHEMAS)}")
    types = doc.get("types")
    if not isinstance(types, list) or not types:
        problems.append("types should not be empty")
    elif any(t not in STREAMS for t in types):
        problems.append(f"types must be among {', '.join(STREAMS)}")
    buffering = doc.get("buffering") or {}
    settings = {}
    if not isinstance(buffering, dict):
        problems.append("buffering must be an object")
        buffering = {}
    for key, (default, low, high) in BUFFERING.items():
        value = buffering.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"buffering.{key} must be an integer between {low} and {high}")
        settings[key] = value
    destination = doc.get("destination")
    host = port = path = protocol = None
    if not isinstance(destination, dict):
        problems.append("destination should not be empty")
    else:
        protocol = destination.get("protocol")
        if protocol not in ("HTTP", "TCP"):
            problems.append("destination.protocol must be HTTP or TCP")
        uri = destination.get("URI")
        if not isinstance(uri, str) or not uri:
            problems.append("destination.URI should not be empty")
        else:
            parts = urllib.parse.urlsplit(uri if "://" in uri else "tcp://" + uri)
            try:
                port = parts.port
            except ValueError:
                port = None
            host = LOCAL_HOSTS.get((parts.hostname or "").lower())
            if protocol == "HTTP" and parts.scheme != "http":
                problems.append("URI scheme must be http (Lambda delivers over plain HTTP)")
            if port is None:
                problems.append("URI port is not provided")
            if host is None:
                problems.append("URI host must be sandbox.localdomain, sandbox, localhost or 127.0.0.1 "
                                "(telemetry is delivered inside the execution environment only)")
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
    if problems:
        raise invalid("; ".join(problems))
    return {"types": tuple(types), "protocol": protocol, "host": host, "port": port, "path": path,
            "max_items": settings["maxItems"], "max_bytes": settings["maxBytes"],
            "timeout": settings["timeoutMs"] / 1000.0}


class Subscription:
    """One extension's subscription: a bounded buffer of encoded events and the task sending them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, api: str, spec: dict) -> None:
        self.loop = loop
        self.name = name
        self.api = api
        self.types = spec["types"]
        self.protocol = spec["protocol"]
        self.host = spec["host"]
        self.port = spec["port"]
        self.path = spec["path"]
        self.max_items = spec["max_items"]
        self.max_bytes = spec["max_bytes"]
        self.timeout = spec["timeout"]
        self.pending: deque = deque()
        self.pending_bytes = 0
        self.dropped_records = 0
        self.dropped_bytes = 0
        self.total_dropped = 0
        self.delivered = 0
        self.closed = False
        self.urgent = False
        self.wake = asyncio.Event()
        self.timer: Optional[asyncio.TimerHandle] = None
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None
        self.task = loop.create_task(self._run())

    # ---- buffering (synchronous, cheap) --------------------------------------------------------
    def add(self, data: bytes) -> None:
        if self.closed:
            return
        if (len(self.pending) >= self.max_items * PENDING_FACTOR
                or self.pending_bytes + len(data) > self.max_bytes * PENDING_FACTOR):
            self.dropped_records += 1
            self.dropped_bytes += len(data)
            self.total_dropped += 1
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if len(self.pending) >= self.max_items or self.pending_bytes >= self.max_bytes:
            self.wake.set()
        elif self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        self.wake.set()

    def flush(self) -> None:
        """Send what is buffered now (the instance is shutting down)."""
        self.urgent = True
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.task.cancel()
        self._disconnect()

    # ---- delivery (the sender task) ------------------------------------------------------------
    def _take_batch(self) -> list:
        batch = []
        size = 0
        pending = self.pending
        while pending and len(batch) < self.max_items and (not batch or size + len(pending[0]) <= self.max_bytes):
            item = pending.popleft()
            size += len(item)
            batch.append(item)
        self.pending_bytes -= size
        if self.dropped_records:
            record = {"reason": DROPPED_REASON, "droppedRecords": self.dropped_records,
                      "droppedBytes": self.dropped_bytes}
            batch.insert(0, json.dumps({"time": timestamp(), "type": "platform.logsDropped", "record": record},
                                       separators=(",", ":")).encode())
            self.dropped_records = self.dropped_bytes = 0
        return batch

    async def _run(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                while self.pending or self.dropped_records:
                    batch = self._take_batch()
                    if not await self._deliver(batch):
                        self.dropped_records += len(batch)
                        self.dropped_bytes += sum(len(b) for b in batch)
                        self.total_dropped += len(batch)
                    if not (len(self.pending) >= self.max_items or self.pending_bytes >= self.max_bytes
                            or self.urgent):
                        break
                if (self.pending or self.dropped_records) and self.timer is None:
                    self.timer = self.loop.call_later(self.timeout, self._timer_fired)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("telemetry sender for extension %s failed", self.name)
        finally:
            self._disconnect()

    async def _deliver(self, batch: list) -> bool:
        delay = 0.05
        for attempt in range(ATTEMPTS):
            try:
                if self.protocol == "TCP":
                    await asyncio.wait_for(self._send_tcp(batch), POST_TIMEOUT)
                    self.delivered += len(batch)
                    return True
                status = await asyncio.wait_for(self._post(b"[" + b",".join(batch) + b"]"), POST_TIMEOUT)
                if status < 500:
                    self.delivered += len(batch)
                    return True
                log.info("telemetry listener of extension %s answered %d", self.name, status)
            except asyncio.TimeoutError:
                log.info("telemetry listener of extension %s did not answer within %.0f s; batch of %d dropped",
                         self.name, POST_TIMEOUT, len(batch))
                self._disconnect()
                return False
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                log.debug("telemetry delivery to extension %s failed: %s", self.name, e)
                self._disconnect()
            if attempt + 1 < ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 4
        return False

    async def _connect(self) -> tuple:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    def _disconnect(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _send_tcp(self, batch: list) -> None:
        _, writer = await self._connect()
        writer.write(b"\n".join(batch) + b"\n")
        await writer.drain()

    async def _post(self, body: bytes) -> int:
        """POST one batch over a kept-alive connection; return the status code."""
        reader, writer = await self._connect()
        host = f"[{self.host}]" if ":" in self.host else self.host
        writer.write(f"POST {self.path} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("connection closed before a response")
        version, _, rest = status_line.decode("latin-1").partition(" ")
        status = int(rest[:3])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        keep = version == "HTTP/1.1" and headers.get("connection") != "close"
        if "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif status not in (204, 304):
            await reader.read()  # body runs to the end of the connection
            keep = False
        if not keep:
            self._disconnect()
        return status


class Telemetry:
    """The telemetry of one instance: the subscriptions of its extensions and the events it emits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, managed_instances: bool = False) -> None:
        self.loop = loop
        self.managed_instances = managed_instances  # AWS's Lambda Managed Instances rules for subscriptions
        self.subscriptions: Dict[str, Subscription] = {}  # extension id -> its subscription
        self.backlog: Optional[deque] = deque(maxlen=BACKLOG_LIMIT)  # until init completes
        self.wants = {"platform": False, "function": False, "extension": False}

    @property
    def active(self) -> bool:
        return bool(self.subscriptions) or self.backlog is not None

    def subscribe(self, extension_id: str, name: str, api: str, body: bytes) -> None:
        """Add (or replace) an extension's subscription; raises SubscribeError."""
        current = self.subscriptions.get(extension_id)
        if current is not None and current.api != api:
            other = "Telemetry API" if current.api == "telemetry" else "Logs API"
            raise SubscribeError(400, "ValidationError",
                                 f"extension {name} already subscribed with the {other}; use one API only")
        spec = parse_subscription(api, body, self.managed_instances)
        if current is not None:
            current.close()
        sub = Subscription(self.loop, name, api, spec)
        self.subscriptions[extension_id] = sub
        self._recompute()
        if self.backlog:
            for event in self.backlog:
                if event.stream in sub.types:
                    data = event.encoded(api)
                    if data is not None:
                        sub.add(data)
        types = list(spec["types"])
        if api == "telemetry":
            self.emit("platform", "platform.telemetrySubscription",
                      {"name": name, "state": "Subscribed", "types": types})
        else:
            self.emit("platform", "platform.logsSubscription", None,
                      legacy=("platform.logsSubscription", {"name": name, "state": "Subscribed", "types": types}),
                      only_legacy=True)
        log.info("extension %s subscribed to the %s API for %s: %s://%s:%s%s", name,
                 "Telemetry" if api == "telemetry" else "Logs", ", ".join(types), spec["protocol"].lower(),
                 spec["host"], spec["port"], spec["path"])

    def _recompute(self) -> None:
        for stream in STREAMS:
            self.wants[stream] = any(stream in s.types for s in self.subscriptions.values())

    def emit(self, stream: str, type_: str, record, legacy=None, only_legacy: bool = False) -> None:
        if not self.wants[stream] and self.backlog is None:
            return
        event = Event(stream, type_, record, legacy)
        if self.backlog is not None and not only_legacy:
            self.backlog.append(event)
        for sub in self.subscriptions.values():
            if stream in sub.types and not (only_legacy and sub.api == "telemetry"):
                data = event.encoded(sub.api)
                if data is not None:
                    sub.add(data)

    def output(self, stream: str, data: bytes) -> None:
        """Whole lines a process printed: one ``function`` (or ``extension``) event per line."""
        if not self.wants[stream] and self.backlog is None:
            return
        for line in data.decode("utf-8", "replace").splitlines():
            self.emit(stream, stream, line, legacy=(stream, line))

    def init_done(self) -> None:
        self.backlog = None

    def flush(self) -> None:
        for sub in self.subscriptions.values():
            sub.flush()

    def close(self) -> None:
        for sub in self.subscriptions.values():
            if sub.total_dropped:
                log.info("telemetry subscription of extension %s ended: %d events delivered, %d dropped",
                         sub.name, sub.delivered, sub.total_dropped)
            sub.close()
        self.subscriptions.clear()
        self.backlog = None
        self._recompute()
