"""The service with [discovery]: overlay mounts are followed as they appear and released as
they go; a mount the config already follows is not followed twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from overlay import LayerEntry, build_layer, mount_overlay, requires_overlay

from watcher.core.model import Kind
from watcher.service.config import parse
from watcher.service.service import Service

pytestmark = [requires_overlay, pytest.mark.root]


def _lower(root: Path) -> str:
    path = root / "lower"
    path.mkdir(parents=True)
    build_layer(str(path), [LayerEntry("file", b"etc/motd", b"hi\n")])
    return str(path)


async def _until(service: Service, count: int) -> None:
    """Wait (bounded) until the service follows ``count`` mounts."""
    async with asyncio.timeout(15):
        while len(service.mounts) != count:  # noqa: ASYNC110 (state of another task: poll it)
            await asyncio.sleep(0.02)


async def test_discovery_follows_and_releases_without_doubling(tmp_path: Path) -> None:
    """A configured mount stays the only tracker of its branch; a new overlay is followed
    with labels on its events, then released when unmounted."""
    with contextlib.ExitStack() as stack:
        (tmp_path / "a").mkdir()
        first = stack.enter_context(mount_overlay(str(tmp_path / "a"), [_lower(tmp_path / "la")]))
        config = parse(
            {
                "mounts": [{"name": "configured", "mountpoint": first.merged}],
                "discovery": {"mountpoint_glob": f"{tmp_path}/*/merged", "interval": "0.2s"},
                "spool": {"path": str(tmp_path / "spool.db")},
            }
        )
        service = Service(config)
        task = asyncio.create_task(service.run(signals=False))
        try:
            async with asyncio.timeout(30):
                await service.started.wait()
            await asyncio.sleep(0.5)  # discovery's first scan sees the configured mount too
            assert list(service.mounts) == ["configured"]
            (tmp_path / "b").mkdir()
            with mount_overlay(str(tmp_path / "b"), [_lower(tmp_path / "lb")]) as second:
                await _until(service, 2)
                (found,) = (name for name in service.mounts if name != "configured")
                assert found.startswith("overlay-")
                await asyncio.to_thread(Path(second.merged, "new").write_bytes, b"x")
                await service.sync()
                changes, _seq = service.changes(found)
                assert [(c.path, c.kind) for c in changes] == [(b"/new", Kind.ADDED)]
                assert service.publisher is not None
                assert service.publisher.labels[found]["runtime"] == "overlay"
            await _until(service, 1)
            assert list(service.mounts) == ["configured"]
        finally:
            service.stop.set()
            await asyncio.wait_for(task, 30)
        assert await asyncio.to_thread(os.path.ismount, first.merged), "attached: left mounted"


async def test_uppers_on_separate_filesystems_are_told_apart(tmp_path: Path) -> None:
    """Two overlays whose uppers have the same inode number on different tmpfs get two names;
    one going away, its tmpfs with it, is released and the service keeps running."""
    config = parse(
        {
            "discovery": {"mountpoint_glob": f"{tmp_path}/*/merged", "interval": "0.2s"},
            "spool": {"path": str(tmp_path / "spool.db")},
        }
    )
    stacks = {name: contextlib.ExitStack() for name in ("a", "b")}
    with stacks["a"], stacks["b"]:
        for name, stack in stacks.items():
            base = tmp_path / name
            base.mkdir()
            mount = ["mount", "-t", "tmpfs", "tmpfs", str(base)]
            await asyncio.to_thread(subprocess.run, mount, check=True)
            stack.callback(subprocess.run, ["umount", "-l", str(base)], check=False)
            stack.enter_context(mount_overlay(str(base), [_lower(tmp_path / f"l{name}")]))
        service = Service(config)
        task = asyncio.create_task(service.run(signals=False))
        try:
            async with asyncio.timeout(30):
                await service.started.wait()
            await _until(service, 2)
            await asyncio.to_thread(stacks["a"].close)  # the overlay, then its upper's tmpfs
            await _until(service, 1)
            assert not task.done()
        finally:
            service.stop.set()
            await asyncio.wait_for(task, 30)
