"""Logging: structlog, JSON lines on stderr (stdout belongs to the events)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = ["configure"]

Redact = Callable[[str], str]


def configure(*, level: str = "info", json: bool = True, redact: Redact | None = None) -> None:
    """Send structured logs to stderr, as JSON lines (or a console rendering for people).

    Args:
        level: the lowest level logged (``debug``, ``info``, ``warning``, ``error``).
        json: JSON lines when True; key=value console lines otherwise.
        redact: applied to every value of every entry (tracebacks included) before it is
            written: the config's ``Secrets.redact``, so no secret reaches the log.
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
            *([_Redactor(redact)] if redact is not None else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Redactor:
    """A structlog processor: every value passed through ``redact`` (others by their repr,
    replaced by the redacted text only when it held a secret)."""

    def __init__(self, redact: Redact) -> None:
        self._redact = redact

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self._redact(value)
            elif value is not None and not isinstance(value, int | float):
                text = repr(value)
                redacted = self._redact(text)
                if redacted != text:
                    event[key] = redacted
        return event
