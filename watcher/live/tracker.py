"""One mount's live change list, kept in step by reconciling the paths that hints name.

inotify events are hints: each marks a path dirty, and reconciling a dirty path re-reads U
(and B, cached) through ``watcher.core.rules.Rules``; only real transitions come out. The tracker
keeps each entry's own kind (rules 1 to 7) apart from the list (rule 8 added), and counts per
directory the children in the list, so a change updates its ancestors in O(depth).

The branch itself can be replaced under the tracker (``rm -rf U && mkdir U``, ``mv U U.old``,
an attached mountpoint mounted again over a new upper). ``check_branch`` asks the mount's
resolver where U is now and compares that directory's device and inode with the watched root:
a new branch is followed from scratch (a ``resync`` of reason ``branch_replaced``, then a
snapshot); no branch at all degrades the mount (``branch_missing``) until there is one again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

from watcher.core.errors import LayerwatchError, MountError, WatchError, WatchLimitError
from watcher.core.excludes import Excludes
from watcher.core.layers import LowerStack, child_path
from watcher.core.model import (
    RESYNC,
    SNAPSHOT_BEGIN,
    SNAPSHOT_END,
    Change,
    Control,
    Item,
    Kind,
    Op,
    SnapshotEntries,
    Transition,
)
from watcher.core.mounts import Filesystem
from watcher.core.rules import DirState, Rules

__all__ = ["Branch", "Degraded", "MountpointBranch", "Resolver", "Tracker", "WatchOps"]

logger = structlog.get_logger("layerwatch.tracker")


@dataclass(frozen=True, slots=True)
class Branch:
    """Where a mount's writable branch is now: what a ``Resolver`` answers.

    Attributes:
        upper: U's path.
        lower: B. A resolver hands back the same object for as long as the layers are the
            same ones (B's cache is kept); a new object means a new lower stack.
        xattr_prefix: overlay's metadata xattr prefix.
    """

    upper: bytes
    lower: LowerStack
    xattr_prefix: bytes = b"trusted.overlay."

    @classmethod
    def of(cls, fs: Filesystem) -> Branch:
        """The writable branch of ``fs`` over its layers (with their whiteout format)."""
        lower = LowerStack(fs.layers, whiteouts=fs.whiteouts, xattr_prefix=fs.xattr_prefix)
        return cls(fs.rw, lower, fs.xattr_prefix)


Resolver = Callable[[], Branch]
"""Where a mount's branch is now. Raises ``LayerwatchError`` or ``OSError``, saying why, when
there is none (nothing mounted at an attached mountpoint, say). The default resolver answers
the tracker's own upper path and lower stack: a detached branch stays where it was."""


class MountpointBranch:
    """Where an attached mount's branch is now: the upper of the overlay mounted at its
    mountpoint (a ``Resolver``): the service's attached mounts and ``awatch(mountpoint)``
    follow an overlay mounted again over a new upper this way.

    Every mount has a device of its own, so mountinfo is read again only when the
    mountpoint's device changes: the tracker's periodic check costs one ``stat``.

    Args:
        fs: the mount as it was attached.
        lower: the lower stack made for it (kept while the layers stay the same).
        moved: told of each new overlay at the mountpoint (None: nobody).
    """

    def __init__(
        self,
        fs: Filesystem,
        lower: LowerStack,
        moved: Callable[[Filesystem], None] | None = None,
    ) -> None:
        self.fs, self._lower, self._moved = fs, lower, moved
        self._dev: int | None = None  # not looked yet: the first call reads mountinfo
        self._missing: str | None = None

    def __call__(self) -> Branch:
        try:
            dev = os.stat(self.fs.mountpoint).st_dev
        except OSError as exc:
            where = os.fsdecode(self.fs.mountpoint)
            raise MountError(f"mountpoint {where}: {exc.strerror}") from exc
        if dev != self._dev:
            self._dev, self._missing = dev, None
            try:
                self._attach()
            except LayerwatchError as exc:
                self._missing = str(exc)
            except OSError:
                self._dev = None  # mountinfo not read: read it at the next call
                raise
        if self._missing is not None:
            raise MountError(self._missing)
        return Branch(self.fs.rw, self._lower, self.fs.xattr_prefix)

    def _attach(self) -> None:
        fs, old = Filesystem.attach(self.fs.mountpoint), self.fs
        if (fs.rw, fs.layers, fs.xattr_prefix) == (old.rw, old.layers, old.xattr_prefix):
            return
        if (fs.layers, fs.xattr_prefix) != (old.layers, old.xattr_prefix):
            self._lower = Branch.of(fs).lower
        self.fs = fs
        if self._moved is not None:
            self._moved(fs)


@dataclass(frozen=True, slots=True)
class Degraded:
    """Why a mount is not followed by inotify alone, kept by its tracker.

    Attributes:
        reason: ``watch_limit`` (kept exact by periodic rescans), ``error`` (a reconcile
            failed: resynced at the next tick) or ``branch_missing`` (no branch to follow).
        detail: what happened, for people.
    """

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


WATCH_LIMIT: Final = "watch_limit"
"""The reason of a mount degraded by the inotify watch limit."""
ERROR: Final = "error"
"""The reason of a mount degraded by a failure (resynced at the next tick)."""
BRANCH_REPLACED: Final = "branch_replaced"
"""The reason of the resync (and snapshot) that follows a new branch."""
BRANCH_MISSING: Final = "branch_missing"
"""What ``Tracker.degraded`` starts with while the mount has no branch."""


class WatchOps(Protocol):
    """What a tracker needs from the shared inotify instance (the hub implements it)."""

    def add(self, tracker: Tracker, path: bytes) -> int:
        """Watch U's directory ``path`` for ``tracker``; returns the wd.

        Raises:
            WatchLimitError: ``fs.inotify.max_user_watches`` is reached.
            WatchError: the directory is gone (or cannot be watched).
        """
        ...

    def remove(self, tracker: Tracker, wd: int) -> None:
        """Stop watching ``wd`` (a wd the kernel already dropped is fine)."""
        ...


@dataclass(slots=True)
class _Dir:
    state: DirState
    ino: int
    wd: int | None = None
    members: set[bytes] = field(default_factory=set)


_STRUCTURAL = frozenset({Op.CREATE, Op.MOVE, Op.DELETE})
_ACTIVITY = frozenset({Op.MODIFY, Op.ATTRIB, Op.CREATE, Op.MOVE})
"""Hint ops that make an activity event for a path that stays in the list: writes, attribute
changes, and a new entry under the same name (re-created, or renamed over: an editor's save)."""


def _deleted_op(op: Op, parent: DirState, parent_path: bytes) -> Op:
    """The op of a ``D`` that a structural hint (create, move) brought: a whiteout, or, in a
    directory that hides B (opaque), a lower name the flag hides. Other ops stay as they are."""
    if op not in (Op.CREATE, Op.MOVE):
        return op
    hidden = parent.base is not None and parent.origin != parent_path
    return Op.OPAQUE if hidden else Op.WHITEOUT


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0] or b"/"


def _net(items: list[Item]) -> list[Item]:
    """One transition per path for one drain: from where the path began to where it ended.

    Reconciling passes through intermediate states (a replaced or moved-back directory's
    subtree is dropped, then scanned again: A, gone, A); consumers get the net change only.
    A path that ends where it began yields one activity event when it had one, or when a
    non-directory was replaced under its name (re-created, moved away and back), else nothing.
    """
    chains: dict[bytes, list[Transition]] = {}
    for item in items:
        if not isinstance(item, Transition):
            return items  # reconcile emits transitions only; keep anything else as it is
        chains.setdefault(item.path, []).append(item)
    if len(chains) == len(items):
        return items
    out: list[Item] = []
    for path, chain in chains.items():
        first, last = chain[0], chain[-1]
        if first.prev_kind != last.kind:
            out.append(Transition(path, last.kind, first.prev_kind, last.op, last.stat))
            continue
        if last.kind is None:
            continue
        acts = [t for t in chain if t.kind == t.prev_kind]
        if acts:
            out.append(Transition(path, last.kind, last.kind, acts[-1].op, last.stat))
        elif last.stat is not None and not stat.S_ISDIR(last.stat.st_mode):
            op = last.op if last.op in _ACTIVITY else Op.MODIFY
            out.append(Transition(path, last.kind, last.kind, op, last.stat))
    return out


class Tracker:
    """The live change list of one writable branch.

    Args:
        mount: the mount's name (in events and logs).
        upper: U, the writable branch.
        lower: B, the lower stack.
        watches: the shared inotify instance.
        xattr_prefix: overlay's metadata xattr prefix.
        resolve: where the branch is now (``check_branch``); by default ``upper`` and
            ``lower`` again.
        exclude: paths left out of the list, its watches and its scans.
    """

    @classmethod
    def of(
        cls,
        mount: str,
        branch: Branch,
        watches: WatchOps,
        *,
        resolve: Resolver | None = None,
        exclude: Excludes | None = None,
    ) -> Tracker:
        """The tracker of ``branch``: the one way the service, ``watch`` and the tests
        follow a branch."""
        return cls(
            mount,
            branch.upper,
            branch.lower,
            watches,
            xattr_prefix=branch.xattr_prefix,
            resolve=resolve,
            exclude=exclude,
        )

    def __init__(
        self,
        mount: str,
        upper: bytes,
        lower: LowerStack,
        watches: WatchOps,
        *,
        xattr_prefix: bytes = b"trusted.overlay.",
        resolve: Resolver | None = None,
        exclude: Excludes | None = None,
    ) -> None:
        self.mount = mount
        self.upper = os.path.realpath(upper).rstrip(b"/")
        self.exclude = exclude
        self.rules = self._live_rules(upper, lower, xattr_prefix)
        self.xattr_prefix = xattr_prefix
        configured = upper
        self._resolve = resolve or (lambda: Branch(configured, lower, xattr_prefix))
        self._root: tuple[int, int] | None = None
        """Device and inode of the watched root; None while there is no branch."""
        self._root_lost = False
        """The watched root itself is gone (deleted: its watch was dropped). Its inode number
        may be given to the next directory made, so that one is a new branch regardless."""
        self._gone: tuple[bytes, LowerStack, int, int] | None = None
        """The branch that went missing (upper, lower, device, inode): if it comes back
        unchanged, the list is kept and brought in step by a rescan, not a snapshot."""
        self._generation = 0
        """Counts the branches followed: a change means the old branch was left."""
        self._watches = watches
        self._own: dict[bytes, Kind] = {}
        self.kinds: dict[bytes, Kind] = {}
        self._live: dict[bytes, int] = {}
        self._dirs: dict[bytes, _Dir] = {}
        self._wd_path: dict[int, bytes] = {}
        self._unwatched: set[bytes] = set()
        self._out: list[Item] = []
        self._quiet = False
        self.degraded: Degraded | None = None
        self.attribution = False
        """Whether this mount's transitions carry their writer (the hub attaches it)."""
        self.interrupt: Callable[[], None] | None = None
        """Called once per directory a scan lists; may raise to abandon the scan (a stop
        during a long start). The tracker is then unusable: close it."""
        self._logger = logger.bind(mount=mount)

    def _live_rules(self, upper: bytes, lower: LowerStack, xattr_prefix: bytes) -> Rules:
        """The rules hints are reconciled with: the Python scan (``start`` says why)."""
        return Rules(upper, lower, xattr_prefix=xattr_prefix, exclude=self.exclude, native=False)

    # -- queries ---------------------------------------------------------------------------

    def changes(self) -> list[Change]:
        """The change list now, sorted by path bytes."""
        return [Change(path, self.kinds[path]) for path in sorted(self.kinds)]

    @property
    def watch_count(self) -> int:
        """How many inotify watches this tracker holds."""
        return len(self._wd_path)

    # -- life cycle ------------------------------------------------------------------------

    def start(
        self, persisted: Mapping[bytes, Kind] | None = None, *, reason: str = "start"
    ) -> list[Item]:
        """Watch and scan U; emit a snapshot (after a restart, the transitions first).

        ``persisted`` is the list saved by an earlier run: what changed while the service was
        down comes out as transitions (op ``rescan``) after a ``resync`` of reason ``restart``.
        """
        st = os.lstat(self.upper)
        self._root = (st.st_dev, st.st_ino)
        live = self.rules
        # The whole first scan (no hint is reconciled meanwhile) on the C scan when built: 2.7x
        # faster at 101k entries. Live work stays on the Python one: the C scan holds the GIL
        # for a whole directory (the spool's thread waits meanwhile) and looks every new name
        # up in the lower layers where Python answers from the cached lower listing (52 ms
        # against 47 ms for a 10k-entry directory over a lower one), so it gains nothing there.
        self.rules = Rules(
            live.upper, live.lower, xattr_prefix=self.xattr_prefix, exclude=self.exclude
        )
        try:
            if persisted is not None:
                self.kinds = dict(persisted)
                self._announce("restart")
                self._rescan()
                reason = "restart"
            else:
                self._quiet = True  # the snapshot below says it all: no transitions, no lstat
                try:
                    self._scan_tree(b"/", self.rules.root(), st.st_ino, Op.SNAPSHOT)
                finally:
                    self._quiet = False
        finally:
            self.rules = live
        self._snapshot(reason)
        return self.take()

    def take(self) -> list[Item]:
        """Hand over the items emitted since the last call."""
        out, self._out = self._out, []
        return out

    def close(self) -> None:
        """Drop every watch."""
        for wd in list(self._wd_path):
            self._watches.remove(self, wd)
        self._wd_path.clear()

    # -- hints -----------------------------------------------------------------------------

    def dirty_path(self, wd: int, name: bytes) -> bytes | None:
        """The path an event on ``wd`` with ``name`` makes dirty (None: ignore it)."""
        directory = self._wd_path.get(wd)
        if directory is None:
            return None
        if not name:
            return directory
        entry = self.rules.entry_name(name)
        if entry is None:  # aufs metadata: .wh..wh..opq changes the directory itself
            return directory
        return child_path(directory, entry)

    def forget_wd(self, wd: int) -> bytes | None:
        """The kernel dropped ``wd`` (IN_IGNORED); returns the directory it stood for.

        ``b"/"`` means U's root lost its watch (deleted, or its filesystem unmounted): make
        ``/`` dirty, and ``reconcile`` checks the branch.
        """
        path = self._wd_path.pop(wd, None)
        if path is not None:
            info = self._dirs.get(path)
            if info is not None and info.wd == wd:
                info.wd = None
        if path == b"/":
            self._root_lost = True
        return path

    def reconcile(self, dirty: Mapping[bytes, Op]) -> list[Item]:
        """Bring the list in step for every dirty path (parents first); return the items.

        An event on U's root itself (``/`` dirty: deleted, moved, unmounted), or U's path no
        longer leading to the watched root (a parent renamed: no event for that), checks the
        branch first; when it was left, the other paths were the old branch's and are dropped.
        """
        if dirty.get(b"/") is Op.DELETE:  # IN_DELETE_SELF of the root
            self._root_lost = True
        moved = b"/" in dirty or self._root_moved()
        if moved and (left := self._branch_left()) is not None:
            return left
        for path in sorted(dirty, key=lambda p: (p.count(b"/"), p)):
            self._reconcile_one(path, dirty[path])
        return _net(self.take())

    def resync(self, reason: str) -> list[Item]:
        """Rescan everything (overflow, watch limits): a resync, real transitions, a snapshot.

        A branch that was replaced meanwhile is followed instead (``check_branch``), and one
        that is missing is not scanned at all.
        """
        if (left := self._branch_left()) is not None:
            return left
        self._resync(reason)
        return self.take()

    def rescan(self) -> list[Item]:
        """Rescan everything and emit only the real transitions (degraded mode's poll)."""
        self._rescan()
        return self.take()

    def poll(self) -> list[Item]:
        """The periodic work (the hub's rescan tick, the sync barrier): recover a degraded
        mount, else check that the watched branch is still the mount's branch."""
        if self.degraded:
            return self.recover()
        return self.check_branch()

    def check_branch(self) -> list[Item]:
        """Make sure the branch watched is the one the resolver names, by device and inode.

        A new branch is followed from scratch: every watch of the old one is dropped (a root
        moved away still reports its writes, which are not U's), then a ``resync`` of reason
        ``branch_replaced``, the real transitions and a snapshot. No branch at all: the
        watches are dropped, the list is kept, and the mount is degraded (``branch_missing:
        WHY``, logged as a warning) until a later check finds one. The branch that went
        missing coming back unchanged is only rescanned (real transitions, no snapshot).

        Once the watched root is known to be deleted (its ``IN_DELETE_SELF``, or the kernel
        dropped its watch), whatever directory is at U's path is a new branch, even with the
        old device and inode: filesystems give a freed inode number to the next ``mkdir``.
        """
        if self._root_lost and self._root is not None:
            self._leave()  # the old root cannot come back: nothing of it is kept
            self._gone = None
        try:
            branch = self._resolve()
            upper = os.path.realpath(branch.upper).rstrip(b"/")
            st = os.lstat(upper)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"upper dir {os.fsdecode(upper)} is not a directory")
        except FileNotFoundError as exc:
            path = exc.filename if exc.filename is not None else self.upper
            self._lose(f"upper dir {os.fsdecode(path)} is missing")
            return self.take()
        except (OSError, LayerwatchError) as exc:
            self._lose(str(exc))
            return self.take()
        root = (st.st_dev, st.st_ino)
        same = upper == self.upper and branch.lower is self.rules.lower
        if same and root == self._root and branch.xattr_prefix == self.xattr_prefix:
            return self.take()
        came_back = self._gone == (upper, branch.lower, st.st_dev, st.st_ino)
        old = self.upper
        self._leave()
        self.upper, self.xattr_prefix = upper, branch.xattr_prefix
        self.rules = self._live_rules(upper, branch.lower, branch.xattr_prefix)
        self._root, self._gone = root, None
        missing = self.degraded is not None and self.degraded.reason == BRANCH_MISSING
        self.degraded = None  # whatever it was, the branch is scanned from scratch below
        if came_back:
            self._rescan()
            self._logger.info("branch_recovered", upper=os.fsdecode(upper))
        else:
            self._resync(BRANCH_REPLACED)
            self._logger.warning(
                "branch_replaced",
                old_upper=os.fsdecode(old),
                upper=os.fsdecode(upper),
                was_missing=missing,
                entries=len(self.kinds),
            )
        return self.take()

    def fail(self, exc: Exception) -> None:
        """A reconcile raised ``exc``: drop its half-made items and degrade the mount
        (reason ``error``); the next tick resyncs it, so consumers get a snapshot, not a gap."""
        self.take()
        self.degraded = Degraded(ERROR, str(exc))

    @property
    def degraded_by_error(self) -> bool:
        """Whether a failure (not the watch limit) degraded this mount."""
        return self.degraded is not None and self.degraded.reason == ERROR

    def recover(self) -> list[Item]:
        """A degraded mount's periodic work: after a failure, a resync (then healthy again);
        at the watch limit, a rescan that also retries the missing watches; without a branch,
        a look for one (``check_branch``)."""
        if (left := self._branch_left()) is not None:
            return left
        if self.degraded_by_error:
            items = self.resync("error")
            self.degraded = None
            self._logger.info("tracker_recovered")
            return items
        return self.rescan()

    # -- internals -------------------------------------------------------------------------

    def _resync(self, reason: str) -> None:
        self._announce(reason)
        self._rescan()
        self._snapshot(reason)

    def _root_moved(self) -> bool:
        """Whether U's path leads somewhere else than the watched root (one ``lstat``)."""
        try:
            st = os.lstat(self.upper)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._root

    def _branch_left(self) -> list[Item] | None:
        """``check_branch`` before work on the branch: its items when the branch watched was
        left or there is none (the work is moot then), else None."""
        generation = self._generation
        items = self.check_branch()
        if generation != self._generation or self._root is None:
            return items
        self._out.extend(items)  # nothing, the branch being the same one
        return None

    def _lose(self, why: str) -> None:
        """The mount has no branch now: drop the old branch's watches, keep the list."""
        if self.degraded is not None and self.degraded.reason == BRANCH_MISSING:
            return  # missing already, and said so
        if self._root is not None:
            self._gone = (self.upper, self.rules.lower, self._root[0], self._root[1])
            self._leave()
        self.degraded = Degraded(BRANCH_MISSING, why)
        self._logger.warning(BRANCH_MISSING, upper=os.fsdecode(self.upper), reason=why)

    def _leave(self) -> None:
        """Stop following the current branch: every watch and every known directory go."""
        self.close()
        self._dirs.clear()
        self._unwatched.clear()
        self._root, self._root_lost = None, False
        self._generation += 1

    def _snapshot(self, reason: str) -> None:
        self._out.append(Control(SNAPSHOT_BEGIN, {"mount": self.mount, "reason": reason}))
        entries = sorted(self.kinds.items())  # the list at this instant; stats read when sent
        self._out.append(SnapshotEntries(entries, self._lstat))
        self._out.append(
            Control(SNAPSHOT_END, {"mount": self.mount, "reason": reason, "count": len(self.kinds)})
        )

    def _lstat(self, path: bytes) -> os.stat_result | None:
        try:
            return os.lstat(self.upper + path)
        except OSError:
            return None

    def _reconcile_one(self, path: bytes, op: Op) -> None:
        if path == b"/":
            return
        parent = _parent(path)
        info = self._dirs.get(parent)
        if info is None:
            return  # the parent is gone or not scanned yet: its own hint covers this path
        name = path[len(parent) + (parent != b"/") :]
        try:
            child = self.rules.child(parent, info.state, name)
        except NotADirectoryError:
            return
        old = self._dirs.get(path)
        if old is not None and (
            child.dir is None
            or child.dir != old.state
            or child.ino != old.ino
            or op in _STRUCTURAL  # inode numbers are reused: a new dir may look like the old
            or (old.state.in_upper and old.wd is None)  # the kernel dropped its watch
        ):
            self._drop_tree(path, op)
            old = None
        if child.kind is Kind.DELETED:
            op = _deleted_op(op, info.state, parent)
        self._set_own(path, child.kind, op, child.st, activity=True)
        if child.dir is not None and old is None:
            self._scan_tree(path, child.dir, child.ino, Op.CREATE if op is not Op.RESCAN else op)

    def _scan_tree(self, path: bytes, state: DirState, ino: int, op: Op) -> None:
        """Watch first, then list; for ``path`` and every directory below it."""
        stack = [(path, state, ino)]
        while stack:
            if self.interrupt is not None:
                self.interrupt()
            directory, dstate, dino = stack.pop()
            info = _Dir(dstate, dino)
            parent_info = self._dirs.get(_parent(directory))
            if parent_info is not None and directory != b"/":
                parent_info.members.add(directory)
            self._dirs[directory] = info
            if dstate.in_upper:
                self._watch(directory, info)
            try:
                # Quiet (the start's snapshot): nothing is emitted, no lstat is needed.
                children = self.rules.scan(directory, dstate, stats=not self._quiet)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone already: the parent's hint will drop it
            deleted = _deleted_op(op, dstate, directory)
            for child in children:
                child_op = deleted if child.kind is Kind.DELETED else op
                self._set_own(child.path, child.kind, child_op, child.st, activity=False)
                if child.dir is not None:
                    stack.append((child.path, child.dir, child.ino))

    def _watch(self, directory: bytes, info: _Dir) -> None:
        try:
            wd = self._watches.add(self, self.upper + directory)
        except WatchLimitError as exc:
            self._unwatched.add(directory)
            if self.degraded is None:
                self.degraded = Degraded(WATCH_LIMIT)
                self._logger.error("watch_limit_reached", path=directory, error=str(exc))
            return
        except WatchError:
            return  # vanished between listing and watching: the parent's hint covers it
        old_path = self._wd_path.get(wd)
        if old_path is not None and old_path != directory:
            old_info = self._dirs.get(old_path)
            if old_info is not None and old_info.wd == wd:
                old_info.wd = None  # the directory moved: the watch follows it
        self._wd_path[wd] = directory
        info.wd = wd
        self._unwatched.discard(directory)

    def _drop_tree(self, path: bytes, op: Op) -> None:
        """``path`` left U (or changed type or state): everything known below it goes."""
        info = self._dirs.pop(path, None)
        if info is None:
            return
        if info.wd is not None and self._wd_path.get(info.wd) == path:
            del self._wd_path[info.wd]
            self._watches.remove(self, info.wd)
        self._unwatched.discard(path)
        parent_info = self._dirs.get(_parent(path))
        if parent_info is not None:
            parent_info.members.discard(path)
        for member in list(info.members):
            self._drop_tree(member, op)
            self._set_own(member, None, op, None, activity=False)

    def _set_own(
        self, path: bytes, kind: Kind | None, op: Op, st: os.stat_result | None, *, activity: bool
    ) -> None:
        old = self._own.get(path)
        parent_info = self._dirs.get(_parent(path))
        if kind is None:
            self._own.pop(path, None)
            if parent_info is not None and path not in self._dirs:
                parent_info.members.discard(path)
        else:
            self._own[path] = kind
            if parent_info is not None:
                parent_info.members.add(path)
        if old == kind:
            if activity and op in _ACTIVITY and path in self.kinds:
                self._emit(path, self.kinds[path], self.kinds[path], op, st)  # activity
            return
        self._refresh(path, op, st)

    def _refresh(self, path: bytes, op: Op, st: os.stat_result | None) -> None:
        """Recompute ``path``'s entry (own kind or rule 8) and carry it up the ancestors."""
        while path != b"/":
            old = self.kinds.get(path)
            new = self._own.get(path)
            if new is None and self._live.get(path, 0) > 0:
                new = Kind.CHANGED
            if new == old:
                return
            if new is None:
                del self.kinds[path]
            else:
                self.kinds[path] = new
            self._emit(path, new, old, op, st)
            parent = _parent(path)
            if (old is None) != (new is None):
                count = self._live.get(parent, 0) + (1 if new is not None else -1)
                if count:
                    self._live[parent] = count
                else:
                    self._live.pop(parent, None)
            else:
                return
            path, st = parent, None
            if op not in (Op.RESCAN, Op.SNAPSHOT):
                op = Op.MODIFY if op is not Op.ATTRIB else op

    def _emit(
        self, path: bytes, kind: Kind | None, prev: Kind | None, op: Op, st: os.stat_result | None
    ) -> None:
        if self._quiet:
            return
        if st is None and kind is not None and kind is not Kind.DELETED:
            st = self._lstat(path)
        if kind is Kind.DELETED or kind is None:
            st = None
        self._out.append(Transition(path, kind, prev, op, st))

    def _rescan(self) -> None:
        """Recompute the whole list from U and B; emit only what really differs."""
        own: dict[bytes, Kind] = {}
        dirs: dict[bytes, _Dir] = {}
        stack = [(b"/", self.rules.root(), os.lstat(self.upper).st_ino)]
        while stack:
            if self.interrupt is not None:
                self.interrupt()
            directory, dstate, dino = stack.pop()
            info = self._dirs.get(directory)
            if info is None or info.state != dstate or (dstate.in_upper and info.ino != dino):
                info = _Dir(dstate, dino)
            info.members = set()
            dirs[directory] = info
            if dstate.in_upper and (info.wd is None or self._wd_path.get(info.wd) != directory):
                self._watch(directory, info)  # watch, then list: nothing made between is lost
            try:
                children = self.rules.scan(directory, dstate, stats=False)  # kinds only
            except (FileNotFoundError, NotADirectoryError):
                continue
            for child in children:
                if child.kind is not None:
                    own[child.path] = child.kind
                    info.members.add(child.path)
                if child.dir is not None:
                    info.members.add(child.path)
                    stack.append((child.path, child.dir, child.ino))
        for path, info in self._dirs.items():
            stale = dirs.get(path) is not info and info.wd is not None
            if stale and info.wd is not None and self._wd_path.get(info.wd) == path:
                del self._wd_path[info.wd]
                self._watches.remove(self, info.wd)
        self._dirs = dirs
        for path, info in dirs.items():
            if info.state.in_upper and (info.wd is None or self._wd_path.get(info.wd) != path):
                self._watch(path, info)
        self._unwatched.intersection_update(dirs)  # gone while unwatched: nothing to watch
        if not self._unwatched and self.degraded == Degraded(WATCH_LIMIT):
            self.degraded = None
            self._logger.info("watch_limit_recovered")
        # Rebuild the derived list from scratch and emit the differences.
        old_kinds = self.kinds
        self._own = own
        self._live = {}
        self.kinds = dict(own)
        for path in own:
            while path != b"/":
                parent = _parent(path)
                self._live[parent] = self._live.get(parent, 0) + 1
                if parent == b"/" or parent in self.kinds:
                    break
                self.kinds[parent] = Kind.CHANGED
                path = parent
        for path in sorted(old_kinds.keys() | self.kinds.keys()):
            before, after = old_kinds.get(path), self.kinds.get(path)
            if before != after:
                self._emit(path, after, before, Op.RESCAN, None)

    def resync_items(self, reason: str) -> list[Item]:
        """A resync and a snapshot of the list as it is now, without rescanning (for a
        consumer that lost its place)."""
        self._announce(reason)
        self._snapshot(reason)
        return self.take()

    def _announce(self, reason: str) -> None:
        """The resync event: the one place it is made."""
        self._out.append(Control(RESYNC, {"mount": self.mount, "reason": reason}))
