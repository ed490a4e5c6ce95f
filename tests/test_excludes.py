"""Exclude globs: ``**`` semantics, anchoring, ancestors, bytes, and errors that name the key."""

from __future__ import annotations

import pytest

from watcher.core.errors import ConfigError
from watcher.core.excludes import Excludes

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
