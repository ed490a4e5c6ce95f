"""The live tracker under load, side by side with inotifywait and watchdog.

Run as root: ``python bench/bench_live.py [--ops N] [--entries N]``.

Every measurement uses a real overlay mount over the conformance lower tree, with the
operations made by a separate generator process (this script re-run with ``--generate``) so
the tracker has its own core. The workload mixes creates, appends, chmods, renames across
directories, unlinks, ``mkdir`` + a file inside at once, and ``rm -rf`` of new trees, over
20 directories that exist (and are watched) before it starts.

1. **Throughput.** The generator runs as fast as it can (and at fixed rates); the tracker's
   ops/s is the number of operations over the time from the first operation until ``sync()``
   returns. "Exact" means the list equals ``compute()`` and the replayed events give the same
   list; "overflows" counts inotify queue overflows (each one costs a full rescan), at the
   system's ``max_queued_events``.
2. **Baselines on the same workload:** ``inotifywait -m -r`` (inotify-tools) and the
   ``watchdog`` library (its inotify observer), both watching U. They report raw events, not a
   change list, so they are given credit for any path they mention at all; "missed" counts
   the entries that changed in the truth (``compute`` before vs after) that they never
   mention. The tracker is judged by the same rule, from its published transitions.
3. **Latency** at 1,000 ops/s: each operation creates a new file; latency is from the
   generator's write returning to the tracker publishing that path (CLOCK_MONOTONIC, shared
   by both processes). p50 / p99 / max.
4. **Memory per tracked entry:** ``tracemalloc`` around ``Tracker.start()`` over an upper
   holding ``--entries`` new files (in 100 directories), after dropping the snapshot items.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]


from watcher.core.model import Change, Control, Item, Kind, Transition, expand  # noqa: E402
from watcher.core.mounts import Filesystem  # noqa: E402
from watcher.core.rules import compute  # noqa: E402
from watcher.live.hub import Hub  # noqa: E402
from watcher.live.inotify import Inotify, read_limits  # noqa: E402
from watcher.live.tracker import Branch, Tracker  # noqa: E402

# The overlay kit and the conformance lower live with the tests (test code, not the product).
overlay: Any = importlib.import_module("overlay")
conftest: Any = importlib.import_module("conftest")
Overlay = Any

DIRS = 20

# -- the generator (a separate process) --------------------------------------------------------


def _op(root: str, i: int) -> str:
    """Do operation ``i`` of the mixed workload in ``root``; return the path it touched."""
    d = f"{root}/d{i % DIRS}"
    kind = i % 10
    earlier = f"{root}/d{(i - 10) % DIRS}/f{i - 10}"  # created by op i - 10 (kinds 0 to 3)
    try:
        if kind <= 3:
            fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"x")
            os.close(fd)
            return f"{d}/f{i}"
        if kind == 4:
            fd = os.open(earlier, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"more")
            os.close(fd)
        elif kind == 5:
            os.chmod(earlier, 0o600)
        elif kind == 6:
            os.rename(earlier, f"{root}/d{(i + 1) % DIRS}/r{i}")
        elif kind == 7:
            os.unlink(earlier)
        elif kind == 8:
            os.mkdir(f"{d}/s{i}")
            fd = os.open(f"{d}/s{i}/x", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
        elif (i // 10) % 2:  # half of the new trees are removed again, half stay
            shutil.rmtree(f"{root}/d{(i - 1) % DIRS}/s{i - 1}")
    except FileNotFoundError:
        pass
    return earlier


def generate(root: str, ops: int, rate: float, fresh: bool) -> None:
    """Run ``ops`` operations at ``rate`` per second (0: as fast as possible).

    ``fresh``: every operation creates a new file (the latency workload). Prints one JSON line:
    the seconds taken and, for ``fresh``, each operation's completion time.
    """
    done: list[float] = []
    start = time.monotonic()
    for i in range(ops):
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if fresh:
            fd = os.open(f"{root}/d{i % DIRS}/n{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
            done.append(time.monotonic())
        else:
            _op(root, i)
    end = time.monotonic()
    print(json.dumps({"seconds": end - start, "end": end, "done": done}))


GENERATOR: list[str] = []
"""The load generator's argv prefix: this script (Python) or the compiled ``loadgen.c``."""


def use_c_generator() -> None:
    """Compile ``loadgen.c`` (the same workload in C) and generate load with it."""
    out = os.path.join(tempfile.mkdtemp(prefix="lw-loadgen-"), "loadgen")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadgen.c")
    subprocess.run(["cc", "-O2", "-Wno-format-truncation", "-o", out, source], check=True)
    GENERATOR[:] = [out]


def run_generator(
    root: str, ops: int, rate: float = 0, fresh: bool = False
) -> subprocess.Popen[str]:
    """Start the generator process."""
    if GENERATOR and not fresh:
        argv = [*GENERATOR, root, str(ops), str(rate)]
    else:
        argv = [sys.executable, __file__, "--generate", root, str(ops), str(rate)]
    if fresh:
        argv.append("--fresh")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


# -- the tracker side ------------------------------------------------------------------------


TMPFS: list[bool] = [False]
"""Whether the branches live on a tmpfs (``--tmpfs``): the disk is not the limit then."""


@contextlib.contextmanager
def mounted() -> Iterator[Overlay]:
    """A fresh overlay over the conformance lower, with the 20 work directories made."""
    with tempfile.TemporaryDirectory(prefix="lw-bench-live-") as tmp:
        if TMPFS[0]:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", tmp], check=True)
        try:
            lower = os.path.join(tmp, "lower")
            os.mkdir(lower)
            overlay.build_lower(lower, conftest.load_cases()["lower"])
            with overlay.mount_overlay(tmp, [lower]) as ovl:
                for k in range(DIRS):
                    os.mkdir(f"{ovl.merged}/d{k}")
                yield ovl
        finally:
            if TMPFS[0]:
                subprocess.run(["umount", tmp], check=True)


class Live:
    """A tracker on ``ovl`` with its hub; records published items and when each came."""

    def __init__(self, ovl: Overlay) -> None:
        self.ovl = ovl
        self.items: list[Transition | Control] = []
        self.seen: dict[bytes, float] = {}
        self.inotify = Inotify()
        self.hub = Hub(self.inotify, self._publish)
        fs = Filesystem([os.fsencode(p) for p in ovl.lowers], os.fsencode(ovl.upper), os.devnull)
        self.tracker = Tracker.of("bench", Branch.of(fs), self.hub)
        self.task: asyncio.Task[None] | None = None

    async def _publish(self, mount: str, items: list[Item]) -> None:
        now = time.monotonic()
        flat = list(expand(items))
        self.items.extend(flat)
        for item in flat:
            if isinstance(item, Transition):
                self.seen.setdefault(item.path, now)

    async def start(self) -> None:
        await self.hub.follow(self.tracker)
        self.task = asyncio.create_task(self.hub.run())

    async def sync(self) -> None:
        async with asyncio.timeout(120):
            await self.hub.sync()

    def exact(self) -> bool:
        """list == compute == replay."""
        want = compute(self.ovl.upper, self.ovl.lowers)
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
        self.inotify.close()


async def _wait(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = await asyncio.to_thread(proc.communicate)
    result: dict[str, Any] = json.loads(out)
    return result


def _changed(before: list[Change], after: list[Change]) -> set[bytes]:
    """Paths whose entry differs between two lists (the truth a watcher must mention)."""
    return {c.path for c in set(before) ^ set(after)}


async def throughput(ops: int, rate: float) -> dict[str, Any]:
    """One throughput run: ops at rate (0: flat out)."""
    with mounted() as ovl:
        live = Live(ovl)
        await live.start()
        await live.sync()
        before = compute(ovl.upper, ovl.lowers)
        mark = len(live.items)
        gen = await _wait(run_generator(ovl.merged, ops, rate))
        await live.sync()
        lag = time.monotonic() - gen["end"]  # caught up this long after the last operation
        after = compute(ovl.upper, ovl.lowers)
        mentioned = {i.path for i in live.items[mark:] if isinstance(i, Transition)}
        result = {
            "rate": rate,
            "gen_ops_s": ops / gen["seconds"],
            "ops_s": ops / (gen["seconds"] + lag),
            "lag_ms": lag * 1000,
            "overflows": live.hub.overflows,
            "exact": live.exact(),
            "missed": len(_changed(before, after) - mentioned),
            "truth": len(_changed(before, after)),
            "events": live.hub.events_read,
        }
        await live.stop()
        return result


async def capacity(ops: int) -> dict[str, Any]:
    """The tracker's own speed: ``ops`` operations queued while the hub waits, then drained.

    The operations run in this process before the hub reads (so the kernel queue holds them:
    keep ``ops`` small enough not to overflow it); the time is the hub's, from its first read
    until ``sync()`` returns.
    """
    with mounted() as ovl:
        live = Live(ovl)
        await live.start()
        await live.sync()
        gen_start = time.monotonic()
        for i in range(ops):
            _op(ovl.merged, i)
        start = time.monotonic()
        await live.sync()
        elapsed = time.monotonic() - start
        result = {
            "gen_ops_s": ops / (start - gen_start),
            "ops_s": ops / elapsed,
            "events_s": live.hub.events_read / elapsed,
            "overflows": live.hub.overflows,
            "exact": live.exact(),
        }
        await live.stop()
        return result


async def baseline_inotifywait(ops: int) -> dict[str, Any]:
    """inotifywait -m -r on U, same workload; paths it mentions vs the truth.

    Its output goes to a file, so a full pipe never stalls it.
    """
    with mounted() as ovl, tempfile.TemporaryFile() as out:
        before = compute(ovl.upper, ovl.lowers)
        watcher = await asyncio.create_subprocess_exec(
            *("stdbuf", "-oL", "inotifywait", "-m", "-r", "-q", "--format", "%w%f", ovl.upper),
            stdout=out,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # -q hides "Watches established."; give it time to walk
        gen = await _wait(run_generator(ovl.merged, ops))
        await asyncio.sleep(1.0)
        watcher.terminate()
        await watcher.wait()
        out.seek(0)
        lines = out.read().split(b"\n")
        after = compute(ovl.upper, ovl.lowers)
        upper = os.fsencode(ovl.upper)
        mentioned = {line[len(upper) :].rstrip(b"/") for line in lines if line}
        truth = _changed(before, after)
        return {
            "gen_ops_s": ops / gen["seconds"],
            "events": len(lines) - 1,
            "missed": len(truth - mentioned),
            "truth": len(truth),
        }


async def baseline_watchdog(ops: int) -> dict[str, Any]:
    """watchdog's inotify observer on U, same workload; paths it mentions vs the truth."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    paths: list[bytes] = []

    class Collect(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            for p in (event.src_path, getattr(event, "dest_path", "")):
                if p:
                    paths.append(os.fsencode(p))

    with mounted() as ovl:
        before = compute(ovl.upper, ovl.lowers)
        observer = Observer()
        observer.schedule(Collect(), ovl.upper, recursive=True)
        observer.start()
        await asyncio.sleep(0.5)
        gen = await _wait(run_generator(ovl.merged, ops))
        await asyncio.sleep(1.0)
        observer.stop()
        observer.join()
        after = compute(ovl.upper, ovl.lowers)
        upper = os.fsencode(ovl.upper)
        mentioned = {p[len(upper) :].rstrip(b"/") for p in paths}
        truth = _changed(before, after)
        return {
            "gen_ops_s": ops / gen["seconds"],
            "events": len(paths),
            "missed": len(truth - mentioned),
            "truth": len(truth),
        }


async def latency(rate: float, seconds: float) -> dict[str, float]:
    """Write-to-publish latency of new files at ``rate`` ops/s."""
    ops = int(rate * seconds)
    with mounted() as ovl:
        live = Live(ovl)
        await live.start()
        await live.sync()
        gen = await _wait(run_generator(ovl.merged, ops, rate, fresh=True))
        await live.sync()
        lat = []
        for i, done in enumerate(gen["done"]):
            seen = live.seen.get(f"/d{i % DIRS}/n{i}".encode())
            if seen is not None:
                lat.append((seen - done) * 1000)
        exact = live.exact()
        await live.stop()
    lat.sort()
    return {
        "samples": len(lat),
        "ops": ops,
        "p50": lat[len(lat) // 2],
        "p99": lat[int(len(lat) * 0.99)],
        "max": lat[-1],
        "exact": float(exact),
    }


async def memory(entries: int) -> dict[str, float]:
    """Bytes per tracked entry: tracemalloc around Tracker.start() over ``entries`` files."""
    with tempfile.TemporaryDirectory(prefix="lw-bench-mem-") as tmp:
        lower = os.path.join(tmp, "lower")
        upper = os.path.join(tmp, "upper")
        os.mkdir(lower)
        overlay.build_lower(lower, conftest.load_cases()["lower"])
        per_dir = entries // 100
        for k in range(100):
            os.makedirs(f"{upper}/m/d{k}")
            for i in range(per_dir):
                os.close(os.open(f"{upper}/m/d{k}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
        with Inotify() as ino:
            hub = Hub(ino, _discard)
            branch = Branch.of(Filesystem([os.fsencode(lower)], os.fsencode(upper), os.devnull))
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            tracker = Tracker.of("mem", branch, hub)
            items = tracker.start()
            peak = tracemalloc.get_traced_memory()[1]
            count = len(tracker.kinds)
            del items
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
            hub.close()
        return {"entries": count, "bytes_per_entry": held / count, "peak_mb": peak / 2**20}


async def _discard(mount: str, items: list[Item]) -> None:
    return None


async def run(args: argparse.Namespace) -> None:
    limits = read_limits()
    print(f"# bench_live: {args.ops} ops per run, max_queued_events={limits.max_queued_events}")
    print("\n## Sustained load (generator in its own process, tracker on the other core)")
    print(
        f"{'target ops/s':>12} {'gen ops/s':>10} {'tracked ops/s':>13} {'lag ms':>7} "
        f"{'overflows':>9} {'exact':>5} {'missed':>6} {'truth':>6}"
    )
    for rate in [*args.rates, 0]:
        r = await throughput(args.ops, rate)
        label = f"{rate:.0f}" if rate else "flat out"
        print(
            f"{label:>12} {r['gen_ops_s']:10.0f} {r['ops_s']:13.0f} {r['lag_ms']:7.1f} "
            f"{r['overflows']:9d} {r['exact']!s:>5} {r['missed']:6d} {r['truth']:6d}"
        )
    print("\n## Capacity: operations queued while the hub waits, then drained on one core")
    print(
        f"{'ops':>7} {'gen ops/s':>10} {'tracker ops/s':>13} {'events/s':>9} {'overflows':>9} "
        f"{'exact':>5}"
    )
    for ops in (2000, 4000):
        c = await capacity(ops)
        print(
            f"{ops:7d} {c['gen_ops_s']:10.0f} {c['ops_s']:13.0f} {c['events_s']:9.0f} "
            f"{c['overflows']:9d} {c['exact']!s:>5}"
        )
    print("\n## Same workload, flat out: paths of changed entries never mentioned")
    print(f"{'watcher':>22} {'gen ops/s':>10} {'events':>8} {'missed':>6} {'truth':>6}")
    for name, fn in (("inotifywait -m -r", baseline_inotifywait), ("watchdog", baseline_watchdog)):
        b = await fn(args.ops)
        print(
            f"{name:>22} {b['gen_ops_s']:10.0f} {b['events']:8d} {b['missed']:6d} {b['truth']:6d}"
        )
    r = await throughput(args.ops, 0)
    print(
        f"{'layerwatch tracker':>22} {r['gen_ops_s']:10.0f} {r['events']:8d} "
        f"{r['missed']:6d} {r['truth']:6d}  (exact list: {r['exact']})"
    )
    print("\n## Latency, write returned -> event published, new files at 1,000 ops/s for 3 s")
    lat = await latency(1000, 3)
    print(
        f"samples {lat['samples']:.0f}/{lat['ops']:.0f}  p50 {lat['p50']:.2f} ms  "
        f"p99 {lat['p99']:.2f} ms  max {lat['max']:.2f} ms  exact {bool(lat['exact'])}"
    )
    print(f"\n## Memory per tracked entry ({args.entries} new files in 100 dirs)")
    mem = await memory(args.entries)
    print(
        f"entries {mem['entries']:.0f}  {mem['bytes_per_entry']:.0f} B/entry held  "
        f"peak during start {mem['peak_mb']:.0f} MiB (snapshot items included)"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run the benchmark (or the generator)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=50_000, help="operations per run")
    parser.add_argument("--rates", type=float, nargs="*", default=[10_000, 25_000, 50_000])
    parser.add_argument("--entries", type=int, default=100_000, help="entries for memory")
    parser.add_argument(
        "--generator",
        choices=["python", "c"],
        default="python",
        help="the load generator: this script, or loadgen.c compiled with cc (faster)",
    )
    parser.add_argument(
        "--tmpfs",
        action="store_true",
        help="keep the branches on a tmpfs (the disk is not the limit)",
    )
    parser.add_argument(
        "--generate", nargs=3, metavar=("ROOT", "OPS", "RATE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate:
        root, ops, rate = args.generate
        generate(root, int(ops), float(rate), args.fresh)
        return 0
    if os.geteuid() != 0:
        print("bench_live needs root (it mounts overlayfs)", file=sys.stderr)
        return 2
    if args.generator == "c":
        use_c_generator()
    TMPFS[0] = args.tmpfs
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
