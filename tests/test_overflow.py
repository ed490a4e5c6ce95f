"""The tracker under kernel limits: inotify queue overflow and the watch limit.

Both tests lower a system-wide inotify sysctl for a moment and restore it in a ``finally``
(the queue length right after the instance is created: the kernel reads it only then; the
watch limit around the test body only). They need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import OverlayFactory, load_cases
from live import LiveMount
from overlay import Overlay, build_lower, requires_overlay, run_ops
from structlog.testing import capture_logs

from watcher.core.rules import compute
from watcher.delivery.events import RESYNC
from watcher.live.source import FANOTIFY, INOTIFY

pytestmark = [requires_overlay, pytest.mark.root]

INOTIFY_SYSCTLS = Path("/proc/sys/fs/inotify")
FANOTIFY_SYSCTLS = Path("/proc/sys/fs/fanotify")


@contextlib.contextmanager
def sysctl(name: str, value: int, top: Path = INOTIFY_SYSCTLS) -> Iterator[int]:
    """Set ``fs.inotify.NAME`` (or under ``top``) to ``value`` for the block; yield the old
    value; restore it."""
    path = top / name
    old = path.read_text(encoding="ascii")
    path.write_text(str(value), encoding="ascii")
    try:
        yield int(old)
    finally:
        path.write_text(old, encoding="ascii")


def watches_in_use() -> int:
    """inotify watches held now by every process (all of them are root here)."""
    count = 0
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        with contextlib.suppress(OSError):
            count += fdinfo.read_text(encoding="ascii", errors="replace").count("inotify wd:")
    return count


@pytest.fixture
def ovl(overlay_factory: OverlayFactory, tmp_path: Path) -> Overlay:
    """A fresh overlay over the conformance lower tree."""
    lower = tmp_path / "lower"
    lower.mkdir()
    build_lower(str(lower), load_cases()["lower"])
    return overlay_factory([str(lower)])


@pytest.fixture(params=[INOTIFY, FANOTIFY])
async def small_queue(ovl: Overlay, request: pytest.FixtureRequest) -> AsyncIterator[LiveMount]:
    """A started tracker whose source (inotify instance, fanotify group) queues at most 64
    events. (fanotify's filesystem mark also queues other processes' writes on the same
    filesystem: the queue only fills sooner.)"""
    top = FANOTIFY_SYSCTLS if request.param == FANOTIFY else INOTIFY_SYSCTLS
    with sysctl("max_queued_events", 64, top):
        live = LiveMount("m", ovl.upper, ovl.lowers, source=request.param)  # takes it now
    await live.start()
    yield live
    await live.stop()


def _flood(merged: str, rounds: int) -> None:
    """Thousands of operations with no pause: creates, writes, chmods, deletes, a rename.

    ``flood/deep`` must exist and be watched already (else there is nothing to overflow).
    """
    for i in range(rounds):
        name = os.path.join(merged, "flood", "deep" if i % 2 else "", f"f{i}")
        with open(name, "ab") as fh:
            fh.write(b"x")
        os.chmod(name, 0o600 if i % 3 else 0o644)
        if i % 4 == 0:
            os.unlink(name)
    run_ops(merged, "echo more >> data/file1; rm -rf data/rdir; mv flood/deep data/deep")


async def test_overflow_converges_with_a_resync(small_queue: LiveMount, ovl: Overlay) -> None:
    """After a queue overflow: a resync(overflow), and list == compute == replay after sync."""
    live = small_queue
    os.makedirs(os.path.join(ovl.merged, "flood", "deep"))
    await live.sync()
    _flood(ovl.merged, 1500)
    await live.sync()
    assert live.hub.overflows >= 1
    assert {"mount": "m", "reason": "overflow"} in [c.data for c in live.controls(RESYNC)]
    live.check()
    # A second storm after recovering: still exact.
    run_ops(ovl.merged, "rm -rf data/deep; mkdir -p flood/deep")
    await live.sync()
    _flood(ovl.merged, 1500)
    await live.sync()
    live.check()


async def test_sync_returns_when_its_cookie_was_lost_to_overflow(
    small_queue: LiveMount, ovl: Overlay
) -> None:
    """sync() called while the queue is full returns (the resync covers it), not a hang."""
    live = small_queue
    for i in range(200):  # the queue overflows before sync() writes its cookie
        os.close(os.open(os.path.join(ovl.merged, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    await live.sync()
    assert live.hub.overflows == 1
    live.check()


async def _periodic_rescan_catches_up(live: LiveMount) -> None:
    """Without any sync, the hub's periodic rescan brings a degraded list in step."""
    want = compute(live.upper, live.lowers)
    async with asyncio.timeout(10):
        while live.tracker.changes() != want:
            live.published.clear()
            await live.published.wait()


async def test_watch_limit_degrades_and_recovers(ovl: Overlay) -> None:
    """Past max_user_watches: degraded, logged with mount and sysctl, correct, recovers."""
    live = LiveMount("m", ovl.upper, ovl.lowers, rescan_interval=0.2)
    await live.start()
    try:
        with capture_logs() as logs:
            with sysctl("max_user_watches", watches_in_use() + 3):
                run_ops(ovl.merged, "mkdir -p " + " ".join(f"t/d{i}/e" for i in range(100)))
                run_ops(ovl.merged, "echo 1 > t/d50/e/f; echo 2 >> data/file1")
                await live.sync()
                assert str(live.tracker.degraded) == "watch_limit"
                live.check()
                run_ops(ovl.merged, "echo 3 > t/d99/e/g; rm -rf t/d7")  # unwatched dirs
                await _periodic_rescan_catches_up(live)
                await live.sync()
                live.check()
            await live.sync()  # the limit is back: the next rescan watches everything
            assert live.tracker.degraded is None
            live.check()
        limit = [e for e in logs if e["event"] == "watch_limit_reached"]
        assert len(limit) == 1
        assert limit[0]["mount"] == "m"
        assert "fs.inotify.max_user_watches" in limit[0]["error"]
        assert any(e["event"] == "watch_limit_recovered" for e in logs)
        # Watched again: a change deep in the tree shows up without any rescan.
        run_ops(ovl.merged, "echo 4 > t/d98/e/h")
        await live.sync()
        live.check()
    finally:
        await live.stop()


async def test_watch_limit_recovers_after_unwatched_dirs_are_gone(ovl: Overlay) -> None:
    """Directories that could not be watched and were then deleted do not pin degraded mode."""
    live = LiveMount("m", ovl.upper, ovl.lowers)
    await live.start()
    try:
        with sysctl("max_user_watches", watches_in_use() + 3):
            run_ops(ovl.merged, "mkdir -p " + " ".join(f"t/d{i}/e" for i in range(100)))
            await live.sync()
            assert str(live.tracker.degraded) == "watch_limit"
            run_ops(ovl.merged, "rm -rf t/d*/e")  # no hint where the parent is unwatched too
            await live.sync()
            live.check()
        await live.sync()
        assert live.tracker.degraded is None
        live.check()
    finally:
        await live.stop()


async def test_degraded_rescans_keep_their_clock_under_steady_traffic(ovl: Overlay) -> None:
    """Writes to watched files every 50 ms (shorter than the rescan interval) do not postpone
    the degraded mount's periodic rescan: a change in an unwatched dir still shows up."""
    live = LiveMount("m", ovl.upper, ovl.lowers, rescan_interval=0.3)
    await live.start()
    noise_path = os.path.join(ovl.merged, "noise")  # in /, which is always watched

    async def noise() -> None:
        while True:
            await asyncio.to_thread(run_ops, ovl.merged, f"echo n >> '{noise_path}'")
            await asyncio.sleep(0.05)

    try:
        with sysctl("max_user_watches", watches_in_use() + 3):
            run_ops(ovl.merged, "mkdir -p " + " ".join(f"t/d{i}/e" for i in range(40)))
            await live.sync()
            assert str(live.tracker.degraded) == "watch_limit"
            writer = asyncio.create_task(noise())
            try:
                unwatched = sorted(live.tracker._unwatched)  # the tracker's own record
                assert unwatched
                want = unwatched[-1] + b"/late"
                with open(ovl.merged.encode() + want, "wb") as f:  # noqa: ASYNC230
                    f.write(b"late")
                async with asyncio.timeout(5):  # without any sync: only the periodic rescan
                    while want not in live.tracker.kinds:  # noqa: ASYNC110 (the hub's task)
                        await asyncio.sleep(0.05)
            finally:
                writer.cancel()
        await live.sync()
        live.check()
    finally:
        await live.stop()
