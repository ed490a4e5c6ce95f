"""The Redis Streams sink against a real redis-server."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
import redis.asyncio.connection
import structlog
from layerwatch_redis import RedisSink, entry_id, event_id_bytes
from rediskit import RedisServer, check_streams, read_streams

from watcher import testing
from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import EventEncoder, Record


async def test_stream_arrives_complete_and_in_order_per_mount(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """A stream of batches lands whole, one Redis stream per mount, ids from the sequence."""
    sent = testing.mixed_records(600)
    await testing.send_stream(sink, sent)
    await check_streams(sink, redis_server.url, sent)
    assert sink.stream("db.main") == "layerwatch:db.main"
    assert sink.stream("") == "layerwatch:_service"
    assert sink.health().ok


async def test_retried_and_half_written_batches_are_not_doubled(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """A batch sent again, or after a prefix of it landed, adds only what was missing."""
    sent = testing.mixed_records(200)
    await sink.send(sent[:70])
    await sink.send(sent)
    await sink.send(sent)
    await sink.send(sent[100:120])
    await check_streams(sink, redis_server.url, sent)


async def test_out_of_memory_writes_nothing_then_retry_writes_all(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """A batch refused for memory writes no record of it; the retry after recovery writes all."""
    sent = testing.mixed_records(120)
    await sink.send(sent[:30])
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)
        with pytest.raises(SinkUnavailable):
            await sink.send(sent[30:])
        assert not sink.health().ok
        lengths = [await admin.xlen(sink.stream(mount)) for mount in (*testing.MOUNTS, "")]
        assert sum(lengths) == 30
        await admin.config_set("maxmemory", 0)
    finally:
        await admin.aclose()
    await sink.send(sent[30:])
    await check_streams(sink, redis_server.url, sent)
    assert sink.health().ok


async def test_wrong_key_type_is_rejected(sink: RedisSink, redis_server: RedisServer) -> None:
    """A stream key holding a string is a permanent refusal (SinkRejected)."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.set("layerwatch:web", "not a stream")
    await admin.aclose()
    with pytest.raises(SinkRejected, match="layerwatch:web"):
        await sink.send(testing.mixed_records(10))


async def test_maxlen_trims_approximately(redis_server: RedisServer) -> None:
    """maxlen trims each stream to about that many entries, and retries still dedupe."""
    async with testing.opened(RedisSink("r", {"url": redis_server.url, "maxlen": 10})) as sink:
        sent = testing.mixed_records(3000, mounts=("web",))
        await testing.send_stream(sink, sent, batch_size=100)
        await sink.send(sent[-100:])
    client = redis.asyncio.Redis.from_url(redis_server.url)
    length = await client.xlen("layerwatch:web")
    last: Any = await client.xrevrange("layerwatch:web", count=1)
    await client.aclose()
    assert 10 <= length < 2000
    last_web = [record for record in sent if record.mount == "web"][-1]
    assert last[0][0].decode() == entry_id(last_web)


async def test_unreachable_server_is_unavailable() -> None:
    """open() and send() against a port nobody listens on raise SinkUnavailable; unhealthy."""
    url = f"redis://127.0.0.1:{testing.free_port()}/0"
    await testing.check_unreachable(RedisSink("r", {"url": url, "timeout": 1}))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bogus": 1}, "sinks.r.bogus"),
        ({"maxlen": 0}, "sinks.r.maxlen"),
        ({"stream": "fixed"}, "sinks.r.stream"),
        ({"stream": "x:{nope}"}, "sinks.r.stream"),
        ({"timeout": -1}, "sinks.r.timeout"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    """A bad or unknown option is a ConfigError naming sinks.NAME.OPTION."""
    testing.check_option_error(RedisSink, "r", options, key)


def test_entry_ids_are_epoch_then_sequence() -> None:
    """Entry ids are EPOCH-SEQ, valid for Redis (above 0-0): a later spool's come after."""
    made = [Record(seq, "m", "t", b"{}", epoch) for epoch, seq in ((0, 0), (7, 1), (7, 10), (9, 1))]
    assert [entry_id(r) for r in made] == ["0-1", "7-1", "7-10", "9-1"]


async def test_a_new_spool_after_a_lost_one_is_written_not_skipped(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """A spool made anew (later epoch, sequence from 1 again) appends after the old one's
    entries; none of its records is taken for "already written"."""
    old = testing.mixed_records(50, mounts=("web",))
    await sink.send(old)
    new = testing.mixed_records(20, mounts=("web",), epoch=2)
    await sink.send(new)
    await sink.send(new[:5])  # a retry of part of it: still deduplicated
    streams = await read_streams(redis_server.url, ["layerwatch:web"])
    ids = [fields[b"id"].decode() for _, fields in streams["layerwatch:web"]]
    assert ids == [r.id for r in old + new if r.mount == "web"]
    assert sink.health().ok


async def test_a_stream_ahead_of_the_spool_is_rejected_loudly(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """Records refused as "below the top" that the stream does not hold are rejected (so
    dead-lettered) with a warning and unhealthy status, never skipped as duplicates."""
    admin = redis.asyncio.Redis.from_url(redis_server.url)
    await admin.xadd("layerwatch:web", {"id": "someone-else"}, id="999999-0")
    await admin.aclose()
    with structlog.testing.capture_logs() as logs, pytest.raises(SinkRejected, match="ahead"):
        await sink.send(testing.mixed_records(3, mounts=("web",)))
    assert "redis_stream_ahead" in [entry["event"] for entry in logs]
    assert not sink.health().ok


async def test_server_killed_mid_stream_loses_and_doubles_nothing(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """SIGKILL and restart of the server mid-stream: retries store every record exactly once."""
    sent = testing.mixed_records(1000)
    failures = await testing.deliver_through_restart(sink, redis_server, sent)
    assert failures >= 1, "the outage was not observed"
    await check_streams(sink, redis_server.url, sent)


async def test_readme_consumer_rebuilds_the_change_lists(
    sink: RedisSink, redis_server: RedisServer
) -> None:
    """The README's consumer example rebuilds every mount's change list, despite a re-sent batch."""
    expected = await testing.send_change_lists(sink)
    rebuild = testing.readme_example(Path(__file__).parents[1] / "README.md")["rebuild"]
    assert await rebuild(redis_server.url) == expected


@pytest.mark.parametrize("options", [{}, {"maxlen": 1000, "stream": "lw:{mount}"}])
def test_the_batch_is_what_redis_py_would_send(options: dict[str, object]) -> None:
    """The packed batch is byte for byte what a redis-py MULTI/EXEC pipeline of the same
    XADDs sends (keys, MAXLEN ~, entry ids, fields)."""
    sink = RedisSink("r", options)
    batch = testing.mixed_records(120)
    client = redis.asyncio.Redis()
    pipe = client.pipeline(transaction=True)
    for record in batch:
        fields: dict[Any, Any] = {"id": record.id, "type": record.type, "event": record.body}
        maxlen: Any = options.get("maxlen")
        pipe.xadd(sink.stream(record.mount), fields, id=entry_id(record), maxlen=maxlen)
    commands = [("MULTI",), *(args for args, _ in pipe.command_stack), ("EXEC",)]
    packed = redis.asyncio.connection.Connection().pack_commands(commands)
    assert sink._commands(batch) == b"".join(packed)


async def test_a_server_that_stops_answering_is_unavailable_then_written_once(
    redis_server: RedisServer,
) -> None:
    """With the server stopped (SIGSTOP), send raises SinkUnavailable after ``timeout`` (one
    deadline for the whole round trip); after SIGCONT the retry writes the batch, once."""
    sent = testing.mixed_records(400)
    async with testing.opened(RedisSink("r", {"url": redis_server.url, "timeout": 0.5})) as sink:
        await sink.send(sent[:200])
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(SinkUnavailable):
                await sink.send(sent[200:])
            assert not sink.health().ok
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await testing.deliver(sink, sent[200:])
        assert sink.health().ok
        await check_streams(sink, redis_server.url, sent)


def test_event_id_bytes_reads_the_id_from_the_start_of_the_body() -> None:
    """event_id_bytes is record.id in UTF-8, also for ids with JSON escapes and for bodies
    in another order."""
    odd = EventEncoder(stream='we"ird\\ st\u00e9am', host="h", epoch=5)
    escaped = odd.control(1, "m", "io.layerwatch.gap", {"x": 1}, now=0.0)
    reordered = Record(7, "m", "t", orjson.dumps({"data": {"id": "no"}, "id": "s:1:7"}))
    for record in [*testing.mixed_records(60), escaped, reordered]:
        assert event_id_bytes(record) == record.id.encode()
