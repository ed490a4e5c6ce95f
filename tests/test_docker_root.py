"""Resolving container and image names in a Docker data root laid out on disk.

The data root is written by the test in the layout dockerd's ``overlay2`` driver uses (the
files ``watcher.live.docker`` documents), because the cases here need ids chosen by hand (two
containers sharing a prefix); ``tests/test_docker.py`` runs the same code against a real
dockerd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.core.errors import LayerError, LookupFailed
from watcher.live.docker import DockerRoot

REPO = Path(__file__).resolve().parents[1]
IDS = {"abc1" + "0" * 60: "web", "abc2" + "0" * 60: "db", "f00d" + "0" * 60: "abc1"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with three containers: two ids share the prefix ``abc``, and one
    container is named like another's id prefix."""
    for cid, name in IDS.items():
        directory = tmp_path / "containers" / cid
        directory.mkdir(parents=True)
        config = {"ID": cid, "Name": f"/{name}", "Config": {"Image": "busybox"}}
        (directory / "config.v2.json").write_text(json.dumps(config))
        layer = tmp_path / "image/overlay2/layerdb/mounts" / cid
        layer.mkdir(parents=True)
        (layer / "mount-id").write_text(f"layer-{name}")
        (tmp_path / "overlay2" / f"layer-{name}" / "diff").mkdir(parents=True)
    return tmp_path


def test_full_id_then_name_then_unique_prefix(root: Path) -> None:
    """A name resolves as the docker CLI resolves it: full id, exact name, unique id prefix."""
    docker = DockerRoot(root)
    web, db, other = IDS
    assert docker.resolve_container(web) == web
    assert docker.resolve_container("db") == db
    assert docker.resolve_container("/db") == db
    assert docker.resolve_container("abc2") == db
    assert docker.resolve_container("abc1") == other  # a name wins over an id prefix
    assert docker.container("web").upper == bytes(root / "overlay2/layer-web/diff")


def test_an_ambiguous_prefix_names_both_candidates(root: Path) -> None:
    """A prefix two ids share is an error that lists both containers by short id and name."""
    with pytest.raises(LookupFailed, match="ambiguous") as caught:
        DockerRoot(root).resolve_container("abc")
    assert "abc100000000 (web)" in str(caught.value)
    assert "abc200000000 (db)" in str(caught.value)


def test_cli_exits_2_on_an_ambiguous_prefix(root: Path) -> None:
    """`layerwatch diff abc` exits 2 with one error line naming the candidates."""
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "diff", "abc", "--docker-root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("layerwatch: error: container id prefix 'abc' is ambiguous")
    assert "(web)" in line
    assert "(db)" in line
    assert "containerd" not in line  # an ambiguous Docker name is not looked for elsewhere


def test_not_a_data_root_says_so(tmp_path: Path) -> None:
    """A directory without ``containers/`` is named as not being a Docker data root."""
    with pytest.raises(LayerError, match="is not a Docker data root"):
        DockerRoot(tmp_path).resolve_container("web")
