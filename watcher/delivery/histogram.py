"""A cumulative histogram of durations in seconds, kept where they are measured.

The intake observes how long published records waited to be durable; each sink runner how long
its sink's ``send`` took. ``GET /metrics`` writes them as Prometheus histograms
(``_bucket{le=...}``, ``_sum``, ``_count``).

Example:
    >>> h = Histogram((0.01, 0.1, 1.0))
    >>> h.observe(0.05)
    >>> h.observe(0.5, count=2)
    >>> h.cumulative()
    [(0.01, 0), (0.1, 1), (1.0, 3), (inf, 3)]
    >>> h.count, round(h.sum, 3)
    (3, 1.05)
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Final

__all__ = ["LATENCY_BUCKETS", "Histogram"]

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Upper bounds in seconds: from half a millisecond (a group commit) to 30 s (a slow sink)."""


class Histogram:
    """Counts of observations per bucket, their sum and count; never decreases.

    Args:
        bounds: the buckets' upper bounds, ascending, finite (``+Inf`` is implied).

    Raises:
        ValueError: ``bounds`` is empty, not ascending, or not finite.
    """

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if not bounds or any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"bucket bounds must be ascending and not empty, got {bounds!r}")
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError("bucket bounds must be finite (+Inf is implied)")
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)
        self.count = 0
        """Observations so far."""
        self.sum = 0.0
        """Their total, in seconds."""

    def observe(self, seconds: float, count: int = 1) -> None:
        """Record ``count`` observations of ``seconds`` (a negative duration counts as 0)."""
        seconds = max(0.0, seconds)
        self._counts[bisect.bisect_left(self._bounds, seconds)] += count
        self.count += count
        self.sum += seconds * count

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, the last one ``+Inf``."""
        out = []
        total = 0
        for bound, n in zip((*self._bounds, math.inf), self._counts, strict=True):
            total += n
            out.append((bound, total))
        return out
