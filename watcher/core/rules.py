"""The change list of a writable branch: what ``docker diff`` prints, computed from U and B.

U is the upper (writable) directory, B the union of the lower layers (``watcher.core.layers``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from watcher.core.errors import LayerError
from watcher.core.excludes import Excludes
from watcher.core.layers import (
    AUFS_OPQ,
    AUFS_WH,
    BaseEntry,
    LowerStack,
    Whiteouts,
    child_path,
    get_xattr,
    is_overlay_whiteout,
)
from watcher.core.model import Change, Kind
from watcher.core.native import NativeScanner, scanner_type

__all__ = ["Child", "DirState", "Rules", "compute"]

_CAPABILITY: Final = b"security.capability"
_NS_PER_S: Final = 1_000_000_000
_KINDS: Final = (Kind.ADDED, Kind.CHANGED, Kind.DELETED)
_KIND_OF: Final[dict[str | None, Kind | None]] = {None: None, **{k.value: k for k in _KINDS}}


@dataclass(frozen=True, slots=True)
class DirState:
    """What the merged view of one directory is made of.

    Attributes:
        base: B's entry when B has a directory at the same path; None when nothing of B lies
            below (the directory is new, or replaces a non-directory).
        origin: the B directory whose entries merge into this one: the same path normally, a
            redirect target for a renamed directory, None when opaque (or under an opaque dir).
        in_upper: whether U has the directory (False: the whole directory comes from ``origin``).
    """

    base: BaseEntry | None
    origin: bytes | None
    in_upper: bool


class Child(NamedTuple):
    """One name of a scanned directory, classified by its own rights (rules 1 to 7, 9).

    Attributes:
        path: the child's path.
        kind: its own kind, before rule 8 (ancestors) is applied.
        dir: how to scan it when the merged view has a directory there; None otherwise.
        st: its ``lstat`` in the merged view; None when it is not there, and also for
            added entries that a scan classified without one (``lstat`` it when needed).
        ino: the inode number of U's entry (0 when U has none), for telling a directory
            that was replaced from the one that was there.
    """

    path: bytes
    kind: Kind | None
    dir: DirState | None
    st: os.stat_result | None
    ino: int = 0


def _entry_stat(dirent: os.DirEntry[bytes]) -> os.stat_result | None:
    """A listed entry's ``lstat``; None when it was removed since the listing."""
    try:
        return dirent.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def _mtime_equal(a: int, b: int) -> bool:
    if a == b:
        return True
    return a // _NS_PER_S == b // _NS_PER_S and (a % _NS_PER_S == 0 or b % _NS_PER_S == 0)


class Rules:
    """The change-list rules 1 to 12 (``docs/rules.md``) for one upper dir over one lower stack.

    The rules work one directory at a time (``scan``), so the full computation and the live
    tracker share every decision: the tracker rescans only the directories that hints name.

    ``scan`` (and so ``walk``) runs in C when ``watcher.core._scan`` is built
    (``watcher.core.native``); the Python below is the reference it is tested against.

    Args:
        upper: the upper (writable) directory.
        lower: the base view B.
        xattr_prefix: ``b"trusted.overlay."``, or ``b"user.overlay."`` for ``userxattr`` mounts.
        exclude: paths left out: a scan never names them (nor descends into them), ``child``
            takes them as absent, so they count for rule 8 neither (``docs/rules.md``).
        native: True for the C scan, False for the Python one; None (default): C when built.

    Raises:
        RuntimeError: ``native=True`` but the C scan is not built.
    """

    def __init__(
        self,
        upper: bytes | str,
        lower: LowerStack,
        *,
        xattr_prefix: bytes = b"trusted.overlay.",
        exclude: Excludes | None = None,
        native: bool | None = None,
    ) -> None:
        self.exclude = exclude or None  # no pattern: no filter at all
        self.upper = os.path.realpath(os.fsencode(upper)).rstrip(b"/")
        self.lower = lower
        self.aufs = lower.whiteouts is Whiteouts.AUFS
        self._opaque_xattr = xattr_prefix + b"opaque"
        self._redirect_xattr = xattr_prefix + b"redirect"
        self.native: NativeScanner | None = None
        """The C scanner doing ``scan``; None: the Python one does."""
        if native is not False:
            scanner = scanner_type()
            if scanner is not None:
                self.native = scanner(self.upper, lower.layers, self.aufs, xattr_prefix)
            elif native:
                raise RuntimeError("the C scan (watcher.core._scan) is not built")

    def root(self) -> DirState:
        """The state of ``/``, where every scan starts."""
        base = self.lower.lookup(b"/")
        return DirState(base, b"/" if base is not None else None, True)

    def scan(self, path: bytes, state: DirState, *, stats: bool = True) -> list[Child]:
        """Classify every name of the merged directory ``path`` and every name it lost
        (excluded names left out).

        ``stats=False``: the caller has no use for the children's ``lstat``; the C scan then
        leaves ``Child.st`` None (making them is most of its cost), the Python one fills it in
        anyway (it has them).

        A name that U lists but that is gone by the time it is read (a file removed while
        the directory is listed) is taken as absent: the directory is listed as it is, and the
        removal is a hint of its own for whoever watches it.

        Raises:
            FileNotFoundError, NotADirectoryError: U no longer has the directory.
        """
        children = self._scan(path, state, stats)
        if self.exclude is not None:
            excluded = self.exclude.matches  # the directory itself is not excluded
            children = [child for child in children if not excluded(child.path)]
        return children

    def _scan(self, path: bytes, state: DirState, stats: bool) -> list[Child]:
        if self.native is not None:
            return self._scan_native(path, state, stats)
        if state.base is None and state.origin is None:
            return self._scan_added(path)
        present: dict[bytes, tuple[os.stat_result, int]] = {}
        whiteouts: set[bytes] = set()
        if state.in_upper:
            with os.scandir(self.upper + path) as it:
                for dirent in it:
                    name = dirent.name
                    if self.aufs and name.startswith(AUFS_WH):
                        if not name.startswith(AUFS_WH + AUFS_WH):
                            whiteouts.add(name[len(AUFS_WH) :])
                        continue
                    st = _entry_stat(dirent)
                    if st is None:
                        continue  # removed since the listing
                    if not self.aufs and is_overlay_whiteout(st):
                        whiteouts.add(name)
                    else:
                        present[name] = (st, dirent.inode())
        names = present.keys() | whiteouts
        if state.origin != path:
            if state.origin is not None:
                names |= set(self.lower.names(state.origin))
            if state.base is not None:
                names |= set(self.lower.names(path))
        children = []
        for name in names:
            entry = present.get(name)
            if entry is None:
                children.append(self._classify(path, state, name, None, 0, name in whiteouts))
            else:
                children.append(self._classify(path, state, name, *entry, False))
        return children

    def _scan_native(self, path: bytes, state: DirState, stats: bool) -> list[Child]:
        """``scan`` by the C code: the same children (in another order). A directory child's
        base is looked up here, so it is the very ``BaseEntry`` the Python scan would give."""
        assert self.native is not None
        base = state.base
        dir_layers = base.dir_layers if base is not None else None
        raw = self.native.scan(path, dir_layers, state.origin, state.in_upper, stats)
        lookup = self.lower.lookup
        children = []
        for child_path_, kind, raw_dir, st, ino in raw:
            dir_state = None
            if raw_dir is not None:
                has_base, origin, in_upper = raw_dir
                dir_state = DirState(lookup(child_path_) if has_base else None, origin, in_upper)
            children.append(Child(child_path_, _KIND_OF[kind], dir_state, st, ino))
        return children

    def _scan_added(self, path: bytes) -> list[Child]:
        """A directory with nothing of B below it: every entry is ``A``, none needs a stat
        (but a possible overlay whiteout, a char device, which is skipped)."""
        children = []
        with os.scandir(self.upper + path) as it:
            for dirent in it:
                name = dirent.name
                if self.aufs and name.startswith(AUFS_WH):
                    continue
                child = child_path(path, name)
                state = None
                if dirent.is_dir(follow_symlinks=False):
                    state = DirState(None, self._redirect(self.upper + child, None), True)
                elif not self.aufs and not dirent.is_file(follow_symlinks=False):
                    st = _entry_stat(dirent)
                    if st is None or is_overlay_whiteout(st):
                        continue  # removed since the listing, or a whiteout
                children.append(Child(child, Kind.ADDED, state, None, dirent.inode()))
        return children

    def child(self, parent: bytes, state: DirState, name: bytes) -> Child:
        """Classify one name of directory ``parent`` (a scanned one, so not excluded) from a
        fresh look at U (for hints); an excluded name is absent."""
        if self.aufs and name.startswith(AUFS_WH):
            raise ValueError(f"{name!r} is aufs metadata, not an entry")
        if self.exclude is not None and self.exclude.matches(child_path(parent, name)):
            return Child(child_path(parent, name), None, None, None)
        upath = self.upper + child_path(parent, name)
        st: os.stat_result | None = None
        whiteout = False
        if state.in_upper:
            try:
                st = os.lstat(upath)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is not None and not self.aufs and is_overlay_whiteout(st):
                st, whiteout = None, True
            elif st is None and self.aufs:
                whiteout = os.path.lexists(self.upper + child_path(parent, AUFS_WH + name))
        return self._classify(parent, state, name, st, st.st_ino if st else 0, whiteout)

    def entry_name(self, name: bytes) -> bytes | None:
        """The entry a name in U speaks for: itself, the whited-out name (aufs ``.wh.NAME``),
        or None for format metadata (aufs ``.wh..wh.*``)."""
        if not self.aufs or not name.startswith(AUFS_WH):
            return name
        if name.startswith(AUFS_WH + AUFS_WH):
            return None
        return name[len(AUFS_WH) :]

    def _classify(
        self,
        parent: bytes,
        state: DirState,
        name: bytes,
        ust: os.stat_result | None,
        ino: int,
        whiteout: bool,
    ) -> Child:
        path = child_path(parent, name)
        base = self.lower.lookup(path) if state.base is not None else None
        merged: os.stat_result | None = ust
        source = self.upper + path  # where the merged entry's xattrs live
        if ust is None and not whiteout and state.origin is not None:
            if state.origin == parent:  # untouched lower entry: same as B
                return Child(path, None, None, base.st if base is not None else None)
            origin_entry = self.lower.lookup(child_path(state.origin, name))
            if origin_entry is not None:
                merged = origin_entry.st
                source = origin_entry.layer + child_path(state.origin, name)
        if merged is None:
            return Child(path, Kind.DELETED if base is not None else None, None, None)
        is_dir = stat.S_ISDIR(merged.st_mode)
        kind: Kind | None
        if base is None:
            kind = Kind.ADDED
        elif is_dir != base.is_dir or self._differs(merged, source, base, path):
            kind = Kind.CHANGED
        else:
            kind = None
        if not is_dir:
            return Child(path, kind, None, merged, ino)
        dir_base = base if base is not None and base.is_dir else None
        origin: bytes | None
        if ust is None:
            origin = child_path(state.origin, name) if state.origin is not None else None
            return Child(path, kind, DirState(dir_base, origin, False), merged, ino)
        origin = None
        if dir_base is not None and self._opaque(source):
            pass  # opaque: nothing of B shows through (a flag on a new dir is ignored)
        elif (redirect := self._redirect(source, state.origin)) is not None:
            target = self.lower.lookup(redirect)
            origin = redirect if target is not None and target.is_dir else None
        elif dir_base is not None and state.origin == parent:
            origin = path  # the common case: B's own directory merges in
        elif state.origin is not None:
            candidate = child_path(state.origin, name)
            target = self.lower.lookup(candidate)
            origin = candidate if target is not None and target.is_dir else None
        return Child(path, kind, DirState(dir_base, origin, True), merged, ino)

    def _redirect(self, upath: bytes, parent_origin: bytes | None) -> bytes | None:
        """Where a redirected U directory's lower content comes from (None: no redirect)."""
        if self.aufs:
            return None
        redirect = get_xattr(upath, self._redirect_xattr)
        if redirect is None or redirect.startswith(b"/"):
            return redirect
        return child_path(parent_origin, redirect) if parent_origin is not None else None

    def _opaque(self, upath: bytes) -> bool:
        if self.aufs:
            return os.path.lexists(upath + b"/" + AUFS_OPQ)
        return get_xattr(upath, self._opaque_xattr) == b"y"

    def _differs(self, st: os.stat_result, source: bytes, base: BaseEntry, path: bytes) -> bool:
        """Rule 2: mode, owner, rdev, capability; size and mtime for non-directories."""
        b = base.st
        if (
            st.st_mode != b.st_mode
            or st.st_uid != b.st_uid
            or st.st_gid != b.st_gid
            or st.st_rdev != b.st_rdev
        ):
            return True
        if not stat.S_ISDIR(st.st_mode) and (
            st.st_size != b.st_size or not _mtime_equal(st.st_mtime_ns, b.st_mtime_ns)
        ):
            return True
        return get_xattr(source, _CAPABILITY) != get_xattr(base.layer + path, _CAPABILITY)

    def walk(
        self,
        path: bytes,
        state: DirState,
        out: dict[bytes, Kind],
        on_dir: Callable[[bytes, DirState], None] | None = None,
    ) -> bool:
        """Add the change list below ``path`` to ``out``; True if anything below changed.

        ``on_dir`` is called for each directory before it is listed (the tracker adds its
        inotify watch there: watch first, then scan).
        """
        if on_dir is not None:
            on_dir(path, state)
        changed = False
        for child in self.scan(path, state):
            kind = child.kind
            if child.dir is not None:
                inner = self.walk(child.path, child.dir, out, on_dir)
                if inner and kind is None:
                    kind = Kind.CHANGED
            if kind is not None:
                out[child.path] = kind
                changed = True
        return changed


def compute(
    upper: bytes | str,
    lowers: Sequence[bytes | str],
    *,
    whiteouts: str = "overlay",
    xattr_prefix: bytes = b"trusted.overlay.",
    exclude: Excludes | None = None,
    native: bool | None = None,
) -> list[Change]:
    """The change list of ``upper`` over ``lowers`` (top first), sorted by path bytes;
    ``exclude`` leaves paths out (and out of rule 8).

    ``native``: True for the C walk, False for the Python one, None (default): C when built.

    Raises:
        LayerError: a layer is missing or not a directory.
        ValueError: an unknown whiteout format.
        RuntimeError: ``native=True`` but the C scan is not built.
    """
    if not os.path.isdir(upper):
        raise LayerError(f"upper {os.fsdecode(upper)!r} is not a directory")
    lower = LowerStack(lowers, whiteouts=Whiteouts(whiteouts), xattr_prefix=xattr_prefix)
    rules = Rules(upper, lower, xattr_prefix=xattr_prefix, native=native, exclude=exclude)
    if rules.native is not None and rules.exclude is None:  # the whole walk in C
        changes: list[Change] = rules.native.changes(Change, _KINDS)  # type: ignore[assignment]
        return changes
    out: dict[bytes, Kind] = {}
    rules.walk(b"/", rules.root(), out)
    return [Change(path, out[path]) for path in sorted(out)]
