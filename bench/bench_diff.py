"""Benchmark: the upper-only change list against the two-tree comparison, side by side.

Builds a lower layer of about N entries and, through a real overlay mount, an upper branch of
about N entries (new files and dirs, modified and chmod-ed lower files, deletions that leave
whiteouts, directories emptied and recreated opaque), then times, in one run, median of
``--repeat``:

- ``compute``: ``watcher.core.rules.compute(upper, [lower])`` (reads U and B only), with the
  C scan when it is built, and ``compute, pure Python`` (``native=False``) beside it;
- ``two-tree``: the oracle's comparison of the merged view against the base view (how
  ``docker diff`` works on overlay2: walk both whole trees);
- ``find``: ``find UPPER > /dev/null``, the floor for walking the upper at all;
- ``compute aufs``: ``compute`` after rewriting the branches into aufs format.

It also reports peak memory of ``compute`` (tracemalloc peak of Python allocations, and the
peak RSS of a child process that only imports and runs it). Needs root (it mounts overlayfs).

Usage: ``python bench/bench_diff.py [--entries 100000] [--repeat 5] [--dir /tmp]``
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from watcher.core.native import status  # noqa: E402
from watcher.core.rules import compute  # noqa: E402

# The oracle and the overlay kit live with the tests (they are test code, not the product).
oracle: Any = importlib.import_module("oracle")
overlay: Any = importlib.import_module("overlay")

MTIME = 1_700_000_000


def build_lower(root: Path, entries: int) -> tuple[list[bytes], list[bytes]]:
    """Create about ``entries`` entries under ``root``; return (dirs, files) relative paths."""
    per_dir = 200
    ndirs = max(1, entries // (per_dir + 2))
    dirs: list[bytes] = []
    files: list[bytes] = []
    broot = os.fsencode(root)
    for i in range(ndirs):
        d = b"d%05d" % i
        sub = d + b"/sub"
        os.makedirs(os.path.join(broot, sub))
        dirs += [d, sub]
        for j in range(per_dir):
            rel = (d if j % 4 else sub) + b"/f%04d" % j
            fd = os.open(os.path.join(broot, rel), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"lower\n")
            os.close(fd)
            files.append(rel)
    ns = MTIME * 1_000_000_000
    for rel in files:
        os.utime(os.path.join(broot, rel), ns=(ns, ns))
    return dirs, files


def build_upper(merged: Path, dirs: list[bytes], files: list[bytes], entries: int) -> None:
    """Through the merged mount: modify, chmod, delete, empty-and-recreate, add new content."""
    m = os.fsencode(merged)
    n = len(files)
    for rel in files[0:n:7]:  # ~14%: content modified (copy-up)
        with open(os.path.join(m, rel), "ab") as fh:
            fh.write(b"more\n")
    for rel in files[3:n:20]:  # ~5%: chmod (copy-up, metadata only)
        os.chmod(os.path.join(m, rel), 0o600)
    for rel in files[5:n:10]:  # 10%: deleted (whiteouts)
        os.unlink(os.path.join(m, rel))
    for rel in dirs[0 : len(dirs) : 40]:  # 2.5% of dirs: emptied and recreated (opaque)
        path = os.path.join(m, rel)
        shutil.rmtree(path)
        os.mkdir(path)
        for k in range(10):
            with open(os.path.join(path, b"n%02d" % k), "wb") as fh:
                fh.write(b"new\n")
    remaining = max(0, entries - (n // 7 + n // 20 + n // 10))
    per_dir = 100
    for i in range(remaining // (per_dir + 1)):
        d = os.path.join(m, b"new%05d" % i)
        os.mkdir(d)
        for k in range(per_dir):
            fd = os.open(os.path.join(d, b"f%03d" % k), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"n")
            os.close(fd)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child_peak_rss(upper: str, lower: str, run: bool) -> int:
    """Peak RSS (KiB, VmHWM) of a fresh interpreter that imports compute and, if ``run``, runs it.

    VmHWM belongs to the new process image; ``ru_maxrss`` would carry this (large) parent's
    peak across fork and exec.
    """
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from watcher.core.rules import compute\n"
        "if sys.argv[4] == '1': compute(sys.argv[2], [sys.argv[3]])\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO), upper, lower, "1" if run else "0"],
        capture_output=True,
        check=True,
        text=True,
    )
    return int(out.stdout.strip())


def lstat_walk(root: str) -> int:
    """The Python floor: scandir every directory and lstat every entry of ``root``."""
    count = 0
    stack = [os.fsencode(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = os.lstat(entry.path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return count


def count_entries(root: str) -> int:
    """Number of entries below ``root`` (not counting it)."""
    total = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        total += len(dirnames) + len(filenames)
    return total


def main() -> int:
    """Build the trees, time the three walks, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to build the trees (default: TMPDIR)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_diff: needs root (it mounts overlayfs)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="lw-bench-", dir=args.dir) as tmp:
        lower = Path(tmp, "lower")
        lower.mkdir()
        t0 = time.perf_counter()
        dirs, files = build_lower(lower, args.entries)
        # volatile: copy-up skips its fsync (setup speed only; the timed walks do not write).
        options = overlay.MOUNT_OPTIONS + ",volatile"
        with overlay.mount_overlay(tmp, [str(lower)], options=options) as ovl:
            build_upper(Path(ovl.merged), dirs, files, args.entries)
            os.sync()
            setup = time.perf_counter() - t0
            n_lower, n_upper = count_entries(str(lower)), count_entries(ovl.upper)

            got = compute(ovl.upper, [str(lower)])
            want = oracle.changes_dirs(ovl.merged, str(lower))
            agree = [(c.path, c.kind.value) for c in got] == want

            t_compute = median_time(lambda: compute(ovl.upper, [str(lower)]), args.repeat)
            t_python = median_time(
                lambda: compute(ovl.upper, [str(lower)], native=False), args.repeat
            )
            t_two = median_time(lambda: oracle.changes_dirs(ovl.merged, str(lower)), args.repeat)
            t_find = median_time(
                lambda: subprocess.run(["find", ovl.upper], stdout=subprocess.DEVNULL, check=True),
                args.repeat,
            )
            t_pywalk = median_time(lambda: lstat_walk(ovl.upper), args.repeat)
            tracemalloc.start()
            compute(ovl.upper, [str(lower)])
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_run = child_peak_rss(ovl.upper, str(lower), run=True)
            rss_idle = child_peak_rss(ovl.upper, str(lower), run=False)
            upper = ovl.upper

        overlay.to_aufs(upper, root_metadata=True)
        overlay.to_aufs(str(lower))
        aufs_agree = [
            (c.path, c.kind.value) for c in compute(upper, [str(lower)], whiteouts="aufs")
        ] == want
        t_aufs = median_time(lambda: compute(upper, [str(lower)], whiteouts="aufs"), args.repeat)

    print(
        f"lower entries {n_lower}, upper entries {n_upper}, changes {len(want)}, "
        f"setup {setup:.1f} s, median of {args.repeat}, kernel {os.uname().release}"
    )
    print(f"compute agrees with the two-tree oracle: overlay {agree}, aufs {aufs_agree}")
    print(f"compute runs in {status()[1]}")
    print()
    print(f"{'walk':<28}{'median s':>10}{'vs compute':>12}")
    rows = [
        ("compute (overlay, mounted)", t_compute),
        ("compute (aufs format)", t_aufs),
        ("compute, pure Python", t_python),
        ("two-tree (merged vs base)", t_two),
        ("python scandir+lstat of U", t_pywalk),
        ("find UPPER > /dev/null", t_find),
    ]
    for name, t in rows:
        print(f"{name:<28}{t:>10.3f}{t / t_compute:>11.2f}x")
    print()
    print(f"two-tree / compute = {t_two / t_compute:.2f}  (goal >= 3)")
    print(f"compute / find     = {t_compute / t_find:.2f}  (goal <= 3)")
    print(f"compute / python lstat walk of U = {t_compute / t_pywalk:.2f}")
    print(
        f"compute peak: tracemalloc {traced_peak / 2**20:.1f} MiB; child RSS "
        f"{rss_run / 1024:.1f} MiB (interpreter + import alone {rss_idle / 1024:.1f} MiB)"
    )
    ok = agree and aufs_agree
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
