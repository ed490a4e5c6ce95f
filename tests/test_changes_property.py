"""Property: ``compute(upper, lowers)`` equals the two-tree oracle for random operations.

Hypothesis draws lower layers (one plain layer, or three image-like layers that themselves
hold whiteouts and opaque directories) and a sequence of file-system operations, runs the
operations through a real overlay mount, and compares ``compute`` on the upper directory with
the oracle's comparison of the merged view against the base view. The same must hold after
the upper and the lowers are rewritten into aufs format.

Operations that the kernel refuses (ENOENT, EXDEV for a plain rename of a lower directory,
ENOTEMPTY, ...) are simply no-ops, as they are for a shell user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import changes_dirs
from overlay import (
    MOUNT_OPTIONS,
    LayerEntry,
    build_layer,
    mount_base,
    mount_overlay,
    placeable,
    requires_overlay,
    to_aufs,
)

from watcher.core.rules import compute

pytestmark = [requires_overlay, pytest.mark.root]

LOWER_MTIME = 1_700_000_000
SECOND = 1_000_000_000


def _cap(permitted: int) -> bytes:
    """A valid VFS v2 ``security.capability`` value with the effective bit set."""
    return struct.pack("<IIIII", 0x02000001, permitted, 0, 0, 0)


CAPS = (_cap(1 << 10), _cap(1 << 12))
LEVEL1 = (b"d", b"e", b"\xff\xfe")
LEVEL2 = (b"a", b"b\nc")
LEVEL3 = (b"x", b"y")
WH_NAME = b".wh.a"
"""A name a user may give a file on overlay; it is an ordinary entry there (rule 11)."""


def _paths(with_wh: bool) -> list[bytes]:
    """The pool of relative paths operations and layers draw from (depth 1 to 3)."""
    level2 = (*LEVEL2, WH_NAME) if with_wh else LEVEL2
    out = list(LEVEL1)
    out += [a + b"/" + b for a in LEVEL1 for b in level2]
    out += [a + b"/" + b + b"/" + c for a in LEVEL1 for b in LEVEL2 for c in LEVEL3]
    return out


BOTTOM_KINDS = ("file", "file", "dir", "dir", "symlink", "fifo", "chardev", "capfile", "hardlink")
UPPER_LAYER_KINDS = (*BOTTOM_KINDS, "whiteout", "whiteout", "opaque")
DATA = (b"", b"x", b"hello\n")


@st.composite
def layer(draw: st.DrawFn, paths: list[bytes], kinds: Sequence[str]) -> list[LayerEntry]:
    """One lower layer: some pool paths with kinds, children only under directories."""
    chosen = draw(
        st.dictionaries(st.sampled_from(paths), st.sampled_from(kinds), min_size=2, max_size=14)
    )
    entries: list[LayerEntry] = []
    for path, kind in placeable(chosen):
        if kind == "capfile":
            entries.append(
                LayerEntry("file", path, data=b"cap", capability=draw(st.sampled_from(CAPS)))
            )
        elif kind == "symlink":
            entries.append(LayerEntry("symlink", path, data=draw(st.sampled_from((b"a", b"/d/a")))))
        elif kind == "file":
            entries.append(
                LayerEntry(
                    "file",
                    path,
                    data=draw(st.sampled_from(DATA)),
                    mode=draw(st.sampled_from((0o644, 0o755))),
                    mtime_extra_ns=draw(st.sampled_from((0, 0, 500))),
                )
            )
        elif kind == "hardlink":
            targets = [e.path for e in entries if e.kind == "file"]
            if targets:
                entries.append(LayerEntry("hardlink", path, data=draw(st.sampled_from(targets))))
        else:
            entries.append(
                LayerEntry(kind, path, mode=0o755 if kind in ("dir", "opaque") else 0o644)
            )
    return entries


MTIMES_NS = (
    LOWER_MTIME * SECOND,
    LOWER_MTIME * SECOND + 500,
    (LOWER_MTIME + 1) * SECOND,
    (LOWER_MTIME + 1) * SECOND + 1,
)


def ops(paths: list[bytes]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """A sequence of operations on pool paths (each a tuple: name, arguments...)."""
    p = st.sampled_from(paths)
    op = st.one_of(
        st.tuples(st.just("create"), p, st.sampled_from(DATA)),
        st.tuples(st.just("append"), p, st.sampled_from((b"", b"more"))),
        st.tuples(st.just("open_rw"), p),
        st.tuples(st.just("chmod"), p, st.sampled_from((0o644, 0o600, 0o755, 0o4755))),
        st.tuples(st.just("chown"), p, st.sampled_from(((0, 0), (1000, 1000), (0, 1000)))),
        st.tuples(st.just("truncate"), p, st.sampled_from((0, 1, 6))),
        st.tuples(st.just("rename"), p, p),
        st.tuples(st.just("mv"), p, p),
        st.tuples(st.just("link"), p, p),
        st.tuples(st.just("symlink"), st.sampled_from((b"a", b"/d")), p),
        st.tuples(st.just("unlink"), p),
        st.tuples(st.just("rmdir"), p),
        st.tuples(st.just("rm_rf"), p),
        st.tuples(st.just("mkdir_p"), p),
        st.tuples(st.just("mkfifo"), p),
        st.tuples(st.just("mknod"), p, st.sampled_from(((1, 3), (1, 5)))),
        st.tuples(st.just("touch"), p, st.sampled_from(MTIMES_NS)),
        st.tuples(st.just("setcap"), p, st.sampled_from(CAPS)),
        st.tuples(st.just("dropcap"), p),
        st.tuples(st.just("user_xattr"), p),
    )
    return st.lists(op, min_size=1, max_size=12)


def _write(path: bytes, flags: int, data: bytes) -> None:
    """Open for writing without blocking (a FIFO without reader refuses) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def apply(merged: bytes, op: tuple[Any, ...]) -> None:
    """Run one operation in the merged root; refusals by the kernel are no-ops."""
    name, *args = op
    path = os.path.join(merged, args[-1] if name == "symlink" else args[0])
    try:
        if name == "create":
            _write(path, os.O_CREAT | os.O_TRUNC, args[1])
        elif name == "append":
            _write(path, os.O_CREAT | os.O_APPEND, args[1])
        elif name == "open_rw":
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW))
        elif name == "chmod":
            os.chmod(path, args[1])
        elif name == "chown":
            os.lchown(path, *args[1])
        elif name == "truncate":
            os.truncate(path, args[1])
        elif name == "rename":
            os.rename(path, os.path.join(merged, args[1]))
        elif name == "mv":
            subprocess.run(
                ["mv", "-f", path, os.path.join(merged, args[1])], capture_output=True, check=False
            )
        elif name == "link":
            os.link(path, os.path.join(merged, args[1]), follow_symlinks=False)
        elif name == "symlink":
            os.symlink(args[0], path)
        elif name == "unlink":
            os.unlink(path)
        elif name == "rmdir":
            os.rmdir(path)
        elif name == "rm_rf":
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        elif name == "mkdir_p":
            os.makedirs(path, exist_ok=True)
        elif name == "mkfifo":
            os.mkfifo(path)
        elif name == "mknod":
            os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(*args[1]))
        elif name == "touch":
            os.utime(path, ns=(args[1], args[1]), follow_symlinks=False)
        elif name == "setcap":
            os.setxattr(path, b"security.capability", args[1], follow_symlinks=False)
        elif name == "dropcap":
            os.removexattr(path, b"security.capability", follow_symlinks=False)
        elif name == "user_xattr":
            os.setxattr(path, b"user.note", b"v", follow_symlinks=False)
        else:
            raise AssertionError(f"unknown op {name}")
    except OSError:
        pass


def _uses_wh(layers: list[list[LayerEntry]], steps: list[tuple[Any, ...]]) -> bool:
    """True when a user-chosen name starts with ``.wh.`` (then aufs format cannot say it)."""
    names = [e.path for layer_ in layers for e in layer_]
    names += [a for step in steps for a in step[1:] if isinstance(a, bytes)]
    return any(part.startswith(b".wh.") for n in names for part in n.split(b"/"))


def _as_pairs(changes: Sequence[Any]) -> list[tuple[bytes, str]]:
    """compute()'s Change list as (path, kind letter) pairs, order kept."""
    return [(c.path, c.kind.value) for c in changes]


def check(
    layers: list[list[LayerEntry]],
    steps: list[tuple[Any, ...]],
    options: str = MOUNT_OPTIONS,
    aufs: bool = True,
) -> None:
    """Build ``layers`` (top first), run ``steps`` on a mount, compare compute with the oracle.

    Args:
        layers: lower layers, top first.
        steps: operations run through the merged root.
        options: overlay mount options (after lowerdir, upperdir, workdir).
        aufs: also compare after rewriting the branches into aufs format.
    """
    with tempfile.TemporaryDirectory(prefix="lw-prop-") as tmp:
        lowers = []
        for i, entries in enumerate(layers):
            path = os.path.join(tmp, f"l{i}")
            os.mkdir(path)
            build_layer(path, entries)
            lowers.append(path)
        with mount_overlay(tmp, lowers, options=options) as ovl:
            merged = os.fsencode(ovl.merged)
            for step in steps:
                apply(merged, step)
            with mount_base(lowers) as base:
                expected = changes_dirs(ovl.merged, base)
            live = _as_pairs(compute(ovl.upper, lowers))
        assert live == expected, "overlay whiteouts, upper read while mounted"
        if not aufs or _uses_wh(layers, steps):
            return
        to_aufs(ovl.upper, root_metadata=True)
        for path in lowers:
            to_aufs(path)
        assert _as_pairs(compute(ovl.upper, lowers, whiteouts="aufs")) == expected, "aufs whiteouts"


POOLS = {flag: _paths(flag) for flag in (False, True)}
OPS = {flag: ops(paths) for flag, paths in POOLS.items()}
BOTTOM = {flag: layer(paths, BOTTOM_KINDS) for flag, paths in POOLS.items()}
IMAGE = {flag: layer(paths, UPPER_LAYER_KINDS) for flag, paths in POOLS.items()}
"""Strategies built once per pool (with or without a ``.wh.`` name): building is costly."""


@st.composite
def one_lower(draw: st.DrawFn) -> tuple[list[list[LayerEntry]], list[tuple[Any, ...]]]:
    """A single plain lower layer and operations."""
    flag = draw(st.booleans())
    return [draw(BOTTOM[flag])], draw(OPS[flag])


@st.composite
def three_lowers(draw: st.DrawFn) -> tuple[list[list[LayerEntry]], list[tuple[Any, ...]]]:
    """Three image-like lower layers (the upper two with whiteouts and opaque dirs) and ops."""
    flag = draw(st.booleans())
    layers = [draw(IMAGE[flag]), draw(IMAGE[flag]), draw(BOTTOM[flag])]
    return layers, draw(OPS[flag])


PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(one_lower())
def test_one_lower_matches_oracle(
    example: tuple[list[list[LayerEntry]], list[tuple[Any, ...]]],
) -> None:
    """With one lower layer, compute() equals the two-tree oracle, on overlay and aufs format."""
    check(*example)


@PROPERTY
@given(three_lowers())
def test_three_lowers_match_oracle(
    example: tuple[list[list[LayerEntry]], list[tuple[Any, ...]]],
) -> None:
    """Over three layers holding whiteouts and opaque dirs, compute() equals the oracle."""
    check(*example)


@PROPERTY
@given(three_lowers())
def test_redirect_and_metacopy_match_oracle(
    example: tuple[list[list[LayerEntry]], list[tuple[Any, ...]]],
) -> None:
    """With redirect_dir=on and metacopy=on (renamed lower dirs, metadata-only copy-ups)."""
    check(*example, options="redirect_dir=on,metacopy=on,index=off", aufs=False)


def test_symlink_capability_is_compared() -> None:
    """A capability set on a lower symlink (the kernel allows it) makes the symlink C."""
    lower = [LayerEntry("dir", b"x"), LayerEntry("symlink", b"x/y", data=b"a")]
    check([lower], [("setcap", b"x/y", CAPS[0])])


def test_oracle_sees_a_hidden_change() -> None:
    """The oracle reports a copy-up whose only change is the capability xattr (it can fail)."""
    entries = [LayerEntry("dir", b"d"), LayerEntry("file", b"d/a", data=b"x")]
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lw-prop-"))
        lower = os.path.join(tmp, "l0")
        os.mkdir(lower)
        build_layer(lower, entries)
        ovl = stack.enter_context(mount_overlay(tmp, [lower]))
        apply(os.fsencode(ovl.merged), ("setcap", b"d/a", CAPS[0]))
        assert changes_dirs(ovl.merged, lower) == [(b"/d", "C"), (b"/d/a", "C")]
