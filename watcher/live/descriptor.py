"""A kernel event descriptor waited on from asyncio: what the inotify and fanotify adapters
share (opening and reading stay theirs), and how both tell of a failed syscall."""

from __future__ import annotations

import asyncio
import ctypes
import os
from types import TracebackType
from typing import ClassVar, Self

from watcher.core.errors import WatchError

__all__ = ["Descriptor", "os_error", "show"]


class Descriptor:
    """A non-blocking descriptor of events that an event loop waits on.

    Args:
        fd: the open descriptor; it is owned from now on (closed by :meth:`close`).
    """

    what: ClassVar[str] = "descriptor"
    """What the descriptor is, for errors ("inotify instance", "fanotify group")."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._waiter: asyncio.Future[None] | None = None
        self._waiter_loop: asyncio.AbstractEventLoop | None = None

    def fileno(self) -> int:
        """The descriptor.

        Raises:
            WatchError: It is closed.
        """
        return self._require_fd()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def close(self) -> None:
        """Close the descriptor (idempotent); the kernel drops every watch or mark of it.

        A task waiting for events is woken with :class:`WatchError`.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        waiter, loop = self._waiter, self._waiter_loop
        if waiter is not None and loop is not None:
            loop.remove_reader(fd)
            if not waiter.done():
                waiter.set_exception(WatchError(f"{self.what} closed while reading"))
        self._on_close()
        os.close(fd)

    def _on_close(self) -> None:
        """What a subclass drops when it is closed (its watches' bookkeeping)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise WatchError(f"{self.what} is closed")
        return self._fd

    async def _readable(self) -> None:
        """Wait until the descriptor is readable (or it is closed: ``WatchError``)."""
        fd = self._require_fd()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        self._waiter, self._waiter_loop = waiter, loop
        try:
            await waiter
        finally:
            self._waiter = self._waiter_loop = None
            if self._fd is not None:
                loop.remove_reader(fd)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def show(path: bytes) -> str:
    """A path for messages: invalid UTF-8 as ``\\xNN``, control characters escaped."""
    text = path.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def os_error(path: bytes | None = None) -> OSError:
    """The ``OSError`` of the last ctypes call made with ``use_errno=True``."""
    code = ctypes.get_errno()
    return OSError(code, os.strerror(code), path)
