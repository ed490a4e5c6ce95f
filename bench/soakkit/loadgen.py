"""The load generator: ``bench/loadgen.c`` compiled at start into the harness's temp dir and
run in its own process in ``soak`` mode, writing through the merged views at a target rate.

The harness pauses it (SIGSTOP) around each checkpoint; the time paused is not counted when
the achieved rate is computed, and the generator does not burst to catch up afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Loadgen", "Run", "compile_loadgen"]

SOURCE = Path(__file__).resolve().parents[1] / "loadgen.c"


def compile_loadgen(out_dir: Path) -> Path:
    """Compile ``loadgen.c`` with ``cc`` into ``out_dir``; the binary's path."""
    binary = out_dir / "loadgen"
    argv = ["cc", "-O2", "-Wall", "-Wno-format-truncation", "-o", str(binary), str(SOURCE)]
    subprocess.run(argv, check=True, timeout=120)
    return binary


@dataclass
class Run:
    """One process of the generator: what it did and for how long it was not paused."""

    rate: float | None
    ops: int = 0
    seconds: float = 0.0
    paused: float = 0.0


@dataclass
class Loadgen:
    """Starts, pauses and stops generator processes over the same roots.

    Args:
        binary: the compiled generator.
        roots: the merged views it writes through.
        seed: the run's seed; each process gets its own stream from it.
    """

    binary: Path
    roots: Sequence[Path]
    seed: int
    proc: subprocess.Popen[str] | None = None
    run: Run | None = None
    runs: int = 0
    _paused_at: float | None = None
    history: list[Run] = field(default_factory=list)

    def start(self, rate: float | None) -> None:
        """Start a process at ``rate`` ops/s over all roots (0: flat out; None: idle, no
        process)."""
        self.stop()
        self.run = Run(rate)
        if rate is None:
            return
        self.runs += 1
        argv = [str(self.binary), "soak", str(self.seed * 10_000 + self.runs), f"{rate:g}"]
        argv += [os.fspath(root) for root in self.roots]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

    def pause(self) -> None:
        """SIGSTOP the process (a checkpoint)."""
        if self.proc is not None and self.proc.poll() is None and self._paused_at is None:
            self.proc.send_signal(signal.SIGSTOP)
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        """SIGCONT it."""
        if self._paused_at is not None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            if self.run is not None:
                self.run.paused += time.monotonic() - self._paused_at
            self._paused_at = None

    def stop(self) -> Run | None:
        """End the process; its run (ops, seconds, paused) is kept in ``history``."""
        self.resume()
        run, proc = self.run, self.proc
        self.run, self.proc = None, None
        if proc is not None:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate(timeout=10)
            if run is not None and out.strip():
                result = json.loads(out.strip().splitlines()[-1])
                run.ops, run.seconds = int(result["ops"]), float(result["seconds"])
        if run is not None:
            self.history.append(run)
        return run

    def kill(self) -> None:
        """Clean-up: SIGKILL the process if there is one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
