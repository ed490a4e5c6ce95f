"""The event envelope: CloudEvents 1.0 in structured JSON mode, encoded with orjson.

This module is the one definition of an event. Every event has a place in one sequence per
service (``seq``); its ``id`` is ``STREAM:EPOCH:SEQ``, so a retried delivery reuses it, and the
epoch (the identity of the spool that numbered it, made when the spool was created) keeps a
new spool, whose sequence starts again at 1, from reissuing an id an old one used. The JSON
Schema of ``data`` for every type lives in ``watcher/delivery/schema/``.
"""

from __future__ import annotations

import base64
import stat as stat_mod
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from watcher.core.model import (
    BOOKMARK,
    CHANGE,
    GAP,
    RESYNC,
    SNAPSHOT_BEGIN,
    SNAPSHOT_END,
    Transition,
)

__all__ = [
    "BOOKMARK",
    "CHANGE",
    "GAP",
    "RESYNC",
    "SNAPSHOT_BEGIN",
    "SNAPSHOT_END",
    "EventEncoder",
    "Record",
    "container_of",
    "file_type",
    "path_fields",
]


@dataclass(frozen=True, slots=True)
class Record:
    """One encoded event as it travels from the spool to the sinks.

    Attributes:
        seq: the event's place in the service's sequence.
        mount: the mount the event belongs to ("" for service-wide events).
        type: the CloudEvents ``type``.
        body: the whole CloudEvents JSON object, orjson-encoded, without a trailing newline.
        epoch: the identity of the spool (or ``watch`` run) that numbered it: its creation
            time in ms; (epoch, seq) names one event forever. 0 only in hand-made records.
        path: the path a change event is about, as the encoder made it (None for control
            events and for records read back from the spool): the spool indexes it.
    """

    seq: int
    mount: str
    type: str
    body: bytes
    epoch: int = 0
    path: bytes | None = None

    @property
    def id(self) -> str:
        """The CloudEvents ``id`` (``STREAM:EPOCH:SEQ``)."""
        return str(orjson.loads(self.body)["id"])


_FILE_TYPES: Final = {
    stat_mod.S_IFREG: "file",
    stat_mod.S_IFDIR: "dir",
    stat_mod.S_IFLNK: "symlink",
    stat_mod.S_IFCHR: "chardev",
    stat_mod.S_IFBLK: "blockdev",
    stat_mod.S_IFIFO: "fifo",
    stat_mod.S_IFSOCK: "socket",
}


def file_type(mode: int) -> str:
    """The ``file_type`` field for an ``st_mode``."""
    return _FILE_TYPES.get(stat_mod.S_IFMT(mode), "unknown")


def path_fields(path: bytes) -> dict[str, str]:
    """``{"path": ...}`` when ``path`` is valid UTF-8, else ``{"path_b64": ...}``."""
    try:
        return {"path": path.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path_b64": base64.b64encode(path).decode("ascii")}


def subject(path: bytes) -> str:
    """The CloudEvents ``subject``: the path, percent-encoded, always ASCII."""
    return urllib.parse.quote_from_bytes(path, safe="/")


def container_of(transition: Transition, labels: Mapping[str, str] | None) -> str | None:
    """The container a transition's writer runs in: the mount's discovered container when the
    writer's cgroup path names that container's id, else None (never a guess)."""
    if transition.process is None or not labels:
        return None
    cid = labels.get("container_id")
    cgroup = transition.process.get("cgroup")
    if not cid or not isinstance(cgroup, str) or cid not in cgroup:
        return None
    return cid


def _time(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


class EventEncoder:
    """Builds and encodes the events of one stream.

    Args:
        stream: the stream name, the first part of every ``id`` (unique per service).
        host: the host name used in ``source``.
        epoch: the identity of the sequence: the spool's epoch (its creation time in ms).
    """

    __slots__ = ("_prefix", "_source", "epoch")

    def __init__(self, *, stream: str, host: str, epoch: int) -> None:
        self.epoch = epoch
        self._prefix = f"{stream}:{epoch}:"
        self._source = f"/layerwatch/{host}"

    def _envelope(
        self, seq: int, type_: str, subject_: str | None, data: Mapping[str, Any], now: float
    ) -> bytes:
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"{self._prefix}{seq}",
            "source": self._source,
            "type": type_,
            "time": _time(now),
            "datacontenttype": "application/json",
            "sequence": f"{seq:020d}",
            "data": data,
        }
        if subject_ is not None:
            event["subject"] = subject_
        return orjson.dumps(event)

    def change(
        self,
        seq: int,
        mount: str,
        transition: Transition,
        *,
        now: float,
        labels: Mapping[str, str] | None = None,
    ) -> Record:
        """Encode one change-list transition (or activity) as an ``io.layerwatch.change``.

        ``labels`` (a discovered mount's container id, name, ...) go into ``data.labels``.
        """
        st = transition.stat
        data: dict[str, Any] = {
            "seq": seq,
            "mount": mount,
            "kind": transition.kind.value if transition.kind else None,
            "prev_kind": transition.prev_kind.value if transition.prev_kind else None,
            "op": transition.op.value,
            **path_fields(transition.path),
            "file_type": file_type(st.st_mode) if st is not None else None,
            "stat": None
            if st is None
            else {
                "size": st.st_size,
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": str(st.st_mtime_ns),
            },
        }
        content = transition.content
        if content is not None:
            data["sha256"] = content.sha256
            if content.skipped is not None:
                data["sha256_skipped"] = content.skipped
        if transition.process is not None:
            data["process"] = {**transition.process, "container": container_of(transition, labels)}
        if labels:
            data["labels"] = dict(labels)
        body = self._envelope(seq, CHANGE, subject(transition.path), data, now)
        return Record(seq, mount, CHANGE, body, self.epoch, transition.path)

    def control(
        self,
        seq: int,
        mount: str,
        type_: str,
        data: Mapping[str, Any],
        *,
        now: float,
        labels: Mapping[str, str] | None = None,
    ) -> Record:
        """Encode a control event (snapshot bounds, resync, bookmark, gap)."""
        if labels:
            data = {**data, "labels": dict(labels)}
        return Record(seq, mount, type_, self._envelope(seq, type_, None, data, now), self.epoch)
