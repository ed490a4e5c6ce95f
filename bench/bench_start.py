"""The start of ``layerwatch run`` on a big branch: time to the snapshot in a jsonl sink,
peak RSS, and how long SIGTERM takes, against ``find UPPER`` (the cost of just walking it).

The branch is a detached mount (an upper dir with N new files, 1,000 per directory, and an
empty lower) on a tmpfs, so the disk plays no part. The service runs as its own process,
with a spool and a jsonl sink, as an operator runs it. Needs root (tmpfs).

    python3 bench/bench_start.py --entries 100000 --entries 1000000
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_DIR = 1000


def _populate(upper: Path, entries: int) -> None:
    for d in range((entries + PER_DIR - 1) // PER_DIR):
        directory = upper / f"d{d:05d}"
        directory.mkdir()
        for f in range(min(PER_DIR, entries - d * PER_DIR)):
            os.close(os.open(directory / f"f{f:04d}", os.O_CREAT | os.O_WRONLY, 0o644))


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tail(path: Path, size: int = 4096) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read()


def run_once(root: Path, run: int) -> tuple[float, float, float]:
    """One start: (seconds to snapshot.end in the sink, peak RSS MiB, seconds SIGTERM took)."""
    state = root / f"run{run}"
    state.mkdir()
    out = state / "events.jsonl"
    config = state / "layerwatch.toml"
    config.write_text(
        f'[[mounts]]\nname = "big"\nupper = "{root / "upper"}"\nlowers = ["{root / "lower"}"]\n'
        f'[sinks.out]\ntype = "jsonl"\npath = "{out}"\nbatch_size = 1000\n'
        f'[spool]\npath = "{state / "spool.db"}"\n'
    )
    began = time.monotonic()
    with (state / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher.cli", "run", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        while b'"io.layerwatch.snapshot.end"' not in _tail(out):
            if proc.poll() is not None:
                raise SystemExit((state / "stderr").read_text()[-2000:])
            time.sleep(0.05)
        ready = time.monotonic() - began
        peak = _peak_rss_mib(proc.pid)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        return ready, peak, time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, action="append", help="branch sizes")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(
        "| entries | find UPPER (s) | to snapshot.end in jsonl (s) | ratio | peak RSS (MiB) "
        "| SIGTERM to exit (s) |"
    )
    print("|---|---|---|---|---|---|")
    for entries in args.entries or [100_000]:
        root = Path(tempfile.mkdtemp(prefix="lw-start-"))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(root)], check=True)
        try:
            (root / "lower").mkdir()
            (root / "upper").mkdir()
            _populate(root / "upper", entries)
            finds, results = [], []
            for run in range(args.runs):
                t0 = time.monotonic()
                subprocess.run(["find", str(root / "upper")], stdout=subprocess.DEVNULL, check=True)
                finds.append(time.monotonic() - t0)
                results.append(run_once(root, run))
            find_s = statistics.median(finds)
            ready = statistics.median(r[0] for r in results)
            peak = statistics.median(r[1] for r in results)
            stop = statistics.median(r[2] for r in results)
            print(
                f"| {entries:,} | {find_s:.3f} | {ready:.2f} | {ready / find_s:.0f}x "
                f"| {peak:.0f} | {stop:.2f} |",
                flush=True,
            )
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
            os.rmdir(root)


if __name__ == "__main__":
    main()
