"""Fixtures for the NATS sink tests: real ``nats-server`` processes on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from layerwatch_nats import NatsSink
from natskit import NatsServer

from watcher.testing import free_port, opened

NATS_SERVER = shutil.which("nats-server")


def _binary() -> str:
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    return NATS_SERVER


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single JetStream server with its store in a temp dir."""
    port = free_port()
    argv = [_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    with NatsServer(argv, port, tmp_path / "nats.log") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three JetStream servers named n0..n2, clustered over loopback routes."""
    binary = _binary()
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = ",".join(f"nats-route://127.0.0.1:{cport}" for _, cport in ports)
    with ExitStack() as stack:
        servers = []
        for index, (port, cport) in enumerate(ports):
            argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port)]
            argv += ["-sd", str(tmp_path / f"n{index}"), "--server_name", f"n{index}"]
            argv += ["--cluster_name", "lw", "--cluster", f"nats://127.0.0.1:{cport}"]
            argv += ["--routes", routes]
            servers.append(stack.enter_context(NatsServer(argv, port, tmp_path / f"n{index}.log")))
        yield servers


@pytest.fixture
async def sink(nats_server: NatsServer) -> AsyncIterator[NatsSink]:
    """An opened sink on the single server, with short ack timeouts."""
    async with opened(NatsSink("n", {"servers": nats_server.url, "ack_timeout": 2.0})) as sink:
        yield sink
