"""The ``jsonl`` sink: one event per line in a file, with rotation and an fsync policy.

It follows its path: a file or directory removed or replaced under it is noticed at the next
batch, made again and written there (``jsonl_reopened`` in the log)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from watcher.core.errors import SinkUnavailable
from watcher.delivery.builtin.lines import write_all
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["JsonlSink"]

logger = structlog.get_logger("layerwatch.sinks")


class JsonlSink:
    """Appends events as JSON lines to a file, with size rotation and an fsync policy.

    Options:
        path (str, required): the file; its directory is created.
        max_bytes (int, default 0 = never): rotate before a line would make the file larger;
            a line is never split, so a file holds at least one line.
        keep (int, default 5): rotated files kept (``path.1`` newest .. ``path.KEEP``).
        fsync (str, default "batch"): ``batch`` (before each send returns), ``interval``
            (at most ``fsync_interval`` seconds after a write), or ``never`` (the kernel's
            choice; a crash can lose acknowledged lines).
        fsync_interval (float, default 1.0): seconds, for ``fsync = "interval"``.

    On open, a torn last line (a crash mid-write: no trailing newline) is truncated away and
    logged; those events were not acknowledged, so the runner sends them again. A failed
    write truncates the file back to where the batch began, so lines are always whole.

    Before and after each batch the sink checks (one ``stat`` each) that ``path`` still names
    the file it has open. When the file or its directory was removed, or another file was
    put in its place, it opens ``path`` again (recreating the directory), logs
    ``jsonl_reopened`` with the reason, and writes the batch there; a batch that went to the
    old file (the change happened during the write) is written again, so an acknowledged
    batch is always in the file at ``path``.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        opts = Options(name, options)
        self.path = Path(opts.string("path"))
        self.max_bytes = opts.integer("max_bytes", 0)
        self.keep = opts.integer("keep", 5, minimum=1)
        self.fsync = opts.choice("fsync", ("batch", "interval", "never"), "batch")
        self.fsync_interval = opts.number("fsync_interval", 1.0, exclusive=True)
        opts.finish()
        self.name = name
        self._fd = -1
        self._ident = (0, 0)  # (st_dev, st_ino) of the open file
        self._size = 0
        self._dirty = False
        self._error = ""
        self._io = asyncio.Lock()
        self._syncer: asyncio.Task[None] | None = None
        self._logger = logger.bind(sink=name)

    async def open(self) -> None:
        """Open (or create) the file for appending, after repairing a torn last line."""
        try:
            await asyncio.to_thread(self._open)
        except OSError as exc:
            self._error = f"cannot open {self.path}: {exc}"
            raise SinkUnavailable(self._error) from exc
        self._error = ""
        if self.fsync == "interval" and self._syncer is None:
            self._syncer = asyncio.create_task(self._sync_periodically())

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = self._repair(fd)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._ident, self._size = fd, (st.st_dev, st.st_ino), size

    def _repair(self, fd: int) -> int:
        """Truncate a torn last line away; return the file's size."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        keep = 0
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            chunk = os.pread(fd, step, pos)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = pos + newline + 1
                break
        os.ftruncate(fd, keep)
        os.fsync(fd)
        self._logger.warning("jsonl_torn_line_truncated", path=str(self.path), dropped=size - keep)
        return keep

    async def send(self, batch: Sequence[Record]) -> None:
        """Append the batch (rotating as needed); fsync it when the policy says ``batch``."""
        async with self._io:
            try:
                await asyncio.to_thread(self._write, batch)
            except OSError as exc:
                self._error = f"write to {self.path} failed: {exc}"
                raise SinkUnavailable(self._error) from exc
        self._error = ""

    def _write(self, batch: Sequence[Record]) -> None:
        if self._fd < 0:
            self._open()
        else:
            self._follow_path()
        self._write_batch(batch)
        if self._follow_path():  # moved during the write: the batch went to the old file
            self._write_batch(batch)

    def _follow_path(self) -> bool:
        """Reopen ``path`` when it no longer names the open file; True when it did."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            reason = "missing"
        else:
            if (st.st_dev, st.st_ino) == self._ident:
                return False
            reason = "replaced"
        if self._dirty and self.fsync != "never":  # the old file may live on (renamed away)
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
        self._dirty = False
        self._open()
        self._logger.warning("jsonl_reopened", path=str(self.path), reason=reason)
        if self.fsync != "never":
            self._sync_dir()
        return True

    def _write_batch(self, batch: Sequence[Record]) -> None:
        pending: list[bytes] = []
        pending_size = 0
        for record in batch:
            line = record.body + b"\n"
            full = self.max_bytes and self._size + pending_size + len(line) > self.max_bytes
            if full and self._size + pending_size > 0:
                self._append(b"".join(pending))
                pending, pending_size = [], 0
                self._rotate()
            pending.append(line)
            pending_size += len(line)
        self._append(b"".join(pending))
        if self.fsync == "batch":
            os.fsync(self._fd)
            self._dirty = False

    def _append(self, data: bytes) -> None:
        if not data:
            return
        try:
            write_all(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # never leave a partial line behind
            raise
        self._size += len(data)
        self._dirty = True

    def _rotate(self) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.KEEP`` (dropped), then a fresh ``path``."""
        if self.fsync != "never":
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        base = str(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{base}.{self.keep}")
        for n in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{base}.{n}", f"{base}.{n + 1}")
        os.rename(base, f"{base}.1")
        self._fd = os.open(base, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(self._fd)
        self._ident, self._size = (st.st_dev, st.st_ino), 0
        if self.fsync != "never":
            self._sync_dir()
        self._logger.info("jsonl_rotated", path=base, keep=self.keep)

    def _sync_dir(self) -> None:
        """Fsync the file's directory, so its new entry survives a crash."""
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def _sync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval)
            await self._sync()

    async def _sync(self) -> None:
        async with self._io:
            if self._dirty and self._fd >= 0:
                try:
                    await asyncio.to_thread(os.fsync, self._fd)
                except OSError as exc:
                    self._error = f"fsync of {self.path} failed: {exc}"
                    self._logger.error("jsonl_fsync_failed", path=str(self.path), error=str(exc))
                else:
                    self._dirty = False

    def health(self) -> Health:
        """Not ok after a failed open, write or fsync, until the next success."""
        return Health(ok=not self._error, detail=self._error)

    async def close(self) -> None:
        """Stop the interval fsync, fsync what is pending (unless ``never``), close the file."""
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
        if self.fsync != "never":
            await self._sync()
        async with self._io:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
