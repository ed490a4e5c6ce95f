"""Stateful property: the live tracker stays equal to a full recomputation.

A Hypothesis state machine mounts a real overlay (over the conformance lower tree, or over
three drawn image-like layers holding whiteouts and opaque directories), starts a tracker on
it through a real inotify instance and hub, and then runs random operations through the
merged view: writes, truncates, chmod/chown/touch, ``mkdir -p`` with files written at once,
``rm -rf`` of copied-up trees, renames of files and directories across directories (``mv``
copies lower directories), type replacements, whiteouts and re-creations, symlinks, hard
links, fifos, non-UTF-8 names and names with a newline, and bursts of operations with no
sync in between. After each step it calls the sync barrier and checks (a) the incremental
list equals ``compute()`` and (b) replaying every published event from empty gives the same
list, each event's ``prev_kind`` agreeing with the consumer's state (``live.replay``).

Operations the kernel refuses are no-ops, as they are for a shell user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Any, ClassVar

import pytest
from conftest import load_cases
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from live import LiveMount
from overlay import (
    LayerEntry,
    build_layer,
    build_lower,
    mount_overlay,
    placeable,
    requires_overlay,
)

from watcher.core.excludes import Excludes
from watcher.live.source import FANOTIFY, INOTIFY

pytestmark = [requires_overlay, pytest.mark.root]

LOWER_MTIME = 1_700_000_000
SECOND = 1_000_000_000
ODD = (b"\xff\xfe", b"new\nline")
"""A non-UTF-8 name and a name with a newline: both are real names (rule 12)."""

CASES_POOL: tuple[bytes, ...] = (
    *(os.fsencode(e["path"]) for e in load_cases()["lower"]["entries"]),
    b"data/new",
    b"data/sub/" + ODD[0],
    b"data/" + ODD[1],
    b"data/rdir/inner/n",
    b"n",
    b"n/a",
    b"n/a/b",
    b"data/sub/deep/" + ODD[0],
)
"""Paths over the conformance lower: its entries plus new names at several depths."""

LEVEL1 = (b"d", b"e", ODD[0])
LEVEL2 = (b"a", ODD[1])
LEVEL3 = (b"x", b"y")
STACK_POOL: tuple[bytes, ...] = (
    *LEVEL1,
    *(a + b"/" + b for a in LEVEL1 for b in LEVEL2),
    *(a + b"/" + b + b"/" + c for a in LEVEL1 for b in LEVEL2 for c in LEVEL3),
)
"""Paths over the drawn three-layer stack (depth 1 to 3)."""

DATA = (b"", b"x", b"hello\n")
MTIMES_NS = (LOWER_MTIME * SECOND, LOWER_MTIME * SECOND + 500, (LOWER_MTIME + 7) * SECOND)
MODES = (0o644, 0o600, 0o755)
OWNERS = ((0, 0), (1000, 1000))


def _rm_rf(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def apply(merged: bytes, op: tuple[Any, ...]) -> None:
    """Run one operation in the merged root; a refusal by the kernel is a no-op.

    Symlink targets are relative names in the same directory, so following one never leaves
    the mount.
    """
    name, *args = op
    path = os.path.join(merged, args[0])
    try:
        if name == "write":  # O_NONBLOCK: a fifo without a reader refuses (ENXIO), never blocks
            flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
            fd = os.open(path, flags | (os.O_APPEND if args[2] else os.O_TRUNC), 0o644)
            try:
                os.write(fd, args[1])
            finally:
                os.close(fd)
        elif name == "truncate":
            os.truncate(path, args[1])
        elif name == "chmod":
            if not os.path.islink(path):  # Linux cannot chmod a symlink itself
                os.chmod(path, args[1])
        elif name == "chown":
            os.lchown(path, *args[1])
        elif name == "touch":
            os.utime(path, ns=(args[1], args[1]), follow_symlinks=False)
        elif name == "mkdir_p":  # and files inside at once, before anyone could scan
            os.makedirs(path, exist_ok=True)
            for child in args[1]:
                with open(os.path.join(path, child), "xb") as fh:
                    fh.write(b"new")
        elif name == "rm_rf":
            _rm_rf(path)
        elif name == "mv":  # rename(2), or mv(1)'s copy and delete for a lower directory
            target = os.path.join(merged, args[1])
            try:
                os.rename(path, target)
            except OSError:
                subprocess.run(["mv", "-fT", path, target], capture_output=True, check=False)
        elif name == "to_file":  # replace whatever is there by a file
            _rm_rf(path)
            with open(path, "wb") as fh:
                fh.write(b"file")
        elif name == "to_dir":  # replace whatever is there by a directory with a file inside
            _rm_rf(path)
            os.mkdir(path)
            with open(os.path.join(path, b"in"), "wb") as fh:
                fh.write(b"in")
        elif name == "recreate":  # whiteout, then the same name again
            _rm_rf(path)
            with open(path, "xb") as fh:
                fh.write(args[1])
        elif name == "symlink":
            os.symlink(args[1], path)
        elif name == "link":
            os.link(os.path.join(merged, args[1]), path, follow_symlinks=False)
        elif name == "mkfifo":
            os.mkfifo(path)
        elif name == "move_in":  # a small tree from outside the mount (mv copies it in)
            with tempfile.TemporaryDirectory(prefix="lw-in-") as outside:
                src = os.path.join(os.fsencode(outside), b"t")
                os.makedirs(os.path.join(src, b"s"))
                with open(os.path.join(src, b"s", ODD[0]), "wb") as fh:
                    fh.write(b"in")
                subprocess.run(["mv", "-fT", src, path], capture_output=True, check=False)
        else:
            raise AssertionError(f"unknown op {name}")
    except OSError:
        pass


def ops(pool: tuple[bytes, ...]) -> st.SearchStrategy[tuple[Any, ...]]:
    """One operation on pool paths."""
    p = st.sampled_from(pool)
    return st.one_of(
        st.tuples(st.just("write"), p, st.sampled_from(DATA), st.booleans()),
        st.tuples(st.just("truncate"), p, st.sampled_from((0, 1, 6))),
        st.tuples(st.just("chmod"), p, st.sampled_from(MODES)),
        st.tuples(st.just("chown"), p, st.sampled_from(OWNERS)),
        st.tuples(st.just("touch"), p, st.sampled_from(MTIMES_NS)),
        st.tuples(st.just("mkdir_p"), p, st.lists(st.sampled_from((b"f", *ODD)), max_size=2)),
        st.tuples(st.just("rm_rf"), p),
        st.tuples(st.just("mv"), p, p),
        st.tuples(st.just("to_file"), p),
        st.tuples(st.just("to_dir"), p),
        st.tuples(st.just("recreate"), p, st.sampled_from(DATA)),
        st.tuples(st.just("symlink"), p, st.sampled_from((b"a", b"file1"))),
        st.tuples(st.just("link"), p, p),
        st.tuples(st.just("mkfifo"), p),
        st.tuples(st.just("move_in"), p),
    )


@st.composite
def stack_layers(draw: st.DrawFn) -> list[list[LayerEntry]]:
    """Three image-like layers, top first; the upper two may hold whiteouts and opaque dirs."""
    kinds_top = ("file", "dir", "dir", "symlink", "fifo", "whiteout", "whiteout", "opaque")
    kinds_base = ("file", "file", "dir", "dir", "symlink", "fifo")
    return [
        draw(_layer(kinds_top)),
        draw(_layer(kinds_top)),
        draw(_layer(kinds_base)),
    ]


@st.composite
def _layer(draw: st.DrawFn, kinds: tuple[str, ...]) -> list[LayerEntry]:
    chosen = draw(st.dictionaries(st.sampled_from(STACK_POOL), st.sampled_from(kinds), max_size=9))
    entries: list[LayerEntry] = []
    for path, kind in placeable(chosen):
        data = draw(st.sampled_from(DATA)) if kind in ("file", "symlink") else b""
        if kind == "symlink":
            data = data or b"a"
        mode = 0o755 if kind in ("dir", "opaque") else 0o644
        entries.append(LayerEntry(kind, path, data=data, mode=mode))
    return entries


class TrackerMachine(RuleBasedStateMachine):
    """Random operations on a live overlay; list == compute == replay after every sync."""

    lower_kind: ClassVar[str] = "cases"
    pool: ClassVar[tuple[bytes, ...]] = CASES_POOL
    exclude: ClassVar[Excludes | None] = None
    source: ClassVar[str] = INOTIFY

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.loop = asyncio.new_event_loop()
        self.stack.callback(self.loop.close)
        self.live: LiveMount | None = None
        self.merged = b""

    def _mount(self, layers: list[list[LayerEntry]] | None) -> None:
        tmp = self.stack.enter_context(tempfile.TemporaryDirectory(prefix="lw-live-"))
        lowers: list[str] = []
        if layers is None:
            lowers.append(os.path.join(tmp, "lower"))
            os.mkdir(lowers[0])
            build_lower(lowers[0], load_cases()["lower"])
        else:
            for i, entries in enumerate(layers):
                lowers.append(os.path.join(tmp, f"l{i}"))
                os.mkdir(lowers[-1])
                build_layer(lowers[-1], entries)
        ovl = self.stack.enter_context(mount_overlay(tmp, lowers))
        self.merged = os.fsencode(ovl.merged)
        live = LiveMount("prop", ovl.upper, lowers, exclude=self.exclude, source=self.source)
        self.loop.run_until_complete(live.start())
        self.stack.callback(lambda: self.loop.run_until_complete(live.stop()))
        self.live = live

    def teardown(self) -> None:
        """Stop the tracker, unmount, remove the directories, close the loop."""
        self.stack.close()

    def _do(self, op: tuple[Any, ...]) -> None:
        apply(self.merged, op)

    @invariant()
    def list_equals_compute_and_replay(self) -> None:
        """After sync(): incremental list == compute() == replay of the events."""
        if self.live is None:
            return
        self.loop.run_until_complete(self.live.sync())
        self.live.check()


class CasesLower(TrackerMachine):
    """Over the conformance lower tree."""

    @initialize()
    def mount(self) -> None:
        """Mount over the conformance lower tree and start the tracker."""
        self._mount(None)

    @rule(op=ops(CASES_POOL))
    def step(self, op: tuple[Any, ...]) -> None:
        """One operation, then the invariant."""
        self._do(op)

    @rule(burst=st.lists(ops(CASES_POOL), min_size=5, max_size=25))
    def burst(self, burst: list[tuple[Any, ...]]) -> None:
        """Many operations with no sync in between."""
        for op in burst:
            self._do(op)


class StackLower(TrackerMachine):
    """Over three drawn layers with whiteouts and opaque dirs."""

    @initialize(layers=stack_layers())
    def mount(self, layers: list[list[LayerEntry]]) -> None:
        """Mount over three drawn layers and start the tracker."""
        self._mount(layers)

    @rule(op=ops(STACK_POOL))
    def step(self, op: tuple[Any, ...]) -> None:
        """One operation, then the invariant."""
        self._do(op)

    @rule(burst=st.lists(ops(STACK_POOL), min_size=5, max_size=25))
    def burst(self, burst: list[tuple[Any, ...]]) -> None:
        """Many operations with no sync in between."""
        for op in burst:
            self._do(op)


# Each TestCase is made from a subclass of its own: settings set on a class pass to subclasses.
class CasesLowerInotify(CasesLower):
    """The machine over the conformance lower, the hints coming from inotify."""


class StackLowerInotify(StackLower):
    """The machine over a drawn stack, the hints coming from inotify."""


class CasesLowerFanotify(CasesLower):
    """The same machine, the hints coming from fanotify (a filesystem mark)."""

    source = FANOTIFY


class StackLowerFanotify(StackLower):
    """The same machine, the hints coming from fanotify (a filesystem mark)."""

    source = FANOTIFY


class ExcludedStackLower(StackLower):
    """Over three drawn layers, with excludes that cut whole subtrees, one level, and names
    at any depth: the list is compute() with the same excludes, the excluded dirs unwatched."""

    exclude = Excludes(["/d/**", "/e/a", "y"])


MACHINE = settings(
    max_examples=int(os.environ.get("LW_PROP_EXAMPLES", "80")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestExcludedStackLower = MACHINE(ExcludedStackLower).TestCase
TestExcludedStackLower.__doc__ = "With excludes, the live list equals compute with the same."
TestCasesLower = MACHINE(CasesLowerInotify).TestCase
TestCasesLower.__doc__ = "Over the conformance lower, the live list equals compute and replay."
TestStackLower = MACHINE(StackLowerInotify).TestCase
TestStackLower.__doc__ = "Over a drawn three-layer stack, the live list equals compute and replay."


TestCasesLowerFanotify = MACHINE(CasesLowerFanotify).TestCase
TestCasesLowerFanotify.__doc__ = "TestCasesLower with fanotify as the event source."
TestStackLowerFanotify = MACHINE(StackLowerFanotify).TestCase
TestStackLowerFanotify.__doc__ = "TestStackLower with fanotify as the event source."
