"""MountSource on real overlay mounts laid out like Docker's and containerd's directories.

The data roots live in a temp dir (passed to MountSource); the mounts are real overlayfs,
made and removed while the source runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from overlay import requires_overlay, unmount

from watcher.core.errors import MountError
from watcher.live.discovery import Discovered, MountChange, MountEvent, MountSource

pytestmark = [requires_overlay, pytest.mark.root]

CID = "c0ffee" * 10 + "abcd"
LAYER = "4f1e" * 16
LOWER = "9a9a" * 16


def _mount(options: str, target: Path, *, cwd: Path | None = None) -> None:
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(target)], cwd=cwd, check=True
    )


@contextlib.contextmanager
def _unmounting(targets: list[Path]) -> Iterator[list[Path]]:
    """Unmount every path in ``targets`` that is still mounted when the block exits."""
    try:
        yield targets
    finally:
        mounted = Path("/proc/self/mountinfo").read_bytes()
        for target in targets:
            if b" " + os.fsencode(target) + b" " in mounted:
                unmount(str(target))


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Targets a test mounts; any left mounted are unmounted at the end."""
    with _unmounting([]) as targets:
        yield targets


def _docker_root(root: Path) -> Path:
    """A Docker data root with one image layer, one container layer and its config."""
    overlay2 = root / "overlay2"
    (overlay2 / LOWER / "diff").mkdir(parents=True)
    (overlay2 / LOWER / "diff" / "etc").mkdir()
    (overlay2 / "l").mkdir()
    (overlay2 / "l" / "SHORTLOWER").symlink_to(f"../{LOWER}/diff")
    for sub in ("diff", "work", "merged"):
        (overlay2 / LAYER / sub).mkdir(parents=True)
    mount_id = root / "image/overlay2/layerdb/mounts" / CID / "mount-id"
    mount_id.parent.mkdir(parents=True)
    mount_id.write_text(LAYER)
    config = root / "containers" / CID / "config.v2.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"Name": "/web", "Config": {"Image": "busybox:latest"}}))
    return root


def _mount_docker(root: Path, mounts: list[Path]) -> Path:
    """Mount the container layer the way dockerd does: relative paths from overlay2/."""
    merged = root / "overlay2" / LAYER / "merged"
    options = f"lowerdir=l/SHORTLOWER,upperdir={LAYER}/diff,workdir={LAYER}/work"
    _mount(options, merged, cwd=root / "overlay2")
    mounts.append(merged)
    return merged


async def _next(changes: AsyncIterator[MountChange], wait: float = 5) -> MountChange:
    return await asyncio.wait_for(anext(changes), wait)


def test_scan_recognises_a_docker_container(tmp_path: Path, mounts: list[Path]) -> None:
    """A Docker overlay2 mount resolves its relative layers and names its container."""
    root = _docker_root(tmp_path / "docker")
    merged = _mount_docker(root, mounts)
    source = MountSource(docker_root=root, containerd_state=tmp_path / "run")
    found = [m for m in source.scan().values() if m.mountpoint == os.fsencode(merged)]
    assert len(found) == 1
    mount = found[0]
    assert mount.upper == os.fsencode(root / "overlay2" / LAYER / "diff")
    assert mount.work == os.fsencode(root / "overlay2" / LAYER / "work")
    assert mount.lowers == (os.fsencode(root / "overlay2" / LOWER / "diff"),)  # l/ resolved
    assert mount.labels == {
        "runtime": "docker",
        "layer_id": LAYER,
        "container_id": CID,
        "container_name": "web",
        "image": "busybox:latest",
    }


def test_scan_leaves_out_docker_init_layers(tmp_path: Path, mounts: list[Path]) -> None:
    """The `<id>-init` layer dockerd mounts while creating a container is not reported."""
    root = _docker_root(tmp_path / "docker")
    init = root / "overlay2" / f"{LAYER}-init"
    for sub in ("diff", "work", "merged"):
        (init / sub).mkdir(parents=True)
    _mount(f"lowerdir=l/SHORTLOWER,upperdir={LAYER}-init/diff,workdir={LAYER}-init/work",
           init / "merged", cwd=root / "overlay2")  # fmt: skip
    mounts.append(init / "merged")
    merged = _mount_docker(root, mounts)
    found = MountSource(mountpoint_glob=f"{tmp_path}/*", docker_root=root).scan().values()
    assert [m.mountpoint for m in found] == [os.fsencode(merged)]


def test_scan_recognises_a_containerd_task(tmp_path: Path, mounts: list[Path]) -> None:
    """A containerd task rootfs is labelled with its namespace, id and Kubernetes names."""
    state = tmp_path / "run"
    bundle = state / "io.containerd.runtime.v2.task" / "k8s.io" / "abc123"
    (bundle / "rootfs").mkdir(parents=True)
    annotations = {
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.sandbox-name": "web-0",
        "io.kubernetes.cri.sandbox-namespace": "prod",
    }
    (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
    snapshots = tmp_path / "snapshots"
    for sub in ("1/fs", "2/fs", "2/work"):
        (snapshots / sub).mkdir(parents=True)
    _mount(
        f"lowerdir={snapshots}/1/fs,upperdir={snapshots}/2/fs,workdir={snapshots}/2/work",
        bundle / "rootfs",
    )
    mounts.append(bundle / "rootfs")
    source = MountSource(docker_root=tmp_path / "docker", containerd_state=state)
    (mount,) = [m for m in source.scan().values() if m.mountpoint == os.fsencode(bundle / "rootfs")]
    assert mount.upper == os.fsencode(snapshots / "2" / "fs")
    assert mount.lowers == (os.fsencode(snapshots / "1" / "fs"),)
    assert mount.labels == {
        "runtime": "containerd",
        "namespace": "k8s.io",
        "container_id": "abc123",
        "container_name": "app",
        "pod_name": "web-0",
        "pod_namespace": "prod",
    }


def test_scan_filters_by_glob_and_skips_read_only_overlays(
    tmp_path: Path, mounts: list[Path]
) -> None:
    """Only mountpoints matching the glob are found; an overlay without upper never is."""
    for name in ("a", "b"):
        for sub in ("lower", "upper", "work", "merged"):
            (tmp_path / name / sub).mkdir(parents=True)
        base = tmp_path / name
        _mount(
            f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
            base / "merged",
        )
        mounts.append(base / "merged")
    (tmp_path / "ro").mkdir()
    _mount(f"lowerdir={tmp_path}/a/lower:{tmp_path}/b/lower", tmp_path / "ro")
    mounts.append(tmp_path / "ro")
    everything = MountSource(mountpoint_glob=f"{tmp_path}/*").scan().values()
    assert sorted(m.mountpoint for m in everything) == [
        os.fsencode(tmp_path / "a" / "merged"),
        os.fsencode(tmp_path / "b" / "merged"),
    ]
    assert all(m.labels == {"runtime": "overlay"} for m in everything)
    only_b = MountSource(mountpoint_glob=f"{tmp_path}/b/*").scan().values()
    assert [m.mountpoint for m in only_b] == [os.fsencode(tmp_path / "b" / "merged")]


async def test_changes_follow_mounts_and_unmounts(tmp_path: Path, mounts: list[Path]) -> None:
    """Mounting and unmounting while the source runs yields appeared then disappeared."""
    root = _docker_root(tmp_path / "docker")
    merged = os.fsencode(root / "overlay2" / LAYER / "merged")
    source = MountSource(
        mountpoint_glob=f"{tmp_path}/*",
        docker_root=root,
        interval=60,  # POLLPRI, not polling
    )
    async with contextlib.aclosing(source.changes()) as changes:
        pending = asyncio.ensure_future(_next(changes))
        await asyncio.sleep(0.1)
        assert not pending.done()  # nothing mounted yet
        await asyncio.to_thread(_mount_docker, root, mounts)
        appeared = await pending
        assert appeared.event is MountEvent.APPEARED
        assert appeared.mount.mountpoint == merged
        assert appeared.mount.labels["container_name"] == "web"
        await asyncio.to_thread(unmount, os.fsdecode(merged))
        gone = await _next(changes)
        assert gone == MountChange(MountEvent.DISAPPEARED, appeared.mount)


async def test_changes_start_with_existing_mounts(tmp_path: Path, mounts: list[Path]) -> None:
    """Mounts present when the source starts are reported as appeared, once."""
    root = _docker_root(tmp_path / "docker")
    _mount_docker(root, mounts)
    source = MountSource(mountpoint_glob=f"{tmp_path}/*", docker_root=root, interval=0.05)
    async with contextlib.aclosing(source.changes()) as changes:
        first = await _next(changes)
        assert first.event is MountEvent.APPEARED
        assert isinstance(first.mount, Discovered)
        with pytest.raises(TimeoutError):
            await _next(changes, wait=0.3)  # several rescans, no repeats


def test_unreadable_mount_table_is_a_mount_error(tmp_path: Path) -> None:
    """A mount table that cannot be read raises MountError naming it."""
    source = MountSource(mountinfo=str(tmp_path / "nope"))
    with pytest.raises(MountError, match="nope"):
        source.scan()


async def test_a_cancel_that_lands_as_the_table_changes_stops_the_source(tmp_path: Path) -> None:
    """The consumer is cancelled 0 to 7 loop turns after a mount: whichever turn the cancel
    lands on (asyncio.wait_for on 3.11 swallowed it when the wake came in the same turn, and
    the service's stop then waited for discovery forever), the source stops at once."""
    source = MountSource(mountpoint_glob=f"{tmp_path}/none/*", interval=60)
    target = tmp_path / "t"
    target.mkdir()

    async def consume() -> None:
        async with contextlib.aclosing(source.changes()) as changes:
            async for _ in changes:
                pass

    for turns in range(8):
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # reading the table, then waiting for a wake
        # In the loop's thread on purpose: the wake is ready on the loop's next turn.
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)  # noqa: ASYNC221
        try:
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait({task}, timeout=2)
            assert task.cancelled(), f"still running {turns} turns after the mount"
        finally:
            task.cancel()  # a swallowed cancel: stop it for good (its next wait honours this)
            subprocess.run(["umount", str(target)], check=True)  # noqa: ASYNC221
