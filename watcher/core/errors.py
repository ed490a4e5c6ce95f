"""The error tree, grouped by what a caller can do about each error.

- ``LayerwatchError`` is the root: the CLI turns any of these into a one-line message and a
  non-zero exit; nothing below the CLI exits the process.
- ``ConfigError``, ``LayerError``: bad input; fix the input and try again.
- ``LookupFailed``: a name given on the command line (a container, an image, a layer) names
  nothing, or more than one thing; the message names the candidates. Fix the name.
- ``MountError``: the kernel refused a mount operation (busy, not mounted, already mounted).
- ``WatchError`` / ``WatchLimitError``: inotify could not watch something; the tracker
  degrades to periodic rescans.
- ``SinkUnavailable`` (retry later) and ``SinkRejected`` (never retry: dead-letter) are what
  a sink raises from ``send``.
- ``SpoolError``: the durable log cannot take more events (disk full, I/O error); intake stops.
"""

from __future__ import annotations


class LayerwatchError(Exception):
    """Root of every error layerwatch raises on purpose."""


class ConfigError(LayerwatchError):
    """A configuration value is missing, unknown or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


class LayerError(LayerwatchError):
    """A layer (lower, upper, work) directory is missing, unusable or badly named."""


class LookupFailed(LayerwatchError):
    """A container, image or layer reference is unknown or ambiguous; the message lists the
    candidates it could have meant. ``ambiguous`` tells the two apart."""

    def __init__(self, message: str, *, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class PathError(LayerwatchError):
    """A path asked for escapes the root, or is not valid for the request."""


class MountError(LayerwatchError):
    """A mount, unmount or attach operation failed."""


class WatchError(LayerwatchError):
    """An inotify operation failed."""


class WatchLimitError(WatchError):
    """``inotify_add_watch`` hit ``fs.inotify.max_user_watches`` (ENOSPC)."""


class SinkError(LayerwatchError):
    """Base of the errors a sink raises from ``send``."""


class SinkUnavailable(SinkError):
    """The destination cannot take the batch now; the runner retries with backoff.

    ``retry_after`` (seconds), when the destination said how long to wait.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkRejected(SinkError):
    """The destination refused the batch for good; the runner dead-letters it.

    ``seqs``: when the sink delivered part of the batch and the destination refused the rest
    (one request per event), the sequence numbers of the refused records; only those are
    dead-lettered. None: the whole batch was refused.
    """

    def __init__(self, message: str, *, seqs: frozenset[int] | None = None) -> None:
        super().__init__(message)
        self.seqs = seqs


class SpoolError(LayerwatchError):
    """The spool cannot durably append or read (disk full, I/O error, corruption)."""
