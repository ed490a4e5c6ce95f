"""What ``diff``, ``watch`` and ``export`` are pointed at, as a ``Filesystem``.

- A mountpoint (an overlay mount; its layers come from mountinfo), or ``--upper DIR`` with
  ``--lower DIR`` repeated (top first): ``filesystem``.
- For ``diff`` also a container (``container``): a Docker container by name, full id or unique
  id prefix, running or stopped (its writable layer and lowers from the data root); or a
  running containerd container by id, id prefix or Kubernetes container name (from its
  rootfs mount, through discovery's containerd recogniser).
- For ``diff --image`` one image layer (``image_layer``): its directory over the layers below it.

A positional argument that contains a ``/`` or names an existing path is a mountpoint;
anything else is a container.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from watcher.core.errors import LayerError, LayerwatchError, LookupFailed
from watcher.core.layers import Whiteouts
from watcher.core.mounts import Driver, Filesystem, find_mount

__all__ = ["container", "filesystem", "image_layer", "is_container_ref"]


def is_container_ref(arg: str) -> bool:
    """Whether a positional argument names a container rather than a mountpoint."""
    return "/" not in arg and not os.path.lexists(arg)


def filesystem(args: argparse.Namespace) -> Filesystem:
    """The union a view command's ``MOUNTPOINT`` or ``--upper``/``--lower`` name.

    Raises:
        LayerwatchError: both forms, or neither, are given.
        MountError: nothing is mounted at the mountpoint, or not a writable overlay.
    """
    if args.mountpoint is not None:
        if args.lower or args.upper:
            raise LayerwatchError("give either a MOUNTPOINT or --lower/--upper, not both")
        return Filesystem.attach(args.mountpoint)
    if not args.lower or args.upper is None:
        raise LayerwatchError("give a MOUNTPOINT, or --upper DIR and at least one --lower DIR")
    driver = Driver.AUFS if args.whiteouts == Whiteouts.AUFS else Driver.OVERLAY
    return Filesystem(args.lower, args.upper, os.devnull, driver=driver)


def container(ref: str, *, docker_root: str, containerd_state: str) -> Filesystem:
    """The union of the container ``ref`` names: Docker's first, then containerd's.

    A running Docker container is read through its mount (which also says whether overlay
    keeps its metadata in ``user.`` xattrs); a stopped one from its layer directories.

    Raises:
        LookupFailed: no container goes by that name, or a prefix matches several; the
            message names the candidates.
        LayerError: the container's layers are missing or unreadable.
    """
    from watcher.live.docker import DockerRoot

    docker = DockerRoot(docker_root)
    try:
        found = docker.container(ref)
    except LookupFailed as exc:
        if exc.ambiguous:
            raise
        docker_problem = str(exc)
    except LayerError as exc:
        if os.path.isdir(docker.path + b"/containers"):
            raise  # a Docker root with a damaged container: say so, do not look further
        docker_problem = str(exc)
    else:
        info = find_mount(found.merged)
        if info is not None and info.fstype == "overlay":
            return Filesystem.attach(found.merged)
        return Filesystem(found.lowers, found.upper, found.merged)
    fs = _containerd(ref, containerd_state)
    if fs is None:
        raise LookupFailed(
            f"{docker_problem}; and no running containerd container under {containerd_state} "
            f"is {ref!r}"
        )
    return fs


def _containerd(ref: str, state: str) -> Filesystem | None:
    """A running containerd container's union, by id, unique id prefix or Kubernetes name.

    Raises:
        LookupFailed: the prefix or name matches several containers.
    """
    from watcher.live.discovery import MountSource

    source = MountSource(mountpoint_glob=f"{state}/*/rootfs", containerd_state=state)
    mounts = [m for m in source.scan().values() if m.labels.get("runtime") == "containerd"]
    tries: list[Callable[[dict[str, str]], bool]] = [
        lambda labels: labels["container_id"] == ref,
        lambda labels: labels.get("container_name") == ref,
        lambda labels: labels["container_id"].startswith(ref),
    ]
    for match in tries:
        hits = [m for m in mounts if match(m.labels)]
        if len(hits) > 1:
            names = ", ".join(
                f"{m.labels['namespace']}/{m.labels['container_id'][:12]}" for m in hits
            )
            raise LookupFailed(
                f"{ref!r} is ambiguous: it matches containerd containers {names}", ambiguous=True
            )
        if hits:
            return Filesystem.attach(hits[0].mountpoint)
    return None


def image_layer(image: str, layer: str, *, docker_root: str) -> Filesystem:
    """One layer of a Docker image over the layers below it.

    Raises:
        LookupFailed: the image or the layer is unknown or ambiguous.
        LayerError: the image's layers are missing from the data root.
    """
    from watcher.live.docker import DockerRoot

    found = DockerRoot(docker_root).image_layer(image, layer)
    return Filesystem(found.lowers, found.upper, os.devnull)
