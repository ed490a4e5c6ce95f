"""Values that come from outside the config file: ``${VAR}`` references and ``*_file`` keys.

A string value that accepts references may hold ``${VAR}`` (the variable's value; unset or
empty is an error), ``${VAR:-default}`` (the default when unset or empty) and ``$$`` (a
literal ``$``); any other ``$`` is kept as written. A key ``KEY_file`` holds the path of a
file whose content, less one trailing newline, is the value of ``KEY``; its path may itself
hold references (``${CREDENTIALS_DIRECTORY}/token``). ``docs/configuration.md`` lists the keys
that accept each form.

What was read from the environment or a file into a secret-bearing key is remembered by a
:class:`Secrets`, which blanks it out of any text about to be shown (logs, ``layerwatch
check``, health reasons). No error raised here holds a value that was read.

Example:
    >>> secrets = Secrets()
    >>> expand("sinks.hook.url", "https://${HOST}/x?q=$$1", {"HOST": "example.org"}, secrets)
    'https://example.org/x?q=$1'
    >>> secrets.redact("POST https://example.org/x failed")
    'POST https://***/x failed'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from watcher.core.errors import ConfigError

__all__ = ["FILE_SUFFIX", "MASK", "Secrets", "expand", "read_file"]

FILE_SUFFIX: Final = "_file"
"""``KEY_file`` gives ``KEY`` the content of a file."""

MASK: Final = "***"
"""What a secret is replaced with in text that is shown."""

MIN_REDACTED: Final = 4
"""Shorter values are not blanked out: they would blank out unrelated text (and a secret of
three characters protects nothing)."""

MAX_FILE_BYTES: Final = 64 * 1024
"""A ``*_file`` larger than this is refused: a secret, not a data file or a device."""

_REFERENCE: Final = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{))")


class Secrets:
    """The values read from the environment or from files into secret-bearing keys.

    :meth:`redact` replaces each of them (longest first) with ``***`` in a text.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, value: str) -> None:
        """Remember ``value`` (values shorter than ``MIN_REDACTED`` are not redacted)."""
        if len(value) >= MIN_REDACTED:
            self._values.add(value)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def redact(self, text: str) -> str:
        """``text`` with every remembered value replaced by ``***``."""
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text


def expand(key: str, value: str, env: Mapping[str, str], secrets: Secrets | None = None) -> str:
    """``value`` with its ``${VAR}``, ``${VAR:-default}`` and ``$$`` references resolved.

    Args:
        key: the config key, for errors (``sinks.bus.url``).
        value: the string as written in the file.
        env: the environment variables.
        secrets: where to remember what was taken from ``env`` (None: not a secret).

    Raises:
        ConfigError: naming ``key`` and the variable, when it is unset or empty and has no
            default, or when a ``${`` does not start a well-formed reference.
    """

    def resolve(match: re.Match[str]) -> str:
        dollar, name, default, broken = match.groups()
        if dollar:
            return "$"
        if broken:
            raise ConfigError(
                key,
                "'${' starts no reference: write ${NAME} or ${NAME:-default} (NAME: letters, "
                "digits, '_'), or $$ for a literal '$'",
            )
        found = env.get(name, "")
        if not found:
            if default is None:
                state = "empty" if name in env else "not set"
                raise ConfigError(key, f"environment variable {name} is {state}")
            return default
        if secrets is not None:
            secrets.add(found)
        return found

    return _REFERENCE.sub(resolve, value)


def read_file(key: str, path: str, secrets: Secrets | None = None) -> str:
    """The content of the file ``path`` named by ``key``, less one trailing newline.

    Args:
        key: the ``*_file`` key, for errors (``api.token_file``).
        path: an absolute path.
        secrets: where to remember the content (None: not a secret).

    Raises:
        ConfigError: naming ``key`` and ``path``, when the path is relative, or the file is
            unreadable, too large, not UTF-8 or empty. The content is never in the message.
    """
    if not path.startswith("/"):
        raise ConfigError(key, f"must be an absolute path, got {path!r}")
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(key, f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"{path} is not UTF-8 text (byte {exc.start})") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(key, f"{path} is empty")
    if secrets is not None:
        secrets.add(text)
    return text
