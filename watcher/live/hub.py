"""The hub: one event source for every mount, its read loop, and the sync barrier.

The hub turns each drain of the source (inotify or fanotify, ``watcher.live.source``) into
dirty paths per tracker (coalesced by path), has the trackers reconcile them, and hands the
resulting items to ``publish`` before it reads again. ``IN_Q_OVERFLOW`` (fanotify's
``FAN_Q_OVERFLOW`` arrives as the same event) makes every path dirty: each tracker resyncs.
For a tracker with ``attribution`` on, each transition carries the last writer the source
named, within the drain, for its path or for the nearest ancestor directory made dirty (the
contents of a directory created or moved in). ``sync()`` writes a
cookie into a private directory watched by the same instance and returns once the cookie's
event was read and everything read before it was reconciled and published.

Every ``rescan_interval``, and at every sync barrier, each tracker is polled
(``Tracker.poll``): a degraded one is recovered, the others check that the branch they watch
is still their mount's branch (a replaced upper dir sends no event to the old watches).

``follow`` starts a tracker off the event loop (a first scan of a big branch takes seconds):
meanwhile the loop keeps reading, and the events of the starting tracker wait, coalesced by
watch and name (past ``_START_BUFFER`` of them: an overflow, so a resync), until its snapshot
is published, in chunks of ``_CHUNK`` items so the outlet's backpressure holds memory bounded.
Cancelling ``follow`` abandons the scan at its next directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

import structlog

from watcher.core.model import Item, Kind, Op, SnapshotEntries, Transition
from watcher.live import heap
from watcher.live.fanotify import AttributedEvent
from watcher.live.inotify import (
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
    RawEvent,
)
from watcher.live.process import Process
from watcher.live.source import Source
from watcher.live.tracker import Tracker, WatchOps

__all__ = ["Hub", "Publish", "StartAbandoned"]

logger = structlog.get_logger("layerwatch.hub")

Publish = Callable[[str, list[Item]], Awaitable[None]]
"""Receives each mount's items (by mount name), in order; the hub waits for it before reading
on."""

_OPS: Final = (
    (IN_CREATE, Op.CREATE),
    (IN_MOVED_TO | IN_MOVED_FROM | IN_MOVE_SELF, Op.MOVE),
    (IN_DELETE | IN_DELETE_SELF, Op.DELETE),
    (IN_MODIFY | IN_CLOSE_WRITE, Op.MODIFY),
    (IN_ATTRIB, Op.ATTRIB),
)
_RANK: Final = {Op.ATTRIB: 0, Op.MODIFY: 1, Op.CREATE: 2, Op.MOVE: 2, Op.DELETE: 2}


_SYNC_PREFIX: Final = "layerwatch-sync-"
_CHUNK: Final = 4096
"""Items handed to ``publish`` at once from a snapshot or resync (bounds encoded memory)."""
_START_BUFFER: Final = 65536
"""Distinct (watch, name) pairs buffered for a starting tracker before it counts as overflow."""


class StartAbandoned(Exception):
    """A tracker's first scan was abandoned (its ``follow`` was cancelled)."""


@dataclass(slots=True)
class _Starting:
    """What happens to a tracker while its first scan runs in a thread."""

    abort: threading.Event = field(default_factory=threading.Event)
    events: dict[tuple[int, bytes], int] = field(default_factory=dict)
    ignored: list[int] = field(default_factory=list)
    overflow: bool = False

    def check(self) -> None:
        """The tracker's interrupt: raise once the start is abandoned."""
        if self.abort.is_set():
            raise StartAbandoned("start abandoned")


def _remove_stale_sync_dirs() -> None:
    """Remove sync directories left by processes that are gone (killed before ``close``)."""
    top = tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(top) as it:
        for dirent in it:
            pid = dirent.name.removeprefix(_SYNC_PREFIX).partition("-")[0]
            mine = dirent.name.startswith(_SYNC_PREFIX) and pid.isdigit()
            if mine and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(dirent.path, ignore_errors=True)


def _note(paths: dict[bytes, Op], path: bytes, op: Op) -> None:
    """Coalesce ``op`` on ``path`` into ``paths``: the structural op wins over activity."""
    if _RANK[op] >= _RANK.get(paths.get(path, Op.ATTRIB), 0):
        paths[path] = op


def _buffer(starting: _Starting, event: RawEvent) -> None:
    """Keep a starting tracker's event for later, coalesced; too many: an overflow."""
    if event.mask & IN_IGNORED:
        starting.ignored.append(event.wd)
        return
    key = (event.wd, event.name)
    if key in starting.events:
        starting.events[key] |= event.mask
    elif len(starting.events) < _START_BUFFER:
        starting.events[key] = event.mask
    else:
        starting.overflow = True


def _attribute(items: list[Item], writers: Mapping[bytes, Process]) -> list[Item]:
    """Each transition with the writer of its path, or of its nearest dirty ancestor."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, Transition):
            path = item.path
            process = writers.get(path)
            while process is None and (path := path.rpartition(b"/")[0]):
                process = writers.get(path)  # not U's root: its own events only
            if process is not None:
                item = replace(item, process=process.as_dict())
        out.append(item)
    return out


def _op(mask: int) -> Op:
    for bits, op in _OPS:
        if mask & bits:
            return op
    return Op.ATTRIB


class Hub(WatchOps):
    """Owns the event source and the trackers fed by it.

    Args:
        source: the one source (inotify instance or fanotify group) for every mount.
        publish: receives each tracker's items.
        rescan_interval: seconds between polls of every mount: a degraded one (watch limit,
            failure, missing branch) is rescanned or recovered, the others' branches checked.
    """

    def __init__(self, source: Source, publish: Publish, *, rescan_interval: float = 2.0) -> None:
        self._source = source
        self._publish = publish
        self.rescan_interval = rescan_interval
        self._owners: dict[int, Tracker] = {}
        self.trackers: dict[str, Tracker] = {}
        self._starting: dict[Tracker, _Starting] = {}
        self._started = asyncio.Condition()
        _remove_stale_sync_dirs()
        self._sync_dir = os.fsencode(tempfile.mkdtemp(prefix=f"{_SYNC_PREFIX}{os.getpid()}-"))
        self._sync_wd = source.add_watch(self._sync_dir, IN_CREATE)
        self._cookies: dict[bytes, asyncio.Future[None]] = {}
        self._counter = itertools.count()
        self.overflows = 0
        self.events_read = 0

    # WatchOps
    def add(self, tracker: Tracker, path: bytes) -> int:
        """Watch ``path`` for ``tracker``."""
        wd = self._source.add_watch(path)
        self._owners[wd] = tracker
        return wd

    def remove(self, tracker: Tracker, wd: int) -> None:
        """Stop watching ``wd``."""
        if self._owners.get(wd) is tracker:
            del self._owners[wd]
            self._source.rm_watch(wd)

    @property
    def watch_count(self) -> int:
        """Watches held for all mounts."""
        return len(self._owners)

    async def follow(self, tracker: Tracker, persisted: Mapping[bytes, Kind] | None = None) -> None:
        """Start ``tracker`` (``Tracker.start``) in a worker thread and publish its first items.

        The event loop stays free during the scan; the tracker's events wait until its
        snapshot is out, then are reconciled, and only then does it join ``trackers``.

        Cancelled, it abandons the scan at its next directory and raises ``CancelledError``
        once the scan has stopped; the tracker is closed.

        Raises:
            Exception: whatever the scan raised (the tracker is closed).
        """
        starting = _Starting()
        self._starting[tracker] = starting
        tracker.interrupt = starting.check
        try:
            scan = asyncio.get_running_loop().run_in_executor(None, tracker.start, persisted)
            try:
                items = await asyncio.shield(scan)
            except asyncio.CancelledError:
                starting.abort.set()
                with contextlib.suppress(Exception):
                    await scan  # the thread stops at its next directory
                raise
            tracker.interrupt = None
            await self._publish_chunked(tracker, items)
            del items
            while starting.ignored or starting.events or starting.overflow:
                await self._publish_chunked(tracker, self._catch_up(tracker, starting))
            self.trackers[tracker.mount] = tracker  # no await since the last check: no gap
        except BaseException:
            tracker.close()
            raise
        finally:
            tracker.interrupt = None
            del self._starting[tracker]
            async with self._started:
                self._started.notify_all()

    def _catch_up(self, tracker: Tracker, starting: _Starting) -> list[Item]:
        """Reconcile what a starting tracker's watches reported during its scan."""
        for wd in starting.ignored:
            tracker.forget_wd(wd)
        starting.ignored.clear()
        if starting.overflow:
            starting.overflow = False
            starting.events.clear()
            return self._guard(tracker, functools.partial(tracker.resync, "overflow"))
        dirty: dict[bytes, Op] = {}
        for (wd, name), mask in starting.events.items():
            path = tracker.dirty_path(wd, name)
            if path is not None:
                _note(dirty, path, _op(mask))
        starting.events.clear()
        return self._guard(tracker, functools.partial(tracker.reconcile, dirty))

    async def _publish_chunked(self, tracker: Tracker, items: list[Item]) -> None:
        """Publish ``items`` at most ``_CHUNK`` at a time; a snapshot's entries become
        transitions (and read their ``lstat``) only as their chunk goes out.

        ``items`` is consumed (emptied); after a big snapshot the freed heap goes back to the
        kernel (``heap.trim``), so the start's peak does not stay the process's size.
        """
        pending: list[Item] = []
        snapshot = 0
        for item in items:
            if isinstance(item, SnapshotEntries):
                snapshot += len(item)
                for chunk in item.chunks(_CHUNK):
                    pending += chunk
                    while len(pending) >= _CHUNK:
                        await self._publish(tracker.mount, pending[:_CHUNK])
                        del pending[:_CHUNK]
            else:
                pending.append(item)
                if len(pending) >= _CHUNK:
                    await self._publish(tracker.mount, pending)
                    pending = []
        if pending:
            await self._publish(tracker.mount, pending)
        del pending
        items.clear()
        if snapshot >= _CHUNK:
            heap.trim()

    async def detach(self, mount: str) -> None:
        """Stop following a mount: drop its watches."""
        tracker = self.trackers.pop(mount, None)
        if tracker is not None:
            tracker.close()

    async def run(self) -> None:
        """Read, reconcile and publish until cancelled.

        Every mount is polled every ``rescan_interval`` on a deadline of its own (degraded
        ones recovered, branches checked), so steady traffic on other mounts (or on their
        watched part) cannot postpone it.
        """
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.rescan_interval
        while True:
            if loop.time() >= next_poll:
                await self._poll()
                next_poll = loop.time() + self.rescan_interval
            try:
                async with asyncio.timeout_at(next_poll):
                    events = await self._source.read()
            except TimeoutError:
                continue
            await self.process(events)

    async def _poll(self) -> None:
        """Poll every tracker (``Tracker.poll``) and publish what it found."""
        for tracker in list(self.trackers.values()):
            if tracker.mount in self.trackers:
                items = self._guard(tracker, tracker.poll)
                if items:
                    await self._publish_chunked(tracker, items)

    def _guard(self, tracker: Tracker, work: Callable[[], list[Item]]) -> list[Item]:
        """Run one tracker's work; a failure degrades that mount, never the others.

        The mount is marked degraded (reason ``error``) and recovered by a resync on the
        next rescan tick, so consumers get a snapshot instead of a silent gap.
        """
        try:
            return work()
        except Exception as exc:
            tracker.fail(exc)
            logger.exception("tracker_failed", mount=tracker.mount, error=str(exc))
            return []

    async def process(self, events: list[RawEvent]) -> None:
        """Handle one drain of the source."""
        self.events_read += len(events)
        dirty: dict[Tracker, dict[bytes, Op]] = {}
        writers: dict[Tracker, dict[bytes, Process]] = {}
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
            starting = self._starting.get(tracker)
            if starting is not None:
                _buffer(starting, event)
                if event.mask & IN_IGNORED:
                    del self._owners[event.wd]
                continue
            if event.mask & IN_IGNORED:
                del self._owners[event.wd]
                if tracker.forget_wd(event.wd) != b"/":
                    continue
                path: bytes | None = b"/"  # U's root lost its watch: check the branch
            else:
                path = tracker.dirty_path(event.wd, event.name)
            if path is None:
                continue
            _note(dirty.setdefault(tracker, {}), path, _op(event.mask))
            if tracker.attribution and type(event) is AttributedEvent and event.process:
                writers.setdefault(tracker, {})[path] = event.process
        if overflow:
            self.overflows += 1
            for starting in self._starting.values():
                starting.overflow = True
            logger.warning("inotify_overflow", mounts=len(self.trackers))  # either source
            # A full queue drops events, sync cookies included: every sync() waiting now
            # began before this rescan, so the rescan covers it.
            cookies.extend(self._cookies)
            for tracker in list(self.trackers.values()):
                items = self._guard(tracker, functools.partial(tracker.resync, "overflow"))
                await self._publish_chunked(tracker, items)
        else:
            for tracker, paths in dirty.items():
                if tracker.mount in self.trackers and not tracker.degraded_by_error:
                    items = self._guard(tracker, functools.partial(tracker.reconcile, paths))
                    if tracker in writers:
                        items = _attribute(items, writers[tracker])
                    await self._publish_chunked(tracker, items)  # a new branch: a snapshot
        if cookies:
            await self._poll()  # a branch replaced without an event is found at the barrier
            for name in cookies:
                future = self._cookies.pop(name, None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def sync(self) -> None:
        """Return once every change completed before the call is reflected and published.

        Bound the wait with ``asyncio.timeout``: the barrier needs ``run`` to be reading.
        A tracker that is starting (``follow``) is waited for too: its changes are in step
        only once it has joined.
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
        async with self._started:
            await self._started.wait_for(lambda: not self._starting)

    def close(self) -> None:
        """Drop every watch and the sync directory (the inotify instance is the caller's)."""
        for tracker in list(self.trackers.values()):
            tracker.close()
        self.trackers.clear()
        shutil.rmtree(self._sync_dir, ignore_errors=True)
