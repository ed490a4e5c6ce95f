"""Choosing the event source: ``auto``, the explicit choices, and the fallback to inotify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from watcher.core.errors import ConfigError
from watcher.live.fanotify import Fanotify
from watcher.live.inotify import Inotify
from watcher.live.source import open_source

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs CAP_SYS_ADMIN")


@needs_root
def test_auto_takes_fanotify_as_root() -> None:
    """As root, ``auto`` opens fanotify (with pidfds when attribution is asked for)."""
    choice = open_source("auto", attribution=True)
    try:
        assert isinstance(choice.source, Fanotify)
        assert choice.status() == {
            "source": "fanotify",
            "requested": "auto",
            "attribution": True,
            "reason": None,
        }
    finally:
        choice.source.close()


def test_inotify_when_asked() -> None:
    """``inotify`` is inotify; with attribution it is a config error naming the key."""
    choice = open_source("inotify")
    try:
        assert isinstance(choice.source, Inotify)
        assert choice.name == "inotify"
    finally:
        choice.source.close()
    with pytest.raises(ConfigError, match="attribution"):
        open_source("inotify", attribution=True)
    with pytest.raises(ConfigError, match="source"):
        open_source("ebpf")


_PROBE = """
import json
from watcher.live.source import open_source
choice = open_source("auto", attribution=True)
out = choice.status()
import os, tempfile
explicit = open_source("fanotify")
with tempfile.TemporaryDirectory() as top:
    explicit.source.add_watch(os.fsencode(top))
    out["explicit"] = list(explicit.source.strategies.values())
print(json.dumps(out))
"""


@needs_root
def test_auto_falls_back_to_inotify_without_cap_sys_admin() -> None:
    """A real process without CAP_SYS_ADMIN (``setpriv``): ``auto`` says it uses inotify and
    why, attribution off; ``fanotify`` asked for explicitly is the kernel's unprivileged group,
    whose filesystem mark is refused: inode marks."""
    drop = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [*drop, sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["source"] == "inotify"
    assert found["attribution"] is False
    assert "CAP_SYS_ADMIN" in found["reason"]
    assert "attribution is off" in found["reason"]
    assert found["explicit"] == ["inode"]
