"""Tar exports: the merged root filesystem, and the change list as an OCI image layer.

Both exports stream to a binary file object with the standard library's ``tarfile`` (PAX
format, names as raw bytes through ``surrogateescape``) and never follow a symlink: every
path is opened one component at a time relative to its root with ``O_NOFOLLOW``, so a
symlink in the tree (even one swapped in while the export runs) cannot lead a read out of
the root. Symlinks are stored as symlinks.

What a layer tar holds (``export_diff``), following the OCI image-spec layer format:

- ``A`` / ``C`` entries: the entry as the merged view shows it (read from the upper
  directory when it is there, else from the lower stack; metacopy uppers take their data
  from the lower origin). A changed directory is written as its header only.
- ``D`` entries: an empty regular file ``.wh.NAME`` next to the deleted name.
- An opaque directory (overlay ``opaque`` xattr, or aufs ``.wh..wh..opq``) that is not
  new: its header, an empty ``.wh..wh..opq`` inside it, and then its whole upper subtree,
  since once the opaque marker hides the lower content, everything the merged view shows
  below it must come from the layer (some of it is unchanged and not in the change list).
- Hard links between exported files are kept (``LNKTYPE`` to the first name written);
  sockets are skipped; ``security.capability`` is kept as ``SCHILY.xattr.security.capability``;
  modification times keep their nanoseconds in the PAX ``mtime`` record.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import structlog

from watcher.core.errors import LayerError, PathError
from watcher.core.layers import (
    AUFS_OPQ,
    AUFS_WH,
    LowerStack,
    Whiteouts,
    child_path,
    is_overlay_whiteout,
)
from watcher.core.model import Kind
from watcher.core.rules import compute

__all__ = ["export_diff", "export_rootfs"]

logger = structlog.get_logger("layerwatch.export")

_CAPABILITY = b"security.capability"
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def export_diff(
    upper: bytes | str,
    lowers: Sequence[bytes | str],
    out: BinaryIO,
    *,
    whiteouts: str = "overlay",
    xattr_prefix: bytes = b"trusted.overlay.",
) -> int:
    """Write the change list of ``upper`` over ``lowers`` to ``out`` as an OCI layer tar.

    Args:
        upper: The upper (writable) directory.
        lowers: The lower layers, top first.
        out: A binary file object opened for writing; it is written sequentially (a pipe or
            a socket will do) and left open.
        whiteouts: ``"overlay"`` (char device 0:0, ``opaque`` xattr) or ``"aufs"``
            (``.wh.`` files) — how ``upper`` marks deletions.
        xattr_prefix: The overlay xattr namespace (``b"user.overlay."`` with ``userxattr``).

    Returns:
        The number of tar entries written (whiteout and opaque markers included).

    Raises:
        LayerError: A layer directory cannot be opened.
        PathError: A file or symlink listed cannot be read.
    """
    changes = compute(upper, lowers, whiteouts=whiteouts, xattr_prefix=xattr_prefix)
    stack_view = LowerStack(lowers, whiteouts=Whiteouts(whiteouts), xattr_prefix=xattr_prefix)
    with contextlib.ExitStack() as stack:
        roots = {
            path: stack.enter_context(contextlib.closing(_Root(path)))
            for path in (os.fsencode(upper), *stack_view.layers)
        }
        writer = stack.enter_context(contextlib.closing(_Writer(out)))
        view = _LayerView(roots[os.fsencode(upper)], stack_view, roots, xattr_prefix=xattr_prefix)
        done_below: bytes | None = None  # an opaque directory whose subtree is written
        for change in changes:
            if done_below is not None and change.path.startswith(done_below):
                continue
            done_below = None
            if change.kind is Kind.DELETED:
                parent, _, name = change.path.rpartition(b"/")
                writer.marker(child_path(parent or b"/", AUFS_WH + name))
                continue
            found = view.source(change.path)
            if found is None:
                logger.warning("export_entry_vanished", path=change.path)
                continue
            entry, in_upper = found
            with contextlib.closing(entry):
                writer.entry(change.path, entry)
                opaque = (
                    change.kind is Kind.CHANGED
                    and in_upper
                    and stat.S_ISDIR(entry.st.st_mode)
                    and view.is_opaque(change.path, entry)
                )
            if opaque:
                writer.marker(child_path(change.path, AUFS_OPQ))
                for path, sub in view.upper_subtree(change.path):
                    writer.entry(path, sub)
                done_below = change.path + b"/"
        return writer.count


def export_rootfs(merged_root: bytes | str, out: BinaryIO) -> int:
    """Write the tree at ``merged_root`` to ``out`` as a tar (names relative to the root).

    Hard links inside the tree are kept, symlinks are stored as symlinks and never followed,
    sockets are skipped. The root directory itself is the first entry (``.``).

    Args:
        merged_root: The root of the tree, normally an overlay's merged mountpoint.
        out: A binary file object opened for writing; left open.

    Returns:
        The number of tar entries written.

    Raises:
        LayerError: ``merged_root`` is not a directory that can be opened.
    """
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(contextlib.closing(_Root(os.fsencode(merged_root))))
        writer = stack.enter_context(contextlib.closing(_Writer(out)))
        top = root.lookup(b"/")
        if top is None:
            raise LayerError(f"cannot read {merged_root!r}")
        with contextlib.closing(top):
            writer.entry(b"/", top)
        for path, entry in _walk(root, b"/", skip_whiteouts=None):
            writer.entry(path, entry)
        return writer.count


class _Root:
    """A directory tree opened by descriptor; paths below it resolve without symlinks."""

    def __init__(self, path: bytes) -> None:
        try:  # the root itself may be a symlink (Docker's overlay2/l/ links); nothing below
            self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LayerError(f"cannot open layer directory {path!r}: {exc.strerror}") from exc
        self._chain: list[tuple[bytes, int]] = []  # open ancestors of the last lookup

    def close(self) -> None:
        """Close every descriptor this root holds."""
        for _, fd in self._chain:
            os.close(fd)
        self._chain.clear()
        os.close(self.fd)

    def lookup(self, path: bytes) -> _Entry | None:
        """The entry at ``path`` (absolute inside the root), or None when there is none.

        A missing component, or one that is not a directory (a symlink is never followed),
        gives None. Lookups in sorted order reuse the ancestors opened by the previous one.
        """
        parent, _, name = path.rpartition(b"/")
        while self._chain and not (parent + b"/").startswith(self._chain[-1][0] + b"/"):
            os.close(self._chain.pop()[1])
        fd, done = self._chain[-1][::-1] if self._chain else (self.fd, b"")
        for part in parent[len(done) :].split(b"/"):
            if not part:
                continue
            try:
                fd = os.open(part, _PATH_FLAGS, dir_fd=fd)
            except OSError:
                return None
            done += b"/" + part
            self._chain.append((done, fd))
        if not name:
            name = b"."
        try:
            st = os.lstat(name, dir_fd=fd)
        except OSError:
            return None
        return _Entry(name, st, os.dup(fd), owned=True)


class _Entry:
    """One entry of a tree: its name, ``lstat`` and a descriptor of its parent directory.

    ``data`` is where a regular file's bytes live when not here (a metacopy upper).
    """

    __slots__ = ("data", "dir_fd", "name", "owned", "st")

    def __init__(self, name: bytes, st: os.stat_result, dir_fd: int, *, owned: bool) -> None:
        self.name = name
        self.st = st
        self.dir_fd = dir_fd
        self.owned = owned
        self.data: _Entry | None = None

    def close(self) -> None:
        """Release the parent descriptor when this entry owns it."""
        if self.owned:
            os.close(self.dir_fd)
            self.owned = False
        if self.data is not None:
            self.data.close()

    def getxattr(self, attr: bytes) -> bytes | None:
        """The raw value of ``attr`` on this entry (never through a symlink), or None."""
        path = b"/proc/self/fd/%d/%s" % (self.dir_fd, self.name)
        try:
            return os.getxattr(path, attr, follow_symlinks=False)
        except OSError:
            return None

    def readlink(self) -> bytes:
        """The target of this symlink."""
        return os.readlink(self.name, dir_fd=self.dir_fd)

    def open(self) -> int:
        """Open this regular file for reading (never through a symlink)."""
        return os.open(self.name, _READ_FLAGS, dir_fd=self.dir_fd)


def _walk(
    root: _Root, top: bytes, *, skip_whiteouts: Whiteouts | None
) -> Iterator[tuple[bytes, _Entry]]:
    """Yield every entry below ``top`` (not ``top`` itself), depth first, names sorted.

    An entry is valid until the next one is yielded. ``skip_whiteouts`` leaves out an upper
    directory's whiteouts (``"overlay"`` or ``"aufs"``); None yields everything.
    """
    top_entry = root.lookup(top)
    if top_entry is None:
        return
    try:
        fd = os.open(top_entry.name, _READ_FLAGS | os.O_DIRECTORY, dir_fd=top_entry.dir_fd)
    except OSError:
        return
    finally:
        top_entry.close()
    yield from _walk_fd(fd, top, skip_whiteouts)


def _walk_fd(
    fd: int, top: bytes, skip_whiteouts: Whiteouts | None
) -> Iterator[tuple[bytes, _Entry]]:
    try:
        for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
            if skip_whiteouts is Whiteouts.AUFS and name.startswith(AUFS_WH):
                continue
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if skip_whiteouts is Whiteouts.OVERLAY and is_overlay_whiteout(st):
                continue
            path = child_path(top, name)
            yield path, _Entry(name, st, fd, owned=False)
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = os.open(name, _READ_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                except OSError:
                    continue
                yield from _walk_fd(sub, path, skip_whiteouts)
    finally:
        os.close(fd)


class _LayerView:
    """Finds where the merged view's entries live: the upper directory or a lower layer."""

    def __init__(
        self, upper: _Root, lowers: LowerStack, roots: dict[bytes, _Root], *, xattr_prefix: bytes
    ) -> None:
        self.upper = upper
        self._lowers = lowers
        self._roots = roots
        self._opaque = xattr_prefix + b"opaque"
        self._redirect = xattr_prefix + b"redirect"
        self._metacopy = xattr_prefix + b"metacopy"

    def source(self, path: bytes) -> tuple[_Entry, bool] | None:
        """The entry the merged view shows at ``path`` and whether it is in the upper.

        A metacopy upper file carries its lower origin as ``data``.
        """
        entry = self.upper.lookup(path)
        if entry is None:
            lower = self._lower(self._origin(path))
            return None if lower is None else (lower, False)
        if stat.S_ISREG(entry.st.st_mode) and entry.getxattr(self._metacopy) is not None:
            entry.data = self._lower(self._origin(path))
        return entry, True

    def is_opaque(self, path: bytes, entry: _Entry) -> bool:
        """Whether the upper directory ``entry`` at ``path`` hides the lower content below."""
        if self._lowers.whiteouts is Whiteouts.AUFS:
            marker = self.upper.lookup(child_path(path, AUFS_OPQ))
            if marker is not None:
                marker.close()
            return marker is not None
        return entry.getxattr(self._opaque) == b"y"

    def upper_subtree(self, top: bytes) -> Iterator[tuple[bytes, _Entry]]:
        """Every entry of the upper directory below ``top``, whiteouts left out."""
        yield from _walk(self.upper, top, skip_whiteouts=self._lowers.whiteouts)

    def _origin(self, path: bytes) -> bytes:
        """The path in the lower stack whose content the merged view shows at ``path``.

        A metacopy file or a redirected directory (``redirect_dir=on``) names its origin in
        the ``redirect`` xattr: absolute in the layer, or relative to the parent directory.
        """
        head, tail = path, b""
        while head:
            found = self.upper.lookup(head)
            target = None
            if found is not None:
                target = found.getxattr(self._redirect)
                found.close()
            if target:
                if not target.startswith(b"/"):
                    target = head.rpartition(b"/")[0] + b"/" + target
                return target + tail
            head, _, name = head.rpartition(b"/")
            tail = b"/" + name + tail
        return path

    def _lower(self, path: bytes) -> _Entry | None:
        found = self._lowers.lookup(path)
        return None if found is None else self._roots[found.layer].lookup(path)


class _Writer:
    """Turns entries into tar members: headers, data, hard links, capabilities."""

    def __init__(self, out: BinaryIO) -> None:
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close(), owned by the caller's stack
            fileobj=out,
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        self._links: dict[tuple[int, int], str] = {}
        self.count = 0

    def close(self) -> None:
        """Write the end-of-archive blocks (the file object stays open)."""
        self._tar.close()

    def marker(self, path: bytes) -> None:
        """Write an empty regular file: a whiteout or an opaque marker."""
        info = tarfile.TarInfo(_arcname(path))
        info.mode = 0
        self._tar.addfile(info)
        self.count += 1

    def entry(self, path: bytes, entry: _Entry) -> None:
        """Write ``entry`` under ``path`` (absolute inside the root); sockets are skipped."""
        st = entry.st
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            logger.info("export_socket_skipped", path=path)
            return
        info = tarfile.TarInfo(_arcname(path))
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
        info.mtime = seconds
        pax: dict[str, str] = {}
        if nanos:
            pax["mtime"] = f"{seconds}.{nanos:09d}"
        cap = entry.getxattr(_CAPABILITY)
        if cap is not None:
            pax["SCHILY.xattr.security.capability"] = cap.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in self._links:
            info.type = tarfile.LNKTYPE
            info.linkname = self._links[key]
            self._tar.addfile(info)
            self.count += 1
            return
        if stat.S_ISREG(mode):
            info.size = st.st_size
            self._add_file(info, entry.data or entry)
        else:
            self._fill_special(info, entry)
            self._tar.addfile(info)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            self._links[key] = info.name
        self.count += 1

    def _fill_special(self, info: tarfile.TarInfo, entry: _Entry) -> None:
        mode = entry.st.st_mode
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            try:
                info.linkname = os.fsdecode(entry.readlink())
            except OSError as exc:
                raise PathError(f"cannot read symlink {info.name!r}: {exc.strerror}") from exc
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor = os.major(entry.st.st_rdev)
            info.devminor = os.minor(entry.st.st_rdev)

    def _add_file(self, info: tarfile.TarInfo, source: _Entry) -> None:
        """Add a regular file with exactly ``info.size`` bytes (zero-padded if it shrank)."""
        try:
            fd = source.open()
        except OSError as exc:
            raise PathError(f"cannot read {info.name!r}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            self._tar.addfile(info, _Exact(f, info.size))


class _Exact:
    """A reader that yields exactly ``size`` bytes: a live file may shrink while it is read."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes, padding with zeros past the file's end."""
        want = self._left if n < 0 else min(n, self._left)
        data = self._f.read(want)
        if len(data) < want:
            logger.warning("export_file_shrank", name=self._f.name)
            data += b"\0" * (want - len(data))
        self._left -= len(data)
        return data


def _arcname(path: bytes) -> str:
    """The tar member name of ``path`` (absolute inside the root): relative, no leading /."""
    name = path.lstrip(b"/")
    return os.fsdecode(name) if name else "."
