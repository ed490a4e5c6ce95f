"""``layerwatch man``: the layerwatch(1) manual page in roff, generated from the parser.

Read it with ``layerwatch man | man -l -``; install it with
``layerwatch man > /usr/local/share/man/man1/layerwatch.1`` (see ``docs/operations.md``).
The page has no date, so the same version always renders the same page.
"""

from __future__ import annotations

import argparse

from watcher.cli import spec
from watcher.core.version import installed_version

__all__ = ["render"]

_EXIT_STATUS = (
    ("0", "Success; for diff --exit-code, no changes."),
    (
        "1",
        "An error (one line on stderr starting with layerwatch: error:), or diff --exit-code "
        "found changes; check: a finding is an error.",
    ),
    (
        "2",
        "A usage error; a container, image or layer name that is unknown or ambiguous (the "
        "message names the candidates); any error of diff --exit-code; status: the service is "
        "degraded.",
    ),
    ("141", "Standard output was closed early (a pipe into head)."),
)

_EXAMPLES = (
    (
        "Print what changed in a container, as docker diff does, running or stopped:",
        "layerwatch diff my-container",
    ),
    (
        "What the top layer of an image adds, changes and deletes:",
        "layerwatch diff --image busybox:latest --layer -1",
    ),
    (
        "Only the paths, tab-separated from their kind; fail a script when anything changed:",
        "layerwatch diff --exit-code --format '{{.Path}}\\t{{.Kind}}' my-container",
    ),
    ("Follow one overlay mount as JSON lines:", "layerwatch watch /mnt/merged"),
    ("Run the service:", "layerwatch run /etc/layerwatch/layerwatch.toml"),
)


def _text(text: str) -> str:
    """Text safe in roff: backslashes escaped, no line starting with a control character."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out.startswith((".", "'")) else out


def _bold(text: str) -> str:
    return f"\\fB{_text(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{_text(text)}\\fR"


def _synopsis(command: spec.Command) -> str:
    parts = [_bold(f"layerwatch {command.name}")]
    for option in command.options:
        if option.flags[0] in ("--help", "-h"):
            continue
        flag = _bold(option.flags[0])
        part = f"{flag} {_italic(option.metavar)}" if option.metavar else flag
        parts.append(f"[{part}]" + ("..." if option.repeat else ""))
    for position in command.positionals:
        name = _italic(position.metavar)
        parts.append(f"[{name}]" if position.optional else name)
    return " ".join(parts)


def _option(option: spec.Option) -> list[str]:
    flags = ", ".join(_bold(f) for f in option.flags)
    head = f"{flags} {_italic(option.metavar)}" if option.metavar else flags
    body = option.help
    if option.choices:
        body += f" (one of: {', '.join(option.choices)})"
    return [".TP", head, _text(body)]


def render(parser: argparse.ArgumentParser) -> str:
    """The manual page, section 1, as roff (``man -l`` or ``groff -man`` render it)."""
    top, commands = spec.read(parser)
    version = installed_version()
    lines = [
        f'.TH LAYERWATCH 1 "" "layerwatch {_text(version)}" "User Commands"',
        ".SH NAME",
        "layerwatch \\- live change lists of union filesystems (overlayfs, aufs)",
        ".SH SYNOPSIS",
        f"{_bold('layerwatch')} [{_bold('--version')}] {_italic('COMMAND')} "
        f"[{_italic('OPTIONS')}] [{_italic('ARGUMENTS')}]",
        ".SH DESCRIPTION",
        _text(parser.description or ""),
        "It keeps the change list of each writable branch (A added, C changed, D deleted: what "
        "docker diff prints) in step with inotify and publishes each change as a CloudEvents "
        "JSON event. Each command is described below; "
        f"{_bold('layerwatch')} {_italic('COMMAND')} {_bold('--help')} prints the same.",
        ".SH OPTIONS",
    ]
    for option in top:
        lines += _option(option)
    lines.append(".SH COMMANDS")
    for command in commands:
        lines += [f'.SS "{command.name}"', _synopsis(command), ".PP", _text(command.help)]
        for position in command.positionals:
            lines += [".TP", _italic(position.metavar), _text(position.help)]
        for option in command.options:
            if option.flags[0] != "--help":
                lines += _option(option)
    lines.append(".SH EXIT STATUS")
    for code, meaning in _EXIT_STATUS:
        lines += [".TP", _bold(code), _text(meaning)]
    lines.append(".SH EXAMPLES")
    for about, command_line in _EXAMPLES:
        lines += [".PP", _text(about), ".PP", ".RS", _bold(command_line), ".RE"]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        _bold("LAYERWATCH_TOKEN"),
        _text("The API token for status, tail and diff --server over TCP."),
        ".SH SEE ALSO",
        "docker-diff(1), inotify(7), mount(8)",
        "",
    ]
    return "\n".join(lines)
