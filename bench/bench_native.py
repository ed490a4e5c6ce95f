"""Benchmark: ``layerwatch diff`` against ``docker diff`` on the anchor workload (issue 13).

Starts a private dockerd (its own data root under ``--dir``, overlay2, no network; the way
``tests/test_docker.py`` does), imports a busybox image holding 1,000 directories of 100 files
under ``/data``, starts a container and, through its merged directory, appends to 50 files per
directory, deletes 20 per directory and makes 300 new directories of 100 files: 101,303
changes. Then, in one run, median of ``--repeat``:

- ``docker diff CONTAINER`` (the daemon compares the merged view with the image's);
- ``layerwatch diff MERGED``, the whole command (process start, imports, mountinfo, the list,
  the output), with the C scan and with ``LAYERWATCH_PURE_PYTHON=1``;
- ``python -c "import watcher.cli"``: what the command costs before it does anything;
- ``compute(UPPER, LOWERS)`` in this process, C and Python (the computation itself);
- the live tracker on the same branch, C and Python: its start (watch and scan every
  directory) and a resync (the rescan of everything an overflow causes), with real inotify;
- ``find UPPER > /dev/null``: the floor for walking the upper at all.

The two answers (``docker diff`` and ``layerwatch diff``) must be the same set of lines.
Needs root, ``dockerd``/``docker`` and a static busybox.

Usage: ``python bench/bench_native.py [--repeat 5] [--dir /tmp]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watcher.core.layers import LowerStack  # noqa: E402
from watcher.core.model import Item  # noqa: E402
from watcher.core.native import ENV_PURE_PYTHON, status  # noqa: E402
from watcher.core.rules import Rules, compute  # noqa: E402
from watcher.live.hub import Hub  # noqa: E402
from watcher.live.inotify import Inotify  # noqa: E402
from watcher.live.tracker import Tracker  # noqa: E402

IMAGE = "layerwatch-bench:anchor"
DIRS, FILES = 1000, 100
APPEND, DELETE = 50, 20
NEW_DIRS = 300


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, in seconds (one untimed call first)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Docker:
    """A private dockerd: ``run`` talks to it."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.data_root = top / "data"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(top),
            "DOCKER_HOST": f"unix://{top}/sock",
            "DOCKER_CONFIG": str(top / "cli"),
        }

    def run(self, *args: str, stdin: bytes | None = None, timeout: float = 300) -> str:
        """A docker CLI command's stdout.

        Raises:
            RuntimeError: the command failed (its stderr).
        """
        proc = subprocess.run(
            ["docker", *args], env=self.env, input=stdin, capture_output=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()


@contextlib.contextmanager
def private_dockerd(base: str | None) -> Iterator[Docker]:
    """A dockerd with its own roots and socket (a short path: the socket's 108-byte limit)."""
    top = Path(tempfile.mkdtemp(prefix="lwb-", dir=base or "/tmp"))
    (top / "daemon.json").write_text("{}")
    docker = Docker(top)
    argv = [
        "dockerd",
        f"--config-file={top}/daemon.json",
        f"--data-root={docker.data_root}",
        f"--exec-root={top}/exec",
        f"--pidfile={top}/pid",
        f"--host=unix://{top}/sock",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--storage-driver=overlay2",
    ]
    with (top / "dockerd.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=docker.env)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    docker.run("version", timeout=10)
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        tail = (top / "dockerd.log").read_text(errors="replace")[-1500:]
                        raise RuntimeError(f"dockerd did not start: {tail}") from None
                    time.sleep(0.2)
            yield docker
        finally:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                ids = docker.run("ps", "-aq").split()
                if ids:
                    docker.run("rm", "-f", *ids)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(top, ignore_errors=True)


def image_tar() -> bytes:
    """busybox (sleep) and /data: DIRS directories of FILES small files, built in memory."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not installed (Debian busybox-static)")
    buf = io.BytesIO()
    mtime = 1_700_000_000
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)

        for name in ("bin", "tmp", "etc", "proc", "sys", "dev", "data"):
            add_dir(name)
        tar.add(busybox, arcname="bin/busybox")
        for tool in ("sh", "sleep"):
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", mtime
            tar.addfile(info)
        body = b"lower\n"
        for d in range(DIRS):
            add_dir(f"data/d{d:04d}")
            for f in range(FILES):
                info = tarfile.TarInfo(f"data/d{d:04d}/f{f:03d}")
                info.size, info.mode, info.mtime = len(body), 0o644, mtime
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def container_workload(merged: Path) -> None:
    """The anchor's writes, through the container's merged view."""
    for d in range(DIRS):
        directory = merged / "data" / f"d{d:04d}"
        for f in range(APPEND):
            with open(directory / f"f{f:03d}", "ab") as fh:
                fh.write(b"more\n")
        for f in range(APPEND, APPEND + DELETE):
            os.unlink(directory / f"f{f:03d}")
    for d in range(NEW_DIRS):
        directory = merged / "data" / f"new{d:03d}"
        directory.mkdir()
        for f in range(FILES):
            os.close(os.open(directory / f"n{f:03d}", os.O_CREAT | os.O_WRONLY, 0o644))


async def _unused(mount: str, items: list[Item]) -> None:
    raise AssertionError("the bench calls the tracker itself")


def tracker_times(upper: str, lowers: list[str], native: bool, repeat: int) -> tuple[float, float]:
    """Median seconds of a tracker's start and of its resync, on the C or the Python scan."""
    starts, resyncs = [], []
    for _ in range(repeat):
        with Inotify() as inotify:
            hub = Hub(inotify, _unused)
            lower = LowerStack(lowers)
            tracker = Tracker("bench", os.fsencode(upper), lower, hub)
            tracker.rules = Rules(upper, lower, native=native)
            t0 = time.perf_counter()
            tracker.start()
            starts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tracker.resync("bench")
            resyncs.append(time.perf_counter() - t0)
            tracker.close()
            hub.close()
    return statistics.median(starts), statistics.median(resyncs)


def layerwatch_argv() -> list[str]:
    """The console script beside this interpreter (not a shim), else ``python -m``."""
    script = Path(sys.executable).parent / "layerwatch"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "watcher.cli"]


def main() -> int:
    """Start dockerd, build the workload, time the rows, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where dockerd keeps its data (default /tmp)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_native: needs root (dockerd)", file=sys.stderr)
        return 2
    native, which = status()
    if not native:
        print(f"bench_native: the C scan is not in use: {which}", file=sys.stderr)
        return 2

    env = dict(os.environ, PYTHONPATH=str(REPO))
    pure_env = dict(env, **{ENV_PURE_PYTHON: "1"})
    lw = layerwatch_argv()

    def run(argv: list[str], run_env: dict[str, str] | None = None) -> None:
        subprocess.run(argv, env=run_env or env, stdout=subprocess.DEVNULL, check=True)

    with private_dockerd(args.dir) as docker:
        t0 = time.perf_counter()
        docker.run("import", "-", IMAGE, stdin=image_tar())
        cid = docker.run("run", "-d", "--network=none", IMAGE, "/bin/sleep", "3600").strip()
        data = json.loads(docker.run("inspect", cid))[0]["GraphDriver"]["Data"]
        merged, upper = Path(data["MergedDir"]), data["UpperDir"]
        lowers = data["LowerDir"].split(":")
        container_workload(merged)
        os.sync()
        setup = time.perf_counter() - t0

        docker_lines = set(docker.run("diff", cid).splitlines())
        ours = subprocess.run([*lw, "diff", str(merged)], env=env, capture_output=True, check=True)
        lw_lines = set(ours.stdout.decode().splitlines())
        agree = docker_lines == lw_lines
        c_list = compute(upper, lowers, native=True)
        agree_c_py = c_list == compute(upper, lowers, native=False)

        rows = [
            ("docker diff CONTAINER", median_time(lambda: docker.run("diff", cid), args.repeat)),
            (
                "layerwatch diff MERGED (C scan)",
                median_time(lambda: run([*lw, "diff", str(merged)]), args.repeat),
            ),
            (
                "layerwatch diff MERGED (pure Python)",
                median_time(lambda: run([*lw, "diff", str(merged)], pure_env), args.repeat),
            ),
            (
                'python -c "import watcher.cli"',
                median_time(lambda: run([sys.executable, "-c", "import watcher.cli"]), args.repeat),
            ),
            (
                "compute(UPPER, LOWERS), C",
                median_time(lambda: compute(upper, lowers, native=True), args.repeat),
            ),
            (
                "compute(UPPER, LOWERS), Python",
                median_time(lambda: compute(upper, lowers, native=False), args.repeat),
            ),
            ("find UPPER > /dev/null", median_time(lambda: run(["find", upper]), args.repeat)),
        ]
        for native_scan, label in ((True, "C"), (False, "Python")):
            start, resync = tracker_times(upper, lowers, native_scan, args.repeat)
            rows += [(f"tracker start, {label}", start), (f"tracker resync, {label}", resync)]

    times = dict(rows)
    print(
        f"changes {len(c_list)} (docker diff {len(docker_lines)} lines), setup {setup:.1f} s, "
        f"median of {args.repeat}, dockerd data root on {args.dir or '/tmp'}, "
        f"kernel {os.uname().release}"
    )
    print(f"layerwatch diff prints docker diff's lines: {agree}")
    print(f"compute's list, C == Python: {agree_c_py}")
    print()
    print(f"{'row':<40}{'median s':>10}{'vs docker diff':>16}")
    for name, t in rows:
        print(f"{name:<40}{t:>10.3f}{times['docker diff CONTAINER'] / t:>15.2f}x")
    print()
    d, c = times["docker diff CONTAINER"], times["layerwatch diff MERGED (C scan)"]
    find = times["find UPPER > /dev/null"]
    print(f"docker diff / layerwatch diff (C)     = {d / c:.2f}  (goal >= 5)")
    print(f"docker diff / layerwatch diff (Python) = {d / times[rows[2][0]]:.2f}")
    print(f"compute C / find                       = {times[rows[4][0]] / find:.2f}  (goal <= 4)")
    print(f"compute Python / compute C             = {times[rows[5][0]] / times[rows[4][0]]:.2f}")
    for what in ("start", "resync"):
        py, c = times[f"tracker {what}, Python"], times[f"tracker {what}, C"]
        print(f"tracker {what}: Python / C = {py / c:.2f}")
    return 0 if agree and agree_c_py else 1


if __name__ == "__main__":
    sys.exit(main())
