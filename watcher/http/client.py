"""The HTTP client of a running service: its status, its change lists, its event stream.

The only module that uses aiohttp's *client*; its errors leave as ``ServerError``. A server is
a URL (``http://127.0.0.1:8421``) or the path of the API's unix socket (the default,
``/run/layerwatch/api.sock``). The commands that use it are in ``watcher.cli.remote``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import IO, Any, BinaryIO, Final

import aiohttp

from watcher.core.errors import LayerwatchError
from watcher.core.model import Change, Kind
from watcher.service.config import DEFAULT_SOCKET

__all__ = ["ServerError", "fetch_changes", "fetch_changes_since", "row_path", "status", "tail"]

_RETRY_CAP: Final = 10.0
_NO_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_read=None)


class ServerError(LayerwatchError):
    """The API server cannot be reached, or answered with an error."""


@contextlib.asynccontextmanager
async def _session(server: str | None, token: str | None) -> AsyncIterator[aiohttp.ClientSession]:
    server = server or str(DEFAULT_SOCKET)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if server.startswith(("http://", "https://")):
        session = aiohttp.ClientSession(server.rstrip("/"), headers=headers)
    else:
        path = server.removeprefix("unix:")
        session = aiohttp.ClientSession(
            "http://layerwatch", headers=headers, connector=aiohttp.UnixConnector(path=path)
        )
    async with session:
        try:
            yield session
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerError(f"cannot reach the API at {server}: {exc}") from exc


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        await _check(resp)
        return await resp.json()


async def _check(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        message = (await resp.json())["error"]
    except (aiohttp.ContentTypeError, ValueError, KeyError, TypeError):
        message = (await resp.text())[:200]
    raise ServerError(f"the API answered {resp.status}: {message}")


async def fetch_changes(server: str | None, token: str | None, mount: str | None) -> list[Change]:
    """A mount's change list after a sync barrier (``mount`` may be omitted if there is one).

    Raises:
        ServerError: unreachable, or the API refused (unknown mount, ...).
    """
    body = await _changes(server, token, mount, "")
    return [Change(row_path(row), Kind(row["kind"])) for row in body["changes"]]


async def fetch_changes_since(
    server: str | None, token: str | None, mount: str | None, since: str
) -> dict[str, Any]:
    """What changed in a mount after position ``since`` (``SEQ`` or ``EPOCH:SEQ``), after a
    sync barrier: the API's answer as is (``docs/api.md``).

    Raises:
        ServerError: unreachable, or the API refused (unknown mount, a position it no longer
            keeps: 410, ...).
    """
    answer: dict[str, Any] = await _changes(server, token, mount, f"&since={since}")
    return answer


async def _changes(server: str | None, token: str | None, mount: str | None, query: str) -> Any:
    async with _session(server, token) as session:
        if mount is None:
            names = [m["name"] for m in (await _get_json(session, "/v1/mounts"))["mounts"]]
            if len(names) != 1:
                raise ServerError(f"name the mount: the service follows {', '.join(names)}")
            mount = names[0]
        return await _get_json(session, f"/v1/mounts/{mount}/changes?sync=1{query}")


def row_path(row: Mapping[str, Any]) -> bytes:
    """The path of an API row (``path``, or ``path_b64`` for a name that is not UTF-8)."""
    return os.fsencode(row["path"]) if "path" in row else _b64(row["path_b64"])


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


async def status(server: str | None, token: str | None, *, out: IO[str]) -> int:
    """Print health and the mounts; 0 when healthy, 2 when degraded.

    Raises:
        ServerError: unreachable, or the API refused.
    """
    async with _session(server, token) as session:
        async with session.get("/healthz") as resp:
            if resp.status not in (200, 503):
                await _check(resp)
            health = await resp.json()
        mounts = (await _get_json(session, "/v1/mounts"))["mounts"]
    out.write(f"service: {health['status']} (head seq {health['head_seq']})\n")
    for reason in health["reasons"]:
        out.write(f"  degraded: {reason}\n")
    width = max([len(m["name"]) for m in mounts] + [5])
    out.write(f"{'MOUNT':<{width}}  {'ENTRIES':>7}  {'A':>5} {'C':>5} {'D':>5}  WATCHES  STATE\n")
    for m in mounts:
        c = m["counts"]
        state = f"degraded: {m['degraded']}" if m["degraded"] else "ok"
        out.write(
            f"{m['name']:<{width}}  {m['entries']:>7}  {c['A']:>5} {c['C']:>5} {c['D']:>5}  "
            f"{m['watches']:>7}  {state}\n"
        )
    out.flush()
    return 0 if health["status"] == "ok" else 2


async def tail(
    server: str | None,
    token: str | None,
    out: BinaryIO,
    *,
    since: int | None = None,
    mount: str | None = None,
    limit: int | None = None,
) -> None:
    """Write the event stream to ``out`` as JSON lines; reconnect and resume on a disconnect.

    Args:
        since: start after this sequence number (default: live events only).
        mount: only this mount's events (and service-wide ones).
        limit: stop after this many events (default: run until cancelled).

    Raises:
        ServerError: the API refused the request (a lost connection is retried instead).
    """
    last = None if since is None else str(since)  # then the server's ids: EPOCH:SEQ
    written = 0
    delay = 0.2
    query = f"?mount={mount}" if mount else ""
    while limit is None or written < limit:
        headers = {"Last-Event-ID": last} if last is not None else {}
        try:
            async with (
                _session(server, token) as session,
                session.get(f"/v1/events{query}", headers=headers, timeout=_NO_TIMEOUT) as r,
            ):
                await _check(r)
                delay = 0.2
                pending: str | None = None  # an event's id counts once its frame is whole
                async for line in r.content:
                    if line.startswith(b"id: "):
                        pending = line[4:].strip().decode("ascii", "replace")
                    elif line.startswith(b"data: "):
                        out.write(line[6:].rstrip(b"\n") + b"\n")
                        out.flush()
                        written += 1
                        if pending is not None:
                            last, pending = pending, None
                        if limit is not None and written >= limit:
                            return
        except ServerError as exc:
            if not isinstance(exc.__cause__, aiohttp.ClientError | OSError):
                raise
            print(f"layerwatch: {exc}; retrying in {delay:g} s", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, _RETRY_CAP)
