"""Fixtures for the NATS sink tests: real ``nats-server`` processes on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from natskit import Server, free_port

NATS_SERVER = shutil.which("nats-server")


def _binary() -> str:
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    return NATS_SERVER


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[Server]:
    """A single JetStream server with its store in a temp dir."""
    port = free_port()
    argv = [_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    server = Server(argv, port, tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[Server]]:
    """Three JetStream servers named n0..n2, clustered over loopback routes."""
    binary = _binary()
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = ",".join(f"nats-route://127.0.0.1:{cport}" for _, cport in ports)
    servers = []
    for index, (port, cport) in enumerate(ports):
        argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port)]
        argv += ["-sd", str(tmp_path / f"n{index}"), "--server_name", f"n{index}"]
        argv += ["--cluster_name", "lw", "--cluster", f"nats://127.0.0.1:{cport}"]
        argv += ["--routes", routes]
        servers.append(Server(argv, port, tmp_path / f"n{index}.log"))
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
