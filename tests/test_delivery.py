"""The sink runner: batching, filtering, retries, dead letters, drain and isolation.

Runs against the real SQLite spool and the in-memory log of the test kit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import SNAPSHOT_BEGIN, EventEncoder, Record
from watcher.delivery.runner import Filter, RunnerConfig, SinkRunner, backoff_delay
from watcher.delivery.spool import Spool
from watcher.testing import FlakySink, MemoryLog, MemorySink, make_records

AnyLog = MemoryLog | Spool

FAST = RunnerConfig(backoff_base=0.01, backoff_cap=0.05, drain_timeout=2.0, close_timeout=1.0)


def fast(**changes: Any) -> RunnerConfig:
    """FAST with some fields replaced."""
    return dataclasses.replace(FAST, **changes)


@pytest.fixture(params=["memory", "spool"])
async def log(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyLog]:
    """Each runner test runs against the in-memory log and the real spool."""
    if request.param == "memory":
        yield MemoryLog()
        return
    spool = Spool(tmp_path / "spool.db")
    try:
        yield spool
    finally:
        spool.close()


async def append(log: AnyLog, records: list[Record]) -> None:
    """Append to either kind of log."""
    if isinstance(log, Spool):
        await log.append(records)
    else:
        log.extend(records)


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds (10 s at most)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached within 10 s")


async def until_cursor(log: AnyLog, consumer: str, seq: int) -> None:
    """Wait until ``consumer`` acknowledged ``seq``."""
    await until(lambda: log.cursor(consumer) == seq)


class Running:
    """A runner in its own task, with its stop event."""

    def __init__(self, runner: SinkRunner) -> None:
        self.runner = runner
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(runner.run(self.stop))

    async def finish(self) -> float:
        """Set stop, wait for run() to return; the seconds it took."""
        started = time.monotonic()
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        return time.monotonic() - started


def seqs(records: list[Record]) -> list[int]:
    """The sequence numbers of ``records``."""
    return [r.seq for r in records]


async def test_retries_until_delivered_in_order(log: AnyLog) -> None:
    """A sink that is unavailable for a while gets every record, in order, exactly once."""
    sink = FlakySink("flaky", {"failures": 3})
    running = Running(SinkRunner(sink, log, fast(batch_size=10)))
    await append(log, make_records(1, 25))
    await until(lambda: log.cursor("flaky") == 25)
    await running.finish()
    assert seqs(sink.records) == list(range(1, 26))
    assert [len(b) for b in sink.batches] == [10, 10, 5]
    assert running.runner.retries == 3
    assert running.runner.delivered == 25
    assert running.runner.lag == 0
    assert sink.closed


async def test_retry_after_is_honoured(log: AnyLog) -> None:
    """A SinkUnavailable with retry_after delays the retry at least that long."""
    sink = FlakySink("slow", {"failures": 1, "retry_after": 0.4})
    await append(log, make_records(1, 3))
    started = time.monotonic()
    running = Running(SinkRunner(sink, log, FAST))
    await until(lambda: log.cursor("slow") == 3)
    assert time.monotonic() - started >= 0.4
    await running.finish()
    assert seqs(sink.records) == [1, 2, 3]


async def test_rejected_batch_is_dead_lettered(log: AnyLog, tmp_path: Path) -> None:
    """A rejected batch goes to the dead-letter file, is acknowledged, and delivery goes on."""
    dead = tmp_path / "dead" / "letters.jsonl"
    sink = FlakySink("picky", {"failures": 1, "mode": "reject"})
    await append(log, make_records(1, 12))
    running = Running(SinkRunner(sink, log, fast(batch_size=5, dead_letter=dead)))
    await until(lambda: log.cursor("picky") == 12)
    await running.finish()
    lines = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert [line["event"]["id"] for line in lines] == [f"test:1:{n}" for n in range(1, 6)]
    assert {line["sink"] for line in lines} == {"picky"}
    assert "rejected" in lines[0]["reason"]
    assert seqs(sink.records) == list(range(6, 13))
    assert running.runner.dead_lettered == 5
    assert running.runner.delivered == 7


async def test_cursor_advances_only_on_ack(log: AnyLog) -> None:
    """While the sink never accepts, the cursor stays put; other consumers are unaffected."""
    down = FlakySink("down", {"failures": -1})
    up = MemorySink("up")
    await append(log, make_records(1, 8))
    config = fast(drain_timeout=0.2)
    running = [Running(SinkRunner(s, log, config)) for s in (down, up)]
    await until(lambda: log.cursor("up") == 8 and down.attempts >= 5)
    assert log.cursor("down") == 0
    assert running[0].runner.lag == 8
    assert not running[0].runner.health().ok
    assert "refused" in running[0].runner.health().detail
    assert running[1].runner.health().ok
    for r in running:
        await r.finish()
    assert log.cursor("down") == 0
    assert down.records == []


async def test_resumes_after_the_acknowledged_cursor(log: AnyLog) -> None:
    """A runner starts after the sink's acknowledged cursor, not at the beginning."""
    await append(log, make_records(1, 10))
    log.ack("resumer", 6)
    sink = MemorySink("resumer")
    running = Running(SinkRunner(sink, log, FAST))
    await until(lambda: log.cursor("resumer") == 10)
    await running.finish()
    assert seqs(sink.records) == [7, 8, 9, 10]


async def test_unexpected_error_is_retried_and_logged(log: AnyLog) -> None:
    """Any other exception from send is retried, and logged with its traceback."""
    sink = FlakySink("buggy", {"failures": 2, "mode": "error"})
    await append(log, make_records(1, 2))
    with capture_logs() as logs:
        running = Running(SinkRunner(sink, log, FAST))
        await until(lambda: log.cursor("buggy") == 2)
        await running.finish()
    failures = [e for e in logs if e["event"] == "sink_send_failed"]
    assert len(failures) == 2
    assert isinstance(failures[0]["exc_info"], RuntimeError)
    assert failures[0]["sink"] == "buggy"
    assert seqs(sink.records) == [1, 2]


async def test_open_failures_are_retried(log: AnyLog) -> None:
    """A sink whose open fails at first is opened again until it works."""
    sink = FlakySink("late", {"failures": 0, "open_failures": 3})
    await append(log, make_records(1, 4))
    running = Running(SinkRunner(sink, log, FAST))
    await until(lambda: log.cursor("late") == 4)
    await running.finish()
    assert sink.open_attempts == 4
    assert running.runner.retries == 3
    assert seqs(sink.records) == [1, 2, 3, 4]


async def test_hanging_sink_does_not_stall_others_and_is_cancelled(log: AnyLog) -> None:
    """A send that never returns stalls only its own runner, and shutdown cuts it off in time."""
    hung = FlakySink("hung", {"failures": -1, "mode": "hang"})
    fine = MemorySink("fine")
    config = fast(drain_timeout=0.3, close_timeout=0.3, batch_size=3)
    running = [Running(SinkRunner(s, log, config)) for s in (hung, fine)]
    for start in range(1, 31, 10):
        await append(log, make_records(start, 10))
        await until_cursor(log, "fine", start + 9)
    assert hung.attempts == 1
    with capture_logs() as logs:
        took = [await r.finish() for r in running]
    assert ("hung", "sink_drain_timeout") in [(e["sink"], e["event"]) for e in logs]
    assert took[0] < 0.3 + 0.3 + 0.5
    assert log.cursor("hung") == 0
    assert seqs(fine.records) == list(range(1, 31))
    assert hung.closed


async def test_stop_drains_what_the_log_holds(log: AnyLog) -> None:
    """Records already in the log when stop is set are still delivered."""
    sink = FlakySink("drainer", {"failures": 2})
    running = Running(SinkRunner(sink, log, fast(batch_size=7)))
    await append(log, make_records(1, 40))
    await running.finish()
    assert seqs(sink.records) == list(range(1, 41))
    assert log.cursor("drainer") == 40


async def test_batches_respect_size_and_linger(log: AnyLog) -> None:
    """Records that arrive within the linger are sent together, never above batch_size."""
    sink = MemorySink("lingerer")
    running = Running(SinkRunner(sink, log, fast(batch_size=4, linger=0.5)))
    await append(log, make_records(1, 1))
    await asyncio.sleep(0.05)
    await append(log, make_records(2, 2))
    await until(lambda: log.cursor("lingerer") == 3)
    await append(log, make_records(4, 9))
    await until(lambda: log.cursor("lingerer") == 12)
    await running.finish()
    assert [seqs(b) for b in sink.batches] == [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]


async def test_filtered_records_are_acknowledged_unsent(log: AnyLog) -> None:
    """Records the filter drops are acknowledged without a send; the rest arrive in order."""
    records = make_records(1, 6, mount="a") + make_records(7, 6, mount="b")
    await append(log, records)
    sink = MemorySink("only-a")
    running = Running(SinkRunner(sink, log, fast(filter=Filter(mounts=frozenset({"a"})))))
    await until(lambda: log.cursor("only-a") == 12)
    await running.finish()
    assert seqs(sink.records) == [1, 2, 3, 4, 5, 6]
    assert running.runner.filtered == 6


def _change(seq: int, mount: str, path: bytes, kind: Kind | None, prev: Kind | None) -> Record:
    encoder = EventEncoder(stream="s", host="h", epoch=1)
    return encoder.change(seq, mount, Transition(path, kind, prev, Op.MODIFY, None), now=0.0)


def test_filter_matches_mounts_kinds_and_paths() -> None:
    """Filter passes by mount, by kind or prev_kind, by path glob; control events pass."""
    encoder = EventEncoder(stream="s", host="h", epoch=1)
    flt = Filter(mounts=frozenset({"m"}), kinds=frozenset({"A"}), paths=("/etc/*", "/raw-*"))
    assert flt.accepts(_change(1, "m", b"/etc/passwd", Kind.ADDED, None))
    assert flt.accepts(_change(2, "m", b"/etc/passwd", None, Kind.ADDED))
    assert not flt.accepts(_change(3, "m", b"/etc/passwd", Kind.CHANGED, Kind.CHANGED))
    assert not flt.accepts(_change(4, "m", b"/var/log", Kind.ADDED, None))
    assert not flt.accepts(_change(5, "other", b"/etc/passwd", Kind.ADDED, None))
    assert flt.accepts(_change(6, "m", b"/raw-\xff", Kind.ADDED, None))
    snapshot = encoder.control(7, "m", SNAPSHOT_BEGIN, {"mount": "m", "reason": "x"}, now=0.0)
    assert flt.accepts(snapshot)
    elsewhere = encoder.control(8, "n", SNAPSHOT_BEGIN, {"mount": "n", "reason": "x"}, now=0.0)
    assert not flt.accepts(elsewhere)
    bookmark = encoder.control(9, "", "io.layerwatch.bookmark", {"head_seq": 8}, now=0.0)
    assert flt.accepts(bookmark)
    assert Filter().accepts(_change(10, "x", b"/y", Kind.DELETED, None))


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    """Delays stay in [d/2, d] for d = min(cap, base * 2**n); retry_after raises them."""
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = {backoff_delay(attempt, 0.5, 8.0) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1
    assert backoff_delay(0, 0.5, 8.0, retry_after=20.0) == 20.0
    assert backoff_delay(0, 0.5, 8.0, retry_after=2000.0, retry_after_max=60.0) == 60.0
    assert backoff_delay(5000, 0.5, 8.0) <= 8.0


class HangingClose(MemorySink):
    """A sink whose close never returns."""

    async def close(self) -> None:
        """Hang."""
        await asyncio.Event().wait()


async def test_close_is_cut_off_at_its_deadline(log: AnyLog) -> None:
    """A close() that never returns is abandoned after close_timeout, and logged."""
    sink = HangingClose("stuck")
    await append(log, make_records(1, 2))
    running = Running(SinkRunner(sink, log, fast(close_timeout=0.2)))
    await until_cursor(log, "stuck", 2)
    with capture_logs() as logs:
        took = await running.finish()
    assert 0.2 <= took < 1.0
    assert "sink_close_timeout" in [e["event"] for e in logs]


async def test_cancelled_runner_still_closes_its_sink(log: AnyLog) -> None:
    """Cancelling run() (a TaskGroup tearing down) cancels the send and closes the sink."""
    sink = FlakySink("cancelled", {"failures": -1, "mode": "hang"})
    await append(log, make_records(1, 2))
    running = Running(SinkRunner(sink, log, FAST))
    await until(lambda: sink.attempts == 1)
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running.task
    assert sink.closed
    assert log.cursor("cancelled") == 0
