"""Reading back what each sink wrote, as event bodies in the order the sink delivered them.

Every output has ``name`` (the sink's) and ``read()``: the bodies that arrived since the last
call (a bounded number per call), and ``close()``. Files are read by path, the way an
operator's consumer would: a file whose path now names another file (rotated, or its
directory removed) is read on for a grace period, then dropped, so a sink that keeps writing
to a deleted file is seen losing events.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import nats
import nats.errors
import nats.js.errors
import redis.asyncio
import redis.exceptions
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

__all__ = [
    "BatchDir",
    "FileTail",
    "KafkaOutput",
    "NatsOutput",
    "Output",
    "RedisOutput",
    "RunFiles",
]

_CHUNK: Final = 4 << 20
_LIMIT: Final = 20_000
"""Most events one ``read()`` returns (the rest come with the next call)."""


class Output(Protocol):
    """What a sink wrote, read back."""

    name: str

    async def read(self) -> list[bytes]:
        """Event bodies delivered since the last call, in delivery order."""
        ...

    async def close(self) -> None:
        """Release connections and files."""
        ...


@dataclass
class _Open:
    fd: int
    dev: int
    ino: int
    offset: int = 0

    def lines(self, limit: int) -> list[bytes]:
        """Whole lines after ``offset`` (never past the last newline: a torn line that the
        sink truncates and writes again is read again)."""
        out: list[bytes] = []
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_size < self.offset:
                self.offset = 0  # truncated below what was read: read it all again (dups)
            while len(out) < limit:
                data = os.pread(self.fd, _CHUNK, self.offset)
                end = data.rfind(b"\n")
                if end < 0:
                    break
                out.extend(line for line in data[:end].split(b"\n") if line)
                self.offset += end + 1
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class FileTail:
    """A JSON-lines file followed by path.

    Args:
        name: the sink's name.
        path: the file.
        grace: seconds a file the path no longer names is still read (a batch in flight).
    """

    name: str
    path: Path
    grace: float = 2.0
    _current: _Open | None = None
    _old: list[tuple[_Open, float]] = field(default_factory=list)

    async def read(self) -> list[bytes]:
        """New whole lines: the old files' first, then the current one's."""
        out: list[bytes] = []
        now = time.monotonic()
        for old, until in list(self._old):
            out += old.lines(_LIMIT)
            if now > until:
                old.close()
                self._old.remove((old, until))
        try:
            st: os.stat_result | None = os.stat(self.path)
        except OSError:
            st = None
        cur = self._current
        if cur is not None and (st is None or (st.st_dev, st.st_ino) != (cur.dev, cur.ino)):
            out += cur.lines(1 << 60)
            self._old.append((cur, now + self.grace))
            self._current = cur = None
        if cur is None and st is not None:
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                fst = os.fstat(fd)
                self._current = cur = _Open(fd, fst.st_dev, fst.st_ino)
        if cur is not None:
            out += cur.lines(_LIMIT)
        return out

    async def close(self) -> None:
        """Close every file."""
        for old, _ in self._old:
            old.close()
        self._old.clear()
        if self._current is not None:
            self._current.close()
            self._current = None


@dataclass
class RunFiles:
    """The stdout sink: one file per run of the service (its standard output)."""

    name: str
    keep: bool = False
    _done: list[FileTail] = field(default_factory=list)
    _current: FileTail | None = None

    def begin_run(self, path: Path) -> None:
        """The next run writes ``path``; the previous run's file is read to its end first
        (call this only once that run's process is gone)."""
        if self._current is not None:
            self._done.append(self._current)
        self._current = FileTail(self.name, path)

    async def read(self) -> list[bytes]:
        """Lines of finished runs first (a torn last line of a killed run is dropped)."""
        out: list[bytes] = []
        for tail in list(self._done):
            more = await tail.read()
            out += more
            if len(out) >= _LIMIT:
                return out  # the rest of that file next time
            await tail.close()
            if not self.keep:
                with contextlib.suppress(OSError):
                    tail.path.unlink()  # read to its end: its events are in the consumer
            self._done.remove(tail)
        if self._current is not None:
            out += await self._current.read()
        return out

    async def close(self) -> None:
        """Close the files."""
        for tail in [*self._done, *([self._current] if self._current else [])]:
            await tail.close()


@dataclass
class BatchDir:
    """The exec sink's output: its command writes each batch it gets on stdin to a file
    ``NANOS-PID.batch`` (renamed into place once complete) in ``path``."""

    name: str
    path: Path

    async def read(self) -> list[bytes]:
        """The lines of each complete batch file, oldest first; read files are removed."""
        out: list[bytes] = []
        with contextlib.suppress(OSError):
            names = sorted(n for n in os.listdir(self.path) if n.endswith(".batch"))
            for name in names[:500]:
                file = self.path / name
                # a run cut short (the service killed mid-batch) ends in a torn line: drop it,
                # the batch was not acknowledged and comes again
                lines = file.read_bytes().split(b"\n")
                out.extend(line for line in lines[:-1] if line)
                file.unlink()
                if len(out) >= _LIMIT:
                    break
        return out

    async def close(self) -> None:
        """Nothing is held open."""


async def _quiet(exc: Exception) -> None:
    """nats-py prints every connection error with a traceback by default: a killed server
    is expected here."""


async def _nothing() -> None:
    pass


@dataclass
class NatsOutput:
    """The JetStream stream, read with an ephemeral pull consumer from the next stream
    sequence (a new consumer after every lost connection)."""

    name: str
    url: str
    stream: str = "LAYERWATCH"
    subject: str = "layerwatch.>"
    _last: int = 0
    _nc: Any = None
    _sub: Any = None

    async def read(self) -> list[bytes]:
        """Messages after the last one read; none while the server is down."""
        try:
            if self._nc is None or not self._nc.is_connected:
                await self._reset()
                self._nc = await nats.connect(
                    servers=[self.url],
                    connect_timeout=2,
                    allow_reconnect=False,
                    error_cb=_quiet,
                    disconnected_cb=_nothing,
                    closed_cb=_nothing,
                )
            if self._sub is None:
                config = ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self._last + 1,
                    ack_policy=AckPolicy.NONE,
                    inactive_threshold=120.0,
                )
                js = self._nc.jetstream(timeout=5)
                self._sub = await js.pull_subscribe(self.subject, stream=self.stream, config=config)
            messages = await self._sub.fetch(batch=2000, timeout=0.5)
        except nats.errors.TimeoutError:
            return []
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError):
            await self._reset()
            return []
        out = []
        for message in messages:
            self._last = message.metadata.sequence.stream
            out.append(message.data)
        return out

    async def _reset(self) -> None:
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def close(self) -> None:
        """Disconnect."""
        await self._reset()


@dataclass
class RedisOutput:
    """The Redis streams (one per mount and the service's), merged back into one order.

    The sink's entry ids grow with the service's order across all its streams, so entries
    of all streams sorted by entry id are in that order. One ``XREAD`` over every key is
    atomic, and the sink writes each batch in one ``MULTI``/``EXEC``, so what a read returns
    is a prefix of the order, except past the last entry of a key the read cut short:
    those wait for the next read.
    """

    name: str
    url: str
    keys: Sequence[str]
    _last: dict[str, str] = field(default_factory=dict)
    _pending: list[tuple[tuple[int, int], bytes]] = field(default_factory=list)
    _client: Any = None

    async def read(self) -> list[bytes]:
        """Entries up to where every key is complete, in entry id order."""
        count = 2000
        try:
            if self._client is None:
                self._client = redis.asyncio.Redis.from_url(
                    self.url, socket_timeout=3, socket_connect_timeout=2
                )
            streams = {key: self._last.get(key, "0-0") for key in self.keys}
            reply = await self._client.xread(streams, count=count)
        except (redis.exceptions.RedisError, OSError):
            await self.close()
            return []
        safe = (1 << 62, 0)
        for key, entries in reply:
            key_text = key.decode() if isinstance(key, bytes) else str(key)
            for entry_id, fields in entries:
                self._pending.append((_entry(entry_id), fields[b"event"]))
            self._last[key_text] = entries[-1][0].decode()
            if len(entries) == count:
                safe = min(safe, _entry(entries[-1][0]))
        self._pending.sort(key=lambda item: item[0])
        cut = len(self._pending)
        while cut and self._pending[cut - 1][0] > safe:
            cut -= 1
        out = [body for _, body in self._pending[:cut]]
        del self._pending[:cut]
        return out

    async def close(self) -> None:
        """Disconnect."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


def _entry(entry_id: bytes) -> tuple[int, int]:
    first, _, second = entry_id.partition(b"-")
    return int(first), int(second or 0)


@dataclass
class KafkaOutput:
    """The Kafka topic (one partition, so one order), read from its start."""

    name: str
    bootstrap: str
    topic: str
    _consumer: Any = None
    _next: int = 0

    async def read(self) -> list[bytes]:
        """Records after the last one read."""
        from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
        from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

        try:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    request_timeout_ms=5000,
                )
                await consumer.start()
                partition = TopicPartition(self.topic, 0)
                consumer.assign([partition])
                if self._next:
                    consumer.seek(partition, self._next)
                self._consumer = consumer
            batch = await self._consumer.getmany(timeout_ms=300, max_records=2000)
        except (KafkaError, OSError):
            await self.close()
            return []
        out = []
        for messages in batch.values():
            for message in messages:
                out.append(message.value)
                self._next = message.offset + 1
        return out

    async def close(self) -> None:
        """Stop the consumer."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
