"""The final table: faults injected, invariants (checks, held, violated, first example),
rates held per phase, sinks, events checked and the peak RSS."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

from soakkit.invariants import DESCRIPTIONS
from soakkit.schedule import FAULTS

if TYPE_CHECKING:
    from soakkit.harness import Harness

__all__ = ["render"]


def render(h: Harness) -> str:
    """The table as Markdown (readable in a terminal, pasteable into docs)."""
    p = h.profile
    wall = time.monotonic() - h.started
    events = sum(c.events for c in h.consumers.values())
    lines = [
        f"## layerwatch soak: profile {p.name}, seed {h.seed}",
        "",
        f"- wall time {wall:.0f} s; service runs {h.service.runs} "
        f"({h.crashes} restarted after dying on their own)",
        f"- events checked {events:,} over {len(h.consumers)} sinks "
        f"({len(h.ids):,} distinct ids); big mount {p.big_entries:,} entries at start",
        f"- peak RSS of the service {h.service.peak_rss_kib / 1024:.0f} MiB "
        f"(limit {p.rss_limit_mib} MiB); per run: "
        + ", ".join(f"{kib >> 10}" for _, kib in sorted(h.service.rss_by_run.items()))
        + " MiB",
        f"- kafka: {h.kafka_note}",
        "- service ready after (s, per run): "
        + ", ".join(f"{t:.1f}" for t in h.ready_times)
        + f"; harness peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB",
    ]
    if h.aborted:
        lines.append(f"- **aborted**: {h.aborted}")
    if h.skipped:
        lines.append(f"- skipped (time budget): {', '.join(h.skipped)}")
    for error in h.errors:
        lines.append(f"- harness error: {error}")
    lines += ["", "| fault | count | notes |", "| --- | ---: | --- |"]
    for kind in FAULTS:
        notes = h.ledger.fault_notes.get(kind, [])
        shown = "; ".join(notes[:3]) + (f"; ... ({len(notes) - 3} more)" if len(notes) > 3 else "")
        lines.append(f"| {kind} | {h.ledger.faults.get(kind, 0)} | {_cell(shown)} |")
    lines += [
        "",
        "| invariant | checks | held | violated | first violation |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in DESCRIPTIONS:
        inv = h.ledger.invariants[name]
        first = f"at {inv.first_at:.0f}s: {inv.first}" if inv.violations else ""
        lines.append(
            f"| {name} | {inv.checks:,} | {inv.held:,} | {inv.violations:,} | {_cell(first)} |"
        )
    lines += [
        "",
        "| phase | target ops/s | achieved ops/s | ops | load s | checkpoints |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, phase in enumerate(p.phases):
        runs = h.phase_runs.get(index, [])
        ops = sum(run.ops for run in runs)
        active = sum(max(run.seconds - run.paused, 0.0) for run in runs)
        target = "-" if phase.rate is None else ("max" if phase.rate == 0 else f"{phase.rate:,.0f}")
        achieved = f"{ops / active:,.0f}" if active > 0 and phase.rate is not None else "-"
        lines.append(
            f"| {index + 1}. {phase.label} | {target} | {achieved} | {ops:,} | {active:.1f} | "
            f"{h.phase_checks.get(index, 0)} |"
        )
    lines += [
        "",
        "| sink | type | events read | re-sent copies | last seq | spool epoch |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, info in h.sinks.items():
        c = h.consumers[name]
        lines.append(
            f"| {name} | {info.type} | {c.events:,} | {c.duplicates:,} | {c.head:,} | {c.epoch} |"
        )
    verdict = "FAILED" if h.ledger.violated or h.errors or h.aborted else "passed"
    lines += ["", f"**{verdict}**"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")[:400]
