"""The fanotify adapter: one kernel fanotify group, read as inotify-shaped raw events.

The three syscalls (``fanotify_init``, ``fanotify_mark``, ``name_to_handle_at``) go through
ctypes with errno captured, like ``watcher.live.inotify``. The group reports directory handle
and entry name with every event (``FAN_REPORT_DFID_NAME``), and, when asked, a pidfd of the
process that made the change (``FAN_REPORT_PIDFD``).

Marking (see ``docs/fanotify.md``): a directory the tracker follows (``add_watch`` with
``DIR_MASK``) costs no kernel mark of its own. Its filesystem gets one filesystem mark
(``FAN_MARK_FILESYSTEM``, the first time a directory of it is added), and the directory's file
handle is recorded in a dict, handle bytes to watch descriptor. Every event the kernel reports
for that filesystem is looked up there by the handle bytes it carries: an event in a directory
nobody follows costs one dict miss, no syscall. A filesystem that refuses a filesystem mark
(btrfs subvolumes: EXDEV; no CAP_SYS_ADMIN: EPERM) gets one inode mark per directory instead,
found the same way. Any other mask (the hub's sync directory) is always an inode mark.

The events come out as :class:`~watcher.live.inotify.RawEvent`, so the hub and the tracker are
the same for both sources: the watch descriptors are this adapter's own numbers (never
reused), the ``FAN_*`` event bits are the ``IN_*`` bits (the kernel gives them the same
values), ``.`` (the directory itself) becomes ``b""``, and a followed directory that is deleted
yields ``IN_DELETE_SELF`` then ``IN_IGNORED``, as inotify would. With attribution on, each
event of a followed directory is an :class:`AttributedEvent` carrying what ``/proc`` said of
the writer (``watcher.live.process``), read through the pidfd once per process per drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from watcher.core.errors import WatchError, WatchLimitError
from watcher.live.descriptor import Descriptor, os_error, show
from watcher.live.inotify import (
    DIR_MASK,
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    RawEvent,
)
from watcher.live.process import Process, describe

__all__ = [
    "FILESYSTEM",
    "INODE",
    "AttributedEvent",
    "Fanotify",
    "Limits",
    "read_limits",
]

FAN_MODIFY: Final = 0x2
FAN_ATTRIB: Final = 0x4
FAN_CLOSE_WRITE: Final = 0x8
FAN_MOVED_FROM: Final = 0x40
FAN_MOVED_TO: Final = 0x80
FAN_CREATE: Final = 0x100
FAN_DELETE: Final = 0x200
FAN_DELETE_SELF: Final = 0x400
FAN_MOVE_SELF: Final = 0x800
FAN_Q_OVERFLOW: Final = 0x4000
FAN_ONDIR: Final = 0x40000000

_FAN_CLOEXEC: Final = 0x1
_FAN_NONBLOCK: Final = 0x2
_FAN_CLASS_NOTIF: Final = 0x0
_FAN_REPORT_PIDFD: Final = 0x80
_FAN_REPORT_DFID_NAME: Final = 0x400 | 0x800  # FAN_REPORT_DIR_FID | FAN_REPORT_NAME
_FAN_MARK_ADD: Final = 0x1
_FAN_MARK_REMOVE: Final = 0x2
_FAN_MARK_DONT_FOLLOW: Final = 0x4
_FAN_MARK_ONLYDIR: Final = 0x8
_FAN_MARK_FILESYSTEM: Final = 0x100
_FAN_EVENT_ON_CHILD: Final = 0x08000000
_INFO_FID: Final = 1
_INFO_DFID_NAME: Final = 2
_INFO_DFID: Final = 3
_INFO_PIDFD: Final = 4
_AT_FDCWD: Final = -100
_AT_HANDLE_FID: Final = 0x200  # a handle for identification only (Linux 6.5); see _handle
_MAX_HANDLE_SZ: Final = 128

# The kernel gives fanotify's directory-event bits the values of inotify's; the translation is
# the identity, and these assertions keep it honest.
assert (FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE) == (IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE)
assert (FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE) == (IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE)
assert (FAN_DELETE, FAN_DELETE_SELF, FAN_MOVE_SELF) == (IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF)
assert (FAN_Q_OVERFLOW, FAN_ONDIR) == (IN_Q_OVERFLOW, IN_ISDIR)

#: What a followed directory is marked for: mutations only, as ``inotify.DIR_MASK``.
_FOLLOW_MASK: Final = (
    FAN_CREATE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_MODIFY
    | FAN_CLOSE_WRITE
    | FAN_ATTRIB
    | FAN_DELETE_SELF
    | FAN_MOVE_SELF
    | FAN_ONDIR
)
_EVENT_BITS: Final = _FOLLOW_MASK & ~FAN_ONDIR
_SELF: Final = FAN_DELETE_SELF | FAN_MOVE_SELF

FILESYSTEM: Final = "filesystem"
"""A filesystem's directories are found through one filesystem mark."""
INODE: Final = "inode"
"""A filesystem's directories are marked one by one (``fs.fanotify.max_user_marks``)."""

_PROC_LIMITS: Final = Path("/proc/sys/fs/fanotify")
_METADATA: Final = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
_INFO: Final = struct.Struct("=BBH")  # struct fanotify_event_info_header
_HANDLE_HEAD: Final = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type
_PIDFD: Final = struct.Struct("=i")
_READ_SIZE: Final = 64 * 1024
_PIDFD_READ_SIZE: Final = 4 * 1024
"""With pidfds, each read opens one descriptor per event it returns: small reads keep that
within the process's open-file limit (they are closed before the next read)."""
_MAX_READS: Final = 64


@dataclass(frozen=True, slots=True)
class AttributedEvent(RawEvent):
    """A :class:`RawEvent` with the process that caused it (attribution on).

    Attributes:
        process: What ``/proc`` said of the writer, or None when the kernel gave no process
            (it exited before the event was read, or lives in a pid namespace we cannot see).
    """

    process: Process | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The fanotify limits of the running kernel (``/proc/sys/fs/fanotify``).

    Attributes:
        max_user_marks: Marks per user (inode marks count one per directory; a filesystem
            mark counts one).
        max_queued_events: Queue length of a group.
    """

    max_user_marks: int
    max_queued_events: int


def read_limits() -> Limits:
    """Read the current fanotify limits.

    Raises:
        WatchError: The files are missing or unreadable (no fanotify in this kernel).
    """
    try:
        return Limits(
            max_user_marks=int((_PROC_LIMITS / "max_user_marks").read_text("ascii")),
            max_queued_events=int((_PROC_LIMITS / "max_queued_events").read_text("ascii")),
        )
    except (OSError, ValueError) as exc:
        raise WatchError(f"cannot read fanotify limits from {_PROC_LIMITS}: {exc}") from exc


class _Fsid(ctypes.Structure):
    _fields_ = [("val", ctypes.c_int * 2)]


class _Statfs(ctypes.Structure):
    """``struct statfs64`` as glibc lays it out (words are ``long``, counts 64-bit)."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", _Fsid),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


class _LibC:
    """The fanotify syscalls and the two lookups the handles need, with errno captured."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.init = lib.fanotify_init
        self.init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self.init.restype = ctypes.c_int
        self.mark = lib.fanotify_mark
        self.mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.mark.restype = ctypes.c_int
        self.name_to_handle_at = lib.name_to_handle_at
        self.name_to_handle_at.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        self.name_to_handle_at.restype = ctypes.c_int
        self.statfs = lib.statfs64
        self.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
        self.statfs.restype = ctypes.c_int


_libc: Final = _LibC()
_handle_flags = _AT_HANDLE_FID
"""``AT_HANDLE_FID`` where the kernel has it (the handle fanotify reports even for a filesystem
that cannot decode handles), else 0 (the same bytes on every filesystem that can)."""


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _fsid(path: bytes) -> bytes:
    """The filesystem id of ``path``'s filesystem, as fanotify reports it (``statfs``).

    Raises:
        OSError: ``path`` is gone.
    """
    st = _Statfs()
    if _libc.statfs(path, ctypes.byref(st)) != 0:
        raise os_error(path)
    return bytes(st.f_fsid)


def _handle(path: bytes, fsid: bytes) -> bytes:
    """The key fanotify will report ``path``'s directory under: fsid then ``file_handle``.

    Raises:
        OSError: ``path`` is gone, or its filesystem has no file handles.
    """
    global _handle_flags
    buf = ctypes.create_string_buffer(8 + _MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, _MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    while True:
        rc = _libc.name_to_handle_at(_AT_FDCWD, path, buf, ctypes.byref(mount_id), _handle_flags)
        if rc == 0:
            break
        exc = os_error(path)
        if exc.errno == errno.EINVAL and _handle_flags:
            _handle_flags = 0  # a kernel before 6.5
            continue
        raise exc
    size = _HANDLE_HEAD.unpack_from(buf, 0)[0]
    return fsid + buf.raw[: 8 + size]


@dataclass(slots=True)
class _Filesystem:
    """One filesystem with followed directories: how they are marked, and how many."""

    device: int
    strategy: str
    anchor: bytes | None
    """The filesystem mark's removal path: the root of the mount the first directory was
    in (holding a descriptor of a directory instead would keep its deletion from being
    reported: the kernel says ``FAN_DELETE_SELF`` only once the last reference goes)."""
    count: int = 0


@dataclass(slots=True)
class _Watch:
    key: bytes
    device: int | None
    """The followed directory's filesystem; None for a lone inode mark (another mask)."""
    inode_mark: bool
    path: bytes
    mask: int


class Fanotify(Descriptor):
    """One fanotify group (the service uses exactly one for all mounts).

    The descriptor is non-blocking and close-on-exec. One task reads it with :meth:`read`;
    any task may add and remove watches. Usable as a context manager; :meth:`close` is
    idempotent.

    Args:
        attribution: Ask the kernel for a pidfd with each event (``FAN_REPORT_PIDFD``) and
            attach the writer to each event of a followed directory.
        marks: ``"filesystem"`` (one filesystem mark per filesystem, the default) or
            ``"inode"`` (one inode mark per followed directory).

    Raises:
        WatchError: The kernel refused the group (EPERM: no CAP_SYS_ADMIN; EINVAL: a kernel
            without directory handles or pidfds; EMFILE), naming the errno.
        ValueError: ``marks`` is neither of the two.

    Example (as root):
        >>> import asyncio, os, tempfile
        >>> async def demo() -> list[tuple[bytes, str | None]]:
        ...     with tempfile.TemporaryDirectory() as top, Fanotify(attribution=True) as fan:
        ...         fan.add_watch(os.fsencode(top))
        ...         with open(os.path.join(top, "f"), "wb") as f:
        ...             f.write(b"x")
        ...         events = await fan.read()
        ...         return [(e.name, e.process.comm) for e in events]  # type: ignore[attr-defined]
        >>> asyncio.run(demo())  # the kernel merged the create and the write into one event
        [(b'f', 'python...')]
    """

    what = "fanotify group"

    def __init__(self, *, attribution: bool = False, marks: str = FILESYSTEM) -> None:
        if marks not in (FILESYSTEM, INODE):
            raise ValueError(f"fanotify marks must be {FILESYSTEM!r} or {INODE!r}, not {marks!r}")
        flags = _FAN_CLASS_NOTIF | _FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_REPORT_DFID_NAME
        if attribution:
            flags |= _FAN_REPORT_PIDFD
        fd = _libc.init(flags, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            exc = os_error()
            raise WatchError(f"cannot create a fanotify group: {_errname(exc)} ({exc.strerror})")
        super().__init__(fd)
        self.attribution = attribution
        self.marks = marks
        self._read_size = _PIDFD_READ_SIZE if attribution else _READ_SIZE
        self._wds: dict[bytes, int] = {}
        """Handle key to watch descriptor: the hot path's one lookup."""
        self._watches: dict[int, _Watch] = {}
        self._filesystems: dict[int, _Filesystem] = {}
        self._fsids: dict[int, bytes] = {}
        """Device number to fsid: one ``statfs`` per filesystem, not per directory."""
        self._next_wd = 1
        self._reading = False
        self.events_filtered = 0
        """Events read for directories nobody follows (a filesystem mark's cost)."""

    @property
    def strategies(self) -> dict[int, str]:
        """How each filesystem with followed directories is marked, by device number."""
        return {dev: fs.strategy for dev, fs in self._filesystems.items()}

    def add_watch(self, path: bytes, mask: int = DIR_MASK) -> int:
        """Follow the directory ``path``.

        ``DIR_MASK`` (a tracker's directory) is found through its filesystem's mark (made now
        if it is the first); any other ``IN_*`` mask is an inode mark on ``path`` for those
        events alone.

        Returns:
            The watch descriptor; the directory already followed returns its wd again (and a
            directory moved keeps its wd, as with inotify).

        Raises:
            WatchLimitError: ``fs.fanotify.max_user_marks`` is reached (ENOSPC), or the
                directory's filesystem cannot be followed by fanotify at all (no file handles):
                the tracker degrades the mount to rescans.
            WatchError: ``path`` is gone, not a directory, or the kernel refused, naming the
                path and the errno.
        """
        fd = self._require_fd()
        if b"\0" in path:
            raise WatchError(f"cannot watch {show(path)}: path contains a NUL byte")
        try:
            st = os.lstat(path)
            fsid = self._fsids.get(st.st_dev)
            if fsid is None:
                fsid = self._fsids[st.st_dev] = _fsid(path)
            key = _handle(path, fsid)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise WatchLimitError(
                    f"cannot watch {show(path)}: its filesystem has no file handles "
                    f"({_errname(exc)}), so fanotify cannot report it; use source = "
                    '"inotify" for it'
                ) from exc
            raise WatchError(
                f"cannot watch {show(path)}: {_errname(exc)} ({exc.strerror})"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise WatchError(f"cannot watch {show(path)}: ENOTDIR (not a directory)")
        wd = self._wds.get(key)
        if wd is not None:
            self._watches[wd].path = path
            return wd
        flags = _FAN_MARK_ADD | _FAN_MARK_ONLYDIR | _FAN_MARK_DONT_FOLLOW
        device: int | None = None
        if mask != DIR_MASK:
            self._mark(fd, flags, mask & _EVENT_BITS, path)  # the same bits (see above)
        else:
            fs = self._filesystems.get(st.st_dev) or self._filesystem(fd, path, st.st_dev)
            if fs.strategy == INODE:
                self._mark(fd, flags, _FOLLOW_MASK | _FAN_EVENT_ON_CHILD, path)
            device = st.st_dev
            fs.count += 1
        wd, self._next_wd = self._next_wd, self._next_wd + 1
        self._wds[key] = wd
        inode_mark = device is None or self._filesystems[device].strategy == INODE
        self._watches[wd] = _Watch(key, device, inode_mark, path, mask)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Stop following ``wd``; an unknown wd is ignored. No ``IN_IGNORED`` is queued.

        The last directory of a filesystem removes its filesystem mark.

        Raises:
            WatchError: The group is closed.
        """
        fd = self._require_fd()
        watch = self._watches.pop(wd, None)
        if watch is None:
            return
        if self._wds.get(watch.key) == wd:
            del self._wds[watch.key]
        if watch.inode_mark and self._still_at(watch):
            flags = _FAN_MARK_REMOVE | _FAN_MARK_ONLYDIR | _FAN_MARK_DONT_FOLLOW
            bits = watch.mask & _EVENT_BITS if watch.device is None else _FOLLOW_MASK
            _libc.mark(fd, flags, bits | _FAN_EVENT_ON_CHILD, _AT_FDCWD, watch.path)
        self._release(fd, watch.device)

    def _still_at(self, watch: _Watch) -> bool:
        """Whether the directory is still at the path it was last known at.

        An inode mark is removed through a path; if another directory is there now (one this
        group may follow too), removing would drop *its* mark. Then the old mark is left: the
        kernel drops it with its inode, and its events meanwhile miss the dict.
        """
        fsid = self._fsids.get(watch.device) if watch.device is not None else None
        try:
            return _handle(watch.path, fsid or _fsid(watch.path)) == watch.key
        except OSError:
            return False

    def _release(self, fd: int, device: int | None) -> None:
        if device is None or (fs := self._filesystems.get(device)) is None:
            return
        fs.count -= 1
        if fs.count > 0:
            return
        del self._filesystems[device]
        self._fsids.pop(device, None)  # a device number is reused by the next tmpfs, say
        if fs.anchor is not None:
            flags = _FAN_MARK_REMOVE | _FAN_MARK_FILESYSTEM
            _libc.mark(fd, flags, _FOLLOW_MASK, _AT_FDCWD, fs.anchor)

    def _filesystem(self, fd: int, path: bytes, device: int) -> _Filesystem:
        """Mark ``path``'s filesystem (or find it refuses, and use inode marks)."""
        if self.marks == INODE:
            fs = _Filesystem(device, INODE, None)
        else:
            try:
                self._mark(fd, _FAN_MARK_ADD | _FAN_MARK_FILESYSTEM, _FOLLOW_MASK, path)
            except WatchLimitError:
                raise
            except WatchError as exc:
                cause = exc.__cause__
                refused = (errno.EPERM, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP)
                if not isinstance(cause, OSError) or cause.errno not in refused:
                    raise
                fs = _Filesystem(device, INODE, None)
            else:
                fs = _Filesystem(device, FILESYSTEM, _mount_root(path, device))
        self._filesystems[device] = fs
        return fs

    def _mark(self, fd: int, flags: int, mask: int, path: bytes) -> None:
        if _libc.mark(fd, flags, mask, _AT_FDCWD, path) == 0:
            return
        exc = os_error(path)
        if exc.errno == errno.ENOSPC:
            try:
                limit = str(read_limits().max_user_marks)
            except WatchError:
                limit = "unknown"
            raise WatchLimitError(
                f"cannot watch {show(path)}: ENOSPC: the fanotify mark limit is reached "
                f"(fs.fanotify.max_user_marks = {limit}); raise it with "
                "`sysctl fs.fanotify.max_user_marks=N`"
            ) from exc
        if exc.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.EXDEV) and not flags & (
            _FAN_MARK_FILESYSTEM
        ):
            raise WatchLimitError(
                f"cannot watch {show(path)}: {_errname(exc)}: fanotify cannot report this "
                'filesystem by directory handle; use source = "inotify" for it'
            ) from exc
        raise WatchError(f"cannot watch {show(path)}: {_errname(exc)} ({exc.strerror})") from exc

    async def read(self) -> list[RawEvent]:
        """Wait for events, then return every event of a followed directory queued now.

        Drains the descriptor (up to 64 reads, until EAGAIN). ``IN_Q_OVERFLOW`` (wd -1) is
        returned like any other event. Cancelling a waiting ``read`` loses nothing. Only one
        task may read at a time. Events of directories nobody follows are dropped (counted in
        ``events_filtered``); a drain may therefore return nothing.

        Raises:
            WatchError: The group is closed (before or while waiting), or reading failed.
            RuntimeError: Another task is already reading.
        """
        if self._reading:
            raise RuntimeError("Fanotify.read() is already awaited by another task")
        self._reading = True
        try:
            await asyncio.sleep(0)
            events, any_read = self._drain()
            while not events:
                if not any_read:
                    await self._readable()
                events, any_read = self._drain()
                if not events and any_read:
                    await asyncio.sleep(0)  # only unrelated events: let the loop run
        finally:
            self._reading = False
        return events

    def _on_close(self) -> None:
        self._filesystems.clear()
        self._wds.clear()
        self._watches.clear()

    def _drain(self) -> tuple[list[RawEvent], bool]:
        """Read and parse what is queued now; also whether anything at all was read."""
        fd = self._require_fd()
        events: list[RawEvent] = []
        any_read = False
        processes: dict[int, Process] = {}
        for _ in range(_MAX_READS):
            try:
                data = os.read(fd, self._read_size)
            except BlockingIOError:
                break
            except OSError as exc:
                raise WatchError(f"cannot read fanotify events: {exc.strerror}") from exc
            if not data:
                break
            any_read = True
            self._parse(data, events, processes)
        return events, any_read

    def _parse(self, data: bytes, out: list[RawEvent], processes: dict[int, Process]) -> None:
        """Append the events of followed directories in one ``read`` result."""
        unpack_meta = _METADATA.unpack_from
        unpack_info = _INFO.unpack_from
        wds = self._wds
        append = out.append
        attribution = self.attribution
        end = len(data)
        offset = 0
        while offset < end:
            event_len, _vers, _res, meta_len, mask, _fd, pid = unpack_meta(data, offset)
            event_end = offset + event_len
            info = offset + meta_len
            offset = event_end
            key = b""
            name = b""
            pidfd = -1
            while info < event_end:
                info_type, _pad, info_len = unpack_info(data, info)
                if info_type <= _INFO_DFID:  # FID, DFID_NAME, DFID: fsid + file_handle
                    size = _HANDLE_HEAD.unpack_from(data, info + 12)[0]
                    handle_end = info + 20 + size
                    key = data[info + 4 : handle_end]
                    if info_type == _INFO_DFID_NAME:
                        name = data[handle_end : info + info_len].split(b"\0", 1)[0]
                elif info_type == _INFO_PIDFD:
                    pidfd = _PIDFD.unpack_from(data, info + 4)[0]
                info = info + info_len if info_len else event_end
            if mask & FAN_Q_OVERFLOW:
                if pidfd >= 0:
                    os.close(pidfd)
                append(RawEvent(-1, IN_Q_OVERFLOW, 0, b""))
                continue
            wd = wds.get(key)
            if wd is None:
                if pidfd >= 0:
                    os.close(pidfd)
                self.events_filtered += 1
                continue
            if name == b".":
                name = b""
            if mask & _SELF and (name or not mask & FAN_ONDIR):
                # A file's own delete or move: its directory's FAN_DELETE / FAN_MOVED_FROM
                # names it; keep only the other bits.
                mask &= ~_SELF
                if not mask & _EVENT_BITS:
                    if pidfd >= 0:
                        os.close(pidfd)
                    continue
            if attribution:
                process = None
                if pidfd >= 0:
                    process = processes.get(pid)
                    if process is None:
                        process = describe(pid, pidfd)
                        processes[pid] = process
                    os.close(pidfd)
                elif pid > 0:
                    process = processes.get(pid) or Process.gone(pid)
                append(AttributedEvent(wd, mask, 0, name, process))
            else:
                append(RawEvent(wd, mask, 0, name))
            if mask & FAN_DELETE_SELF and not name:
                # The directory itself is gone: the kernel dropped an inode mark of it, and
                # its handle can never come back; tell the tracker as inotify does.
                self._forget(wd)
                append(RawEvent(wd, IN_IGNORED, 0, b""))

    def _forget(self, wd: int) -> None:
        watch = self._watches.pop(wd, None)
        if watch is None:
            return
        if self._wds.get(watch.key) == wd:
            del self._wds[watch.key]
        if self._fd is not None:
            self._release(self._fd, watch.device)


def _mount_root(path: bytes, device: int) -> bytes:
    """The top of the mount ``path`` is in: its highest ancestor still on ``device``."""
    path = os.path.abspath(path)
    while path != b"/":
        parent = os.path.dirname(path)
        try:
            if os.lstat(parent).st_dev != device:
                break
        except OSError:
            break
        path = parent
    return path
