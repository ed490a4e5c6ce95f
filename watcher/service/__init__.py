"""The service: its configuration and the running service (``layerwatch run``).

Imports ``watcher.core``, ``watcher.live`` and ``watcher.delivery``.
"""
