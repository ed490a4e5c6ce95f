"""Test kit for sink authors: in-memory parts, real server processes and the sink checks.

In-memory parts:

- ``make_records``: simple encoded change events (``io.layerwatch.change``) to feed a sink.
- ``mixed_records``: a realistic stream: changes of several mounts (some with non-UTF-8
  paths), snapshot bounds and service-wide bookmarks.
- ``change_list_records``: events of three mounts and the change lists a consumer must
  rebuild from them; ``send_change_lists`` sends them the way a retrying runner does.
- ``batches`` and ``send_stream``: cut records into batches; send them one after the other.
- ``MemoryLog``: an in-memory log with the runner's ``Log`` interface (``watcher.delivery.runner``).
- ``MemorySink``: records every batch it is sent.
- ``FlakySink``: a ``MemorySink`` that fails its first sends (unavailable, rejected, an
  unexpected error, or hanging forever), to exercise a runner's retries and deadlines.

Real servers and delivery:

- ``free_port`` and ``ServerProcess``: start a broker on a free loopback port, wait until it
  accepts connections, SIGKILL or stop it, and start it again on the same data dir.
- ``opened``: an opened sink for an ``async with`` block.
- ``deliver`` and ``open_when_ready``: retry ``send`` / ``open`` until accepted, with the
  runner's backoff (``watcher.delivery.runner.backoff_delay``).
- ``deliver_through_restart``: a stream delivered while the server is killed mid-stream and
  restarted.

Checks (each raises ``AssertionError`` naming what failed; call them from your tests):

- ``check_sink_contract``: what every sink must do.
- ``check_option_error``: a bad option is a ``ConfigError`` naming ``sinks.NAME.OPTION``.
- ``check_unreachable``: a sink whose server is down is unavailable and unhealthy.
- ``check_delivered``: what a destination holds against what was sent (once, in mount order).
- ``readme_example``: run a README's consumer example.

Example::

    async def test_contract(tmp_path: Path) -> None:
        await check_sink_contract(MySink, {"url": server_url})


    async def test_kill(my_server: ServerProcess) -> None:
        sent = mixed_records(1000)
        async with opened(MySink("s", {"url": my_url})) as sink:
            assert await deliver_through_restart(sink, my_server, sent) >= 1
        check_delivered(sent, await read_back_ids())
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import BOOKMARK, SNAPSHOT_BEGIN, SNAPSHOT_END, EventEncoder, Record
from watcher.delivery.plugins import Options
from watcher.delivery.runner import backoff_delay
from watcher.delivery.sinks import Health, Sink, SinkFactory

__all__ = [
    "MOUNTS",
    "FlakySink",
    "MemoryLog",
    "MemorySink",
    "ServerProcess",
    "batches",
    "change_list_records",
    "check_delivered",
    "check_option_error",
    "check_sink_contract",
    "check_unreachable",
    "deliver",
    "deliver_through_restart",
    "free_port",
    "make_records",
    "mixed_records",
    "open_when_ready",
    "opened",
    "readme_example",
    "send_change_lists",
    "send_stream",
]

MOUNTS: Final = ("web", "db.main", "caché")
"""Mount names of ``mixed_records``: one with a dot (a separator in subjects and keys), one
non-ASCII."""

_S = TypeVar("_S", bound=Sink)


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
    encoder = EventEncoder(stream=stream, host="testing", epoch=1)
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


def _stat(size: int) -> os.stat_result:
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
    return os.stat_result((stat.S_IFREG | 0o644, 1, 1, 1, 0, 0, size, 0, 1_700_000_000, 0))


def mixed_records(
    count: int, *, start: int = 1, mounts: Sequence[str] = MOUNTS, epoch: int = 1
) -> list[Record]:
    """``count`` realistic events with sequence numbers from ``start``, mounts round-robin.

    Every 50th event is a service-wide bookmark (mount ``""``), the two after it a snapshot's
    begin and end; the rest are changes (``A``, one path in seven not valid UTF-8) built from
    real ``Transition`` values by the real ``EventEncoder``.

    Args:
        count: how many records.
        start: the first sequence number.
        mounts: the mount names to cycle through.
        epoch: the spool epoch in their ids (another one: events of a spool made anew).
    """
    encoder = EventEncoder(stream="s", host="h", epoch=epoch)
    now = 1_700_000_000.0
    records = []
    for seq in range(start, start + count):
        mount = mounts[seq % len(mounts)]
        if seq % 50 == 0:
            records.append(encoder.control(seq, "", BOOKMARK, {"head_seq": seq}, now=now))
        elif seq % 50 == 1:
            begin = {"mount": mount, "reason": "restart"}
            records.append(encoder.control(seq, mount, SNAPSHOT_BEGIN, begin, now=now))
        elif seq % 50 == 2:
            end = {"mount": mount, "reason": "restart", "count": 0}
            records.append(encoder.control(seq, mount, SNAPSHOT_END, end, now=now))
        else:
            path = f"/srv/{mount}/f{seq}".encode() + (b"\xff" if seq % 7 == 0 else b"")
            transition = Transition(path, Kind.ADDED, None, Op.CREATE, _stat(seq))
            records.append(encoder.change(seq, mount, transition, now=now + seq))
    return records


def change_list_records() -> tuple[list[Record], dict[str, dict[bytes, str]]]:
    """Events of the three ``MOUNTS`` and the change lists a consumer must rebuild from them.

    The events hold an activity event, a delete, a snapshot, a non-UTF-8 name and a bookmark.

    Returns:
        The records, and per mount the expected list (path to ``"A"`` or ``"C"``).
    """
    encoder = EventEncoder(stream="s", host="h", epoch=1)
    records: list[Record] = []

    def change(mount: str, path: bytes, kind: Kind | None, prev: Kind | None, op: Op) -> None:
        seq = len(records) + 1
        transition = Transition(path, kind, prev, op, _stat(seq) if kind is not None else None)
        records.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))

    def control(mount: str, type_: str, data: dict[str, object]) -> None:
        records.append(encoder.control(len(records) + 1, mount, type_, data, now=1.7e9))

    change("web", b"/a", Kind.ADDED, None, Op.CREATE)
    change("db.main", b"/x", Kind.ADDED, None, Op.CREATE)
    change("web", b"/b", Kind.ADDED, None, Op.CREATE)
    change("web", b"/a", Kind.ADDED, Kind.ADDED, Op.MODIFY)
    change("web", b"/b", None, Kind.ADDED, Op.DELETE)
    change("web", b"/etc", Kind.CHANGED, None, Op.CREATE)
    control("db.main", SNAPSHOT_BEGIN, {"mount": "db.main", "reason": "overflow"})
    change("db.main", b"/y", Kind.ADDED, None, Op.SNAPSHOT)
    change("db.main", b"/z", Kind.CHANGED, None, Op.SNAPSHOT)
    control("db.main", SNAPSHOT_END, {"mount": "db.main", "reason": "overflow", "count": 2})
    change("caché", b"/bad\xff", Kind.ADDED, None, Op.CREATE)
    change("caché", b"/etc/passwd", Kind.CHANGED, None, Op.MODIFY)
    control("", BOOKMARK, {"head_seq": len(records)})
    expected = {
        "web": {b"/a": "A", b"/etc": "C"},
        "db.main": {b"/y": "A", b"/z": "C"},
        "caché": {b"/bad\xff": "A", b"/etc/passwd": "C"},
    }
    return records, expected


async def send_change_lists(sink: Sink) -> dict[str, dict[bytes, str]]:
    """Send ``change_list_records`` as a retrying runner may: a first part, then all of it.

    Returns:
        The change lists a consumer of the destination must rebuild.
    """
    records, expected = change_list_records()
    await sink.send(records[:7])
    await sink.send(records)
    return expected


def batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    """``records`` cut into consecutive batches of ``size``."""
    return [records[i : i + size] for i in range(0, len(records), size)]


async def send_stream(sink: Sink, records: Sequence[Record], *, batch_size: int = 64) -> None:
    """Send ``records`` batch after batch, as the delivery runner hands them over."""
    for batch in batches(records, batch_size):
        await sink.send(batch)


def readme_example(readme: Path) -> dict[str, Any]:
    """Execute the first ``python`` code block of ``readme`` and return its namespace."""
    match = re.search(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    if match is None:
        raise AssertionError(f"no python example in {readme}")
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(readme), "exec"), namespace)
    return namespace


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A real server process listening on a loopback port, for tests.

    ``start`` returns once the port accepts connections. ``kill`` (SIGKILL) and ``stop``
    (SIGTERM) end the process; ``start`` again runs the same command, so a server keeps its
    data dir across a restart. As a context manager: started on entry, stopped on exit.

    Args:
        argv: the command; it must listen on ``127.0.0.1:port``.
        port: the port to poll.
        log: the file stdout and stderr are appended to (quoted when the process dies).
        env: variables added to this process's environment.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.log = log
        self.env = {**os.environ, **env} if env else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and poll its port until it accepts a connection.

        Raises:
            RuntimeError: the process exited (its log's tail is in the message).
            OSError: the port did not accept within ``timeout`` seconds.
        """
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.argv[0]} exited: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process; SIGKILL it if it has not exited after ``timeout`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@asynccontextmanager
async def opened(sink: _S) -> AsyncIterator[_S]:
    """``sink``, opened for the block and closed after it."""
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


async def _until_accepted(
    call: Callable[[], Awaitable[None]],
    deadline: float,
    on_failure: Callable[[], Awaitable[None] | None] | None,
) -> int:
    failures = 0
    give_up = time.monotonic() + deadline
    while True:
        try:
            await call()
        except SinkUnavailable as exc:
            failures += 1
            if on_failure is not None:
                waiting = on_failure()
                if inspect.isawaitable(waiting):
                    await waiting
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(backoff_delay(failures - 1, 0.05, 0.5, exc.retry_after))
        else:
            return failures


async def deliver(
    sink: Sink,
    batch: Sequence[Record],
    *,
    deadline: float = 60.0,
    on_failure: Callable[[], Awaitable[None] | None] | None = None,
) -> int:
    """Send the same batch until the sink accepts it, as the delivery runner does.

    Between attempts it waits ``backoff_delay`` (base 0.05 s, cap 0.5 s, honouring
    ``retry_after``).

    Args:
        sink: an opened sink.
        batch: the records.
        deadline: seconds after which the next ``SinkUnavailable`` is raised.
        on_failure: called (and awaited, if it returns an awaitable) after every attempt that
            raised ``SinkUnavailable``, before the next one.

    Returns:
        How many attempts failed with ``SinkUnavailable`` before one succeeded.
    """
    return await _until_accepted(lambda: sink.send(batch), deadline, on_failure)


async def open_when_ready(sink: Sink, *, deadline: float = 30.0) -> int:
    """Call ``open`` until it succeeds (a cluster electing its leaders, a server starting).

    Returns:
        How many attempts failed with ``SinkUnavailable`` before one succeeded.
    """
    return await _until_accepted(sink.open, deadline, None)


async def deliver_through_restart(
    sink: Sink,
    server: ServerProcess,
    records: Sequence[Record],
    *,
    batch_size: int = 25,
    kill_at: int = 10,
) -> int:
    """Deliver ``records`` in batches while ``server`` is SIGKILLed mid-stream and restarted.

    The server is killed while batch number ``kill_at`` is in flight and started again (the
    same command: the same data dir) once an attempt has failed; every batch is retried with
    ``deliver`` until accepted. Check what the destination holds afterwards.

    Returns:
        How many attempts failed; 0 means the outage went unnoticed.
    """
    in_flight = asyncio.Event()
    failed = asyncio.Event()

    async def chaos() -> None:
        await in_flight.wait()
        server.kill()
        await failed.wait()
        await asyncio.to_thread(server.start)

    task = asyncio.create_task(chaos())
    failures = 0
    try:
        for index, batch in enumerate(batches(records, batch_size)):
            if index == kill_at:
                in_flight.set()
            failures += await deliver(sink, batch, on_failure=failed.set)
        in_flight.set()
        failed.set()  # restart even if no attempt failed, so the test can report that
        await task
    finally:
        task.cancel()
    return failures


def check_option_error(
    factory: SinkFactory, name: str, options: Mapping[str, object], key: str
) -> None:
    """Check that building sink ``name`` from ``options`` raises a ``ConfigError`` for ``key``.

    Raises:
        AssertionError: no ``ConfigError``, or one naming another key.
    """
    try:
        factory(name, options)
    except ConfigError as exc:
        if exc.key != key:
            raise AssertionError(f"ConfigError names {exc.key!r}, expected {key!r}") from exc
    else:
        raise AssertionError(f"no ConfigError for {options!r}")


async def check_unreachable(sink: Sink) -> None:
    """Check a sink configured for a server that is not there.

    ``open`` must raise ``SinkUnavailable``, ``health()`` must then say not ok, and ``send``
    must raise ``SinkUnavailable`` too.

    Raises:
        AssertionError: naming the first check that failed.
    """
    for step, call in (
        ("open", sink.open),
        ("send", lambda: sink.send(make_records(1, 1))),
    ):
        try:
            await call()
        except SinkUnavailable:
            pass
        else:
            raise AssertionError(f"{step} did not raise SinkUnavailable")
        if sink.health().ok:
            raise AssertionError(f"health() is ok after a failed {step}")


def check_delivered(
    sent: Sequence[Record], received: Sequence[str], *, exactly_once: bool = True
) -> None:
    """Check what a destination holds against what was sent.

    Args:
        sent: the records sent.
        received: the event ids the destination holds, in its order (for a destination with
            several logs, such as streams or partitions, one log after the other).
        exactly_once: also require every id once, and each mount's records in ``seq`` order;
            False for an at-least-once destination (duplicates and reordering allowed).

    Raises:
        AssertionError: an id missing, unknown or repeated, or a mount out of order.
    """
    by_id = {record.id: record for record in sent}
    missing = by_id.keys() - set(received)
    unknown = set(received) - by_id.keys()
    if missing or unknown:
        raise AssertionError(
            f"{len(missing)} records missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unknown)} unknown (e.g. {sorted(unknown)[:3]})"
        )
    if not exactly_once:
        return
    if len(received) != len(set(received)):
        repeated = sorted({i for i in received if received.count(i) > 1})
        raise AssertionError(f"stored more than once: {repeated[:3]}")
    last: dict[str, int] = {}
    for event_id in received:
        record = by_id[event_id]
        if record.seq < last.get(record.mount, 0):
            raise AssertionError(f"mount {record.mount!r} out of order at {event_id}")
        last[record.mount] = record.seq
