"""The command line as data, read from the argparse parser: what shell completion and the
manual page are generated from, so that neither can drift from the options that parse."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["Command", "Option", "Positional", "read"]


@dataclass(frozen=True, slots=True)
class Option:
    """One ``--option`` (or ``-o``) of a command.

    Attributes:
        flags: Its spellings, long first when it has one (``("--output", "-o")``).
        metavar: The name of its value (``DIR``), or None when it takes none.
        choices: The values it accepts, when argparse restricts them.
        repeat: Whether it may be given more than once (``action="append"``).
        help: Its help text.
    """

    flags: tuple[str, ...]
    metavar: str | None
    choices: tuple[str, ...]
    repeat: bool
    help: str

    @property
    def completes(self) -> str:
        """What a shell offers for its value: ``dir``, ``file``, ``choice`` or ``none``."""
        if self.choices:
            return "choice"
        if self.metavar == "DIR":
            return "dir"
        if self.metavar in ("PATH", "FILE", "OUTPUT", "URL|SOCKET"):
            return "file"
        return "none"


@dataclass(frozen=True, slots=True)
class Positional:
    """A positional argument: its name, whether it may be left out, its choices, its help."""

    metavar: str
    optional: bool
    choices: tuple[str, ...]
    help: str


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its name, one-line description, options and positionals."""

    name: str
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    return "" if text == argparse.SUPPRESS else " ".join(text.split())


def _option(action: argparse.Action) -> Option:
    flags = tuple(sorted(action.option_strings, key=lambda f: (not f.startswith("--"), f)))
    takes_value = action.nargs != 0
    metavar = None
    if takes_value:
        named = action.metavar if isinstance(action.metavar, str) else None
        metavar = named or action.dest.upper()
        if flags == ("--output", "-o"):
            metavar = "OUTPUT"
    return Option(
        flags=flags,
        metavar=metavar,
        choices=tuple(map(str, action.choices or ())),
        repeat=isinstance(action, argparse._AppendAction),
        help=_help(action),
    )


def _parts(parser: argparse.ArgumentParser) -> tuple[tuple[Option, ...], tuple[Positional, ...]]:
    options, positionals = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            options.append(_option(action))
        else:
            named = action.metavar if isinstance(action.metavar, str) else None
            positionals.append(
                Positional(
                    metavar=named or action.dest.upper(),
                    optional=action.nargs == "?",
                    choices=tuple(map(str, action.choices or ())),
                    help=_help(action),
                )
            )
    return tuple(options), tuple(positionals)


def read(parser: argparse.ArgumentParser) -> tuple[tuple[Option, ...], list[Command]]:
    """The top-level options and the subcommands of ``parser``, in definition order."""
    top, _ = _parts(parser)
    commands = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: _help(a) for a in action._choices_actions}
        for name, sub in action.choices.items():
            options, positionals = _parts(sub)
            commands.append(Command(name, helps.get(name, ""), options, positionals))
    return top, commands
