"""Stopping on a signal, the same way for ``layerwatch run`` and ``layerwatch watch``.

SIGINT or SIGTERM sets the stop event: the caller then drains under its deadline. A second
signal while stopping exits at once (status 128 + the signal), for an operator who will not
wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import structlog

__all__ = ["install_stop_signals"]

logger = structlog.get_logger("layerwatch.signals")


def install_stop_signals(stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop``; a second signal exits at once. Returns an undo function."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second_signal_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    def undo() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

    return undo
