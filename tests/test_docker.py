"""compute() against a real Docker: `docker diff` on live containers, found by MountSource.

A private dockerd (its own data root, exec root, pidfile and socket; no bridge, no iptables)
runs for this module; an image is imported from a tar of busybox-static plus the conformance
lower tree at /data. Each conformance case's operations run in a live container; the change
list computed from the container's upper directory (found by MountSource from the mount
table) must equal what `docker diff` prints, as a set.

Needs root, overlayfs, `dockerd` and `docker` (Debian `docker.io`) and a static busybox
(Debian `busybox-static`); skipped, saying which, when any is missing or dockerd cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import operator
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import load_cases
from overlay import build_lower, requires_overlay

from watcher.core.rules import compute
from watcher.live.discovery import Discovered, MountChange, MountEvent, MountSource
from watcher.service.config import parse
from watcher.service.service import Service

CASES = load_cases()
pytestmark = [requires_overlay, pytest.mark.root, pytest.mark.slow]

IMAGE = "layerwatch-test:busybox"
TOOLS = ("sh", "echo", "rm", "mkdir", "chmod", "mv", "ln", "touch", "true", "sleep", "cat")


@dataclass(frozen=True, slots=True)
class Docker:
    """A running private dockerd and how to talk to it."""

    docker: str
    env: dict[str, str]
    data_root: Path

    def run(self, *args: str, timeout: float = 60) -> str:
        """Run a docker CLI command against this daemon; its stdout, or AssertionError."""
        proc = subprocess.run(
            [self.docker, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM dockerd (it stops its containerd and unmounts), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _image_tar(root: Path) -> bytes:
    """A rootfs tar: static busybox with its applets, and the conformance lower at /data."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for tool in TOOLS:
        (root / "bin" / tool).symlink_to("busybox")
    for name in ("tmp", "etc", "proc", "sys", "dev"):
        (root / name).mkdir()
    build_lower(str(root), CASES["lower"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".")
    return buf.getvalue()


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A private dockerd for this module, stopped and cleaned up at the end."""
    dockerd, client = shutil.which("dockerd"), shutil.which("docker")
    if dockerd is None or client is None:
        pytest.skip("dockerd/docker not installed (Debian docker.io): no Docker comparison")
    if shutil.which("busybox") is None:
        pytest.skip("busybox not installed (Debian busybox-static): no image to import")
    # A short path: the daemon's unix sockets live under it (108-byte limit).
    top = Path(tempfile.mkdtemp(prefix="lwd-", dir="/tmp"))
    data_root = top / "data"
    (top / "daemon.json").write_text("{}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(top)}
    env.update(DOCKER_HOST=f"unix://{top}/sock", DOCKER_CONFIG=str(top / "cli"))
    argv = [
        dockerd,
        f"--config-file={top}/daemon.json",
        f"--data-root={data_root}",
        f"--exec-root={top}/exec",
        f"--pidfile={top}/pid",
        f"--host=unix://{top}/sock",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--storage-driver=overlay2",
    ]
    log = (top / "dockerd.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        daemon = Docker(client, env, data_root)
        deadline = time.monotonic() + 30
        while True:
            try:
                daemon.run("version", timeout=10)
                break
            except (AssertionError, subprocess.TimeoutExpired):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (top / "dockerd.log").read_text(errors="replace")[-1500:]
                    pytest.skip(f"dockerd did not start here: {tail}")
                time.sleep(0.2)
        subprocess.run(
            [client, "import", "-", IMAGE],
            input=_image_tar(top / "image"),
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        yield daemon
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            ids = Docker(client, env, data_root).run("ps", "-aq").split()
            if ids:
                Docker(client, env, data_root).run("rm", "-f", *ids)
        _stop(proc)
        log.close()
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def _container(docker: Docker, name: str) -> Iterator[str]:
    """A running container (busybox sleeping); removed when the block exits."""
    cid = docker.run(
        "run", "-d", "--network=none", "--name", name, IMAGE, "/bin/sleep", "600"
    ).strip()
    try:
        yield cid
    finally:
        docker.run("rm", "-f", cid)


def _mount_of(docker: Docker, cid: str) -> Discovered:
    """The container's overlay, found in the mount table by MountSource."""
    source = MountSource(
        mountpoint_glob=f"{docker.data_root}/overlay2/*/merged", docker_root=docker.data_root
    )
    found = [m for m in source.scan().values() if m.labels.get("container_id") == cid]
    assert len(found) == 1, f"container {cid[:12]} not found in the mount table"
    return found[0]


def _docker_diff(docker: Docker, cid: str) -> set[str]:
    return set(docker.run("diff", cid).splitlines())


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_compute_equals_docker_diff(docker: Docker, case: dict[str, Any]) -> None:
    """On a live container, compute() on its upper prints exactly what `docker diff` prints."""
    with _container(docker, f"lw-{case['name'].replace('_', '-')}") as cid:
        docker.run("exec", "-w", "/", cid, "/bin/sh", "-c", case["ops"])
        mount = _mount_of(docker, cid)
        assert mount.labels["runtime"] == "docker"
        got = {f"{c.kind.value} {os.fsdecode(c.path)}" for c in compute(mount.upper, mount.lowers)}
        assert got == _docker_diff(docker, cid)


async def test_mount_source_follows_container_start_and_stop(docker: Docker) -> None:
    """A container started and stopped while MountSource runs appears and disappears, named."""
    source = MountSource(
        mountpoint_glob=f"{docker.data_root}/overlay2/*/merged",
        docker_root=docker.data_root,
        interval=60,  # the mount-table notification must do it, not the fallback rescan
    )
    async with contextlib.aclosing(source.changes()) as changes:
        pending = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.1)
        assert not pending.done()
        run = ("run", "-d", "--network=none", "--name", "lw-follow", IMAGE, "/bin/sleep", "600")
        cid = (await asyncio.to_thread(docker.run, *run)).strip()
        try:
            # dockerd may mount and unmount the layer while creating the container: wait
            # for the mount that is up now that `run -d` has returned.
            current = _mount_of(docker, cid)
            seen = [await asyncio.wait_for(pending, 10)]
            while seen[-1] != MountChange(MountEvent.APPEARED, current):
                seen.append(await asyncio.wait_for(anext(changes), 10))
        finally:
            await asyncio.to_thread(docker.run, "rm", "-f", cid)
        assert current.labels["container_id"] == cid
        assert current.labels["container_name"] == "lw-follow"
        assert current.labels["image"] == IMAGE
        while seen[-1] != MountChange(MountEvent.DISAPPEARED, current):
            seen.append(await asyncio.wait_for(anext(changes), 10))
        assert not [c for c in seen if c.mount.labels["layer_id"].endswith("-init")]


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds (bounded by 15 s)."""
    async with asyncio.timeout(15):
        while not predicate():  # noqa: ASYNC110 (state owned by another task: poll it)
            await asyncio.sleep(0.05)


async def test_service_follows_containers_live(docker: Docker, tmp_path: Path) -> None:
    """The service picks containers up as they start, keeps each list equal to `docker diff`
    live, names the container in every event, and releases containers that are removed."""
    config = parse(
        {
            "discovery": {
                "mountpoint_glob": f"{docker.data_root}/overlay2/*/merged",
                "docker_root": str(docker.data_root),
                "interval": "1s",
            },
            "spool": {"path": str(tmp_path / "spool.db")},
            "sinks": {"file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
        }
    )
    service = Service(config)
    task = asyncio.create_task(service.run(signals=False))
    cases = [c for c in CASES["cases"] if c["expect"]][:6]
    cids: dict[str, str] = {}
    try:
        await asyncio.wait_for(service.started.wait(), 30)
        for case in cases:
            name = f"lw-live-{case['name'].replace('_', '-')}"
            run = ("run", "-d", "--network=none", "--name", name, IMAGE, "/bin/sleep", "600")
            cid = (await asyncio.to_thread(docker.run, *run)).strip()
            cids[cid] = case["name"]
            mount = f"docker-{cid[:12]}"
            await _until(functools.partial(operator.contains, service.mounts, mount))
            ops = ("exec", "-w", "/", cid, "/bin/sh", "-c", case["ops"])
            await asyncio.to_thread(docker.run, *ops)
            async with asyncio.timeout(10):
                await service.sync()
            live = {f"{c.kind.value} {os.fsdecode(c.path)}" for c in service.changes(mount)[0]}
            assert live == _docker_diff(docker, cid), case["name"]
        gone = next(iter(cids))
        await asyncio.to_thread(docker.run, "rm", "-f", gone)
        await _until(lambda: f"docker-{gone[:12]}" not in service.mounts)
    finally:
        service.stop.set()
        await asyncio.wait_for(task, 60)
        for cid in list(cids)[1:]:
            await asyncio.to_thread(docker.run, "rm", "-f", cid)
    events = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    changes = [e["data"] for e in events if e["type"] == "io.layerwatch.change"]
    for cid in cids:
        mine = [d for d in changes if d["mount"] == f"docker-{cid[:12]}"]
        assert mine, f"no events for container {cids[cid]}"
        assert all(d["labels"]["container_id"] == cid for d in mine)
        assert all(d["labels"]["runtime"] == "docker" for d in mine)


async def test_a_write_in_a_container_is_attributed_to_it(docker: Docker, tmp_path: Path) -> None:
    """With ``[discovery] attribution = true`` (fanotify), a file written by a process inside
    the container (``docker exec``) is a change event naming that process, in that container's
    cgroup, with the container's id."""
    config = parse(
        {
            "discovery": {
                "mountpoint_glob": f"{docker.data_root}/overlay2/*/merged",
                "docker_root": str(docker.data_root),
                "interval": "1s",
                "attribution": True,
            },
            "spool": {"path": str(tmp_path / "spool.db")},
            "sinks": {"file": {"type": "jsonl", "path": str(tmp_path / "events.jsonl")}},
        }
    )
    service = Service(config)
    task = asyncio.create_task(service.run(signals=False))
    with _container(docker, "lw-attributed") as cid:
        try:
            await asyncio.wait_for(service.started.wait(), 30)
            mount = f"docker-{cid[:12]}"
            await _until(functools.partial(operator.contains, service.mounts, mount))
            assert service.mounts[mount].attribution
            upper = service.mounts[mount].tracker.upper
            # The writer stays a few seconds: /proc is read when its event is read.
            script = "echo x > /written-inside; sleep 5; true"
            writer = asyncio.create_task(
                asyncio.to_thread(docker.run, "exec", cid, "/bin/sh", "-c", script)
            )
            await _until(lambda: os.path.exists(upper + b"/written-inside"))
            async with asyncio.timeout(10):
                await service.sync()
            await writer
        finally:
            service.stop.set()
            await asyncio.wait_for(task, 60)
    events = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    mine = [
        e["data"]
        for e in events
        if e["type"] == "io.layerwatch.change" and e["data"].get("path") == "/written-inside"
    ]
    assert mine, "no event for the file written in the container"
    process = mine[-1]["process"]
    assert process["comm"] == "sh"
    assert process["container"] == cid
    assert cid in process["cgroup"]
    assert process["pid"] > 0
