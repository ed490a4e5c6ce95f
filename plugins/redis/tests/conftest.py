"""Fixtures for the Redis sink tests: a real ``redis-server`` on a free loopback port."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from layerwatch_redis import RedisSink
from rediskit import RedisServer

from watcher.testing import free_port, opened

REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis with an append-only file in a temp dir, fsynced on every write.

    ``appendfsync always`` makes an acknowledged write survive SIGKILL deterministically;
    with the default ``everysec`` a crash of the machine (not only of the process) can lose
    up to about a second of acknowledged writes.
    """
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    with RedisServer(argv, port, tmp_path / "redis.log") as server:
        yield server


@pytest.fixture
async def sink(redis_server: RedisServer) -> AsyncIterator[RedisSink]:
    """An opened sink on the server, with short timeouts."""
    async with opened(RedisSink("r", {"url": redis_server.url, "timeout": 2.0})) as sink:
        yield sink
