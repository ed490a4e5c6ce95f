"""The sink checks (each raises ``AssertionError`` naming what failed) and delivery helpers."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from watcher.core.errors import ConfigError, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.runner import backoff_delay
from watcher.delivery.sinks import Health, Sink, SinkFactory
from watcher.testing.records import batches, change_list_records, make_records
from watcher.testing.servers import ServerProcess

__all__ = [
    "check_delivered",
    "check_option_error",
    "check_sink_contract",
    "check_unreachable",
    "deliver",
    "deliver_through_restart",
    "open_when_ready",
    "opened",
    "readme_example",
    "send_change_lists",
    "send_stream",
]

_S = TypeVar("_S", bound=Sink)


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


async def send_change_lists(sink: Sink) -> dict[str, dict[bytes, str]]:
    """Send ``change_list_records`` as a retrying runner may: a first part, then all of it.

    Returns:
        The change lists a consumer of the destination must rebuild.
    """
    records, expected = change_list_records()
    await sink.send(records[:7])
    await sink.send(records)
    return expected


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
