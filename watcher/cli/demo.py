"""``layerwatch demo``: mount a sample overlay, change it, and show the events live.

Everything happens in a temporary directory that is removed afterwards; the mount is always
unmounted. Events go to stdout as JSON lines; what the demo does goes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from watcher.core.mounts import Filesystem
from watcher.live.hub import Hub
from watcher.service.watch import StreamOutlet, watch

__all__ = ["run_demo"]

_SAMPLE = {
    "etc/motd": b"welcome\n",
    "etc/hostname": b"sample\n",
    "app/config.toml": b"debug = false\n",
    "app/static/index.html": b"<h1>hi</h1>\n",
    "app/static/logo.svg": b"<svg/>\n",
    "var/log/.keep": b"",
}


def _steps(root: str) -> list[tuple[str, Callable[[], None]]]:
    def at(path: str) -> str:
        return os.path.join(root, path)

    def write(path: str, data: bytes, mode: str = "wb") -> Callable[[], None]:
        def step() -> None:
            with open(at(path), mode) as f:
                f.write(data)

        return step

    def mkdir(path: str) -> Callable[[], None]:
        return lambda: os.makedirs(at(path))

    return [
        ("append to /etc/motd", write("etc/motd", b"have a nice day\n", "ab")),
        ("mkdir /app/cache", mkdir("app/cache")),
        ("create /app/cache/a.bin", write("app/cache/a.bin", b"x" * 64)),
        ("write /app/cache/a.bin again", write("app/cache/a.bin", b"y" * 64)),
        ("delete /etc/hostname", lambda: os.unlink(at("etc/hostname"))),
        ("rm -rf /app/static", lambda: shutil.rmtree(at("app/static"))),
        ("chmod 600 /app/config.toml", lambda: os.chmod(at("app/config.toml"), 0o600)),
        ("write /var/log/app.log", write("var/log/app.log", b"started\n")),
    ]


def _build_sample(lower: str) -> None:
    for rel, data in _SAMPLE.items():
        os.makedirs(os.path.dirname(os.path.join(lower, rel)), exist_ok=True)
        with open(os.path.join(lower, rel), "wb") as f:
            f.write(data)


def say(text: str) -> None:
    """Narrate on stderr (stdout carries the events)."""
    print(f"# {text}", file=sys.stderr, flush=True)


async def run_demo(*, pause: float = 0.3) -> int:
    """Run the demo; returns an exit status."""
    if os.geteuid() != 0:
        print("layerwatch demo mounts overlayfs: run it as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="layerwatch-demo-") as top:
        lower, rw, merged = (os.path.join(top, n) for n in ("lower", "rw", "merged"))
        _build_sample(lower)
        os.makedirs(rw)
        fs = Filesystem([lower], rw, merged)
        fs.mount()
        try:
            stop = asyncio.Event()
            hub_ready: asyncio.Future[Hub] = asyncio.get_running_loop().create_future()
            print(
                f"# mounted a sample overlay at {merged}; events follow on stdout", file=sys.stderr
            )
            task = asyncio.create_task(
                watch(
                    fs,
                    StreamOutlet(sys.stdout.buffer),
                    stop,
                    name="demo",
                    ready=hub_ready.set_result,
                )
            )
            await hub_ready
            for label, step in _steps(merged):
                say(label)
                step()
                await asyncio.sleep(pause)
            stop.set()
            await task
            say("the change list now (what `docker diff` would print):")
            for change in fs.changes():
                say(f"  {change.kind} {os.fsdecode(change.path)}")
        finally:
            fs.umount()
    return 0
