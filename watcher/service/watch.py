"""``layerwatch watch``: one mount, its snapshot then live events, as JSON lines on stdout.

The smallest complete pipeline: Source (inotify or fanotify) -> Hub -> Tracker -> Publisher ->
an outlet that
writes each batch and flushes. A stop request (SIGINT/SIGTERM, or ``stop`` being set)
passes the sync barrier first, so every change made before it is printed, then a bookmark.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import BinaryIO

import structlog

from watcher.core.model import Kind
from watcher.core.mounts import Filesystem
from watcher.delivery.events import Record
from watcher.delivery.publisher import Outlet, Publisher
from watcher.live.hub import Hub
from watcher.live.source import AUTO, open_source
from watcher.live.tracker import Branch, Tracker

__all__ = ["StreamOutlet", "watch"]

logger = structlog.get_logger("layerwatch.watch")


class StreamOutlet:
    """Writes each record as one JSON line to a binary stream, flushed per batch."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    async def __call__(
        self, records: list[Record], lists: Mapping[str, Mapping[bytes, Kind | None]]
    ) -> None:
        """Write and flush one batch."""
        self._stream.write(b"".join(record.body + b"\n" for record in records))
        self._stream.flush()


async def watch(
    fs: Filesystem,
    outlet: Outlet,
    stop: asyncio.Event,
    *,
    name: str = "default",
    ready: Callable[[Hub], None] | None = None,
    source: str = AUTO,
    attribution: bool = False,
) -> Publisher:
    """Follow one mount until ``stop`` is set; returns the publisher (for its counters).

    Args:
        fs: the union to follow (its upper dir and layers).
        outlet: receives every batch of records.
        stop: set it to stop; pending changes are published first, then a bookmark.
        name: the mount's name in events.
        ready: called with the hub once the snapshot is out (tests and the demo use it).
        source: ``auto``, ``inotify`` or ``fanotify`` (``watcher.live.source``).
        attribution: change events carry ``data.process`` (needs fanotify).

    Raises:
        ConfigError: ``source`` is unknown, or ``inotify`` with attribution.
        WatchError: the source asked for cannot be opened.
    """
    publisher = Publisher(outlet)
    choice = open_source(source, attribution=attribution)
    if choice.reason:
        logger.warning("source_fallback", **choice.status())
    else:
        logger.debug("source_chosen", **choice.status())
    with contextlib.closing(choice.source):
        hub = Hub(choice.source, publisher.publish)
        reader = asyncio.create_task(hub.run(), name="hub")
        stopper = asyncio.create_task(stop.wait())
        try:
            tracker = Tracker.of(name, Branch.of(fs), hub)
            tracker.attribution = choice.attribution
            start = asyncio.create_task(hub.follow(tracker), name="start")
            await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():  # stopped during the first scan: abandon it
                start.cancel()
                await asyncio.wait({start})
                return publisher
            start.result()
            if ready is not None:
                ready(hub)
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # re-raise what broke the reader
            async with asyncio.timeout(10):
                await hub.sync()
            await _cancel(reader)
            await publisher.bookmark()
        finally:
            await _cancel(reader)
            await _cancel(stopper)
            hub.close()
    return publisher


async def _cancel(task: asyncio.Task[None] | asyncio.Task[bool]) -> None:
    """Cancel ``task`` and wait until it ended (its outcome is the caller's business)."""
    task.cancel()
    await asyncio.wait({task})
