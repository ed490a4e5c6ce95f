"""``layerwatch run`` on a big branch: the start streams its snapshot, and stops on SIGTERM.

The branch is a detached mount (an upper dir and a lower dir, no overlay needed) on a tmpfs,
holding more changes than the intake holds pending (65,536), which once hung the start for
good. The service runs as its own process, as an operator runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = 70_000  # more than Intake's max_pending
PER_DIR = 1_000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture(scope="module")
def branch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs with ``lower/`` (empty) and ``upper/`` holding FILES new files (so FILES + dirs
    changes)."""
    root = tmp_path_factory.mktemp("big")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(root)], check=True)
    try:
        (root / "lower").mkdir()
        upper = root / "upper"
        upper.mkdir()
        for d in range(FILES // PER_DIR):
            directory = upper / f"d{d}"
            directory.mkdir()
            for f in range(PER_DIR):
                os.close(os.open(directory / f"f{f}", os.O_CREAT | os.O_WRONLY, 0o644))
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def _config(root: Path, run: str) -> Path:
    state = root / run
    state.mkdir()
    config = state / "layerwatch.toml"
    config.write_text(
        f'[[mounts]]\nname = "big"\nupper = "{root / "upper"}"\nlowers = ["{root / "lower"}"]\n'
        f'[sinks.out]\ntype = "jsonl"\npath = "{state / "events.jsonl"}"\nbatch_size = 1000\n'
        f'[spool]\npath = "{state / "spool.db"}"\n'
        f'[service]\nshutdown_timeout = "10s"\n'
    )
    return config


def _start(config: Path) -> subprocess.Popen[bytes]:
    with (config.parent / "stderr").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "run", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )


def _stderr(config: Path) -> str:
    return (config.parent / "stderr").read_text(errors="replace")[-3000:]


def test_big_branch_snapshot_reaches_the_sink(branch: Path) -> None:
    """A branch with more changes than the intake holds pending starts, and its whole
    snapshot reaches a jsonl sink (it used to hang forever before the spool)."""
    config = _config(branch, "whole")
    out = config.parent / "events.jsonl"
    proc = _start(config)
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and b'"io.layerwatch.snapshot.end"' in _tail(out)):
            assert proc.poll() is None, _stderr(config)
            assert time.monotonic() < deadline, "no snapshot.end in the sink: " + _stderr(config)
            time.sleep(0.2)
        lines = out.read_bytes().count(b'"io.layerwatch.change"')
        assert lines == FILES + FILES // PER_DIR
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, _stderr(config)


@pytest.mark.parametrize("after", [0.0, 0.5, 2.0])
def test_sigterm_at_any_point_of_a_big_start_stops_promptly(branch: Path, after: float) -> None:
    """SIGTERM during the first scan of a big branch (or while its snapshot is committed)
    ends the service within seconds, exit 0."""
    config = _config(branch, f"stop-{after}")
    proc = _start(config)
    try:
        deadline = time.monotonic() + 30
        while b"spool_opened" not in (config.parent / "stderr").read_bytes():  # handlers are in
            assert proc.poll() is None, _stderr(config)
            assert time.monotonic() < deadline, _stderr(config)
            time.sleep(0.02)
        time.sleep(after)
        assert proc.poll() is None, _stderr(config)
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert proc.wait(timeout=20) == 0, _stderr(config)
        assert time.monotonic() - began < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tail(path: Path, size: int = 4096) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read()
