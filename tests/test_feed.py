"""``watcher.awatch``, the embedding API, on real overlay mounts changed by other processes.

Each test drives the feed as a program would (``async for``), changes the merged view from a
shell (another process), and checks what it yields against ``compute`` on the branch. Leaving
the loop in every way must release the inotify descriptor, its watches and the sync directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import tempfile
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import OverlayFactory
from overlay import (
    LayerEntry,
    Overlay,
    build_layer,
    mount_overlay,
    requires_overlay,
    run_ops,
)
from test_overflow import sysctl

import watcher
from watcher import Batch, Kind, LayerError, MountError, Op, awatch, compute

pytestmark = [requires_overlay, pytest.mark.root]


@pytest.fixture
def ovl(overlay_factory: OverlayFactory, tmp_path: Path) -> Overlay:
    """An overlay over one lower (``/etc/passwd``, ``/etc/hosts``), already changed once."""
    lower = tmp_path / "lower"
    lower.mkdir()
    entries = [LayerEntry("dir", b"etc", mode=0o755)]
    entries += [LayerEntry("file", name, b"x\n") for name in (b"etc/passwd", b"etc/hosts")]
    build_layer(str(lower), entries)
    ovl = overlay_factory([str(lower)])
    run_ops(ovl.merged, "rm etc/passwd && echo n > new.txt")
    return ovl


def expected(ovl: Overlay) -> dict[bytes, Kind]:
    """The branch's change list now, as ``docker diff`` has it."""
    return dict(compute(ovl.upper, ovl.lowers))


def apply(state: dict[bytes, Kind], batch: Batch) -> dict[bytes, Kind]:
    """What a consumer holds after ``batch``: a snapshot replaces, changes update."""
    if batch.snapshot:
        return {t.path: t.kind for t in batch.changes if t.kind is not None}
    state = dict(state)
    for t in batch.changes:
        if t.kind is None:
            state.pop(t.path, None)
        else:
            state[t.path] = t.kind
    return state


def inotify_fds() -> int:
    """inotify descriptors this process holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    return count


def sync_dirs() -> set[str]:
    """The hub sync directories of this process."""
    prefix = f"layerwatch-sync-{os.getpid()}-"
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(prefix)}


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (10 s at most)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def follow_until(
    feed: AsyncGenerator[Batch, None],
    state: dict[bytes, Kind],
    done: Callable[[dict[bytes, Kind], list[Batch]], bool],
) -> tuple[dict[bytes, Kind], list[Batch]]:
    """Apply batches to ``state`` until ``done(state, batches)`` (10 s at most)."""
    seen: list[Batch] = []
    async with asyncio.timeout(10):
        while not done(state, seen):
            batch = await anext(feed)
            seen.append(batch)
            state = apply(state, batch)
    return state, seen


@pytest.mark.parametrize("form", ["mountpoint", "branches"])
async def test_snapshot_first_then_changes_from_another_process(ovl: Overlay, form: str) -> None:
    """The first batch is the snapshot (== compute); changes a shell makes then arrive as
    ordinary batches that bring the consumer's state to compute again."""
    where: dict[str, object] = (
        {"mountpoint": ovl.merged}
        if form == "mountpoint"
        else {"upper": ovl.upper, "lowers": list(ovl.lowers)}
    )
    async with contextlib.aclosing(awatch(**where, step=10)) as feed:  # type: ignore[arg-type]
        first = await anext(feed)
        assert first.snapshot
        assert first.resync_reason is None
        assert {t.op for t in first.changes} == {Op.SNAPSHOT}
        assert {t.path: t.kind for t in first.changes} == expected(ovl)
        assert expected(ovl) == {b"/etc": Kind.CHANGED, b"/etc/passwd": Kind.DELETED,
                                 b"/new.txt": Kind.ADDED}  # fmt: skip

        run_ops(
            ovl.merged,
            "mkdir -p var/log && echo l > var/log/a && rm new.txt && echo x >> etc/hosts",
        )
        want = expected(ovl)
        state, seen = await follow_until(feed, apply({}, first), lambda s, _: s == want)
    assert state == want
    assert want[b"/var/log/a"] is Kind.ADDED
    assert b"/new.txt" not in want
    assert not any(b.snapshot or b.resync_reason for b in seen)
    left = [t for b in seen for t in b.changes if t.path == b"/new.txt"]
    assert [(t.prev_kind, t.kind) for t in left][-1] == (Kind.ADDED, None)


async def test_a_mountpoint_mounted_again_is_followed(ovl: Overlay, tmp_path: Path) -> None:
    """awatch(mountpoint): an overlay mounted there again over a new upper (on top of the
    first one) is followed, with a snapshot of resync_reason branch_replaced equal to the new
    branch's list."""
    async with contextlib.aclosing(awatch(ovl.merged, rescan_interval=0.05)) as feed:
        first = await anext(feed)
        (tmp_path / "again").mkdir()
        with mount_overlay(str(tmp_path / "again"), ovl.lowers, merged=ovl.merged) as again:
            run_ops(again.merged, "echo other > other.txt")
            want = dict(compute(again.upper, again.lowers))
            _, seen = await follow_until(
                feed,
                apply({}, first),
                lambda s, b: s == want and any(x.snapshot for x in b),
            )
    assert want == {b"/other.txt": Kind.ADDED}
    assert [b.resync_reason for b in seen if b.snapshot] == ["branch_replaced"]


@pytest.mark.parametrize("how", ["break", "exception", "cancel", "aclosing"])
async def test_leaving_the_loop_closes_every_watch(ovl: Overlay, how: str) -> None:
    """break, an exception, a cancel or aclosing: the inotify fd (and so every watch) and the
    sync directory are released; under aclosing, before the block ends."""
    fds, dirs = inotify_fds(), sync_dirs()
    inside: list[int] = []

    async def consume() -> None:
        async for _ in awatch(ovl.merged):
            inside.append(inotify_fds())
            if how == "break":
                break
            if how == "exception":
                raise RuntimeError("consumer failed")
            await asyncio.sleep(3600)

    if how == "aclosing":
        async with contextlib.aclosing(awatch(ovl.merged)) as feed:
            await anext(feed)
            assert inotify_fds() == fds + 1
        assert inotify_fds() == fds  # closed by the time the block ended
        assert sync_dirs() == dirs
        return
    if how == "cancel":
        task = asyncio.create_task(consume())
        await until(lambda: bool(inside))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "exception":
        with pytest.raises(RuntimeError, match="consumer failed"):
            await consume()
    else:
        await consume()
    assert inside == [fds + 1]
    await until(lambda: inotify_fds() == fds and sync_dirs() == dirs)


async def test_overflow_yields_a_resync_snapshot(ovl: Overlay) -> None:
    """A queue overflow (64 events, 3000 files made while the loop is blocked) yields a
    snapshot batch with resync_reason "overflow" that equals compute."""
    feed = awatch(ovl.merged, step=10)
    try:
        with sysctl("max_queued_events", 64):
            first = await anext(feed)  # the instance is made now, with the small queue
        # in the root, which is watched already (files of a new dir are found by its scan)
        run_ops(ovl.merged, "for i in $(seq 1 3000); do : > f$i; done")
        want = expected(ovl)
        state, seen = await follow_until(
            feed,
            apply({}, first),
            lambda s, b: s == want and any(x.snapshot and x.resync_reason == "overflow" for x in b),
        )
    finally:
        await feed.aclose()
    resyncs = [b for b in seen if b.snapshot]
    assert [b.resync_reason for b in resyncs] == ["overflow"] * len(resyncs)
    # the rescan's differences (the files made while the loop was blocked) come just
    # before the snapshot, with its reason
    before = seen[seen.index(resyncs[0]) - 1]
    assert not before.snapshot
    assert before.resync_reason == "overflow"
    assert {t.op for t in before.changes} == {Op.RESCAN}
    assert {t.path: t.kind for t in resyncs[-1].changes} == want
    assert len(want) == 3 + 3000
    assert state == want


async def test_stop_event_yields_what_was_made_before_it(ovl: Overlay) -> None:
    """Changes made just before stop_event is set come out before the iteration ends."""
    stop = asyncio.Event()
    fds = inotify_fds()
    state: dict[bytes, Kind] = {}
    async for batch in awatch(ovl.merged, stop_event=stop, debounce=60_000, step=60_000):
        state = apply(state, batch)
        if batch.snapshot:
            run_ops(ovl.merged, "echo late > late.txt && rm etc/hosts")
            stop.set()
    assert state == expected(ovl)
    assert state[b"/late.txt"] is Kind.ADDED
    assert state[b"/etc/hosts"] is Kind.DELETED
    assert inotify_fds() == fds  # a loop that ends by itself has closed the generator


async def test_a_stop_before_the_snapshot_abandons_the_start(ovl: Overlay) -> None:
    """stop_event already set: the first scan is abandoned, nothing is yielded, nothing left
    open."""
    stop = asyncio.Event()
    stop.set()
    fds, dirs = inotify_fds(), sync_dirs()
    assert [batch async for batch in awatch(ovl.merged, stop_event=stop)] == []
    assert inotify_fds() == fds
    assert sync_dirs() == dirs


async def test_stop_ends_the_loop_under_a_steady_flow(ovl: Overlay) -> None:
    """A shell writing without pause: the loop still ends once stop_event is set."""
    writer = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", "while :; do echo x >> hot.txt; : > f$((i=i+1)); done", cwd=ovl.merged
    )
    stop = asyncio.Event()
    changes = 0
    try:
        async with asyncio.timeout(10):
            async for batch in awatch(ovl.merged, stop_event=stop, debounce=0, step=0):
                changes += 0 if batch.snapshot else len(batch.changes)
                if changes > 1000:
                    stop.set()
    finally:
        writer.kill()
        await writer.wait()
    assert changes > 1000


async def test_bad_arguments_raise_clear_errors(ovl: Overlay, tmp_path: Path) -> None:
    """Both forms, neither, a missing upper, an unmounted path, a bad step: clear errors,
    raised by the first step, with nothing left open."""
    fds = inotify_fds()
    cases: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"mountpoint": ovl.merged, "upper": ovl.upper}, ValueError, "not both"),
        ({}, ValueError, "give a mountpoint"),
        ({"upper": ovl.upper, "lowers": ovl.lowers[0]}, ValueError, "not one path"),
        ({"upper": str(tmp_path / "nope"), "lowers": ovl.lowers}, LayerError, "nope"),
        ({"mountpoint": str(tmp_path)}, MountError, str(tmp_path)),
        ({"mountpoint": ovl.merged, "step": -1}, ValueError, "milliseconds"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text):
            await anext(awatch(**kwargs))  # type: ignore[arg-type]
    assert inotify_fds() == fds


def test_the_embedding_api_is_exported_lazily() -> None:
    """``watcher.awatch`` and ``watcher.Batch`` are the feed's, and listed in ``__all__``."""
    from watcher.live import feed

    assert watcher.awatch is feed.awatch
    assert watcher.Batch is feed.Batch
    assert {"awatch", "Batch"} <= set(watcher.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = watcher.no_such_name


def guide_examples() -> list[str]:
    """The fenced ``python`` blocks of docs/embedding.md."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "embedding.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", guide, re.MULTILINE | re.DOTALL)


async def test_the_guide_example_holds_the_list(ovl: Overlay) -> None:
    """docs/embedding.md: the example, run as written against a real mount, holds the list
    through the snapshot, changes from a shell and the stop."""
    (code,) = guide_examples()
    namespace: dict[str, Any] = {"__name__": "example"}
    exec(compile(code, "embedding.md", "exec"), namespace)
    stop = asyncio.Event()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        task = asyncio.create_task(namespace["follow"](ovl.merged, stop))
        await until(lambda: "A /new.txt" in printed.getvalue())  # the snapshot is out
        run_ops(ovl.merged, "echo v > var.txt && rm new.txt && rm etc/hosts")
        stop.set()
        entries = await task
    assert entries == expected(ovl)
    assert "- /new.txt" in printed.getvalue().splitlines()
