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
    _ending: list[tuple[subprocess.Popen[str], Run, float]] = field(default_factory=list)
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
        """Let a stopped process run again, counting the time it was stopped; let the ones
        stopped during the hold end now."""
        now = time.monotonic()
        if self._paused_at is not None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
            if self.run is not None:
                self.run.paused += now - self._paused_at
            self._paused_at = None
        ending, self._ending = self._ending, []
        for proc, run, since in ending:
            run.paused += now - since
            proc.send_signal(signal.SIGCONT)
            _reap(proc, run)

    def stop(self) -> Run | None:
        """End the process; its run (ops, seconds, paused) is kept in ``history``. A hold
        in force stays in force for the next process, and a held process only gets SIGTERM:
        it ends when the hold does (resumed now, it could finish the operation it was
        stopped in while a checkpoint still runs)."""
        self._pending = False
        run, proc = self.run, self.proc
        self.run, self.proc = None, None
        if proc is not None:
            proc.terminate()
            if self._paused_at is not None and run is not None:
                self._ending.append((proc, run, self._paused_at))
                self._paused_at = None
            else:
                _reap(proc, run)
        if run is not None:
            self.history.append(run)
        return run

    def kill(self) -> None:
        """Clean-up: SIGKILL every process there is."""
        procs = [proc for proc, _, _ in self._ending]
        if self.proc is not None:
            procs.append(self.proc)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)
        self.proc, self._ending = None, []


def _reap(proc: subprocess.Popen[str], run: Run | None) -> None:
    """Wait for an ended process; its ops and seconds go into ``run``."""
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    if run is not None and out.strip():
        result = json.loads(out.strip().splitlines()[-1])
        run.ops, run.seconds = int(result["ops"]), float(result["seconds"])
