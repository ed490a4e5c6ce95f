"""The base view B: the union of the lower layers, resolved top-down.

Lower layers are immutable while mounted, so every answer is cached. Resolution follows the
whiteouts and opaque directories the lower layers themselves contain (image layers do), uses
``lstat`` only and never leaves the stack: a symlink in a lower layer is an entry, never a path
to follow.

Paths are absolute inside the root filesystem, as bytes (``b"/"``, ``b"/etc/passwd"``).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from watcher.core.errors import LayerError

__all__ = ["AUFS_META", "BaseEntry", "LowerStack", "Whiteouts", "child_path"]

AUFS_WH: Final = b".wh."
AUFS_OPQ: Final = b".wh..wh..opq"
AUFS_META: Final = frozenset({b".wh..wh.aufs", b".wh..wh.orph", b".wh..wh.plnk"})
"""aufs bookkeeping at the root of a branch: never an entry."""


class Whiteouts(enum.StrEnum):
    """How a branch records deletions and opaque directories."""

    OVERLAY = "overlay"
    """A char device 0:0 is a whiteout; ``<prefix>opaque = y`` marks an opaque dir."""
    AUFS = "aufs"
    """A file ``.wh.NAME`` whites out NAME; a ``.wh..wh..opq`` file marks an opaque dir."""


def child_path(parent: bytes, name: bytes) -> bytes:
    """Join an absolute root-relative directory path and a name."""
    return parent + name if parent == b"/" else parent + b"/" + name


def is_overlay_whiteout(st: os.stat_result) -> bool:
    """True for an overlay whiteout: a character device with device number 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def get_xattr(path: bytes, name: bytes) -> bytes | None:
    """Read an xattr without following symlinks; None when it is absent or unsupported."""
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.EPERM):
            return None
        raise


def _is_special(dirent: os.DirEntry[bytes]) -> bool:
    """Neither a regular file, a directory nor a symlink (cheap: uses the dirent type)."""
    return not (
        dirent.is_file(follow_symlinks=False)
        or dirent.is_dir(follow_symlinks=False)
        or dirent.is_symlink()
    )


@dataclass(frozen=True, slots=True)
class BaseEntry:
    """A path that exists in B.

    Attributes:
        st: the ``lstat`` of the topmost layer that has the path.
        layer: that layer's directory (bytes), for reading its xattrs.
        dir_layers: for a directory, the indices of the layers whose directories merge into it
            (top first, cut below an opaque dir or a non-directory); empty otherwise.
    """

    st: os.stat_result
    layer: bytes
    dir_layers: tuple[int, ...]

    @property
    def is_dir(self) -> bool:
        """Whether B has a directory at this path."""
        return stat.S_ISDIR(self.st.st_mode)


class LowerStack:
    """The union of lower layers (top first, base last), with every lookup cached.

    Args:
        lowers: the layer directories, top first.
        whiteouts: the whiteout format the layers use.
        xattr_prefix: ``b"trusted.overlay."`` or ``b"user.overlay."`` (``userxattr`` mounts).

    Raises:
        LayerError: a layer is missing or not a directory.
    """

    def __init__(
        self,
        lowers: Sequence[bytes | str],
        *,
        whiteouts: Whiteouts = Whiteouts.OVERLAY,
        xattr_prefix: bytes = b"trusted.overlay.",
    ) -> None:
        # Layer roots may be symlinks (Docker's overlay2/l/XXXX): resolve them once, so that
        # every lookup below stays an lstat inside the real layer.
        self.layers: tuple[bytes, ...] = tuple(
            os.path.realpath(os.fsencode(layer)).rstrip(b"/") for layer in lowers
        )
        for layer in self.layers:
            if not os.path.isdir(layer or b"/"):
                raise LayerError(f"lower layer {os.fsdecode(layer)!r} is not a directory")
        self.whiteouts = whiteouts
        self._opaque_xattr = xattr_prefix + b"opaque"
        root_layers = tuple(range(len(self.layers)))
        self._cache: dict[bytes, BaseEntry | None] = {}
        self._listings: dict[bytes, frozenset[bytes]] = {}
        if self.layers:
            root_st = os.lstat(self.layers[0] or b"/")
            self._cache[b"/"] = BaseEntry(root_st, self.layers[0], root_layers)

    def lookup(self, path: bytes) -> BaseEntry | None:
        """The entry B has at ``path``, or None.

        Only paths B has, or hides, are cached: a name that no layer's directory lists is
        answered from the directory's listing, so the cache stays bounded by the size of B
        however many names come and go in U (temporary files, say).
        """
        try:
            return self._cache[path]
        except KeyError:
            pass
        if path == b"/":
            return None  # no layers at all
        parent, _, name = path.rpartition(b"/")
        parent = parent or b"/"
        parent_entry = self.lookup(parent)
        if parent_entry is None or not parent_entry.is_dir:
            return None
        if name not in self._listed(parent, parent_entry.dir_layers):
            return None
        entry = self._resolve(path, name, parent_entry.dir_layers)
        self._cache[path] = entry
        return entry

    def _listed(self, path: bytes, layers: tuple[int, ...]) -> frozenset[bytes]:
        """Every name the layers' directories at ``path`` hold, whiteouts included (for aufs,
        the names ``.wh.NAME`` speaks for)."""
        listed = self._listings.get(path)
        if listed is None:
            names: set[bytes] = set()
            for index in layers:
                try:
                    with os.scandir(self.layers[index] + path) as it:
                        names.update(dirent.name for dirent in it)
                except (FileNotFoundError, NotADirectoryError):
                    continue
            if self.whiteouts is Whiteouts.AUFS:
                names.update(n[len(AUFS_WH) :] for n in list(names) if n.startswith(AUFS_WH))
            listed = self._listings[path] = frozenset(names)
        return listed

    def names(self, path: bytes) -> list[bytes]:
        """The names B shows in directory ``path`` (empty when B has no directory there)."""
        entry = self.lookup(path)
        if entry is None or not entry.is_dir:
            return []
        seen: set[bytes] = set()
        visible: list[bytes] = []
        aufs = self.whiteouts is Whiteouts.AUFS
        for index in entry.dir_layers:
            with os.scandir(self.layers[index] + path) as it:
                for dirent in it:
                    name = dirent.name
                    if aufs and name.startswith(AUFS_WH):
                        if not name.startswith(AUFS_WH + AUFS_WH):
                            seen.add(name[len(AUFS_WH) :])
                        continue
                    if name in seen:
                        continue
                    seen.add(name)
                    if (
                        not aufs
                        and _is_special(dirent)
                        and is_overlay_whiteout(dirent.stat(follow_symlinks=False))
                    ):
                        continue
                    visible.append(name)
        return visible

    def _whited_out(self, layer: bytes, path: bytes, parent: bytes, name: bytes) -> bool:
        if self.whiteouts is Whiteouts.AUFS:
            return os.path.lexists(layer + child_path(parent, AUFS_WH + name))
        return False  # overlay whiteouts are found by the lstat of the path itself

    def _opaque(self, dir_path: bytes) -> bool:
        if self.whiteouts is Whiteouts.AUFS:
            return os.path.lexists(dir_path + b"/" + AUFS_OPQ)
        return get_xattr(dir_path, self._opaque_xattr) == b"y"

    def _resolve(self, path: bytes, name: bytes, layers: tuple[int, ...]) -> BaseEntry | None:
        if self.whiteouts is Whiteouts.AUFS and name.startswith(AUFS_WH):
            return None
        parent = path[: len(path) - len(name) - 1] or b"/"
        found: BaseEntry | None = None
        merged: list[int] = []
        for index in layers:
            layer = self.layers[index]
            if self._whited_out(layer, path, parent, name):
                break
            try:
                st = os.lstat(layer + path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if self.whiteouts is Whiteouts.OVERLAY and is_overlay_whiteout(st):
                break
            if not stat.S_ISDIR(st.st_mode):
                if found is None:
                    found = BaseEntry(st, layer, ())
                break
            if found is None:
                found = BaseEntry(st, layer, ())
            merged.append(index)
            if self._opaque(layer + path):
                break
        if found is not None and merged:
            return BaseEntry(found.st, found.layer, tuple(merged))
        return found
