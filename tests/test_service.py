"""``layerwatch run`` end to end: a real overlay, the service in a subprocess, a real jsonl sink.

A consumer rebuilds each mount's change list from the jsonl file alone (dedupe by ``id``;
``snapshot.begin`` .. ``snapshot.end`` replaces the mount's state; ``kind`` null removes),
checking as it goes that every transition's ``prev_kind`` is what it holds (so no transition
is missing) and that the sequence has no hole. Whatever happens to the service (``kill -9``
mid-stream, a bad config, a missing layer, a read-only or full spool disk), the rebuilt list
must equal ``compute(upper, lowers)`` once a run ends cleanly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from overlay import LayerEntry, build_layer, mount_overlay, requires_overlay, unmount

from watcher.core.mounts import find_mount
from watcher.core.rules import compute
from watcher.delivery.events import BOOKMARK, CHANGE, RESYNC, SNAPSHOT_BEGIN, SNAPSHOT_END
from watcher.delivery.schemas import schema_for
from watcher.service.config import parse
from watcher.service.service import Service

pytestmark = requires_overlay

REPO = Path(__file__).resolve().parents[1]
STREAM = "svc"
MOUNT = "app"

Event = dict[str, Any]


def consume(events: list[Event]) -> tuple[dict[bytes, str], list[int]]:
    """The consumer: the mount's list rebuilt from events, and the distinct seqs seen.

    Raises:
        AssertionError: a transition's ``prev_kind`` is not what the consumer holds.
    """
    state: dict[bytes, str] = {}
    seen: set[str] = set()
    seqs: list[int] = []
    in_snapshot = False
    for event in events:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        seqs.append(int(event["sequence"]))
        data = event["data"]
        if event["type"] == SNAPSHOT_BEGIN and data["mount"] == MOUNT:
            state, in_snapshot = {}, True
        elif event["type"] == SNAPSHOT_END and data["mount"] == MOUNT:
            in_snapshot = False
            assert data["count"] == len(state)
        elif event["type"] == CHANGE and data["mount"] == MOUNT:
            path = data["path"].encode() if "path" in data else base64.b64decode(data["path_b64"])
            if not in_snapshot:
                held = state.get(path)
                assert held == data["prev_kind"], f"held {held}, event says {data}"
            if data["kind"] is None:
                state.pop(path, None)
            else:
                state[path] = data["kind"]
    return state, seqs


class Rig:
    """Two lower layers, an rw dir, a mountpoint, a spool dir and a jsonl file; runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top, self.base = root / "top", root / "base"
        self.rw, self.mnt = root / "rw", root / "mnt"
        self.spool_dir = root / "spool"
        self.out = root / "events.jsonl"
        self.config = root / "layerwatch.toml"
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpfs: list[Path] = []
        for d in (self.top, self.base, self.rw, self.mnt, self.spool_dir):
            d.mkdir()
        build_layer(
            str(self.base),
            [
                LayerEntry("file", b"etc/passwd", b"root:x:0:0\n"),
                LayerEntry("file", b"etc/group", b"root:x:0:\n"),
                LayerEntry("file", b"usr/lib/libc.so", b"\x7fELF"),
                LayerEntry("file", b"usr/lib/libm.so", b"\x7fELF"),
                LayerEntry("file", b"srv/data/one", b"1"),
                LayerEntry("file", b"srv/data/two", b"2"),
                LayerEntry("file", b"opt/old", b"old"),
            ],
        )
        build_layer(
            str(self.top),
            [
                LayerEntry("file", b"usr/bin/app", b"#!/bin/sh\n", mode=0o755),
                LayerEntry("whiteout", b"opt/old"),
                LayerEntry("opaque", b"srv/data"),
                LayerEntry("file", b"srv/data/three", b"3"),
            ],
        )
        self.write_config()

    def write_config(self, *, sink_extra: str = "", top_extra: str = "") -> None:
        self.config.write_text(
            f'[[mounts]]\nname = "{MOUNT}"\nlayers = ["{self.top}", "{self.base}"]\n'
            f'rw = "{self.rw}"\nmountpoint = "{self.mnt}"\n'
            f'[sinks.out]\ntype = "jsonl"\npath = "{self.out}"\nbatch_size = 50\n{sink_extra}'
            f'[spool]\npath = "{self.spool_dir / "spool.db"}"\n'
            f'[service]\nstream = "{STREAM}"\nshutdown_timeout = "20s"\n{top_extra}'
        )

    # -- the service ---------------------------------------------------------------------------

    def start(self) -> subprocess.Popen[bytes]:
        """Start ``layerwatch run`` in a subprocess (not waiting for it)."""
        self.runs += 1
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with self.stderr_path().open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watcher.cli", "run", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=REPO,
            )
        return self.proc

    def stderr_path(self) -> Path:
        return self.root / f"run{self.runs}.err"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path().read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                out.append({"event": "raw", "line": line.decode(errors="replace")})
        return out

    def wait_log(self, event: str, timeout: float = 20.0) -> None:
        """Wait for a log event of this run; fail with the log if the process ends first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(entry.get("event") == event for entry in self.logs()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no {event} (rc={self.proc.poll()}): {self.stderr_path().read_text()}")

    def run_failing(self) -> str:
        """Run the service expecting it to fail at start; its stderr."""
        proc = self.start()
        assert proc.wait(timeout=30) == 1
        return self.stderr_path().read_text()

    def terminate(self) -> None:
        """SIGTERM: the service must drain and exit 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0, self.stderr_path().read_text()

    def kill(self) -> None:
        """SIGKILL: no clean-up at all."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    # -- observations --------------------------------------------------------------------------

    def events(self) -> list[Event]:
        if not self.out.exists():
            return []
        return [orjson.loads(line) for line in self.out.read_bytes().splitlines()]

    def wait_events(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} events arrived"
            time.sleep(0.05)

    def expected(self) -> dict[bytes, str]:
        want = compute(str(self.rw), [str(self.top), str(self.base)])
        return {c.path: str(c.kind) for c in want}

    def assert_consistent(self) -> list[Event]:
        """The consumer's list equals compute(); every seq from 1 to the head arrived."""
        events = self.events()
        state, seqs = consume(events)
        assert state == self.expected()
        assert sorted(seqs) == list(range(1, max(seqs) + 1)), "a sequence number is missing"
        return events

    def mount_tmpfs(self, target: Path, size: str) -> None:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], check=True
        )
        self.tmpfs.append(target)

    def remount(self, target: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        while find_mount(self.mnt) is not None:
            unmount(str(self.mnt))
        for target in reversed(self.tmpfs):
            while find_mount(target) is not None:
                unmount(str(target))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A rig whose process is killed and whose mounts are undone however the test ends."""
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


class Operator:
    """Random file-system operations through the merged view (the way a container writes)."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.serial = 0

    def _entries(self) -> tuple[list[Path], list[Path]]:
        dirs, files = [self.root], []
        for parent, dirnames, filenames in os.walk(self.root):
            dirs += [Path(parent, d) for d in dirnames]
            # Symlinks from the lower are left alone: moved elsewhere they dangle, and
            # append or chmod would follow them.
            files += [Path(parent, f) for f in filenames if not Path(parent, f).is_symlink()]
        return dirs, files

    def _name(self) -> str:
        self.serial += 1
        return self.rng.choice(["f", "g", "dir", "x y", "caf\u00e9"]) + str(self.serial)

    def step(self) -> None:
        dirs, files = self._entries()
        op = self.rng.choice(
            ["create", "create", "append", "delete", "mkdir", "rmtree", "rename", "chmod"]
        )
        if op in ("append", "delete", "rename", "chmod") and not files:
            op = "create"
        if op == "rmtree" and len(dirs) == 1:
            op = "mkdir"
        if op == "create":
            (self.rng.choice(dirs) / self._name()).write_bytes(b"x" * self.rng.randrange(64))
        elif op == "append":
            with self.rng.choice(files).open("ab") as fh:
                fh.write(b"more")
        elif op == "delete":
            self.rng.choice(files).unlink()
        elif op == "mkdir":
            (self.rng.choice(dirs) / self._name()).mkdir()
        elif op == "rmtree":
            shutil.rmtree(self.rng.choice(dirs[1:]))
        elif op == "rename":
            self.rng.choice(files).rename(self.rng.choice(dirs) / self._name())
        else:
            os.chmod(self.rng.choice(files), self.rng.choice([0o600, 0o644, 0o755]))

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_mid_stream_loses_nothing(rig: Rig, seed: int) -> None:
    """kill -9 mid-stream, changes while down, restart: the consumer's list equals compute()."""
    ops = Operator(rig.mnt, seed)
    rig.start()
    rig.wait_log("service_started")
    ops.steps(30)
    rig.wait_events(5)
    ops.steps(30)
    rig.kill()  # mid-stream: events are still being reconciled, spooled and delivered
    assert find_mount(rig.mnt) is not None, "the killed run's mount should still be there"
    ops.steps(30)  # the service is down
    rig.start()
    rig.wait_log("service_started")
    assert any(e.get("event") == "mount_adopted" for e in rig.logs())
    ops.steps(30)
    rig.terminate()
    assert find_mount(rig.mnt) is None, "an adopted managed mount is unmounted at stop"
    events = rig.assert_consistent()
    assert events[-1]["type"] == BOOKMARK
    resyncs = [e["data"] for e in events if e["type"] == "io.layerwatch.resync"]
    assert {"mount": MOUNT, "reason": "restart"} in resyncs


def test_sigterm_drains_and_ends_with_a_bookmark(rig: Rig) -> None:
    """SIGTERM right after a burst: exit 0, every change delivered, a bookmark last."""
    rig.start()
    rig.wait_log("service_started")
    Operator(rig.mnt, 7).steps(80)
    rig.terminate()  # no sync first: stopping is the sync
    events = rig.assert_consistent()
    assert events[-1]["type"] == BOOKMARK
    assert events[-1]["data"]["head_seq"] == int(events[-1]["sequence"])
    assert find_mount(rig.mnt) is None, "a clean stop unmounts what it mounted"
    names = [e.get("event") for e in rig.logs()]
    assert names.index("service_stopping") < names.index("service_stopped")


def _good_run(rig: Rig, seed: int, steps: int = 20) -> int:
    """A clean run with some changes; the number of events in the jsonl file after it."""
    rig.start()
    rig.wait_log("service_started")
    Operator(rig.mnt, seed).steps(steps)
    rig.terminate()
    assert find_mount(rig.mnt) is None
    return len(rig.assert_consistent())


def test_bad_config_is_a_clear_error_and_mounts_nothing(rig: Rig) -> None:
    """A bad value exits 1 naming the key; nothing is mounted; earlier events stay."""
    before = _good_run(rig, 3)
    rig.write_config(sink_extra='linger = "soon"\n')
    err = rig.run_failing()
    assert "config: sinks.out.linger: must be a duration" in err
    assert find_mount(rig.mnt) is None
    assert len(rig.events()) == before
    rig.write_config(top_extra="colour = true\n")
    assert "config: service.colour: unknown key" in rig.run_failing()


def test_missing_layer_is_a_clear_error_and_loses_nothing(rig: Rig) -> None:
    """A missing layer exits 1 naming it; after the fix, the next run continues the stream."""
    before = _good_run(rig, 4)
    moved = rig.root / "top.moved"
    rig.top.rename(moved)
    err = rig.run_failing()
    assert str(rig.top) in err
    assert "not a directory" in err
    assert find_mount(rig.mnt) is None
    assert len(rig.events()) == before
    moved.rename(rig.top)
    after = _good_run(rig, 5)
    assert after > before


def test_layer_path_with_separator_is_rejected(rig: Rig) -> None:
    """A layer path with ',' (a mount-option separator) is refused with the reason."""
    odd = rig.root / "a,b"
    rig.base.rename(odd)
    text = rig.config.read_text().replace(str(rig.base), str(odd))
    rig.config.write_text(text)
    err = rig.run_failing()
    assert "separator" in err
    assert find_mount(rig.mnt) is None


def test_read_only_spool_directory_is_a_clear_error(rig: Rig) -> None:
    """A read-only spool directory exits 1 naming it; once writable, nothing was lost."""
    rig.mount_tmpfs(rig.spool_dir, "16m")
    before = _good_run(rig, 6)
    rig.remount(rig.spool_dir, "ro")
    err = rig.run_failing()
    assert "spool" in err
    assert "not writable" in err or "read-only" in err.lower()
    assert find_mount(rig.mnt) is None
    rig.remount(rig.spool_dir, "rw")
    assert _good_run(rig, 7) > before


def test_full_spool_disk_stops_intake_loudly_and_loses_nothing(rig: Rig) -> None:
    """A full spool disk stops intake with an error log; with room again, nothing is lost."""
    rig.mount_tmpfs(rig.spool_dir, "1m")
    rig.start()
    rig.wait_log("service_started")
    big = rig.mnt / "big"
    big.mkdir()
    for i in range(20000):
        (big / (f"{i:05d}-" + "n" * 200)).write_bytes(b"")
        if i % 250 == 249 and any(e.get("event") == "intake_stopped" for e in rig.logs()):
            break
    rig.wait_log("intake_stopped")
    stopped = next(e for e in rig.logs() if e.get("event") == "intake_stopped")
    assert "spool" in stopped["error"]
    assert rig.proc is not None
    assert rig.proc.poll() is None, "a full disk must not kill the service"
    rig.remount(rig.spool_dir, "size=256m")
    rig.wait_log("intake_resumed", timeout=30)
    Operator(rig.mnt, 8).steps(20)
    rig.terminate()
    events = rig.assert_consistent()
    assert events[-1]["type"] == BOOKMARK


def test_sighup_reopens_the_sink_files(rig: Rig) -> None:
    """After logrotate moves the jsonl file away, SIGHUP makes the sink write a new one."""
    rig.start()
    rig.wait_log("service_started")
    (rig.mnt / "before").write_bytes(b"1")
    deadline = time.monotonic() + 20
    while b"/before" not in (rig.out.read_bytes() if rig.out.exists() else b""):
        assert time.monotonic() < deadline, "the first change never reached the file"
        time.sleep(0.05)
    rotated = rig.out.with_name(rig.out.name + ".1")
    rig.out.rename(rotated)
    assert rig.proc is not None
    rig.proc.send_signal(signal.SIGHUP)
    rig.wait_log("reopen_requested")
    (rig.mnt / "after").write_bytes(b"2")
    rig.terminate()
    assert b"/after" not in rotated.read_bytes()
    assert b"/after" in rig.out.read_bytes()
    assert "sink_reopened" in [e.get("event") for e in rig.logs()]


async def test_attached_mount_remounted_over_a_new_upper_is_followed(tmp_path: Path) -> None:
    """An attached mountpoint unmounted (degraded, with the reason) and mounted again over a
    new upper: the service follows the new upper (resync branch_replaced, /v1/mounts names
    it), and a consumer of the jsonl sink holds the new branch's list."""
    rig = Rig(tmp_path)  # only for its layers
    lowers = [str(rig.top), str(rig.base)]
    mnt, out = str(rig.mnt), tmp_path / "attached.jsonl"
    config = parse(
        {
            "mounts": [{"name": MOUNT, "mountpoint": mnt}],
            "sinks": {"out": {"type": "jsonl", "path": str(out)}},
            "spool": {"path": str(tmp_path / "attached.db")},
            "service": {"stream": STREAM, "rescan_interval": "0.1s"},
        }
    )
    service = Service(config)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mount_overlay(str(tmp_path / "old"), lowers, merged=mnt))
        task = asyncio.create_task(service.run(signals=False))
        try:
            async with asyncio.timeout(30):
                await service.started.wait()
            (rig.mnt / "etc" / "passwd").write_bytes(b"changed\n")
            await service.sync()
            stack.close()  # unmounted: nothing to follow
            await service.sync()
            assert service.degraded() == [
                f"mount {MOUNT}: branch_missing: nothing is mounted at {mnt}"
            ]
            new = stack.enter_context(mount_overlay(str(tmp_path / "new"), lowers, merged=mnt))
            (rig.mnt / "usr" / "bin" / "app").unlink()
            (rig.mnt / "fresh").write_bytes(b"new branch\n")
            await service.sync()
            assert service.degraded() == []
            want = compute(new.upper, lowers)
            assert service.changes(MOUNT)[0] == want
            assert service.mounts[MOUNT].fs.rw == os.fsencode(new.upper)
            (rig.mnt / "later").write_bytes(b"watched\n")  # the new upper is watched
            await service.sync()
            assert service.changes(MOUNT)[0] == compute(new.upper, lowers)
        finally:
            service.stop.set()
            async with asyncio.timeout(30):
                await task
        events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        state, _seqs = consume(events)
        assert state == {c.path: str(c.kind) for c in compute(new.upper, lowers)}
        resyncs = [e["data"]["reason"] for e in events if e["type"] == RESYNC]
        assert resyncs == ["branch_replaced"]
        for event in events:  # the new reason is in the published schemas
            jsonschema.validate(event["data"], schema_for(event["type"]))
