"""What the HTTP layer needs from a running service: a small Protocol, nothing more.

The API and its streams read a service through these Protocols only, never through the
service's internals; ``watcher.service.Service`` implements them, and a test can hand the API
anything else that does. Every member answers for the running service: nothing is ever None.

Example (type-checked with the package)::

    async def head(view: ServiceView) -> dict[str, int]:
        await view.sync()
        return {name: len(mount.kinds) for name, mount in view.mounts.items()}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from watcher.core.model import Change, Control, Item, Kind, Transition
from watcher.core.mounts import Filesystem
from watcher.delivery.events import Record
from watcher.delivery.histogram import Histogram
from watcher.delivery.sinks import Health
from watcher.delivery.spool import Since, SpoolStats

__all__ = ["EventLog", "MountView", "ServiceView", "SinkView"]


class MountView(Protocol):
    """One followed mount."""

    @property
    def name(self) -> str:
        """The mount's name (in events, URLs and metrics)."""

    @property
    def managed(self) -> bool:
        """Whether the service mounted it (and so may reset it)."""

    @property
    def fs(self) -> Filesystem:
        """Its union: layers, writable branch, mountpoint (for reads and exports)."""

    @property
    def kinds(self) -> Mapping[bytes, Kind]:
        """The live change list: path to kind."""

    @property
    def watch_count(self) -> int:
        """inotify watches held for it."""

    @property
    def attribution(self) -> bool:
        """Whether its change events name their writer (``data.process``)."""

    @property
    def degraded(self) -> str | None:
        """Why it is not followed by inotify alone (None: it is)."""

    @property
    def errors(self) -> Sequence[str]:
        """Errors met while following it."""

    def changes(self) -> list[Change]:
        """The change list, sorted by path."""

    def resync_items(self, reason: str) -> list[Item]:
        """A resync and a snapshot of the list as it is now (no rescan)."""


class EventLog(Protocol):
    """The durable log as streams read it (``watcher.delivery.spool.Spool``)."""

    @property
    def epoch(self) -> int:
        """The log's identity (its creation time in ms)."""

    @property
    def first_seq(self) -> int:
        """The oldest sequence number held."""

    @property
    def last_seq(self) -> int:
        """The newest sequence number held."""

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records after ``after``, in order (blocking: call from a thread)."""

    async def wait(self, after: int) -> None:
        """Return once ``last_seq > after``."""

    def stats(self) -> SpoolStats:
        """Counts and sizes, for metrics (blocking: a short query)."""

    def changes_since(self, mount: str, since: int) -> Since:
        """The paths of ``mount`` changed after ``since`` and what they are now (blocking: one
        indexed query).

        Raises:
            PositionLost: ``since`` is older than the log keeps, or ahead of it.
        """


class SinkView(Protocol):
    """One sink's delivery, as metrics show it (``watcher.delivery.runner.SinkRunner``)."""

    @property
    def lag(self) -> int:
        """Events held that the sink has not acknowledged."""

    @property
    def delivered(self) -> int:
        """Events the sink accepted."""

    @property
    def retries(self) -> int:
        """Failed attempts that were retried."""

    @property
    def dead_lettered(self) -> int:
        """Events the sink rejected (written to its dead-letter file)."""

    @property
    def filtered(self) -> int:
        """Events its filter dropped."""

    @property
    def send_seconds(self) -> Histogram:
        """How long each of the sink's sends took, failed ones included."""

    def health(self) -> Health:
        """Whether it delivers now, and why not."""


class ServiceView(Protocol):
    """A running service."""

    @property
    def mounts(self) -> Mapping[str, MountView]:
        """The mounts followed now, by name."""

    @property
    def sinks(self) -> Mapping[str, SinkView]:
        """The sinks, by name."""

    @property
    def spool(self) -> EventLog:
        """The durable log every event is in before any sink or stream sees it."""

    @property
    def stream(self) -> str:
        """The stream name (the first part of event ids)."""

    @property
    def head_seq(self) -> int:
        """The sequence number of the newest event published."""

    @property
    def published(self) -> int:
        """Events published since the start."""

    @property
    def resyncs(self) -> Mapping[tuple[str, str], int]:
        """Resyncs published since the start, by (mount, reason); a mount that left keeps
        its entries (they are counters)."""

    @property
    def durable_seconds(self) -> Histogram:
        """Per event: from published to committed in the spool."""

    @property
    def restarts(self) -> Mapping[str, int]:
        """Unexpected failures of each component, each followed by a restart."""

    @property
    def starting(self) -> int:
        """Configured mounts whose first scan still runs."""

    def is_starting(self, name: str) -> bool:
        """True while the configured mount ``name`` has its first scan running."""

    @property
    def source(self) -> Mapping[str, object]:
        """The event source in use and why (``source``, ``requested``, ``attribution``,
        ``reason``); empty before the service runs."""

    @property
    def watches(self) -> int:
        """inotify watches held for every mount."""

    @property
    def events_read(self) -> int:
        """inotify events read since the start."""

    @property
    def overflows(self) -> int:
        """inotify queue overflows since the start."""

    @property
    def events_filtered(self) -> int:
        """Events fanotify's filesystem marks delivered for directories no mount follows."""

    def degraded(self) -> list[str]:
        """Why the service is not fully healthy (empty when it is)."""

    def encode(self, seq: int, mount: str, item: Transition | Control) -> Record:
        """Encode ``item`` as the event of ``mount`` at ``seq`` (for synthesized snapshots)."""

    async def sync(self) -> None:
        """Return once every change made before the call is published and durable."""

    async def reset(self, mount: str) -> None:
        """Empty a managed mount's writable branch, then resync it (reason ``reset``).

        Raises:
            MountError: the mount is attached, not managed, or cannot be reset.
        """
