"""layerwatch: live change lists of union filesystems, published as events.

The public API; everything else in the package is implementation. ``watcher.__version__`` is
the installed distribution's version (``"0+unknown"`` when run from a tree never installed),
looked up on first use.
"""

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

__all__ = [
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
    "compute",
]


def __getattr__(name: str) -> str:
    """``__version__``, read from the distribution's metadata when first asked for."""
    if name == "__version__":
        from watcher.core.version import installed_version

        return installed_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
