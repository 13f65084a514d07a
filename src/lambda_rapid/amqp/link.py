"""One connection and one publisher-confirm channel to RabbitMQ, kept up until closed.

Shared by the daemon's AMQP-RPC front door (``amqp_rpc``) and the Lambda Server (``server``). It owns
the connect / set-up / lost / reconnect cycle only: the URI's ``connection_attempts`` and
``retry_delay`` (pika's meanings) pace the first attempts, after which it keeps trying in the
background with a capped backoff and never gives up. What to declare and consume on a fresh channel
is the owner's ``setup``; what to do with work tied to a dead channel is the owner's ``on_lost``.
Before its first connection it installs ``aiormq_tuning``'s batched writer. It never logs a
password (URIs go through ``config.redact_uri``) and imports aio-pika, so nothing on the HTTP-only
path may import it.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Awaitable, Callable, Optional

import aio_pika

from ..config import redact_uri
from .aiormq_tuning import coalesce_writes

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0  # seconds between attempts once connection_attempts are used up
CONNECT_TIMEOUT = 10.0


def header_text(value: object) -> Optional[str]:
    """An AMQP property or header value as text (publishers send str or bytes)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def split_uri(uri: str) -> tuple:
    """(uri for aio-pika, connection_attempts, retry_delay) with pika's defaults (1 attempt, 2 s).

    ``heartbeat`` stays in the URI: aiormq reads it, and ``heartbeat=0`` turns heartbeats off as in
    pika (not "use the server's value", as some clients read 0).
    """
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    attempts, delay, kept = 1, 2.0, []
    for key, value in query:
        if key == "connection_attempts":
            attempts = max(1, int(value))
        elif key == "retry_delay":
            delay = max(0.0, float(value))
        elif key == "heartbeat":
            kept.append((key, str(int(float(value)))))
        else:
            kept.append((key, value))
    clean = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
    return clean, attempts, delay


class BrokerLink:
    """Connect, run ``setup(channel)``, wait for the loss, tell ``on_lost``, reconnect; until closed."""

    def __init__(self, uri: str, name: str, setup: Callable[[aio_pika.abc.AbstractChannel], Awaitable[None]],
                 on_lost: Optional[Callable[[], None]] = None) -> None:
        self.uri, self.attempts, self.retry_delay = split_uri(uri)
        self.shown = redact_uri(uri)
        self.secret = urllib.parse.urlsplit(uri).password or None
        self.name = name
        self.setup = setup
        self.on_lost = on_lost
        self.connection: Optional[aio_pika.abc.AbstractConnection] = None
        self.channel: Optional[aio_pika.abc.AbstractChannel] = None
        self.underlay = None  # the aiormq channel: the hot path publishes and acks on it directly
        self.generation = 0  # bumped on every new channel, so work can tell which channel it came from
        self.connected = asyncio.Event()
        self.closing = False
        self._task: Optional[asyncio.Task] = None
        self._lost: Optional[asyncio.Future] = None

    @property
    def is_up(self) -> bool:
        return self.underlay is not None

    def start(self) -> None:
        coalesce_writes()  # the connections opened from now on write one batch per loop turn
        self._task = asyncio.get_event_loop().create_task(self._run(), name=f"amqp-{self.name}")

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` failed ones in a row."""
        if failures < self.attempts:
            return self.retry_delay
        extra = failures - self.attempts + 1
        return min(max(self.retry_delay, 0.5) * (2 ** min(extra, 16)), max(MAX_BACKOFF, self.retry_delay))

    async def _run(self) -> None:
        failures = 0
        while not self.closing:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                wait = self.delay(failures)
                reason = self.describe(e)
                if failures == self.attempts:
                    log.error("%s: no AMQP connection to %s after %d attempts (%s); still serving HTTP and "
                              "retrying in the background every %.0f s at most", self.name, self.shown, failures,
                              reason, max(MAX_BACKOFF, self.retry_delay))
                elif failures < self.attempts:
                    log.warning("%s: AMQP connection to %s failed (attempt %d of %d): %s; retrying in %g s",
                                self.name, self.shown, failures, self.attempts, reason, wait)
                else:
                    log.info("%s: AMQP connection to %s failed again: %s; retrying in %g s", self.name,
                             self.shown, reason, wait)
                await self._drop()
                if not self.closing:
                    await asyncio.sleep(wait)
                continue
            failures = 0
            log.info("%s: connected to %s", self.name, self.shown)
            self.connected.set()
            assert self._lost is not None
            reason = await self._lost
            self.connected.clear()
            self.underlay = None
            if self.closing:
                break
            log.warning("%s: AMQP connection to %s lost: %s; reconnecting", self.name, self.shown, reason)
            if self.on_lost is not None:
                try:
                    self.on_lost()
                except Exception:
                    log.exception("%s: error while handling the lost connection", self.name)
            await self._drop()

    async def _connect(self) -> None:
        loop = asyncio.get_event_loop()
        lost = self._lost = loop.create_future()

        def mark_lost(_sender: object = None, exc: object = None, *_args: object) -> None:
            if not lost.done():
                lost.set_result(self.describe(exc) if exc is not None else "closed")

        connection = await aio_pika.connect(self.uri, timeout=CONNECT_TIMEOUT,
                                            client_properties={"connection_name": self.name})
        self.connection = connection
        connection.close_callbacks.add(mark_lost)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel.close_callbacks.add(mark_lost)
        self.channel = channel
        underlay = await channel.get_underlay_channel()
        self.generation += 1
        await self.setup(channel)
        self.underlay = underlay
        if lost.done():
            raise ConnectionError(lost.result())

    async def _drop(self) -> None:
        self.underlay = None
        self.channel = None
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 5.0)
            except Exception:
                pass

    async def close(self) -> None:
        """Close the connection for good (the broker requeues anything still unacked)."""
        self.closing = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result("closing")
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
        await self._drop()

    def describe(self, exc: object) -> str:
        """One line about an error, for logs; never the password, even if a library put it in."""
        text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
        if self.secret:
            text = text.replace(self.secret, "xxxxx")
        return text[:300]
