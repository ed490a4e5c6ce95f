"""Events from a real service run validate against the published JSON Schemas.

The service runs in-process over a managed overlay mount with a real jsonl sink; every line
it wrote is checked against the envelope schema and the ``data`` schema of its type
(``watcher/delivery/schema/``), and against the envelope rules of ``docs/events.md`` that a
schema cannot express (id = STREAM:EPOCH:SEQ, sequence = data.seq, subject = the
percent-encoded path).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from overlay import LayerEntry, build_layer, requires_overlay, unmount

from watcher.cli.main import service_for
from watcher.core.mounts import find_mount
from watcher.delivery.events import BOOKMARK, CHANGE, GAP, RESYNC, SNAPSHOT_BEGIN, SNAPSHOT_END
from watcher.delivery.schemas import SCHEMA_FILES, schema_for
from watcher.service import config
from watcher.service.service import Service

pytestmark = requires_overlay

STREAM = "evtest"

Event = dict[str, Any]


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = schema_for(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


ENVELOPE = _validator("envelope")
DATA = {type_: _validator(type_) for type_ in SCHEMA_FILES}


def problems(event: Event) -> list[str]:
    """Every schema violation of one event (envelope, then its data)."""
    out = [f"envelope: {e.message}" for e in ENVELOPE.iter_errors(event)]
    validator = DATA.get(event.get("type", ""))
    if validator is not None:
        out += [f"data: {e.message}" for e in validator.iter_errors(event.get("data"))]
    return out


class Workspace:
    """Layers, an rw dir, a mountpoint, a spool and a jsonl file under ``tmp_path``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lower = root / "lower"
        self.rw = root / "rw"
        self.mnt = root / "mnt"
        self.out = root / "out.jsonl"
        for d in (self.lower, self.rw, self.mnt):
            d.mkdir()
        build_layer(
            str(self.lower),
            [
                LayerEntry("file", b"etc/hosts", b"127.0.0.1 localhost\n"),
                LayerEntry("file", b"etc/motd", b"hello\n"),
                LayerEntry("dir", b"var/cache"),
                LayerEntry("file", b"var/cache/a", b"a"),
                LayerEntry("file", b"var/cache/b", b"b"),
                LayerEntry("symlink", b"bin", b"usr/bin"),
            ],
        )

    def config_text(self, extra: str = "") -> str:
        return (
            f'[[mounts]]\nname = "root"\nlayers = ["{self.lower}"]\n'
            f'rw = "{self.rw}"\nmountpoint = "{self.mnt}"\n'
            f'[sinks.out]\ntype = "jsonl"\npath = "{self.out}"\n'
            f'[service]\nstream = "{STREAM}"\nbookmark_interval = "0.2s"\n' + extra
        )

    def spool(self, max_age: str = "7d") -> str:
        return f'[spool]\npath = "{self.root / "spool" / "spool.db"}"\nmax_age = "{max_age}"\n'

    def events(self) -> list[Event]:
        return [orjson.loads(line) for line in self.out.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace whose mountpoint is unmounted at the end, whatever happened."""
    w = Workspace(tmp_path_factory.mktemp("events"))
    try:
        yield w
    finally:
        while find_mount(w.mnt) is not None:
            unmount(str(w.mnt))


async def run_service(text: str, path: Path, act: Callable[[Service], Any]) -> None:
    """Run the service from config ``text`` around ``act(service)``, then stop it cleanly."""
    await asyncio.to_thread(path.write_text, text)
    service = service_for(config.load(path))
    task = asyncio.create_task(service.run(signals=False))
    async with asyncio.timeout(30):
        started = asyncio.create_task(service.started.wait())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        result = act(service)
        if asyncio.iscoroutine(result):
            await result
        await service.sync()
        service.stop.set()
        await task


def _mutate(mnt: Path) -> None:
    """Creates, writes, deletes, renames, whiteouts, an opaque dir and odd names."""
    m = os.fsencode(mnt)
    (mnt / "new.txt").write_text("new")
    with (mnt / "etc" / "motd").open("a") as fh:
        fh.write("more\n")
    (mnt / "etc" / "hosts").unlink()
    (mnt / "work").mkdir()
    (mnt / "work" / "draft").write_text("1")
    (mnt / "work" / "draft").rename(mnt / "work" / "final")
    (mnt / "gone").write_text("x")
    (mnt / "var" / "cache" / "a").unlink()
    (mnt / "var" / "cache" / "b").unlink()
    (mnt / "var" / "cache").rmdir()
    (mnt / "var" / "cache").mkdir()
    (mnt / "var" / "cache" / "c").write_text("c")
    os.chmod(mnt / "new.txt", 0o600)
    os.symlink("new.txt", mnt / "link")
    os.mkfifo(mnt / "pipe")
    for raw in (b"/caf\xc3\xa9", b"/bad\xff\xfe", b"/line\nbreak", b"/sp ace%"):
        fd = os.open(m + raw, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


async def _mutate_then_remove(service: Service, mnt: Path) -> None:
    """Mutate, let the service see it, then write to and remove added files."""
    await asyncio.to_thread(_mutate, mnt)
    await service.sync()
    await asyncio.to_thread(_write_and_remove, mnt)


def _write_and_remove(mnt: Path) -> None:
    with (mnt / "new.txt").open("a") as fh:
        fh.write(" and more")  # activity: kind stays A
    (mnt / "gone").unlink()  # removal: kind becomes null


async def _wait_for_gap(ws: Workspace, blocker: Path, deadline: float) -> None:
    """Wait until the gap event is out, then let the broken sink open (so it drains fast)."""
    while time.monotonic() < deadline:
        if ws.out.exists() and any(e["type"] == GAP for e in ws.events()):
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(blocker.unlink)


@pytest.fixture(scope="module")
def events(ws: Workspace) -> list[Event]:
    """Every event of three real runs: a start, a restart after offline changes, a gap."""
    asyncio.run(_three_runs(ws))
    return ws.events()


async def _three_runs(ws: Workspace) -> None:
    cfg = ws.root / "layerwatch.toml"
    await run_service(ws.config_text() + ws.spool(), cfg, lambda s: _mutate_then_remove(s, ws.mnt))
    (ws.rw / "offline.txt").write_text("written while the service was down")
    await run_service(ws.config_text() + ws.spool(), cfg, lambda s: None)
    # A sink that can never open stays behind; a 1 s retention then drops what it missed.
    blocker = ws.root / "blocker"
    blocker.write_text("")
    broken = f'[sinks.broken]\ntype = "jsonl"\npath = "{blocker / "x.jsonl"}"\n'
    await run_service(
        ws.config_text(broken) + ws.spool(max_age="0.3s"),
        cfg,
        lambda s: _wait_for_gap(ws, blocker, time.monotonic() + 15),
    )


def test_every_event_matches_its_schema(events: list[Event]) -> None:
    """Every event of real runs validates against the envelope and its type's data schema."""
    bad = [(e.get("id"), p) for e in events for p in problems(e)]
    assert bad == []
    assert {e["type"] for e in events} == {
        CHANGE,
        SNAPSHOT_BEGIN,
        SNAPSHOT_END,
        RESYNC,
        BOOKMARK,
        GAP,
    }


def test_envelope_fields_follow_the_contract(events: list[Event]) -> None:
    """id is STREAM:EPOCH:SEQ (one epoch in one spool), sequence is SEQ zero-padded, time is
    UTC with µs, source names us."""
    seqs = []
    epochs = set()
    for e in events:
        seq = int(e["sequence"])
        seqs.append(seq)
        stream, epoch, id_seq = e["id"].split(":")
        assert (stream, id_seq) == (STREAM, str(seq))
        epochs.add(int(epoch))
        assert e["sequence"] == f"{seq:020d}"
        assert e["source"].startswith("/layerwatch/")
        assert e["specversion"] == "1.0"
        assert e["datacontenttype"] == "application/json"
        stamp = datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
        assert stamp.utcoffset() is not None
        assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert abs(stamp.timestamp() - time.time()) < 120
        if e["type"] == CHANGE:
            assert e["data"]["seq"] == seq
    assert seqs == sorted(seqs)
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), "a sequence number is missing"
    assert len(epochs) == 1
    assert abs(epochs.pop() / 1000 - time.time()) < 600, "the epoch is the spool's creation (ms)"


def test_subject_and_path_round_trip_any_bytes(events: list[Event]) -> None:
    """subject is the ASCII percent-encoding of the raw path; path or path_b64 gives it back."""
    raw_paths = set()
    for e in (e for e in events if e["type"] == CHANGE):
        data = e["data"]
        raw = (
            data["path"].encode("utf-8")
            if "path" in data
            else base64.b64decode(data["path_b64"], validate=True)
        )
        assert e["subject"].isascii()
        assert urllib.parse.unquote_to_bytes(e["subject"]) == raw
        raw_paths.add(raw)
    assert {b"/caf\xc3\xa9", b"/bad\xff\xfe", b"/line\nbreak", b"/sp ace%"} <= raw_paths
    b64 = [e for e in events if e["type"] == CHANGE and "path_b64" in e["data"]]
    assert b64, "the non-UTF-8 name was not sent as path_b64"


def test_runs_produce_every_kind_and_op(events: list[Event]) -> None:
    """The runs cover A, C, D, removal, activity, restart rescans and snapshot entries."""
    changes = [e["data"] for e in events if e["type"] == CHANGE]
    assert {d["kind"] for d in changes} == {"A", "C", "D", None}
    ops = {d["op"] for d in changes}
    assert {"create", "modify", "delete", "rescan", "snapshot"} <= ops
    assert any(d["kind"] == d["prev_kind"] == "A" for d in changes), "no activity event"
    resyncs = [e["data"] for e in events if e["type"] == RESYNC]
    assert resyncs == [{"mount": "root", "reason": "restart"}] * 2
    assert events[-1]["type"] == BOOKMARK
    gap = next(e["data"] for e in events if e["type"] == GAP)
    assert gap["consumers"] == ["broken"]
    assert gap["first_seq"] <= gap["last_seq"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "X"),
        ("op", "write"),
        ("seq", "7"),
        ("mount", "has space"),
        ("stat", {"size": 1}),
        ("path", "relative"),
        ("extra", 1),
    ],
)
def test_schema_rejects_a_broken_change(events: list[Event], field: str, value: object) -> None:
    """A real change event with one field broken fails the schema (the test can fail)."""
    event = next(e for e in events if e["type"] == CHANGE and e["data"]["kind"] == "A")
    assert problems(event) == []
    broken = {**event, "data": {**event["data"], field: value}}
    assert problems(broken) != []


def test_schema_rejects_a_broken_envelope(events: list[Event]) -> None:
    """Envelope rules: a 19-digit sequence, a local time, a non-ASCII subject all fail."""
    event = next(e for e in events if e["type"] == CHANGE)
    for field, value in [
        ("sequence", event["sequence"][1:]),
        ("time", event["time"].replace("Z", "+01:00")),
        ("subject", "/café"),
        ("specversion", "0.3"),
    ]:
        assert problems({**event, field: value}) != [], field
    control = next(e for e in events if e["type"] == BOOKMARK)
    assert problems({**control, "subject": "/x"}) != []
    assert problems({**control, "data": {"head_seq": 0}}) != []
