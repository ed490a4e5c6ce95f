"""The hub: one inotify instance for every mount, its read loop, and the sync barrier.

The hub turns each drain of the inotify fd into dirty paths per tracker (coalesced by path),
has the trackers reconcile them, and hands the resulting items to ``publish`` before it reads
again. ``IN_Q_OVERFLOW`` makes every path dirty: each tracker resyncs. ``sync()`` writes a
cookie into a private directory watched by the same instance and returns once the cookie's
event was read and everything read before it was reconciled and published.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from typing import Final

import structlog

from watcher.changes import Op
from watcher.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    RawEvent,
)
from watcher.tracker import Item, Tracker, WatchOps

__all__ = ["Hub", "Publish"]

log = structlog.get_logger("layerwatch.hub")

Publish = Callable[[Tracker, list[Item]], Awaitable[None]]
"""Receives each tracker's items, in order; the hub waits for it before reading on."""

_OPS: Final = (
    (IN_CREATE, Op.CREATE),
    (IN_MOVED_TO | IN_MOVED_FROM | IN_MOVE_SELF, Op.MOVE),
    (IN_DELETE | IN_DELETE_SELF, Op.DELETE),
    (IN_MODIFY | IN_CLOSE_WRITE, Op.MODIFY),
    (IN_ATTRIB, Op.ATTRIB),
)
_RANK: Final = {Op.ATTRIB: 0, Op.MODIFY: 1, Op.CREATE: 2, Op.MOVE: 2, Op.DELETE: 2}


_SYNC_PREFIX: Final = "layerwatch-sync-"


def _remove_stale_sync_dirs() -> None:
    """Remove sync directories left by processes that are gone (killed before ``close``)."""
    top = tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(top) as it:
        for dirent in it:
            pid = dirent.name.removeprefix(_SYNC_PREFIX).partition("-")[0]
            mine = dirent.name.startswith(_SYNC_PREFIX) and pid.isdigit()
            if mine and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(dirent.path, ignore_errors=True)


def _op(mask: int) -> Op:
    for bits, op in _OPS:
        if mask & bits:
            return op
    return Op.ATTRIB


class Hub(WatchOps):
    """Owns the inotify instance and the trackers fed by it.

    Args:
        inotify: the one instance for every mount.
        publish: receives each tracker's items.
        rescan_interval: seconds between rescans of a degraded mount (watch limit reached).
    """

    def __init__(self, inotify: Inotify, publish: Publish, *, rescan_interval: float = 2.0) -> None:
        self._inotify = inotify
        self._publish = publish
        self.rescan_interval = rescan_interval
        self._owners: dict[int, Tracker] = {}
        self.trackers: dict[str, Tracker] = {}
        _remove_stale_sync_dirs()
        self._sync_dir = os.fsencode(tempfile.mkdtemp(prefix=f"{_SYNC_PREFIX}{os.getpid()}-"))
        self._sync_wd = inotify.add_watch(self._sync_dir, IN_CREATE)
        self._cookies: dict[bytes, asyncio.Future[None]] = {}
        self._counter = itertools.count()
        self.overflows = 0
        self.events_read = 0

    # WatchOps
    def add(self, tracker: Tracker, path: bytes) -> int:
        """Watch ``path`` for ``tracker``."""
        wd = self._inotify.add_watch(path)
        self._owners[wd] = tracker
        return wd

    def remove(self, tracker: Tracker, wd: int) -> None:
        """Stop watching ``wd``."""
        if self._owners.get(wd) is tracker:
            del self._owners[wd]
            self._inotify.rm_watch(wd)

    @property
    def watch_count(self) -> int:
        """Watches held for all mounts."""
        return len(self._owners)

    async def attach(self, tracker: Tracker, items: list[Item]) -> None:
        """Register a started tracker and publish its first items (its snapshot)."""
        self.trackers[tracker.mount] = tracker
        await self._publish(tracker, items)

    async def detach(self, mount: str) -> None:
        """Stop following a mount: drop its watches."""
        tracker = self.trackers.pop(mount, None)
        if tracker is not None:
            tracker.close()

    async def run(self) -> None:
        """Read, reconcile and publish until cancelled.

        Degraded mounts are recovered every ``rescan_interval`` on a deadline of their own, so
        steady traffic on other mounts (or on their watched part) cannot postpone it.
        """
        loop = asyncio.get_running_loop()
        next_rescan = loop.time() + self.rescan_interval
        while True:
            degraded = [t for t in self.trackers.values() if t.degraded]
            if degraded and loop.time() >= next_rescan:
                for tracker in degraded:
                    await self._publish(tracker, self._guard(tracker, tracker.recover))
                degraded = [t for t in self.trackers.values() if t.degraded]
            if not degraded:
                next_rescan = loop.time() + self.rescan_interval
                await self.process(await self._inotify.read())
                continue
            if loop.time() >= next_rescan:
                next_rescan = loop.time() + self.rescan_interval
            try:
                async with asyncio.timeout_at(next_rescan):
                    events = await self._inotify.read()
            except TimeoutError:
                continue
            await self.process(events)

    def _guard(self, tracker: Tracker, work: Callable[[], list[Item]]) -> list[Item]:
        """Run one tracker's work; a failure degrades that mount, never the others.

        The mount is marked degraded (reason ``error``) and recovered by a resync on the
        next rescan tick, so consumers get a snapshot instead of a silent gap.
        """
        try:
            return work()
        except Exception as exc:
            tracker.take()  # half-made items: the resync replaces them
            tracker.degraded = f"error: {exc}"
            log.exception("tracker_failed", mount=tracker.mount, error=str(exc))
            return []

    async def process(self, events: list[RawEvent]) -> None:
        """Handle one drain of the inotify fd."""
        self.events_read += len(events)
        dirty: dict[Tracker, dict[bytes, Op]] = {}
        overflow = False
        cookies: list[bytes] = []
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                overflow = True
                continue
            if event.wd == self._sync_wd:
                if event.mask & IN_CREATE:
                    cookies.append(event.name)
                continue
            tracker = self._owners.get(event.wd)
            if tracker is None:
                continue
            if event.mask & IN_IGNORED:
                del self._owners[event.wd]
                tracker.forget_wd(event.wd)
                continue
            path = tracker.dirty_path(event.wd, event.name)
            if path is None:
                continue
            paths = dirty.setdefault(tracker, {})
            op = _op(event.mask)
            if _RANK[op] >= _RANK.get(paths.get(path, Op.ATTRIB), 0):
                paths[path] = op
        if overflow:
            self.overflows += 1
            log.warning("inotify_overflow", mounts=len(self.trackers))
            # A full queue drops events, sync cookies included: every sync() waiting now
            # began before this rescan, so the rescan covers it.
            cookies.extend(self._cookies)
            for tracker in list(self.trackers.values()):
                items = self._guard(tracker, functools.partial(tracker.resync, "overflow"))
                await self._publish(tracker, items)
        else:
            for tracker, paths in dirty.items():
                if tracker.mount in self.trackers and not tracker.degraded_by_error:
                    items = self._guard(tracker, functools.partial(tracker.reconcile, paths))
                    await self._publish(tracker, items)
        if cookies:
            for tracker in list(self.trackers.values()):
                if tracker.degraded:
                    await self._publish(tracker, self._guard(tracker, tracker.recover))
            for name in cookies:
                future = self._cookies.pop(name, None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def sync(self) -> None:
        """Return once every change completed before the call is reflected and published.

        Bound the wait with ``asyncio.timeout``: the barrier needs ``run`` to be reading.
        """
        name = f"c{os.getpid()}-{next(self._counter)}".encode()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._cookies[name] = future
        path = os.path.join(self._sync_dir, name)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        os.close(fd)
        try:
            await future
        finally:
            self._cookies.pop(name, None)
            os.unlink(path)

    def close(self) -> None:
        """Drop every watch and the sync directory (the inotify instance is the caller's)."""
        for tracker in list(self.trackers.values()):
            tracker.close()
        self.trackers.clear()
        shutil.rmtree(self._sync_dir, ignore_errors=True)
