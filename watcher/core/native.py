"""The C scan (``watcher.core._scan``), when it was built: the one place that imports it.

``pip install`` compiles ``watcher/core/_scan.c`` with the machine's compiler (``setup.py``,
an optional extension: without a compiler the install goes on without it). The C code is a
second implementation of ``Rules.scan`` and ``Rules.walk`` (``watcher.core.rules``); the
Python is the reference and the fallback, and ``tests/test_native.py`` checks on random trees
that both give the same answers (``docs/design-decisions.md``).

Set ``LAYERWATCH_PURE_PYTHON=1`` in the environment to use the Python rules even where the
extension is built (to compare, or to rule the C code out when something looks wrong).
"""

from __future__ import annotations

import os
from typing import Final, Protocol

__all__ = ["ENV_PURE_PYTHON", "NativeScanner", "scanner_type", "status"]

ENV_PURE_PYTHON: Final = "LAYERWATCH_PURE_PYTHON"

RawDir = tuple[bool, bytes | None, bool]
"""A directory child's state: (B has a directory there, origin, in U)."""

RawChild = tuple[bytes, str | None, RawDir | None, os.stat_result | None, int]
"""One child as the C scan gives it: (path, kind letter, dir state, lstat, inode of U's entry)."""


class NativeScanner(Protocol):
    """The C scanner of one branch (``watcher.core._scan.Scanner``)."""

    def __init__(self, upper: bytes, layers: tuple[bytes, ...], aufs: bool, prefix: bytes) -> None:
        """A scanner of ``upper`` over ``layers`` (top first, real paths)."""

    def changes(self, change_type: type, kinds: tuple[object, object, object]) -> list[object]:
        """The whole change list, sorted by path bytes (``Rules.walk`` from ``/``)."""
        ...

    def scan(
        self,
        path: bytes,
        dir_layers: tuple[int, ...] | None,
        origin: bytes | None,
        in_upper: bool,
        stats: bool = True,
    ) -> list[RawChild]:
        """``Rules.scan`` of one directory (children in no particular order; their ``lstat``
        None unless ``stats``).

        Raises:
            FileNotFoundError, NotADirectoryError: U no longer has the directory.
        """
        ...


def _load() -> tuple[type[NativeScanner] | None, str]:
    try:
        from watcher.core import _scan  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"pure Python (the C scan is not built: {exc})"
    scanner: type[NativeScanner] = _scan.Scanner
    return scanner, f"C ({_scan.__file__})"


_SCANNER, _STATUS = _load()


def scanner_type() -> type[NativeScanner] | None:
    """The C scanner class; None when it is not built or ``LAYERWATCH_PURE_PYTHON`` is set."""
    if _SCANNER is None or os.environ.get(ENV_PURE_PYTHON, "") not in ("", "0"):
        return None
    return _SCANNER


def status() -> tuple[bool, str]:
    """Whether change lists are computed by the C scan, and a sentence saying which."""
    if _SCANNER is not None and scanner_type() is None:
        return False, f"pure Python ({ENV_PURE_PYTHON} is set; the C scan is built)"
    return scanner_type() is not None, _STATUS
