"""layerwatch: live change lists of union filesystems, published as events.

The public API; everything else in the package is implementation. ``awatch`` and ``Batch``
(the embedding API, ``docs/embedding.md``) are imported on first use: they bring the live layer
and its dependencies, which ``import watcher`` alone does not load. ``watcher.__version__`` is
the installed distribution's version (``"0+unknown"`` when run from a tree never installed),
looked up on first use.
"""

from typing import TYPE_CHECKING

from watcher.core.errors import (
    ConfigError,
    LayerError,
    LayerwatchError,
    LookupFailed,
    MountError,
    PathError,
    SinkRejected,
    SinkUnavailable,
    SpoolError,
    WatchError,
    WatchLimitError,
)
from watcher.core.layers import LowerStack, Whiteouts
from watcher.core.model import Change, Kind, Op, Transition
from watcher.core.rules import compute

if TYPE_CHECKING:
    from watcher.live.feed import Batch, awatch

__all__ = [
    "Batch",
    "Change",
    "ConfigError",
    "Kind",
    "LayerError",
    "LayerwatchError",
    "LookupFailed",
    "LowerStack",
    "MountError",
    "Op",
    "PathError",
    "SinkRejected",
    "SinkUnavailable",
    "SpoolError",
    "Transition",
    "WatchError",
    "WatchLimitError",
    "Whiteouts",
    "__version__",
    "awatch",
    "compute",
]

_LAZY = frozenset({"Batch", "awatch"})


def __getattr__(name: str) -> object:
    """The embedding API and ``__version__``, on first use (PEP 562)."""
    if name in _LAZY:
        from watcher.live import feed

        return getattr(feed, name)
    if name == "__version__":
        from watcher.core.version import installed_version

        return installed_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
