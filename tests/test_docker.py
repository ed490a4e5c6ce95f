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
import sys
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


# ---------------------------------------------------------------------------------------------
# `layerwatch diff CONTAINER` and `layerwatch diff --image`, against the same dockerd

CLI_OPS = (
    "mkdir -p new/a/b && echo n > new/a-b && echo more >> data/file1 && rm data/file2"
    " && rm -rf data/sub && mkdir data/sub && echo q > data/sub/a && chmod 700 data/dir2"
)


def _layerwatch(docker: Docker, *args: str) -> subprocess.CompletedProcess[str]:
    """``layerwatch ARGS --docker-root ROOT`` in a child process (this checkout's code)."""
    return subprocess.run(
        [sys.executable, "-m", "watcher.cli", *args, "--docker-root", str(docker.data_root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def _by_path(lines: list[str]) -> list[str]:
    """``K /path`` lines sorted by path bytes: layerwatch's order. `docker diff` prints the same
    lines in an order that changes from call to call (Go map iteration: six calls on one
    container gave five orders), so its output is compared sorted."""
    return sorted(lines, key=lambda line: line[2:].encode())


def test_cli_diff_of_a_container_prints_what_docker_diff_prints(docker: Docker) -> None:
    """`layerwatch diff` by name, full id and short id prints the lines `docker diff` prints
    (sorted by path), while the container runs and after it stopped (read from its layer
    dirs then); with --exit-code and --format it exits 1 and prints the template."""
    with _container(docker, "lw-cli-diff") as cid:
        docker.run("exec", "-w", "/", cid, "/bin/sh", "-c", CLI_OPS)
        for state in ("running", "stopped"):
            if state == "stopped":
                docker.run("stop", "-t", "0", cid)
                assert not _mounted(docker, cid), "the stopped container is still mounted"
            expected = _by_path(docker.run("diff", "lw-cli-diff").splitlines())
            assert "A /new/a-b" in expected
            for ref in ("lw-cli-diff", cid, cid[:7]):
                proc = _layerwatch(docker, "diff", ref)
                assert (proc.returncode, proc.stderr) == (0, ""), (state, ref)
                assert proc.stdout.splitlines() == expected, (state, ref)
            proc = _layerwatch(docker, "diff", "--exit-code", "--format", "{{.Path}}", cid[:12])
            assert proc.returncode == 1
            assert proc.stdout.splitlines() == [line[2:] for line in expected]


def _mounted(docker: Docker, cid: str) -> bool:
    layer = (
        (docker.data_root / "image/overlay2/layerdb/mounts" / cid / "mount-id").read_text().strip()
    )
    merged = f"{docker.data_root}/overlay2/{layer}/merged"
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == merged for line in table)


def test_cli_diff_of_an_unknown_container_exits_2_naming_the_candidates(docker: Docker) -> None:
    """A name no container has exits 2 with one error line that lists the containers."""
    with _container(docker, "lw-cli-known") as cid:
        proc = _layerwatch(docker, "diff", "no-such-container")
        assert proc.returncode == 2
        assert proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert line.startswith("layerwatch: error: no such container: 'no-such-container'")
        assert f"lw-cli-known ({cid[:12]})" in line


def test_cli_diff_of_an_image_layer_lists_what_the_layer_did(docker: Docker) -> None:
    """`diff --image NAME --layer N`: the committed layer lists what `docker diff` listed for
    the container it was committed from; the base layer lists every path of the imported tar
    as added."""
    with _container(docker, "lw-cli-commit") as cid:
        docker.run("exec", "-w", "/", cid, "/bin/sh", "-c", CLI_OPS)
        expected = _by_path(docker.run("diff", cid).splitlines())
        docker.run("commit", cid, "layerwatch-test:committed")
    try:
        for layer in ("1", "-1"):
            proc = _layerwatch(
                docker, "diff", "--image", "layerwatch-test:committed", "--layer", layer
            )
            assert (proc.returncode, proc.stderr) == (0, ""), layer
            assert proc.stdout.splitlines() == expected
        diff_id = orjson.loads(docker.run("image", "inspect", "layerwatch-test:committed"))[0][
            "RootFS"
        ]["Layers"][1]
        proc = _layerwatch(
            docker, "diff", "--image", "layerwatch-test:committed", "--layer", diff_id[:19]
        )
        assert proc.stdout.splitlines() == expected
        base = _layerwatch(docker, "diff", "--image", IMAGE, "--layer", "0")
        assert base.returncode == 0, base.stderr
        with tarfile.open(fileobj=io.BytesIO(_image_tar(Path(tempfile.mkdtemp())))) as tar:
            names = {"/" + m.name.removeprefix("./") for m in tar.getmembers() if m.name != "."}
        assert set(base.stdout.splitlines()) == {f"A {name}" for name in names}
        proc = _layerwatch(docker, "diff", "--image", IMAGE, "--layer", "1")
        assert proc.returncode == 2
        assert "has 1 layers" in proc.stderr
    finally:
        docker.run("rmi", "layerwatch-test:committed")


def _ctr(docker: Docker, *args: str) -> str:
    """``ctr`` against the containerd this dockerd runs, in a namespace of the test's own."""
    sock = docker.data_root.parent / "exec" / "containerd" / "containerd.sock"
    proc = subprocess.run(
        ["ctr", "-a", str(sock), "-n", "layerwatch-test", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def test_cli_diff_of_a_containerd_container(docker: Docker) -> None:
    """A container run by containerd itself (`ctr run`, overlayfs snapshotter; dockerd's own
    containerd, in a namespace of its own) is found by name through discovery's containerd
    recogniser, and its list is the one `docker diff` gives for the same operations on the
    same image (the lines containerd's runtime adds itself aside: /run, its default mount)."""
    if shutil.which("ctr") is None:
        pytest.skip("ctr not installed (Debian containerd): no containerd container")
    state = docker.data_root.parent / "exec" / "containerd" / "daemon"
    with _container(docker, "lw-cli-twin") as cid:
        docker.run("exec", "-w", "/", cid, "/bin/sh", "-c", CLI_OPS)
        expected = _by_path(docker.run("diff", cid).splitlines())
    image = subprocess.run(
        [docker.docker, "save", IMAGE], env=docker.env, capture_output=True, check=True, timeout=60
    ).stdout
    sock = docker.data_root.parent / "exec" / "containerd" / "containerd.sock"
    subprocess.run(
        ["ctr", "-a", str(sock), "-n", "layerwatch-test", "images", "import", "-"],
        input=image,
        capture_output=True,
        check=True,
        timeout=60,
    )
    ref = f"docker.io/library/{IMAGE}"
    _ctr(docker, "run", "-d", "--snapshotter", "overlayfs", ref, "lw-ctd", "/bin/sleep", "600")
    try:
        _ctr(
            docker,
            "task",
            "exec",
            "--exec-id",
            "ops",
            "--cwd",
            "/",
            "lw-ctd",
            "/bin/sh",
            "-c",
            CLI_OPS,
        )
        for name in ("lw-ctd", "lw-ct"):
            proc = _layerwatch(docker, "diff", name, "--containerd-state", str(state))
            assert (proc.returncode, proc.stderr) == (0, ""), name
            got = proc.stdout.splitlines()
            assert [line for line in got if line != "A /run"] == expected, name
    finally:
        with contextlib.suppress(AssertionError):
            _ctr(docker, "task", "kill", "-s", "KILL", "lw-ctd")
        for _ in range(50):
            try:
                _ctr(docker, "task", "rm", "-f", "lw-ctd")
                break
            except AssertionError:
                time.sleep(0.1)
        _ctr(docker, "containers", "rm", "lw-ctd")
        _ctr(docker, "images", "rm", ref)


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
