"""The NATS JetStream sink against real nats-server processes (single node and a cluster)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson
import pytest
from layerwatch_nats import NatsSink, subject_token
from natskit import (
    MOUNTS,
    Server,
    batches,
    build_records,
    change_list_records,
    deliver,
    free_port,
    readme_example,
)

from watcher.errors import ConfigError, SinkUnavailable
from watcher.events import Record


@dataclass(frozen=True)
class Stored:
    """One message as the stream holds it."""

    subject: str
    msg_id: str
    body: bytes


async def read_stream(url: str, stream: str = "LAYERWATCH") -> list[Stored]:
    """Every message of ``stream``, in stream order."""
    nc = await nats.connect(servers=[url], connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            assert msg.subject is not None
            assert msg.headers is not None
            out.append(Stored(msg.subject, msg.headers["Nats-Msg-Id"], msg.data or b""))
        return out
    finally:
        await nc.close()


def assert_exactly_once_in_order(stored: Sequence[Stored], sent: Sequence[Record]) -> None:
    """Every sent record is stored once, with its body, and each mount's records in seq order."""
    ids = [item.msg_id for item in stored]
    assert len(ids) == len(set(ids)), "a record was stored twice"
    assert sorted(ids) == sorted(record.id for record in sent)
    by_id = {record.id: record for record in sent}
    for item in stored:
        assert item.body == by_id[item.msg_id].body
    for mount in (*MOUNTS, ""):
        order = [by_id[item.msg_id].seq for item in stored if by_id[item.msg_id].mount == mount]
        assert order == sorted(order), f"mount {mount!r} out of order"


@pytest.fixture
async def sink(nats_server: Server) -> AsyncIterator[NatsSink]:
    """An opened sink on the single server, with short ack timeouts."""
    sink = NatsSink("n", {"servers": nats_server.url, "ack_timeout": 2.0})
    await sink.open()
    yield sink
    await sink.close()


async def test_stream_arrives_complete_and_in_order_per_mount(
    sink: NatsSink, nats_server: Server
) -> None:
    """A stream of batches is stored whole, each record on its mount's subject, once, in order."""
    sent = build_records(600)
    for batch in batches(sent, 64):
        await sink.send(batch)
    stored = await read_stream(nats_server.url)
    assert_exactly_once_in_order(stored, sent)
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


async def test_retried_batch_is_not_doubled(sink: NatsSink, nats_server: Server) -> None:
    """Sending the same batch again adds nothing: JetStream dedupes by Nats-Msg-Id."""
    sent = build_records(100)
    await sink.send(sent)
    await sink.send(sent)
    await sink.send(sent[40:60])
    assert_exactly_once_in_order(await read_stream(nats_server.url), sent)


async def test_open_creates_the_stream_and_accepts_an_existing_one(nats_server: Server) -> None:
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
    await first.open()
    await second.open()
    try:
        nc = await nats.connect(servers=[nats_server.url])
        info = await nc.jetstream().stream_info("LW2")
        await nc.close()
        assert info.config.subjects == ["lw2.>"]
        assert info.config.duplicate_window == 30
        await first.send(build_records(10))
        await second.send(build_records(10))
        stored = await read_stream(nats_server.url, "LW2")
        assert len(stored) == 10
        assert {item.subject for item in stored} == {"lw2.web", "lw2.db%2Emain", "lw2.cach%C3%A9"}
    finally:
        await first.close()
        await second.close()


async def test_unreachable_server_is_unavailable() -> None:
    """open() against a port nobody listens on raises SinkUnavailable and reports unhealthy."""
    sink = NatsSink("n", {"servers": f"nats://127.0.0.1:{free_port()}", "connect_timeout": 1})
    with pytest.raises(SinkUnavailable):
        await sink.open()
    assert not sink.health().ok
    with pytest.raises(SinkUnavailable):
        await sink.send(build_records(1))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bogus": 1}, "sinks.n.bogus"),
        ({"window": 0}, "sinks.n.window"),
        ({"subject": "x.{nope}"}, "sinks.n.subject"),
        ({"subject": "x.fixed"}, "sinks.n.subject"),
        ({"servers": []}, "sinks.n.servers"),
        ({"duplicate_window": 0}, "sinks.n.duplicate_window"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    """A bad or unknown option is a ConfigError naming sinks.NAME.OPTION."""
    with pytest.raises(ConfigError) as info:
        NatsSink("n", options)
    assert info.value.key == key


def test_subject_token_is_reversible_and_safe() -> None:
    """Mount names become one subject token with no separators or wildcards, injectively."""
    names = ["a.b", "a%2Eb", "a b", "*", ">", "ünï", "a_b-c"]
    tokens = [subject_token(name) for name in names]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert not set(token) & set(".*> \t")
    assert subject_token("a_b-c") == "a_b-c"


async def test_server_killed_mid_stream_loses_and_doubles_nothing(
    sink: NatsSink, nats_server: Server
) -> None:
    """SIGKILL and restart of the server mid-stream: retries store every record exactly once."""
    sent = build_records(1000)
    progress = asyncio.Event()
    failed = asyncio.Event()
    failures = 0

    async def chaos() -> None:
        await progress.wait()
        nats_server.kill()
        await failed.wait()
        await asyncio.to_thread(nats_server.start)

    chaos_task = asyncio.create_task(chaos())
    for index, batch in enumerate(batches(sent, 25)):
        if index == 10:
            progress.set()
        failures += await deliver(sink, batch, on_failure=failed.set)
    await chaos_task
    assert failures >= 1, "the outage was not observed"
    assert_exactly_once_in_order(await read_stream(nats_server.url), sent)


async def _open_when_ready(sink: NatsSink, deadline: float = 30.0) -> None:
    give_up = time.monotonic() + deadline
    while True:
        try:
            await sink.open()
            return
        except SinkUnavailable:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.2)


async def test_cluster_leader_killed_mid_stream_loses_nothing(nats_cluster: list[Server]) -> None:
    """Three-node cluster, replicas 3: killing the stream leader mid-stream loses no record."""
    urls = [server.url for server in nats_cluster]
    sink = NatsSink("n", {"servers": urls, "replicas": 3, "ack_timeout": 2.0})
    await _open_when_ready(sink)
    try:
        nc = await nats.connect(servers=urls)
        info = await nc.jetstream().stream_info("LAYERWATCH")
        await nc.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        leader = next(
            s
            for s in nats_cluster
            if s.argv[s.argv.index("--server_name") + 1] == info.cluster.leader
        )
        sent = build_records(800)
        failures = 0
        for index, batch in enumerate(batches(sent, 25)):
            if index == 8:
                leader.kill()
            failures += await deliver(sink, batch)
        assert failures >= 1, "the leader's death was not observed"
        survivor = next(s for s in nats_cluster if s is not leader)
        assert_exactly_once_in_order(await read_stream(survivor.url), sent)
    finally:
        await sink.close()


async def test_readme_consumer_rebuilds_the_change_lists(
    sink: NatsSink, nats_server: Server
) -> None:
    """The README's consumer example rebuilds every mount's change list from the stream."""
    sent, expected = change_list_records()
    await sink.send(sent[:7])
    await sink.send(sent)
    rebuild = readme_example(Path(__file__).parents[1] / "README.md")["rebuild"]
    assert await rebuild([nats_server.url]) == expected
