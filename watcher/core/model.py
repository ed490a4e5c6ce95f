"""The vocabulary every layer speaks: change-list entries, transitions, control events.

A change list is a set of ``Change`` (a path and its ``Kind``); keeping it live produces
``Transition`` values (a path's entry moving from one kind to another, or an activity on it)
and ``Control`` events (snapshot bounds, resyncs), in order: together, ``Item``. The event
types named here are the CloudEvents ``type`` of each (``docs/events.md``).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

__all__ = [
    "BOOKMARK",
    "CHANGE",
    "GAP",
    "RESYNC",
    "SNAPSHOT_BEGIN",
    "SNAPSHOT_END",
    "Change",
    "Content",
    "Control",
    "Item",
    "Kind",
    "Op",
    "SnapshotEntries",
    "Transition",
    "expand",
]

CHANGE: Final = "io.layerwatch.change"
SNAPSHOT_BEGIN: Final = "io.layerwatch.snapshot.begin"
SNAPSHOT_END: Final = "io.layerwatch.snapshot.end"
RESYNC: Final = "io.layerwatch.resync"
BOOKMARK: Final = "io.layerwatch.bookmark"
GAP: Final = "io.layerwatch.gap"


class Kind(enum.StrEnum):
    """The kind of a change-list entry, as ``docker diff`` prints it."""

    ADDED = "A"
    CHANGED = "C"
    DELETED = "D"


class Op(enum.StrEnum):
    """What caused a transition (the event's ``op``)."""

    CREATE = "create"
    MODIFY = "modify"
    ATTRIB = "attrib"
    DELETE = "delete"
    MOVE = "move"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"
    RESCAN = "rescan"
    SNAPSHOT = "snapshot"


class Change(NamedTuple):
    """One entry of the change list: ``kind`` at ``path`` (absolute inside the root, bytes).

    A named tuple: lists of them are built by the hundred thousand, and they sort by path.
    """

    path: bytes
    kind: Kind


@dataclass(frozen=True, slots=True)
class Content:
    """A regular file's content as hashed for an event, or why it was not.

    Attributes:
        sha256: the hex SHA-256 of the bytes read, or None.
        skipped: why there is no digest: ``too_large`` (over the mount's ``hash_max_size``),
            ``gone`` (removed or replaced before it was read), ``unreadable`` (an I/O or
            permission error), ``budget`` (the batch's hashing time ran out), ``metacopy``
            (an upper holding metadata only, read without a merged view).
    """

    sha256: str | None
    skipped: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A path's entry moved from ``prev_kind`` to ``kind`` (None: not in the list).

    ``kind == prev_kind`` is an activity event (a write to a path already in the list).
    ``stat`` is the entry's ``lstat`` in the merged view, or None when it is gone.
    ``process`` is the writer the event source named (attribution on: ``pid``, ``comm``,
    ``exe``, ``uid``, ``gid``, ``cgroup``), else None; it takes no part in equality.
    ``content`` is the file's digest when the mount hashes content (``core.digest``), else
    None; it takes no part in equality.
    """

    path: bytes
    kind: Kind | None
    prev_kind: Kind | None
    op: Op
    stat: os.stat_result | None
    process: Mapping[str, Any] | None = field(default=None, compare=False)
    content: Content | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Control:
    """A control event, ordered among the transitions of its mount."""

    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SnapshotEntries:
    """The entries of a snapshot, taken at one instant, that become transitions (op
    ``snapshot``, with their ``lstat``) only as they are published, a chunk at a time: a
    snapshot of a million entries never exists whole.

    Attributes:
        entries: path and kind of every entry, sorted by path.
        stat: reads an entry's ``lstat`` now (None: gone).
    """

    entries: Sequence[tuple[bytes, Kind]]
    stat: Callable[[bytes], os.stat_result | None]

    def __len__(self) -> int:
        return len(self.entries)

    def chunks(self, size: int) -> Iterator[list[Transition]]:
        """The transitions, ``size`` at a time."""
        for first in range(0, len(self.entries), size):
            chunk = []
            for path, kind in self.entries[first : first + size]:
                st = None if kind is Kind.DELETED else self.stat(path)  # a D carries no stat
                chunk.append(Transition(path, kind, None, Op.SNAPSHOT, st))
            yield chunk


Item = Transition | Control | SnapshotEntries
"""What keeping a list live emits: transitions, control events and snapshots, in order."""


def expand(items: Iterable[Item]) -> Iterator[Transition | Control]:
    """``items`` with every snapshot made into its transitions (all of them: for a consumer
    that holds them anyway; publish big ones chunk by chunk instead)."""
    for item in items:
        if isinstance(item, SnapshotEntries):
            for chunk in item.chunks(max(len(item), 1)):
                yield from chunk
        else:
            yield item
