"""layerwatch: live change lists of union filesystems, published as events.

The public API; everything else in the package is implementation.
"""

from watcher.core.errors import (
    ConfigError,
    LayerError,
    LayerwatchError,
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

__all__ = [
    "Change",
    "ConfigError",
    "Kind",
    "LayerError",
    "LayerwatchError",
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
    "compute",
]
