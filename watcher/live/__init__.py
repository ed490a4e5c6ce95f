"""Keeping the change list in step: the event sources (inotify, fanotify), the per-mount tracker,
the hub, discovery.

Imports only ``watcher.core``.
"""
