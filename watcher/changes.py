"""The change list of a writable branch: what ``docker diff`` prints, computed from U and B.

U is the upper (writable) directory, B the union of the lower layers (``watcher.layers``).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One entry of the change list: ``kind`` at ``path`` (absolute inside the root, bytes)."""

    path: bytes
    kind: Kind


@dataclass(frozen=True, slots=True)
class Transition:
    """A path's entry moved from ``prev_kind`` to ``kind`` (None: not in the list).

    ``kind == prev_kind`` is an activity event (a write to a path already in the list).
    ``stat`` is the entry's ``lstat`` in the merged view, or None when it is gone.
    """

    path: bytes
    kind: Kind | None
    prev_kind: Kind | None
    op: Op
    stat: os.stat_result | None


def compute(upper: bytes | str, lowers: list[bytes] | list[str], *,
            whiteouts: str = "overlay") -> list[Change]:
    """Placeholder until the full computation lands."""
    raise NotImplementedError
