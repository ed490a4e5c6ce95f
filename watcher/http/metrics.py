"""Prometheus text exposition (format 0.0.4): a tiny writer, no client library.

The service keeps its counters where they are counted (the publisher, the hub, the sink
runners, the intake); ``GET /metrics`` reads them at scrape time and writes them with an
:class:`Exposition`. Nothing here keeps state between scrapes. ``docs/operations.md`` lists
every metric.

Example:
    >>> text = Exposition()
    >>> text.family("sink_up", "gauge", "1 when the sink is healthy.")
    >>> text.sample("sink_up", 1, sink='my "sink"')
    >>> print(text.render().decode(), end="")
    # HELP layerwatch_sink_up 1 when the sink is healthy.
    # TYPE layerwatch_sink_up gauge
    layerwatch_sink_up{sink="my \\"sink\\""} 1
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Final, Literal

from watcher.delivery.histogram import Histogram

__all__ = ["CONTENT_TYPE", "Exposition", "MetricKind", "escape_label", "version"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4"
"""The ``Content-Type`` of the text format."""

MetricKind = Literal["counter", "gauge", "histogram"]
"""A family's ``TYPE``."""


class Exposition:
    """One scrape's text: metric families and their samples, in the order they are added.

    Every name is prefixed with ``{namespace}_``. Write a family's ``HELP`` and ``TYPE``
    once with :meth:`family`, then its samples with :meth:`sample`.
    """

    def __init__(self, namespace: str = "layerwatch") -> None:
        self._prefix = f"{namespace}_"
        self._lines: list[str] = []

    def family(self, name: str, kind: MetricKind, help_: str) -> None:
        """Declare the family ``name``: its ``# HELP`` and ``# TYPE`` lines."""
        text = help_.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {self._prefix}{name} {text}")
        self._lines.append(f"# TYPE {self._prefix}{name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        """One sample of ``name``; label values are escaped, label names are trusted."""
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            self._lines.append(f"{self._prefix}{name}{{{inner}}} {value}")
        else:
            self._lines.append(f"{self._prefix}{name} {value}")

    def histogram(self, name: str, histogram: Histogram, **labels: str) -> None:
        """The samples of one histogram of the family ``name``: a ``_bucket`` per bound
        (cumulative, ``le="+Inf"`` last), ``_sum`` and ``_count``."""
        for bound, count in histogram.cumulative():
            le = "+Inf" if math.isinf(bound) else repr(bound)
            self.sample(f"{name}_bucket", count, **labels, le=le)
        self.sample(f"{name}_sum", histogram.sum, **labels)
        self.sample(f"{name}_count", histogram.count, **labels)

    def render(self) -> bytes:
        """The exposition as UTF-8, one line per entry and a final newline."""
        return ("\n".join(self._lines) + "\n").encode()


def escape_label(value: str) -> str:
    r"""``value`` escaped for a label: backslash, double quote and newline (``\n``)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def version() -> str:
    """The installed distribution's version (``unknown`` when it is not installed)."""
    try:
        return importlib.metadata.version("layerwatch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
