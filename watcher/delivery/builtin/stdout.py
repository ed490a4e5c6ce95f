"""The ``stdout`` sink: one event per line on the standard output, flushed per batch."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import structlog

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.builtin.lines import lines, write_all
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["StdoutSink"]

logger = structlog.get_logger("layerwatch.sinks")


class StdoutSink:
    """Writes each event as a line to standard output, flushed per batch.

    A closed pipe (the reader went away: ``EPIPE``) cannot come back for this process, so the
    batch is rejected (the runner dead-letters it), the sink turns unhealthy and every later
    batch is rejected without writing. Other write errors are retried (``SinkUnavailable``).
    Takes no options.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        Options(name, options).finish()
        self.name = name
        self._stream: BinaryIO | None = None
        self._broken = ""
        self._logger = logger.bind(sink=name)

    async def open(self) -> None:
        """Take the process's standard output (as it is now, so tests can replace it)."""
        self._stream = sys.stdout.buffer

    async def send(self, batch: Sequence[Record]) -> None:
        """Write and flush the batch; return once the operating system has it."""
        if self._broken:
            raise SinkRejected(self._broken)
        stream = self._stream or sys.stdout.buffer
        try:
            await asyncio.to_thread(self._write, stream, lines(batch))
        except BrokenPipeError as exc:
            self._broken = "stdout is closed (broken pipe)"
            self._logger.error("stdout_closed", error=str(exc))
            raise SinkRejected(self._broken) from exc
        except OSError as exc:
            raise SinkUnavailable(f"stdout write failed: {exc}") from exc

    @staticmethod
    def _write(stream: BinaryIO, data: bytes) -> None:
        try:
            fd = stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation: no descriptor (a test buffer)
            stream.write(data)
            stream.flush()
            return
        stream.flush()  # anything written through the buffer before goes first
        write_all(fd, data)

    def health(self) -> Health:
        """Not ok once stdout is closed."""
        return Health(ok=not self._broken, detail=self._broken)

    async def close(self) -> None:
        """Nothing to release: stdout belongs to the process."""
        self._stream = None
