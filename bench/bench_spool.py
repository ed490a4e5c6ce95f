"""Append throughput of the spool, side by side with a plain file and one fsync per batch.

Run as a script: ``python bench/bench_spool.py [--dir DIR] [--runs R] [--events N]``.

Bodies are real ``io.layerwatch.change`` events from ``EventEncoder`` (about 600 bytes). For
each batch size (1, 64, 512), each run appends the same ``N`` events (``N`` is rounded up to
whole batches) with:

- ``spool``: ``await Spool.append(batch)`` on a fresh spool (one SQLite WAL transaction per
  batch, ``synchronous=FULL``, run on the spool's worker thread);
- ``spool+lists``: the same, each batch also carrying one change-list update per record, as
  the service does;
- ``file+fsync``: the baseline: the batch's bodies joined by newlines, one ``write`` to a file
  opened ``O_APPEND`` and one ``os.fsync`` per batch.

The median events/s of ``--runs`` runs is printed, with the spool's ratio to the baseline and
the longest the event loop went without running while the spool appended with lists (one
extra run with a ticker task sleeping 1 ms): the fsync happens off the loop, so that stall
stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog

from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import EventEncoder, Record
from watcher.delivery.spool import Spool

_BATCHES = (1, 64, 512)


def make_records(count: int) -> list[Record]:
    """``count`` realistic change events, seq 1..count."""
    encoder = EventEncoder(stream="bench-7f3a9c2e", host="build-host-01.example.internal", epoch=1)
    st = os.lstat(__file__)
    records = []
    for seq in range(1, count + 1):
        path = b"/var/lib/application/data/cache/objects/%02x/%06d-segment.log" % (
            seq % 256,
            seq,
        )
        transition = Transition(path, Kind.ADDED, None, Op.CREATE, st)
        records.append(encoder.change(seq, "web-frontend", transition, now=time.time()))
    return records


def batches(records: list[Record], size: int) -> list[list[Record]]:
    """Split ``records`` into batches of ``size``."""
    return [records[i : i + size] for i in range(0, len(records), size)]


async def run_spool(
    path: Path, groups: list[list[Record]], *, lists: bool, ticker: bool
) -> tuple[float, float]:
    """Seconds to append every batch to a fresh spool, and the longest loop stall (seconds).

    The stall is measured only with ``ticker`` (its own wake-ups cost throughput).
    """
    stall = 0.0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.001)
            last = now

    with Spool(path) as spool:
        task = asyncio.create_task(tick()) if ticker else None
        await asyncio.sleep(0.005)
        start = time.perf_counter()
        for group in groups:
            updates = {"web-frontend": {b"/%d" % r.seq: Kind.ADDED for r in group}} if lists else {}
            await spool.append(group, lists=updates)
        elapsed = time.perf_counter() - start
        stop.set()
        if task is not None:
            await task
    return elapsed, stall


def spool_once(
    directory: Path, groups: list[list[Record]], *, lists: bool, ticker: bool = False
) -> tuple[float, float]:
    """``run_spool`` on a fresh file in ``directory``, removed afterwards."""
    path = directory / f"spool-{time.monotonic_ns()}.db"
    try:
        return asyncio.run(run_spool(path, groups, lists=lists, ticker=ticker))
    finally:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_file(directory: Path, groups: list[list[Record]]) -> float:
    """Seconds to write every batch to a fresh file with one fsync per batch."""
    path = directory / f"plain-{time.monotonic_ns()}.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        start = time.perf_counter()
        for group in groups:
            os.write(fd, b"".join(r.body + b"\n" for r in group))
            os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where to write (a real disk, not tmpfs); default /var/tmp",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument(
        "--events",
        type=int,
        default=16384,
        help="events per run for batches of 64 and 512 (1/8 of it for 1)",
    )
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    try:
        sample = make_records(1)[0]
        print(
            f"dir {directory}  runs {args.runs}  body ~{len(sample.body)} bytes  "
            f"python {sys.version.split()[0]}"
        )
        print(
            f"{'batch':>6} {'events':>7} {'spool ev/s':>11} {'+lists ev/s':>12} "
            f"{'file+fsync ev/s':>16} {'spool/file':>11} {'max loop stall':>15}"
        )
        for size in _BATCHES:
            count = max(args.events // 8, size) if size == 1 else max(args.events, size)
            count = -(-count // size) * size
            groups = batches(make_records(count), size)
            spool_t, lists_t, file_t = [], [], []
            for _ in range(args.runs):
                spool_t.append(spool_once(directory, groups, lists=False)[0])
                lists_t.append(spool_once(directory, groups, lists=True)[0])
                file_t.append(run_file(directory, groups))
            stall = spool_once(directory, groups, lists=True, ticker=True)[1]
            spool_rate = count / statistics.median(spool_t)
            lists_rate = count / statistics.median(lists_t)
            file_rate = count / statistics.median(file_t)
            print(
                f"{size:>6} {count:>7} {spool_rate:>11,.0f} {lists_rate:>12,.0f} "
                f"{file_rate:>16,.0f} {spool_rate / file_rate:>11.2f} "
                f"{stall * 1000:>12.1f} ms"
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
