"""Several nodes, one NATS (docs/operations.md): the setup the DaemonSet uses, run for real.

Every node publishes into one JetStream stream with ``ordered = false``; a consumer that needs
each node's order restores it with the guide's ``PerNodeOrder`` (its code is executed from the
guide). Checked here:

- ``PerNodeOrder`` on made-up streams: events moved late within their batch (what a retry
  after a broken connection does), other nodes' events interleaved, repeats, a retention gap,
  an event that never comes (released after ``hold``).
- two real services (``layerwatch run``, on the host) with the ConfigMap's ``[sinks.bus]``
  (only ``servers`` changed) publishing into one ``nats-server`` on a loopback port, which is
  killed and restarted while both publish: afterwards every event of each node is in the
  stream, the class hands each node's out in sequence order, and the change lists rebuilt from
  them equal each service's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from watcher.testing import ServerProcess, free_port, readme_example

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "operations.md"
NODES = ("node-a.example", "node-b.example")


def per_node_order(batch_size: int = 100, hold: float = 60.0) -> Any:
    """A ``PerNodeOrder`` from the operations guide's code."""
    return readme_example(GUIDE)["PerNodeOrder"](batch_size=batch_size, hold=hold)


def _event(node: str, epoch: int, seq: int, type_: str = "io.layerwatch.change") -> dict[str, Any]:
    return {"id": f"{node}:{epoch}:{seq}", "type": type_, "data": {}}


def _as_published(events: list[dict[str, Any]], batch: int, rng: random.Random) -> list[Any]:
    """One node's events as a stream may hold them: batch after batch, in some batches one
    event stored after the rest of its batch, and repeats of stored ones after it."""
    out: list[Any] = []
    for start in range(0, len(events), batch):
        chunk = list(events[start : start + batch])
        if rng.random() < 0.5 and len(chunk) > 2:
            late = chunk.pop(rng.randrange(len(chunk) - 1))
            out += chunk + rng.sample(chunk, 2) + [late]
        else:
            out += chunk
    return out


def _seqs(events: list[dict[str, Any]], node: str) -> list[int]:
    return [int(e["id"].rsplit(":", 1)[1]) for e in events if e["id"].startswith(node + ":")]


def test_per_node_order_restores_each_nodes_sequence() -> None:
    """Late events within their batch, interleaved nodes and repeats: each node's events come
    out once each, in sequence order, with nothing held once the stream is read."""
    rng = random.Random(16)
    batch = 25
    streams = [
        _as_published([_event(node, 100 + i, seq) for seq in range(1, 601)], batch, rng)
        for i, node in enumerate(NODES)
    ]
    merged = []
    while any(streams):  # the nodes' records interleave record by record
        source = rng.choice([s for s in streams if s])
        merged.append(source.pop(0))
    order = per_node_order(batch_size=batch)
    out = [e for event in merged for e in order.push(event, now=0.0)]
    for node in NODES:
        assert _seqs(out, node) == list(range(1, 601))
    assert order.poll(now=1e9) == []


def test_per_node_order_skips_a_gap_and_waits_no_longer_than_hold() -> None:
    """A gap event's range is not waited for; an event that never comes (a filtered sink) is
    waited for `hold` seconds only; a repeat after its release is dropped."""
    node = NODES[0]
    order = per_node_order(batch_size=50, hold=60.0)
    out = [e for s in range(1, 11) for e in order.push(_event(node, 1, s), now=0.0)]
    gap = _event(node, 1, 300, "io.layerwatch.gap")
    gap["data"] = {"first_seq": 11, "last_seq": 299, "consumers": ["bus"], "reason": "retention"}
    out += order.push(gap, now=1.0)
    out += order.push(_event(node, 1, 301), now=1.0)
    assert _seqs(out, node) == [*range(1, 11), 300, 301]
    assert order.push(_event(node, 1, 5), now=2.0) == []  # a repeat
    # 302 never comes: 303 waits, then goes on without it.
    assert order.push(_event(node, 1, 303), now=2.0) == []
    assert order.poll(now=30.0) == []
    assert _seqs(order.poll(now=62.1), node) == [303]
    assert order.push(_event(node, 1, 302), now=63.0) == []  # too late: dropped, not reordered


# -- two services, one NATS --------------------------------------------------------------------


def _bus_options() -> dict[str, Any]:
    """The ConfigMap's [sinks.bus] table."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the test extras have it)")
    docs = yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    options: dict[str, Any] = tomllib.loads(config_map["data"]["layerwatch.toml"])["sinks"]["bus"]
    assert options["ordered"] is False
    return options


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


class Node:
    """One `layerwatch run` with a detached mount ``app`` and the bus sink."""

    def __init__(self, top: Path, name: str, nats_url: str) -> None:
        self.name = name
        self.upper = top / "upper"
        self.socket = top / "api.sock"
        (top / "lower").mkdir(parents=True)
        self.upper.mkdir()
        bus = {**_bus_options(), "servers": [nats_url]}
        lines = [
            "[service]",
            f"stream = {_toml(name)}",
            "[spool]",
            f"path = {_toml(str(top / 'spool.db'))}",
            "[api]",
            f"socket = {_toml(str(self.socket))}",
            "[[mounts]]",
            'name = "app"',
            f"upper = {_toml(str(self.upper))}",
            f"lowers = [{_toml(str(top / 'lower'))}]",
            "[sinks.bus]",
            *[f"{key} = {_toml(value)}" for key, value in bus.items()],
        ]
        config = top / "layerwatch.toml"
        config.write_text("\n".join(lines) + "\n")
        self.log = (top / "service.log").open("wb")
        self.proc = subprocess.Popen(
            ["layerwatch", "run", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["layerwatch", *args, "--server", str(self.socket)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def head_seq(self) -> int:
        status = self.cli("status").stdout
        found = re.search(r"head seq (\d+)", status)
        assert found, status
        return int(found.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _churn(upper: Path, count: int, seed: int) -> None:
    """Files made, rewritten and removed straight in the upper dir (a detached mount)."""
    rng = random.Random(seed)
    for i in range(count):
        path = upper / f"d{i % 7}" / f"f{rng.randrange(40)}"
        path.parent.mkdir(exist_ok=True)
        if path.exists() and rng.random() < 0.3:
            path.unlink()
        else:
            path.write_bytes(os.urandom(rng.randrange(1, 64)))
        time.sleep(0.002)


async def _stored(url: str, stream: str) -> list[dict[str, Any]]:
    import nats

    nc = await nats.connect(servers=[url], connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append(orjson.loads(msg.data or b""))
        return out
    finally:
        await nc.close()


def _lists(events: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(node, mount) -> change list, from events in each node's order."""
    state: dict[tuple[str, str], dict[str, str]] = {}
    snapshots: dict[tuple[str, str], dict[str, str]] = {}
    for event in events:
        data = event["data"]
        key = (event["id"].rsplit(":", 2)[0], data.get("mount", ""))
        if event["type"] == "io.layerwatch.snapshot.begin":
            snapshots[key] = {}
        elif event["type"] == "io.layerwatch.snapshot.end":
            state[key] = snapshots.pop(key, {})
        elif event["type"] == "io.layerwatch.change":
            target = snapshots.get(key, state.setdefault(key, {}))
            if data["kind"] is None:
                target.pop(data["path"], None)
            else:
                target[data["path"]] = data["kind"]
    return {key: {f"{k} {p}" for p, k in paths.items()} for key, paths in state.items()}


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[ServerProcess]:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (Debian package nats-server)")
    if shutil.which("layerwatch") is None:
        pytest.skip("the layerwatch command is not installed")
    pytest.importorskip("nats", reason="nats-py is not installed (plugins/nats)")
    port = free_port()
    argv = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")]
    with ServerProcess(argv, port, tmp_path / "nats.log") as server:
        yield server


@pytest.mark.slow
def test_two_nodes_publish_into_one_stream_through_a_server_restart(
    nats_server: ServerProcess, tmp_path: Path
) -> None:
    """Both nodes' events are all in the one stream after a server kill and restart; each
    node's come out of PerNodeOrder in sequence order, and rebuild each service's list."""
    url = f"nats://{nats_server.address}"
    stream = _bus_options()["stream"]
    with contextlib.ExitStack() as stack:
        nodes = []
        for name in NODES:
            node = Node(tmp_path / name, name, url)
            stack.callback(node.stop)
            nodes.append(node)
        deadline = time.monotonic() + 30
        while not all(n.cli("status").returncode == 0 for n in nodes):
            assert time.monotonic() < deadline, "the services did not become healthy"
            time.sleep(0.2)
        writers = [
            threading.Thread(target=_churn, args=(n.upper, 600, i)) for i, n in enumerate(nodes)
        ]
        for writer in writers:
            writer.start()
        time.sleep(0.5)
        nats_server.kill()  # mid-stream: batches in flight on both connections
        time.sleep(1.0)
        nats_server.start()
        for writer in writers:
            writer.join()
        expected = {}
        for node in nodes:
            diff = node.cli("diff", "app")
            assert diff.returncode == 0, diff.stderr
            expected[(node.name, "app")] = set(diff.stdout.splitlines())
        heads = {node.name: node.head_seq() for node in nodes}
        deadline = time.monotonic() + 90
        while True:
            stored = asyncio.run(_stored(url, stream))
            ids = {e["id"] for e in stored}
            have = {name: {int(i.rsplit(":", 1)[1]) for i in ids if i.startswith(name)}
                    for name in NODES}  # fmt: skip
            if all(set(range(1, heads[n] + 1)) <= have[n] for n in NODES):
                break
            assert time.monotonic() < deadline, {n: heads[n] - len(have[n]) for n in NODES}
            time.sleep(0.5)
    order = per_node_order(batch_size=_bus_options().get("batch_size", 100))
    ordered = [e for event in stored for e in order.push(event, now=0.0)]
    ordered += order.poll(now=1e9)
    late = 0
    for name in NODES:
        in_stream = _seqs(stored, name)
        late += sum(1 for a, b in itertools.pairwise(in_stream) if b < a)
        seqs = _seqs(ordered, name)
        assert seqs == sorted(set(seqs)), f"{name}: not in order or repeated"
        assert set(range(1, heads[name] + 1)) <= set(seqs)
    print(f"{len(stored)} messages; {late} stored before an earlier one of their node")
    rebuilt = _lists(ordered)
    for key, listed in expected.items():
        assert rebuilt.get(key, set()) == listed, key
