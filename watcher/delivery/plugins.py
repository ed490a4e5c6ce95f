"""Sink discovery through the entry-point group ``layerwatch.sinks``, and sink options.

The ``type`` of a sink in the config is the name of an entry point in the group; the entry point
loads to a ``SinkFactory`` (usually the sink class). Built-in sinks register the same way, so
the core never names a sink.

``Options`` is the reader every sink uses to parse its options table in ``__init__``: each
getter names the key (``sinks.NAME.OPTION``) in the ``ConfigError`` it raises, and ``finish()``
rejects the keys nobody asked for.
"""

from __future__ import annotations

import importlib.metadata
import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import structlog

from watcher.core.errors import ConfigError
from watcher.delivery.sinks import Sink

__all__ = ["GROUP", "MountNames", "Options", "available_sinks", "load_sink"]

GROUP: Final = "layerwatch.sinks"

logger = structlog.get_logger("layerwatch.plugins")

_MISSING: Final = object()


def _entry_points() -> importlib.metadata.EntryPoints:
    return importlib.metadata.entry_points(group=GROUP)


def available_sinks() -> list[str]:
    """The sink types installed in this environment, sorted."""
    return sorted({ep.name for ep in _entry_points()})


def load_sink(name: str, type_: str, options: Mapping[str, object]) -> Sink:
    """Build the sink ``name`` of type ``type_`` from its options table.

    Args:
        name: the sink's name in the config (``[sinks.NAME]``).
        type_: the entry-point name in ``layerwatch.sinks``.
        options: the sink's table without ``type``.

    Returns:
        The sink, not yet opened.

    Raises:
        ConfigError: ``sinks.NAME.type`` for an unknown, ambiguous or broken type, or the
            factory's own error naming a bad option.
    """
    key = f"sinks.{name}.type"
    found = [ep for ep in _entry_points() if ep.name == type_]
    if not found:
        known = ", ".join(available_sinks()) or "none"
        raise ConfigError(key, f"unknown sink type {type_!r} (known: {known})")
    if len({ep.value for ep in found}) > 1:
        where = ", ".join(sorted(ep.value for ep in found))
        raise ConfigError(key, f"sink type {type_!r} is registered more than once ({where})")
    entry = found[0]
    try:
        factory = entry.load()
    except Exception as exc:  # a broken plugin: any import-time error
        raise ConfigError(key, f"cannot load {entry.value!r}: {exc}") from exc
    sink = factory(name, options)
    if not isinstance(sink, Sink):
        raise ConfigError(key, f"{entry.value!r} did not build a Sink (got {type(sink).__name__})")
    logger.debug("sink_loaded", sink=name, type=type_, factory=entry.value)
    return sink


def _unchanged(mount: str) -> str:
    return mount


@dataclass(frozen=True, slots=True)
class MountNames:
    """Names a destination per mount (a subject, a stream key, a topic) from a template.

    Call it with a mount name: ``template`` with ``{mount}`` replaced by ``escape(mount)``, or
    ``service`` for service-wide events (mount ``""``). Built by ``Options.mount_names``.

    Attributes:
        template: a format string whose only field is ``{mount}``.
        service: the destination of events without a mount.
        escape: what a mount name becomes in the template (default: itself).
    """

    template: str
    service: str
    escape: Callable[[str], str] = _unchanged

    def __call__(self, mount: str) -> str:
        """The destination of an event of ``mount``."""
        return self.template.format(mount=self.escape(mount)) if mount else self.service


class Options:
    """Reads one sink's options table, naming ``sinks.NAME.OPTION`` in every error.

    Example::

        opts = Options(name, options)
        self.path = opts.string("path")
        self.keep = opts.integer("keep", default=5, minimum=1)
        opts.finish()

    Args:
        sink: the sink's name in the config.
        options: the options table (``type`` already removed).
    """

    __slots__ = ("_options", "_seen", "_sink")

    def __init__(self, sink: str, options: Mapping[str, object]) -> None:
        self._sink = sink
        self._options = options
        self._seen: set[str] = set()

    def key(self, option: str) -> str:
        """The full config key of ``option``."""
        return f"sinks.{self._sink}.{option}"

    def _get(self, option: str, default: object) -> object:
        self._seen.add(option)
        if option in self._options:
            return self._options[option]
        if default is _MISSING:
            raise ConfigError(self.key(option), "required option is missing")
        return default

    def string(self, option: str, default: object = _MISSING) -> str:
        """A non-empty string option."""
        value = self._get(option, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(option), f"expected a non-empty string, got {value!r}")
        return value

    def optional_string(self, option: str) -> str | None:
        """A non-empty string option, or None when absent."""
        if option not in self._options:
            self._seen.add(option)
            return None
        return self.string(option)

    def number(
        self,
        option: str,
        default: object = _MISSING,
        *,
        minimum: float = 0.0,
        exclusive: bool = False,
    ) -> float:
        """A finite number ``>= minimum`` (``> minimum`` when ``exclusive``)."""
        value = self._get(option, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigError(self.key(option), f"expected a number, got {value!r}")
        if value < minimum or (exclusive and value == minimum):
            bound = ">" if exclusive else ">="
            raise ConfigError(self.key(option), f"must be {bound} {minimum}, got {value!r}")
        return float(value)

    def integer(self, option: str, default: object = _MISSING, *, minimum: int = 0) -> int:
        """An integer ``>= minimum``."""
        value = self._get(option, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(option), f"expected an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(self.key(option), f"must be >= {minimum}, got {value!r}")
        return value

    def boolean(self, option: str, default: object = _MISSING) -> bool:
        """A boolean option (``true`` / ``false``; numbers and strings are refused)."""
        value = self._get(option, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(option), f"expected true or false, got {value!r}")
        return value

    def choice(self, option: str, choices: tuple[str, ...], default: object = _MISSING) -> str:
        """One of ``choices``."""
        value = self._get(option, default)
        if value not in choices:
            raise ConfigError(
                self.key(option), f"expected one of {', '.join(choices)}, got {value!r}"
            )
        assert isinstance(value, str)
        return value

    def string_list(self, option: str, default: object = _MISSING) -> tuple[str, ...]:
        """A non-empty list of strings."""
        return self._strings(option, self._get(option, default))

    def strings(self, option: str, default: object = _MISSING) -> tuple[str, ...]:
        """A string, or a non-empty list of strings (server addresses, say)."""
        value = self._get(option, default)
        return self._strings(option, [value] if isinstance(value, str) else value)

    def _strings(self, option: str, value: object) -> tuple[str, ...]:
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(item, str) for item in value)
        ):
            raise ConfigError(
                self.key(option), f"expected a non-empty list of strings, got {value!r}"
            )
        return tuple(value)

    def mount_names(
        self,
        option: str,
        default: str,
        service_option: str,
        service_default: str,
        *,
        escape: Callable[[str], str] = _unchanged,
    ) -> MountNames:
        """A per-mount destination: the template ``option`` and the name ``service_option``.

        The template must be a valid format string whose only field is ``{mount}``.
        """
        template = self.string(option, default)
        fields = _format_fields(template)
        if fields is None:
            raise ConfigError(self.key(option), f"bad template {template!r}")
        if fields != {"mount"}:
            raise ConfigError(
                self.key(option), f"template must have one field, {{mount}}: {template!r}"
            )
        try:  # a conversion or format spec that cannot apply to a name fails here, not later
            template.format(mount="m")
        except (ValueError, KeyError, IndexError) as exc:
            raise ConfigError(self.key(option), f"bad template {template!r}: {exc}") from exc
        return MountNames(template, self.string(service_option, service_default), escape)

    def string_map(self, option: str, default: object = _MISSING) -> dict[str, str]:
        """A table of string to string."""
        value = self._get(option, default)
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(self.key(option), f"expected a table of strings, got {value!r}")
        return dict(value)

    def finish(self) -> None:
        """Raise for the first option that no getter asked for (sorted, so errors are stable)."""
        unknown = sorted(set(self._options) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown option")


def _format_fields(template: str) -> set[str] | None:
    """The field names of a format string, or None when it does not parse."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:
        return None
