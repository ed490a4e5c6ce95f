"""The sink contract: what a destination for events must provide.

A sink is built by a factory registered in the entry-point group ``layerwatch.sinks``; the
entry point's name is the ``type`` in the config. The runner in ``watcher.delivery.runner`` owns
batching, retries with backoff, dead-lettering and isolation, so a sink stays small: open,
send one batch, say whether it is healthy, close.

Example (type-checked by mypy)::

    class PrintSink:
        def __init__(self, name: str, options: Mapping[str, object]) -> None:
            self.name = name

        async def open(self) -> None:
            pass

        async def send(self, batch: Sequence[Record]) -> None:
            for record in batch:
                print(record.body.decode())

        def health(self) -> Health:
            return Health(ok=True)

        async def close(self) -> None:
            pass
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from watcher.delivery.events import Record

__all__ = ["Health", "Record", "Sink", "SinkFactory"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """A sink's own view of its destination.

    Attributes:
        ok: True when the last operation succeeded (or none was tried yet).
        detail: a short reason when not ok, for ``/healthz`` and logs.
    """

    ok: bool
    detail: str = ""


@runtime_checkable
class Sink(Protocol):
    """One destination for events."""

    name: str
    """The sink's name from the config, used in logs, metrics and cursors."""

    async def open(self) -> None:
        """Connect to the destination. Raise ``SinkUnavailable`` to be retried later."""

    async def send(self, batch: Sequence[Record]) -> None:
        """Deliver ``batch`` (ordered by ``seq``) and return only once the destination accepted it.

        Raise ``SinkUnavailable`` for a failure worth retrying (the same batch, with the same
        event ids, is sent again), ``SinkRejected`` when the destination refused it for good
        (the runner dead-letters the batch, or only the records named in its ``seqs``, and
        moves on). A sink may receive a batch it has
        already delivered (at-least-once); event ids let the destination or consumer dedupe.
        """

    def health(self) -> Health:
        """Report the sink's health without doing I/O."""

    async def close(self) -> None:
        """Release resources; the runner cancels this after its deadline."""


class SinkFactory(Protocol):
    """What an entry point in ``layerwatch.sinks`` must load to.

    Called with the sink's name and its options table from the config (``type`` removed).
    Raise ``ConfigError`` naming the option for a missing or bad option.
    """

    def __call__(self, name: str, options: Mapping[str, object]) -> Sink: ...
