"""Change lists as the harness compares them: ``{path: kind}`` from the rows of
``layerwatch diff --json`` (or the API's), a fresh ``layerwatch diff`` of a mount, and what
differs between two lists."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson

from soakkit.rig import MountSpec

__all__ = ["diff", "difference", "rows"]


def rows(table: list[dict[str, Any]]) -> dict[bytes, str]:
    """``{path: kind}`` from ``layerwatch diff --json`` rows (or the API's)."""
    return {
        (row["path"].encode() if "path" in row else base64.b64decode(row["path_b64"])): row["kind"]
        for row in table
    }


async def diff(spec: MountSpec, layerwatch: str, attempts: int = 3) -> dict[bytes, str] | str:
    """``layerwatch diff`` of the mount, in a subprocess (the way an operator runs it); the
    error of the last attempt if every attempt failed."""
    error = ""
    for _ in range(attempts):
        proc = await asyncio.create_subprocess_exec(
            *spec.diff_argv(layerwatch),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(120):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode == 0:
            return rows(orjson.loads(out))
        error = err.decode(errors="replace").strip()[-500:]
        await asyncio.sleep(0.5)
    return error


def difference(got: dict[bytes, str], want: dict[bytes, str], a: str, b: str) -> str:
    """What differs between two lists, with the first few paths."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(p for p in set(got) & set(want) if got[p] != want[p])
    parts = [f"{a} has {len(got)} entries, {b} {len(want)}"]
    if missing:
        parts.append(f"{len(missing)} missing from {a} (e.g. {want[missing[0]]} {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} only in {a} (e.g. {got[extra[0]]} {extra[0]!r})")
    if wrong:
        p = wrong[0]
        parts.append(f"{len(wrong)} with another kind (e.g. {p!r}: {got[p]} vs {want[p]})")
    return "; ".join(parts)
