"""The consumer: replays one sink's output the way docs/events.md says a consumer must.

Each sink's events, in the order the sink delivered them, go through a ``Consumer``:

- **ids**: one ``Ids`` registry for all sinks maps every event id to a hash of its body; the
  same id with another body is a violation of ``ids_unique``. Ids are opaque strings (their
  format carries the spool's identity, and may change again); ordering uses ``sequence``.
- **order and holes**: a sink delivers in ``seq`` order, re-sending (at least once) only what
  it delivered before. An event behind the consumer's position whose id this output showed
  recently (or, while no spool change is expected, any known id with the same body) is such a
  re-send, dropped. A seq past the next expected one leaves a hole, which is
  fine only if a ``gap`` event of the same spool covers it (``seq_no_holes``, settled by
  ``settle_holes`` at each checkpoint). After the harness deleted the spool, one step
  backwards with a new event starts the new spool's sequence (an *epoch*; the harness grants
  one per deletion whose new sequence restarted).
- **state**: ``snapshot.begin`` .. ``snapshot.end`` replaces a mount's list (collected aside,
  swapped in at the end); a change sets or removes its path. Outside a snapshot, every change's
  ``prev_kind`` must be what the consumer holds (``prev_kind_chain``), except for mounts whose
  state is unknown after a hole (until their next snapshot).
"""

from __future__ import annotations

import base64
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import orjson

from soakkit.invariants import Ledger

__all__ = ["Consumer", "Ids", "describe"]

CHANGE: Final = "io.layerwatch.change"
SNAPSHOT_BEGIN: Final = "io.layerwatch.snapshot.begin"
SNAPSHOT_END: Final = "io.layerwatch.snapshot.end"
GAP: Final = "io.layerwatch.gap"
RECENT: Final = 50_000
"""Ids each consumer remembers as its own: a re-send repeats at most the batches a sink
delivered but did not get acknowledged (a few times ``batch_size``)."""


def describe(event: dict[str, Any]) -> str:
    """A short description of an event for a violation's example."""
    data = event.get("data") or {}
    what = event.get("type", "?").removeprefix("io.layerwatch.")
    path = data.get("path") or data.get("path_b64") or ""
    extra = ""
    if what == "change":
        extra = f" {data.get('op')} {data.get('prev_kind')}->{data.get('kind')} {path}"
    mount = data.get("mount") or "-"
    return f"{what} of {mount} id={event.get('id')} seq={int(event.get('sequence', 0))}{extra}"


@dataclass
class Ids:
    """Every event id seen in any sink's output, with a hash of its body and the sink that
    showed it first, packed in one int (the low 4 bits name the sink: one dict entry per id
    keeps a long run's memory in check)."""

    bodies: dict[str, int] = field(default_factory=dict)
    sinks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bodies)

    def see(self, event_id: str, body: bytes, sink: str) -> tuple[bool, bool, str]:
        """Record ``event_id`` with ``body`` as shown by ``sink``: whether it was known, whether
        with the same body, and the sink that showed it first."""
        if sink not in self.sinks:
            self.sinks.append(sink)
        digest = hash(body) & ~0xF
        known = self.bodies.get(event_id)
        if known is None:
            self.bodies[event_id] = digest | (self.sinks.index(sink) & 0xF)
            return False, True, sink
        first = self.sinks[known & 0xF] if (known & 0xF) < len(self.sinks) else "?"
        return True, (known & ~0xF) == digest, first


@dataclass
class Consumer:
    """One sink's replayed output.

    Args:
        sink: the sink's name in the config.
        ids: the registry shared by every sink.
        ledger: where checks are counted.
        mounts: the configured mounts (a hole makes each of them unknown until a snapshot).
    """

    sink: str
    ids: Ids
    ledger: Ledger
    mounts: tuple[str, ...]
    state: dict[str, dict[bytes, str]] = field(default_factory=dict)
    snapshots: dict[str, dict[bytes, str]] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)
    epoch: int = 0
    allowances: int = 0
    next_seq: int | None = None
    head: int = 0
    holes: list[tuple[int, int, int]] = field(default_factory=list)
    gaps: list[tuple[int, int, int]] = field(default_factory=list)
    events: int = 0
    duplicates: int = 0
    last_event: float = field(default_factory=time.monotonic)
    trace: BinaryIO | None = None
    _recent: set[str] = field(default_factory=set)
    _order: deque[str] = field(default_factory=deque)

    def feed(self, body: bytes) -> None:
        """Take one event (its JSON body, as the sink delivered it)."""
        self.events += 1
        self.last_event = time.monotonic()
        if self.trace is not None:
            self.trace.write(body[:160] + b"\n")
        try:
            event = orjson.loads(body)
            seq = int(event["sequence"])
            event_id = str(event["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.ledger.check(
                "ids_unique", False, f"{self.sink}: unparsable event ({exc}): {body[:200]!r}"
            )
            return
        known, same, first = self.ids.see(event_id, body, self.sink)
        if known and not same:
            self.ledger.check(
                "ids_unique",
                False,
                lambda: (
                    f"id {event_id} names two events: {describe(event)} in {self.sink}, "
                    f"another body first seen in {first}"
                ),
            )
        else:
            self.ledger.held("ids_unique")
        recent = event_id in self._recent
        if not recent:
            self._recent.add(event_id)
            self._order.append(event_id)
            if len(self._order) > RECENT:
                self._recent.discard(self._order.popleft())
        if self.next_seq is not None and seq < self.next_seq:
            if same and (recent or (known and not self.allowances)):
                self.duplicates += 1  # a re-send of what this sink delivered before
                return
            if self.allowances > 0:  # the first event of a new spool (the harness deleted it)
                self.allowances -= 1
                self.epoch += 1
                self.ledger.say(
                    f"{self.sink}: spool epoch {self.epoch} starts at {describe(event)} "
                    f"(after seq {self.head})"
                )
                self.next_seq, self.head = None, 0
                self.snapshots.clear()
            else:
                self.ledger.check(
                    "seq_no_holes",
                    False,
                    lambda: (
                        f"{self.sink}: seq went back from {self.head} to a new event: "
                        f"{describe(event)}"
                    ),
                )
        if self.next_seq is not None and seq > self.next_seq:
            self.holes.append((self.epoch, self.next_seq, seq - 1))
            self.stale.update(self.mounts)  # which mounts missed events is not known
        if self.next_seq is None or seq >= self.next_seq:
            self.next_seq = seq + 1
            self.head = max(self.head, seq)
        self._apply(event, seq)

    def _apply(self, event: dict[str, Any], seq: int) -> None:
        kind_of = event["type"]
        data = event.get("data") or {}
        mount = data.get("mount", "")
        if kind_of == CHANGE:
            path = data["path"].encode() if "path" in data else base64.b64decode(data["path_b64"])
            kind = data.get("kind")
            target = self.snapshots.get(mount)
            if target is None:
                target = self.state.setdefault(mount, {})
                if mount not in self.stale:
                    held = target.get(path)
                    if held == data.get("prev_kind"):
                        self.ledger.held("prev_kind_chain")
                    else:
                        self.ledger.check(
                            "prev_kind_chain",
                            False,
                            lambda: (
                                f"{self.sink}: held {held} for the path, event says "
                                f"{describe(event)}"
                            ),
                        )
                        self.stale.add(mount)  # one report per break, not one per event after
            if kind is None:
                target.pop(path, None)
            else:
                target[path] = kind
        elif kind_of == SNAPSHOT_BEGIN:
            self.snapshots[mount] = {}
        elif kind_of == SNAPSHOT_END:
            taken = self.snapshots.pop(mount, None)
            if taken is not None:
                count = data.get("count")
                if count is not None and count != len(taken):
                    self.ledger.check(
                        "prev_kind_chain",
                        False,
                        f"{self.sink}: snapshot.end of {mount} says count={count}, "
                        f"the snapshot held {len(taken)} entries (seq {seq})",
                    )
                self.state[mount] = taken
                self.stale.discard(mount)
        elif kind_of == GAP:
            self.gaps.append((self.epoch, int(data["first_seq"]), int(data["last_seq"])))

    def caught_up(self, seq: int, epoch: int) -> bool:
        """Whether this output reached ``seq`` of spool ``epoch`` outside any snapshot."""
        return self.epoch == epoch and self.head >= seq and not self.snapshots

    def settle_holes(self) -> None:
        """Count one ``seq_no_holes`` check; each hole no gap event covers is a violation."""
        open_holes = [hole for hole in self.holes if not self._covered(*hole)]
        self.holes = []
        if not open_holes:
            self.ledger.held("seq_no_holes")
            return
        epoch, first, last = open_holes[0]
        self.ledger.check(
            "seq_no_holes",
            False,
            f"{self.sink}: seq {first}..{last} (spool epoch {epoch}) never arrived and no gap "
            f"event announced it ({len(open_holes)} hole(s))",
        )

    def _covered(self, epoch: int, first: int, last: int) -> bool:
        for gap_epoch, gap_first, gap_last in sorted(self.gaps):
            if gap_epoch == epoch and gap_first <= first <= gap_last:
                first = gap_last + 1
                if first > last:
                    return True
        return False

    def list_of(self, mount: str) -> dict[bytes, str] | None:
        """The mount's replayed list; None while it is unknown (after a hole, until the next
        snapshot)."""
        if mount in self.stale:
            return None
        return self.state.get(mount, {})
