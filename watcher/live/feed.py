"""The feed for programs that embed layerwatch: ``async for batch in awatch(...)``.

``awatch`` follows one writable branch with the live layer the service uses (one inotify
instance, a ``Hub``, a ``Tracker``), without a spool or sinks, and yields its items as
``Batch`` values: first the snapshot of the change list, then the changes as they happen,
gathered for a moment (``step``, ``debounce``) as ``watchfiles.awatch`` does, and a new
snapshot whenever the tracker had to resync (an inotify queue overflow, a failure, the
branch replaced). The semantics are those of the service's events (``docs/events.md``); the
guide is ``docs/embedding.md``.

Every watch, the inotify descriptor and the hub's sync directory are released when the
generator is closed: at once under ``contextlib.aclosing``, and otherwise when the
generator is collected after the loop is left (``break``, an exception, a cancel).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from watcher.core.errors import LayerError
from watcher.core.layers import Whiteouts
from watcher.core.model import (
    RESYNC,
    SNAPSHOT_BEGIN,
    SNAPSHOT_END,
    Control,
    Item,
    SnapshotEntries,
    Transition,
)
from watcher.core.mounts import Driver, Filesystem
from watcher.live.hub import Hub
from watcher.live.inotify import Inotify
from watcher.live.tracker import Branch, MountpointBranch, Tracker

__all__ = ["Batch", "awatch"]

logger = structlog.get_logger("layerwatch.feed")

StrPath = str | bytes | os.PathLike[str]

_MAX_READY: Final = 16
"""Complete batches held for a consumer that is busy; past them the hub waits (and, if the
consumer stays away, the kernel queue overflows: a resync, as for a slow sink)."""
_MAX_CHANGES: Final = 65536
"""Changes gathered in one batch before it is closed, whatever ``debounce`` says."""
_STOP_SYNC: Final = 10.0
"""Seconds the sync barrier may take when ``stop_event`` is set."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What one step of ``awatch`` yields.

    Attributes:
        snapshot: True when ``changes`` is the whole change list as it is now (every entry,
            ``op`` ``snapshot``, ``prev_kind`` None): replace what you hold with it. The first
            batch is always one (empty for a fresh upper dir).
        resync_reason: None for the first snapshot and for ordinary changes. Otherwise the
            tracker rescanned the branch because hints were lost or the branch changed under it
            (``overflow``, ``watch_limit``, ``error``, ``branch_replaced``): a batch of the
            real differences it found (``op`` ``rescan``, ``snapshot`` False) may come first,
            then always a snapshot batch with the same reason.
        changes: the transitions, in order (``Transition``: ``path`` bytes, ``kind`` and
            ``prev_kind`` among ``A``/``C``/``D`` or None when the path is not in the list,
            ``op``, ``stat``). ``kind == prev_kind`` is activity on an entry already listed.
    """

    snapshot: bool
    resync_reason: str | None
    changes: tuple[Transition, ...]


class _Assembler:
    """Turns the hub's items into batches; the hub's ``publish`` feeds it.

    Ordinary changes gather in ``changes`` until the consumer's debounce closes them; a resync
    or a snapshot closes them at once, so batches keep the items' order.
    """

    def __init__(self, wake: asyncio.Event) -> None:
        self.ready: collections.deque[Batch] = collections.deque()
        self.changes: list[Transition] = []
        self.first = self.last = 0.0
        self.unbounded = False  # set while the stop's sync barrier runs: publish never waits
        self._reason: str | None = None  # a resync announced, its snapshot not yet ended
        self._snapshot: list[Transition] | None = None
        self._wake = wake
        self._room = asyncio.Event()

    async def publish(self, mount: str, items: list[Item]) -> None:
        """The hub's ``Publish``: take ``items``; wait while the consumer is behind."""
        for item in items:
            self._take(item)
        self._wake.set()
        while len(self.ready) >= _MAX_READY and not self.unbounded:
            self._room.clear()
            await self._room.wait()

    def _take(self, item: Item) -> None:
        if isinstance(item, SnapshotEntries):
            for chunk in item.chunks(max(len(item), 1)):
                for transition in chunk:
                    self._take(transition)
        elif isinstance(item, Transition):
            if self._snapshot is not None:
                self._snapshot.append(item)
                return
            now = time.monotonic()
            if not self.changes:
                self.first = now
            self.changes.append(item)
            self.last = now
            if len(self.changes) >= _MAX_CHANGES:
                self.close()
        elif isinstance(item, Control):
            self._control(item)

    def _control(self, control: Control) -> None:
        if control.type == RESYNC:
            self.close()
            self._reason = str(control.data["reason"])
        elif control.type == SNAPSHOT_BEGIN:
            self.close()
            reason = str(control.data["reason"])
            self._reason = None if reason == "start" else reason
            self._snapshot = []
        elif control.type == SNAPSHOT_END and self._snapshot is not None:
            self.ready.append(Batch(True, self._reason, tuple(self._snapshot)))
            self._snapshot, self._reason = None, None

    def close(self) -> None:
        """Close the changes gathered so far into a batch."""
        if self.changes:
            self.ready.append(Batch(False, self._reason, tuple(self.changes)))
            self.changes = []

    def unbound(self) -> None:
        """Let ``publish`` take everything without waiting (the stop's sync barrier needs
        the hub to read on while the consumer is not reading)."""
        self.unbounded = True
        self._room.set()

    def pop(self) -> Batch:
        """The oldest complete batch; makes room for the hub."""
        batch = self.ready.popleft()
        self._room.set()
        return batch


def _filesystem(
    mountpoint: StrPath | None,
    upper: StrPath | None,
    lowers: Sequence[StrPath],
    whiteouts: Whiteouts,
) -> Filesystem:
    """The union to follow: attached at ``mountpoint``, or made of ``upper`` and ``lowers``.

    Raises:
        ValueError: both forms given, or neither.
        MountError: nothing (or no writable overlay) is mounted at ``mountpoint``.
        LayerError: ``upper`` or a lower is not a directory.
    """
    if mountpoint is not None:
        if upper is not None or lowers:
            raise ValueError("give either a mountpoint or upper= and lowers=, not both")
        return Filesystem.attach(mountpoint)
    if upper is None or not lowers:
        raise ValueError("give a mountpoint, or upper= and at least one lower in lowers=")
    if isinstance(lowers, str | bytes):
        raise ValueError("lowers= is a sequence of directories (top first), not one path")
    for role, path in (("upper dir", upper), *(("lower dir", lower) for lower in lowers)):
        if not os.path.isdir(path):
            raise LayerError(f"{role} {os.fsdecode(path)!r} is not a directory")
    driver = Driver.AUFS if whiteouts is Whiteouts.AUFS else Driver.OVERLAY
    return Filesystem(lowers, upper, os.devnull, driver=driver)


async def awatch(
    mountpoint: StrPath | None = None,
    *,
    upper: StrPath | None = None,
    lowers: Sequence[StrPath] = (),
    whiteouts: Whiteouts = Whiteouts.OVERLAY,
    stop_event: asyncio.Event | None = None,
    debounce: int = 1600,
    step: int = 50,
    rescan_interval: float = 2.0,
) -> AsyncGenerator[Batch, None]:
    """Follow one union's writable branch; yield its snapshot, then its changes, as batches.

    Give a merged ``mountpoint`` (its upper and lower dirs are read from mountinfo), or the
    ``upper`` dir and its ``lowers`` (top first, base last) of a union mounted or not.

    Args:
        mountpoint: an overlay mount to attach to.
        upper: the writable branch (with ``lowers``, instead of ``mountpoint``).
        lowers: the read-only layers, top first, base last.
        whiteouts: how the branches mark deletions (``Whiteouts.AUFS`` for aufs branches).
        stop_event: set it to end the iteration: changes made before it was set are yielded
            first (the same sync barrier as ``layerwatch watch``), then the generator returns.
        debounce: most milliseconds to gather ordinary changes into one batch.
        step: milliseconds without a new change after which gathered changes are yielded.
        rescan_interval: seconds between the periodic checks of the branch (a degraded
            mount recovered, a replaced branch found).

    Yields:
        ``Batch`` values: a snapshot first, then changes; a new snapshot after every resync.

    Raises:
        ValueError: both or neither of ``mountpoint`` and ``upper``/``lowers``; a negative
            ``debounce`` or ``step``.
        MountError: nothing (or no writable overlay) is mounted at ``mountpoint``.
        LayerError: ``upper`` or a lower is not a directory.
        WatchError: inotify refused (``fs.inotify.max_user_instances``, open-file limit).
        OSError: the first scan of the branch failed.
    """
    if debounce < 0 or step < 0:
        raise ValueError(f"debounce and step are milliseconds >= 0, got {debounce} and {step}")
    fs = _filesystem(mountpoint, upper, lowers, whiteouts)
    name = os.fsdecode(fs.mountpoint if mountpoint is not None else fs.rw)
    wake = asyncio.Event()
    assembler = _Assembler(wake)
    with Inotify() as inotify:
        hub = Hub(inotify, assembler.publish, rescan_interval=rescan_interval)
        tasks: list[asyncio.Task[None] | asyncio.Task[bool]] = []
        try:
            branch = Branch.of(fs)
            # an attached mountpoint mounted again over a new upper: the new one is followed
            resolve = MountpointBranch(fs, branch.lower) if mountpoint is not None else None
            tracker = Tracker.of(name, branch, hub, resolve=resolve)
            start = asyncio.create_task(hub.follow(tracker), name="awatch-start")
            reader = asyncio.create_task(hub.run(), name="awatch-hub")
            tasks += [start, reader]
            if stop_event is not None:
                tasks.append(asyncio.create_task(stop_event.wait(), name="awatch-stop"))
            for task in tasks:
                task.add_done_callback(lambda _: wake.set())
            while True:
                if stop_event is not None and stop_event.is_set():
                    break  # checked first: a steady flow of batches cannot postpone the stop
                if assembler.ready:
                    yield assembler.pop()
                    continue
                for task in (start, reader):
                    if task.done():
                        task.result()  # re-raise what broke the start or the reader
                timeout = None
                if assembler.changes:
                    due = min(assembler.last + step / 1000, assembler.first + debounce / 1000)
                    timeout = due - time.monotonic()
                    if timeout <= 0:
                        assembler.close()
                        continue
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await wake.wait()
            if start.done():  # stopped after the start: what was made before the stop comes out
                for task in (start, reader):
                    if task.done():
                        task.result()
                await _barrier(hub, assembler)
            reader.cancel()  # nothing after the barrier: the batches left are the last ones
            await asyncio.wait({reader})
            assembler.close()
            while assembler.ready:
                yield assembler.pop()
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            hub.close()


async def _barrier(hub: Hub, assembler: _Assembler) -> None:
    """Pass the hub's sync barrier, the consumer's backpressure lifted meanwhile."""
    assembler.unbound()
    try:
        async with asyncio.timeout(_STOP_SYNC):
            await hub.sync()
    except TimeoutError:
        logger.warning("awatch_stop_sync_timeout", timeout=_STOP_SYNC)
