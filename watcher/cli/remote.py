"""The commands that talk to a running service: ``status``, ``tail`` and ``diff --server``.

The token for TCP comes from ``--token-file`` or the ``LAYERWATCH_TOKEN`` environment
variable, never from the command line (``ps`` shows that). aiohttp's client is imported only
when one of these commands runs. Their options are defined with the others in
``watcher.cli.main``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from watcher.core.errors import LayerwatchError
from watcher.core.model import Change

__all__ = ["diff", "diff_since", "status", "tail"]


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


def diff_since(args: argparse.Namespace) -> dict[str, Any]:
    """``layerwatch diff --server S --since N [MOUNT]``: what changed after N (the API's
    answer)."""
    from watcher.http.client import fetch_changes_since

    return asyncio.run(fetch_changes_since(args.server, _token(args), args.mountpoint, args.since))


def status(args: argparse.Namespace) -> int:
    """``layerwatch status``: print the service's health and mounts; its exit status."""
    from watcher.http.client import status

    return asyncio.run(status(args.server, _token(args), out=sys.stdout))


def tail(args: argparse.Namespace) -> int:
    """``layerwatch tail``: print the service's events as JSON lines until interrupted."""
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
