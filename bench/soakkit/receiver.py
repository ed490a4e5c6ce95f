"""The webhook receiver: an aiohttp server on 127.0.0.1 that answers the webhook sink the way
the harness tells it to (``mode``): ``ok`` (200, the batch is kept), ``500``, ``429`` (with
``Retry-After``) or ``timeout`` (answers only after the sink's timeout has passed). Only batches
answered 200 count as delivered; they are read back through ``read()`` like any output."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

import orjson
from aiohttp import web

from watcher.testing import free_port

__all__ = ["MODES", "Receiver"]

MODES: Final = ("ok", "500", "429", "timeout")


class Receiver:
    """The webhook sink's destination.

    Args:
        name: the sink's name (for the output's ``name``).
        slow: seconds a ``timeout`` answer waits (longer than the sink's timeout).
        retry_after: the ``Retry-After`` seconds of a 429.
    """

    def __init__(self, name: str, *, slow: float, retry_after: int = 1) -> None:
        self.name = name
        self.mode = "ok"
        self.slow = slow
        self.retry_after = retry_after
        self.port = free_port()
        self.answers: dict[str, int] = {}
        self._bodies: deque[bytes] = deque()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where the sink posts."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _hook(self, request: web.Request) -> web.Response:
        mode = self.mode
        self.answers[mode] = self.answers.get(mode, 0) + 1
        body = await request.read()
        if mode == "500":
            return web.Response(status=500, text="soak: injected failure")
        if mode == "429":
            return web.Response(status=429, headers={"Retry-After": str(self.retry_after)})
        if mode == "timeout":
            await asyncio.sleep(self.slow)  # the sink gave up long ago: not delivered
            return web.Response(status=200)
        for event in orjson.loads(body):
            self._bodies.append(orjson.dumps(event))
        return web.Response(status=200)

    async def read(self) -> list[bytes]:
        """Events of the batches answered 200 since the last call."""
        out = list(self._bodies)
        self._bodies.clear()
        return out

    async def close(self) -> None:
        """Stop listening (a waiting ``timeout`` answer is cut off)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
