"""Excludes: the paths a mount leaves out of its list, its watches and its scans.

Patterns are globs over the path inside the root, with ``**`` (the syntax of ``.gitignore``
and Watchman, not of ``fnmatch``, whose ``*`` crosses ``/``):

- ``*`` matches any run of characters within one path component, ``?`` one character,
  ``[abc]``/``[!abc]`` one character of (or not of) a set; none of them matches ``/``.
- ``**`` as a whole component matches any number of components, none included:
  ``/var/**/cache`` matches ``/var/cache`` and ``/var/lib/x/cache``.
- A pattern that starts with ``/`` is anchored at the root (``/tmp/**``); one without a ``/``
  at its start matches at any depth (``*.pyc`` is ``**/*.pyc``).
- A path is excluded when it, **or one of its ancestors**, matches a pattern: ``/var/cache``
  leaves out the directory and everything below it; ``/tmp/**`` leaves out everything below
  ``/tmp`` but keeps ``/tmp`` itself.

Names are bytes: patterns are encoded with the file system encoding and match raw bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from watcher.core.errors import ConfigError

__all__ = ["Excludes"]


class Excludes:
    """A compiled set of exclude patterns.

    Args:
        patterns: the globs (see the module's docs).
        where: the config key they come from, for errors.

    Raises:
        ConfigError: a pattern is empty, has a NUL byte, has ``..`` or ``.`` as a component,
            or an unclosed ``[``.
    """

    def __init__(self, patterns: Sequence[str], *, where: str = "exclude") -> None:
        self.patterns = tuple(patterns)
        parts = [_compile(pattern, where) for pattern in self.patterns]
        self._match = re.compile(b"|".join(parts)).fullmatch if parts else None

    def __bool__(self) -> bool:
        return self._match is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Excludes) and other.patterns == self.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)

    def __repr__(self) -> str:
        return f"Excludes({list(self.patterns)!r})"

    def __call__(self, path: bytes) -> bool:
        """Whether ``path`` (absolute inside the root) or one of its ancestors is excluded."""
        end = len(path)
        while end > 0:
            if self.matches(path[:end]):
                return True
            end = path.rfind(b"/", 0, end)
        return False

    def matches(self, path: bytes) -> bool:
        """Whether a pattern matches ``path`` itself: enough for a name listed in a directory
        that is not excluded (a scan never enters an excluded one), so a walk asks this once
        per entry instead of once per ancestor."""
        return self._match is not None and self._match(path) is not None


def _compile(pattern: str, where: str) -> bytes:
    raw = os.fsencode(pattern)
    if not raw or raw == b"/" or b"\0" in raw:
        raise ConfigError(where, f"{pattern!r} is not a pattern (empty, '/' or NUL)")
    anchored = raw.startswith(b"/")
    components = raw.strip(b"/").split(b"/")
    if any(part in (b"", b".", b"..") for part in components):
        raise ConfigError(where, f"{pattern!r}: no empty, '.' or '..' components")
    out = b"" if anchored else b"(?:/[^/]*)*?"  # any leading directories
    for index, part in enumerate(components):
        if part == b"**" and index == len(components) - 1:
            out += b"(?:/[^/]*)+"  # at the end: at least one component below
        elif part == b"**":
            out += b"(?:/[^/]*)*?"
        else:
            out += b"/" + _component(part, pattern, where)
    return b"(?:" + out + b")"


def _component(part: bytes, pattern: str, where: str) -> bytes:
    """One path component's glob as a regex that never matches ``/``."""
    out = b""
    i = 0
    while i < len(part):
        char = part[i : i + 1]
        if char == b"*":
            out += b"[^/]*"
        elif char == b"?":
            out += b"[^/]"
        elif char == b"[":
            close = part.find(b"]", i + 2 if part[i + 1 : i + 2] in (b"!", b"]") else i + 1)
            if close < 0:
                raise ConfigError(where, f"{pattern!r}: '[' without its ']'")
            body = part[i + 1 : close]
            negate = body.startswith(b"!")
            body = body[1:] if negate else body
            escaped = body.replace(b"\\", b"\\\\").replace(b"^", b"\\^")
            out += b"[" + (b"^/" if negate else b"") + escaped + b"]"
            i = close
        else:
            out += re.escape(char)
        i += 1
    return out
