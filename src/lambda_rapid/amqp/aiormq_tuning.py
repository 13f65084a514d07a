"""Every use of aiormq's and pamqp's internals, in one place, for the pinned versions (pyproject.toml).

Three things the hot paths need that aio-pika's public API does not give:

* **one socket write per loop turn**: ``CoalescingFrames`` replaces aiormq's connection writer
  loop (``aiormq.connection.FrameGenerator``, which the writer looks up by that name when a
  connection starts) so that the frames the channels queued in the same turn go out together.
  :func:`coalesce_writes` installs it; ``BrokerLink`` calls it before it connects. Nothing is
  replaced at import time.
* **acks as one marshalled batch** on a channel's write queue (:func:`write_acks`), so that the
  acks that waited for the next reply share its write, with no task per ack.
* **no wait for the socket drain** on publish and ack (:data:`NO_DRAIN`), when aiormq offers it.

And two things aiormq has no documented way to say: whether the broker cancelled a consumer
(:func:`on_consumer_cancel`, aiormq 7 only) and which errors mean "no such queue" or "returned
as unroutable" (:func:`is_not_found`, :func:`is_returned`).

:func:`shape_problems` lists what of this the installed aiormq lacks; ``tests/test_aiormq_tuning.py``
fails on any, and :func:`coalesce_writes` leaves a library that changed shape alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
import logging
from typing import Callable, Coroutine, Iterable, Optional

import aiormq
import aiormq.connection
import aiormq.exceptions
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

log = logging.getLogger(__name__)

# aiormq 6.8 and 7 can hand a frame to its writer without waiting for the socket to drain: one
# task switch less per publish and per ack.
NO_DRAIN = {"wait": False} if "wait" in inspect.signature(aiormq.Channel.basic_ack).parameters else {}
_ORIGINAL_FRAMES = getattr(aiormq.connection, "FrameGenerator", None)


class CoalescingFrames(_ORIGINAL_FRAMES or object):  # type: ignore[misc]
    """aiormq's connection writer, fed one write per *batch*: whatever frames the channels queued
    in the same loop turn (a reply and the acks piggy-backed on it, several publishes) go out in
    one socket write instead of one each. Each ``ChannelFrame`` is already marshalled by aiormq;
    this only joins their bytes, in queue order. A frame that closes the connection, or one
    queued behind the first that waits for the drain, is sent on its own as aiormq does.
    On a loopback socket a write is the largest single cost per message (~40 us of CPU)."""

    def __init__(self, queue: asyncio.Queue) -> None:
        super().__init__(queue)
        self.held: Optional[ChannelFrame] = None

    async def __anext__(self) -> ChannelFrame:
        frame = self.held
        if frame is not None and not self.close_event.is_set():
            self.held = None
        else:
            frame = await super().__anext__()
        queue = self.queue
        if frame.should_close or queue.empty():
            return frame
        parts = [frame.payload]
        while not queue.empty():
            queued = queue.get_nowait()
            queue.task_done()
            if queued.should_close or queued.drain_future is not None:
                self.held = queued
                break
            parts.append(queued.payload)
        if len(parts) == 1:
            return frame
        return ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=frame.drain_future)


def shape_problems() -> list:
    """What this module relies on and the installed aiormq/pamqp lack (empty: all is there)."""
    problems = []
    generator = _ORIGINAL_FRAMES
    if not inspect.isclass(generator):
        problems.append("aiormq.connection.FrameGenerator is not a class")
    else:
        if list(inspect.signature(generator.__init__).parameters) != ["self", "queue"]:
            problems.append("FrameGenerator.__init__ no longer takes (queue)")
        if not {"queue", "close_event"} <= set(generator.__init__.__code__.co_names):
            problems.append("FrameGenerator no longer keeps .queue and .close_event")
        if not inspect.iscoroutinefunction(getattr(generator, "__anext__", None)):
            problems.append("FrameGenerator.__anext__ is not a coroutine function")
    writer = getattr(aiormq.connection.Connection, "_Connection__writer", None)
    if writer is None or "FrameGenerator" not in writer.__code__.co_names:
        problems.append("aiormq's connection writer no longer builds FrameGenerator by its module name")
    fields = {f.name for f in dataclasses.fields(ChannelFrame)} if dataclasses.is_dataclass(ChannelFrame) else set()
    if not {"payload", "should_close", "drain_future"} <= fields:
        problems.append("ChannelFrame lost payload/should_close/drain_future")
    marshall = getattr(ChannelFrame, "marshall", None)
    if marshall is None or not {"channel_number", "frames", "drain_future"} <= set(
            inspect.signature(marshall).parameters):
        problems.append("ChannelFrame.marshall(channel_number, frames, drain_future) is gone")
    if not {"write_queue", "number"} <= set(aiormq.Channel.__init__.__code__.co_names):
        problems.append("aiormq.Channel no longer keeps .write_queue and .number")
    for method in ("basic_publish", "basic_ack", "basic_nack"):
        if "wait" not in inspect.signature(getattr(aiormq.Channel, method)).parameters:
            problems.append(f"aiormq.Channel.{method} no longer takes wait=")
    for name in ("ChannelNotFoundEntity", "PublishError"):
        if not inspect.isclass(getattr(aiormq.exceptions, name, None)):
            problems.append(f"aiormq.exceptions.{name} is gone")
    if "delivery_tag" not in inspect.signature(Basic.Ack).parameters:
        problems.append("pamqp's Basic.Ack no longer takes delivery_tag")
    return problems


def coalesce_writes() -> bool:
    """Make the connections opened from now on write one batch per loop turn. Process-wide (aiormq
    builds its writer from a module-level name) and idempotent; False, and aiormq left as it is,
    when aiormq no longer has the shape this relies on."""
    if aiormq.connection.FrameGenerator is CoalescingFrames:
        return True
    problems = shape_problems()
    if problems:
        log.warning("aiormq %s is not the version this was built for (%s): one socket write per frame",
                    _version("aiormq"), "; ".join(problems))
        return False
    aiormq.connection.FrameGenerator = CoalescingFrames
    return True


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def write_acks(channel: aiormq.Channel, tags: Iterable[int],
               drained: Optional[asyncio.Future] = None) -> Optional[Coroutine]:
    """Hand Basic.Ack frames for ``tags`` to ``channel``'s writer as one batch (``drained`` is set
    once they reached the socket). None when queued; when aiormq's short write queue (10 batches)
    is full, a coroutine that queues them, for the caller to run."""
    batch = ChannelFrame.marshall(channel_number=channel.number, frames=[Basic.Ack(delivery_tag=t) for t in tags],
                                  drain_future=drained)
    try:
        channel.write_queue.put_nowait(batch)
    except asyncio.QueueFull:
        return channel.write_queue.put(batch)
    return None


def on_consumer_cancel(channel: aiormq.Channel, callback: Callable[[object], None]) -> bool:
    """Call ``callback(frame)`` when the broker cancels a consumer of ``channel`` (its queue was
    deleted). aiormq 7 tells; False with aiormq 6, which does not."""
    callbacks = getattr(channel, "on_consumer_cancel_callbacks", None)
    if callbacks is None:
        return False
    callbacks.add(callback)
    return True


def is_not_found(exc: BaseException) -> bool:
    """The broker closed the channel with NOT_FOUND (a passive declare of a missing queue)."""
    return isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity)


def is_returned(exc: BaseException) -> bool:
    """A ``mandatory`` publish came back unroutable (no queue of that name)."""
    return isinstance(exc, aiormq.exceptions.PublishError)
