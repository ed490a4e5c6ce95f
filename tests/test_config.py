"""The config: every key parses into the dataclasses; every bad value names its key."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from watcher.core.errors import ConfigError
from watcher.core.layers import Whiteouts
from watcher.delivery.plugins import load_sink
from watcher.service import config
from watcher.service.config import Config


def base() -> dict[str, Any]:
    """A minimal valid document: one attached mount (upper + lowers), one sink."""
    return {
        "mounts": [{"name": "m", "upper": "/srv/u", "lowers": ["/srv/l"]}],
        "sinks": {"out": {"type": "jsonl", "path": "/var/log/lw.jsonl"}},
    }


def with_value(path: str, value: Any) -> dict[str, Any]:
    """``base()`` with the dotted ``path`` set (``mounts.0.name``; ``None`` deletes)."""
    doc = base()
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is None:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def test_full_config_parses_every_key(tmp_path: Path) -> None:
    """A file using every key loads into frozen dataclasses with units converted."""
    cfg_file = tmp_path / "lw.toml"
    cfg_file.write_text(
        """
[[mounts]]
name = "managed"
layers = ["/img/top", "/img/base"]
rw = "/srv/rw"
work = "/srv/work"
mountpoint = "/srv/root"
whiteouts = "aufs"
userxattr = true

[[mounts]]
name = "attached"
mountpoint = "/var/lib/docker/overlay2/x/merged"

[sinks.audit]
type = "jsonl"
path = "/var/log/lw.jsonl"
batch_size = 500
linger = "250ms"
backoff_base = "1s"
backoff_cap = "2m"
dead_letter = "/var/lib/lw/dead.jsonl"
filter = { mounts = ["managed"], kinds = ["A", "D"], paths = ["/etc/*"] }

[spool]
path = "/var/lib/lw/spool.db"
max_bytes = "64MiB"
max_age = "2d"

[api]
socket = "/run/lw.sock"
listen = "127.0.0.1:8080"
token = "s3cret"
allow_remote = true

[service]
stream = "node-1"
log_level = "debug"
shutdown_timeout = "30s"
rescan_interval = 5
bookmark_interval = "1h"
"""
    )
    cfg = config.load(cfg_file)
    managed, attached = cfg.mounts
    assert managed.managed
    assert not attached.managed
    assert managed.layers == (Path("/img/top"), Path("/img/base"))
    assert managed.whiteouts is Whiteouts.AUFS
    assert managed.userxattr
    sink = cfg.sinks[0]
    assert (sink.name, sink.type, sink.batch_size) == ("audit", "jsonl", 500)
    assert sink.linger == pytest.approx(0.25)
    assert (sink.backoff_base, sink.backoff_cap) == (1.0, 120.0)
    assert sink.dead_letter == Path("/var/lib/lw/dead.jsonl")
    assert sink.mounts == frozenset({"managed"})
    assert sink.kinds == frozenset({"A", "D"})
    assert sink.paths == ("/etc/*",)
    assert dict(sink.options) == {"path": "/var/log/lw.jsonl"}
    assert cfg.spool.max_bytes == 64 << 20
    assert cfg.spool.max_age == 2 * 86400
    assert cfg.api is not None
    assert cfg.api.listen == "127.0.0.1:8080"
    assert cfg.api.allow_remote
    assert (cfg.stream, cfg.log_level) == ("node-1", "debug")
    assert (cfg.shutdown_timeout, cfg.rescan_interval, cfg.bookmark_interval) == (30, 5, 3600)
    with pytest.raises(AttributeError):
        cfg.stream = "x"  # type: ignore[misc]


def test_defaults() -> None:
    """Keys left out take the documented defaults."""
    cfg = config.parse(base())
    assert isinstance(cfg, Config)
    assert cfg.api is None
    assert cfg.spool.path == Path("/var/lib/layerwatch/spool.db")
    assert cfg.spool.max_bytes == 1 << 30
    assert (cfg.shutdown_timeout, cfg.rescan_interval, cfg.bookmark_interval) == (10, 2, 60)
    assert cfg.sinks[0].batch_size == 100
    assert cfg.sinks[0].mounts is None
    assert cfg.mounts[0].whiteouts is Whiteouts.OVERLAY


BAD: list[tuple[str, Any, str]] = [
    # (dotted path in the document, bad value (None: delete it), the key the error names)
    ("mounts", None, "mounts"),
    ("mounts", [], "mounts"),
    ("mounts", {"name": "m"}, "mounts"),
    ("mounts.0", "m", "mounts[0]"),
    ("mounts.0.name", None, "mounts[0].name"),
    ("mounts.0.name", 7, "mounts[0].name"),
    ("mounts.0.name", "has space", "mounts[0].name"),
    ("mounts.0.name", "", "mounts[0].name"),
    ("mounts.0.name", "x" * 64, "mounts[0].name"),
    ("mounts.0.upper", "relative/u", "mounts[0].upper"),
    ("mounts.0.upper", True, "mounts[0].upper"),
    ("mounts.0.lowers", "/srv/l", "mounts[0].lowers"),
    ("mounts.0.lowers", [], "mounts[0].lowers"),
    ("mounts.0.lowers", ["l"], "mounts[0].lowers[0]"),
    ("mounts.0.lowers", ["/a", 3], "mounts[0].lowers[1]"),
    ("mounts.0.mountpoint", "mnt", "mounts[0].mountpoint"),
    ("mounts.0.layers", ["/a"], "mounts[0].rw"),
    ("mounts.0.layers", ["a"], "mounts[0].layers[0]"),
    ("mounts.0.rw", "rw", "mounts[0].rw"),
    ("mounts.0.work", "work", "mounts[0].work"),
    ("mounts.0.whiteouts", "btrfs", "mounts[0].whiteouts"),
    ("mounts.0.whiteouts", 1, "mounts[0].whiteouts"),
    ("mounts.0.userxattr", "yes", "mounts[0].userxattr"),
    ("mounts.0.colour", "red", "mounts[0].colour"),
    ("mounts.0.exclude", "/tmp/**", "mounts[0].exclude"),
    ("mounts.0.exclude", ["/tmp/../etc"], "mounts[0].exclude"),
    ("mounts.0.exclude", ["/x["], "mounts[0].exclude"),
    ("mounts.0.exclude", [""], "mounts[0].exclude[0]"),
    ("mounts.0.hash", "yes", "mounts[0].hash"),
    ("mounts.0.hash_max_size", "big", "mounts[0].hash_max_size"),
    ("mounts.0.hash_budget", 0, "mounts[0].hash_budget"),
    ("sinks", [], "sinks"),
    ("sinks.out", "jsonl", "sinks.out"),
    ("sinks.out.type", None, "sinks.out.type"),
    ("sinks.out.type", 1, "sinks.out.type"),
    ("sinks.out.batch_size", 0, "sinks.out.batch_size"),
    ("sinks.out.batch_size", "10", "sinks.out.batch_size"),
    ("sinks.out.batch_size", True, "sinks.out.batch_size"),
    ("sinks.out.linger", "soon", "sinks.out.linger"),
    ("sinks.out.linger", -1, "sinks.out.linger"),
    ("sinks.out.backoff_base", "fast", "sinks.out.backoff_base"),
    ("sinks.out.backoff_cap", [], "sinks.out.backoff_cap"),
    ("sinks.out.dead_letter", "dead.jsonl", "sinks.out.dead_letter"),
    ("sinks.out.filter", "A", "sinks.out.filter"),
    ("sinks.out.filter", {"kinds": ["X"]}, "sinks.out.filter.kinds"),
    ("sinks.out.filter", {"kinds": "A"}, "sinks.out.filter.kinds"),
    ("sinks.out.filter", {"mounts": "m"}, "sinks.out.filter.mounts"),
    ("sinks.out.filter", {"paths": "/etc"}, "sinks.out.filter.paths"),
    ("sinks.out.filter", {"path": ["/etc"]}, "sinks.out.filter.path"),
    ("sinks.out.filter", {"mounts": ["nope"]}, "sinks.out.filter.mounts"),
    ("sinks.out.filter", {"mounts": [1]}, "sinks.out.filter.mounts[0]"),
    ("sinks.out.filter", {"paths": ["/etc/*", 1]}, "sinks.out.filter.paths[1]"),
    ("sinks.out.filter", {"kinds": [""]}, "sinks.out.filter.kinds[0]"),
    ("sinks.out.backoff_base", 0, "sinks.out.backoff_base"),
    ("sinks.out.backoff_cap", "0s", "sinks.out.backoff_cap"),
    ("spool", "/x", "spool"),
    ("spool.path", "spool.db", "spool.path"),
    ("spool.max_bytes", "lots", "spool.max_bytes"),
    ("spool.max_bytes", 0, "spool.max_bytes"),
    ("spool.max_bytes", -5, "spool.max_bytes"),
    ("spool.max_bytes", 1.5, "spool.max_bytes"),
    ("spool.max_age", "forever", "spool.max_age"),
    ("spool.max_age", -1, "spool.max_age"),
    ("spool.max_age", 0, "spool.max_age"),
    ("spool.size", 1, "spool.size"),
    ("api", True, "api"),
    ("api.socket", "api.sock", "api.socket"),
    ("api.listen", 8080, "api.listen"),
    ("api.listen", "127.0.0.1:8080", "api.token"),
    ("api.token", 1, "api.token"),
    ("api.allow_remote", "no", "api.allow_remote"),
    ("api.port", 1, "api.port"),
    ("service", "x", "service"),
    ("service.stream", 1, "service.stream"),
    ("service.stream", "", "service.stream"),
    ("service.shutdown_timeout", 0, "service.shutdown_timeout"),
    ("service.rescan_interval", "0ms", "service.rescan_interval"),
    ("service.bookmark_interval", 0.0, "service.bookmark_interval"),
    ("service.log_level", "loud", "service.log_level"),
    ("service.log_level", 10, "service.log_level"),
    ("service.shutdown_timeout", "a while", "service.shutdown_timeout"),
    ("service.shutdown_timeout", -1, "service.shutdown_timeout"),
    ("service.rescan_interval", "often", "service.rescan_interval"),
    ("service.bookmark_interval", "1y", "service.bookmark_interval"),
    ("service.threads", 4, "service.threads"),
    ("extra", 1, "extra"),
]


@pytest.mark.parametrize(("path", "value", "key"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_names_its_key(path: str, value: Any, key: str) -> None:
    """Each bad, missing or unknown key raises ConfigError naming exactly that key."""
    with pytest.raises(ConfigError) as info:
        config.parse(with_value(path, value))
    assert info.value.key == key
    assert str(info.value).startswith(f"config: {key}: ")
    assert info.value.problem


def test_duplicate_mount_name_names_the_second() -> None:
    """Two mounts with one name: the error names the second one."""
    doc = base()
    doc["mounts"].append(copy.deepcopy(doc["mounts"][0]))
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert info.value.key == "mounts[1].name"


def test_bad_sink_name_names_the_sink() -> None:
    """A sink table whose name has a space names the sink."""
    doc = base()
    doc["sinks"]["bad name"] = doc["sinks"].pop("out")
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert info.value.key == "sinks.bad name"


def test_managed_mount_rejects_upper() -> None:
    """A managed mount (layers) with upper names the conflict."""
    doc = base()
    doc["mounts"][0].update(layers=["/a"], rw="/rw", mountpoint="/mnt")
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert info.value.key == "mounts[0].upper"


def test_mount_with_nothing_to_follow() -> None:
    """A mount with only a name says what it needs."""
    with pytest.raises(ConfigError) as info:
        config.parse({"mounts": [{"name": "m"}]})
    assert info.value.key == "mounts[0]"
    assert "layers" in info.value.problem


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "sinks.out.path"),
        ({"path": "/x", "fsync": "sometimes"}, "sinks.out.fsync"),
        ({"path": "/x", "keep": 0}, "sinks.out.keep"),
        ({"path": "/x", "rotate": True}, "sinks.out.rotate"),
    ],
)
def test_sink_options_name_their_key(options: dict[str, Any], key: str) -> None:
    """Options passed through to the sink are validated by it, naming sinks.NAME.OPTION."""
    doc = base()
    doc["sinks"]["out"] = {"type": "jsonl", **options}
    cfg = config.parse(doc)
    sink = cfg.sinks[0]
    with pytest.raises(ConfigError) as info:
        load_sink(sink.name, sink.type, sink.options)
    assert info.value.key == key


def test_unknown_sink_type_names_the_type_key() -> None:
    """An unknown sink type names sinks.NAME.type and lists the installed ones."""
    with pytest.raises(ConfigError) as info:
        load_sink("out", "carrier-pigeon", {})
    assert info.value.key == "sinks.out.type"
    assert "jsonl" in info.value.problem


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    """A missing file and a file that is not TOML name the file."""
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError) as info:
        config.load(missing)
    assert info.value.key == str(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[mounts]\nname = ")
    with pytest.raises(ConfigError) as info:
        config.load(broken)
    assert info.value.key == str(broken)
    assert "TOML" in info.value.problem


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_durations_are_refused(value: float) -> None:
    """nan or inf for a duration is an error naming the key (nan would disable deadlines)."""
    data = {"mounts": [{"name": "m", "upper": "/u", "lowers": ["/l"]}]}
    with pytest.raises(ConfigError, match=r"service\.shutdown_timeout: must be a finite"):
        config.parse({**data, "service": {"shutdown_timeout": value}})


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """A config file with bytes that are not UTF-8 is a ConfigError naming the file."""
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[service]\nstream = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(path)


def test_source_and_attribution_parse() -> None:
    """``service.source`` picks the event source; attribution is per mount and for discovery."""
    doc = with_value("service.source", "fanotify")
    doc["mounts"][0]["attribution"] = True
    cfg = config.parse(doc)
    assert (cfg.source, cfg.mounts[0].attribution, cfg.attribution) == ("fanotify", True, True)
    assert config.parse(base()).source == "auto"
    assert not config.parse(base()).attribution
    found = config.parse({**base(), "discovery": {"attribution": True}})
    assert found.discovery is not None
    assert found.attribution


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (with_value("service.source", "ebpf"), "service.source"),
        (with_value("mounts.0.attribution", "yes"), "mounts[0].attribution"),
        (
            {**with_value("service.source", "inotify"), "discovery": {"attribution": True}},
            "service.source",
        ),
    ],
)
def test_bad_source_or_attribution_names_its_key(doc: dict[str, Any], key: str) -> None:
    """An unknown source, a non-boolean attribution, attribution with inotify: each names it."""
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert info.value.key == key
