"""A sink plugin for the soak harness: appends events to a JSON-lines file, and raises an
unexpected exception (``RuntimeError``, not ``SinkUnavailable``) from ``send`` while its
trigger file exists.

The service loads it through the entry-point group ``layerwatch.sinks`` (type ``soakfault``):
the harness writes a dist-info registering it into a temp dir and puts that dir and
``bench/`` on the service's ``PYTHONPATH``, so nothing is installed. Options: ``path`` (the
file), ``trigger`` (the file whose presence makes ``send`` raise).

It keeps the sink contract (``name``, ``open``, ``send``, ``health``, ``close``) by shape and
imports nothing from ``watcher``: the harness must not break when the package's modules move.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["FaultSink"]


class _Record(Protocol):
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """What the runner reads of a sink's health."""

    ok: bool
    detail: str = ""


class FaultSink:
    """A JSON-lines file sink that fails on command."""

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        unknown = sorted(set(options) - {"path", "trigger"})
        if unknown or not all(isinstance(options.get(k), str) for k in ("path", "trigger")):
            raise ValueError(f"sinks.{name}: needs string options path and trigger, got {unknown}")
        self.path = Path(str(options["path"]))
        self.trigger = Path(str(options["trigger"]))
        self.name = name
        self.raised = 0

    async def open(self) -> None:
        """Make the file's directory; cut a torn last line (a kill mid-write) away."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.path.open("rb+") as file:
                end = file.seek(0, os.SEEK_END)
                cut = end
                while cut > 0:
                    start = max(cut - 65536, 0)
                    file.seek(start)
                    chunk = file.read(cut - start)
                    newline = chunk.rfind(b"\n")
                    if newline >= 0:
                        cut = start + newline + 1
                        break
                    cut = start
                if cut != end:
                    file.truncate(cut)
        except FileNotFoundError:
            pass

    async def send(self, batch: Sequence[_Record]) -> None:
        """Append the batch (fsynced), unless the trigger is set: then raise."""
        if self.trigger.exists():
            self.raised += 1
            raise RuntimeError(f"soak: injected failure #{self.raised} of sink {self.name}")
        await asyncio.to_thread(self._write, b"".join(record.body + b"\n" for record in batch))

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def health(self) -> Health:
        """Always ok (the runner tracks the failures)."""
        return Health(ok=True)

    async def close(self) -> None:
        """Nothing to close: each batch opens the file."""
