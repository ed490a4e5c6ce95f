"""Shared fixtures: real overlay mounts that are always unmounted, and the conformance cases."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from overlay import Overlay, build_lower, mount_overlay, requires_overlay

CASES_FILE = Path(__file__).parent / "data/conformance/cases.json"
"""The public conformance cases with the answers a real ``docker diff`` gave (the rules they
exercise are in ``docs/rules.md``). Only this in-repo copy is read."""


def load_cases() -> dict[str, Any]:
    """Load ``cases.json``; a missing file raises, so the cases can never be skipped quietly."""
    with CASES_FILE.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


with warnings.catch_warnings(), contextlib.suppress(ImportError):
    # Hypothesis imports libcst to write its failure patch; libcst's import warns about
    # mypy_extensions.TypedDict, and warnings-as-errors would turn a failing example into an
    # INTERNALERROR that hides it. Import it once here, quietly.
    warnings.simplefilter("ignore", DeprecationWarning)
    importlib.import_module("libcst")

settings.register_profile("default", max_examples=100, derandomize=True)
settings.register_profile("explore", max_examples=1000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
"""Property tests are deterministic by default (CI must not flip on a new random draw);
``HYPOTHESIS_PROFILE=explore`` searches wider with fresh randomness."""

OverlayFactory = Callable[[Sequence[str]], Overlay]


@pytest.fixture
def lower(tmp_path: Path) -> str:
    """The conformance cases' lower tree (``cases.json``), freshly built under ``tmp_path``."""
    path = tmp_path / "lower"
    path.mkdir()
    build_lower(str(path), load_cases()["lower"])
    return str(path)


@pytest.fixture
def overlay_factory(tmp_path: Path) -> Iterator[OverlayFactory]:
    """Mount overlays over given lowers; each one is unmounted when the test ends."""
    with contextlib.ExitStack() as stack:
        count = 0

        def make(lowers: Sequence[str]) -> Overlay:
            nonlocal count
            count += 1
            base = tmp_path / f"ovl{count}"
            base.mkdir()
            return stack.enter_context(mount_overlay(str(base), lowers))

        yield make


__all__ = ["CASES_FILE", "OverlayFactory", "load_cases", "requires_overlay"]
