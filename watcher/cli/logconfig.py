"""Logging: structlog, JSON lines on stderr (stdout belongs to the events)."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure"]


def configure(*, level: str = "info", json: bool = True) -> None:
    """Send structured logs to stderr, as JSON lines (or a console rendering for people).

    Args:
        level: the lowest level logged (``debug``, ``info``, ``warning``, ``error``).
        json: JSON lines when True; key=value console lines otherwise.
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
