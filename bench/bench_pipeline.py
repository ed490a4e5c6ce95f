"""End-to-end events/s of the service, side by side with writing the same events to a file.

Run as root: ``python bench/bench_pipeline.py [--files N] [--runs R] [--dir DIR]``.

Each run mounts a fresh overlay, starts ``Service`` in this process (a managed mount, the
spool, one ``jsonl`` sink with ``fsync = "batch"``), and then, from a worker thread, creates
``N`` files in the merged view as fast as it can. The clock runs from the first file to the
moment the jsonl file holds every event the run produced (after ``sync()`` and a clean stop,
so the last event is acknowledged). Rows:

- ``workload``: the same file creations with no service running: the producer's ceiling.
- ``to spool``: the same run, timed until ``sync()`` returned: every event reconciled,
  encoded and durably in the spool (the service's intake rate).
- ``pipeline``: inotify -> tracker -> publisher -> spool (SQLite WAL, group commit) -> runner
  -> jsonl sink with an fsync per batch: what a consumer of the jsonl file sees.
- ``file+fsync``: the baseline: the very event lines the pipeline wrote, written straight to
  a file in batches of the sink's ``batch_size`` with one ``write`` and one ``fsync`` each.
- ``file``: the same without fsync.

Events/s is events delivered (changes and the final bookmark; the start snapshot is empty)
over wall time; the median of ``--runs`` is printed, with each row's ratio to ``file+fsync``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from watcher.service import config
from watcher.service.service import Service

_BATCH = 100


def _create_files(root: Path, count: int) -> None:
    """``count`` files in 10 directories: 1 mkdir per 10% and one create+write per file."""
    per_dir = max(1, count // 10)
    for i in range(count):
        directory = root / f"d{i // per_dir:02d}"
        if i % per_dir == 0:
            directory.mkdir(exist_ok=True)
        with open(directory / f"file-{i:07d}.dat", "wb") as fh:
            fh.write(b"x")


def _mount(base: Path) -> tuple[Path, Path, Path]:
    lower, rw, mnt = base / "lower", base / "rw", base / "mnt"
    for d in (lower, rw, mnt):
        d.mkdir(parents=True)
    (lower / "etc").mkdir()
    (lower / "etc" / "hostname").write_text("bench\n")
    return lower, rw, mnt


def _config(base: Path, lower: Path, rw: Path, mnt: Path, out: Path) -> Path:
    path = base / "layerwatch.toml"
    path.write_text(
        f'[[mounts]]\nname = "bench"\nlayers = ["{lower}"]\nrw = "{rw}"\nmountpoint = "{mnt}"\n'
        f'[sinks.out]\ntype = "jsonl"\npath = "{out}"\nfsync = "batch"\nbatch_size = {_BATCH}\n'
        f'[spool]\npath = "{base / "spool" / "spool.db"}"\n'
        '[service]\nstream = "bench"\nshutdown_timeout = "120s"\n'
    )
    return path


async def _pipeline(base: Path, files: int) -> tuple[float, float, int]:
    """Seconds from the first file to every event spooled, and to every event in the jsonl
    file; the event count."""
    lower, rw, mnt = _mount(base)
    out = base / "events.jsonl"
    service = Service(config.load(_config(base, lower, rw, mnt, out)))
    task = asyncio.create_task(service.run(signals=False))
    try:
        await service.started.wait()
        start = time.perf_counter()
        await asyncio.to_thread(_create_files, mnt, files)
        await service.sync()
        spooled = time.perf_counter() - start
        service.stop.set()
        await task
        elapsed = time.perf_counter() - start
    finally:
        if not task.done():
            service.stop.set()
            await task
    lines = await asyncio.to_thread(out.read_bytes)
    return spooled, elapsed, len(lines.splitlines()) - 2  # the empty start snapshot: 2 lines


def _workload(base: Path, files: int) -> float:
    lower, rw, mnt = _mount(base)
    opts = f"lowerdir={lower},upperdir={rw},workdir={base / 'work'}"
    (base / "work").mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        start = time.perf_counter()
        _create_files(mnt, files)
        return time.perf_counter() - start
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _straight(lines: list[bytes], path: Path, *, fsync: bool) -> float:
    """Write ``lines`` to ``path`` in batches of the sink's size; seconds taken."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for i in range(0, len(lines), _BATCH):
            os.write(fd, b"".join(line + b"\n" for line in lines[i : i + _BATCH]))
            if fsync:
                os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=5000, help="files created per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median printed)")
    parser.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_pipeline: needs root (it mounts overlayfs)", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    root = Path(tempfile.mkdtemp(prefix="lw-bench-", dir=args.dir))
    rows = ("workload", "to spool", "pipeline", "file+fsync", "file")
    rates: dict[str, list[float]] = {row: [] for row in rows}
    events = 0
    try:
        for run in range(args.runs):
            base = root / f"run{run}"
            spooled, elapsed, events = asyncio.run(_pipeline(base / "pipeline", args.files))
            rates["to spool"].append(events / spooled)
            rates["pipeline"].append(events / elapsed)
            lines = (base / "pipeline" / "events.jsonl").read_bytes().splitlines()[2:]
            rates["workload"].append(events / _workload(base / "workload", args.files))
            for name, fsync in (("file+fsync", True), ("file", False)):
                seconds = _straight(lines, base / "straight.jsonl", fsync=fsync)
                rates[name].append(len(lines) / seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = _median(rates["file+fsync"])
    print(f"{args.files} files -> {events} events per run, median of {args.runs} runs")
    print(f"{'row':<12} {'events/s':>12} {'vs file+fsync':>14}")
    for name, samples in rates.items():
        rate = _median(samples)
        print(f"{name:<12} {rate:>12,.0f} {rate / baseline:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
