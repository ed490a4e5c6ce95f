"""The profiles and their schedules: phases of load (a rate each) and the faults placed in
them, deterministic for a seed.

Each phase runs the load generator at its rate for its seconds; faults start at offsets into
their phase (a fault only lands in a phase where it means something: SIGSTOP needs enough load
to overflow the kernel queue, a full spool needs writes to hit it, the watch limit needs new
directories). A checkpoint ends every phase, and one runs every ``check_every`` seconds and
after every fault that stopped, froze or restarted the service.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

__all__ = ["FAULTS", "Fault", "Phase", "Planned", "Profile", "profile"]


@dataclass(frozen=True)
class Fault:
    """A kind of fault.

    Attributes:
        kind: its name in the table.
        what: what it does, for the docs and the table.
        seconds: how long it lasts (0: instant).
        blocking: it stops, freezes or restarts the service, or blocks intake: no checkpoint
            runs meanwhile, and one runs right after it.
        min_rate: the least load (ops/s, 0 = flat out counts as any) it needs; None: any.
            Such a fault keeps the load going while it lasts, even past its phase's end.
        sinks: the sinks it breaks (they are excused from checkpoints while it lasts).
    """

    kind: str
    what: str
    seconds: float = 0.0
    blocking: bool = False
    min_rate: float | None = None
    sinks: tuple[str, ...] = ()

    @property
    def needs_load(self) -> bool:
        """Whether it means something only under load."""
        return self.min_rate is not None


FAULTS: Final = {
    f.kind: f
    for f in (
        Fault("kill9", "kill -9 of the service, then a restart", blocking=True),
        Fault("sigterm_restart", "SIGTERM (timed), then a restart", blocking=True),
        Fault(
            "sigstop",
            "SIGSTOP under load until the inotify queue overflows, then SIGCONT",
            seconds=4.0,
            blocking=True,
            min_rate=5000,
        ),
        Fault(
            "watch_limit",
            "fs.inotify.max_user_watches lowered to what is in use, then restored",
            seconds=5.0,
            min_rate=500,
        ),
        Fault(
            "nats_kill",
            "nats-server SIGKILLed, restarted on its store",
            4.0,
            min_rate=500,
            sinks=("feed",),
        ),
        Fault(
            "redis_kill",
            "redis-server SIGKILLed, restarted on its AOF",
            4.0,
            min_rate=500,
            sinks=("streams",),
        ),
        Fault("webhook_500", "the webhook receiver answers 500", 4.0, min_rate=500, sinks=("web",)),
        Fault(
            "webhook_429",
            "the webhook receiver answers 429 + Retry-After",
            4.0,
            min_rate=500,
            sinks=("web",),
        ),
        Fault(
            "webhook_timeout",
            "the webhook receiver answers too late",
            6.0,
            min_rate=500,
            sinks=("web",),
        ),
        Fault(
            "spool_full",
            "the spool's tmpfs filled with a ballast file, then emptied",
            seconds=4.0,
            blocking=True,
            min_rate=500,
        ),
        Fault(
            "spool_deleted",
            "SIGTERM, the spool's files deleted, a restart",
            blocking=True,
        ),
        Fault(
            "sink_raises",
            "the plugin sink raises RuntimeError from send",
            4.0,
            min_rate=500,
            sinks=("flaky",),
        ),
        Fault(
            "exec_orphan",
            "the exec sink's command leaves a child holding its stdout",
            seconds=4.0,
            min_rate=500,
            sinks=("hook",),
        ),
        Fault("jsonl_dir_removed", "the jsonl sink's directory removed (rm -r)"),
        Fault(
            "spool_twice",
            "a second `layerwatch run` opens the spool through a symlinked directory",
        ),
        Fault(
            "branch_replaced",
            "a mount's upper dir replaced (umount, new empty upper, mount)",
            blocking=True,
        ),
    )
}


@dataclass(frozen=True)
class Phase:
    """A stretch of load: ``rate`` ops/s (0: flat out; None: idle) for ``seconds``."""

    rate: float | None
    seconds: float

    @property
    def label(self) -> str:
        if self.rate is None:
            return "idle"
        return "flat out" if self.rate == 0 else f"{self.rate:,.0f}/s"

    def allows(self, fault: Fault) -> bool:
        """Whether ``fault`` means something under this phase's load."""
        if fault.min_rate is None:
            return True
        return self.rate is not None and (self.rate == 0 or self.rate >= fault.min_rate)


@dataclass(frozen=True)
class Planned:
    """One fault at ``offset`` seconds into phase ``phase``."""

    phase: int
    offset: float
    fault: Fault


@dataclass
class Profile:
    """Everything a run depends on besides the seed's choices."""

    name: str
    big_entries: int
    phases: list[Phase]
    planned: list[Planned] = field(default_factory=list)
    check_every: float = 15.0
    catch_up: float = 60.0
    ready_timeout: float = 60.0
    spool_size: str = "512m"
    spool_max_bytes: str = "256MiB"
    rss_limit_mib: int = 1024
    budget: float | None = None
    """Wall-time budget of the schedule (s): faults and phases past it are skipped."""


_RATES: Final[tuple[float | None, ...]] = (None, 500, 2000, 5000, 20000, 0)


def profile(name: str, seed: int, minutes: float = 30.0) -> Profile:
    """The ``short`` or ``long`` profile with its faults placed for ``seed``."""
    rng = random.Random(seed)
    if name == "short":
        seconds = (6, 8, 10, 8, 2, 1)
        prof = Profile(
            name="short",
            big_entries=20_000,
            phases=[Phase(rate, s) for rate, s in zip(_RATES, seconds, strict=True)],
            check_every=25.0,
            catch_up=40.0,
            ready_timeout=60.0,
            spool_size="384m",
            spool_max_bytes="256MiB",
            rss_limit_mib=768,
            budget=125.0,
        )
        kinds = list(FAULTS)
        spacing = 2.0
    else:
        cycle = 330.0
        cycles = max(1, round(minutes * 60 / cycle))
        per = [30.0, 100.0, 100.0, 80.0, 12.0, 8.0]  # one cycle: 5.5 minutes of load
        scale = minutes * 60 / (cycles * sum(per))
        prof = Profile(
            name="long",
            big_entries=120_000,
            phases=[
                Phase(rate, round(s * scale, 1))
                for _ in range(cycles)
                for rate, s in zip(_RATES, per, strict=True)
            ],
            check_every=30.0,
            catch_up=300.0,
            ready_timeout=180.0,
            spool_size="1g",
            spool_max_bytes="640MiB",
            rss_limit_mib=1536,
        )
        kinds = []
        spacing = 20.0
        total = sum(p.seconds for p in prof.phases)
        while len(kinds) * spacing < total * 0.8:
            batch = list(FAULTS)
            rng.shuffle(batch)
            kinds += batch
    prof.planned = _place(prof.phases, kinds, spacing, rng)
    return prof


def _place(
    phases: list[Phase], kinds: list[str], spacing: float, rng: random.Random
) -> list[Planned]:
    """Put each fault in a free slot of a phase that allows it (slots ``spacing`` apart)."""
    slots = [
        (index, offset)
        for index, phase in enumerate(phases)
        for offset in _offsets(phase.seconds, spacing)
    ]
    order = list(kinds)
    rng.shuffle(order)
    # the pickiest faults first, so a phase they need is still free
    order.sort(key=lambda kind: sum(p.allows(FAULTS[kind]) for p in phases))
    planned = []
    for kind in order:
        fault = FAULTS[kind]
        free = [slot for slot in slots if phases[slot[0]].allows(fault)]
        if not free:
            continue
        slot = rng.choice(free)
        slots.remove(slot)
        planned.append(Planned(slot[0], slot[1], fault))
    planned.sort(key=lambda p: (p.phase, p.offset))
    return planned


def _offsets(seconds: float, spacing: float) -> list[float]:
    out, at = [], 1.0
    while at < seconds:
        out.append(at)
        at += spacing
    return out
