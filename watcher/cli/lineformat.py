"""``diff --format``: one line per change from a template, in the spirit of ``docker ps --format``.

The syntax (a small subset of Go's ``text/template``, the subset ``docker ... --format`` users
reach for):

- ``{{.Kind}}``: ``A``, ``C`` or ``D``.
- ``{{.Path}}``: the path as the default output prints it (one line: backslash, control
  characters and invalid UTF-8 escaped as ``\\\\``, ``\\xNN``).
- ``{{json .Kind}}``, ``{{json .Path}}``: the same as a JSON string; ``{{json .}}``: the change
  as the JSON object ``diff --json`` prints (``path_b64`` for names that are not UTF-8).
- Spaces inside the braces are allowed (``{{ .Kind }}``); ``\\t`` and ``\\n`` in the template
  are a tab and a newline, as in docker's; any other text is printed as it is.

Each change prints the template followed by a newline. Anything else between ``{{`` and ``}}``
is an error naming the placeholder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from watcher.core.errors import LayerwatchError
from watcher.core.model import Change

__all__ = ["LineFormat", "change_line", "escape_path"]

_CONTROL: Final = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}
_ACTION: Final = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_FIELD: Final = re.compile(r"\s*(json\s+)?\.(\w*)\s*")


def escape_path(path: bytes) -> str:
    """A path as one printable line: backslash, control characters and invalid UTF-8 escaped."""
    text = path.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL)


_NEEDS_ESCAPE: Final = re.compile(rb"[\x00-\x1f\x7f-\xff\\]")
"""A byte ``escape_path`` may change: a path without one is printed as it is."""


def change_line(change: Change) -> bytes:
    """``K /path`` and a newline, the way ``docker diff`` prints a change; a path that needs
    no escape is not decoded at all (half the time of a 101k-line list)."""
    if _NEEDS_ESCAPE.search(change.path) is None:
        return b"%s %s\n" % (change.kind.value.encode(), change.path)
    return f"{change.kind} {escape_path(change.path)}\n".encode()


def _json_string(text: str) -> str:
    import orjson

    return orjson.dumps(text).decode()


def _json_change(change: Change) -> str:
    import orjson

    from watcher.delivery.events import path_fields

    return orjson.dumps({"kind": str(change.kind), **path_fields(change.path)}).decode()


_FIELDS: Final[dict[tuple[bool, str], Callable[[Change], str]]] = {
    (False, "Kind"): lambda c: str(c.kind),
    (False, "Path"): lambda c: escape_path(c.path),
    (True, "Kind"): lambda c: _json_string(str(c.kind)),
    (True, "Path"): lambda c: _json_string(escape_path(c.path)),
    (True, ""): _json_change,
}


class LineFormat:
    """A parsed ``--format`` template.

    Args:
        template: The template text (see the module's docstring for the syntax).

    Raises:
        LayerwatchError: a placeholder is unknown or a ``{{`` is never closed.

    Example:
        >>> from watcher.core.model import Kind
        >>> LineFormat("{{.Kind}}\\t{{.Path}}").render(Change(b"/etc/hosts", Kind.CHANGED))
        'C\\t/etc/hosts\\n'
    """

    def __init__(self, template: str) -> None:
        template = template.replace("\\t", "\t").replace("\\n", "\n")
        self._parts: list[str | Callable[[Change], str]] = []
        pos = 0
        for match in _ACTION.finditer(template):
            self._parts.append(template[pos : match.start()])
            self._parts.append(self._field(match.group(1)))
            pos = match.end()
        rest = template[pos:]
        if "{{" in rest:
            raise LayerwatchError(f"--format: a '{{{{' is not closed: {rest!r}")
        self._parts.append(rest)

    @staticmethod
    def _field(action: str) -> Callable[[Change], str]:
        match = _FIELD.fullmatch(action)
        func = _FIELDS.get((bool(match.group(1)), match.group(2))) if match else None
        if func is None:
            raise LayerwatchError(
                f"--format: unknown placeholder {{{{{action}}}}}; use {{{{.Kind}}}}, "
                "{{.Path}}, {{json .Kind}}, {{json .Path}} or {{json .}}"
            )
        return func

    def render(self, change: Change) -> str:
        """The line for ``change``, newline included."""
        return "".join(p if isinstance(p, str) else p(change) for p in self._parts) + "\n"
