"""The public conformance cases (``cases.json``), each on a real overlay mount.

Every case builds the shared lower tree, mounts overlayfs with an empty upper, runs the case's
shell ``ops`` in the merged root, and checks three answers against Docker's observed one:
``compute`` on the overlay-format upper, ``compute`` after converting upper and lower to aufs
format, and the two-tree oracle (which proves the oracle itself). ``compute`` runs twice, in
pure Python (the reference) and in C (``watcher.core._scan``, skipped when not built).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import CASES_FILE, load_cases
from oracle import changes_dirs, lines
from overlay import (
    mount_base,
    mount_overlay,
    requires_overlay,
    run_ops,
    to_aufs,
)

from watcher.core.model import Change
from watcher.core.native import scanner_type
from watcher.core.rules import compute

CASES = load_cases()
pytestmark = [requires_overlay, pytest.mark.root]


def _lines(changes: list[Change]) -> set[str]:
    """Render compute's answer as ``docker diff`` lines."""
    return {f"{c.kind.value} {os.fsdecode(c.path)}" for c in changes}


@pytest.fixture(params=CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One conformance case."""
    value: dict[str, Any] = request.param
    return value


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request: pytest.FixtureRequest) -> bool:
    """Which implementation of the rules ``compute`` runs: the Python reference or the C."""
    if request.param and scanner_type() is None:
        pytest.skip("the C scan (watcher.core._scan) is not built")
    value: bool = request.param
    return value


def test_case_matches_docker(
    case: dict[str, Any], lower: str, tmp_path: Path, native: bool
) -> None:
    """compute(), on overlay and aufs whiteouts, and the oracle all print Docker's answer."""
    expect = set(case["expect"])
    with mount_overlay(str(tmp_path), [lower]) as ovl:
        run_ops(ovl.merged, case["ops"])
        with mount_base([lower]) as base:
            oracle_answer = lines(changes_dirs(ovl.merged, base))
    assert oracle_answer == expect, "oracle disagrees with docker diff"

    assert _lines(compute(ovl.upper, [lower], native=native)) == expect, "overlay whiteouts"

    to_aufs(ovl.upper, root_metadata=True)
    to_aufs(lower)
    got = compute(ovl.upper, [lower], whiteouts="aufs", native=native)
    assert _lines(got) == expect, "aufs whiteouts"


def test_every_case_is_collected() -> None:
    """The cases file is present and non-empty, so a missing file cannot pass silently."""
    assert CASES["cases"], f"no conformance cases loaded (looked for {CASES_FILE})"


def test_case_matches_docker_userxattr(
    case: dict[str, Any], lower: str, tmp_path: Path, native: bool
) -> None:
    """With the ``userxattr`` mount option, opaque dirs read from ``user.overlay.*``."""
    with mount_overlay(str(tmp_path), [lower], options="userxattr,metacopy=off,index=off") as ovl:
        run_ops(ovl.merged, case["ops"])
        got = compute(ovl.upper, [lower], xattr_prefix=b"user.overlay.", native=native)
    assert _lines(got) == set(case["expect"])
