"""Helpers for the NATS sink tests: server processes, realistic records, the retry loop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from watcher.changes import Kind, Op, Transition
from watcher.errors import SinkUnavailable
from watcher.events import BOOKMARK, SNAPSHOT_BEGIN, SNAPSHOT_END, EventEncoder, Record
from watcher.sinks import Sink

MOUNTS = ("web", "db.main", "caché")
"""Mount names of the test records: one needs escaping in a NATS subject, one is non-ASCII."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server process; ``kill`` is SIGKILL, ``start`` again reuses the same data dir."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and poll its port until it accepts connections."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the process (SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://127.0.0.1:{self.port}"


def _stat(size: int) -> os.stat_result:
    return os.stat_result((0o100644, 1, 1, 1, 0, 0, size, 0, 1_700_000_000, 0))


def build_records(count: int, *, start: int = 1, mounts: Sequence[str] = MOUNTS) -> list[Record]:
    """``count`` realistic events with seq from ``start``, mounts round-robin.

    Every 50th event is a service-wide bookmark (mount ``""``); snapshot bounds and changes
    (one in seven with a non-UTF-8 path) fill the rest.
    """
    encoder = EventEncoder(stream="s", host="h")
    now = 1_700_000_000.0
    records = []
    for seq in range(start, start + count):
        mount = mounts[seq % len(mounts)]
        if seq % 50 == 0:
            records.append(encoder.control(seq, "", BOOKMARK, {"head_seq": seq}, now=now))
        elif seq % 50 == 1:
            begin = {"mount": mount, "reason": "restart"}
            records.append(encoder.control(seq, mount, SNAPSHOT_BEGIN, begin, now=now))
        elif seq % 50 == 2:
            end = {"mount": mount, "reason": "restart", "count": 0}
            records.append(encoder.control(seq, mount, SNAPSHOT_END, end, now=now))
        else:
            path = f"/srv/{mount}/f{seq}".encode() + (b"\xff" if seq % 7 == 0 else b"")
            transition = Transition(path, Kind.ADDED, None, Op.CREATE, _stat(seq))
            records.append(encoder.change(seq, mount, transition, now=now + seq))
    return records


def change_list_records() -> tuple[list[Record], dict[str, dict[bytes, str]]]:
    """Events of three mounts (with a delete, an activity event, a snapshot and a non-UTF-8
    name) and the change lists a consumer must rebuild from them."""
    encoder = EventEncoder(stream="s", host="h")
    records: list[Record] = []

    def change(mount: str, path: bytes, kind: Kind | None, prev: Kind | None, op: Op) -> None:
        seq = len(records) + 1
        stat = _stat(seq) if kind is not None else None
        transition = Transition(path, kind, prev, op, stat)
        records.append(encoder.change(seq, mount, transition, now=1_700_000_000.0 + seq))

    def control(mount: str, type_: str, data: dict[str, object]) -> None:
        records.append(encoder.control(len(records) + 1, mount, type_, data, now=1.7e9))

    change("web", b"/a", Kind.ADDED, None, Op.CREATE)
    change("db.main", b"/x", Kind.ADDED, None, Op.CREATE)
    change("web", b"/b", Kind.ADDED, None, Op.CREATE)
    change("web", b"/a", Kind.ADDED, Kind.ADDED, Op.MODIFY)
    change("web", b"/b", None, Kind.ADDED, Op.DELETE)
    change("web", b"/etc", Kind.CHANGED, None, Op.CREATE)
    control("db.main", SNAPSHOT_BEGIN, {"mount": "db.main", "reason": "overflow"})
    change("db.main", b"/y", Kind.ADDED, None, Op.SNAPSHOT)
    change("db.main", b"/z", Kind.CHANGED, None, Op.SNAPSHOT)
    control("db.main", SNAPSHOT_END, {"mount": "db.main", "reason": "overflow", "count": 2})
    change("caché", b"/bad\xff", Kind.ADDED, None, Op.CREATE)
    change("caché", b"/etc/passwd", Kind.CHANGED, None, Op.MODIFY)
    control("", BOOKMARK, {"head_seq": len(records)})
    expected = {
        "web": {b"/a": "A", b"/etc": "C"},
        "db.main": {b"/y": "A", b"/z": "C"},
        "caché": {b"/bad\xff": "A", b"/etc/passwd": "C"},
    }
    return records, expected


def readme_example(readme: Path) -> dict[str, Any]:
    """Execute the first ``python`` block of ``readme`` and return its namespace."""
    match = re.search(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, f"no python example in {readme}"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(readme), "exec"), namespace)
    return namespace


def batches(records: Sequence[Record], size: int) -> list[Sequence[Record]]:
    """``records`` cut into consecutive batches of ``size``."""
    return [records[i : i + size] for i in range(0, len(records), size)]


async def deliver(
    sink: Sink,
    batch: Sequence[Record],
    *,
    deadline: float = 60.0,
    on_failure: Callable[[], None] | None = None,
) -> int:
    """Call ``send`` with the same batch until it succeeds, as the delivery runner does.

    ``on_failure`` is called after every attempt that raised ``SinkUnavailable``.

    Returns:
        How many attempts failed with ``SinkUnavailable`` before one succeeded.
    """
    failures = 0
    give_up = time.monotonic() + deadline
    while True:
        try:
            await sink.send(batch)
        except SinkUnavailable:
            failures += 1
            if on_failure is not None:
                on_failure()
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.05)
        else:
            return failures
