"""Keeping the change list in step: inotify, the per-mount tracker, the hub, discovery.

Imports only ``watcher.core``.
"""
