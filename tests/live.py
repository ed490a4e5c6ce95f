"""Test kit for the live tracker: a Tracker on a real overlay mount, wired the service's way.

``LiveMount`` owns one event source (``inotify`` by default, or ``fanotify``), one ``Hub`` and
one ``Tracker`` over a mounted overlay,
records every item the hub publishes, and checks the tracker's two promises after ``sync()``:
the incremental list equals ``compute(upper, lowers)``, and replaying the published items from
empty gives the same list (``replay`` also checks that every transition's ``prev_kind`` is
what the consumer holds at that point, so a chain of events is consistent, not only its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence

from watcher.core.excludes import Excludes
from watcher.core.model import Change, Control, Item, Kind, Op, Transition, expand
from watcher.core.mounts import Filesystem
from watcher.core.rules import compute
from watcher.delivery.events import SNAPSHOT_BEGIN
from watcher.live.fanotify import Fanotify
from watcher.live.hub import Hub
from watcher.live.inotify import Inotify
from watcher.live.source import FANOTIFY, INOTIFY, Source
from watcher.live.tracker import Branch, Tracker

ACTIVITY_OPS = frozenset({Op.MODIFY, Op.ATTRIB, Op.CREATE, Op.MOVE})
"""Ops an activity event (``kind == prev_kind``) may carry: a write, never a rescan."""


def replay(items: Sequence[Item], initial: Mapping[bytes, Kind] | None = None) -> dict[bytes, Kind]:
    """The list a consumer holding ``initial`` builds from ``items`` (``snapshot.begin`` resets).

    Raises:
        AssertionError: a transition's ``prev_kind`` is not what the consumer holds, or an
            activity event names a path outside the list or a non-write op.
    """
    state: dict[bytes, Kind] = dict(initial or {})
    in_snapshot = False
    for item in expand(items):
        if isinstance(item, Control):
            if item.type == SNAPSHOT_BEGIN:
                state, in_snapshot = {}, True
            elif item.type.endswith("snapshot.end"):
                in_snapshot = False
            continue
        held = state.get(item.path)
        if in_snapshot:
            assert item.op is Op.SNAPSHOT, f"non-snapshot item inside a snapshot: {item}"
        else:
            assert held == item.prev_kind, f"prev_kind {item.prev_kind} but held {held}: {item}"
        if item.kind == item.prev_kind and not in_snapshot:
            assert item.kind is not None, f"a no-op transition was emitted: {item}"
            assert item.op in ACTIVITY_OPS, f"activity event with op {item.op}: {item}"
        if item.kind is None:
            state.pop(item.path, None)
        else:
            state[item.path] = item.kind
    return state


def as_list(kinds: Mapping[bytes, Kind]) -> list[Change]:
    """A ``{path: kind}`` mapping as a sorted change list."""
    return [Change(path, kinds[path]) for path in sorted(kinds)]


class LiveMount:
    """One tracker over a mounted overlay, fed by its own inotify instance and hub.

    Args:
        name: the mount name.
        upper: the overlay's upper directory.
        lowers: its lower directories, top first.
        rescan_interval: the hub's rescan period for a degraded tracker.
        exclude: the tracker's excludes (``check`` computes with the same).
        source: ``inotify`` or ``fanotify`` (a filesystem mark, or inode marks with
            ``marks="inode"``).
        attribution: fanotify only: transitions name their writer.
    """

    def __init__(
        self,
        name: str,
        upper: str,
        lowers: Sequence[str],
        *,
        rescan_interval: float = 2.0,
        exclude: Excludes | None = None,
        source: str = INOTIFY,
        attribution: bool = False,
        marks: str = "filesystem",
    ) -> None:
        self.upper = upper
        self.exclude = exclude
        self.lowers = list(lowers)
        self.items: list[Item] = []
        self.batches: list[list[Item]] = []
        self.published = asyncio.Event()
        """Set at every publish (clear it, then wait for the next one)."""
        self.source: Source
        if source == FANOTIFY:
            self.source = Fanotify(attribution=attribution, marks=marks)
        else:
            assert source == INOTIFY, f"no such source: {source}"
            assert not attribution, "attribution needs fanotify"
            self.source = Inotify()
        self.hub = Hub(self.source, self._publish, rescan_interval=rescan_interval)
        fs = Filesystem([os.fsencode(p) for p in lowers], os.fsencode(upper), os.devnull)
        self.tracker = Tracker.of(name, Branch.of(fs), self.hub, exclude=exclude)
        self.tracker.attribution = attribution
        self._task: asyncio.Task[None] | None = None
        self.initial: dict[bytes, Kind] = {}
        """What a consumer held before the first item (a restart's persisted list)."""

    async def _publish(self, mount: str, items: list[Item]) -> None:
        items = list(expand(items))
        self.items.extend(items)
        self.batches.append(items)
        self.published.set()

    async def start(self, persisted: Mapping[bytes, Kind] | None = None) -> None:
        """Start the tracker (snapshot, or restart from ``persisted``) and the hub's loop."""
        self.initial = dict(persisted or {})
        await self.hub.follow(self.tracker, persisted)
        self._task = asyncio.create_task(self.hub.run())

    async def sync(self) -> None:
        """The hub's sync barrier, bounded (10 s); re-raises a crash of the hub's loop."""
        assert self._task is not None
        if self._task.done():
            self._task.result()
        async with asyncio.timeout(10):
            await self.hub.sync()

    def transitions(self) -> list[Transition]:
        """Every transition published so far."""
        return [i for i in self.items if isinstance(i, Transition)]

    def controls(self, type_: str | None = None) -> list[Control]:
        """Control items published so far (of ``type_``, when given)."""
        return [
            i for i in self.items if isinstance(i, Control) and (type_ is None or i.type == type_)
        ]

    def check(self) -> list[Change]:
        """Assert list == compute() == replay of the items, one item per path per drain.

        Returns:
            The list.
        """
        want = compute(self.upper, self.lowers, exclude=self.exclude)
        assert self.tracker.changes() == want, "incremental list differs from compute()"
        got = as_list(replay(self.items, self.initial))
        assert got == want, "replayed events differ from compute()"
        for batch in self.batches:
            paths = [t.path for t in batch if isinstance(t, Transition) and t.op is not Op.SNAPSHOT]
            assert len(paths) == len(set(paths)), f"a path twice in one drain: {batch}"
        return want

    async def stop(self) -> None:
        """Stop the loop, drop watches, close the event source."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.hub.close()
        self.source.close()
