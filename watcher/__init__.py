"""layerwatch: live change lists of union filesystems, published as events.

The public API; everything else in the package is implementation.
"""

from watcher.changes import Change, Kind, Op, Transition, compute
from watcher.errors import (
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
from watcher.layers import LowerStack, Whiteouts

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
