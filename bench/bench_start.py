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
SETTLE = 7.0
"""Seconds after ``snapshot.end`` before the settled RSS is read: the sink drains, the
service's housekeeping (every 5 s) hands the freed heap back."""


def _populate(upper: Path, entries: int) -> None:
    for d in range((entries + PER_DIR - 1) // PER_DIR):
        directory = upper / f"d{d:05d}"
        directory.mkdir()
        for f in range(min(PER_DIR, entries - d * PER_DIR)):
            os.close(os.open(directory / f"f{f:04d}", os.O_CREAT | os.O_WRONLY, 0o644))


def _rss_mib(pid: int, field: str = "VmHWM") -> float:
    """``VmHWM`` (the peak) or ``VmRSS`` (now) of ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tail(path: Path, size: int = 4096) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read()


def run_once(root: Path, run: int) -> tuple[float, float, float, float]:
    """One start: (seconds to snapshot.end in the sink, peak RSS MiB, RSS MiB once settled,
    seconds SIGTERM took)."""
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
        time.sleep(SETTLE)
        peak, steady = _rss_mib(proc.pid), _rss_mib(proc.pid, "VmRSS")
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        return ready, peak, steady, time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _measure(entries: int, runs: int) -> tuple[float, list[tuple[float, float, float, float]]]:
    """``runs`` starts on a fresh branch of ``entries``: the median ``find`` and each result."""
    root = Path(tempfile.mkdtemp(prefix="lw-start-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(root)], check=True)
    try:
        (root / "lower").mkdir()
        (root / "upper").mkdir()
        _populate(root / "upper", entries)
        finds, results = [], []
        for run in range(runs):
            t0 = time.monotonic()
            subprocess.run(["find", str(root / "upper")], stdout=subprocess.DEVNULL, check=True)
            finds.append(time.monotonic() - t0)
            results.append(run_once(root, run))
        return statistics.median(finds), results
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        os.rmdir(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, action="append", help="branch sizes")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    _, empty = _measure(0, args.runs)
    base = statistics.median(r[2] for r in empty)
    print(f"settled RSS of the service on an empty branch (the baseline): {base:.1f} MiB\n")
    print(
        "| entries | find UPPER (s) | to snapshot.end in jsonl (s) | ratio | peak RSS (MiB) "
        "| settled RSS (MiB) | settled B/entry over the baseline | SIGTERM to exit (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for entries in args.entries or [100_000]:
        find_s, results = _measure(entries, args.runs)
        ready = statistics.median(r[0] for r in results)
        peak = statistics.median(r[1] for r in results)
        steady = statistics.median(r[2] for r in results)
        stop = statistics.median(r[3] for r in results)
        per_entry = (steady - base) * (1 << 20) / entries
        print(
            f"| {entries:,} | {find_s:.3f} | {ready:.2f} | {ready / find_s:.0f}x "
            f"| {peak:.0f} | {steady:.0f} | {per_entry:.0f} | {stop:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
