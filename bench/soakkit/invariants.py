"""The ledger of invariants: how often each was checked, held, was violated, and the first
example of a violation. Violations are also printed as they happen (the first few of each)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TextIO

__all__ = ["DESCRIPTIONS", "Invariant", "Ledger"]

DESCRIPTIONS: Final = {
    "alive": "the service is running unless the harness stopped it",
    "ready": "a (re)started service answers its API within the start deadline",
    "barrier": "POST /v1/mounts/NAME/sync passes within its timeout",
    "list_exact": "after the barrier, the API's list == `layerwatch diff` of the mount",
    "sink_caught_up": "each sink reaches the barrier's seq within the deadline",
    "sink_replay_exact": "each sink's replayed events == `layerwatch diff` (per mount)",
    "seq_no_holes": "no seq missing in a sink's output, except announced gaps",
    "ids_unique": "one event id never names two different events",
    "prev_kind_chain": "outside snapshots, prev_kind == what the consumer holds",
    "rss_bounded": "the service's VmRSS stays under the limit",
    "spool_one_owner": "a second service on the spool (through a symlink) exits 1 'in use'; "
    "the first runs on",
    "sigterm_deadline": "SIGTERM stops the service, exit 0, within the deadline",
}
"""Every invariant, in the order of the table."""

_PRINTED: Final = 5
"""Violations of one invariant printed as they happen (all are counted)."""


@dataclass(slots=True)
class Invariant:
    """One invariant's record."""

    name: str
    checks: int = 0
    violations: int = 0
    first: str = ""
    first_at: float = 0.0

    @property
    def held(self) -> int:
        """Checks that held."""
        return self.checks - self.violations


@dataclass
class Ledger:
    """Every invariant's record and every fault injected.

    Args:
        out: where violations are printed as they happen.
    """

    out: TextIO = sys.stderr
    started: float = field(default_factory=time.monotonic)
    invariants: dict[str, Invariant] = field(
        default_factory=lambda: {name: Invariant(name) for name in DESCRIPTIONS}
    )
    faults: dict[str, int] = field(default_factory=dict)
    fault_notes: dict[str, list[str]] = field(default_factory=dict)

    def elapsed(self) -> float:
        """Seconds since the ledger was made (the run's clock for messages)."""
        return time.monotonic() - self.started

    def check(self, name: str, ok: bool, example: str | Callable[[], str] = "") -> bool:
        """Count one check of ``name``; on a violation keep (and print) the example."""
        inv = self.invariants[name]
        inv.checks += 1
        if ok:
            return True
        inv.violations += 1
        text = example() if callable(example) else example
        if inv.violations == 1:
            inv.first = text
            inv.first_at = self.elapsed()
        if inv.violations <= _PRINTED:
            self.say(f"VIOLATION {name}: {text}")
        return False

    def held(self, name: str, count: int = 1) -> None:
        """Count ``count`` checks of ``name`` that held (cheap, for per-event invariants)."""
        self.invariants[name].checks += count

    def fault(self, kind: str, note: str = "") -> None:
        """Count one injected fault of ``kind`` (with an optional note for the table)."""
        self.faults[kind] = self.faults.get(kind, 0) + 1
        if note:
            self.fault_notes.setdefault(kind, []).append(note)
        self.say(f"fault {kind}{': ' + note if note else ''}")

    def say(self, text: str) -> None:
        """One progress line, stamped with the run's clock."""
        print(f"[{self.elapsed():7.1f}s] {text}", file=self.out, flush=True)

    @property
    def violated(self) -> bool:
        """True when any invariant was violated."""
        return any(inv.violations for inv in self.invariants.values())
