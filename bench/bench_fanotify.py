"""The fanotify source against the inotify source, same workload, same run.

Run as root: ``python bench/bench_fanotify.py [--ops N] [--dirs N]``.

The branches live on a private tmpfs (so the filesystem mark sees only this benchmark's
writes unless it says otherwise), the load comes from ``bench/loadgen.c`` (the mixed workload
of ``bench_live.py``, in its own process), and the CPU is this process's own (user + system,
``getrusage``) from the generator's start until ``sync()`` returns.

1. **Sustained load** at 10,000 and 50,000 ops/s, for inotify, fanotify (filesystem mark)
   and fanotify with attribution: events read per second, CPU per event and per operation
   (fanotify merges events, so per operation is the fair comparison), overflows, exactness.
2. **A filesystem mark's cost when others write:** the tracker follows an idle overlay while
   the generator writes into another directory of the same filesystem; the CPU this process
   spends per such unrelated operation, for the filesystem mark and for inode marks.
3. **Many directories:** an upper with ``--dirs`` directories, ``fs.inotify.max_user_watches``
   lowered to 8,192 for the run (and restored): start time, watches or handles held, whether
   the mount is degraded, and whether a file written deep in the tree is in the list right
   after ``sync()`` (no rescan).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

from watcher.core.model import Change, Control, Item, Kind, Transition, expand  # noqa: E402
from watcher.core.mounts import Filesystem  # noqa: E402
from watcher.core.rules import compute  # noqa: E402
from watcher.live.fanotify import FILESYSTEM, INODE, Fanotify  # noqa: E402
from watcher.live.hub import Hub  # noqa: E402
from watcher.live.inotify import Inotify  # noqa: E402
from watcher.live.source import Source  # noqa: E402
from watcher.live.tracker import Branch, Tracker  # noqa: E402

bench_live: Any = importlib.import_module("bench_live")
overlay: Any = importlib.import_module("overlay")
conftest: Any = importlib.import_module("conftest")

WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def _source(name: str, attribution: bool = False, marks: str = FILESYSTEM) -> Source:
    return Fanotify(attribution=attribution, marks=marks) if name == "fanotify" else Inotify()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Live:
    """A tracker over ``upper`` and ``lowers`` fed by ``source``; keeps what it publishes."""

    def __init__(self, upper: str, lowers: list[str], source: Source, attribution: bool) -> None:
        self.upper, self.lowers = upper, lowers
        self.items: list[Transition | Control] = []
        self.source = source
        self.hub = Hub(source, self._publish)
        fs = Filesystem([os.fsencode(p) for p in lowers], os.fsencode(upper), os.devnull)
        self.tracker = Tracker.of("bench", Branch.of(fs), self.hub)
        self.tracker.attribution = attribution
        self.task: asyncio.Task[None] | None = None

    async def _publish(self, mount: str, items: list[Item]) -> None:
        self.items.extend(expand(items))

    async def start(self) -> None:
        await self.hub.follow(self.tracker)
        self.task = asyncio.create_task(self.hub.run())

    async def sync(self) -> None:
        async with asyncio.timeout(300):
            await self.hub.sync()

    def exact(self) -> bool:
        """list == compute == replay of the published items."""
        want = compute(self.upper, self.lowers)
        state: dict[bytes, Kind] = {}
        for item in self.items:
            if isinstance(item, Transition):
                if item.kind is None:
                    state.pop(item.path, None)
                else:
                    state[item.path] = item.kind
            elif item.type.endswith("snapshot.begin"):
                state = {}
        return self.tracker.changes() == want == [Change(p, state[p]) for p in sorted(state)]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.hub.close()
        self.source.close()


async def sustained(name: str, attribution: bool, ops: int, rate: float) -> dict[str, Any]:
    """``ops`` mixed operations at ``rate`` ops/s through the merged view."""
    with bench_live.mounted() as ovl:
        live = Live(ovl.upper, list(ovl.lowers), _source(name, attribution), attribution)
        await live.start()
        await live.sync()
        events, cpu, start = live.hub.events_read, _cpu(), time.monotonic()
        gen = await bench_live._wait(bench_live.run_generator(ovl.merged, ops, rate))
        await live.sync()
        elapsed, cpu = time.monotonic() - start, _cpu() - cpu
        events = live.hub.events_read - events
        attributed = sum(
            1 for i in live.items if isinstance(i, Transition) and i.process is not None
        )
        result = {
            "gen_ops_s": ops / gen["seconds"],
            "events": events,
            "events_s": events / elapsed,
            "cpu_s": cpu,
            "us_event": cpu / max(events, 1) * 1e6,
            "us_op": cpu / ops * 1e6,
            "overflows": live.hub.overflows,
            "exact": live.exact(),
            "attributed": attributed,
        }
        await live.stop()
        return result


async def unrelated(marks: str, ops: int, rate: float) -> dict[str, Any]:
    """CPU spent by a fanotify tracker on writes elsewhere on its filesystem."""
    with bench_live.mounted() as ovl:
        noise = os.path.join(os.path.dirname(ovl.upper), "noise")
        for k in range(bench_live.DIRS):
            os.makedirs(f"{noise}/d{k}")
        source = Fanotify(marks=marks)
        live = Live(ovl.upper, list(ovl.lowers), source, False)
        await live.start()
        await live.sync()
        cpu, filtered = _cpu(), source.events_filtered
        gen = await bench_live._wait(bench_live.run_generator(noise, ops, rate))
        await live.sync()
        cpu = _cpu() - cpu
        result = {
            "gen_ops_s": ops / gen["seconds"],
            "filtered": source.events_filtered - filtered,
            "cpu_s": cpu,
            "us_op": cpu / ops * 1e6,
            "exact": live.exact(),
        }
        await live.stop()
        return result


def watches_in_use() -> int:
    """inotify watches held now by every process (other work on this machine included)."""
    count = 0
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        with contextlib.suppress(OSError):
            count += fdinfo.read_text(encoding="ascii", errors="replace").count("inotify wd:")
    return count


@contextlib.contextmanager
def watch_limit(free: int) -> Any:
    """``fs.inotify.max_user_watches`` set so that ``free`` watches are left (what other
    processes of the uid hold, plus ``free``) for the block, then restored."""
    old = WATCHES.read_text()
    WATCHES.write_text(f"{watches_in_use() + free}\n")
    try:
        yield
    finally:
        WATCHES.write_text(old)


@contextlib.contextmanager
def tree(dirs: int) -> Any:
    """A lower (the conformance tree) and an upper holding ``dirs`` directories, on a tmpfs
    with ``--tmpfs``; yields (upper, lower)."""
    with tempfile.TemporaryDirectory(prefix="lw-bench-fan-") as tmp:
        if bench_live.TMPFS[0]:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "tmpfs", tmp], check=True)
        try:
            lower, upper = os.path.join(tmp, "lower"), os.path.join(tmp, "upper")
            os.mkdir(lower)
            overlay.build_lower(lower, conftest.load_cases()["lower"])
            for a in range(dirs // 1000):
                os.makedirs(f"{upper}/a{a}")
                for b in range(1000):
                    os.mkdir(f"{upper}/a{a}/b{b}")
            yield upper, lower
        finally:
            if bench_live.TMPFS[0]:
                subprocess.run(["umount", tmp], check=True)


def _write(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"x")


async def many_dirs(name: str, dirs: int) -> dict[str, Any]:
    """Follow an upper with ``dirs`` directories with 8,192 inotify watches left."""
    with tree(dirs) as (upper, lower), watch_limit(8192):
        live = Live(upper, [lower], _source(name), False)
        cpu, start = _cpu(), time.monotonic()
        await live.start()
        seconds, cpu = time.monotonic() - start, _cpu() - cpu
        deep = f"/a{dirs // 2000}/b777/late"
        _write(upper + deep)
        sync = time.monotonic()
        await live.sync()
        sync = time.monotonic() - sync
        result = {
            "sync_s": sync,
            "start_s": seconds,
            "start_cpu_s": cpu,
            "watches": live.tracker.watch_count,
            "degraded": str(live.tracker.degraded or "no"),
            "seen_at_sync": deep.encode() in live.tracker.kinds,
        }
        await live.stop()
    return result


async def run(args: argparse.Namespace) -> None:
    print(f"# bench_fanotify: {os.uname().release}, branches on tmpfs, loadgen.c")
    if "1" in args.parts:
        await _sustained_table(args)
    if "2" in args.parts:
        await _unrelated_table(args)
    if "3" in args.parts:
        await _many_dirs_table(args)


async def _sustained_table(args: argparse.Namespace) -> None:
    print(f"\n## Sustained load, {args.ops} mixed operations per run")
    print(
        f"{'source':>22} {'target':>7} {'gen ops/s':>9} {'events':>7} {'events/s':>9} "
        f"{'CPU s':>6} {'us/event':>8} {'us/op':>6} {'ovf':>3} {'exact':>5} {'attrib':>6}"
    )
    for rate in (10_000, 50_000):
        for name, attribution in (("inotify", False), ("fanotify", False), ("fanotify", True)):
            r = await sustained(name, attribution, args.ops, rate)
            label = name + (" + attribution" if attribution else "")
            print(
                f"{label:>22} {rate:7d} {r['gen_ops_s']:9.0f} {r['events']:7d} "
                f"{r['events_s']:9.0f} {r['cpu_s']:6.2f} {r['us_event']:8.1f} "
                f"{r['us_op']:6.1f} {r['overflows']:3d} {r['exact']!s:>5} {r['attributed']:6d}"
            )


async def _unrelated_table(args: argparse.Namespace) -> None:
    print(f"\n## Unrelated writes on the same filesystem, {args.ops} operations")
    print(f"{'marks':>10} {'target':>7} {'gen ops/s':>9} {'filtered':>8} {'CPU s':>6} {'us/op':>6}")
    for rate in (10_000, 50_000):
        for marks in (FILESYSTEM, INODE):
            u = await unrelated(marks, args.ops, rate)
            print(
                f"{marks:>10} {rate:7d} {u['gen_ops_s']:9.0f} {u['filtered']:8d} "
                f"{u['cpu_s']:6.2f} {u['us_op']:6.1f}"
            )


async def _many_dirs_table(args: argparse.Namespace) -> None:
    print(f"\n## {args.dirs} directories, 8192 inotify watches left (max_user_watches lowered)")
    print(
        f"{'source':>9} {'start s':>7} {'CPU s':>6} {'watches':>8} {'degraded':>12} "
        f"{'seen at sync':>12} {'sync s':>7}"
    )
    for name in ("inotify", "fanotify"):
        m = await many_dirs(name, args.dirs)
        print(
            f"{name:>9} {m['start_s']:7.1f} {m['start_cpu_s']:6.1f} {m['watches']:8d} "
            f"{m['degraded']:>12} {m['seen_at_sync']!s:>12} {m['sync_s']:7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=50_000, help="operations per run")
    parser.add_argument("--dirs", type=int, default=200_000, help="directories (part 3)")
    parser.add_argument("--no-tmpfs", action="store_true", help="branches on /tmp's filesystem")
    parser.add_argument("--parts", default="123", help="which parts to run (default: 123)")
    args = parser.parse_args()
    bench_live.TMPFS[0] = not args.no_tmpfs
    bench_live.use_c_generator()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
