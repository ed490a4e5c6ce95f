"""Union filesystems: mount, attach, unmount, and read inside the root without escaping it.

``Filesystem`` is the seed's API (Docker's first layer code) for one union mount. Whether
something is mounted is read from ``/proc/self/mountinfo``, never guessed from ``st_dev``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from watcher.core.errors import LayerError, MountError, PathError
from watcher.core.excludes import Excludes
from watcher.core.layers import Whiteouts
from watcher.core.model import Change
from watcher.core.rules import compute

__all__ = [
    "DirEntry",
    "Driver",
    "Filesystem",
    "MountInfo",
    "find_mount",
    "open_in_root",
    "read_mountinfo",
]

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH: Final = 2
_SYS_OPENAT2: Final = 437  # same number on x86_64 and the generic (arm64, riscv) table
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_IN_ROOT: Final = 0x10
_FORBIDDEN: Final = (b",", b":", b"=", b"\\")


class Driver(enum.StrEnum):
    """How a managed mount is made."""

    OVERLAY = "overlay"
    """The kernel's overlayfs."""
    AUFS = "aufs"
    """aufs, where ``/proc/filesystems`` lists it."""
    FUSE_OVERLAYFS = "fuse-overlayfs"
    """fuse-overlayfs, the rootless option, where installed."""


def _unescape(field_: bytes) -> bytes:
    """Decode mountinfo's octal escapes (``\\040`` for a space)."""
    if b"\\" not in field_:
        return field_
    out = bytearray()
    i = 0
    while i < len(field_):
        if field_[i : i + 1] == b"\\" and field_[i + 1 : i + 4].isdigit():
            out.append(int(field_[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return bytes(out)


def _options(text: bytes) -> dict[str, str | None]:
    opts: dict[str, str | None] = {}
    for item in text.split(b","):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        opts[os.fsdecode(key)] = os.fsdecode(_unescape(value)) if sep else None
    return opts


def _split_lowers(value: bytes) -> list[bytes]:
    """Split overlay's ``lowerdir`` at unescaped colons (``\\:`` is a literal colon)."""
    parts: list[bytes] = []
    current = bytearray()
    i = 0
    while i < len(value):
        ch = value[i : i + 1]
        if ch == b"\\" and i + 1 < len(value):
            current += value[i + 1 : i + 2]
            i += 2
            continue
        if ch == b":":
            parts.append(bytes(current))
            current.clear()
        else:
            current += ch
        i += 1
    parts.append(bytes(current))
    return [p for p in parts if p]


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of ``/proc/self/mountinfo``, paths as bytes with escapes decoded."""

    mount_id: int
    parent_id: int
    dev: str
    root: bytes
    mountpoint: bytes
    fstype: str
    source: str
    options: dict[str, str | None] = field(default_factory=dict)
    super_options: dict[str, str | None] = field(default_factory=dict)
    raw_super_options: bytes = b""

    def overlay_dirs(self) -> tuple[bytes, list[bytes], bytes | None]:
        """``(upper, lowers top first, work)`` of an overlay mount.

        Raises:
            MountError: not an overlay mount, or one without an upper dir (read-only).
        """
        if self.fstype != "overlay":
            raise MountError(f"{os.fsdecode(self.mountpoint)} is {self.fstype}, not overlay")
        raw = _raw_options(self.raw_super_options)
        upper = raw.get(b"upperdir")
        if not upper:
            raise MountError(f"{os.fsdecode(self.mountpoint)} has no upperdir (read-only overlay)")
        # Docker's overlay2 mounts with relative layer paths from its overlay2 directory, the
        # grandparent of ".../overlay2/<id>/merged"; absolute paths are kept as they are.
        here = os.path.dirname(os.path.dirname(self.mountpoint))
        lowers = [os.path.join(here, p) for p in _split_lowers(raw.get(b"lowerdir", b""))]
        work = raw.get(b"workdir")
        return os.path.join(here, upper), lowers, os.path.join(here, work) if work else None

    def userxattr(self) -> bool:
        """Whether the overlay keeps its metadata in ``user.overlay.*`` xattrs."""
        return "userxattr" in self.super_options


def _raw_options(text: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for item in text.split(b","):
        key, _, value = item.partition(b"=")
        out[key] = _unescape(value)
    return out


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Parse mountinfo (see proc(5)); later lines are mounted on top of earlier ones."""
    with open(path, "rb") as f:
        data = f.read()
    result = []
    for line in data.splitlines():
        left, _, right = line.partition(b" - ")
        fields = left.split(b" ")
        tail = right.split(b" ")
        if len(fields) < 6 or len(tail) < 3:
            continue
        result.append(
            MountInfo(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=fields[2].decode(),
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                fstype=tail[0].decode(),
                source=os.fsdecode(_unescape(tail[1])),
                options=_options(fields[5]),
                super_options=_options(tail[2]),
                raw_super_options=tail[2],
            )
        )
    return result


def find_mount(mountpoint: str | bytes | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at ``mountpoint`` (resolved), or None when nothing is mounted there."""
    target = os.fsencode(os.path.realpath(os.fsencode(mountpoint)))
    found = None
    for info in read_mountinfo():
        if info.mountpoint == target:
            found = info
    return found


def _check_layer(path: bytes, role: str) -> bytes:
    for sep in _FORBIDDEN:
        if sep in path:
            raise LayerError(
                f"{role} path {os.fsdecode(path)!r} contains {sep.decode()!r}, a mount-option "
                "separator; use a path (or a symlink to it) without ',', ':', '=' or '\\'"
            )
    if not os.path.isdir(path):
        raise LayerError(f"{role} {os.fsdecode(path)!r} is not a directory")
    return path


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One entry of ``Filesystem.read_dir``."""

    name: bytes
    st: os.stat_result


def open_in_root(root: bytes | str, path: bytes | str, flags: int) -> int:
    """Open ``path`` resolved inside the directory ``root`` as if it were ``/``: symlinks and
    ``..`` cannot lead out (``openat2`` with ``RESOLVE_IN_ROOT``); the caller owns the fd.

    Raises:
        PathError: ``..`` or NUL in the path, or the open failed (the error names why).
    """
    raw = os.fsencode(path)
    if b"\0" in raw or any(part == b".." for part in raw.split(b"/")):
        raise PathError(f"path {raw!r} has '..' or NUL; give a plain path inside the root")
    top = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = (ctypes.c_uint64 * 3)(
            flags | os.O_CLOEXEC, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
        )
        fd: int = _libc.syscall(_SYS_OPENAT2, top, raw.lstrip(b"/") or b".", how, 24)
        if fd < 0:
            err = ctypes.get_errno()
            raise PathError(f"{os.fsdecode(raw)}: {os.strerror(err)}")
        return fd
    finally:
        os.close(top)


class Filesystem:
    """One union filesystem: layers (top first, base last) under a writable branch.

    Args:
        layers: the read-only layers, top first, base last.
        rw: the writable branch (overlay ``upperdir``).
        mountpoint: where the union is (or will be) mounted.
        work: overlay's work dir, on the same filesystem as ``rw``; default ``<rw>.work``.
        driver: how to mount it.
        whiteouts: the whiteout format; aufs uses aufs whiteouts.
        userxattr: overlay metadata in ``user.overlay.*`` (unprivileged mounts).
    """

    def __init__(
        self,
        layers: Sequence[str | bytes | os.PathLike[str]],
        rw: str | bytes | os.PathLike[str],
        mountpoint: str | bytes | os.PathLike[str],
        *,
        work: str | bytes | os.PathLike[str] | None = None,
        driver: Driver = Driver.OVERLAY,
        userxattr: bool = False,
    ) -> None:
        self.layers = [os.fsencode(os.path.abspath(os.fsencode(layer))) for layer in layers]
        self.rw = os.fsencode(os.path.abspath(os.fsencode(rw)))
        self.mountpoint = os.fsencode(os.path.abspath(os.fsencode(mountpoint)))
        self.work = (
            os.fsencode(os.path.abspath(os.fsencode(work)))
            if work is not None
            else self.rw + b".work"
        )
        self.driver = driver
        self.userxattr = userxattr
        self.whiteouts = Whiteouts.AUFS if driver is Driver.AUFS else Whiteouts.OVERLAY

    @classmethod
    def attach(cls, mountpoint: str | bytes | os.PathLike[str]) -> Filesystem:
        """The ``Filesystem`` of an existing overlay mount (Docker's overlay2 included).

        Raises:
            MountError: nothing is mounted there, or it is not a writable overlay.
        """
        info = find_mount(mountpoint)
        if info is None:
            raise MountError(f"nothing is mounted at {os.fsdecode(os.fsencode(mountpoint))}")
        upper, lowers, work = info.overlay_dirs()
        return cls(lowers, upper, info.mountpoint, work=work, userxattr=info.userxattr())

    @property
    def xattr_prefix(self) -> bytes:
        """Where overlay keeps its metadata xattrs."""
        return b"user.overlay." if self.userxattr else b"trusted.overlay."

    def is_mounted(self) -> bool:
        """Whether a union filesystem is mounted at the mountpoint (from mountinfo)."""
        info = find_mount(self.mountpoint)
        return info is not None and info.fstype in ("overlay", "aufs", "fuse.fuse-overlayfs")

    def mount(self) -> None:
        """Mount the union.

        Raises:
            LayerError: a layer is missing, not a directory, or its path has a separator.
            MountError: the target is already a mount point, or the kernel refused.
        """
        if not self.layers:
            raise LayerError("at least one lower layer is needed")
        for layer in self.layers:
            _check_layer(layer, "layer")
        _check_layer(self.rw, "rw dir")
        os.makedirs(self.mountpoint, exist_ok=True)
        if find_mount(self.mountpoint) is not None:
            raise MountError(f"{os.fsdecode(self.mountpoint)} is already a mount point")
        if self.driver is Driver.AUFS:
            self._mount_aufs()
        elif self.driver is Driver.FUSE_OVERLAYFS:
            self._mount_fuse()
        else:
            os.makedirs(self.work, exist_ok=True)
            _check_layer(self.work, "work dir")
            self._syscall_mount(b"overlay", b"overlay", self._overlay_options())

    def _overlay_options(self) -> bytes:
        opts = [
            b"lowerdir=" + b":".join(self.layers),
            b"upperdir=" + self.rw,
            b"workdir=" + self.work,
        ]
        if self.userxattr:
            opts.append(b"userxattr")
        return b",".join(opts)

    def _syscall_mount(self, source: bytes, fstype: bytes, options: bytes) -> None:
        if _libc.mount(source, self.mountpoint, fstype, 0, options) != 0:
            err = ctypes.get_errno()
            raise MountError(
                f"mount {fstype.decode()} at {os.fsdecode(self.mountpoint)} failed: "
                f"{os.strerror(err)}"
            )

    def _mount_aufs(self) -> None:
        with open("/proc/filesystems", "rb") as f:
            if b"\taufs\n" not in f.read():
                raise MountError(
                    "aufs is not available in this kernel (/proc/filesystems does not list it); "
                    "use driver 'overlay'"
                )
        branches = b":".join(
            [b"br=" + self.rw + b"=rw"] + [layer + b"=ro+wh" for layer in self.layers]
        )
        self._syscall_mount(b"none", b"aufs", branches)

    def _mount_fuse(self) -> None:
        binary = shutil.which("fuse-overlayfs")
        if binary is None:
            raise MountError("fuse-overlayfs is not installed (Debian package fuse-overlayfs)")
        os.makedirs(self.work, exist_ok=True)
        result = subprocess.run(
            [binary, "-o", self._overlay_options(), self.mountpoint],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise MountError(
                f"fuse-overlayfs failed: {result.stderr.decode(errors='replace').strip()}"
            )

    def umount(self, *, attempts: int = 8, delay: float = 0.05, max_delay: float = 1.0) -> None:
        """Unmount, retrying while the mount is busy (doubling delays, each at most
        ``max_delay``: about 3.5 s in all by default).

        Raises:
            MountError: still busy after ``attempts`` tries, or not mounted.
        """
        for attempt in range(attempts):
            if _libc.umount2(self.mountpoint, 0) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                raise MountError(f"{os.fsdecode(self.mountpoint)} is not mounted")
            if err != errno.EBUSY:
                raise MountError(f"umount {os.fsdecode(self.mountpoint)}: {os.strerror(err)}")
            if attempt + 1 < attempts:
                time.sleep(min(max_delay, delay * (2**attempt)))
        raise MountError(
            f"{os.fsdecode(self.mountpoint)} is still busy after {attempts} attempts "
            "(a process has a file open or its working directory inside)"
        )

    def ensure_mounted(self) -> None:
        """Mount unless already mounted."""
        if not self.is_mounted():
            self.mount()

    def changes(self, exclude: Excludes | None = None) -> list[Change]:
        """The change list of the writable branch, sorted by path (``exclude``: paths left
        out, ``watcher.core.excludes``)."""
        return compute(
            self.rw,
            self.layers,
            whiteouts=self.whiteouts,
            xattr_prefix=self.xattr_prefix,
            exclude=exclude,
        )

    def export_diff(self, out: BinaryIO) -> int:
        """Write the change list as an OCI image layer tar (``.wh.`` whiteouts) to ``out``."""
        from watcher.core.export import export_diff

        return export_diff(
            self.rw, self.layers, out, whiteouts=self.whiteouts, xattr_prefix=self.xattr_prefix
        )

    def tar(self, out: BinaryIO) -> int:
        """Write the merged root filesystem as a tar to ``out`` (it must be mounted)."""
        from watcher.core.export import export_rootfs

        if not self.is_mounted():
            raise MountError(f"{os.fsdecode(self.mountpoint)} is not mounted")
        return export_rootfs(self.mountpoint, out)

    def reset(self) -> None:
        """Empty the writable branch; remount when it was mounted, so the union stays usable."""
        mounted = self.is_mounted()
        if mounted:
            self.umount()
        for directory in (self.rw, self.work):
            if os.path.isdir(directory):
                for name in os.listdir(directory):
                    path = os.path.join(directory, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
        if mounted:
            self.mount()

    def _open_in_root(self, path: bytes | str, flags: int) -> int:
        """Open ``path`` resolved inside the mount as if it were ``/`` (symlinks stay inside)."""
        return open_in_root(self.mountpoint, path, flags)

    def open_file(self, path: bytes | str) -> BinaryIO:
        """Open a regular file inside the root for reading; symlinks resolve inside the root.

        Raises:
            PathError: ``..`` in the path, missing, or not a regular file.
        """
        # O_NONBLOCK: opening a FIFO someone made in the container must not block; the type
        # check below refuses it (the flag changes nothing for a regular file's reads).
        fd = self._open_in_root(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathError(f"{os.fsdecode(os.fsencode(path))} is not a regular file")
        return os.fdopen(fd, "rb")

    def read_dir(self, path: bytes | str) -> list[DirEntry]:
        """List a directory inside the root, sorted by name, without following symlinks out."""
        fd = self._open_in_root(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
            return [DirEntry(n, os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in names]
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Filesystem(mountpoint={os.fsdecode(self.mountpoint)!r}, driver={self.driver})"
