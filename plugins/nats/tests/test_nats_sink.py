"""The NATS JetStream sink against real nats-server processes (single node and a cluster)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats
import orjson
import pytest
from layerwatch_nats import NatsSink, event_id, subject_token
from nats.js.api import StreamConfig
from natskit import NatsServer, check_stored, read_stream

from watcher import testing
from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import EventEncoder, Record


async def test_stream_arrives_complete_and_in_order_per_mount(
    sink: NatsSink, nats_server: NatsServer
) -> None:
    """A stream of batches is stored whole, each record on its mount's subject, once, in order."""
    sent = testing.mixed_records(600)
    await testing.send_stream(sink, sent)
    stored = await read_stream(nats_server.url)
    check_stored(stored, sent)
    by_id = {record.id: record for record in sent}
    subjects = {item.subject for item in stored}
    assert subjects == {
        "layerwatch.web",
        "layerwatch.db%2Emain",
        "layerwatch.cach%C3%A9",
        "layerwatch._service",
    }
    for item in stored:
        assert item.subject == sink.subject(by_id[item.msg_id].mount)
        assert orjson.loads(item.body)["id"] == item.msg_id
    assert sink.health().ok


async def test_retried_batch_is_not_doubled(sink: NatsSink, nats_server: NatsServer) -> None:
    """Sending the same batch again adds nothing: JetStream dedupes by Nats-Msg-Id."""
    sent = testing.mixed_records(100)
    await sink.send(sent)
    await sink.send(sent)
    await sink.send(sent[40:60])
    check_stored(await read_stream(nats_server.url), sent)


async def test_open_creates_the_stream_and_accepts_an_existing_one(
    nats_server: NatsServer,
) -> None:
    """open() creates the stream with the configured window; a second sink reuses it."""
    options = {
        "servers": [nats_server.url],
        "stream": "LW2",
        "subjects": ["lw2.>"],
        "subject": "lw2.{mount}",
        "service_subject": "lw2.all",
        "duplicate_window": 30,
    }
    first, second = NatsSink("a", options), NatsSink("b", options)
    async with testing.opened(first), testing.opened(second):
        nc = await nats.connect(servers=[nats_server.url])
        info = await nc.jetstream().stream_info("LW2")
        await nc.close()
        assert info.config.subjects == ["lw2.>"]
        assert info.config.duplicate_window == 30
        await first.send(testing.mixed_records(10))
        await second.send(testing.mixed_records(10))
        stored = await read_stream(nats_server.url, "LW2")
        assert len(stored) == 10
        assert {item.subject for item in stored} == {"lw2.web", "lw2.db%2Emain", "lw2.cach%C3%A9"}


async def test_unreachable_server_is_unavailable() -> None:
    """open() and send() against a port nobody listens on raise SinkUnavailable; unhealthy."""
    url = f"nats://127.0.0.1:{testing.free_port()}"
    await testing.check_unreachable(NatsSink("n", {"servers": url, "connect_timeout": 1}))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bogus": 1}, "sinks.n.bogus"),
        ({"window": 0}, "sinks.n.window"),
        ({"subject": "x.{nope}"}, "sinks.n.subject"),
        ({"subject": "x.fixed"}, "sinks.n.subject"),
        ({"servers": []}, "sinks.n.servers"),
        ({"duplicate_window": 0}, "sinks.n.duplicate_window"),
        ({"ordered": "yes"}, "sinks.n.ordered"),
        ({"subject": "a b.{mount}"}, "sinks.n.subject"),
        ({"service_subject": "all\r\nPUB x 1"}, "sinks.n.service_subject"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    """A bad or unknown option is a ConfigError naming sinks.NAME.OPTION."""
    testing.check_option_error(NatsSink, "n", options, key)


def test_subject_token_is_reversible_and_safe() -> None:
    """Mount names become one subject token with no separators or wildcards, injectively."""
    names = ["a.b", "a%2Eb", "a b", "*", ">", "ünï", "a_b-c"]
    tokens = [subject_token(name) for name in names]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert not set(token) & set(".*> \t")
    assert subject_token("a_b-c") == "a_b-c"


async def test_server_killed_mid_stream_loses_and_doubles_nothing(
    sink: NatsSink, nats_server: NatsServer
) -> None:
    """SIGKILL and restart of the server mid-stream: retries store every record exactly once."""
    sent = testing.mixed_records(1000)
    failures = await testing.deliver_through_restart(sink, nats_server, sent)
    assert failures >= 1, "the outage was not observed"
    check_stored(await read_stream(nats_server.url), sent)


async def test_server_killed_mid_batch_fails_it_and_the_retry_stores_each_once(
    nats_server: NatsServer,
) -> None:
    """One batch pipelined over many windows, the server SIGKILLed while part of it is stored:
    send raises SinkUnavailable (acks are missing), and the same batch sent again after the
    restart leaves every record in the stream once, each mount in order."""
    sent = testing.mixed_records(3000)
    options = {"servers": nats_server.url, "ack_timeout": 2.0, "window": 64}
    async with testing.opened(NatsSink("n", options)) as sink:
        watcher = await nats.connect(servers=[nats_server.url], allow_reconnect=False)
        seen = asyncio.Event()
        count = 0

        async def on_message(msg: object) -> None:
            nonlocal count
            count += 1
            if count == 500:
                seen.set()

        await watcher.subscribe("layerwatch.>", cb=on_message)
        sending = asyncio.create_task(sink.send(sent))
        await seen.wait()
        nats_server.kill()
        await watcher.close()
        with pytest.raises(SinkUnavailable):
            await sending
        assert not sink.health().ok
        await asyncio.to_thread(nats_server.start)
        await testing.deliver(sink, sent)
        assert sink.health().ok
    check_stored(await read_stream(nats_server.url), sent)


async def test_send_returns_only_with_every_ack(nats_server: NatsServer) -> None:
    """With the server stopped (SIGSTOP) no ack comes: send raises SinkUnavailable after
    ack_timeout instead of returning. After SIGCONT the late acks of that attempt are not
    counted for the retry, which stores every record once."""
    sent = testing.mixed_records(300)
    options = {"servers": nats_server.url, "ack_timeout": 0.5, "window": 64}
    async with testing.opened(NatsSink("n", options)) as sink:
        await sink.send(sent[:100])
        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(SinkUnavailable, match="acks missing"):
                await sink.send(sent[100:])
            assert not sink.health().ok
        finally:
            os.kill(nats_server.proc.pid, signal.SIGCONT)
        await testing.deliver(sink, sent[100:])
        await sink.send(sent[100:])  # once more: every ack is a duplicate's
    check_stored(await read_stream(nats_server.url), sent)


def _with_big_record(size: int) -> list[Record]:
    """20 events whose 11th (a change of mount ``test``) has a body of more than ``size``."""
    big = testing.make_records(11, 1, stream="s", paths=[b"/" + b"x" * size])
    return [*testing.mixed_records(10), *big, *testing.mixed_records(9, start=12)]


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_refused_record_rejects_the_batch(nats_server: NatsServer, ordered: bool) -> None:
    """A record the stream refuses for good (over its max_msg_size) rejects the batch. With
    ordered, the records after it fail their Nats-Expected-Last-Msg-Id check and stay out of
    the stream, so what is stored is a prefix of the batch; without, they are stored."""
    nc = await nats.connect(servers=[nats_server.url])
    await nc.jetstream().add_stream(
        StreamConfig(
            name="LAYERWATCH", subjects=["layerwatch.>"], duplicate_window=120, max_msg_size=2000
        )
    )
    await nc.close()
    batch = _with_big_record(3000)
    options = {"servers": nats_server.url, "ack_timeout": 2.0, "ordered": ordered}
    async with testing.opened(NatsSink("n", options)) as sink:
        with pytest.raises(SinkRejected, match="err_code=10054"):
            await sink.send(batch)
        assert not sink.health().ok
    stored = [item.msg_id for item in await read_stream(nats_server.url)]
    expected = batch[:10] if ordered else batch[:10] + batch[11:]
    assert stored == [record.id for record in expected]


async def test_a_record_over_the_server_max_payload_is_rejected_unsent(
    sink: NatsSink, nats_server: NatsServer
) -> None:
    """A record larger than the server's max_payload (1 MiB) is rejected before it is
    written (the server would close the connection); the connection serves the next batch."""
    with pytest.raises(SinkRejected, match="too large"):
        await sink.send(_with_big_record(1_100_000))
    sent = testing.mixed_records(50, start=100)
    await sink.send(sent)
    check_stored(await read_stream(nats_server.url), sent)
    assert sink.health().ok


def test_event_id_reads_the_id_from_the_start_of_the_body() -> None:
    """event_id is record.id, also for ids with JSON escapes and for bodies in another order."""
    odd = EventEncoder(stream='we"ird\\ st\u00e9am', host="h", epoch=5)
    escaped = odd.control(1, "m", "io.layerwatch.gap", {"x": 1}, now=0.0)
    reordered = Record(7, "m", "t", orjson.dumps({"data": {"id": "no"}, "id": "s:1:7"}))
    records = [*testing.mixed_records(60), escaped, reordered]
    for record in records:
        assert event_id(record) == record.id
    assert event_id(escaped) == 'we"ird\\ st\u00e9am:5:1'
    assert event_id(reordered) == "s:1:7"


async def test_cluster_leader_killed_mid_stream_loses_nothing(
    nats_cluster: list[NatsServer],
) -> None:
    """Three-node cluster, replicas 3: killing the stream leader mid-stream loses no record."""
    urls = [server.url for server in nats_cluster]
    sink = NatsSink("n", {"servers": urls, "replicas": 3, "ack_timeout": 2.0})
    await testing.open_when_ready(sink)
    try:
        nc = await nats.connect(servers=urls)
        info = await nc.jetstream().stream_info("LAYERWATCH")
        await nc.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        leader = next(s for s in nats_cluster if s.server_name == info.cluster.leader)
        sent = testing.mixed_records(800)
        failures = 0
        for index, batch in enumerate(testing.batches(sent, 25)):
            if index == 8:
                leader.kill()
            failures += await testing.deliver(sink, batch)
        assert failures >= 1, "the leader's death was not observed"
        survivor = next(s for s in nats_cluster if s is not leader)
        check_stored(await read_stream(survivor.url), sent)
    finally:
        await sink.close()


async def test_readme_consumer_rebuilds_the_change_lists(
    sink: NatsSink, nats_server: NatsServer
) -> None:
    """The README's consumer example rebuilds every mount's change list from the stream."""
    expected = await testing.send_change_lists(sink)
    rebuild = testing.readme_example(Path(__file__).parents[1] / "README.md")["rebuild"]
    assert await rebuild([nats_server.url]) == expected
