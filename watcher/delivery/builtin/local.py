"""The built-in line-oriented sinks: ``stdout``, ``jsonl`` and ``exec``.

Each writes one event per line (the CloudEvents JSON object, then ``\\n``). They register in
the entry-point group ``layerwatch.sinks`` like any plugin. Blocking file and pipe I/O runs in
a worker thread, so a stuck pipe or slow disk holds only its own runner, never the event loop.
Options are documented in ``docs/sinks.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import structlog

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["ExecSink", "JsonlSink", "StdoutSink"]

logger = structlog.get_logger("layerwatch.sinks")

_OUTPUT_LOG_LIMIT = 4096


def _lines(batch: Sequence[Record]) -> bytes:
    return b"".join(record.body + b"\n" for record in batch)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
            await asyncio.to_thread(self._write, stream, _lines(batch))
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
        _write_all(fd, data)

    def health(self) -> Health:
        """Not ok once stdout is closed."""
        return Health(ok=not self._broken, detail=self._broken)

    async def close(self) -> None:
        """Nothing to release: stdout belongs to the process."""
        self._stream = None


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
            _write_all(self._fd, data)
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


class _CommandRun(asyncio.SubprocessProtocol):
    """One run of the exec sink's command: its output (kept up to the log limit) and its end.

    ``exited`` resolves when the command's process exits; ``drained``, separately, once its
    stdout and stderr are closed by every process holding them. (asyncio's ``Process.wait``
    waits for both, so a grandchild holding a pipe would hold the wait too.)
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.output: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._open_pipes = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        """Keep the first ``_OUTPUT_LOG_LIMIT`` bytes of each stream; read and drop the rest."""
        kept = self.output[fd]
        room = _OUTPUT_LOG_LIMIT - len(kept)
        if room > 0:
            kept += data[:room]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        """Note a closed stdout or stderr; both closed resolves ``drained``."""
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        """Resolve ``exited``."""
        if not self.exited.done():
            self.exited.set_result(None)


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to process group ``pgid``; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # only processes that changed user are left: not ours to kill
        return False
    return True


class ExecSink:
    """Runs a command per batch with the events as JSON lines on its stdin.

    Options:
        command (list of str, required): the program and its arguments, run without a shell.
        timeout (float, default 30): seconds the command may run; then it is killed.
        debounce (float, default 0): seconds the runner waits for more events before it runs
            the command (its ``linger``), so a burst of changes triggers one run.

    Exit status 0 acknowledges the batch. A non-zero status, a timeout or a command that
    cannot be started raise ``SinkUnavailable``: the batch is sent again after a backoff. The
    command's stdout and stderr are logged (truncated); it never inherits layerwatch's stdout.

    Each run is its own session and process group, and no process of it outlives the run: at
    the timeout the group gets ``SIGTERM``, then ``SIGKILL`` after a short grace; when the
    command exits, whatever it left running in the group is killed; a cancelled send and
    ``close()`` kill the group at once. Nothing is awaited without a deadline: output pipes
    still held open (by a process that left the group) are closed shortly after the exit.
    """

    TERM_GRACE = 0.5
    """Seconds between ``SIGTERM`` and ``SIGKILL`` to the group at the timeout."""
    EXIT_WAIT = 1.0
    """Most seconds to wait, after the command exited or was killed, for the pipes to close."""

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        opts = Options(name, options)
        self.command = opts.string_list("command")
        self.timeout = opts.number("timeout", 30.0, exclusive=True)
        self.linger = opts.number("debounce", 0.0)
        opts.finish()
        self.name = name
        self._error = ""
        self._running: set[asyncio.SubprocessTransport] = set()
        self._logger = logger.bind(sink=name)

    async def open(self) -> None:
        """Nothing to open: each batch starts the command anew."""

    async def send(self, batch: Sequence[Record]) -> None:
        """Run the command with the batch on stdin; return when it exited 0."""
        try:
            await self._run(_lines(batch), len(batch))
        except SinkUnavailable as exc:
            self._error = str(exc)
            raise
        self._error = ""

    async def _run(self, data: bytes, count: int) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            transport, run = await loop.subprocess_exec(
                _CommandRun,
                self.command[0],
                *self.command[1:],
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group (pgid = pid) to kill as one
            )
        except OSError as exc:
            raise SinkUnavailable(f"cannot run {self.command[0]!r}: {exc}") from exc
        self._running.add(transport)
        try:
            stdin = transport.get_pipe_transport(0)
            assert isinstance(stdin, asyncio.WriteTransport)
            stdin.write(data)  # buffered by the loop; a command that never reads is no error
            stdin.close()
            await self._wait(transport, run)
        finally:
            self._running.discard(transport)
            await self._finish(transport, run)
        status = transport.get_returncode()
        details = {
            "command": self.command[0],
            "status": status,
            "events": count,
            "seconds": round(time.monotonic() - started, 3),
            "stdout": run.output[1].decode("utf-8", "replace"),
            "stderr": run.output[2].decode("utf-8", "replace"),
        }
        if status != 0:
            self._logger.warning("exec_failed", **details)
            raise SinkUnavailable(f"{self.command[0]!r} exited with status {status}")
        self._logger.debug("exec_done", **details)

    async def _wait(self, transport: asyncio.SubprocessTransport, run: _CommandRun) -> None:
        """Wait for the command to exit; at the timeout, terminate its group and raise."""
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(run.exited)
        except TimeoutError:
            pid = transport.get_pid()
            self._logger.warning(
                "exec_timeout", command=self.command[0], timeout=self.timeout, pid=pid
            )
            if _signal_group(pid, signal.SIGTERM):
                await asyncio.wait({run.exited}, timeout=self.TERM_GRACE)
            raise SinkUnavailable(
                f"{self.command[0]!r} did not finish within {self.timeout}s; killed"
            ) from None
        if _signal_group(transport.get_pid(), signal.SIGKILL):
            self._logger.warning(
                "exec_leftovers_killed",
                command=self.command[0],
                pid=transport.get_pid(),
                status=transport.get_returncode(),
            )

    async def _finish(self, transport: asyncio.SubprocessTransport, run: _CommandRun) -> None:
        """Kill the group, wait a little for the exit and the pipes, then close them.

        Runs on every way out of a run, cancellation included, and never waits more than
        ``EXIT_WAIT``: a process that left the group may hold the pipes for ever.
        """
        try:
            _signal_group(transport.get_pid(), signal.SIGKILL)
            await asyncio.wait({run.exited, run.drained}, timeout=self.EXIT_WAIT)
            if not run.drained.done():
                self._logger.warning(
                    "exec_output_held_open",
                    command=self.command[0],
                    pid=transport.get_pid(),
                    waited=self.EXIT_WAIT,
                )
        finally:
            transport.close()  # closes the pipes (and kills the command if still running)

    def health(self) -> Health:
        """Not ok after a failed run, until the next success."""
        return Health(ok=not self._error, detail=self._error)

    async def close(self) -> None:
        """Kill the process group of a command still running (its send then fails)."""
        for transport in list(self._running):
            _signal_group(transport.get_pid(), signal.SIGKILL)
