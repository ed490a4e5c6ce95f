"""A Redis password from the environment (``${VAR}`` in ``url``), against a real
``redis-server --requirepass``: resolved centrally by the config, never shown."""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from rediskit import RedisServer, check_streams

from watcher.cli import logconfig
from watcher.core.errors import SinkUnavailable
from watcher.service import config
from watcher.service.secrets import MASK
from watcher.service.service import Service, build_sink
from watcher.testing import free_port, make_records, opened

REDIS_SERVER = shutil.which("redis-server")
PASSWORD = "c0rrect-h0rse-battery"


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that refuses every command until AUTH with ``PASSWORD``."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    argv += ["--save", "", "--requirepass", PASSWORD]
    with RedisServer(argv, port, tmp_path / "redis.log") as server:
        yield server


def write_config(tmp_path: Path, port: int) -> Path:
    """A config whose Redis sink takes its password from REDIS_PASSWORD."""
    path = tmp_path / "lw.toml"
    path.write_text(
        '[[mounts]]\nname = "m"\nupper = "/srv/u"\nlowers = ["/srv/l"]\n'
        "[sinks.bus]\n"
        'type = "redis"\n'
        f'url = "redis://:${{REDIS_PASSWORD}}@127.0.0.1:{port}/0"\n'
        "timeout = 2.0\n"
    )
    return path


async def test_password_from_the_environment_authenticates(
    tmp_path: Path, locked_server: RedisServer
) -> None:
    """With REDIS_PASSWORD set, the sink authenticates and every record lands in its stream;
    the open log line shows the URL without the password."""
    path = write_config(tmp_path, locked_server.port)
    cfg = config.load(path, {"REDIS_PASSWORD": PASSWORD})
    records = make_records(1, 5, mount="m")
    out = io.StringIO()
    with redirect_stderr(out):
        logconfig.configure(level="info", redact=cfg.secrets.redact)
        try:
            async with opened(build_sink(cfg.sinks[0], cfg.secrets)) as sink:
                await sink.send(records)
        finally:
            logconfig.configure(level="info")
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_server.port}/0"
    await check_streams(sink, url, records)  # type: ignore[arg-type]
    assert "redis_sink_opened" in out.getvalue()
    assert f":{MASK}@127.0.0.1" in out.getvalue()
    assert PASSWORD not in out.getvalue()


async def test_a_wrong_password_is_refused_and_not_shown(
    tmp_path: Path, locked_server: RedisServer
) -> None:
    """A wrong password from the environment: the server refuses (so the password really is
    what authenticates), and the error, once redacted as health shows it, hides it."""
    path = write_config(tmp_path, locked_server.port)
    wrong = "wr0ng-password-value"
    cfg = config.load(path, {"REDIS_PASSWORD": wrong})
    sink = build_sink(cfg.sinks[0], cfg.secrets)
    with pytest.raises(SinkUnavailable) as info:
        await sink.open()
    await sink.close()
    assert wrong in str(info.value)  # the sink quotes its URL: this is why we redact
    assert wrong not in cfg.secrets.redact(str(info.value))


async def test_health_reasons_hide_the_password(tmp_path: Path) -> None:
    """A running service whose Redis (password from the environment) cannot be reached: the
    health reason (what /healthz and `layerwatch status` show) names the sink's error with
    the password blanked out."""
    (tmp_path / "upper").mkdir()
    (tmp_path / "lower").mkdir()
    port = free_port()  # nothing listens there
    cfg = config.parse(
        {
            "mounts": [
                {"name": "m", "upper": str(tmp_path / "upper"), "lowers": [str(tmp_path / "lower")]}
            ],
            "spool": {"path": str(tmp_path / "spool.db")},
            "sinks": {
                "bus": {
                    "type": "redis",
                    "url": f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{port}/0",
                    "timeout": 0.5,
                }
            },
        },
        {"REDIS_PASSWORD": PASSWORD},
    )
    service = Service(cfg)
    task = asyncio.create_task(service.run(signals=False))
    try:
        async with asyncio.timeout(30):
            await service.started.wait()
            while not any("cannot reach" in r for r in service.degraded()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        (reason,) = [r for r in service.degraded() if r.startswith("sink bus:")]
        assert f"redis://:{MASK}@127.0.0.1:{port}/0" in reason
        assert PASSWORD not in reason
        assert PASSWORD in service.runners["bus"].health().detail  # what was blanked out
    finally:
        service.stop.set()
        await asyncio.wait_for(task, 30)
