"""Docker's data root (``overlay2`` storage driver): containers and image layers on disk.

What is read, under ``DATA_ROOT`` (``dockerd --data-root``, default ``/var/lib/docker``):

- ``containers/<cid>/config.v2.json``: a container's id, ``Name`` and ``Config.Image``.
- ``image/overlay2/layerdb/mounts/<cid>/mount-id``: the ``overlay2`` directory holding the
  container's writable layer; ``overlay2/<id>/diff`` is its upper, ``overlay2/<id>/lower``
  lists its lowers (``l/<short>`` links, top first, the ``-init`` layer included), and
  ``overlay2/<id>/merged`` is where it is mounted while the container runs. A stopped
  container keeps its upper and lowers: its change list is computed from them.
- ``image/overlay2/repositories.json``: image names and tags to image ids;
  ``image/overlay2/imagedb/content/sha256/<id>``: the image config, whose ``rootfs.diff_ids``
  are the layers, base first; a layer's chain id (``sha256`` of the chain id below it, a
  space and its diff id) names ``image/overlay2/layerdb/sha256/<chain>/cache-id``, the
  ``overlay2`` directory whose ``diff`` holds the layer.

Names resolve the way the docker CLI resolves them: a full id, then an exact name, then a
unique id prefix. Nothing here writes to the data root.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from watcher.core.errors import LayerError, LookupFailed

__all__ = ["Container", "DockerRoot", "ImageLayer"]

_MAX_LISTED = 10
"""How many candidates an error message names."""


@dataclass(frozen=True, slots=True)
class Container:
    """A Docker container's writable layer, running or not.

    Attributes:
        id: The full container id.
        name: The container's name, without Docker's leading ``/``.
        image: The image it was created from, as given to ``docker run``.
        layer_id: The ``overlay2`` directory name of its writable layer.
        upper: The writable layer (``overlay2/<layer_id>/diff``).
        lowers: The layers below it, top first, links resolved (the ``-init`` layer first).
        merged: Where the container's root is mounted while it runs.
    """

    id: str
    name: str
    image: str
    layer_id: str
    upper: bytes
    lowers: tuple[bytes, ...]
    merged: bytes


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One layer of an image and the layers below it.

    Attributes:
        image_id: The image id (``sha256:...``).
        index: The layer's position, 0 for the base layer.
        count: How many layers the image has.
        diff_id: The layer's diff id (``sha256:...``, what ``docker inspect`` lists).
        upper: The layer's own directory (``overlay2/<cache-id>/diff``).
        lowers: The directories of the layers below it, top first (empty for the base).
    """

    image_id: str
    index: int
    count: int
    diff_id: str
    upper: bytes
    lowers: tuple[bytes, ...]


def _candidates(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _read_json(path: bytes) -> dict[str, Any]:
    """The JSON object at ``path``.

    Raises:
        LayerError: it cannot be read or is not a JSON object.
    """
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except OSError as exc:
        raise LayerError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc
    except ValueError as exc:
        raise LayerError(f"{os.fsdecode(path)} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise LayerError(f"{os.fsdecode(path)} is not a JSON object")
    return value


def _read_line(path: bytes) -> bytes:
    """The first line of a small file (Docker's one-value files: ``mount-id``, ``cache-id``).

    Raises:
        LayerError: it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as exc:
        raise LayerError(f"cannot read {os.fsdecode(path)}: {exc.strerror}") from exc


class DockerRoot:
    """Docker's data root, read for containers and image layers.

    Args:
        path: The data root (``dockerd --data-root``).
    """

    def __init__(self, path: str | bytes | os.PathLike[str] = "/var/lib/docker") -> None:
        self.path = os.fsencode(path).rstrip(b"/") or b"/"
        self._overlay2 = self.path + b"/overlay2"
        self._layerdb = self.path + b"/image/overlay2/layerdb"

    # -- containers ------------------------------------------------------------------------

    def container_ids(self) -> list[str]:
        """The ids of every container the data root holds, running or not.

        Raises:
            LayerError: the data root has no ``containers`` directory (not a Docker data root).
        """
        try:
            return sorted(os.fsdecode(n) for n in os.listdir(self.path + b"/containers"))
        except OSError as exc:
            raise LayerError(
                f"{os.fsdecode(self.path)} is not a Docker data root "
                f"(cannot list its containers: {exc.strerror}); give --docker-root"
            ) from exc

    def layer_owners(self) -> dict[bytes, bytes]:
        """Writable layer id (``overlay2`` directory name) -> container id, for every
        container whose ``mount-id`` can be read."""
        mounts = self._layerdb + b"/mounts"
        out: dict[bytes, bytes] = {}
        try:
            cids = os.listdir(mounts)
        except OSError:
            return out
        for cid in cids:
            try:
                with open(mounts + b"/" + cid + b"/mount-id", "rb") as f:
                    out[f.read().strip()] = cid
            except OSError:
                continue
        return out

    def _names(self) -> Iterator[tuple[str, str]]:
        """``(id, name)`` of every container whose config can be read."""
        for cid in self.container_ids():
            try:
                config = self.container_config(cid)
            except LayerError:
                continue
            name = config.get("Name")
            yield cid, name.lstrip("/") if isinstance(name, str) else ""

    def container_config(self, cid: str) -> dict[str, Any]:
        """A container's ``config.v2.json``.

        Raises:
            LayerError: it cannot be read or is malformed.
        """
        return _read_json(self.path + b"/containers/" + os.fsencode(cid) + b"/config.v2.json")

    def resolve_container(self, ref: str) -> str:
        """The full id of the container ``ref`` names: a full id, a name, or a unique id prefix.

        Raises:
            LookupFailed: no container, or several (an ambiguous prefix), go by that name; the
                message names the candidates.
            LayerError: the data root cannot be read.
        """
        names = dict(self._names())
        wanted = ref.lstrip("/")
        if ref in names:
            return ref
        by_name = [cid for cid, name in names.items() if name == wanted]
        if by_name:
            return by_name[0]
        by_prefix = [cid for cid in names if ref and cid.startswith(ref.lower())]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if by_prefix:
            found = [f"{cid[:12]} ({names[cid]})" for cid in by_prefix]
            raise LookupFailed(
                f"container id prefix {ref!r} is ambiguous: it matches {_candidates(found)}",
                ambiguous=True,
            )
        known = [f"{name} ({cid[:12]})" for cid, name in sorted(names.items(), key=lambda i: i[1])]
        where = os.fsdecode(self.path)
        if not known:
            raise LookupFailed(f"no such container: {ref!r} (the data root {where} has none)")
        raise LookupFailed(f"no such container: {ref!r}; {where} has {_candidates(known)}")

    def container(self, ref: str) -> Container:
        """The container ``ref`` names (see ``resolve_container``) and its layers.

        Raises:
            LookupFailed: the name is unknown or ambiguous.
            LayerError: its layer is missing from the data root (another storage driver, or
                a damaged root).
        """
        cid = self.resolve_container(ref)
        config = self.container_config(cid)
        mount_id = self._layerdb + b"/mounts/" + os.fsencode(cid) + b"/mount-id"
        if not os.path.exists(mount_id):
            driver = config.get("Driver")
            raise LayerError(
                f"container {cid[:12]} has no overlay2 layer in {os.fsdecode(self.path)} "
                f"(storage driver {driver!r}; layerwatch reads overlay2)"
            )
        layer = _read_line(mount_id)
        directory = self._overlay2 + b"/" + layer
        name = config.get("Name")
        image = (config.get("Config") or {}).get("Image")
        return Container(
            id=cid,
            name=name.lstrip("/") if isinstance(name, str) else "",
            image=image if isinstance(image, str) else "",
            layer_id=os.fsdecode(layer),
            upper=directory + b"/diff",
            lowers=self._lowers(directory),
            merged=directory + b"/merged",
        )

    def _lowers(self, directory: bytes) -> tuple[bytes, ...]:
        """The lowers an ``overlay2`` directory's ``lower`` file names, top first, resolved."""
        lower_file = directory + b"/lower"
        if not os.path.exists(lower_file):
            return ()  # a base layer
        links = _read_line(lower_file).split(b":")
        return tuple(os.path.realpath(self._overlay2 + b"/" + link) for link in links if link)

    # -- images ----------------------------------------------------------------------------

    def resolve_image(self, ref: str) -> str:
        """The image id (``sha256:...``) of ``NAME[:TAG]`` (tag ``latest`` by default), a full
        image id, or a unique image id prefix.

        Raises:
            LookupFailed: no image, or several, go by that name.
            LayerError: the data root has no overlay2 image store.
        """
        store = self.path + b"/image/overlay2"
        content = store + b"/imagedb/content/sha256"
        try:
            ids = sorted("sha256:" + os.fsdecode(n) for n in os.listdir(content))
        except OSError as exc:
            raise LayerError(
                f"{os.fsdecode(self.path)} has no overlay2 image store ({exc.strerror}); "
                "give --docker-root, or the daemon keeps images in containerd"
            ) from exc
        names = store + b"/repositories.json"  # absent until an image is tagged
        repositories = (_read_json(names) if os.path.exists(names) else {}).get("Repositories")
        repositories = repositories if isinstance(repositories, dict) else {}
        tags: dict[str, str] = {}
        for repo in repositories.values():
            if isinstance(repo, dict):
                tags.update({name: iid for name, iid in repo.items() if isinstance(iid, str)})
        wanted = ref.removeprefix("docker.io/").removeprefix("library/")
        if "@" not in wanted and ":" not in wanted.rsplit("/", 1)[-1]:
            wanted += ":latest"
        if wanted in tags:
            return tags[wanted]
        hexref = ref.lower().removeprefix("sha256:")
        by_prefix = [iid for iid in ids if hexref and iid[7:].startswith(hexref)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if by_prefix:
            found = [iid[7:19] for iid in by_prefix]
            raise LookupFailed(
                f"image id prefix {ref!r} is ambiguous: it matches {_candidates(found)}",
                ambiguous=True,
            )
        known = _candidates(sorted(tags)) or "none"
        raise LookupFailed(f"no such image: {ref!r}; the data root has {known}")

    def image_layer(self, ref: str, layer: str) -> ImageLayer:
        """Layer ``layer`` of image ``ref`` (see ``resolve_image``) and the layers below it.

        ``layer`` is an index into the image's layers, 0 for the base (negative counts from
        the top: -1 is the top layer), or a layer's diff id (``sha256:...``, as ``docker
        inspect`` lists them in ``RootFS.Layers``) or a unique prefix of one.

        Raises:
            LookupFailed: the image or layer is unknown or ambiguous.
            LayerError: the image's layers are missing from the data root.
        """
        image_id = self.resolve_image(ref)
        config_path = (
            self.path + b"/image/overlay2/imagedb/content/sha256/" + os.fsencode(image_id[7:])
        )
        diff_ids = (_read_json(config_path).get("rootfs") or {}).get("diff_ids") or []
        if not diff_ids or not all(isinstance(d, str) for d in diff_ids):
            where = os.fsdecode(config_path)
            raise LayerError(f"image {image_id[7:19]} lists no layers in {where}")
        index = self._layer_index(image_id, diff_ids, layer)
        dirs = [self._layer_dir(chain) for chain in _chain_ids(diff_ids[: index + 1])]
        return ImageLayer(
            image_id=image_id,
            index=index,
            count=len(diff_ids),
            diff_id=diff_ids[index],
            upper=dirs[-1],
            lowers=tuple(reversed(dirs[:-1])),
        )

    @staticmethod
    def _layer_index(image_id: str, diff_ids: list[str], layer: str) -> int:
        count = len(diff_ids)
        try:
            index = int(layer)
        except ValueError:
            pass
        else:
            if not -count <= index < count:
                raise LookupFailed(
                    f"image {image_id[7:19]} has {count} layers: give an index from 0 (the base) "
                    f"to {count - 1} (the top), or -1 to -{count} from the top; not {index}"
                )
            return index % count
        hexref = layer.lower().removeprefix("sha256:")
        matches = [i for i, d in enumerate(diff_ids) if hexref and d[7:].startswith(hexref)]
        if len({diff_ids[i] for i in matches}) > 1:
            found = [f"{i}: {diff_ids[i][7:19]}" for i in matches]
            raise LookupFailed(
                f"layer {layer!r} is ambiguous: it matches {_candidates(found)}", ambiguous=True
            )
        if len(matches) > 1:
            at = ", ".join(map(str, matches))
            raise LookupFailed(
                f"layer {layer!r} appears {len(matches)} times in image {image_id[7:19]} "
                f"(at {at}): give its index",
                ambiguous=True,
            )
        if not matches:
            listed = [f"{i}: {d[7:19]}" for i, d in enumerate(diff_ids)]
            raise LookupFailed(
                f"image {image_id[7:19]} has no layer {layer!r}; its layers: {_candidates(listed)}"
            )
        return matches[0]

    def _layer_dir(self, chain_id: str) -> bytes:
        """The ``diff`` directory of the layer with ``chain_id``.

        Raises:
            LayerError: the layer store has no such layer.
        """
        cache = _read_line(self._layerdb + b"/sha256/" + os.fsencode(chain_id[7:]) + b"/cache-id")
        return self._overlay2 + b"/" + cache + b"/diff"


def _chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer: the base's is its diff id, each next one the sha256 of
    ``"<chain id below> <diff id>"`` (the OCI image spec's ChainID)."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            chains.append(f"sha256:{digest}")
    return chains
