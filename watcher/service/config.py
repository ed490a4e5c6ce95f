"""The service configuration: TOML parsed once, at the edge, into frozen dataclasses.

Every unknown key and every bad value raises ``ConfigError`` naming the key
(``mounts[2].layers``, ``sinks.audit.batch_size``). Sink options other than the runner's
own (``type``, ``filter``, ``batch_size``, ``linger``, ``dead_letter``, ...) are passed to the
sink, which validates them itself.

``service.stream``, ``service.host``, ``api.token`` and every sink option accept ``${VAR}``
references and a ``*_file`` form (``watcher.service.secrets``); they are resolved here, once,
so a sink sees plain values. ``parse`` takes the environment as an argument; only ``load``
reads ``os.environ``, and only for those references.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from watcher.core.digest import DEFAULT_BUDGET, DEFAULT_MAX_SIZE
from watcher.core.errors import ConfigError
from watcher.core.excludes import Excludes
from watcher.core.layers import Whiteouts
from watcher.service.secrets import FILE_SUFFIX, Secrets, expand, read_file

__all__ = [
    "ApiConfig",
    "Config",
    "DiscoveryConfig",
    "MountConfig",
    "SinkConfig",
    "SpoolConfig",
    "load",
    "parse",
]

_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SIZE: Final = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RUNNER_KEYS: Final = frozenset(
    {"type", "filter", "batch_size", "linger", "dead_letter", "backoff_base", "backoff_cap"}
)


DEFAULT_SOCKET: Final = Path("/run/layerwatch/api.sock")
"""Where the API listens, and where the commands that talk to it look, by default."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MountConfig:
    """One mount to follow.

    Managed (``layers`` + ``rw`` + ``mountpoint``): mounted at start, unmounted at stop.
    Attached: an existing ``mountpoint`` (layers read from mountinfo), or ``upper`` +
    ``lowers`` (no mount needed at all). ``exclude``: paths left out of the list, the watches
    and the scans (``core.excludes``); ``hash``: content digests on events (``core.digest``).
    """

    name: str
    mountpoint: Path | None = None
    layers: tuple[Path, ...] = ()
    rw: Path | None = None
    work: Path | None = None
    upper: Path | None = None
    lowers: tuple[Path, ...] = ()
    whiteouts: Whiteouts = Whiteouts.OVERLAY
    userxattr: bool = False
    hash: bool = False
    hash_max_size: int = DEFAULT_MAX_SIZE
    hash_budget: float = DEFAULT_BUDGET
    exclude: Excludes = field(default_factory=lambda: Excludes([]))
    attribution: bool = False

    @property
    def managed(self) -> bool:
        """Whether layerwatch mounts and unmounts it."""
        return bool(self.layers)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkConfig:
    """One sink: its type, the runner's settings, and the sink's own options."""

    name: str
    type: str
    options: Mapping[str, object] = field(repr=False)
    """The sink's own options, ``${VAR}`` and ``*_file`` resolved (may hold secrets)."""
    batch_size: int = 100
    linger: float | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    dead_letter: Path | None = None
    mounts: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    """The durable log."""

    path: Path = Path("/var/lib/layerwatch/spool.db")
    max_bytes: int = 1 << 30
    max_age: float = 7 * 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    """The HTTP API: a unix socket by default; TCP only with a token."""

    socket: Path | None = DEFAULT_SOCKET
    listen: str | None = None
    token: str | None = field(default=None, repr=False)
    allow_remote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    """Follow overlay mounts as they appear (containers), with their runtime's labels."""

    mountpoint_glob: str | None = None
    docker_root: Path = Path("/var/lib/docker")
    containerd_state: Path = Path("/run/containerd")
    mountinfo: Path = Path("/proc/self/mountinfo")
    interval: float = 2.0
    attribution: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole service configuration."""

    mounts: tuple[MountConfig, ...]
    sinks: tuple[SinkConfig, ...] = ()
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    api: ApiConfig | None = None
    discovery: DiscoveryConfig | None = None
    stream: str = field(default_factory=socket.gethostname)
    host: str = field(default_factory=socket.gethostname)
    log_level: str = "info"
    shutdown_timeout: float = 10.0
    rescan_interval: float = 2.0
    bookmark_interval: float = 60.0
    source: str = "auto"
    secrets: Secrets = field(default_factory=Secrets, repr=False, compare=False)
    """What was read from the environment or files into secret-bearing keys: blank it out of
    whatever is shown (``Secrets.redact``)."""

    @property
    def attribution(self) -> bool:
        """Whether any mount (configured or discovered) asks for attribution."""
        found = self.discovery is not None and self.discovery.attribution
        return found or any(mount.attribution for mount in self.mounts)


@dataclass(frozen=True, slots=True)
class _Outside:
    """Where ``${VAR}`` and ``*_file`` values come from, and where secrets are remembered."""

    env: Mapping[str, str]
    secrets: Secrets

    def string(self, table: _Table, name: str, *, secret: bool) -> str | None:
        """The string ``name`` of ``table``, or the content of the file ``name_file``
        names; references resolved in either. None when both are absent."""
        file_key = f"{name}{FILE_SUFFIX}"
        path = table.get(file_key, str)
        value = table.get(name, str)
        keep = self.secrets if secret else None
        if path is not None:
            if value is not None:
                raise ConfigError(table.key(file_key), f"give {name} or {file_key}, not both")
            where = table.key(file_key)
            return read_file(where, expand(where, path, self.env), keep)
        return None if value is None else expand(table.key(name), value, self.env, keep)

    def options(self, where: str, raw: Mapping[str, object]) -> dict[str, object]:
        """A sink's options, every string resolved and every ``KEY_file`` read into ``KEY``
        (all of them taken as secrets)."""
        out: dict[str, object] = {}
        for name, value in raw.items():
            key = f"{where}.{name}"
            target = name.removesuffix(FILE_SUFFIX)
            if target == name or not target:
                out[name] = self._nested(key, value)
                continue
            if target in raw:
                raise ConfigError(key, f"give {target} or {name}, not both")
            if not isinstance(value, str):
                raise ConfigError(key, f"must be a string (a file's path), got {value!r}")
            out[target] = read_file(key, expand(key, value, self.env), self.secrets)
        return out

    def _nested(self, key: str, value: object) -> object:
        if isinstance(value, str):
            return expand(key, value, self.env, self.secrets)
        if isinstance(value, list):
            return [self._nested(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._nested(f"{key}.{k}", v) for k, v in value.items()}
        return value


class _Table:
    """Reads one TOML table, remembering which keys were used, to reject the rest."""

    def __init__(self, where: str, raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(where or "(top level)", "must be a table")
        self.where = where
        self.raw: dict[str, Any] = raw
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.raw:
            return default
        value = self.raw[name]
        if isinstance(value, bool) and kind is not bool and bool not in _tuple(kind):
            raise ConfigError(self.key(name), f"must be {_kind_name(kind)}, not a boolean")
        if not isinstance(value, kind):
            raise ConfigError(self.key(name), f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def require(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.raw:
            raise ConfigError(self.key(name), "is required")
        return self.get(name, kind)

    def path(self, name: str) -> Path | None:
        value = self.get(name, str)
        if value is None:
            return None
        if not value.startswith("/"):
            raise ConfigError(self.key(name), f"must be an absolute path, got {value!r}")
        return Path(value)

    def paths(self, name: str) -> tuple[Path, ...]:
        values = self.get(name, list, [])
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(
                    f"{self.key(name)}[{i}]", f"must be an absolute path, got {value!r}"
                )
            out.append(Path(value))
        return tuple(out)

    def size(self, name: str, default: int) -> int:
        value = self.get(name, (int, str), default)
        if isinstance(value, int):
            if value <= 0:
                raise ConfigError(self.key(name), "must be positive")
            return int(value)
        match = _SIZE.match(value)
        if match is None:
            raise ConfigError(self.key(name), f"must be a size like 512MiB, got {value!r}")
        unit = (match.group(2) or "B").upper()[0]
        return int(match.group(1)) << (10 * "BKMGT".index(unit))

    def duration(self, name: str, default: float | None) -> float | None:
        value = self.get(name, (int, float, str), default)
        if value is None or isinstance(value, int | float):
            if value is not None and not math.isfinite(value):
                raise ConfigError(self.key(name), f"must be a finite number, got {value!r}")
            if value is not None and value < 0:
                raise ConfigError(self.key(name), "must not be negative")
            return None if value is None else float(value)
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(self.key(name), f"must be a duration like 30s or 7d, got {value!r}")
        return float(match.group(1)) * _UNITS[match.group(2) or "s"]

    def positive_duration(self, name: str, default: float) -> float:
        """A duration that must be more than zero (zero would spin or never wait)."""
        value = self.duration(name, default)
        assert value is not None
        if value <= 0:
            raise ConfigError(self.key(name), "must be more than zero")
        return value

    def strings(self, name: str) -> list[str] | None:
        """An array of non-empty strings, or None when absent."""
        values = self.get(name, list)
        if values is None:
            return None
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"{self.key(name)}[{i}]", f"must be a non-empty string, got {value!r}"
                )
        return list(values)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kind))


def _name(table: _Table, value: str) -> str:
    if not _NAME.match(value):
        raise ConfigError(
            table.key("name"), f"{value!r} must be 1-63 letters, digits, '.', '_' or '-'"
        )
    return value


def _mount(where: str, raw: object) -> MountConfig:
    t = _Table(where, raw)
    name = _name(t, t.require("name", str))
    whiteouts_raw = t.get("whiteouts", str, "overlay")
    try:
        whiteouts = Whiteouts(whiteouts_raw)
    except ValueError:
        raise ConfigError(t.key("whiteouts"), "must be 'overlay' or 'aufs'") from None
    mount = MountConfig(
        name=name,
        mountpoint=t.path("mountpoint"),
        layers=t.paths("layers"),
        rw=t.path("rw"),
        work=t.path("work"),
        upper=t.path("upper"),
        lowers=t.paths("lowers"),
        whiteouts=whiteouts,
        userxattr=t.get("userxattr", bool, False),
        exclude=Excludes(t.strings("exclude") or [], where=t.key("exclude")),
        hash=t.get("hash", bool, False),
        hash_max_size=t.size("hash_max_size", DEFAULT_MAX_SIZE),
        hash_budget=t.positive_duration("hash_budget", DEFAULT_BUDGET),
        attribution=t.get("attribution", bool, False),
    )
    t.done()
    if mount.layers:
        if mount.rw is None or mount.mountpoint is None:
            missing = "rw" if mount.rw is None else "mountpoint"
            raise ConfigError(t.key(missing), "is required for a managed mount (with layers)")
        if mount.upper is not None or mount.lowers:
            raise ConfigError(t.key("upper"), "a managed mount (layers) has rw, not upper/lowers")
    elif mount.upper is not None:
        if not mount.lowers:
            raise ConfigError(t.key("lowers"), "is required with upper")
    elif mount.mountpoint is None:
        raise ConfigError(where, "needs layers + rw + mountpoint, a mountpoint, or upper + lowers")
    return mount


def _sink(name: str, raw: object, outside: _Outside) -> SinkConfig:
    where = f"sinks.{name}"
    t = _Table(where, raw)
    if not _NAME.match(name):
        raise ConfigError(where, "sink names are 1-63 letters, digits, '.', '_' or '-'")
    type_ = t.require("type", str)
    flt = _Table(t.key("filter"), t.get("filter", dict, {}))
    mounts = flt.strings("mounts")
    kinds = flt.strings("kinds")
    if kinds is not None and not set(kinds) <= {"A", "C", "D"}:
        raise ConfigError(flt.key("kinds"), f"kinds are 'A', 'C', 'D', got {kinds!r}")
    paths = flt.strings("paths") or []
    flt.done()
    batch_size = t.get("batch_size", int, 100)
    if batch_size < 1:
        raise ConfigError(t.key("batch_size"), "must be at least 1")
    return SinkConfig(
        name=name,
        type=type_,
        options=outside.options(where, {k: v for k, v in t.raw.items() if k not in _RUNNER_KEYS}),
        batch_size=batch_size,
        linger=t.duration("linger", None),
        backoff_base=t.positive_duration("backoff_base", 0.5),
        backoff_cap=t.positive_duration("backoff_cap", 30.0),
        dead_letter=t.path("dead_letter"),
        mounts=frozenset(mounts) if mounts is not None else None,
        kinds=frozenset(kinds) if kinds is not None else None,
        paths=tuple(str(p) for p in paths),
    )


def _identity(service: _Table, outside: _Outside, name: str, what: str) -> str:
    """``service.stream`` or ``service.host``: the host name unless given."""
    value = outside.string(service, name, secret=False)
    if value is None:
        return socket.gethostname()
    if not value:
        raise ConfigError(service.key(name), f"must not be empty ({what})")
    return value


def _discovery(top: _Table) -> DiscoveryConfig:
    t = _Table("discovery", top.get("discovery", dict))
    default = DiscoveryConfig()
    found = DiscoveryConfig(
        mountpoint_glob=t.get("mountpoint_glob", str),
        docker_root=t.path("docker_root") or default.docker_root,
        containerd_state=t.path("containerd_state") or default.containerd_state,
        mountinfo=t.path("mountinfo") or default.mountinfo,
        interval=t.positive_duration("interval", default.interval),
        attribution=t.get("attribution", bool, False),
    )
    t.done()
    return found


def parse(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Build a ``Config`` from a parsed TOML document.

    Args:
        data: the document.
        env: the environment ``${VAR}`` references read (None: no variable is set).

    Raises:
        ConfigError: naming the first key that is unknown, missing or bad, or a reference
            that cannot be resolved (an unset variable, an unreadable or empty file).
    """
    outside = _Outside(env={} if env is None else env, secrets=Secrets())
    top = _Table("", dict(data))
    discovery = _discovery(top) if "discovery" in top.raw else None
    mounts_raw = top.get("mounts", list, [])
    if not mounts_raw and discovery is None:
        raise ConfigError("mounts", "at least one [[mounts]] table (or [discovery]) is required")
    mounts = tuple(_mount(f"mounts[{i}]", raw) for i, raw in enumerate(mounts_raw))
    seen: set[str] = set()
    for i, mount in enumerate(mounts):
        if mount.name in seen:
            raise ConfigError(f"mounts[{i}].name", f"{mount.name!r} is used twice")
        seen.add(mount.name)
    sinks_table = _Table("sinks", top.get("sinks", dict, {}))
    sinks = tuple(_sink(name, raw, outside) for name, raw in sinks_table.raw.items())
    for sink in sinks:
        unknown = sorted((sink.mounts or frozenset()) - seen)
        if unknown and discovery is None:  # discovered mounts are named at run time
            raise ConfigError(
                f"sinks.{sink.name}.filter.mounts", f"{unknown[0]!r} is not a configured mount"
            )
    spool_t = _Table("spool", top.get("spool", dict, {}))
    default = SpoolConfig()
    spool = SpoolConfig(
        path=spool_t.path("path") or default.path,
        max_bytes=spool_t.size("max_bytes", default.max_bytes),
        max_age=spool_t.positive_duration("max_age", default.max_age),
    )
    spool_t.done()
    api = None
    if "api" in top.raw:
        api_t = _Table("api", top.get("api", dict))
        api = ApiConfig(
            socket=api_t.path("socket"),
            listen=api_t.get("listen", str),
            token=outside.string(api_t, "token", secret=True),
            allow_remote=api_t.get("allow_remote", bool, False),
        )
        api_t.done()
        if api.listen is not None and not api.token:
            raise ConfigError("api.token", "is required when api.listen (TCP) is set")
    service = _Table("service", top.get("service", dict, {}))
    config = Config(
        mounts=mounts,
        sinks=sinks,
        spool=spool,
        api=api,
        discovery=discovery,
        stream=_identity(service, outside, "stream", "it starts every event id"),
        host=_identity(service, outside, "host", "it names the event's source"),
        log_level=service.get("log_level", str, "info"),
        shutdown_timeout=service.positive_duration("shutdown_timeout", 10.0),
        rescan_interval=service.positive_duration("rescan_interval", 2.0),
        bookmark_interval=service.positive_duration("bookmark_interval", 60.0),
        secrets=outside.secrets,
        source=service.get("source", str, "auto"),
    )
    if config.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("service.log_level", "must be debug, info, warning or error")
    if config.source not in ("auto", "inotify", "fanotify"):
        raise ConfigError("service.source", "must be auto, inotify or fanotify")
    if config.source == "inotify" and config.attribution:
        raise ConfigError("service.source", 'attribution needs "fanotify" or "auto"')
    service.done()
    top.done()
    return config


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and parse a TOML config file.

    Args:
        path: the file.
        env: the environment for ``${VAR}`` references (None: ``os.environ``).

    Raises:
        ConfigError: the file is unreadable, not TOML, or has a bad key or reference.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start}): TOML is UTF-8") from exc
    return parse(data, os.environ if env is None else env)
