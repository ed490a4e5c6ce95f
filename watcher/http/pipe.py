"""Pipe: bytes written by a worker thread, read by the event loop, with back-pressure.

The exports (``watcher.core.export``) write a tar to a blocking binary file; the API runs them in
a thread and sends what they write as it comes. A :class:`Pipe` is that file: the writer
blocks while ``depth`` chunks wait for the loop, so memory stays bounded whatever the size,
and :meth:`Pipe.abort` (the client went away) makes the writer's next write fail with
``BrokenPipeError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections.abc import Callable
from typing import Any, Final

__all__ = ["Pipe"]

CHUNK: Final = 1 << 16
"""The size of the chunks the writer's buffer hands over (64 KiB)."""


class Pipe:
    """Bytes from a thread (the tar writer) to the loop, in bounded chunks (back-pressure).

    Example:
        >>> async def tar_bytes() -> bytes:
        ...     pipe = Pipe(asyncio.get_running_loop())
        ...     worker = asyncio.create_task(asyncio.to_thread(pipe.run, lambda f: f.write(b"x")))
        ...     chunks = []
        ...     while (chunk := await pipe.get()) is not None:
        ...         chunks.append(chunk)
        ...     await worker
        ...     return b"".join(chunks)
        >>> asyncio.run(tar_bytes())
        b'x'
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 8) -> None:
        """A pipe into ``loop`` holding at most ``depth`` chunks."""
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._aborted = threading.Event()

    def run(self, write: Callable[[io.BufferedWriter], object]) -> None:
        """In the thread: run ``write`` on a buffered file that feeds the queue.

        The end (None) is queued however ``write`` ends; its exception propagates.
        """
        raw: Any = _PipeRaw(self)  # typeshed: BufferedWriter's default stream type parameter
        out = io.BufferedWriter(raw, buffer_size=CHUNK)
        try:
            write(out)
            out.flush()
        finally:
            with contextlib.suppress(Exception):
                self._put(None)

    def _put(self, item: bytes | None) -> None:
        if self._aborted.is_set():
            raise BrokenPipeError("the client went away")
        future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        while True:
            try:
                future.result(timeout=0.5)
                return
            except TimeoutError:
                if self._aborted.is_set():
                    future.cancel()
                    raise BrokenPipeError("the client went away") from None

    async def get(self) -> bytes | None:
        """The next chunk, or None at the end."""
        return await self._queue.get()

    def abort(self) -> None:
        """Make the writer's next write fail."""
        self._aborted.set()


class _PipeRaw(io.RawIOBase):
    """The raw file under the writer's buffer: each write is one chunk into the pipe."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if chunk:
            self._pipe._put(chunk)
        return len(chunk)
