"""The soak harness's short profile against the real service: ``bench/soak.py --profile
short`` (at most 3 minutes: load at every rate, every fault once, the invariants checked at
every checkpoint) must exit 0. Select it with ``-m slow`` or ``-k soak``; it needs root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.root]


def _overlay_available() -> bool:
    with open("/proc/filesystems") as filesystems:
        return any(line.split()[-1] == "overlay" for line in filesystems if line.strip())


@pytest.mark.timeout(300)
def test_short_soak_holds_every_invariant() -> None:
    if os.geteuid() != 0 or not _overlay_available():
        pytest.skip("the soak needs root and overlayfs")
    for tool in ("cc", "layerwatch"):
        if shutil.which(tool) is None:
            pytest.skip(f"the soak needs {tool} on PATH")
    argv = [sys.executable, str(REPO / "bench" / "soak.py"), "--profile", "short", "--seed", "1"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{proc.stdout}\n--- progress ---\n{proc.stderr[-6000:]}"
