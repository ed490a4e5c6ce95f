"""Property: the C scan (``watcher.core._scan``) answers exactly what the Python rules answer.

The Python in ``watcher/core/rules.py`` is the reference (``docs/design-decisions.md``), so the
C code is checked against it, not against the oracle: on random trees built straight on disk
(no mount, so also states the kernel would not make), in both whiteout formats, with odd names
(non-UTF-8 bytes, a newline, a space, ``.wh.`` lookalikes, which aufs format reads as its own
bookkeeping), redirects with odd values, capabilities and near-equal metadata. Three levels:

- ``compute``: the whole list, C walk against Python walk;
- ``Rules.scan`` of every directory the walk reaches: the same children (kind, directory state,
  ``lstat`` but its access time, inode);
- the live tracker: two trackers, one on each implementation, give the same items on a
  restart from a drawn persisted list (the rescan), on a new subtree made under U (the scan
  of a created directory) and on a resync.

Skipped when the extension is not built (the Python path is then the only one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from overlay import LayerEntry, build_layer, placeable, to_aufs

from watcher.core.layers import LowerStack, Whiteouts
from watcher.core.model import Control, Item, Kind, Op, Transition, expand
from watcher.core.native import scanner_type
from watcher.core.rules import Child, DirState, Rules, compute
from watcher.live.tracker import Tracker

pytestmark = [
    pytest.mark.root,  # trusted.* xattrs and char devices 0:0
    pytest.mark.skipif(scanner_type() is None, reason="the C scan is not built"),
]

LEVEL1 = (b"d", b"e f", b"\xff\xfe")
LEVEL2 = (b"a", b"b\nc", b".wh.a", b".wh..wh.x")
LEVEL3 = (b"x", b"y")
POOL = [
    *LEVEL1,
    *(a + b"/" + b for a in LEVEL1 for b in LEVEL2),
    *(a + b"/" + b + b"/" + c for a in LEVEL1 for b in LEVEL2[:2] for c in LEVEL3),
]
"""Relative paths of depth 1 to 3 that layers and the upper draw from."""

CAPS = tuple(struct.pack("<IIIII", 0x02000001, bit, 0, 0, 0) for bit in (1 << 10, 1 << 12))
REDIRECTS = (b"/d", b"/e f/a", b"a", b"b\nc", b"..", b"", b"/d/", b"/nope", b"/", b"a/x")
"""Values of ``trusted.overlay.redirect``: absolute, relative, and ones that lead nowhere."""

LOWER_KINDS = ("file", "file", "dir", "dir", "symlink", "fifo", "capfile", "whiteout", "opaque")
UPPER_KINDS = (*LOWER_KINDS, "whiteout", "redirect", "redirect", "same")


@st.composite
def layer(draw: st.DrawFn, kinds: tuple[str, ...]) -> list[tuple[LayerEntry, bytes | None]]:
    """Entries of one branch, each with the redirect its directory carries (or None)."""
    chosen = draw(
        st.dictionaries(st.sampled_from(POOL), st.sampled_from(kinds), min_size=1, max_size=16)
    )
    out: list[tuple[LayerEntry, bytes | None]] = []
    for path, kind in placeable(chosen):
        if kind == "redirect":
            out.append((LayerEntry("dir", path, mode=0o755), draw(st.sampled_from(REDIRECTS))))
        elif kind == "same":  # what a lower file built with the defaults has: rule 2 says equal
            out.append((LayerEntry("file", path), None))
        elif kind == "capfile":
            cap = draw(st.sampled_from(CAPS))
            out.append((LayerEntry("file", path, capability=cap), None))
        elif kind == "file":
            entry = LayerEntry(
                "file",
                path,
                data=draw(st.sampled_from((b"", b"x"))),
                mode=draw(st.sampled_from((0o644, 0o600))),
                mtime_extra_ns=draw(st.sampled_from((0, 0, 500))),
            )
            out.append((entry, None))
        elif kind == "symlink":
            out.append((LayerEntry("symlink", path, data=b"a"), None))
        else:
            mode = 0o755 if kind in ("dir", "opaque") else 0o644
            out.append((LayerEntry(kind, path, mode=mode), None))
    return out


@st.composite
def trees(draw: st.DrawFn) -> tuple[list[list[tuple[LayerEntry, bytes | None]]], Any]:
    """One to three lower layers (top first) and an upper."""
    lowers = draw(st.lists(layer(LOWER_KINDS), min_size=1, max_size=3))
    return lowers, draw(layer(UPPER_KINDS))


def _build(root: str, entries: list[tuple[LayerEntry, bytes | None]]) -> None:
    os.mkdir(root)
    build_layer(root, [e for e, _ in entries])
    for entry, redirect in entries:
        if redirect is not None:
            path = os.path.join(os.fsencode(root), entry.path)
            os.setxattr(path, b"trusted.overlay.redirect", redirect, follow_symlinks=False)


@contextlib.contextmanager
def built(example: Any) -> Iterator[tuple[str, list[str]]]:
    """The drawn branches on disk: (upper, lowers)."""
    lower_entries, upper_entries = example
    with tempfile.TemporaryDirectory(prefix="lw-native-") as tmp:
        lowers = []
        for i, entries in enumerate(lower_entries):
            lowers.append(os.path.join(tmp, f"l{i}"))
            _build(lowers[-1], entries)
        upper = os.path.join(tmp, "upper")
        _build(upper, upper_entries)
        yield upper, lowers


def _stat_key(s: os.stat_result | None) -> tuple[int, ...] | None:
    """An ``lstat`` but its access time (listing a directory may update that in between)."""
    if s is None:
        return None
    return (
        s.st_mode,
        s.st_ino,
        s.st_dev,
        s.st_nlink,
        s.st_uid,
        s.st_gid,
        s.st_size,
        s.st_mtime_ns,
        s.st_ctime_ns,
        s.st_rdev,
    )


def _child_key(c: Child) -> tuple[Any, ...]:
    return (c.path, c.kind, c.dir, _stat_key(c.st), c.ino)


def _compare_scans(py: Rules, c: Rules) -> int:
    """Scan every directory the Python walk reaches with both; return how many."""
    stack: list[tuple[bytes, DirState]] = [(b"/", py.root())]
    count = 0
    while stack:
        path, state = stack.pop()
        want = sorted(py.scan(path, state), key=lambda ch: ch.path)
        got = sorted(c.scan(path, state), key=lambda ch: ch.path)
        assert [_child_key(ch) for ch in got] == [_child_key(ch) for ch in want], path
        count += 1
        stack.extend((ch.path, ch.dir) for ch in want if ch.dir is not None)
    return count


def _check_format(upper: str, lowers: list[str], whiteouts: str) -> None:
    want = compute(upper, lowers, whiteouts=whiteouts, native=False)
    got = compute(upper, lowers, whiteouts=whiteouts, native=True)
    assert got == want, f"compute, {whiteouts} format"
    assert all(type(change.kind) is Kind for change in got)
    lower = LowerStack(lowers, whiteouts=Whiteouts(whiteouts))
    py, c = Rules(upper, lower, native=False), Rules(upper, lower, native=True)
    assert c.native is not None
    assert py.native is None
    assert _compare_scans(py, c) >= 1


def _clashes(branch: str) -> bool:
    """Whether a drawn ``.wh.NAME`` entry stands where the aufs whiteout of NAME would go
    (aufs format cannot say both; ``to_aufs`` would open a FIFO there, or follow a link)."""
    for dirpath, dirnames, filenames in os.walk(os.fsencode(branch)):
        names = set(dirnames) | set(filenames)
        for name in names:
            if name.startswith(b".wh.") and name[4:] in names:
                st = os.lstat(os.path.join(dirpath, name[4:]))
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    return True
    return False


def _to_aufs(upper: str, lowers: list[str], *, root_metadata: bool = True) -> bool:
    """Rewrite the branches into aufs format; False (nothing rewritten) when one clashes."""
    if any(_clashes(branch) for branch in (upper, *lowers)):
        return False
    to_aufs(upper, root_metadata=root_metadata)
    for path in lowers:
        to_aufs(path)
    return True


PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(trees())
def test_c_and_python_agree_on_random_trees(example: Any) -> None:
    """compute and every directory's scan: the same answers, overlay then aufs format."""
    with built(example) as (upper, lowers):
        _check_format(upper, lowers, "overlay")
        if _to_aufs(upper, lowers):
            _check_format(upper, lowers, "aufs")


def test_bad_arguments_are_refused() -> None:
    """The C scanner names what is wrong instead of reading garbage."""
    scanner = scanner_type()
    assert scanner is not None
    with pytest.raises(ValueError, match="embedded null byte"):
        scanner(b"/tm\0p", (), False, b"trusted.overlay.")
    with pytest.raises(ValueError, match="at most 512"):
        scanner(b"/tmp", (b"/tmp",) * 513, False, b"trusted.overlay.")
    with tempfile.TemporaryDirectory() as tmp:
        rules = Rules(tmp, LowerStack([tmp]), native=True)
        assert rules.native is not None
        with pytest.raises(ValueError, match="out of range"):
            rules.native.scan(b"/", (5,), b"/", True)
        with pytest.raises(FileNotFoundError):
            rules.scan(b"/missing", DirState(None, b"/missing", True))


# -- the live tracker's scans ---------------------------------------------------------------


def _item_key(item: Transition | Control) -> tuple[Any, ...]:
    if isinstance(item, Transition):
        return ("t", item.path, item.kind, item.prev_kind, item.op, _stat_key(item.stat))
    return ("c", item.type, sorted(item.data.items()))


def _items(items: list[Item]) -> list[tuple[Any, ...]]:
    """Items in a comparable form: snapshots expanded, in order of path (the order children
    are scanned in is the implementations' own)."""
    return sorted((_item_key(i) for i in expand(items)), key=repr)


class _Watches:
    """A WatchOps that hands out watch numbers without inotify. A fake, on purpose: the test
    calls the trackers itself and reads no event, so real watches would go unused, and the
    machine's watch limit is shared with every process of root (a soak or a bench running
    beside the tests can hold all of it)."""

    def __init__(self) -> None:
        self._next = 0

    def add(self, tracker: Tracker, path: bytes) -> int:
        self._next += 1
        return self._next

    def remove(self, tracker: Tracker, wd: int) -> None:
        pass


class _Pair:
    """Two trackers of one branch: the Python rules' and the C scan's."""

    def __init__(self, upper: str, lowers: list[str], whiteouts: str) -> None:
        self.trackers = []
        for native in (False, True):
            lower = LowerStack(lowers, whiteouts=Whiteouts(whiteouts))
            tracker = Tracker("m", os.fsencode(upper), lower, _Watches())
            tracker.rules = Rules(upper, lower, native=native)
            self.trackers.append(tracker)

    def same(self, call: str, *args: Any) -> None:
        py, c = (getattr(t, call)(*args) for t in self.trackers)
        assert _items(c) == _items(py), call
        assert self.trackers[1].kinds == self.trackers[0].kinds


@st.composite
def tracker_cases(draw: st.DrawFn) -> tuple[Any, dict[bytes, Kind], Any]:
    """A tree, a persisted list to restart from, and entries for a new subtree ``/n``."""
    tree = draw(trees())
    paths = [b"/" + p for p in POOL]
    persisted = draw(st.dictionaries(st.sampled_from(paths), st.sampled_from(list(Kind))))
    return tree, persisted, draw(layer(UPPER_KINDS))


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(tracker_cases(), st.sampled_from(("overlay", "aufs")))
def test_tracker_transitions_agree(case: Any, whiteouts: str) -> None:
    """Restart (rescan), a created subtree (scan of a new directory), resync: same items."""
    tree, persisted, subtree = case
    with built(tree) as (upper, lowers):
        if whiteouts == "aufs" and not _to_aufs(upper, lowers):
            return
        pair = _Pair(upper, lowers, whiteouts)
        pair.same("start", persisted)
        new = os.path.join(upper, "n")
        shutil.rmtree(new, ignore_errors=True)
        _build(new, subtree)
        if whiteouts == "aufs" and not _to_aufs(new, [], root_metadata=False):
            return
        pair.same("reconcile", {b"/n": Op.CREATE})
        pair.same("resync", "overflow")
