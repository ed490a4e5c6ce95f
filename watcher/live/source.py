"""Where the hub's hints come from: the ``Source`` contract and the choice between the two.

Both kernel interfaces are read the same way: the hub adds a watch per directory a tracker
follows, reads batches of :class:`~watcher.live.inotify.RawEvent` (wd, ``IN_*`` mask, name)
and removes watches. ``Inotify`` is the original; ``Fanotify`` reports the same events through
a filesystem mark (no per-directory limit) and can name the writer (attribution).

``open_source`` picks one: ``auto`` takes fanotify where the kernel permits it (CAP_SYS_ADMIN,
directory handles, pidfds for attribution) and falls back to inotify otherwise, saying why.
Without CAP_SYS_ADMIN the kernel would still give an unprivileged fanotify group, but with
inode marks only (one per directory, like inotify's watches): ``auto`` takes inotify then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from watcher.core.errors import ConfigError, WatchError
from watcher.live.fanotify import Fanotify
from watcher.live.inotify import DIR_MASK, Inotify, RawEvent

__all__ = ["AUTO", "FANOTIFY", "INOTIFY", "SOURCES", "Choice", "Source", "open_source"]

AUTO: Final = "auto"
INOTIFY: Final = "inotify"
FANOTIFY: Final = "fanotify"
SOURCES: Final = (AUTO, INOTIFY, FANOTIFY)


class Source(Protocol):
    """A kernel event source the hub reads (``Inotify`` and ``Fanotify`` implement it).

    Example:
        >>> def first(source: Source, path: bytes) -> int:
        ...     return source.add_watch(path)
    """

    def add_watch(self, path: bytes, mask: int = DIR_MASK) -> int:
        """Report the events in ``mask`` (``IN_*``) for the directory ``path``; returns its wd.

        Raises:
            WatchLimitError: the source's limit is reached (the tracker degrades to rescans).
            WatchError: the directory is gone or cannot be watched.
        """
        ...

    def rm_watch(self, wd: int) -> None:
        """Stop reporting ``wd`` (an unknown wd is fine)."""
        ...

    async def read(self) -> list[RawEvent]:
        """Wait for events and return the next batch, in kernel order (overflow: wd -1)."""
        ...

    def close(self) -> None:
        """Release the kernel object (idempotent)."""
        ...


@dataclass(frozen=True, slots=True)
class Choice:
    """The source chosen, and why (for ``layerwatch check`` and ``/healthz``).

    Attributes:
        source: The instance (the caller owns it: close it).
        name: ``inotify`` or ``fanotify``.
        requested: What the configuration asked for (``auto``, ``inotify``, ``fanotify``).
        attribution: Whether events can name their writer (fanotify with pidfds).
        reason: Why this one, when not simply the one asked for (fanotify refused, say).
    """

    source: Source
    name: str
    requested: str
    attribution: bool
    reason: str = ""

    def status(self) -> dict[str, object]:
        """The JSON shape of the choice for ``/healthz`` and ``check``."""
        return {
            "source": self.name,
            "requested": self.requested,
            "attribution": self.attribution,
            "reason": self.reason or None,
        }


_CAP_SYS_ADMIN: Final = 21


def _has_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN in its effective set (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def open_source(requested: str = AUTO, *, attribution: bool = False) -> Choice:
    """Open the source ``requested`` (``auto``: fanotify if permitted, else inotify).

    Args:
        requested: ``auto``, ``inotify`` or ``fanotify``.
        attribution: Events must name their writer (needs fanotify).

    Raises:
        ConfigError: ``requested`` is unknown, or ``inotify`` was asked for with attribution.
        WatchError: The source asked for explicitly cannot be opened (the message says why).
    """
    if requested not in SOURCES:
        raise ConfigError("source", f"must be one of {', '.join(SOURCES)}, not {requested!r}")
    if requested == INOTIFY:
        if attribution:
            raise ConfigError("attribution", 'needs source = "fanotify" or "auto", not "inotify"')
        return Choice(Inotify(), INOTIFY, requested, False)
    try:
        if requested == AUTO and not _has_sys_admin():
            raise WatchError("no CAP_SYS_ADMIN, which fanotify's filesystem marks need")
        fan = Fanotify(attribution=attribution)
    except WatchError as exc:
        if requested == FANOTIFY:
            raise
        reason = f"fanotify refused, inotify used: {exc}"
        if attribution:
            reason += "; attribution is off"
        return Choice(Inotify(), INOTIFY, requested, False, reason)
    return Choice(fan, FANOTIFY, requested, attribution)
