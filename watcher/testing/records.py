"""Encoded events to feed a sink: simple ones, a realistic stream (several mounts, odd names,
controls), and change lists a consumer must rebuild."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Final

from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import BOOKMARK, SNAPSHOT_BEGIN, SNAPSHOT_END, EventEncoder, Record

__all__ = ["MOUNTS", "batches", "change_list_records", "make_records", "mixed_records"]

MOUNTS: Final = ("web", "db.main", "caché")


"""Mount names of ``mixed_records``: one with a dot (a separator in subjects and keys), one
non-ASCII."""


def make_records(
    start: int,
    count: int,
    *,
    mount: str = "test",
    stream: str = "test",
    paths: Sequence[bytes] | None = None,
) -> list[Record]:
    """``count`` change events with sequence numbers ``start, start + 1, ...``.

    Args:
        start: the first sequence number.
        count: how many records.
        mount: the mount name on every record.
        stream: the stream half of each event id.
        paths: the paths to cycle through (default ``/file-SEQ``); may be any bytes.
    """
    encoder = EventEncoder(stream=stream, host="testing", epoch=1)
    records = []
    for seq in range(start, start + count):
        path = paths[(seq - start) % len(paths)] if paths else f"/file-{seq}".encode()
        mtime_ns = 1_700_000_000_000_000_000 + seq
        # (mode, ino, dev, nlink, uid, gid, size, 3 x int times, 3 x float times, 3 x ns times)
        fields = (stat.S_IFREG | 0o644, seq, 1, 1, 0, 0, 5, 0, 0, 0)
        st = os.stat_result((*fields, 0.0, mtime_ns / 1e9, 0.0, 0, mtime_ns, 0))
        transition = Transition(path, Kind.ADDED, None, Op.CREATE, st)
        records.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))
    return records


def _stat(size: int) -> os.stat_result:
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime)
    return os.stat_result((stat.S_IFREG | 0o644, 1, 1, 1, 0, 0, size, 0, 1_700_000_000, 0))


def mixed_records(
    count: int, *, start: int = 1, mounts: Sequence[str] = MOUNTS, epoch: int = 1
) -> list[Record]:
    """``count`` realistic events with sequence numbers from ``start``, mounts round-robin.

    Every 50th event is a service-wide bookmark (mount ``""``), the two after it a snapshot's
    begin and end; the rest are changes (``A``, one path in seven not valid UTF-8) built from
    real ``Transition`` values by the real ``EventEncoder``.

    Args:
        count: how many records.
        start: the first sequence number.
        mounts: the mount names to cycle through.
        epoch: the spool epoch in their ids (another one: events of a spool made anew).
    """
    encoder = EventEncoder(stream="s", host="h", epoch=epoch)
    now = 1_700_000_000.0
    records = []
    for seq in range(start, start + count):
        mount = mounts[seq % len(mounts)]
        if seq % 50 == 0:
            records.append(encoder.control(seq, "", BOOKMARK, {"head_seq": seq}, now=now))
        elif seq % 50 == 1:
            begin = {"mount": mount, "reason": "restart"}
            records.append(encoder.control(seq, mount, SNAPSHOT_BEGIN, begin, now=now))
        elif seq % 50 == 2:
            end = {"mount": mount, "reason": "restart", "count": 0}
            records.append(encoder.control(seq, mount, SNAPSHOT_END, end, now=now))
        else:
            path = f"/srv/{mount}/f{seq}".encode() + (b"\xff" if seq % 7 == 0 else b"")
            transition = Transition(path, Kind.ADDED, None, Op.CREATE, _stat(seq))
            records.append(encoder.change(seq, mount, transition, now=now + seq))
    return records


def change_list_records() -> tuple[list[Record], dict[str, dict[bytes, str]]]:
    """Events of the three ``MOUNTS`` and the change lists a consumer must rebuild from them.

    The events hold an activity event, a delete, a snapshot, a non-UTF-8 name and a bookmark.

    Returns:
        The records, and per mount the expected list (path to ``"A"`` or ``"C"``).
    """
    encoder = EventEncoder(stream="s", host="h", epoch=1)
    records: list[Record] = []

    def change(mount: str, path: bytes, kind: Kind | None, prev: Kind | None, op: Op) -> None:
        seq = len(records) + 1
        transition = Transition(path, kind, prev, op, _stat(seq) if kind is not None else None)
        records.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))

    def control(mount: str, type_: str, data: dict[str, object]) -> None:
        records.append(encoder.control(len(records) + 1, mount, type_, data, now=1.7e9))

    change("web", b"/a", Kind.ADDED, None, Op.CREATE)
    change("db.main", b"/x", Kind.ADDED, None, Op.CREATE)
    change("web", b"/b", Kind.ADDED, None, Op.CREATE)
    change("web", b"/a", Kind.ADDED, Kind.ADDED, Op.MODIFY)
    change("web", b"/b", None, Kind.ADDED, Op.DELETE)
    change("web", b"/etc", Kind.CHANGED, None, Op.CREATE)
    control("db.main", SNAPSHOT_BEGIN, {"mount": "db.main", "reason": "overflow"})
    change("db.main", b"/y", Kind.ADDED, None, Op.SNAPSHOT)
    change("db.main", b"/z", Kind.CHANGED, None, Op.SNAPSHOT)
    control("db.main", SNAPSHOT_END, {"mount": "db.main", "reason": "overflow", "count": 2})
    change("caché", b"/bad\xff", Kind.ADDED, None, Op.CREATE)
    change("caché", b"/etc/passwd", Kind.CHANGED, None, Op.MODIFY)
    control("", BOOKMARK, {"head_seq": len(records)})
    expected = {
        "web": {b"/a": "A", b"/etc": "C"},
        "db.main": {b"/y": "A", b"/z": "C"},
        "caché": {b"/bad\xff": "A", b"/etc/passwd": "C"},
    }
    return records, expected


def batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    """``records`` cut into consecutive batches of ``size``."""
    return [records[i : i + size] for i in range(0, len(records), size)]
