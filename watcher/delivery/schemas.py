"""The JSON Schemas of the events: the ``data`` of each type, and the envelope.

The schema files (draft 2020-12) ship in the package, in ``watcher/delivery/schema/``; the
tests validate events from real runs against them (``docs/events.md``).
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Final

from watcher.core.model import BOOKMARK, CHANGE, GAP, RESYNC, SNAPSHOT_BEGIN, SNAPSHOT_END

__all__ = ["SCHEMA_FILES", "schema_for"]

SCHEMA_FILES: Final = {
    CHANGE: "change.json",
    SNAPSHOT_BEGIN: "snapshot.begin.json",
    SNAPSHOT_END: "snapshot.end.json",
    RESYNC: "resync.json",
    BOOKMARK: "bookmark.json",
    GAP: "gap.json",
}
"""The schema file (in ``watcher/delivery/schema/``) of each event type's ``data``."""


def schema_for(event_type: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``data`` for ``event_type``, or of the envelope.

    Args:
        event_type: a CloudEvents ``type`` (``io.layerwatch.change``, ...) or ``"envelope"``.

    Raises:
        KeyError: an unknown event type.
    """
    name = "envelope.json" if event_type == "envelope" else SCHEMA_FILES[event_type]
    text = importlib.resources.files("watcher.delivery").joinpath("schema", name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
