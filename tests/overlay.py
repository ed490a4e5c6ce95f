"""Test kit for real overlayfs: build layer trees, mount and unmount, convert to aufs format.

Everything here works on real directories and real mounts (the tests run as root). Paths are
``str`` for directories the kit creates; names inside layers may be any bytes.

- ``build_lower(root, spec)`` builds the tree of ``cases.json``'s ``lower``.
- ``build_layer(root, entries)`` builds an image-like layer that may itself hold whiteouts
  (char 0:0) and opaque dirs (``trusted.overlay.opaque=y``).
- ``mount_overlay(...)`` / ``mount_base(...)`` are context managers that always unmount.
- ``to_aufs(branch)`` rewrites an overlay-format branch in place into aufs format.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pytest

OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX: Final = b"trusted.overlay."
AUFS_WH: Final = b".wh."
AUFS_OPQ: Final = b".wh..wh..opq"
AUFS_META: Final = (b".wh..wh.aufs", b".wh..wh.orph", b".wh..wh.plnk")
MOUNT_OPTIONS: Final = "redirect_dir=off,metacopy=off,index=off"


def _overlay_available() -> bool:
    """True when the kernel lists overlayfs in /proc/filesystems."""
    try:
        with open("/proc/filesystems", encoding="ascii") as fh:
            return any(line.split()[-1:] == ["overlay"] for line in fh)
    except OSError:
        return False


requires_overlay = pytest.mark.skipif(
    os.geteuid() != 0 or not _overlay_available(),
    reason="needs root and overlayfs: these tests mount real overlay filesystems",
)
"""Mark for tests that mount overlayfs: skipped (with the reason) unless root with overlay."""


# ---------------------------------------------------------------------------------------------
# Building trees


def _set_mtime(path: bytes | str, seconds: int, extra_ns: int = 0) -> None:
    """Set atime and mtime to ``seconds`` plus ``extra_ns``, without following a symlink."""
    ns = seconds * 1_000_000_000 + extra_ns
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def build_lower(root: str, spec: dict[str, Any]) -> None:
    """Build the lower tree described by a ``cases.json`` ``lower`` object under ``root``.

    Every entry is root:root and gets mtime ``spec["mtime"]`` seconds with 0 ns (directories
    last, deepest first, so creating children does not disturb them).

    Args:
        root: an existing empty directory.
        spec: ``{"mtime": int, "entries": [{"path", "type", "mode", ...}, ...]}``.
    """
    mtime = int(spec["mtime"])
    made: list[str] = []
    for entry in spec["entries"]:
        path = os.path.join(root, entry["path"])
        kind = entry["type"]
        mode = int(entry.get("mode", "0644"), 8)
        if kind == "dir":
            os.mkdir(path)
            os.chmod(path, mode)
        elif kind == "file":
            with open(path, "wb") as fh:
                fh.write(entry.get("content", "").encode())
            os.chmod(path, mode)
        elif kind == "symlink":
            os.symlink(entry["target"], path)
        elif kind == "hardlink":
            os.link(os.path.join(root, entry["target"]), path)
        elif kind == "chardev":
            major, minor = entry["rdev"]
            os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        else:
            raise ValueError(f"unknown lower entry type {kind!r}")
        os.lchown(path, 0, 0)
        made.append(path)
    for path in sorted(made, key=lambda p: p.count("/"), reverse=True):
        _set_mtime(path, mtime)
    _set_mtime(root, mtime)


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One entry of an image-like layer.

    ``kind`` is ``file``, ``dir``, ``symlink``, ``whiteout`` (char 0:0), ``opaque`` (a directory
    with ``trusted.overlay.opaque=y``), ``fifo``, ``chardev`` or ``hardlink`` (``data`` is the
    relative path of an earlier file of the same layer). ``path`` is relative bytes.
    """

    kind: str
    path: bytes
    data: bytes = b""
    mode: int = 0o644
    mtime: int = 1_700_000_000
    mtime_extra_ns: int = 0
    """Nanoseconds added to ``mtime`` (0: a whole second, as most image layers have)."""
    capability: bytes | None = None
    """Raw ``security.capability`` to set on a file."""


def whiteout(path: bytes | str) -> None:
    """Create an overlay whiteout (a char device 0:0) at ``path``."""
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))


def make_opaque(path: bytes | str) -> None:
    """Mark the directory ``path`` opaque the overlay way (``trusted.overlay.opaque=y``)."""
    os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


def placeable(chosen: Mapping[bytes, str]) -> list[tuple[bytes, str]]:
    """The (path, kind) pairs of ``chosen`` that can exist together in one layer, parents
    first: a path below anything but a directory (``dir`` or ``opaque``) is left out."""
    kept: list[tuple[bytes, str]] = []
    blocked: set[bytes] = set()
    for path in sorted(chosen, key=lambda p: p.count(b"/")):
        parts = path.split(b"/")
        if any(b"/".join(parts[:i]) in blocked for i in range(1, len(parts))):
            continue
        kind = chosen[path]
        if kind not in ("dir", "opaque"):
            blocked.add(path)
        kept.append((path, kind))
    return kept


def build_layer(root: str, entries: Sequence[LayerEntry]) -> None:
    """Build one overlay-format layer under ``root`` from ``entries`` (parents created).

    Missing parent directories are created with mode 0755. Entries are created in order;
    a later entry at the same path replaces nothing (callers keep paths unique).
    """
    broot = os.fsencode(root)
    dirs: list[tuple[bytes, int]] = []
    for entry in entries:
        path = os.path.join(broot, entry.path)
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if entry.kind in ("dir", "opaque"):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, entry.mode)
            if entry.kind == "opaque":
                make_opaque(path)
            dirs.append((path, entry.mtime))
            continue
        if entry.kind == "file":
            with open(path, "wb") as fh:
                fh.write(entry.data)
            os.chmod(path, entry.mode)
        elif entry.kind == "symlink":
            os.symlink(entry.data, path)
        elif entry.kind == "whiteout":
            whiteout(path)
        elif entry.kind == "fifo":
            os.mkfifo(path, entry.mode)
        elif entry.kind == "chardev":
            os.mknod(path, stat.S_IFCHR | entry.mode, os.makedev(1, 3))
        elif entry.kind == "hardlink":
            os.link(os.path.join(broot, entry.data), path)
            continue  # shares the target's inode: its times are the target's
        else:
            raise ValueError(f"unknown layer entry kind {entry.kind!r}")
        if entry.capability is not None:
            os.setxattr(path, b"security.capability", entry.capability, follow_symlinks=False)
        _set_mtime(path, entry.mtime, entry.mtime_extra_ns)
    for path, mtime in sorted(dirs, key=lambda d: d[0].count(b"/"), reverse=True):
        _set_mtime(path, mtime)


# ---------------------------------------------------------------------------------------------
# Mounting


def _run(argv: Sequence[str]) -> None:
    """Run a mount(8)/umount(8) command; raise RuntimeError with its stderr on failure."""
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")


def unmount(target: str) -> None:
    """Unmount ``target``, retrying while it is busy, lazily as the last resort."""
    for _ in range(50):
        try:
            os.sync()
            _run(["umount", target])
            return
        except RuntimeError as exc:
            if "busy" not in str(exc):
                raise
            time.sleep(0.05)
    _run(["umount", "-l", target])


@contextlib.contextmanager
def _mounted(options: str, target: str) -> Iterator[None]:
    """Mount an overlay with ``options`` on ``target`` for the block; always unmount."""
    _run(["mount", "-t", "overlay", "overlay", "-o", options, target])
    try:
        yield
    finally:
        unmount(target)


@dataclass(frozen=True, slots=True)
class Overlay:
    """A mounted overlay: the merged view and the directories it is made of."""

    merged: str
    upper: str
    work: str
    lowers: tuple[str, ...]
    """Top first, base last."""


@contextlib.contextmanager
def mount_overlay(
    base_dir: str,
    lowers: Sequence[str],
    *,
    options: str = MOUNT_OPTIONS,
    merged: str | None = None,
) -> Iterator[Overlay]:
    """Mount overlayfs over ``lowers`` with a fresh upper, work and merged dir in ``base_dir``.

    Args:
        base_dir: an existing directory; ``upper``, ``work`` and ``merged`` are made in it.
        lowers: lower layer directories, top first.
        options: extra mount options.
        merged: mount there instead of ``base_dir/merged`` (made when missing): a new upper
            mounted where another overlay was.

    Yields:
        The mounted Overlay; it is unmounted when the block exits, however it exits.
    """
    upper, work = (os.path.join(base_dir, n) for n in ("upper", "work"))
    merged = merged if merged is not None else os.path.join(base_dir, "merged")
    for path in (upper, work, merged):
        os.makedirs(path, exist_ok=True)
    opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},{options}"
    with _mounted(opts, merged):
        yield Overlay(merged=merged, upper=upper, work=work, lowers=tuple(lowers))


@contextlib.contextmanager
def mount_base(lowers: Sequence[str]) -> Iterator[str]:
    """Yield the base view B of ``lowers``: a read-only overlay of the stack alone.

    A single lower is its own view (overlayfs needs two lowers for a lower-only mount).
    """
    if len(lowers) == 1:
        yield lowers[0]
        return
    with (
        tempfile.TemporaryDirectory(prefix="lw-base-") as target,
        _mounted(f"lowerdir={':'.join(lowers)},{MOUNT_OPTIONS}", target),
    ):
        yield target


def run_ops(merged: str, ops: str) -> None:
    """Run the shell snippet ``ops`` with ``/bin/sh -c`` in the merged root; fail loudly."""
    proc = subprocess.run(["/bin/sh", "-c", ops], cwd=merged, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"ops {ops!r} failed: {proc.stderr.decode(errors='replace')}")


# ---------------------------------------------------------------------------------------------
# aufs format


def _strip_overlay_xattrs(path: bytes) -> bool:
    """Remove every ``trusted.overlay.*`` xattr of ``path``; True if it was opaque."""
    opaque = False
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    for name in names:
        raw = os.fsencode(name)
        if raw.startswith(OVERLAY_XATTR_PREFIX):
            if raw == OPAQUE_XATTR:
                opaque = os.getxattr(path, raw, follow_symlinks=False) == b"y"
            os.removexattr(path, raw, follow_symlinks=False)
    return opaque


def to_aufs(branch: str, *, root_metadata: bool = False) -> None:
    """Rewrite the overlay-format branch ``branch`` in place into aufs format.

    A char device 0:0 becomes an empty file ``.wh.NAME``; a directory whose
    ``trusted.overlay.opaque`` is ``y`` gets a ``.wh..wh..opq`` file; every
    ``trusted.overlay.*`` xattr is removed. Directory mtimes are restored afterwards.

    Args:
        branch: the branch directory (an upper or a lower layer), not mounted.
        root_metadata: also create aufs's own bookkeeping at the root (``.wh..wh.aufs``,
            ``.wh..wh.orph/``, ``.wh..wh.plnk/`` with a file inside), which must be skipped.
    """
    root = os.fsencode(branch)
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        before = os.lstat(dirpath)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)
                fd = os.open(os.path.join(dirpath, AUFS_WH + name), os.O_CREAT | os.O_WRONLY, 0)
                os.close(fd)
        if _strip_overlay_xattrs(dirpath):
            fd = os.open(os.path.join(dirpath, AUFS_OPQ), os.O_CREAT | os.O_WRONLY, 0)
            os.close(fd)
        os.utime(dirpath, ns=(before.st_atime_ns, before.st_mtime_ns))
    if root_metadata:
        before = os.lstat(root)
        os.close(os.open(os.path.join(root, AUFS_META[0]), os.O_CREAT | os.O_WRONLY, 0o444))
        os.mkdir(os.path.join(root, AUFS_META[1]))
        os.mkdir(os.path.join(root, AUFS_META[2]))
        with open(os.path.join(root, AUFS_META[2], b"1234.5678"), "wb") as fh:
            fh.write(b"pseudo-link")
        os.utime(root, ns=(before.st_atime_ns, before.st_mtime_ns))
