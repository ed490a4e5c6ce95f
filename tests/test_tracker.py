"""The live tracker on real overlay mounts: focused scenarios.

Each test mounts a fresh overlay over the conformance lower tree, runs a tracker through a
real inotify instance and hub (``live.LiveMount``), does something in the merged view, calls
the sync barrier and checks the list (against ``compute``) and the published events.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import OverlayFactory, load_cases
from live import LiveMount, as_list, replay
from overlay import Overlay, mount_overlay, requires_overlay, run_ops

from watcher.core.model import Control, Item, Kind, Op, Transition
from watcher.core.native import ENV_PURE_PYTHON
from watcher.core.rules import Child, DirState, Rules, compute
from watcher.delivery.events import RESYNC, SNAPSHOT_BEGIN, SNAPSHOT_END
from watcher.live.hub import Hub
from watcher.live.inotify import Inotify
from watcher.live.source import FANOTIFY, INOTIFY

pytestmark = [requires_overlay, pytest.mark.root]

CASES = load_cases()


@pytest.fixture
def ovl(overlay_factory: OverlayFactory, lower: str) -> Overlay:
    """A fresh overlay over the conformance lower tree (unmounted at the end)."""
    return overlay_factory([lower])


@pytest.fixture(params=[INOTIFY, FANOTIFY, "fanotify+attribution", "fanotify+inode"])
async def live(ovl: Overlay, request: pytest.FixtureRequest) -> AsyncIterator[LiveMount]:
    """A started tracker on ``ovl``, fed by each source in turn (fanotify also with
    attribution on, and with one inode mark per directory); stopped at the end."""
    source, _, variant = str(request.param).partition("+")
    mount = LiveMount(
        "m",
        ovl.upper,
        ovl.lowers,
        source=source,
        attribution=variant == "attribution",
        marks="inode" if variant == "inode" else "filesystem",
    )
    await mount.start()
    yield mount
    await mount.stop()


def _batches_since(live: LiveMount, index: int) -> list[list[Item]]:
    """The batches published from ``live.batches[index]`` on."""
    return live.batches[index:]


def _transitions(batches: list[list[Item]]) -> list[Transition]:
    return [i for b in batches for i in b if isinstance(i, Transition)]


def _w(path: str, data: bytes = b"x", mode: str = "wb") -> None:
    with open(path, mode) as fh:
        fh.write(data)


async def test_snapshot_on_start(ovl: Overlay) -> None:
    """Start emits snapshot.begin, every existing entry (op snapshot), then snapshot.end."""
    run_ops(ovl.merged, "echo more >> data/file1; rm data/file2; mkdir -p n/a; echo z > n/a/z")
    live = LiveMount("m", ovl.upper, ovl.lowers)
    await live.start()
    try:
        items = live.items
        assert isinstance(items[0], Control)
        assert live.controls()[0].type == SNAPSHOT_BEGIN
        end = live.controls()[-1]
        assert end.type == SNAPSHOT_END
        entries = [i for i in items if isinstance(i, Transition)]
        assert all(t.op is Op.SNAPSHOT and t.prev_kind is None for t in entries)
        want = compute(ovl.upper, ovl.lowers)
        assert [(t.path, t.kind) for t in entries] == [(c.path, c.kind) for c in want]
        assert end.data["count"] == len(want) == 6
        assert next(t for t in entries if t.path == b"/data/file2").stat is None  # D: no stat
        live.check()
    finally:
        await live.stop()


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
async def test_conformance_case_live(case: dict[str, Any], live: LiveMount, ovl: Overlay) -> None:
    """Each conformance case applied live gives compute()'s list, and Docker's answer."""
    run_ops(ovl.merged, case["ops"])
    await live.sync()
    got = live.check()
    assert {f"{c.kind.value} {os.fsdecode(c.path)}" for c in got} == set(case["expect"])


async def test_second_write_is_activity(live: LiveMount, ovl: Overlay) -> None:
    """A second write to a listed file yields kind == prev_kind with op modify."""
    _w(os.path.join(ovl.merged, "data/new"), b"1")
    await live.sync()
    mark = len(live.batches)
    _w(os.path.join(ovl.merged, "data/new"), b"2", "ab")
    await live.sync()
    mine = [t for t in _transitions(_batches_since(live, mark)) if t.path == b"/data/new"]
    assert [(t.kind, t.prev_kind, t.op) for t in mine] == [(Kind.ADDED, Kind.ADDED, Op.MODIFY)]
    assert mine[0].stat is not None
    assert mine[0].stat.st_size == 2
    live.check()


async def test_rename_over_is_activity(live: LiveMount, ovl: Overlay) -> None:
    """An editor's save (write a temp file, rename it over a listed file) is reported."""
    target = os.path.join(ovl.merged, "data/file1")
    _w(target, b"first")
    await live.sync()
    mark = len(live.batches)
    _w(target + ".tmp", b"second")
    os.rename(target + ".tmp", target)
    await live.sync()
    mine = [t for t in _transitions(_batches_since(live, mark)) if t.path == b"/data/file1"]
    assert [(t.kind, t.prev_kind) for t in mine] == [(Kind.CHANGED, Kind.CHANGED)]
    live.check()


async def test_one_item_per_path_per_drain(live: LiveMount, ovl: Overlay) -> None:
    """A directory moved away and back in one drain yields at most one item per path."""
    run_ops(ovl.merged, "mkdir -p n/a/b && echo 1 > n/a/b/f && echo 2 > n/g")
    await live.sync()
    mark = len(live.batches)
    os.rename(os.path.join(ovl.merged, "n"), os.path.join(ovl.merged, "m"))
    os.rename(os.path.join(ovl.merged, "m"), os.path.join(ovl.merged, "n"))
    await live.sync()
    for batch in _batches_since(live, mark):
        paths = [t.path for t in batch if isinstance(t, Transition)]
        assert len(paths) == len(set(paths)), f"a path twice in one drain: {batch}"
        assert all(t.kind == t.prev_kind for t in batch if isinstance(t, Transition))
    live.check()


async def test_chmod_of_a_new_subdirectory_is_one_event(live: LiveMount, ovl: Overlay) -> None:
    """chmod of a directory inside a new tree reports that directory only, not its subtree."""
    run_ops(ovl.merged, "mkdir -p n/a/b && echo 1 > n/a/b/f && echo 2 > n/a/g")
    await live.sync()
    mark = len(live.batches)
    os.chmod(os.path.join(ovl.merged, "n/a"), 0o700)
    await live.sync()
    got = [(t.path, t.kind, t.prev_kind, t.op) for t in _transitions(live.batches[mark:])]
    assert got == [(b"/n/a", Kind.ADDED, Kind.ADDED, Op.ATTRIB)]
    live.check()


async def test_restart_reports_what_changed_while_stopped(ovl: Overlay) -> None:
    """start(persisted) emits resync(restart), only the real transitions, then a snapshot."""
    first = LiveMount("m", ovl.upper, ovl.lowers)
    await first.start()
    run_ops(ovl.merged, "echo 1 > data/new; mkdir -p n/a; echo 2 > n/a/f; rm data/file2")
    await first.sync()
    persisted = dict(first.tracker.kinds)
    await first.stop()

    run_ops(ovl.merged, "rm -rf n; echo 3 > data/other; chmod 600 data/file1")
    second = LiveMount("m", ovl.upper, ovl.lowers)
    await second.start(persisted)
    try:
        items = second.items
        assert isinstance(items[0], Control)
        assert second.controls()[0].type == RESYNC
        assert second.controls()[0].data == {"mount": "m", "reason": "restart"}
        begin = next(i for i, x in enumerate(items) if x in second.controls(SNAPSHOT_BEGIN))
        moves = {(t.path, t.kind, t.prev_kind) for t in items[1:begin] if isinstance(t, Transition)}
        assert moves == {
            (b"/n", None, Kind.ADDED),
            (b"/n/a", None, Kind.ADDED),
            (b"/n/a/f", None, Kind.ADDED),
            (b"/data/other", Kind.ADDED, None),
            (b"/data/file1", Kind.CHANGED, None),
        }
        assert all(t.op is Op.RESCAN for t in items[1:begin] if isinstance(t, Transition))
        # A consumer that kept the first run's list and applies only the transitions agrees.
        kept = dict(persisted)
        for t in items[1:begin]:
            if isinstance(t, Transition):
                assert kept.get(t.path) == t.prev_kind
                if t.kind is None:
                    kept.pop(t.path)
                else:
                    kept[t.path] = t.kind
        assert as_list(kept) == compute(ovl.upper, ovl.lowers)
        second.check()
    finally:
        await second.stop()


async def test_restart_misses_no_write_made_right_after_a_directory_is_listed(
    ovl: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart's rescan watches each directory before it lists it: a file made in a
    directory just after its listing (a writer racing the scan) reaches the list. (``scan``
    is wrapped on the class: the first scan makes rules of its own, ``Tracker.start``.)"""
    first = LiveMount("m", ovl.upper, ovl.lowers)
    await first.start()
    run_ops(ovl.merged, "mkdir -p busy/deep; echo 1 > busy/deep/old")
    await first.sync()
    persisted = dict(first.tracker.kinds)
    await first.stop()

    second = LiveMount("m", ovl.upper, ovl.lowers)
    listed = Rules.scan

    def scan_then_write(
        rules: Rules, directory: bytes, state: DirState, *, stats: bool = True
    ) -> list[Child]:
        children = listed(rules, directory, state, stats=stats)
        if directory == b"/busy/deep":
            with open(os.path.join(ovl.merged, "busy/deep/raced"), "w") as f:
                f.write("made between the listing and the end of the scan")
        return children

    monkeypatch.setattr(Rules, "scan", scan_then_write)
    await second.start(persisted)
    monkeypatch.undo()
    try:
        await second.sync()
        assert (b"/busy/deep/raced", Kind.ADDED) in second.tracker.changes()
        second.check()
    finally:
        await second.stop()


class _VanishingScandir:
    """``os.scandir`` whose iterator removes the entry named ``victim`` right after listing
    it, before the caller reads it (a writer unlinking a file while a scan lists its dir)."""

    def __init__(self, real: Callable[..., Any], victim: bytes) -> None:
        self.real, self.victim, self.vanished = real, victim, 0

    def __call__(self, path: Any) -> Any:
        scan = self

        class _It:
            def __init__(self) -> None:
                self.it = scan.real(path)

            def __enter__(self) -> _It:
                return self

            def __exit__(self, *exc: object) -> None:
                self.it.close()

            def __iter__(self) -> _It:
                return self

            def __next__(self) -> os.DirEntry[bytes]:
                entry: os.DirEntry[bytes] = next(self.it)
                if entry.name == scan.victim:
                    os.unlink(entry.path)
                    scan.vanished += 1
                return entry

        return _It()


def test_a_file_removed_while_its_directory_is_listed_is_absent_not_fatal(
    ovl: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute() lists a directory whose file vanishes between the listing and its lstat:
    the file is absent and every other entry is there (the scan does not give up).

    The Python scan: ``os.scandir`` is what the test intercepts. The C scan skips such a name
    the same way (ENOENT from its ``fstatat``); no test can race it from here."""
    monkeypatch.setenv(ENV_PURE_PYTHON, "1")
    run_ops(ovl.merged, "echo 1 > data/keep; echo 2 > data/victim")  # data/ is in B
    vanishing = _VanishingScandir(os.scandir, b"victim")
    monkeypatch.setattr(os, "scandir", vanishing)
    got = compute(ovl.upper, ovl.lowers)
    monkeypatch.undo()
    assert vanishing.vanished == 1
    assert got == compute(ovl.upper, ovl.lowers)
    assert (b"/data/keep", Kind.ADDED) in got


async def test_restart_keeps_a_directory_whose_file_vanished_during_the_scan(
    ovl: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart's rescan meets a file removed while its directory is listed: the other
    entries of that directory stay in the list (found by the soak: a whole directory's
    entries went missing for good). The Python scan, as in the test above."""
    monkeypatch.setenv(ENV_PURE_PYTHON, "1")
    first = LiveMount("m", ovl.upper, ovl.lowers)
    await first.start()
    run_ops(ovl.merged, "echo 1 > data/keep; echo 2 > data/victim")  # data/ is in B
    await first.sync()
    persisted = dict(first.tracker.kinds)
    await first.stop()
    run_ops(ovl.merged, "echo 3 > data/new")  # made while stopped: only a scan finds it
    second = LiveMount("m", ovl.upper, ovl.lowers)
    vanishing = _VanishingScandir(os.scandir, b"victim")
    monkeypatch.setattr(os, "scandir", vanishing)
    try:
        await second.start(persisted)
        monkeypatch.undo()
        await second.sync()
        assert vanishing.vanished == 1
        assert (b"/data/new", Kind.ADDED) in second.tracker.changes()
        second.check()
    finally:
        monkeypatch.undo()
        await second.stop()


def _tree(root: str) -> list[tuple[str, int, int]]:
    """Every name under ``root`` with its mtime and inode (what a write would disturb)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_mtime_ns, st.st_ino))
    st = os.lstat(root)
    out.append((root, st.st_mtime_ns, st.st_ino))
    return sorted(out)


async def test_sync_never_writes_in_upper(live: LiveMount, ovl: Overlay) -> None:
    """The sync barrier's cookies live outside U: syncing leaves U untouched."""
    run_ops(ovl.merged, "mkdir -p n/a; echo 1 > n/a/f; echo 2 >> data/file1")
    await live.sync()
    before = _tree(ovl.upper)
    mark = len(live.items)
    for _ in range(20):
        await live.sync()
    assert _tree(ovl.upper) == before
    assert live.items[mark:] == []
    assert not os.fsdecode(live.hub._sync_dir).startswith(ovl.upper)


async def test_non_utf8_directory_names(live: LiveMount, ovl: Overlay) -> None:
    """Directories and files with non-UTF-8 names and newlines are watched and listed."""
    merged = os.fsencode(ovl.merged)
    odd = os.path.join(merged, b"\xff\xfe dir")
    os.makedirs(os.path.join(odd, b"new\nline"))
    _w(os.fsdecode(os.path.join(odd, b"new\nline", b"\x80f")), b"1")
    await live.sync()
    live.check()
    # A write inside the watched non-UTF-8 directory is seen (its watch works).
    _w(os.fsdecode(os.path.join(odd, b"new\nline", b"\x81g")), b"2")
    await live.sync()
    assert (b"/\xff\xfe dir/new\nline/\x81g", Kind.ADDED) in live.check()
    os.rename(odd, os.path.join(merged, b"data", b"\xc3("))
    await live.sync()
    got = live.check()
    assert (b"/data/\xc3(/new\nline/\x81g", Kind.ADDED) in got
    assert all(not c.path.startswith(b"/\xff\xfe") for c in got)


async def test_events_valid_against_schema(live: LiveMount, ovl: Overlay) -> None:
    """Every published event, encoded, is valid against the published JSON Schemas."""
    jsonschema = pytest.importorskip("jsonschema")
    orjson = pytest.importorskip("orjson")
    try:
        from watcher.delivery.schemas import schema_for
    except ImportError:
        pytest.skip("watcher.delivery.schemas.schema_for is not there yet")
    from watcher.delivery.publisher import Publisher

    run_ops(
        ovl.merged,
        "echo 1 >> data/file1; rm -rf data/sub; mkdir -p n/a; mkfifo n/p; ln -s x n/l;"
        " chmod 600 data/dir2/c; echo 2 >> data/file1",
    )
    os.mkdir(os.path.join(os.fsencode(ovl.merged), b"\xff"))
    await live.sync()
    await live._publish(live.tracker.mount, live.tracker.resync("overflow"))
    publisher = Publisher(lambda records, lists: _noop(), host="h")
    records = publisher.encode("m", live.items)
    assert {r.type for r in records} >= {"io.layerwatch.change", RESYNC, SNAPSHOT_BEGIN}
    envelope = schema_for("envelope")
    for record in records:
        event = orjson.loads(record.body)
        jsonschema.validate(event, envelope)
        jsonschema.validate(event["data"], schema_for(record.type))
    assert as_list(replay(live.items)) == compute(ovl.upper, ovl.lowers)


async def _noop() -> None:
    return None


async def test_deletes_say_whiteout_or_opaque(live: LiveMount, ovl: Overlay) -> None:
    """A deleted lower file comes out as op whiteout; names hidden by an opaque dir as opaque."""
    mark = len(live.batches)
    run_ops(ovl.merged, "rm data/file1")
    await live.sync()
    run_ops(ovl.merged, "rm -rf data/sub && mkdir data/sub")
    await live.sync()
    ops = {
        t.path: t.op
        for t in _transitions(_batches_since(live, mark))
        if t.kind is Kind.DELETED and t.prev_kind is None
    }
    assert ops[b"/data/file1"] is Op.WHITEOUT
    assert ops[b"/data/sub/a"] is Op.OPAQUE
    assert ops[b"/data/sub/deep"] is Op.OPAQUE
    live.check()


async def test_a_failing_reconcile_degrades_then_resyncs(
    ovl: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while reconciling (injected: no real disk fails on demand) degrades the
    mount instead of stopping the hub; a resync recovers it, and nothing is lost."""
    mount = LiveMount("m", ovl.upper, ovl.lowers, rescan_interval=0.1)
    await mount.start()
    try:
        real_child = mount.tracker.rules.child
        failures = iter([OSError(errno.EIO, "injected I/O error")])

        def child(parent: bytes, state: DirState, name: bytes) -> Child:
            error = next(failures, None)
            if error is not None:
                raise error
            return real_child(parent, state, name)

        monkeypatch.setattr(mount.tracker.rules, "child", child)
        with structlog.testing.capture_logs() as logs:
            run_ops(ovl.merged, "echo new > data/new")
            async with asyncio.timeout(10):  # recovered by the next rescan tick (0.1 s)
                while not mount.controls(RESYNC):  # noqa: ASYNC110 (the hub's own tick)
                    await asyncio.sleep(0.02)
            run_ops(ovl.merged, "echo more >> data/file2")
            await mount.sync()
        assert mount.tracker.degraded is None
        assert any(e["event"] == "tracker_failed" and e["mount"] == "m" for e in logs)
        resyncs = [c.data["reason"] for c in mount.controls(RESYNC)]
        assert resyncs == ["error"]
        await mount.sync()
        mount.check()  # list == compute, and the replay (with the snapshot) == compute
    finally:
        await mount.stop()


def test_a_new_hub_removes_sync_dirs_of_dead_processes(tmp_path: Path) -> None:
    """Sync directories left by a killed run (its pid gone) are removed when a hub starts."""
    dead = 2**22 + 7  # above pid_max's default ceiling: no such process
    stale = Path(tempfile.gettempdir()) / f"layerwatch-sync-{dead}-left"
    stale.mkdir(exist_ok=True)
    with Inotify() as inotify:
        hub = Hub(inotify, _ignore)
        try:
            assert not stale.exists()
        finally:
            hub.close()


async def _ignore(mount: str, items: list[Item]) -> None:
    """A publish that drops everything."""


# -- a branch replaced under the tracker ------------------------------------------------------


@dataclass
class Branch:
    """A started tracker on ``base/upper`` (no overlay yet: the test mounts its own)."""

    base: str
    upper: str
    lower: str
    live: LiveMount

    def mount(self) -> contextlib.AbstractContextManager[Overlay]:
        """Mount an overlay of the lower under ``base/upper`` (at ``base/merged``)."""
        return mount_overlay(self.base, [self.lower])

    def reasons(self) -> list[str]:
        """The reasons of the resyncs published so far."""
        return [str(c.data["reason"]) for c in self.live.controls(RESYNC)]


@pytest.fixture(params=[INOTIFY, FANOTIFY])
async def branch(
    tmp_path: Path, lower: str, request: pytest.FixtureRequest
) -> AsyncIterator[Branch]:
    """A tracker on an upper dir whose overlay the test mounts (and replaces) itself, fed by
    each source in turn."""
    base = tmp_path / "branch"
    (base / "upper").mkdir(parents=True)
    live = LiveMount("m", str(base / "upper"), [lower], rescan_interval=0.1, source=request.param)
    await live.start()
    try:
        yield Branch(str(base), str(base / "upper"), lower, live)
    finally:
        await live.stop()


async def test_upper_removed_and_made_again_is_followed(branch: Branch) -> None:
    """``rm -rf U && mkdir U``: a resync (reason branch_replaced) and a snapshot of the new
    branch; its files, whiteouts and opaque dirs, and later writes, are all followed."""
    live = branch.live
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 1 > data/new; rm data/file1")
        await live.sync()
        live.check()
    run_ops(branch.base, "rm -rf upper && mkdir upper")
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 2 > fresh; rm data/file2; rm -rf data/sub; mkdir data/sub")
        await live.sync()
        got = live.check()
        assert (b"/fresh", Kind.ADDED) in got
        assert (b"/data/file2", Kind.DELETED) in got
        assert (b"/data/new", Kind.ADDED) not in got
        assert branch.reasons() == ["branch_replaced"]
        run_ops(ovl.merged, "echo 3 > data/later")  # the new branch is watched
        await live.sync()
        assert (b"/data/later", Kind.ADDED) in live.check()
    assert branch.reasons() == ["branch_replaced"]
    assert live.tracker.degraded is None


async def test_upper_moved_away_and_made_again_drops_the_old_one(branch: Branch) -> None:
    """``mv U U.old && mkdir U``: the new branch is followed (resync branch_replaced); writes
    that still reach U.old through the old watches are not reported as changes of U."""
    live = branch.live
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 1 > data/new")
        await live.sync()
        run_ops(branch.base, "mv upper upper.old")
        run_ops(ovl.merged, "echo ghost > ghost; echo more >> data/new; rm data/file1")
        os.mkdir(branch.upper)
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 2 > fresh; rm data/file2")
        await live.sync()
        got = live.check()
        assert (b"/fresh", Kind.ADDED) in got
        assert branch.reasons() == ["branch_replaced"]
        run_ops(branch.base, "echo late > upper.old/late; rm upper.old/data/new")
        run_ops(ovl.merged, "echo 3 > data/later")
        await live.sync()
        assert (b"/data/later", Kind.ADDED) in live.check()
    old_only = {b"/ghost", b"/late", b"/data/file1"}
    assert not [t for t in live.transitions() if t.path in old_only and t.op is not Op.SNAPSHOT]
    assert branch.reasons() == ["branch_replaced"]


async def test_upper_missing_for_a_while_degrades_then_recovers(branch: Branch) -> None:
    """U gone: degraded with the reason (a warning), nothing reported from U's old inode;
    U back: recovered on the rescan tick, without a sync, by a resync branch_replaced."""
    live = branch.live
    with structlog.testing.capture_logs() as logs:
        with branch.mount() as ovl:
            run_ops(ovl.merged, "echo 1 > data/new")
            await live.sync()
            run_ops(branch.base, "mv upper upper.gone")
            await live.sync()
            degraded = live.tracker.degraded
            assert degraded is not None
            assert degraded.reason == "branch_missing"
            assert branch.upper in str(degraded)
            run_ops(ovl.merged, "echo 2 > data/while")  # into upper.gone
            await live.sync()
            assert live.tracker.degraded == degraded
        assert not [t for t in live.transitions() if t.path == b"/data/while"]
        os.mkdir(branch.upper)
        with branch.mount() as ovl:
            run_ops(ovl.merged, "echo 3 > back")
            async with asyncio.timeout(10):  # the rescan tick (0.1 s) finds U again
                while not live.controls(RESYNC):  # noqa: ASYNC110 (the hub's own tick)
                    await asyncio.sleep(0.02)
            await live.sync()
            assert (b"/back", Kind.ADDED) in live.check()
    assert live.tracker.degraded is None
    assert branch.reasons() == ["branch_replaced"]
    missing = [e for e in logs if e["event"] == "branch_missing"]
    assert len(missing) == 1
    assert missing[0]["log_level"] == "warning"
    assert missing[0]["mount"] == "m"
    assert any(e["event"] == "branch_replaced" for e in logs)


async def test_parent_renamed_and_upper_made_again_is_followed(branch: Branch) -> None:
    """U's parent renamed (no event on U itself) and a new U made: the next drain finds U's
    path leading elsewhere, so the old branch's writes are not reported as hints of U."""
    live = branch.live
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 1 > data/new; echo 2 > gone")
        await live.sync()
    old = branch.base + ".old"
    os.rename(branch.base, old)
    os.makedirs(branch.upper)
    mark = len(live.items)
    run_ops(old, "echo ghost > upper/ghost; rm upper/gone; echo more >> upper/data/new")
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 3 > fresh")
        await live.sync()
        got = live.check()
    assert (b"/fresh", Kind.ADDED) in got
    assert branch.reasons() == ["branch_replaced"]
    ops = {t.op for t in live.items[mark:] if isinstance(t, Transition)}
    assert ops <= {Op.RESCAN, Op.SNAPSHOT}, "a hint from the old branch was reported"
    assert not [t for t in live.transitions() if t.path == b"/ghost"]


async def test_upper_made_again_with_the_old_inode_number_is_a_new_branch(branch: Branch) -> None:
    """A new U that got the old U's inode number (ext4 gives a freed number to the next mkdir)
    is still a new branch: the old root's deletion says so, whatever lstat says."""
    live = branch.live
    old = os.lstat(branch.upper)
    os.rmdir(branch.upper)
    os.mkdir(branch.upper)
    new = os.lstat(branch.upper)
    if (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
        pytest.skip("this filesystem gave the new directory another inode number")
    with branch.mount() as ovl:
        run_ops(ovl.merged, "echo 1 > fresh; rm data/file1")
        await live.sync()
        got = live.check()
    assert (b"/fresh", Kind.ADDED) in got
    assert branch.reasons() == ["branch_replaced"]
