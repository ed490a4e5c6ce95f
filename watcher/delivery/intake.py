"""Intake: the group commit between the publisher and the spool.

The hub hands each drain's records over and reads on at once; one writer task commits
everything that is pending in one transaction while the hub keeps working, so a burst of
small drains shares one fsync. Sinks read only what is committed, so every event is durable
before any sink sees it. When the spool fails (disk full, I/O error) intake stops loudly: the
writer retries the same records with backoff, ``put`` blocks once ``max_pending`` records
or ``max_pending_bytes`` of encoded events wait, the hub stops reading, and a kernel queue
overflow later turns into a resync. Nothing that was published is dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Final

import structlog

from watcher.core.errors import SpoolError
from watcher.core.model import Kind
from watcher.delivery.events import Record
from watcher.delivery.histogram import Histogram
from watcher.delivery.spool import Spool

__all__ = ["Intake"]

logger = structlog.get_logger("layerwatch.intake")

_RETRY_CAP: Final = 5.0


class Intake:
    """Buffers published records and commits them to the spool in groups.

    Args:
        spool: the durable log.
        max_pending: records waiting for a commit before ``put`` applies backpressure.
        max_pending_bytes: encoded bytes waiting for a commit before ``put`` applies
            backpressure (what bounds the memory of a big snapshot: at most this much waits,
            and as much again is being committed).
    """

    def __init__(
        self, spool: Spool, *, max_pending: int = 65536, max_pending_bytes: int = 8 << 20
    ) -> None:
        self._spool = spool
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._pending: list[Record] = []
        self._pending_bytes = 0
        self._put_at: list[tuple[float, int]] = []  # (monotonic time of a put, its records)
        self._lists: dict[str, dict[bytes, Kind | None]] = {}
        self._changed = asyncio.Condition()
        self._committing = False
        self.error: str | None = None
        self.commits = 0
        self.durable_seconds = Histogram()
        """Per record: from its ``put`` (published) to the end of the commit that holds it."""

    @property
    def pending(self) -> int:
        """Records published but not yet committed."""
        return len(self._pending)

    async def put(
        self, records: list[Record], lists: Mapping[str, Mapping[bytes, Kind | None]]
    ) -> None:
        """The publisher's outlet: queue records (and list updates) for the next commit.

        The records are queued at once, before any wait, so they keep the order in which the
        publisher numbered them even if the caller is cancelled while it waits (only the
        backpressure wait is cancelled, never the records).
        """
        self._pending.extend(records)
        self._pending_bytes += sum(len(record.body) for record in records)
        if records:
            self._put_at.append((time.monotonic(), len(records)))
        _merge(self._lists, lists)
        async with self._changed:
            self._changed.notify_all()
            await self._changed.wait_for(self._has_room)

    def _has_room(self) -> bool:
        return (
            len(self._pending) < self._max_pending and self._pending_bytes < self._max_pending_bytes
        )

    async def run(self) -> None:
        """The writer: commit whatever is pending, one transaction at a time, until cancelled."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._pending))
                batch, lists, size = self._pending, self._lists, self._pending_bytes
                put_at = self._put_at
                self._pending, self._lists, self._pending_bytes = [], {}, 0
                self._put_at = []
                self._committing = True
            try:
                await self._commit(batch, lists)
            except BaseException:
                async with self._changed:  # cancelled mid-commit: keep the records, in order
                    self._pending[:0] = batch
                    self._pending_bytes += size
                    self._put_at[:0] = put_at
                    self._lists = _merge(lists, self._lists)
                    self._committing = False
                raise
            del batch, lists  # not held while the writer waits for the next records
            now = time.monotonic()
            for at, count in put_at:
                self.durable_seconds.observe(now - at, count)
            async with self._changed:
                self._committing = False
                self._changed.notify_all()

    async def flush(self) -> None:
        """Wait until everything put so far is committed (``run`` must be going)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._pending and not self._committing)

    async def _commit(
        self, batch: list[Record], lists: Mapping[str, Mapping[bytes, Kind | None]]
    ) -> None:
        delay = 0.1
        while True:
            try:
                await self._spool.append(batch, lists=lists)
            except SpoolError as exc:
                if self.error is None:
                    logger.error("intake_stopped", error=str(exc), pending=len(batch))
                self.error = str(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_CAP)
                continue
            self.commits += 1
            if self.error is not None:
                logger.info("intake_resumed")
                self.error = None
            return


def _merge(
    into: dict[str, dict[bytes, Kind | None]], more: Mapping[str, Mapping[bytes, Kind | None]]
) -> dict[str, dict[bytes, Kind | None]]:
    """Fold later list updates into earlier ones (later wins), in place; returns ``into``."""
    for mount, updates in more.items():
        into.setdefault(mount, {}).update(updates)
    return into
