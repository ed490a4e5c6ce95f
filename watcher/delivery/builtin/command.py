"""The ``exec`` sink: each batch on the standard input of a command (live sync triggers).

Every run is its own process group, killed whole at its timeout, on exit, cancel and close,
so no process it started outlives it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping, Sequence

import structlog

from watcher.core.errors import SinkUnavailable
from watcher.delivery.builtin.lines import lines
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["ExecSink"]

logger = structlog.get_logger("layerwatch.sinks")


_OUTPUT_LOG_LIMIT = 4096


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
            await self._run(lines(batch), len(batch))
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
