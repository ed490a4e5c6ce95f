"""The live page in real headless Chromium, driven over the DevTools protocol (aiohttp).

The service and its API run for real on TCP with a token; Chromium logs in through
``/?token=`` (the page then works from its HttpOnly cookie), and changes made on the mount
must show up in the tree and the feed without a reload. A screenshot is kept under the
test's tmp dir (its path is printed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
from overlay import requires_overlay
from test_api import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    requires_overlay,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
    ),
]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
)


class DevTools:
    """A minimal DevTools protocol client: send a command, await its answer."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._pending.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one command; its ``result``."""
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async with asyncio.timeout(20):
            answer = await future
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def close(self) -> None:
        """Stop reading."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _fresh_profile(profile: Path) -> BinaryIO:
    """Make the empty profile dir; the log file Chromium writes next to it."""
    profile.mkdir()
    return (profile.parent / "chromium.log").open("wb")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium with a fresh profile; DevTools attached to its first page."""
    assert CHROMIUM is not None
    log = _fresh_profile(profile)
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not port_file.exists() or not port_file.read_text().strip():
                assert proc.returncode is None, "chromium exited; see chromium.log"
                await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(30):
                while True:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                        pages = [t for t in await resp.json() if t["type"] == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.05)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                try:
                    yield tools
                finally:
                    await tools.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.close()


async def wait_for(tools: DevTools, expression: str, ok: Callable[[Any], bool]) -> Any:
    """Evaluate ``expression`` until ``ok(value)``; the last value (20 s at most)."""
    value = None
    try:
        async with asyncio.timeout(20):
            while True:
                value = await tools.evaluate(expression)
                if ok(value):
                    return value
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"the page never showed it; last value: {value!r}") from None


TREE = """JSON.stringify(Object.fromEntries(
  Array.from(document.querySelectorAll('li[data-mount="m"]'))
       .map(li => [li.dataset.path, li.className])))"""
FEED = "document.getElementById('feed')?.innerText ?? ''"
CONN = "document.getElementById('conn')?.textContent"


async def test_a_change_on_the_mount_appears_on_the_page(tmp_path: Path) -> None:
    """The page shows the list as a tree and follows live changes (A, C, D) and the feed."""
    async with running(tmp_path, tcp=True) as run, chromium(tmp_path / "profile") as tools:
        (run.merged / "before.txt").write_text("x")
        await run.service.sync()
        await tools.send("Page.enable")
        await tools.send("Page.navigate", url=f"{run.url}/?token={run.token}")
        await wait_for(tools, CONN, lambda v: v == "live")
        tree = await wait_for(tools, TREE, lambda v: "/before.txt" in json.loads(v))
        assert json.loads(tree) == {"/before.txt": "kind-A"}
        # the token went into a cookie; it is not in the address bar
        assert run.token not in await tools.evaluate("location.href")

        (run.merged / "hello.txt").write_text("hi")
        (run.merged / "data" / "old.txt").write_text("changed")
        os.remove(run.merged / "etc" / "passwd")
        want = {
            "/before.txt": "kind-A",
            "/hello.txt": "kind-A",
            "/data": "kind-C",
            "/data/old.txt": "kind-C",
            "/etc": "kind-C",
            "/etc/passwd": "kind-D",
        }
        await wait_for(tools, TREE, lambda v: json.loads(v) == want)
        feed = await wait_for(tools, FEED, lambda v: "/etc/passwd" in v)
        assert "m A create /hello.txt" in feed
        assert "m D " in feed

        os.remove(run.merged / "before.txt")
        await wait_for(tools, TREE, lambda v: "/before.txt" not in json.loads(v))
        colour = await tools.evaluate(
            "getComputedStyle(document.querySelector("
            "'li[data-path=\"/hello.txt\"] .badge')).backgroundColor"
        )
        assert colour == "rgb(26, 127, 55)"  # A is green

        shot = await tools.send("Page.captureScreenshot", format="png")
        path = tmp_path / "live-page.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
        assert path.read_bytes().startswith(b"\x89PNG")
