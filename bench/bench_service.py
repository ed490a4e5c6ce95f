"""The service end to end as an operator runs it: ``layerwatch run`` in its own process, the C
load generator in another, a spool and a jsonl sink, everything on a tmpfs.

For each ``layerwatch`` executable given (so two builds can be compared in one run, e.g. one
installed in a venv from an older commit) and each target rate, a fresh overlay (its lower
holds ``d0..d19``), a fresh service following it (attached by mountpoint), then
``bench/loadgen.c`` makes ``--ops`` mixed operations through the merged view at the rate (0:
flat out). Measured:

- **generated ops/s**: what the generator achieved with the service watching;
- **to the spool**: seconds from the last operation until the sync barrier
  (``diff --server``: every change before it reconciled, published and durable) returns;
- **to the sink**: seconds from the last operation until the jsonl file holds the event at
  the head of the sequence; **events/s**: events delivered to the file over the time from the
  first operation until then;
- **exact**: the service's list after the barrier equals ``layerwatch diff MERGED`` (a full
  recomputation);
- **peak RSS** of the service (VmHWM);
- **overflow resyncs**: how often the kernel queue overflowed and the mount was rescanned
  (counted in the service's log, per run): the service's ceiling shows there first.

Baselines in the same run: the generator alone on the same tmpfs overlay with no service
(its ceiling), and each executable against the others. Medians of ``--runs``.

    python3 bench/bench_service.py --ops 300000 --rate 50000 --rate 0 \\
        --layerwatch /tmp/old/bin/layerwatch --layerwatch layerwatch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    overflows: int
    generated: float
    to_spool: float
    to_sink: float
    events_per_s: float
    exact: bool
    peak_mib: float


def _build_loadgen(where: Path) -> Path:
    exe = where / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(REPO / "bench" / "loadgen.c")], check=True)
    return exe


class Rig:
    """A tmpfs with a fresh overlay per run (lower: d0..d19)."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="lw-bench-svc-"))
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(self.base)], check=True
        )
        self.loadgen = _build_loadgen(self.base)
        self.runs = 0

    def overlay(self) -> tuple[Path, Path]:
        """A new run dir and its mounted merged view (the previous run's is removed: a few
        runs' spools and outputs would fill the tmpfs)."""
        if self.runs:
            previous = self.base / f"run{self.runs}"
            subprocess.run(["umount", "-l", str(previous / "merged")], check=False)
            shutil.rmtree(previous, ignore_errors=True)
        self.runs += 1
        run = self.base / f"run{self.runs}"
        lower, upper, work, merged = (run / n for n in ("lower", "upper", "work", "merged"))
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        for k in range(20):
            (lower / f"d{k}").mkdir(parents=True)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True
        )
        return run, merged

    def close(self) -> None:
        for run in sorted(self.base.glob("run*")):
            subprocess.run(["umount", "-l", str(run / "merged")], check=False)
        subprocess.run(["umount", "-l", str(self.base)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def generate(self, merged: Path, ops: int, rate: int) -> tuple[float, float, float]:
        """Run the load: (ops/s achieved, monotonic time of its first op, of its last op)."""
        began = time.monotonic()
        out = subprocess.run(
            [str(self.loadgen), str(merged), str(ops), str(rate)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        report = json.loads(out)
        return ops / report["seconds"], began, float(report["end"])


def _last_seq(path: Path) -> int:
    """The ``sequence`` of the last complete line of the jsonl file (0: none yet)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    for line in reversed(lines[:-1]):
        if line:
            return int(json.loads(line)["sequence"])
    return 0


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _diff(exe: str, *args: str) -> list[object]:
    """``diff --json``; through ``--server``, asked again while the barrier times out (the
    API gives a sync 10 s; a service behind by more answers 504)."""
    while True:
        proc = subprocess.run([exe, "diff", "--json", *args], capture_output=True, check=False)
        if proc.returncode == 0:
            rows: list[object] = json.loads(proc.stdout)
            return rows
        if b"504" not in proc.stderr:
            raise SystemExit(proc.stderr.decode(errors="replace"))


def run_service(rig: Rig, build: str, ops: int, rate: int) -> Result:
    """One measured run of ``build``: ``EXE`` or ``EXE@SOURCE`` (``[service] source``)."""
    exe, _, source = build.partition("@")
    service = f'[service]\nsource = "{source}"\n' if source else ""
    run, merged = rig.overlay()
    sock, out = run / "api.sock", run / "events.jsonl"
    config = run / "layerwatch.toml"
    config.write_text(
        f'[[mounts]]\nname = "m"\nmountpoint = "{merged}"\n'
        f'[sinks.out]\ntype = "jsonl"\npath = "{out}"\nbatch_size = 1000\n'
        f'[spool]\npath = "{run / "spool.db"}"\nmax_bytes = "2GiB"\n'
        f'[api]\nsocket = "{sock}"\n{service}'
    )
    with (run / "stderr").open("wb") as err:
        proc = subprocess.Popen([exe, "run", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((run / "stderr").read_text()[-2000:])
            time.sleep(0.05)
        _diff(exe, "--server", str(sock), "m")  # started and synced: the snapshot is out
        generated, began, last_op = rig.generate(merged, ops, rate)
        listed = _diff(exe, "--server", str(sock), "m")
        to_spool = time.monotonic() - last_op
        health = subprocess.run(
            [exe, "status", "--server", str(sock)], capture_output=True, text=True, check=False
        ).stdout
        head = _head(health)
        while _last_seq(out) < head:
            if proc.poll() is not None:
                raise SystemExit((run / "stderr").read_text()[-2000:])
            time.sleep(0.01)
        caught_up = time.monotonic()
        events = sum(1 for _ in out.open("rb"))
        exact = listed == _diff(exe, str(merged))
        peak = _peak_mib(proc.pid)
        overflows = (run / "stderr").read_text().count("inotify_overflow")  # either source
        return Result(
            overflows=overflows,
            generated=generated,
            to_spool=to_spool,
            to_sink=caught_up - last_op,
            events_per_s=events / (caught_up - began),
            exact=exact,
            peak_mib=peak,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _head(status: str) -> int:
    """The head seq ``layerwatch status`` prints (``... (head seq N)``)."""
    found = re.search(r"head seq (\d+)", status)
    if found is None:
        raise SystemExit(f"no head seq in `layerwatch status`:\n{status}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=300_000)
    parser.add_argument("--rate", type=int, action="append", help="ops/s (0: flat out)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--layerwatch",
        action="append",
        metavar="EXE[@SOURCE]",
        help="builds to compare; @inotify or @fanotify sets [service] source",
    )
    args = parser.parse_args()
    exes = args.layerwatch or ["layerwatch"]
    rates = args.rate or [50_000, 0]
    rig = Rig()
    try:
        print(
            "| build | target ops/s | generated ops/s | to the spool after the last op (s) "
            "| to the sink (s) | events/s to the sink | exact | peak RSS (MiB) "
            "| overflow resyncs per run |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for rate in rates:
            alone = []
            for _ in range(args.runs):
                _run, merged = rig.overlay()
                alone.append(rig.generate(merged, args.ops, rate)[0])
            target = f"{rate:,}" if rate else "flat out"
            print(f"| (no service) | {target} | {statistics.median(alone):,.0f} | | | | | | |")
            for exe in exes:
                results = [run_service(rig, exe, args.ops, rate) for _ in range(args.runs)]

                def med(values: list[float]) -> float:
                    return statistics.median(values)

                print(
                    f"| {exe} | {target} | {med([r.generated for r in results]):,.0f} "
                    f"| {med([r.to_spool for r in results]):.2f} "
                    f"| {med([r.to_sink for r in results]):.2f} "
                    f"| {med([r.events_per_s for r in results]):,.0f} "
                    f"| {'yes' if all(r.exact for r in results) else 'NO'} "
                    f"| {med([r.peak_mib for r in results]):.0f} "
                    f"| {', '.join(str(r.overflows) for r in results)} |",
                    flush=True,
                )
    finally:
        rig.close()


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench_service.py needs root (tmpfs and overlay mounts)")
    main()
