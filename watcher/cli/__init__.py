"""The ``layerwatch`` command: the composition root."""

from watcher.cli.main import main

__all__ = ["main"]
