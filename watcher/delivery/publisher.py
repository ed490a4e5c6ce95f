"""The publisher: numbers the trackers' items, encodes them, and hands them to an outlet.

Numbering happens in one place so that every event of a service has one sequence, control
events included; the outlet is where records go (the spool in the service, stdout in
``layerwatch watch``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from watcher.core.model import RESYNC, Control, Item, Kind, Transition, expand
from watcher.delivery.events import BOOKMARK, EventEncoder, Record

__all__ = ["Outlet", "Publisher", "list_updates"]

Outlet = Callable[[list[Record], Mapping[str, Mapping[bytes, Kind | None]]], Awaitable[None]]
"""Takes encoded records plus the change-list updates of the same batch, per mount."""


def list_updates(items: Sequence[Item]) -> dict[bytes, Kind | None]:
    """The change-list entries that ``items`` set (None: removed)."""
    updates: dict[bytes, Kind | None] = {}
    for item in expand(items):
        if isinstance(item, Transition) and item.kind != item.prev_kind:
            updates[item.path] = item.kind
    return updates


class Publisher:
    """Numbers and encodes items, then passes them to ``outlet``.

    Args:
        outlet: where the records go.
        first_seq: the sequence number of the first event (continue after a restart).
        stream: the stream name in event ids (default: the host name).
        host: the host name in ``source``.
        epoch: the identity of the sequence in event ids: the spool's ``epoch``; without a
            spool (``layerwatch watch``), the time the publisher was made, in ms.
    """

    def __init__(
        self,
        outlet: Outlet,
        *,
        first_seq: int = 1,
        stream: str | None = None,
        host: str | None = None,
        epoch: int | None = None,
    ) -> None:
        host = host or socket.gethostname()
        if epoch is None:
            epoch = time.time_ns() // 1_000_000
        self.encoder = EventEncoder(stream=stream or host, host=host, epoch=epoch)
        self._outlet = outlet
        self.next_seq = first_seq
        self.published = 0
        self.resyncs: dict[tuple[str, str], int] = {}
        """Resyncs published, by mount and reason; an entry stays when its mount goes."""
        self.labels: dict[str, dict[str, str]] = {}
        """Per mount, labels added to each of its events (discovered containers)."""

    @property
    def head_seq(self) -> int:
        """The sequence number of the last event published (0 before any)."""
        return self.next_seq - 1

    def encode(self, mount: str, items: Sequence[Item]) -> list[Record]:
        """Number and encode ``items`` of ``mount`` (counting the resyncs among them)."""
        now = time.time()
        labels = self.labels.get(mount)
        encoder = self.encoder
        records = []
        resyncs: list[str] = []
        for seq, item in enumerate(expand(items), start=self.next_seq):
            if isinstance(item, Transition):
                records.append(encoder.change(seq, mount, item, now=now, labels=labels))
                continue
            if item.type == RESYNC:
                resyncs.append(str(item.data.get("reason")))
            records.append(
                encoder.control(seq, mount, item.type, item.data, now=now, labels=labels)
            )
        self.next_seq += len(records)  # only once they are encoded: a failure leaves no hole
        for reason in resyncs:
            key = (mount, reason)
            self.resyncs[key] = self.resyncs.get(key, 0) + 1
        return records

    def encode_one(self, seq: int, mount: str, item: Transition | Control) -> Record:
        """Encode ``item`` as ``mount``'s event at ``seq``, without numbering it (a
        synthesized snapshot reuses the head's number)."""
        labels = self.labels.get(mount)
        now = time.time()
        if isinstance(item, Transition):
            return self.encoder.change(seq, mount, item, now=now, labels=labels)
        return self.encoder.control(seq, mount, item.type, item.data, now=now, labels=labels)

    async def publish(self, mount: str, items: list[Item]) -> None:
        """The hub's ``publish``: encode and hand over one mount's items."""
        if not items:
            return
        flat = list(expand(items))  # a snapshot's entries are read once, for both
        records = self.encode(mount, flat)
        await self._outlet(records, {mount: list_updates(flat)})
        self.published += len(records)

    async def control(self, type_: str, data: Mapping[str, Any], mount: str = "") -> None:
        """Publish a service-wide control event (bookmark, gap)."""
        seq = self.next_seq
        self.next_seq += 1
        record = self.encoder.control(seq, mount, type_, dict(data), now=time.time())
        await self._outlet([record], {})
        self.published += 1

    async def bookmark(self) -> None:
        """Publish a bookmark naming the head of the sequence."""
        await self.control(BOOKMARK, {"head_seq": self.next_seq})
