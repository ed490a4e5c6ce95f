"""In-memory parts: a log with the runner's ``EventLog`` interface, and sinks that record
or fail."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["FlakySink", "MemoryLog", "MemorySink"]


class MemoryLog:
    """An in-memory log satisfying ``watcher.delivery.runner.EventLog``; not durable.

    Args:
        records: initial records (ascending ``seq``).
    """

    def __init__(self, records: Sequence[Record] = ()) -> None:
        self._records: list[Record] = []
        self._cursors: dict[str, int] = {}
        self._grew = asyncio.Event()
        self.extend(records)

    @property
    def last_seq(self) -> int:
        """The newest sequence number (0 when empty)."""
        return self._records[-1].seq if self._records else 0

    @property
    def first_seq(self) -> int:
        """The oldest sequence number held (``last_seq + 1`` when empty)."""
        return self._records[0].seq if self._records else self.last_seq + 1

    def append(self, record: Record) -> None:
        """Add one record; its ``seq`` must be above ``last_seq``."""
        if record.seq <= self.last_seq:
            raise ValueError(f"seq {record.seq} is not after {self.last_seq}")
        self._records.append(record)
        self._grew.set()
        self._grew = asyncio.Event()

    def extend(self, records: Sequence[Record]) -> None:
        """Add records in order."""
        for record in records:
            self.append(record)

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with ``seq > after``."""
        out = [r for r in self._records if r.seq > after]
        return out[:limit]

    async def wait(self, after: int) -> None:
        """Return once ``last_seq > after``."""
        while self.last_seq <= after:
            await self._grew.wait()

    def cursor(self, consumer: str) -> int:
        """The last sequence number ``consumer`` acknowledged."""
        return self._cursors.get(consumer, 0)

    def ack(self, consumer: str, seq: int) -> None:
        """Move ``consumer``'s cursor to ``seq`` (never backwards)."""
        if seq < self._cursors.get(consumer, 0):
            raise ValueError(f"ack {seq} is behind the cursor of {consumer!r}")
        self._cursors[consumer] = seq


class MemorySink:
    """A sink that keeps every batch it was sent in ``batches``. Takes no options."""

    def __init__(self, name: str, options: Mapping[str, object] | None = None) -> None:
        Options(name, options or {}).finish()
        self.name = name
        self.batches: list[list[Record]] = []
        self.opened = False
        self.closed = False

    @property
    def records(self) -> list[Record]:
        """Every record sent, in order (with repeats from re-sends)."""
        return [record for batch in self.batches for record in batch]

    async def open(self) -> None:
        """Mark the sink open."""
        self.opened = True

    async def send(self, batch: Sequence[Record]) -> None:
        """Keep the batch."""
        self.batches.append(list(batch))

    def health(self) -> Health:
        """Always ok."""
        return Health(ok=True)

    async def close(self) -> None:
        """Mark the sink closed."""
        self.closed = True


class FlakySink(MemorySink):
    """A ``MemorySink`` whose first ``failures`` sends fail.

    Options:
        failures (int, default 1): how many sends fail before sends succeed; -1 for all.
        mode (str, default "unavailable"): how they fail: ``unavailable`` (SinkUnavailable),
            ``reject`` (SinkRejected), ``error`` (RuntimeError), ``hang`` (never return).
        retry_after (float, optional): the ``retry_after`` of each SinkUnavailable.
        open_failures (int, default 0): how many ``open`` calls fail with SinkUnavailable.
    """

    def __init__(self, name: str, options: Mapping[str, object] | None = None) -> None:
        opts = Options(name, options or {})
        self.failures = opts.integer("failures", 1, minimum=-1)
        self.mode = opts.choice("mode", ("unavailable", "reject", "error", "hang"), "unavailable")
        after = opts.number("retry_after", -1.0, minimum=-1.0)
        self.retry_after = None if after < 0 else after
        self.open_failures = opts.integer("open_failures", 0)
        opts.finish()
        super().__init__(name)
        self.attempts = 0
        self.open_attempts = 0

    async def open(self) -> None:
        """Fail the first ``open_failures`` calls."""
        self.open_attempts += 1
        if self.open_attempts <= self.open_failures:
            raise SinkUnavailable(f"open attempt {self.open_attempts} refused")
        await super().open()

    async def send(self, batch: Sequence[Record]) -> None:
        """Fail as configured, then keep the batch."""
        self.attempts += 1
        if self.failures < 0 or self.attempts <= self.failures:
            if self.mode == "hang":
                await asyncio.Event().wait()
            if self.mode == "reject":
                raise SinkRejected(f"send attempt {self.attempts} rejected")
            if self.mode == "error":
                raise RuntimeError(f"send attempt {self.attempts} crashed")
            raise SinkUnavailable(
                f"send attempt {self.attempts} refused", retry_after=self.retry_after
            )
        await super().send(batch)
