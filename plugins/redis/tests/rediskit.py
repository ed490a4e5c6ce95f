"""What the Redis sink tests need beyond ``watcher.testing``: the server and reading streams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio
from layerwatch_redis import RedisSink, entry_id

from watcher.delivery.events import Record
from watcher.testing import ServerProcess, check_delivered

Entries = list[tuple[str, dict[bytes, bytes]]]


class RedisServer(ServerProcess):
    """A ``redis-server`` process."""

    @property
    def url(self) -> str:
        """The client URL (database 0)."""
        return f"redis://{self.address}/0"


async def read_streams(url: str, keys: Sequence[str]) -> dict[str, Entries]:
    """Every entry of each stream in ``keys``, as (entry id, fields)."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        out = {}
        for key in keys:
            entries: Any = await client.xrange(key, "-", "+")
            out[key] = [(entry.decode(), fields) for entry, fields in entries]
        return out
    finally:
        await client.aclose()


async def check_streams(sink: RedisSink, url: str, sent: Sequence[Record]) -> None:
    """Each mount's stream holds exactly its records, once, in seq order, with their fields."""
    mounts = sorted({record.mount for record in sent})
    streams = await read_streams(url, [sink.stream(mount) for mount in mounts])
    held = [entry for mount in mounts for entry in streams[sink.stream(mount)]]
    check_delivered(sent, [fields[b"id"].decode() for _, fields in held])
    by_id = {record.id: record for record in sent}
    for mount in mounts:
        for entry, fields in streams[sink.stream(mount)]:
            record = by_id[fields[b"id"].decode()]
            assert record.mount == mount
            assert entry == entry_id(record)
            assert fields == {
                b"id": record.id.encode(),
                b"type": record.type.encode(),
                b"event": record.body,
            }
