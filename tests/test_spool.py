"""The spool: durable append, cursors, retention, change lists, and failures of the disk."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watcher.core.errors import SpoolError
from watcher.core.model import Kind
from watcher.delivery.events import Record
from watcher.delivery.spool import Pruned, Spool

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to mount a tmpfs")


def rec(seq: int, size: int = 64, mount: str = "m") -> Record:
    """A record whose body is derived from its seq (so a reader can check it)."""
    head = f"{seq}:".encode()
    return Record(seq, mount, "io.layerwatch.change", head + b"x" * max(0, size - len(head)))


def bare(records: list[Record]) -> list[Record]:
    """``records`` without their epoch, to compare with hand-made ones."""
    return [dataclasses.replace(r, epoch=0) for r in records]


def batch(first: int, count: int, size: int = 64) -> list[Record]:
    """``count`` records from ``first`` on."""
    return [rec(seq, size) for seq in range(first, first + count)]


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    """A spool file in a directory that does not exist yet."""
    return tmp_path / "state" / "spool.db"


@contextlib.contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    """Mount a small tmpfs at ``target``; unmount it at the end, whatever happens."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True)


def remount_ro(target: Path) -> None:
    """Make a mounted tmpfs read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)


# -- the log -------------------------------------------------------------------------------


async def test_append_read_cursor_round_trip(spool_path: Path) -> None:
    """Appended records read back in order, and cursors follow acks."""
    with Spool(spool_path) as spool:
        assert (spool.last_seq, spool.first_seq) == (0, 1)
        assert bare(spool.read(0, 10)) == []
        assert spool.cursor("web") == 0
        await spool.append(batch(1, 3))
        await spool.append([rec(4, 700, mount="other")])
        assert bare(spool.read(0, 10)) == [*batch(1, 3), rec(4, 700, mount="other")]
        assert bare(spool.read(1, 2)) == batch(2, 2)
        assert bare(spool.read(4, 10)) == []
        assert bare(spool.read(0, 0)) == []
        spool.ack("web", 2)
        assert spool.cursor("web") == 2
        assert spool.read(spool.cursor("web"), 10)[0].seq == 3
        stats = spool.stats()
        assert (stats.records, stats.first_seq, stats.last_seq) == (4, 1, 4)
        assert stats.bytes == 3 * 64 + 700
        assert stats.cursors == {"web": 2}


async def test_reopen_keeps_everything(spool_path: Path) -> None:
    """Closing and reopening keeps records, cursors, lists, meta and last_seq past pruning."""
    with Spool(spool_path, max_bytes=64 * 5) as spool:
        await spool.append(batch(1, 8), lists={"m": {b"/a": Kind.ADDED}})
        spool.ack("web", 6)
        spool.set_meta("stream", "abc")
        spool.prune(time.time())
        assert spool.first_seq == 4
    with Spool(spool_path, max_bytes=64 * 5) as spool:
        assert (spool.first_seq, spool.last_seq) == (4, 8)
        assert bare(spool.read(0, 100)) == batch(4, 5)
        assert spool.cursor("web") == 6
        assert spool.load_list("m") == {b"/a": Kind.ADDED}
        assert spool.get_meta("stream") == "abc"
        assert spool.stats().bytes == 64 * 5
        await spool.append(batch(9, 1))
        assert spool.last_seq == 9


async def test_emptied_spool_keeps_last_seq(spool_path: Path) -> None:
    """Pruning every record leaves first_seq = last_seq + 1, also after a reopen."""
    with Spool(spool_path, max_age=10) as spool:
        await spool.append(batch(1, 3))
        spool.prune(time.time() + 60)
        assert (spool.first_seq, spool.last_seq, spool.stats().records) == (4, 3, 0)
    with Spool(spool_path) as spool:
        assert (spool.first_seq, spool.last_seq) == (4, 3)
        assert spool.cursor("late") == 3
        await spool.append(batch(4, 1))
        assert bare(spool.read(spool.cursor("late"), 10)) == batch(4, 1)


async def test_sequence_continuity_enforced(spool_path: Path) -> None:
    """Records that do not continue the sequence are refused, and nothing is written."""
    with Spool(spool_path) as spool:
        with pytest.raises(ValueError, match="expected 1"):
            await spool.append(batch(2, 2))
        await spool.append(batch(1, 2))
        bad = [[rec(3), rec(5)], [rec(2)], [rec(3), rec(3)], batch(4, 1)]
        for records in bad:
            with pytest.raises(ValueError, match="does not continue"):
                await spool.append(records, lists={"m": {b"/x": Kind.ADDED}})
        assert spool.last_seq == 2
        assert bare(spool.read(0, 10)) == batch(1, 2)
        assert spool.load_list("m") == {}
        await spool.append(batch(3, 1))
        assert spool.last_seq == 3


async def test_failed_append_writes_nothing(spool_path: Path) -> None:
    """An append that fails half-way rolls back its records and lists; the spool goes on."""
    with Spool(spool_path) as spool:
        await spool.append(batch(1, 1))
        unbindable: dict[bytes, Kind | None] = {b"/ok": Kind.ADDED, object(): Kind.ADDED}  # type: ignore[dict-item]
        with pytest.raises(SpoolError, match="append failed"):
            await spool.append(batch(2, 3), lists={"m": unbindable})
        assert spool.last_seq == 1
        assert bare(spool.read(0, 10)) == batch(1, 1)
        assert spool.load_list("m") == {}
        assert spool.mounts() == []
        await spool.append(batch(2, 1))
        assert bare(spool.read(0, 10)) == batch(1, 2)


async def test_ack_never_moves_back(spool_path: Path) -> None:
    """An older ack leaves the cursor where it is; an ack past last_seq is an error."""
    with Spool(spool_path) as spool:
        await spool.append(batch(1, 5))
        spool.ack("web", 4)
        spool.ack("web", 2)
        assert spool.cursor("web") == 4
        with pytest.raises(ValueError, match="beyond last_seq"):
            spool.ack("web", 6)
    with Spool(spool_path) as spool:
        assert spool.cursor("web") == 4


async def test_wait_wakes_on_append(spool_path: Path) -> None:
    """wait returns as soon as a later record is appended, and at once if one exists."""
    with Spool(spool_path) as spool:
        waiter = asyncio.create_task(spool.wait(0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await spool.append(batch(1, 1))
        await asyncio.wait_for(waiter, 5)
        await asyncio.wait_for(spool.wait(0), 1)
        late = asyncio.create_task(spool.wait(1))
        await asyncio.sleep(0.05)
        assert not late.done()


async def test_wait_is_cancellable(spool_path: Path) -> None:
    """Cancelling a wait cancels it cleanly, and later waits still wake."""
    with Spool(spool_path) as spool:
        waiter = asyncio.create_task(spool.wait(0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        again = asyncio.create_task(spool.wait(0))
        await asyncio.sleep(0.01)
        await spool.append(batch(1, 1))
        await asyncio.wait_for(again, 5)


async def test_wait_fails_when_closed(spool_path: Path) -> None:
    """A wait in progress raises SpoolError when the spool closes."""
    spool = Spool(spool_path)
    waiter = asyncio.create_task(spool.wait(0))
    await asyncio.sleep(0.01)
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        await asyncio.wait_for(waiter, 5)
    spool.close()


async def test_concurrent_appends_stay_in_order(spool_path: Path) -> None:
    """Appends submitted back to back run one at a time, in submission order."""
    with Spool(spool_path) as spool:
        await asyncio.gather(*(spool.append(batch(1 + 10 * i, 10)) for i in range(20)))
        assert [r.seq for r in spool.read(0, 1000)] == list(range(1, 201))


# -- retention -----------------------------------------------------------------------------


async def test_prune_by_size_names_lagging_consumers(spool_path: Path) -> None:
    """Over max_bytes the oldest records go, and Pruned names who had not acked them."""
    with Spool(spool_path, max_bytes=1000) as spool:
        assert spool.cursor("fresh") == 0
        await spool.append(batch(1, 10, size=200))
        spool.ack("fast", 10)
        spool.ack("slow", 2)
        spool.ack("edge", 5)
        pruned = spool.prune(time.time())
        assert pruned == Pruned(first_dropped=1, last_dropped=5, consumers_behind=["fresh", "slow"])
        assert spool.first_seq == 6
        assert spool.stats().bytes == 1000
        assert [r.seq for r in spool.read(0, 100)] == [6, 7, 8, 9, 10]
        assert spool.prune(time.time()) is None
        assert spool.cursor("new") == 5


async def test_prune_with_everyone_caught_up_returns_none(spool_path: Path) -> None:
    """Dropping records that every consumer acknowledged is no gap."""
    with Spool(spool_path, max_bytes=100) as spool:
        await spool.append(batch(1, 4, size=100))
        spool.ack("web", 4)
        assert spool.prune(time.time()) is None
        assert spool.first_seq == 4


async def test_prune_by_age(spool_path: Path) -> None:
    """Records appended longer than max_age ago go; newer ones stay."""
    with Spool(spool_path, max_age=3600) as spool:
        await spool.append(batch(1, 3))
        t_old = time.time()
        await asyncio.sleep(0.02)
        await spool.append(batch(4, 2))
        t_new = time.time()
        spool.ack("web", 1)
        assert spool.prune(t_old + 3599) is None
        assert spool.first_seq == 1
        pruned = spool.prune(t_old + 3600 + 0.01)
        assert pruned == Pruned(first_dropped=1, last_dropped=3, consumers_behind=["web"])
        assert [r.seq for r in spool.read(0, 10)] == [4, 5]
        spool.ack("web", 5)
        assert spool.prune(t_new + 3601) is None
        assert spool.stats().records == 0


# -- change lists and meta -----------------------------------------------------------------


async def test_lists_round_trip_bytes_and_removals(spool_path: Path) -> None:
    """Change lists keep any bytes as names, apply removals, and are per mount."""
    odd = b"/caf\xe9/\xff\xfe\nline"
    with Spool(spool_path) as spool:
        assert spool.mounts() == []
        await spool.append(
            batch(1, 1),
            lists={
                "a": {b"/x": Kind.ADDED, odd: Kind.CHANGED, b"/gone": Kind.DELETED},
                "b": {b"/x": Kind.DELETED},
            },
        )
        await spool.append(
            [], lists={"a": {b"/x": None, b"/gone": None, b"/new": Kind.ADDED}, "c": {}}
        )
        await spool.append(batch(2, 1), lists={"a": {odd: Kind.ADDED, b"/never": None}})
    with Spool(spool_path) as spool:
        assert spool.load_list("a") == {odd: Kind.ADDED, b"/new": Kind.ADDED}
        assert spool.load_list("b") == {b"/x": Kind.DELETED}
        assert spool.load_list("c") == {}
        assert spool.mounts() == ["a", "b", "c"]
        spool.drop_list("a")
        assert spool.load_list("a") == {}
        assert spool.mounts() == ["b", "c"]
        assert spool.last_seq == 2


async def test_meta_round_trip(spool_path: Path) -> None:
    """Meta values are stored, replaced and read back; unknown keys are None."""
    with Spool(spool_path) as spool:
        assert spool.get_meta("stream") is None
        spool.set_meta("stream", "one")
        spool.set_meta("stream", "two")
        assert spool.get_meta("stream") == "two"


# -- crashes and bad disks -----------------------------------------------------------------

WRITER = textwrap.dedent("""
    import asyncio, os, random, sys
    import structlog
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    from pathlib import Path
    from watcher.core.model import Kind
    from watcher.delivery.events import Record
    from watcher.delivery.spool import Spool

    async def main() -> None:
        spool = Spool(Path(sys.argv[1]))
        seq = spool.last_seq
        rnd = random.Random(seq)
        while True:
            n = rnd.randint(1, 40)
            records = [Record(s, "m", "t", b"%d:" % s + b"y" * 500)
                       for s in range(seq + 1, seq + n + 1)]
            lists = {"m": {b"/%d" % r.seq: Kind.ADDED for r in records}}
            await spool.append(records, lists=lists)
            seq += n
            spool.ack("sink", seq - 1)
            os.write(1, b"%d\\n" % seq)

    asyncio.run(main())
""")


def test_kill_9_loses_nothing_acknowledged(spool_path: Path) -> None:
    """After kill -9 in the middle of appending, every append that returned is there, whole."""
    spool_path.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    acked = 0
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(spool_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert child.stdout is not None
        try:
            target = acked + 200 + 97 * round_
            while acked < target:
                line = child.stdout.readline()
                assert line, "writer exited early"
                acked = int(line)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        with Spool(spool_path) as spool:
            assert spool.last_seq >= acked
            records = spool.read(0, spool.last_seq + 1)
            assert [r.seq for r in records] == list(range(1, spool.last_seq + 1))
            assert all(r.body.startswith(b"%d:" % r.seq) for r in records)
            assert len(spool.load_list("m")) == spool.last_seq
            assert spool.cursor("sink") >= acked - 1
            acked = spool.last_seq


def test_second_opener_is_refused(spool_path: Path) -> None:
    """A spool file already open elsewhere cannot be opened again."""
    with Spool(spool_path), pytest.raises(SpoolError, match="in use"):
        Spool(spool_path)
    Spool(spool_path).close()


def test_corrupt_database_is_a_clear_error(spool_path: Path) -> None:
    """A file that is not a SQLite database gives SpoolError naming it."""
    spool_path.parent.mkdir(parents=True)
    spool_path.write_bytes(b"definitely not sqlite\n" * 500)
    with pytest.raises(SpoolError, match=str(spool_path)):
        Spool(spool_path)


def test_foreign_database_is_refused(spool_path: Path) -> None:
    """A SQLite database that is not a spool is refused, not written to."""
    import sqlite3

    spool_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(spool_path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    with pytest.raises(SpoolError, match="not a layerwatch spool"):
        Spool(spool_path)


@needs_root
@pytest.mark.root
def test_read_only_directory(tmp_path: Path) -> None:
    """A spool in a read-only directory gives SpoolError naming the path."""
    with tmpfs(tmp_path / "ro", "1m") as ro:
        remount_ro(ro)
        for path in (ro / "spool.db", ro / "sub" / "spool.db"):
            with pytest.raises(SpoolError, match=str(path)):
                Spool(path)


@needs_root
@pytest.mark.root
def test_read_only_filesystem_with_existing_spool(tmp_path: Path) -> None:
    """An existing spool on a file system made read-only gives SpoolError naming it."""
    with tmpfs(tmp_path / "fs", "1m") as fs:
        Spool(fs / "spool.db").close()
        remount_ro(fs)
        with pytest.raises(SpoolError, match=str(fs / "spool.db")):
            Spool(fs / "spool.db")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr is not installed")
def test_unwritable_file(spool_path: Path) -> None:
    """An existing spool file that cannot be written gives SpoolError naming it."""
    Spool(spool_path).close()
    if ROOT:
        if subprocess.run(["chattr", "+i", str(spool_path)], check=False).returncode != 0:
            pytest.skip("the file system does not support the immutable flag")
    else:
        spool_path.chmod(0o444)
    try:
        with pytest.raises(SpoolError, match=f"{spool_path}: file is not writable"):
            Spool(spool_path)
    finally:
        if ROOT:
            subprocess.run(["chattr", "-i", str(spool_path)], check=True)


@needs_root
@pytest.mark.root
async def test_full_disk(tmp_path: Path) -> None:
    """On a full disk append raises SpoolError; what was appended before survives a reopen."""
    body = os.urandom(4000)
    with tmpfs(tmp_path / "small", "1m") as small:
        path = small / "spool.db"
        written: list[Record] = []
        with Spool(path) as spool:
            with pytest.raises(SpoolError, match=f"{path}: append failed") as info:  # noqa: PT012
                for _ in range(100):
                    records = [Record(len(written) + i + 1, "m", "t", body) for i in range(10)]
                    last = records[-1].seq
                    await spool.append(records, lists={"m": {b"/%d" % last: Kind.ADDED}})
                    written += records
            assert "full" in str(info.value)
            assert len(written) >= 100
            assert spool.last_seq == len(written)
            assert bare(spool.read(0, 1000)) == written
            assert len(spool.load_list("m")) == len(written) // 10
            spool.ack("web", 5)
        with Spool(path) as spool:
            assert spool.last_seq == len(written)
            assert bare(spool.read(0, 1000)) == written
            assert len(spool.load_list("m")) == len(written) // 10
            assert spool.cursor("web") == 5


class _ReadAtCommit:
    """Wraps the writer connection: right after each COMMIT, before ``append`` has counted
    the records, reads what a sink would read then."""

    def __init__(self, spool: Spool) -> None:
        self._conn = spool._writer
        self._spool = spool
        self.seen: list[tuple[int, int]] = []  # (highest seq read, last_seq at that moment)

    def execute(self, sql: str, *args: Any) -> object:
        result = self._conn.execute(sql, *args)
        if sql == "COMMIT":
            records = self._spool.read(0, 1000)
            if records:
                self.seen.append((records[-1].seq, self._spool.last_seq))
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_read_never_returns_what_last_seq_does_not_count(spool_path: Path) -> None:
    """A record committed but not yet counted in last_seq is not readable (so never acked)."""
    with Spool(spool_path) as spool:
        probe = _ReadAtCommit(spool)
        spool._writer = probe  # type: ignore[assignment]
        asyncio.run(spool.append(batch(1, 3)))
        asyncio.run(spool.append(batch(4, 3)))
        assert probe.seen, "the probe read nothing"
        for highest, last_seq in probe.seen:
            assert highest <= last_seq
        spool._writer = probe._conn
        spool.ack("sink", spool.read(0, 100)[-1].seq)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_second_opener_through_a_link_is_refused(spool_path: Path, link: str) -> None:
    """The lock belongs to the file: another name for it (symlink, hard link) is refused."""
    alias = spool_path.with_name("alias.db")
    with Spool(spool_path):
        if link == "symlink":
            alias.symlink_to(spool_path)
        else:
            os.link(spool_path, alias)
        with pytest.raises(SpoolError, match="in use"):
            Spool(alias)
    Spool(alias).close()


def test_epoch_is_kept_and_a_new_spool_gets_a_new_one(spool_path: Path) -> None:
    """A spool keeps its epoch across opens; one made after it (a lost spool) has a later one."""
    with Spool(spool_path) as spool:
        first = spool.epoch
        asyncio.run(spool.append(batch(1, 2)))
    with Spool(spool_path) as spool:
        assert spool.epoch == first
        assert {r.epoch for r in spool.read(0, 10)} == {first}
    for name in os.listdir(spool_path.parent):
        os.unlink(spool_path.parent / name)
    time.sleep(0.002)
    with Spool(spool_path) as spool:
        assert spool.last_seq == 0
        assert spool.epoch > first


async def test_intake_keeps_records_of_a_cancelled_put_in_order(spool_path: Path) -> None:
    """A put cancelled while it waits (the intake busy) has queued its records already: the
    sequence the publisher numbered has no hole, and the next put continues it."""
    from watcher.delivery.intake import Intake

    with Spool(spool_path) as spool:
        intake = Intake(spool)
        async with intake._changed:  # the writer holds the intake for a moment
            put = asyncio.create_task(intake.put(batch(1, 2), {}))
            await asyncio.sleep(0)
            put.cancel()
        await asyncio.wait({put})
        await intake.put(batch(3, 1), {})
        writer = asyncio.create_task(intake.run())
        async with asyncio.timeout(5):
            await intake.flush()
        writer.cancel()
        await asyncio.wait({writer})
        assert [r.seq for r in spool.read(0, 10)] == [1, 2, 3]


async def test_intake_bounds_the_bytes_waiting_for_a_commit(spool_path: Path) -> None:
    """A put that brings the pending bytes to ``max_pending_bytes`` waits (however few the
    records) until the writer has taken them; what it queued is committed, in order."""
    from watcher.delivery.intake import Intake

    records = batch(1, 4)
    size = sum(len(r.body) for r in records)
    with Spool(spool_path) as spool:
        intake = Intake(spool, max_pending_bytes=size)
        small = asyncio.create_task(intake.put(records[:3], {}))
        await asyncio.sleep(0.05)
        assert small.done()  # under the bound: no wait
        full = asyncio.create_task(intake.put(records[3:], {}))
        await asyncio.sleep(0.05)
        assert not full.done()  # at the bound, with 4 records of 65,536 allowed
        writer = asyncio.create_task(intake.run())
        async with asyncio.timeout(5):
            await full
            await intake.flush()
        writer.cancel()
        await asyncio.wait({writer})
        assert [r.seq for r in spool.read(0, 10)] == [1, 2, 3, 4]


def _change(seq: int, path: bytes, mount: str = "m") -> Record:
    return dataclasses.replace(rec(seq, mount=mount), path=path)


async def test_changes_since_names_each_path_once_with_what_it_is_now(spool_path: Path) -> None:
    """Paths touched after N, each with its kind now (None: out of the list again) and the seq
    of its last event; other mounts' paths and earlier ones are not in the answer."""
    from watcher.delivery.spool import Since

    with Spool(spool_path) as spool:
        await spool.append(
            [_change(1, b"/a"), _change(2, b"/b"), _change(3, b"/x", mount="other")],
            lists={"m": {b"/a": Kind.ADDED, b"/b": Kind.ADDED}, "other": {b"/x": Kind.ADDED}},
        )
        await spool.append(
            [_change(4, b"/b"), _change(5, b"/c"), _change(6, b"/b"), rec(7)],
            lists={"m": {b"/b": None, b"/c": Kind.CHANGED}},
        )
        assert spool.changes_since("m", 2) == Since(
            since=2, head=7, resync=False, paths=[(b"/b", None, 6), (b"/c", Kind.CHANGED, 5)]
        )
        assert [p for p, _, _ in spool.changes_since("m", 0).paths] == [b"/a", b"/b", b"/c"]
        assert spool.changes_since("m", 7).paths == []
        assert spool.changes_since("other", 3).paths == []


async def test_changes_since_a_resync_holds_the_whole_list(spool_path: Path) -> None:
    """After a resync of the mount, what changed in between is not known path by path: the
    answer says so and holds every entry of the list."""
    with Spool(spool_path) as spool:
        await spool.append(
            [_change(1, b"/a"), _change(2, b"/b")],
            lists={"m": {b"/a": Kind.ADDED, b"/b": Kind.ADDED}},
        )
        resync = Record(3, "m", "io.layerwatch.resync", b"{}")
        await spool.append([resync, _change(4, b"/c")], lists={"m": {b"/c": Kind.ADDED}})
        since = spool.changes_since("m", 2)
        assert since.resync
        assert since.paths == [
            (b"/a", Kind.ADDED, 3),
            (b"/b", Kind.ADDED, 3),
            (b"/c", Kind.ADDED, 4),
        ]
        assert not spool.changes_since("m", 3).resync


async def test_changes_since_a_pruned_position_is_lost(spool_path: Path) -> None:
    """A position older than the retained records, or ahead of the head, is PositionLost
    naming the oldest answerable one; pruning drops the index rows with the records."""
    from watcher.delivery.spool import PositionLost

    with Spool(spool_path, max_bytes=64 * 2) as spool:
        await spool.append([_change(seq, b"/%d" % seq) for seq in range(1, 6)])
        spool.prune(time.time())
        assert spool.first_seq == 4
        assert [s for _, _, s in spool.changes_since("m", 3).paths] == [4, 5]
        with pytest.raises(PositionLost, match="older than the spool keeps") as lost:
            spool.changes_since("m", 2)
        assert lost.value.oldest == 3
        with pytest.raises(PositionLost, match="ahead of"):
            spool.changes_since("m", 6)
        spool.drop_list("m")
        assert spool.changes_since("m", 3).paths == []


async def test_a_schema_1_spool_is_upgraded_and_answers_from_then_on(spool_path: Path) -> None:
    """A spool made before the index (schema 1) opens, is upgraded, and answers for
    positions from its head at the upgrade on; older ones are PositionLost."""
    import sqlite3

    from watcher.delivery.spool import PositionLost

    with Spool(spool_path) as spool:
        await spool.append([_change(1, b"/a"), _change(2, b"/b")])
    conn = sqlite3.connect(spool_path)  # what schema 1 left: no index, version 1
    conn.executescript(
        "DROP TABLE touched; DELETE FROM meta WHERE key = 'touched_from'; PRAGMA user_version = 1;"
    )
    conn.close()
    with Spool(spool_path) as spool:
        await spool.append([_change(3, b"/c")])
        assert spool.changes_since("m", 2).paths == [(b"/c", None, 3)]
        with pytest.raises(PositionLost):
            spool.changes_since("m", 1)
