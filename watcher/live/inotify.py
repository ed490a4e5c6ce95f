"""The inotify adapter: one kernel inotify instance, raw events, batched reads.

This is the only module that imports ``aionotify``. It keeps aionotify for what it gets right
(the ``Flags`` constants) and owns the three syscalls itself, because aionotify's read path and
``inotify_add_watch`` are exactly where its defects live (see ``docs/inotify.md``):

- it drops events whose watch descriptor it does not know, including ``IN_Q_OVERFLOW`` (wd -1);
- it decodes names and encodes watched paths as strict UTF-8 (non-UTF-8 names raise, non-UTF-8
  directories cannot be watched);
- it reads one event per call, through a 1 KiB stream transport;
- it calls libc without ``use_errno``, so a failed ``inotify_add_watch`` cannot say why.

Here names stay bytes end to end, every event (overflow included) reaches the caller in kernel
order, and :meth:`Inotify.read` drains the descriptor with large ``os.read`` calls. There is no
watch bookkeeping here (path to wd maps, recursion): that is the tracker's job.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aionotify import Flags

from watcher.core.errors import WatchError, WatchLimitError
from watcher.live.descriptor import Descriptor, os_error, show

__all__ = [
    "DIR_MASK",
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_DONT_FOLLOW",
    "IN_EXCL_UNLINK",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "IN_UNMOUNT",
    "Inotify",
    "Limits",
    "RawEvent",
    "read_limits",
]

IN_MODIFY: Final = int(Flags.MODIFY)
IN_ATTRIB: Final = int(Flags.ATTRIB)
IN_CLOSE_WRITE: Final = int(Flags.CLOSE_WRITE)
IN_MOVED_FROM: Final = int(Flags.MOVED_FROM)
IN_MOVED_TO: Final = int(Flags.MOVED_TO)
IN_CREATE: Final = int(Flags.CREATE)
IN_DELETE: Final = int(Flags.DELETE)
IN_DELETE_SELF: Final = int(Flags.DELETE_SELF)
IN_MOVE_SELF: Final = int(Flags.MOVE_SELF)
IN_UNMOUNT: Final = int(Flags.UNMOUNT)
IN_Q_OVERFLOW: Final = int(Flags.Q_OVERFLOW)
IN_IGNORED: Final = int(Flags.IGNORED)
IN_ONLYDIR: Final = int(Flags.ONLYDIR)
IN_DONT_FOLLOW: Final = int(Flags.DONT_FOLLOW)
IN_EXCL_UNLINK: Final = int(Flags.EXCL_UNLINK)
IN_ISDIR: Final = int(Flags.ISDIR)

#: Mutation events only, never open/access/close-nowrite: our own reads of U must not feed the
#: queue. ``IN_ONLYDIR | IN_DONT_FOLLOW`` refuse anything but a real directory;
#: ``IN_EXCL_UNLINK`` drops events on children after they are unlinked.
DIR_MASK: Final = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)

_PROC_LIMITS: Final = Path("/proc/sys/fs/inotify")
_WATCH_COST: Final = "~1.3 KB of kernel memory per watch"
_HEADER: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len
_READ_SIZE: Final = 64 * 1024  # far above one event (16 B + NAME_MAX + 1, padded)
_MAX_READS: Final = 64  # reads per read() call, so one storm cannot starve the loop


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One ``struct inotify_event`` as the kernel wrote it.

    Attributes:
        wd: The watch descriptor, or -1 for ``IN_Q_OVERFLOW``.
        mask: The event bits (``IN_*``), ``IN_ISDIR`` included.
        cookie: Pairs an ``IN_MOVED_FROM`` with its ``IN_MOVED_TO``; 0 otherwise.
        name: The entry name, raw bytes; ``b""`` for events on the watched directory itself.
    """

    wd: int
    mask: int
    cookie: int
    name: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    """The inotify limits of the running kernel (``/proc/sys/fs/inotify``).

    Attributes:
        max_user_watches: Watches per user, shared by all of that uid's processes.
        max_user_instances: inotify instances per user.
        max_queued_events: Queue length of an instance, fixed when the instance is created.
    """

    max_user_watches: int
    max_user_instances: int
    max_queued_events: int


def read_limits() -> Limits:
    """Read the current inotify limits.

    Returns:
        The three limits from ``/proc/sys/fs/inotify``.

    Raises:
        WatchError: The files are missing or unreadable (no inotify in this kernel).
    """
    try:
        return Limits(
            max_user_watches=_read_limit("max_user_watches"),
            max_user_instances=_read_limit("max_user_instances"),
            max_queued_events=_read_limit("max_queued_events"),
        )
    except (OSError, ValueError) as exc:
        raise WatchError(f"cannot read inotify limits from {_PROC_LIMITS}: {exc}") from exc


def _read_limit(name: str) -> int:
    return int((_PROC_LIMITS / name).read_text(encoding="ascii"))


class _LibC:
    """The three inotify syscalls, through ctypes with errno captured."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter links
        self.init1 = lib.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = lib.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = lib.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


_libc: Final = _LibC()


class Inotify(Descriptor):
    """One inotify instance (the service uses exactly one for all mounts).

    The descriptor is non-blocking and close-on-exec. One task reads it with :meth:`read`;
    any task may add and remove watches. Usable as a context manager (``with`` or
    ``async with``); :meth:`close` is idempotent.

    Example:
        >>> import asyncio, os, tempfile
        >>> async def demo() -> list[bytes]:
        ...     with tempfile.TemporaryDirectory() as top, Inotify() as ino:
        ...         ino.add_watch(os.fsencode(top))
        ...         open(os.path.join(top, "f"), "wb").close()
        ...         return [event.name for event in await ino.read()]
        >>> asyncio.run(demo())
        [b'f', b'f']
    """

    what = "inotify instance"

    def __init__(self) -> None:
        """Create the kernel instance.

        Raises:
            WatchError: The kernel refused (EMFILE: ``fs.inotify.max_user_instances`` or the
                process's open-file limit is reached).
        """
        fd = _libc.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            exc = os_error()
            raise WatchError(_init_message(exc)) from exc
        super().__init__(fd)
        self._reading = False

    def add_watch(self, path: bytes, mask: int = DIR_MASK) -> int:
        """Watch ``path`` for the events in ``mask``.

        Args:
            path: The path as raw bytes (any bytes but NUL).
            mask: ``IN_*`` bits; the default watches a directory for mutations only.

        Returns:
            The watch descriptor. Watching an inode that is already watched returns the same wd
            again and replaces its mask (kernel behaviour).

        Raises:
            WatchLimitError: ``fs.inotify.max_user_watches`` is reached (ENOSPC); the message
                names the path, the limit and the sysctl to raise.
            WatchError: Any other failure (ENOENT, ENOTDIR, EACCES, ...), naming path and
                errno, chained from an ``OSError`` that carries the errno.
        """
        fd = self._require_fd()
        if b"\0" in path:
            raise WatchError(f"cannot watch {show(path)}: path contains a NUL byte")
        wd: int = _libc.add_watch(fd, path, mask)
        if wd >= 0:
            return wd
        exc = os_error(path)
        if exc.errno == errno.ENOSPC:
            raise WatchLimitError(_limit_message(path)) from exc
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise WatchError(f"cannot watch {show(path)}: {name} ({exc.strerror})") from exc

    def rm_watch(self, wd: int) -> None:
        """Stop watching ``wd``; a wd the kernel already removed is ignored (EINVAL).

        The kernel queues an ``IN_IGNORED`` event for the wd.

        Raises:
            WatchError: The instance is closed, or the kernel refused for another reason.
        """
        fd = self._require_fd()
        if _libc.rm_watch(fd, wd) == 0:
            return
        exc = os_error()
        if exc.errno == errno.EINVAL:
            return
        raise WatchError(f"cannot remove watch {wd}: {exc.strerror}") from exc

    async def read(self) -> list[RawEvent]:
        """Wait for events, then return every event queued now, in kernel order.

        Drains the descriptor with up to 64 reads of 64 KiB each (until EAGAIN), so one call
        may return thousands of events. ``IN_Q_OVERFLOW`` (wd -1) is returned like any other
        event. Cancelling a waiting ``read`` loses nothing and leaves the instance usable.
        Only one task may read at a time.

        Returns:
            At least one event.

        Raises:
            WatchError: The instance is closed (before or while waiting), or reading failed.
            RuntimeError: Another task is already reading.
        """
        if self._reading:
            raise RuntimeError("Inotify.read() is already awaited by another task")
        self._reading = True
        try:
            await asyncio.sleep(0)  # a checkpoint: a storm never keeps the reader from yielding
            events = self._drain()
            while not events:
                await self._readable()
                events = self._drain()
        finally:
            self._reading = False
        return events

    def _drain(self) -> list[RawEvent]:
        """Read and parse whatever is queued now, without blocking."""
        fd = self._require_fd()
        events: list[RawEvent] = []
        for _ in range(_MAX_READS):
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                raise WatchError(f"cannot read inotify events: {exc.strerror}") from exc
            _parse(data, events)
        return events


# Building a frozen dataclass through ``__init__`` costs a guarded ``object.__setattr__`` per
# field, about half of the whole read path. ``_parse`` fills the slots directly instead: the same
# object (equal, hashable, frozen against later writes), at twice the events per second.
_new_event = object.__new__
_slots = vars(RawEvent)  # the member descriptors of the four slots
_set_wd = _slots["wd"].__set__
_set_mask = _slots["mask"].__set__
_set_cookie = _slots["cookie"].__set__
_set_name = _slots["name"].__set__


def _parse(data: bytes, out: list[RawEvent]) -> None:
    """Append the events in one ``read`` result (the kernel never splits an event)."""
    unpack = _HEADER.unpack_from
    append = out.append
    end = len(data)
    offset = 0
    while offset < end:
        wd, mask, cookie, length = unpack(data, offset)
        start = offset + 16  # _HEADER.size
        offset = start + length
        event = _new_event(RawEvent)
        _set_wd(event, wd)
        _set_mask(event, mask)
        _set_cookie(event, cookie)
        # The name is NUL-padded to an alignment boundary; names never contain NUL.
        _set_name(event, data[start:offset].rstrip(b"\0"))
        append(event)


def _init_message(exc: OSError) -> str:
    if exc.errno == errno.EMFILE:
        try:
            instances = str(read_limits().max_user_instances)
        except WatchError:
            instances = "unknown"
        return (
            "cannot create an inotify instance: EMFILE: either this user's instances reached "
            f"fs.inotify.max_user_instances (now {instances}; raise it with "
            "`sysctl fs.inotify.max_user_instances=N`) or the process is out of file "
            "descriptors (`ulimit -n`)"
        )
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"cannot create an inotify instance: {name} ({exc.strerror})"


def _limit_message(path: bytes) -> str:
    try:
        limit = str(read_limits().max_user_watches)
    except WatchError:
        limit = "unknown"
    return (
        f"cannot watch {show(path)}: ENOSPC: the inotify watch limit is reached "
        f"(fs.inotify.max_user_watches = {limit}, shared by every process of uid {os.getuid()}); "
        "raise it with `sysctl fs.inotify.max_user_watches=N` "
        f"(each watch costs {_WATCH_COST}, counted only while in use)"
    )
