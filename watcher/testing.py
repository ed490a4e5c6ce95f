"""Test kit for sink authors: in-memory parts and the sink contract checks.

- ``make_records``: real encoded events (``io.layerwatch.change``) to feed a sink.
- ``MemoryLog``: an in-memory log with the runner's ``Log`` interface (``watcher.delivery``).
- ``MemorySink``: records every batch it is sent.
- ``FlakySink``: a ``MemorySink`` that fails its first sends (unavailable, rejected, an
  unexpected error, or hanging forever), to exercise a runner's retries and deadlines.
- ``check_sink_contract``: the checks every sink must pass; call it from your sink's tests.

Example::

    async def test_contract(tmp_path: Path) -> None:
        await check_sink_contract(MySink, {"url": server_url})
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Mapping, Sequence

from watcher.changes import Kind, Op, Transition
from watcher.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.events import EventEncoder, Record
from watcher.plugins import Options
from watcher.sinks import Health, Sink, SinkFactory

__all__ = [
    "FlakySink",
    "MemoryLog",
    "MemorySink",
    "check_sink_contract",
    "make_records",
]


def make_records(
    start: int,
    count: int,
    *,
    mount: str = "test",
    stream: str = "test",
    paths: Sequence[bytes] | None = None,
) -> list[Record]:
    """``count`` change events with sequence numbers ``start, start + 1, ...``.

    Args:
        start: the first sequence number.
        count: how many records.
        mount: the mount name on every record.
        stream: the stream half of each event id.
        paths: the paths to cycle through (default ``/file-SEQ``); may be any bytes.
    """
    encoder = EventEncoder(stream=stream, host="testing")
    records = []
    for seq in range(start, start + count):
        path = paths[(seq - start) % len(paths)] if paths else f"/file-{seq}".encode()
        mtime_ns = 1_700_000_000_000_000_000 + seq
        # (mode, ino, dev, nlink, uid, gid, size, 3 x int times, 3 x float times, 3 x ns times)
        fields = (stat.S_IFREG | 0o644, seq, 1, 1, 0, 0, 5, 0, 0, 0)
        st = os.stat_result((*fields, 0.0, mtime_ns / 1e9, 0.0, 0, mtime_ns, 0))
        transition = Transition(path, Kind.ADDED, None, Op.CREATE, st)
        records.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))
    return records


class MemoryLog:
    """An in-memory log satisfying ``watcher.delivery.Log``; not durable.

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


async def check_sink_contract(
    factory: SinkFactory,
    options: Mapping[str, object],
    *,
    name: str = "contract",
    deadline: float = 10.0,
) -> None:
    """Check that ``factory`` builds a sink that keeps the sink contract.

    The checks: an unknown option raises ``ConfigError`` naming ``sinks.NAME.OPTION``; the
    sink is a ``Sink`` named ``name``; ``health()`` returns a ``Health`` before open, after a
    send and after close; ``open``, ``send`` of a batch, a re-send of the same batch and
    ``close`` each finish within ``deadline`` seconds without raising.

    Raises:
        AssertionError: naming the first check that failed.
    """
    try:
        factory(name, {**options, "no_such_option_for_contract": 1})
    except ConfigError as exc:
        if exc.key != f"sinks.{name}.no_such_option_for_contract":
            raise AssertionError(f"unknown option: ConfigError names {exc.key!r}") from exc
    else:
        raise AssertionError("unknown option: no ConfigError")
    sink = factory(name, options)
    if not isinstance(sink, Sink):
        raise AssertionError(f"factory built {type(sink).__name__}, not a Sink")
    if sink.name != name:
        raise AssertionError(f"sink.name is {sink.name!r}, expected {name!r}")
    _check_health(sink, "before open")
    batch = make_records(1, 3, paths=[b"/contract", "/ünï".encode(), b"/raw-\xff"])
    for step, call in (
        ("open", sink.open),
        ("send", lambda: sink.send(batch)),
        ("re-send of the same batch", lambda: sink.send(batch)),
    ):
        try:
            async with asyncio.timeout(deadline):
                await call()
        except TimeoutError as exc:
            raise AssertionError(f"{step} did not finish within {deadline}s") from exc
    _check_health(sink, "after send")
    try:
        async with asyncio.timeout(deadline):
            await sink.close()
    except TimeoutError as exc:
        raise AssertionError(f"close did not finish within {deadline}s") from exc
    _check_health(sink, "after close")


def _check_health(sink: Sink, when: str) -> None:
    health = sink.health()
    if not isinstance(health, Health):
        raise AssertionError(f"health() {when} returned {type(health).__name__}, not Health")
