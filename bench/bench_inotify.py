"""Read throughput of the inotify adapter, side by side with its baselines.

Run as a script: ``python bench/bench_inotify.py [--events N] [--runs R]``.

One workload for every reader: a watched directory of 1,000 files, ``os.utime`` on them round
robin (one ``IN_ATTRIB`` each; consecutive events differ, so the kernel coalesces none). Events
are generated in bursts that fit the kernel queue (``max_queued_events``), and only the time to
read each burst is measured. Readers:

- ``Inotify.read``: ``watcher.live.inotify`` (batched ``os.read``, events parsed into ``RawEvent``);
- ``aionotify``: ``aionotify.Watcher.get_event`` in a loop (one event per call), the library
  the adapter replaces (imported here only as the baseline);
- ``os.read loop``: a plain synchronous loop of 64 KiB ``os.read`` calls parsing headers into
  tuples, the ceiling for pure Python.

Each reader runs the whole workload ``--runs`` times; the median events/s is printed with the
ratios against both baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aionotify

from watcher.live.inotify import IN_ATTRIB, IN_Q_OVERFLOW, Inotify, read_limits

_FILES = 1000
_HEADER = struct.Struct("iIII")

Reader = Callable[[bytes, list[bytes], int], Coroutine[Any, Any, float]]


def _bursts(total: int) -> list[int]:
    """Split ``total`` events into bursts that fit the kernel queue."""
    size = min(15_000, read_limits().max_queued_events - 1)
    return [min(size, total - start) for start in range(0, total, size)]


def _generate(paths: list[bytes], count: int, offset: int) -> None:
    """Queue ``count`` IN_ATTRIB events by touching files round robin."""
    n = len(paths)
    for i in range(offset, offset + count):
        os.utime(paths[i % n])


async def read_adapter(top: bytes, paths: list[bytes], total: int) -> float:
    """Seconds spent in ``Inotify.read`` for ``total`` events."""
    elapsed = 0.0
    with Inotify() as ino:
        ino.add_watch(top, IN_ATTRIB)
        done = 0
        for burst in _bursts(total):
            _generate(paths, burst, done)
            start = time.perf_counter()
            got = 0
            while got < burst:
                events = await ino.read()
                got += len(events)
                if events[-1].mask & IN_Q_OVERFLOW:
                    raise RuntimeError("queue overflowed: the burst is too large")
            elapsed += time.perf_counter() - start
            done += burst
    return elapsed


async def read_aionotify(top: bytes, paths: list[bytes], total: int) -> float:
    """Seconds spent in ``aionotify.Watcher.get_event`` for ``total`` events."""
    watcher = aionotify.Watcher()
    watcher.service.watch(os.fsdecode(top), aionotify.Flags.ATTRIB)
    await watcher.setup()
    elapsed = 0.0
    try:
        done = 0
        for burst in _bursts(total):
            _generate(paths, burst, done)
            start = time.perf_counter()
            for _ in range(burst):
                await watcher.get_event()
            elapsed += time.perf_counter() - start
            done += burst
    finally:
        watcher.close()
        await asyncio.sleep(0)  # let the transport close its descriptor
    return elapsed


async def read_plain(top: bytes, paths: list[bytes], total: int) -> float:
    """Seconds spent in a plain synchronous batched ``os.read`` loop for ``total`` events."""
    elapsed = 0.0
    with Inotify() as ino:  # used only to create the fd and the watch
        ino.add_watch(top, IN_ATTRIB)
        fd = ino.fileno()
        done = 0
        for burst in _bursts(total):
            _generate(paths, burst, done)
            start = time.perf_counter()
            got: list[tuple[int, int, int, bytes]] = []
            while len(got) < burst:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                offset = 0
                while offset < len(data):
                    wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
                    name_at = offset + 16
                    offset = name_at + length
                    got.append((wd, mask, cookie, data[name_at:offset].rstrip(b"\0")))
            elapsed += time.perf_counter() - start
            done += burst
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run every reader on the same workload and print events/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per reader (median)")
    args = parser.parse_args(argv)

    readers: dict[str, Reader] = {
        "Inotify.read": read_adapter,
        "aionotify get_event": read_aionotify,
        "os.read loop": read_plain,
    }
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inotify-") as tmp:
        top = os.fsencode(tmp)
        paths = [os.path.join(top, b"f%04d" % i) for i in range(_FILES)]
        for path in paths:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        for name, reader in readers.items():
            runs = range(args.runs)
            seconds: list[float] = [asyncio.run(reader(top, paths, args.events)) for _ in runs]
            rates[name] = args.events / statistics.median(seconds)

    print(
        f"inotify read throughput: {args.events} IN_ATTRIB events per run, "
        f"median of {args.runs} runs, Python {sys.version.split()[0]}"
    )
    for name, rate in rates.items():
        print(f"  {name:<20} {rate / 1e6:6.3f} M events/s")
    ours = rates["Inotify.read"]
    print(f"  Inotify.read / aionotify get_event = {ours / rates['aionotify get_event']:.2f}x")
    print(f"  Inotify.read / os.read loop        = {ours / rates['os.read loop']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
