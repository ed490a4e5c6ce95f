"""What the line-oriented built-in sinks share: a batch as lines, and a complete write."""

from __future__ import annotations

import os
from collections.abc import Sequence

from watcher.delivery.events import Record

__all__ = ["lines", "write_all"]


def lines(batch: Sequence[Record]) -> bytes:
    return b"".join(record.body + b"\n" for record in batch)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
