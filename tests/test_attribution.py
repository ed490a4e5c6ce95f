"""Attribution: change events name the process that made them (fanotify, real processes).

Each test mounts a real overlay over the conformance lower tree, follows it through a fanotify
group with pidfds (``live.LiveMount(source="fanotify", attribution=True)``) and runs writers
as real processes: a copy of ``/bin/sh`` named ``lw-writer`` (its ``comm``), started in the
merged root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import OverlayFactory
from jsonschema import validate
from live import LiveMount
from overlay import Overlay, requires_overlay

from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import EventEncoder, container_of
from watcher.delivery.schemas import schema_for
from watcher.live.source import FANOTIFY

pytestmark = [requires_overlay, pytest.mark.root]


@pytest.fixture
def ovl(overlay_factory: OverlayFactory, lower: str) -> Overlay:
    """A fresh overlay over the conformance lower tree."""
    return overlay_factory([lower])


@pytest.fixture
async def live(ovl: Overlay) -> AsyncIterator[LiveMount]:
    """A started tracker on ``ovl`` with attribution on."""
    mount = LiveMount("m", ovl.upper, ovl.lowers, source=FANOTIFY, attribution=True)
    await mount.start()
    yield mount
    await mount.stop()


@pytest.fixture
def writer(tmp_path: Path) -> str:
    """A shell whose executable, hence ``comm``, is named ``lw-writer``."""
    path = tmp_path / "bin" / "lw-writer"
    path.parent.mkdir()
    shutil.copy("/bin/sh", path)
    return str(path)


async def _run_then_hold(live: LiveMount, program: list[str], merged: str) -> int:
    """Run ``program``, which writes, prints a line, then waits for stdin, until the hub has
    read its events (``/proc`` is read when an event is read, so the writer must still be
    there); returns its pid."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*program, cwd=merged, stdin=pipe, stdout=pipe)
    try:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"written\n"
        await live.sync()
    finally:
        proc.kill()
        await proc.wait()
    return proc.pid


def _sh(writer: str, script: str) -> list[str]:
    """``script`` in the shell ``writer``, then a wait for stdin (``read`` is a builtin)."""
    return [writer, "-c", f"{script}; echo written; read x"]


def _last(live: LiveMount, path: bytes) -> Transition:
    return [t for t in live.transitions() if t.path == path][-1]


async def test_the_writer_is_named_in_its_events(
    live: LiveMount, ovl: Overlay, writer: str
) -> None:
    """A new file, and a lower file written through the merged view (copied up by the kernel
    on the writer's behalf): both transitions name ``lw-writer``, its pid, exe and ids."""
    script = "echo new > n.txt; echo 1 >> data/file1"  # builtins: the shell itself writes
    pid = await _run_then_hold(live, _sh(writer, script), ovl.merged)
    for path, kind in ((b"/n.txt", Kind.ADDED), (b"/data/file1", Kind.CHANGED)):
        transition = _last(live, path)
        assert transition.kind is kind
        assert transition.process is not None, path
        assert transition.process["pid"] == pid
        assert transition.process["comm"] == "lw-writer"
        assert transition.process["exe"] == writer
        assert (transition.process["uid"], transition.process["gid"]) == (0, 0)
    live.check()


async def test_a_created_directory_s_contents_name_its_maker(
    live: LiveMount, ovl: Overlay, tmp_path: Path
) -> None:
    """Entries found by scanning a new directory carry the process that made the directory
    (one process makes it all: a Python named ``lw-maker`` through a symlink, which names its
    ``comm``)."""
    maker = tmp_path / "lw-maker"
    maker.symlink_to(sys.executable)
    script = (
        "import os, sys; os.makedirs('t/u'); open('t/u/f', 'w').write('x');"
        " print('written', flush=True); sys.stdin.read()"
    )
    pid = await _run_then_hold(live, [str(maker), "-c", script], ovl.merged)
    for path in (b"/t", b"/t/u", b"/t/u/f"):
        transition = _last(live, path)
        assert transition.process is not None, path
        assert transition.process["pid"] == pid
        assert transition.process["comm"] == "lw-maker"
    live.check()


async def test_a_writer_that_exits_at_once_still_yields_its_event(
    live: LiveMount, ovl: Overlay, writer: str
) -> None:
    """The writer is gone before its event is read: the event comes, with its pid."""
    proc = await asyncio.create_subprocess_exec(writer, "-c", "echo x > gone.txt", cwd=ovl.merged)
    assert await proc.wait() == 0
    await live.sync()
    transition = _last(live, b"/gone.txt")
    assert transition.kind is Kind.ADDED
    assert transition.process is not None
    assert transition.process["pid"] == proc.pid
    live.check()


async def test_rescans_and_snapshots_carry_no_process(live: LiveMount, ovl: Overlay) -> None:
    """Only a transition a hint caused is attributed; a resync's rescan names nobody."""
    with open(os.path.join(ovl.upper, "direct"), "wb") as f:  # noqa: ASYNC230
        f.write(b"x")
    await live.sync()
    await live._publish("m", live.tracker.resync("overflow"))
    snapshot = [t for t in live.transitions() if t.op in (Op.SNAPSHOT, Op.RESCAN)]
    assert snapshot
    assert all(t.process is None for t in snapshot)


async def test_attribution_off_for_a_mount_names_nobody(ovl: Overlay, writer: str) -> None:
    """A group with pidfds, but the mount's attribution off: no process on its events."""
    live = LiveMount("m", ovl.upper, ovl.lowers, source=FANOTIFY, attribution=True)
    live.tracker.attribution = False
    await live.start()
    try:
        await _run_then_hold(live, _sh(writer, "echo new > n.txt"), ovl.merged)
        assert _last(live, b"/n.txt").process is None
    finally:
        await live.stop()


def test_encoded_process_is_valid_and_names_the_container_only_by_its_cgroup() -> None:
    """``data.process``: the schema holds, nulls included; the container is the mount's
    discovered container only when the writer's cgroup path names its id."""
    cid = "0123456789ab" * 5 + "cdef"
    st = os.lstat("/")
    encoder = EventEncoder(stream="s", host="h", epoch=1)
    labels = {"runtime": "docker", "container_id": cid}
    inside: dict[str, Any] = {"pid": 7, "comm": "sh", "exe": "/bin/sh", "uid": 0, "gid": 0}
    cases: list[tuple[dict[str, Any], dict[str, str] | None, str | None]] = [
        ({**inside, "cgroup": f"/system.slice/docker-{cid}.scope"}, labels, cid),
        ({**inside, "cgroup": "/user.slice"}, labels, None),  # a host process
        ({**inside, "cgroup": f"/docker/{cid}"}, None, None),  # not a discovered mount
        (
            {"pid": 9, "comm": None, "exe": None, "uid": None, "gid": None, "cgroup": None},
            labels,
            None,
        ),
    ]
    for process, given, want in cases:
        transition = Transition(b"/f", Kind.ADDED, None, Op.CREATE, st, process)
        assert container_of(transition, given) == want
        record = encoder.change(1, "m", transition, now=0.0, labels=given)
        data = orjson.loads(record.body)["data"]
        validate(data, schema_for("io.layerwatch.change"))
        assert data["process"] == {**process, "container": want}
    plain = encoder.change(1, "m", Transition(b"/f", Kind.ADDED, None, Op.CREATE, st), now=0.0)
    assert "process" not in orjson.loads(plain.body)["data"]
