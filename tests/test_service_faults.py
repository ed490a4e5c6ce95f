"""Faults inside the service: a component that fails is restarted and never stops the
others; a stop that cannot make events durable is a failure, not a clean exit."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from watcher.delivery.events import Record
from watcher.delivery.runner import RunnerConfig, SinkRunner
from watcher.delivery.spool import Spool
from watcher.service.config import parse
from watcher.service.service import Service
from watcher.testing import MemorySink

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


class _FailingOnce:
    """A spool whose first ``read`` raises an unexpected error (a bug, a driver fault)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.failed = False

    def read(self, after: int, limit: int) -> list[Record]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected read failure")
        return self._spool.read(after, limit)

    @property
    def last_seq(self) -> int:
        return self._spool.last_seq

    @property
    def first_seq(self) -> int:
        return self._spool.first_seq

    async def wait(self, after: int) -> None:
        await self._spool.wait(after)

    def cursor(self, consumer: str) -> int:
        return self._spool.cursor(consumer)

    def ack(self, consumer: str, seq: int) -> None:
        self._spool.ack(consumer, seq)


async def test_a_failing_sink_runner_is_restarted_and_the_other_sinks_go_on(
    tmp_path: Path,
) -> None:
    """An unexpected exception in one sink runner is logged, shown in health, counted, and
    the runner restarted with backoff; the service and the other sink keep running."""
    (tmp_path / "upper").mkdir()
    (tmp_path / "lower").mkdir()
    mount = {"name": "m", "upper": str(tmp_path / "upper"), "lowers": [str(tmp_path / "lower")]}
    config = parse({"mounts": [mount], "spool": {"path": str(tmp_path / "spool.db")}})
    service = Service(config)
    task = asyncio.create_task(service.run(signals=False))
    try:
        async with asyncio.timeout(10):
            await service.started.wait()
        assert service.spool is not None
        assert service.publisher is not None
        flaky, steady = MemorySink("flaky"), MemorySink("steady")
        log = _FailingOnce(service.spool)
        stop = asyncio.Event()
        fast = RunnerConfig(backoff_base=0.05, backoff_cap=0.1)
        runners = [SinkRunner(flaky, log, fast), SinkRunner(steady, service.spool, fast)]
        supervised = [
            asyncio.create_task(
                service._supervise(f"sink {r.sink.name}", functools.partial(r.run, stop))
            )
            for r in runners
        ]
        await service.publisher.bookmark()
        async with asyncio.timeout(10):
            while not (flaky.records and steady.records):  # noqa: ASYNC110 (another task's state)
                await asyncio.sleep(0.02)
        assert log.failed
        assert service.restarts == {"sink flaky": 1}
        reasons = service.degraded()
        assert len(reasons) == 1
        assert reasons[0].startswith("sink flaky: failed")
        assert "unexpected read failure" in reasons[0]
        assert not task.done()
        stop.set()
        await asyncio.gather(*supervised)
    finally:
        service.stop.set()
        async with asyncio.timeout(30):
            await task


@pytest.fixture
def tiny_spool(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for the spool, and a branch with more changes than fit in it."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(spool_dir)], check=True)
    try:
        upper, lower = tmp_path / "upper", tmp_path / "lower"
        upper.mkdir()
        lower.mkdir()
        for i in range(3000):
            os.close(os.open(upper / (f"{i:05d}-" + "n" * 150), os.O_CREAT | os.O_WRONLY))
        yield tmp_path
    finally:
        subprocess.run(["umount", "-l", str(spool_dir)], check=False)


@needs_root
@pytest.mark.root
def test_stop_with_events_not_durable_exits_non_zero_and_says_how_many(tiny_spool: Path) -> None:
    """SIGTERM while the spool's disk is full: the service exits 1 and names the number of
    events it could not make durable (never a clean exit 0 that hides them)."""
    root = tiny_spool
    config = root / "layerwatch.toml"
    config.write_text(
        f'[[mounts]]\nname = "m"\nupper = "{root / "upper"}"\nlowers = ["{root / "lower"}"]\n'
        f'[spool]\npath = "{root / "spool" / "spool.db"}"\n'
        f'[service]\nshutdown_timeout = "2s"\n'
    )
    err = root / "stderr"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "run", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 30
        while b"intake_stopped" not in err.read_bytes():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert "could not be made durable" in text
    flush = [
        orjson.loads(line)
        for line in err.read_bytes().splitlines()
        if line.startswith(b"{") and b"intake_flush_timeout" in line
    ]
    assert flush
    assert flush[0]["pending"] > 0
    assert f"{flush[0]['pending']} events" in text


async def test_a_spool_made_anew_never_reissues_an_id(tmp_path: Path) -> None:
    """After the spool is lost, the new one numbers from 1 again under a new epoch: no event
    id of the second run names an event of the first (a jsonl sink keeps both runs)."""
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    out = tmp_path / "events.jsonl"
    spool = tmp_path / "spool" / "spool.db"
    config = parse(
        {
            "mounts": [{"name": "m", "upper": str(upper), "lowers": [str(lower)]}],
            "sinks": {"out": {"type": "jsonl", "path": str(out)}},
            "spool": {"path": str(spool)},
        }
    )
    for run in range(2):
        service = Service(config)
        task = asyncio.create_task(service.run(signals=False))
        async with asyncio.timeout(30):
            await service.started.wait()
            for i in range(5):
                await asyncio.to_thread((upper / f"run{run}-{i}").write_bytes, b"x")
            await service.sync()
            service.stop.set()
            await task
        for path in spool.parent.iterdir():  # the spool's disk is lost
            path.unlink()
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    bodies: dict[str, bytes] = {}
    for event in events:
        body = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
        assert bodies.setdefault(event["id"], body) == body, f"{event['id']} names two events"
    epochs = {event["id"].split(":")[1] for event in events}
    assert len(epochs) == 2
    assert sorted(int(e["sequence"]) for e in events).count(1) == 2  # both runs start at 1
