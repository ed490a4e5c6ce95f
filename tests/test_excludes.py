"""Exclude globs: ``**`` semantics, anchoring, ancestors, bytes, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from live import LiveMount
from overlay import LayerEntry, build_layer, mount_overlay, requires_overlay

from watcher.core.errors import ConfigError
from watcher.core.excludes import Excludes
from watcher.core.rules import compute

CASES = [
    # pattern, excluded, kept
    ("/tmp/**", [b"/tmp/a", b"/tmp/a/b/c"], [b"/tmp", b"/tmpx/a", b"/var/tmp/a"]),
    ("/var/cache", [b"/var/cache", b"/var/cache/apt/x"], [b"/var/cachex", b"/var"]),
    ("*.pyc", [b"/a.pyc", b"/usr/lib/x/y.pyc", b"/d.pyc/inside"], [b"/a.pyc.bak", b"/pyc"]),
    ("/var/**/cache", [b"/var/cache", b"/var/lib/x/cache/f"], [b"/cache", b"/usr/var/cache"]),
    ("**/node_modules", [b"/node_modules", b"/app/node_modules/x"], [b"/app/node_modules2"]),
    ("/a?c", [b"/abc", b"/a-c/d"], [b"/a/c", b"/abbc"]),
    ("/x[0-9]", [b"/x1", b"/x9/y"], [b"/xa", b"/x10"]),
    ("/x[!0-9]", [b"/xa"], [b"/x1", b"/x/"]),
    ("/caf\udce9", [b"/caf\xe9/x"], [b"/cafe"]),  # a name that is not UTF-8
]


@pytest.mark.parametrize(("pattern", "excluded", "kept"), CASES)
def test_patterns(pattern: str, excluded: list[bytes], kept: list[bytes]) -> None:
    """Each pattern excludes its paths (and what is below them), and nothing else."""
    matcher = Excludes([pattern])
    assert [p for p in excluded if not matcher(p)] == []
    assert [p for p in kept if matcher(p)] == []


def test_several_patterns_and_none() -> None:
    """Any pattern of several excludes; no pattern excludes nothing (and is falsy)."""
    matcher = Excludes(["/tmp/**", "*.log"])
    assert matcher(b"/tmp/x")
    assert matcher(b"/var/log/syslog.log")
    assert not matcher(b"/etc/passwd")
    assert not Excludes([])
    assert not Excludes([])(b"/tmp/x")


@pytest.mark.parametrize("bad", ["", "/", "/a//b", "/a/../b", "./x", "/x[ab", "a\0b"])
def test_bad_patterns_name_the_key(bad: str) -> None:
    """A pattern that cannot mean a path is a ConfigError naming the key and the pattern."""
    with pytest.raises(ConfigError, match=r"mounts\[0\]\.exclude"):
        Excludes([bad], where="mounts[0].exclude")


def test_compute_leaves_out_excluded_paths_and_their_rule_8_ancestors(tmp_path: Path) -> None:
    """compute(exclude=...) is compute() minus the excluded paths, minus a directory listed
    only for changes below it that are all excluded; excluded dirs are not even listed."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    build_layer(
        str(lower),
        [LayerEntry("file", b"var/cache/old", b"1"), LayerEntry("file", b"etc/conf", b"1")],
    )
    (upper / "var" / "cache").mkdir(parents=True)
    (upper / "var" / "cache" / "new").write_bytes(b"n")
    (upper / "etc").mkdir()
    (upper / "etc" / "x.pyc").write_bytes(b"c")
    (upper / "etc" / "keep").write_bytes(b"k")
    for d in (upper / "var", upper / "var" / "cache", upper / "etc"):  # as copy-up leaves them
        os.utime(d, ns=(os.stat(lower / d.relative_to(upper)).st_mtime_ns,) * 2)
    full = {c.path: str(c.kind) for c in compute(str(upper), [str(lower)])}
    assert full == {
        b"/etc": "C",
        b"/etc/keep": "A",
        b"/etc/x.pyc": "A",
        b"/var": "C",
        b"/var/cache": "C",
        b"/var/cache/new": "A",
    }
    left = compute(str(upper), [str(lower)], exclude=Excludes(["/var/cache", "*.pyc"]))
    assert {c.path: str(c.kind) for c in left} == {b"/etc": "C", b"/etc/keep": "A"}
    # /etc is C for /etc/keep (rule 8); /var was C only for /var/cache/new, excluded


@requires_overlay
async def test_a_tracker_does_not_watch_excluded_dirs(tmp_path: Path) -> None:
    """The live list equals compute with the same excludes; excluded dirs cost no watch and
    writes in them make no event."""
    lower = tmp_path / "lower"
    build_layer(str(lower), [LayerEntry("file", b"etc/conf", b"1")])
    with mount_overlay(str(tmp_path), [str(lower)]) as ovl:
        merged = Path(ovl.merged)
        for d in ("tmp/a/b", "app/node_modules/x", "app/src"):
            (merged / d).mkdir(parents=True)
        live = LiveMount(
            "x", ovl.upper, [str(lower)], exclude=Excludes(["/tmp/**", "node_modules"])
        )
        await live.start()
        try:
            assert live.tracker.watch_count == 4  # /, /tmp, /app, /app/src
            before = len(live.items)
            (merged / "tmp" / "a" / "b" / "f").write_bytes(b"x")
            (merged / "app" / "node_modules" / "m.js").write_bytes(b"x")
            await live.sync()
            assert len(live.items) == before
            (merged / "app" / "src" / "main.py").write_bytes(b"x")
            await live.sync()
            assert [c.path for c in live.check()] == [
                b"/app",
                b"/app/src",
                b"/app/src/main.py",
                b"/tmp",
            ]
        finally:
            await live.stop()
