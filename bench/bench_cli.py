"""Start-up cost of the ``layerwatch`` command: ``import watcher.cli`` and ``layerwatch diff`` on a
small tree, this checkout against a baseline revision, in the same run.

The baseline is the source tree of a git revision (``git archive REV``, unpacked in a temporary
directory); each measurement runs a fresh interpreter with ``PYTHONPATH`` set to one tree or the
other, runs of the two alternating so that both see the same machine load. Bytecode is
compiled by a warm-up run first. ``python -c pass`` is the floor. No root needed: the diff reads
plain directories (``--upper``/``--lower``), not a mount.

    python3 bench/bench_cli.py --baseline-rev 551a2d1 --runs 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _small_tree(top: Path) -> tuple[Path, Path]:
    """A lower of 10 dirs x 10 files and an upper with 20 changes (new, modified, deleted)."""
    lower, upper = top / "lower", top / "upper"
    for d in range(10):
        (lower / f"d{d}").mkdir(parents=True)
        for f in range(10):
            (lower / f"d{d}" / f"f{f}").write_text("lower\n")
    for d in range(2):
        (upper / f"d{d}").mkdir(parents=True)
        for f in range(5):
            (upper / f"d{d}" / f"f{f}").write_text("changed\n")
        for f in range(5):
            (upper / f"d{d}" / f"new{f}").write_text("new\n")
    return lower, upper


def _time(argv: list[str], tree: Path | None) -> float:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - start


def main() -> None:
    """Measure and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision of the baseline")
    parser.add_argument("--runs", type=int, default=21, help="runs per measurement (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-bench-cli-") as tmp:
        top = Path(tmp)
        base = top / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline_rev], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        lower, upper = _small_tree(top / "tree")
        python = sys.executable
        cases = {
            "`python -c pass` (the floor)": [python, "-c", "pass"],
            "`python -c 'import watcher.cli'`": [python, "-c", "import watcher.cli"],
            "`layerwatch diff --upper U --lower L` (20 changes)": [
                *(python, "-m", "watcher.cli", "diff"),
                *("--upper", str(upper), "--lower", str(lower)),
            ],
        }
        trees = {"baseline": base, "this checkout": REPO}
        for argv in cases.values():  # warm-up: bytecode compiled, files in the page cache
            for tree in trees.values():
                _time(argv, tree)
        print(f"baseline {args.baseline_rev}, {args.runs} runs each, medians (ms)\n")
        print("| command | baseline | this checkout | change |")
        print("|---|---|---|---|")
        for label, argv in cases.items():
            samples: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.runs):
                for name, tree in trees.items():
                    samples[name].append(_time(argv, tree))
            before = statistics.median(samples["baseline"]) * 1000
            after = statistics.median(samples["this checkout"]) * 1000
            print(f"| {label} | {before:.1f} | {after:.1f} | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
