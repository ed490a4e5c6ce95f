"""The version of the installed distribution, read from its metadata."""

from __future__ import annotations

__all__ = ["UNKNOWN", "installed_version"]

UNKNOWN = "0+unknown"
"""What ``installed_version`` answers when the package runs from a source tree that was never
installed (no distribution metadata to read)."""


def installed_version() -> str:
    """The ``layerwatch`` distribution's version (``importlib.metadata``), or ``UNKNOWN``.

    ``importlib.metadata`` is imported here, not at start-up: it costs about 10 ms, which
    every command but ``--version`` would pay for nothing.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerwatch")
    except PackageNotFoundError:
        return UNKNOWN
