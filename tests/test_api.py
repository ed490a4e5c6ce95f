"""The HTTP API against a real service: real overlay mounts, real inotify, real HTTP.

The kit at the top (``ApiRun``, ``running``, ``unix_session``, ``read_sse``) is shared with
``test_api_security.py`` and ``test_page.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import doctest
import io
import os
import shutil
import socket
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from overlay import requires_overlay
from yarl import URL

from watcher.cli.main import build_parser, service_for
from watcher.core.model import Kind
from watcher.delivery.events import RESYNC, SNAPSHOT_BEGIN, SNAPSHOT_END
from watcher.delivery.schemas import schema_for
from watcher.http import client, metrics, pipe
from watcher.http.api import Limits, serve
from watcher.live.tracker import Tracker
from watcher.service.config import ApiConfig, Config, MountConfig, SpoolConfig
from watcher.service.service import Service

pytestmark = [requires_overlay]


# -- the kit --------------------------------------------------------------------------------


@dataclass
class ApiRun:
    """A running service with its API."""

    service: Service
    socket: Path
    merged: Path
    lower: Path
    rw: Path
    attached_upper: Path
    url: str | None = None
    token: str | None = None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    *,
    tcp: bool = False,
    token: str = "s3cret-token",
    limits: Limits | None = None,
) -> AsyncIterator[ApiRun]:
    """A service over a managed overlay ("m") and an attached upper + lowers ("att").

    The API is the service's own (``[api]`` in the config) unless ``limits`` is given; then
    the service runs without ``[api]`` and the test serves it with those limits.
    """
    lower, rw, merged = tmp_path / "lower", tmp_path / "rw", tmp_path / "merged"
    for d in (lower / "etc", lower / "data", rw):
        d.mkdir(parents=True)
    (lower / "etc" / "passwd").write_text("inside:x:0:0:confined to the mount\n")
    (lower / "data" / "old.txt").write_text("old\n")
    att_lower, att_upper = tmp_path / "att-lower", tmp_path / "att-upper"
    att_lower.mkdir()
    att_upper.mkdir()
    sock = tmp_path / "run" / "api.sock"
    port = free_port()
    api = ApiConfig(
        socket=sock,
        listen=f"127.0.0.1:{port}" if tcp else None,
        token=token if tcp else None,
    )
    config = Config(
        mounts=(
            MountConfig(name="m", layers=(lower,), rw=rw, mountpoint=merged),
            MountConfig(name="att", upper=att_upper, lowers=(att_lower,)),
        ),
        spool=SpoolConfig(path=tmp_path / "spool.db"),
        api=None if limits is not None else api,
        stream="test",
    )
    service = service_for(config)
    task = asyncio.create_task(service.run(signals=False))
    api_task: asyncio.Task[None] | None = None
    try:
        started = asyncio.create_task(service.started.wait())
        await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert service.started.is_set(), "the service did not start"
        if limits is not None:
            api_task = asyncio.create_task(serve(service, api, limits=limits))
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.01)
        if tcp:
            await _wait_for_port(port)
        run = ApiRun(service, sock, merged, lower, rw, att_upper)
        if tcp:
            run.url, run.token = f"http://127.0.0.1:{port}", token
        yield run
    finally:
        if api_task is not None:
            api_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await api_task
        service.stop.set()
        async with asyncio.timeout(30):
            await task


async def _wait_for_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await writer.wait_closed()
            return


def unix_session(run: ApiRun) -> aiohttp.ClientSession:
    """An HTTP client over the API's unix socket (base URL ``http://layerwatch``)."""
    return aiohttp.ClientSession(
        "http://layerwatch", connector=aiohttp.UnixConnector(path=str(run.socket))
    )


EPOCHS: set[int] = set()
"""The epochs seen in SSE ids (one per spool)."""


async def read_sse(
    resp: aiohttp.ClientResponse, until: Any
) -> list[tuple[int | None, dict[str, Any]]]:
    """Read SSE events (the seq of their ``EPOCH:SEQ`` id, parsed data) until
    ``until(events)`` is true (20 s at most). Every id's epoch is the one in the event id."""
    events: list[tuple[int | None, dict[str, Any]]] = []
    event_id: int | None = None
    async with asyncio.timeout(20):
        while not until(events):
            line = (await resp.content.readline()).rstrip(b"\n")
            if line.startswith(b"id: "):
                epoch, seq = line[4:].decode().split(":")
                event_id = int(seq)
                EPOCHS.add(int(epoch))
            elif line.startswith(b"data: "):
                events.append((event_id, orjson.loads(line[6:])))
            elif line == b"":
                event_id = None
    return events


async def changes(session: aiohttp.ClientSession, mount: str = "m") -> dict[str, Any]:
    """GET the change list after a sync."""
    async with session.get(f"/v1/mounts/{mount}/changes?sync=1") as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


def assert_schema(event: dict[str, Any]) -> None:
    """``event`` validates against the envelope and its type's data schema."""
    jsonschema.validate(event, schema_for("envelope"))
    jsonschema.validate(event["data"], schema_for(event["type"]))


def _tar(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data))


def _seqs(events: list[tuple[int | None, dict[str, Any]]]) -> list[int]:
    return [int(e["sequence"]) for _, e in events]


# -- status ---------------------------------------------------------------------------------


async def test_healthz_metrics_and_mounts(tmp_path: Path) -> None:
    """/healthz says ok, /metrics exposes the counters, /v1/mounts lists both mounts."""
    async with running(tmp_path) as run, unix_session(run) as s:
        async with s.get("/healthz") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert health["status"] == "ok"
        assert health["source"]["source"] in ("inotify", "fanotify")
        assert health["source"]["requested"] == "auto"
        (run.merged / "new.txt").write_text("x")
        await changes(s)
        async with s.get("/metrics") as resp:
            text = await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert 'layerwatch_mount_entries{mount="m"} 1' in text
        assert "layerwatch_inotify_max_user_watches " in text
        assert "layerwatch_fanotify_events_filtered_total " in text
        published = next(
            line for line in text.splitlines() if line.startswith("layerwatch_events_published")
        )
        assert int(published.split()[1]) >= 5  # two empty snapshots (2 x 2 controls), a change
        assert "layerwatch_mounts_starting 0" in text
        run.service.restarts["sink x"] = 2  # as the supervisor counts a sink runner's failures
        async with s.get("/metrics") as resp:
            text = await resp.text()
        assert 'layerwatch_component_restarts_total{component="sink x"} 2' in text
        async with s.get("/v1/mounts") as resp:
            mounts = {m["name"]: m for m in (await resp.json())["mounts"]}
        assert set(mounts) == {"m", "att"}
        assert mounts["m"]["managed"] is True
        assert mounts["m"]["entries"] == 1
        assert mounts["m"]["counts"] == {"A": 1, "C": 0, "D": 0}
        assert mounts["m"]["source"] == health["source"]["source"]
        assert mounts["m"]["attribution"] is False
        async with s.get("/v1/mounts/nope") as resp:
            assert resp.status == 404
            assert "nope" in (await resp.json())["error"]


async def test_healthz_degraded_reports_reasons(tmp_path: Path) -> None:
    """/healthz answers 503 with the reasons when the service is degraded."""
    async with running(tmp_path) as run, unix_session(run) as s:
        await run.service.sync()  # nothing pending: no commit can clear the error below
        intake = run.service.intake
        assert intake is not None
        intake.error = "disk full (made up by the test)"
        async with s.get("/healthz") as resp:
            assert resp.status == 503
            body = await resp.json()
        intake.error = None
        assert body["status"] == "degraded"
        assert body["reasons"] == ["spool: disk full (made up by the test)"]


async def test_changes_at_a_sequence_with_raw_names(tmp_path: Path) -> None:
    """The change list has the diff --json rows, path_b64 for non-UTF-8 names, and its seq."""
    async with running(tmp_path) as run, unix_session(run) as s:
        (run.merged / "data" / "old.txt").write_text("changed\n")
        os.mkdir(os.path.join(os.fsencode(run.merged), b"caf\xe9"))
        body = await changes(s)
        assert body["changes"] == [
            {"kind": "A", "path_b64": "L2NhZuk="},
            {"kind": "C", "path": "/data"},
            {"kind": "C", "path": "/data/old.txt"},
        ]
        assert run.service.spool is not None
        assert body["seq"] == run.service.spool.last_seq
        (run.merged / os.fsdecode(b"caf\xe9/n\xffl")).write_bytes(b"raw name")
        async with s.get(URL("/v1/mounts/m/files/caf%E9/n%FFl", encoded=True)) as resp:
            assert resp.status == 200
            assert await resp.read() == b"raw name"
        async with s.get(URL("/v1/mounts/m/dirs/caf%E9", encoded=True)) as resp:
            assert (await resp.json())["entries"][0]["name_b64"] == "bv9s"


# -- sync and reset -------------------------------------------------------------------------


async def test_sync_and_reset(tmp_path: Path) -> None:
    """POST sync reflects writes; reset empties a managed mount's list; attached gets 409."""
    async with running(tmp_path) as run, unix_session(run) as s:
        for i in range(5):
            (run.merged / f"f{i}").write_text("x")
        async with s.post("/v1/mounts/m/sync", json={"timeout": 5}) as resp:
            assert resp.status == 200
            assert (await resp.json())["entries"] == 5
        async with s.get("/v1/events?since=0") as events:
            async with s.post("/v1/mounts/m/reset") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["entries"] == 0
            seen = await read_sse(
                events,
                lambda ev: (
                    any(e["type"].endswith("snapshot.end") for _, e in ev[-1:])
                    and ev[-1][1]["data"].get("reason") == "reset"
                ),
            )
        assert (await changes(s))["changes"] == []
        assert not os.listdir(run.rw)
        assert (run.merged / "data" / "old.txt").read_text() == "old\n"  # remounted
        types = [e["type"].rpartition(".")[2] for _, e in seen]
        assert "resync" in types
        async with s.post("/v1/mounts/att/reset") as resp:
            assert resp.status == 409
            assert "attached" in (await resp.json())["error"]


async def test_a_mount_whose_first_scan_runs_answers_503_not_404(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a configured mount's first scan runs (held here in its thread by an event, the one
    stand-in of this test), its endpoints answer 503 with Retry-After, a stream may already
    name it, an unknown name is still 404; once the scan ends, the same request succeeds."""
    release = threading.Event()
    scan = Tracker.start

    def held(tracker: Tracker, *args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return scan(tracker, *args, **kwargs)

    monkeypatch.setattr(Tracker, "start", held)
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    (upper / "new").write_text("x")
    sock = tmp_path / "api.sock"
    config = Config(
        mounts=(MountConfig(name="slow", upper=upper, lowers=(lower,)),),
        spool=SpoolConfig(path=tmp_path / "spool.db"),
        api=ApiConfig(socket=sock),
        stream="test",
    )
    service = service_for(config)
    task = asyncio.create_task(service.run(signals=False))
    connector = aiohttp.UnixConnector(path=str(sock))
    try:
        async with asyncio.timeout(10):
            while not sock.exists():  # noqa: ASYNC110 (a file another task makes)
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession("http://layerwatch", connector=connector) as s:
            async with s.post("/v1/mounts/slow/sync") as resp:
                assert resp.status == 503, await resp.text()
                assert resp.headers["Retry-After"] == "1"
                assert "starting" in (await resp.json())["error"]
            async with s.get("/v1/mounts/nope/changes") as resp:
                assert resp.status == 404
            async with s.get("/v1/events?mount=slow&since=0") as events:
                assert events.status == 200
                release.set()
                seen = await read_sse(events, lambda ev: any("new" in str(e) for _, e in ev))
                assert any(e["data"].get("path") == "/new" for _, e in seen)
            async with asyncio.timeout(10):
                await service.started.wait()
            async with s.post("/v1/mounts/slow/sync") as resp:
                assert resp.status == 200, await resp.text()
    finally:
        release.set()
        service.stop.set()
        async with asyncio.timeout(30):
            await task


async def test_changes_since_a_position_from_the_spool(tmp_path: Path) -> None:
    """``changes?since=N``: each path changed after N once, with what it is now (null: back to
    the image), from the spool; a position of another spool is 410, a bad one 400."""
    async with running(tmp_path) as run, unix_session(run) as s:
        (run.merged / "f1").write_text("one")
        (run.merged / "f2").write_text("two")
        first = await changes(s)
        with (run.merged / "f1").open("a") as f:
            f.write("more")
        (run.merged / "f3").write_text("three")
        (run.merged / "tmp").write_text("scratch")
        await changes(s)  # published as A (made and removed in one drain, it would net out)
        (run.merged / "tmp").unlink()
        (run.merged / "data" / "old.txt").unlink()
        epoch = run.service.spool.epoch
        async with s.get(f"/v1/mounts/m/changes?sync=1&since={epoch}:{first['seq']}") as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        got = {c["path"]: c["kind"] for c in answer["changes"]}
        assert got == {"/f1": "A", "/f3": "A", "/tmp": None, "/data/old.txt": "D", "/data": "C"}
        assert answer["since"] == first["seq"]
        assert not answer["resync"]
        assert all(first["seq"] < c["seq"] <= answer["seq"] for c in answer["changes"])
        async with s.get(f"/v1/mounts/m/changes?since={answer['seq']}") as resp:
            assert (await resp.json())["changes"] == []
        async with s.get(f"/v1/mounts/m/changes?since={epoch + 1}:1") as resp:
            assert resp.status == 410
        async with s.get(f"/v1/mounts/m/changes?since={answer['seq'] + 100}") as resp:
            assert resp.status == 410
            assert (await resp.json())["oldest"] == 0
        async with s.get("/v1/mounts/m/changes?since=yesterday") as resp:
            assert resp.status == 400
        (run.merged / "f2").unlink()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watcher.cli", "diff", "--server", str(run.socket),
            "--since", str(answer["seq"]), "--exit-code", "m",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert (cli.returncode, out, err) == (1, b"- /f2\n", b"")


# -- files, dirs, export --------------------------------------------------------------------


async def test_files_dirs_and_export(tmp_path: Path) -> None:
    """Files and directories of the merged view, and both tars, are served."""
    async with running(tmp_path) as run, unix_session(run) as s:
        (run.merged / "data" / "new.bin").write_bytes(b"\x00\x01" * 100_000)
        os.remove(run.merged / "data" / "old.txt")
        await changes(s)
        async with s.get("/v1/mounts/m/files/data/new.bin") as resp:
            assert resp.status == 200
            assert await resp.read() == b"\x00\x01" * 100_000
        async with s.get("/v1/mounts/m/dirs/data") as resp:
            listing = await resp.json()
        assert [(e["name"], e["kind"]) for e in listing["entries"]] == [("new.bin", "A")]
        async with s.get("/v1/mounts/m/dirs") as resp:
            names = [e["name"] for e in (await resp.json())["entries"]]
        assert names == ["data", "etc"]
        async with s.get("/v1/mounts/m/export?what=diff") as resp:
            assert resp.headers["Content-Type"] == "application/x-tar"
            layer = _tar(await resp.read())
        assert sorted(layer.getnames()) == ["data", "data/.wh.old.txt", "data/new.bin"]
        async with s.get("/v1/mounts/m/export?what=rootfs") as resp:
            rootfs = _tar(await resp.read())
        assert {"data/new.bin", "etc/passwd"} <= set(rootfs.getnames())
        async with s.get("/v1/mounts/att/export?what=rootfs") as resp:
            assert resp.status == 409
        async with s.get("/v1/mounts/m/export?what=everything") as resp:
            assert resp.status == 400


async def test_export_that_fails_at_once_is_an_error_not_a_tar(tmp_path: Path) -> None:
    """An export that cannot start (its lower layer is gone) answers a JSON error, not 200."""
    async with running(tmp_path) as run, unix_session(run) as s:
        shutil.rmtree(tmp_path / "att-lower")
        async with s.get("/v1/mounts/att/export?what=diff") as resp:
            assert resp.status >= 400
            assert "att-lower" in (await resp.json())["error"]


async def test_export_streams_a_large_tar(tmp_path: Path) -> None:
    """A tar larger than the pipe's buffer arrives whole and in order."""
    async with running(tmp_path) as run, unix_session(run) as s:
        payload = os.urandom(3 << 20)
        (run.merged / "big").write_bytes(payload)
        await changes(s)
        async with s.get("/v1/mounts/m/export?what=diff") as resp:
            data = await resp.read()
        member = _tar(data).extractfile("big")
        assert member is not None
        assert member.read() == payload


# -- streams --------------------------------------------------------------------------------


async def test_sse_resume_with_last_event_id_is_exactly_once(tmp_path: Path) -> None:
    """After a disconnect, Last-Event-ID yields every later event exactly once, in order."""
    async with running(tmp_path) as run, unix_session(run) as s:
        for i in range(10):
            (run.merged / f"a{i}").write_text("x")
        await changes(s)
        async with s.get("/v1/events?since=0") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await read_sse(resp, lambda ev: len(ev) >= 7)
        resume = first[-1][0]
        assert resume is not None
        assert _seqs(first) == list(range(1, len(first) + 1))
        for i in range(10):
            (run.merged / f"b{i}").write_text("x")
        await changes(s)
        assert run.service.spool is not None
        head, epoch = run.service.spool.last_seq, run.service.spool.epoch
        assert epoch in EPOCHS
        headers = {"Last-Event-ID": f"{epoch}:{resume}"}
        async with s.get("/v1/events?since=0", headers=headers) as resp:
            rest = await read_sse(resp, lambda ev: ev and int(ev[-1][1]["sequence"]) >= head)
        assert _seqs(rest) == list(range(resume + 1, head + 1))
        assert [i for i, _ in rest] == _seqs(rest)
        for _, event in first + rest:
            assert_schema(event)
        paths = {e["data"].get("path") for _, e in rest}
        assert {f"/b{i}" for i in range(10)} <= paths


async def test_sse_position_of_another_spool_starts_with_a_snapshot(tmp_path: Path) -> None:
    """A Last-Event-ID whose epoch is not this spool's (the spool was lost and made anew) is
    not taken for a position here: the stream starts with a snapshot of every mount."""
    async with running(tmp_path) as run, unix_session(run) as s:
        for i in range(5):
            (run.merged / f"a{i}").write_text("x")
        await changes(s)
        assert run.service.spool is not None
        other = run.service.spool.epoch - 1
        headers = {"Last-Event-ID": f"{other}:2"}
        async with s.get("/v1/events", headers=headers) as resp:
            got = await read_sse(resp, lambda ev: any(e["type"] == SNAPSHOT_END for _, e in ev))
        assert [e["type"] for _, e in got[:2]] == [RESYNC, SNAPSHOT_BEGIN]
        assert got[0][1]["data"]["reason"] == "retention"
        async with s.get("/v1/events", headers={"Last-Event-ID": "x:2"}) as resp:
            assert resp.status == 400
            assert "EPOCH:SEQ" in await resp.text()


async def test_sse_mount_filter_and_live_events(tmp_path: Path) -> None:
    """mount= keeps one mount's events (and service-wide ones); live events follow replay."""
    async with running(tmp_path) as run, unix_session(run) as s:
        async with s.get("/v1/events?since=0&mount=att") as resp:
            await read_sse(resp, lambda ev: any("snapshot.end" in e["type"] for _, e in ev))
            (run.merged / "ignored").write_text("x")
            (run.attached_upper / "seen").write_text("x")
            got = await read_sse(resp, lambda ev: len(ev) >= 1)
        assert got[0][1]["data"]["mount"] == "att"
        assert got[0][1]["data"]["path"] == "/seen"
        async with s.get("/v1/events?mount=nope") as resp:
            assert resp.status == 404
        async with s.get("/v1/events?since=banana") as resp:
            assert resp.status == 400
            assert "since" in (await resp.json())["error"]


async def test_sse_lost_position_gets_resync_and_snapshot(tmp_path: Path) -> None:
    """A since older than the spool keeps gets a resync and a snapshot, then live events."""
    async with running(tmp_path) as run, unix_session(run) as s:
        (run.merged / "kept").write_text("x")
        await changes(s)
        spool = run.service.spool
        assert spool is not None
        spool.prune(time.time() + 10 * 365 * 86400)  # retention dropped everything
        head = spool.last_seq
        assert spool.first_seq == head + 1
        async with s.get("/v1/events?since=0&mount=m") as resp:
            got = await read_sse(resp, lambda ev: ev and ev[-1][0] == head)
            types = [e["type"].removeprefix("io.layerwatch.") for _, e in got]
            assert types == ["resync", "snapshot.begin", "change", "snapshot.end"]
            assert [i for i, _ in got] == [None, None, None, head]
            assert got[2][1]["data"]["path"] == "/kept"
            assert got[0][1]["data"]["reason"] == "retention"
            ids = [f"test~snapshot@{head}:{spool.epoch}:{i}" for i in (1, 2, 3, 4)]
            assert [e["id"] for _, e in got] == ids
            assert {int(e["sequence"]) for _, e in got} == {head}
            for _, event in got:
                assert_schema(event)
            (run.merged / "after").write_text("x")
            live = await read_sse(resp, lambda ev: len(ev) >= 1)
        assert live[0][0] == head + 1
        assert live[0][1]["data"]["path"] == "/after"
        async with s.get("/v1/events?since=99999999") as resp:  # a spool that was replaced
            again = await read_sse(resp, lambda ev: ev and ev[-1][0] == head + 1)
        begins = [e for _, e in again if e["type"].endswith("snapshot.begin")]
        assert {e["data"]["mount"] for e in begins} == {"m", "att"}


async def test_websocket_stream_resumes_with_since(tmp_path: Path) -> None:
    """The WebSocket stream carries one event per message and resumes from ?since=."""
    async with running(tmp_path) as run, unix_session(run) as s:
        for i in range(4):
            (run.merged / f"w{i}").write_text("x")
        await changes(s)
        async with s.ws_connect("/v1/events/ws?since=0") as ws:
            first = [orjson.loads((await ws.receive(timeout=10)).data) for _ in range(5)]
        assert [int(e["sequence"]) for e in first] == [1, 2, 3, 4, 5]
        (run.merged / "later").write_text("x")
        head = (await changes(s))["seq"]
        async with s.ws_connect("/v1/events/ws?since=5") as ws:
            rest: list[dict[str, Any]] = []
            while not rest or int(rest[-1]["sequence"]) < head:
                rest.append(orjson.loads((await ws.receive(timeout=10)).data))
        assert [int(e["sequence"]) for e in rest] == list(range(6, head + 1))


_WS_UPGRADE = (
    b"GET /v1/events/ws?since=0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _stuck_reader(run: ApiRun, kind: str) -> socket.socket:
    """A client that asks for every event and never reads a byte of the answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(run.socket))
    if kind == "ws":
        sock.sendall(_WS_UPGRADE)
    else:
        sock.sendall(b"GET /v1/events?since=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_a_consumer_that_never_reads_is_cut_off(tmp_path: Path, kind: str) -> None:
    """A stuck consumer (SSE or WebSocket) is dropped; the service and another keep going."""
    limits = Limits(write_timeout=0.5, batch=50)
    async with running(tmp_path, limits=limits) as run, unix_session(run) as s:
        stuck = _stuck_reader(run, kind)
        long = "n" * 200
        async with s.get("/v1/events?since=0") as live:
            for i in range(1500):
                (run.merged / f"{long}{i}").write_text("x")
                if i % 300 == 0:
                    await asyncio.sleep(0)
            head = (await changes(s))["seq"]
            got = await read_sse(live, lambda ev: ev and int(ev[-1][1]["sequence"]) >= head)
        assert _seqs(got) == list(range(1, head + 1))
        stuck.setblocking(False)
        async with asyncio.timeout(20):
            while True:
                async with s.get("/metrics") as resp:
                    if "layerwatch_api_streams_dropped_total 1" in await resp.text():
                        break
                await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        received = 0
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(stuck, 1 << 16):
                    received += len(chunk)
        stuck.close()
        total = sum(len(orjson.dumps(e)) for _, e in got)
        print(f"stuck client received {received} of {total} bytes before it was cut off")
        assert received < total / 2, "the stuck client was sent everything anyway"
        async with s.get("/healthz") as resp:
            assert resp.status == 200
        (run.merged / "still-going").write_text("x")
        assert {"kind": "A", "path": "/still-going"} in (await changes(s))["changes"]


async def test_stream_requests_after_shutdown_end(tmp_path: Path) -> None:
    """Stopping the service ends open streams and removes the socket."""
    async with running(tmp_path) as run:
        session = unix_session(run)
        resp = await session.get("/v1/events")
        assert resp.status == 200
        sock = run.socket
    async with asyncio.timeout(10):
        rest = await resp.content.read()
    assert b"data:" not in rest
    resp.release()
    await session.close()
    assert not sock.exists()


# -- the CLI clients ------------------------------------------------------------------------


async def test_cli_client_status_diff_and_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status, diff --server and tail print what the API says."""
    async with running(tmp_path) as run:
        (run.merged / "from-cli").write_text("x")
        server = str(run.socket)
        found = await client.fetch_changes(server, None, "m")
        assert [(c.path, c.kind) for c in found] == [(b"/from-cli", Kind.ADDED)]
        status = await client.status(server, None, out=(buf := io.StringIO()))
        assert status == 0
        assert "ok" in buf.getvalue()
        assert "m" in buf.getvalue()
        out = io.BytesIO()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await client.tail(server, None, out, since=0, mount="m", limit=3)
        lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
        assert [int(e["sequence"]) for e in lines] == [1, 2, 5]
        assert lines[-1]["data"]["path"] == "/from-cli"
        with pytest.raises(client.ServerError, match="no mount named"):
            await client.fetch_changes(server, None, "nope")
    with pytest.raises(client.ServerError, match="cannot reach"):
        await client.fetch_changes(server, None, "m")


def test_remote_commands_parse() -> None:
    """The CLI has status and tail with their options."""
    parser = build_parser()
    args = parser.parse_args(["tail", "--since", "3", "--mount", "m", "--server", "/x.sock"])
    assert (args.command, args.since, args.mount, args.server) == ("tail", 3, "m", "/x.sock")
    args = parser.parse_args(["status", "--server", "http://127.0.0.1:1", "--token-file", "/t"])
    assert (args.server, args.token_file) == ("http://127.0.0.1:1", "/t")


@pytest.mark.parametrize("module", [metrics, pipe], ids=["metrics", "pipe"])
def test_module_examples_run_as_written(module: ModuleType) -> None:
    """The docstring examples of the API's helper modules run and print what they show."""
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
