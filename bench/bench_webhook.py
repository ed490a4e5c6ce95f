"""Throughput of the webhook sink in its three modes against a real HTTP receiver.

A receiver process (aiohttp, on a free 127.0.0.1 port) reads each request's body and answers
204. The sink sends ``--events`` change events (about 480 bytes each) in runner batches of
``--batch``, signed with two secrets (rotation: two HMACs per request). The **baseline** runs
in the same run against the same receiver: one plain aiohttp session posting the same bodies
(the batch array, or each event's JSON) one request at a time, unsigned, without ``ce-`` or
``webhook-`` headers. Sink and baseline runs alternate, so a load change hits both. Printed
per mode: the median events/s of the runs and the median of the per-run ratios sink/baseline.

Run: ``python bench/bench_webhook.py [--events N] [--runs R] [--batch B]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import socket
import statistics
import sys
import time
from collections.abc import Sequence

import aiohttp
import structlog

from watcher.delivery.builtin.webhook import WebhookSink
from watcher.delivery.events import Record
from watcher.testing import make_records

SECRETS = [
    "whsec_" + base64.b64encode(b"the current key, 32 bytes long..").decode(),
    "whsec_" + base64.b64encode(b"the previous key, still accepted").decode(),
]
RECEIVER = """
import socket, sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/hook", ok)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
web.run_app(app, sock=sock, print=None, access_log=None)
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int) -> None:
    """Return once something accepts connections on ``port`` (10 s at most)."""
    for _ in range(1000):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the receiver did not start")


async def run_sink(url: str, mode: str, batches: Sequence[Sequence[Record]]) -> float:
    """Seconds the sink takes to send every batch (open and close outside the clock)."""
    sink = WebhookSink("bench", {"url": url, "mode": mode, "secrets": SECRETS})
    await sink.open()
    try:
        started = time.perf_counter()
        for batch in batches:
            await sink.send(batch)
        return time.perf_counter() - started
    finally:
        await sink.close()


async def run_baseline(url: str, mode: str, batches: Sequence[Sequence[Record]]) -> float:
    """Seconds a plain aiohttp session takes to post the same bodies, unsigned."""
    if mode == "batch":
        bodies = [b"[" + b",".join(r.body for r in batch) + b"]" for batch in batches]
    else:
        bodies = [r.body for batch in batches for r in batch]
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        for body in bodies:
            async with session.post(url, data=body) as response:
                await response.read()
                assert response.status == 204
        return time.perf_counter() - started


async def main(events: int, runs: int, batch: int) -> None:
    """Measure each mode against its baseline and print a table."""
    port = free_port()
    receiver = await asyncio.create_subprocess_exec(sys.executable, "-c", RECEIVER, str(port))
    try:
        await wait_listening(port)
        url = f"http://127.0.0.1:{port}/hook"
        print("| mode | sink events/s | baseline events/s | ratio |")
        print("|---|---:|---:|---:|")
        for mode in ("batch", "structured", "binary"):
            rates: list[float] = []
            base_rates: list[float] = []
            ratios: list[float] = []
            for run in range(runs):
                records = make_records(run * events + 1, events)
                batches = [records[i : i + batch] for i in range(0, events, batch)]
                base = await run_baseline(url, mode, batches)
                sink = await run_sink(url, mode, batches)
                rates.append(events / sink)
                base_rates.append(events / base)
                ratios.append(base / sink)
            print(
                f"| {mode} | {statistics.median(rates):,.0f} | "
                f"{statistics.median(base_rates):,.0f} | {statistics.median(ratios):.2f} |"
            )
    finally:
        receiver.terminate()
        await receiver.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(args.events, args.runs, args.batch))
