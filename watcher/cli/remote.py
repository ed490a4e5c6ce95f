"""The commands that talk to a running service: ``status``, ``tail`` and ``diff --server``.

The token for TCP comes from ``--token-file`` or the ``LAYERWATCH_TOKEN`` environment
variable, never from the command line (``ps`` shows that). aiohttp's client is imported only
when one of these commands runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watcher.core.errors import LayerwatchError
from watcher.core.model import Change
from watcher.service.config import DEFAULT_SOCKET

__all__ = ["add_remote_commands", "add_server_arguments", "diff"]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server URL|SOCKET`` and ``--token-file PATH``."""
    parser.add_argument(
        "--server",
        metavar="URL|SOCKET",
        help=f"the service's API: http://HOST:PORT or a unix socket (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding the API token (TCP); default: $LAYERWATCH_TOKEN",
    )


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise LayerwatchError(f"cannot read the token file: {exc.strerror}") from exc
    return os.environ.get("LAYERWATCH_TOKEN") or None


def diff(args: argparse.Namespace) -> list[Change]:
    """``layerwatch diff --server S [MOUNT]``: the list from a running service."""
    from watcher.http.client import fetch_changes

    return asyncio.run(fetch_changes(args.server, _token(args), args.mountpoint))


def _cmd_status(args: argparse.Namespace) -> int:
    from watcher.http.client import status

    return asyncio.run(status(args.server, _token(args), out=sys.stdout))


def _cmd_tail(args: argparse.Namespace) -> int:
    from watcher.http.client import tail

    token = _token(args)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            tail(
                args.server,
                token,
                sys.stdout.buffer,
                since=args.since,
                mount=args.mount,
                limit=args.count,
            )
        )
    return 0


def add_remote_commands(sub: Any) -> None:
    """Add ``status`` and ``tail`` to the CLI's subparsers (``add_subparsers()`` result)."""
    commands: Sequence[tuple[str, str, Any]] = (
        ("status", "health and mounts of a running service", _cmd_status),
        ("tail", "follow a running service's events as JSON lines", _cmd_tail),
    )
    parsers = {}
    for name, help_, func in commands:
        parser = sub.add_parser(name, help=help_, description=help_)
        add_server_arguments(parser)
        parser.set_defaults(func=func)
        parsers[name] = parser
    parsers["tail"].add_argument(
        "--since", type=int, metavar="SEQ", help="replay from after SEQ (default: live only)"
    )
    parsers["tail"].add_argument("--mount", metavar="NAME", help="only this mount's events")
    parsers["tail"].add_argument("--count", type=int, metavar="N", help="stop after N events")
