"""The NATS JetStream sink against real nats-server processes (single node and a cluster)."""

from __future__ import annotations

from pathlib import Path

import nats
import orjson
import pytest
from layerwatch_nats import NatsSink, subject_token
from natskit import NatsServer, check_stored, read_stream

from watcher import testing


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
