"""The load generator: ``bench/loadgen.c`` compiled at start into the harness's temp dir and
run in its own process in ``soak`` mode, writing through the merged views at a target rate.

The harness holds it (SIGSTOP) around each checkpoint; the time it is stopped is not counted
when the achieved rate is computed, the generator does not burst to catch up afterwards, and a
process asked for during a hold starts only when the hold ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
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
        record: called with each process's pid (for the clean-up of a SIGKILLed harness).
    """

    binary: Path
    roots: Sequence[Path]
    seed: int
    record: Callable[[int], None] | None = None
    proc: subprocess.Popen[str] | None = None
    run: Run | None = None
    runs: int = 0
    holds: int = 0
    _paused_at: float | None = None
    _pending: bool = False
    history: list[Run] = field(default_factory=list)

    def start(self, rate: float | None) -> None:
        """Start a process at ``rate`` ops/s over all roots (0: flat out; None: idle, no
        process). While the generator is held (a checkpoint), the process starts only once
        the hold ends: nothing may write during a checkpoint."""
        self.stop()
        self.run = Run(rate)
        if rate is None:
            return
        if self.holds:
            self._pending = True
        else:
            self._spawn()

    def _spawn(self) -> None:
        assert self.run is not None
        assert self.run.rate is not None
        self.runs += 1
        argv = [str(self.binary), "soak", str(self.seed * 10_000 + self.runs), f"{self.run.rate:g}"]
        argv += [os.fspath(root) for root in self.roots]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if self.record is not None:
            self.record(self.proc.pid)

    def pause(self) -> None:
        """Hold the generator: SIGSTOP its process (a checkpoint); holds nest."""
        self.holds += 1
        if self.holds == 1 and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        """End one hold; after the last, SIGCONT (or start the process asked for meanwhile)."""
        if not self.holds:
            return
        self.holds -= 1
        if self.holds == 0:
            self._release()
            if self._pending and self.run is not None:
                self._pending = False
                self._spawn()

    def _release(self) -> None:
        """Let a stopped process run again, counting the time it was stopped."""
        if self._paused_at is not None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            if self.run is not None:
                self.run.paused += time.monotonic() - self._paused_at
            self._paused_at = None

    def stop(self) -> Run | None:
        """End the process; its run (ops, seconds, paused) is kept in ``history``. A hold
        in force stays in force for the next process."""
        self._release()
        self._pending = False
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
