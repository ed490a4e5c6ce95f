"""Mount discovery: overlay mounts appearing and disappearing, recognised by runtime.

``MountSource`` reads ``/proc/self/mountinfo`` (or another namespace's, such as
``/proc/1/mountinfo``) whenever the kernel signals a mount-table change (``POLLPRI`` on the
open file) and, as a fallback, every ``interval`` seconds; it yields the overlay mounts with
an upper directory that match its filter, as they appear and disappear.

Recognisers label what they know about each mount:

- Docker ``overlay2``: mountpoint ``DATA_ROOT/overlay2/<layer>/merged``. The container is
  the one whose ``DATA_ROOT/image/overlay2/layerdb/mounts/<cid>/mount-id`` names the layer;
  its name and image come from ``DATA_ROOT/containers/<cid>/config.v2.json`` (the layout is
  ``watcher.live.docker``'s, which ``layerwatch diff CONTAINER`` reads too). The
  ``<layer>-init`` mounts dockerd makes while creating a container are left out.
- containerd: mountpoint ``STATE/io.containerd.runtime.v2.task/<namespace>/<id>/rootfs``
  (upper under ``.../snapshots/<n>/fs``); Kubernetes names come from the bundle's
  ``config.json`` annotations.
- Anything else: ``runtime=overlay`` and no other labels.

Only overlayfs is discovered: it is the one union filesystem whose layers mountinfo names.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fnmatch
import json
import os
import select
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import structlog

from watcher.core.errors import MountError
from watcher.core.mounts import MountInfo, read_mountinfo
from watcher.live.docker import DockerRoot

__all__ = ["Discovered", "MountChange", "MountEvent", "MountSource"]

logger = structlog.get_logger("layerwatch.discovery")

_CONTAINERD_TASKS = b"io.containerd.runtime.v2.task"
_K8S_ANNOTATIONS = {
    "io.kubernetes.cri.container-name": "container_name",
    "io.kubernetes.cri.sandbox-name": "pod_name",
    "io.kubernetes.cri.sandbox-namespace": "pod_namespace",
}


@dataclass(frozen=True, slots=True)
class Discovered:
    """An overlay mount found in the mount table.

    Attributes:
        mountpoint: The merged directory.
        upper: The upper (writable) directory, symlinks resolved.
        lowers: The lower layers, top first, symlinks resolved.
        work: The work directory, when mountinfo names one.
        labels: What the recogniser knows: ``runtime`` (``docker``, ``containerd`` or
            ``overlay``) and, where found, ``container_id``, ``container_name``, ``image``,
            ``namespace``, ``pod_name``, ``pod_namespace``, ``layer_id``.
        mount_id: The kernel's mount id (unique while the mount exists).
    """

    mountpoint: bytes
    upper: bytes
    lowers: tuple[bytes, ...]
    work: bytes | None
    labels: dict[str, str] = field(default_factory=dict)
    mount_id: int = 0


class MountEvent(enum.StrEnum):
    """What happened to a discovered mount."""

    APPEARED = "appeared"
    DISAPPEARED = "disappeared"


@dataclass(frozen=True, slots=True)
class MountChange:
    """A mount appeared or disappeared (``mount`` is as it was when it appeared)."""

    event: MountEvent
    mount: Discovered


class MountSource:
    """Yields overlay mounts matching a filter as they appear and disappear.

    Args:
        mountpoint_glob: Only mountpoints matching this ``fnmatch`` pattern (None: all).
        docker_root: Docker's data root (``--data-root``), for the overlay2 recogniser.
        containerd_state: containerd's state directory, for the containerd recogniser.
        interval: Seconds between fallback rescans (changes are normally seen at once).
        mountinfo: The mount table to read; ``/proc/1/mountinfo`` sees the host's mounts
            from a container sharing the host PID namespace.

    Example:
        >>> async def follow() -> None:  # doctest: +SKIP
        ...     source = MountSource(mountpoint_glob="/var/lib/docker/*")
        ...     async with contextlib.aclosing(source.changes()) as changes:
        ...         async for change in changes:
        ...             print(change.event, change.mount.labels.get("container_name"))
    """

    def __init__(
        self,
        *,
        mountpoint_glob: str | None = None,
        docker_root: str | bytes | os.PathLike[str] = "/var/lib/docker",
        containerd_state: str | bytes | os.PathLike[str] = "/run/containerd",
        interval: float = 2.0,
        mountinfo: str = "/proc/self/mountinfo",
    ) -> None:
        self._glob = os.fsencode(mountpoint_glob) if mountpoint_glob is not None else None
        self._docker = os.fsencode(docker_root).rstrip(b"/")
        self._containerd = os.fsencode(containerd_state).rstrip(b"/")
        self._interval = interval
        self._mountinfo = mountinfo
        self._known: dict[int, Discovered] = {}
        self._docker_mounts: dict[bytes, bytes] = {}  # layer id -> container id

    def scan(self) -> dict[int, Discovered]:
        """The matching overlay mounts now, by mount id.

        Raises:
            MountError: The mount table cannot be read.
        """
        try:
            table = read_mountinfo(self._mountinfo)
        except OSError as exc:
            raise MountError(f"cannot read {self._mountinfo}: {exc.strerror}") from exc
        found: dict[int, Discovered] = {}
        for info in table:
            if info.fstype != "overlay":
                continue
            if self._glob is not None and not fnmatch.fnmatchcase(info.mountpoint, self._glob):
                continue
            layer = self._docker_layer(info.mountpoint)
            if layer is not None and layer.endswith(b"-init"):
                continue  # dockerd mounts a container's init layer briefly while creating it
            known = self._known.get(info.mount_id)
            if known is not None and known.mountpoint == info.mountpoint:
                found[info.mount_id] = known
                continue
            mount = self._recognise(info)
            if mount is not None:
                found[info.mount_id] = mount
        return found

    def poll(self) -> list[MountChange]:
        """Rescan and return what changed since the last call (disappearances first)."""
        now = self.scan()
        changes = [
            MountChange(MountEvent.DISAPPEARED, mount)
            for mount_id, mount in self._known.items()
            if mount_id not in now
        ]
        changes += [
            MountChange(MountEvent.APPEARED, mount)
            for mount_id, mount in now.items()
            if mount_id not in self._known
        ]
        self._known = now
        for change in changes:
            logger.info(
                "mount_discovery",
                change=change.event.value,
                mountpoint=change.mount.mountpoint,
                labels=change.mount.labels,
            )
        return changes

    async def changes(self) -> AsyncGenerator[MountChange, None]:
        """Every mount present at start as ``APPEARED``, then each change as it happens.

        Runs until the consumer stops; close it with ``contextlib.aclosing`` so the
        mount-table watch is released at once.

        Raises:
            MountError: The mount table cannot be opened or read.
        """
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        with contextlib.ExitStack() as stack:
            self._watch_table(loop, woken, stack)
            while True:
                for change in self.poll():
                    yield change
                # Not wait_for: on Python 3.11 it swallows a cancel that lands as the table
                # changes, and the service's stop then waits for discovery forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await woken.wait()
                woken.clear()

    def _watch_table(
        self, loop: asyncio.AbstractEventLoop, woken: asyncio.Event, stack: contextlib.ExitStack
    ) -> None:
        """Set ``woken`` whenever the kernel reports a mount-table change (POLLPRI)."""
        try:
            fd = os.open(self._mountinfo, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MountError(f"cannot open {self._mountinfo}: {exc.strerror}") from exc
        stack.callback(os.close, fd)
        epoll = select.epoll()
        stack.callback(epoll.close)
        epoll.register(fd, select.EPOLLPRI | select.EPOLLERR)

        def wake() -> None:
            epoll.poll(0)
            woken.set()

        loop.add_reader(epoll.fileno(), wake)
        stack.callback(loop.remove_reader, epoll.fileno())

    def _recognise(self, info: MountInfo) -> Discovered | None:
        try:
            upper, lowers, work = info.overlay_dirs()
        except MountError:
            return None  # a read-only overlay: nothing is written, nothing to watch
        labels = self._docker_labels(info.mountpoint) or self._containerd_labels(info.mountpoint)
        # Layer paths are resolved: Docker names lowers by short symlinks (overlay2/l/ID)
        # to keep the mount options short; the kernel resolved them when it mounted.
        return Discovered(
            mountpoint=info.mountpoint,
            upper=os.path.realpath(upper),
            lowers=tuple(os.path.realpath(p) for p in lowers),
            work=os.path.realpath(work) if work is not None else None,
            labels=labels or {"runtime": "overlay"},
            mount_id=info.mount_id,
        )

    def _docker_layer(self, mountpoint: bytes) -> bytes | None:
        """The overlay2 layer id of a Docker mount, or None when it is not one."""
        overlay2 = self._docker + b"/overlay2/"
        if not (mountpoint.startswith(overlay2) and mountpoint.endswith(b"/merged")):
            return None
        layer = mountpoint[len(overlay2) : -len(b"/merged")]
        return None if b"/" in layer else layer

    def _docker_labels(self, mountpoint: bytes) -> dict[str, str] | None:
        layer = self._docker_layer(mountpoint)
        if layer is None:
            return None
        labels = {"runtime": "docker", "layer_id": os.fsdecode(layer)}
        cid = self._docker_mounts.get(layer)
        if cid is None:
            self._docker_mounts = DockerRoot(self._docker).layer_owners()
            cid = self._docker_mounts.get(layer)
        if cid is None:
            return labels  # an image build step, or a container created outside the root
        labels["container_id"] = os.fsdecode(cid)
        config = _read_json(self._docker + b"/containers/" + cid + b"/config.v2.json")
        name = config.get("Name")
        if isinstance(name, str):
            labels["container_name"] = name.lstrip("/")
        image = (config.get("Config") or {}).get("Image")
        if isinstance(image, str):
            labels["image"] = image
        return labels

    def _containerd_labels(self, mountpoint: bytes) -> dict[str, str] | None:
        tasks = self._containerd + b"/" + _CONTAINERD_TASKS + b"/"
        if not (mountpoint.startswith(tasks) and mountpoint.endswith(b"/rootfs")):
            return None
        parts = mountpoint[len(tasks) : -len(b"/rootfs")].split(b"/")
        if len(parts) != 2:
            return None
        namespace, cid = (os.fsdecode(p) for p in parts)
        labels = {"runtime": "containerd", "namespace": namespace, "container_id": cid}
        config = _read_json(mountpoint[: -len(b"/rootfs")] + b"/config.json")
        annotations = config.get("annotations") or {}
        for key, label in _K8S_ANNOTATIONS.items():
            value = annotations.get(key)
            if isinstance(value, str):
                labels[label] = value
        return labels


def _read_json(path: bytes) -> dict[str, Any]:
    """A JSON object from ``path``; empty when it is missing or malformed (logged)."""
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("discovery_bad_json", path=path, error=str(exc))
        return {}
    return value if isinstance(value, dict) else {}
