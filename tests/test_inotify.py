"""The inotify adapter against the real kernel inotify, on temporary directories."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import resource
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from watcher.core.errors import WatchError, WatchLimitError
from watcher.live.inotify import (
    DIR_MASK,
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_Q_OVERFLOW,
    Inotify,
    RawEvent,
    read_limits,
)

_SYSCTL = Path("/proc/sys/fs/inotify")
_KIND_BITS = (
    IN_CREATE
    | IN_DELETE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_ATTRIB
    | IN_DELETE_SELF
    | IN_IGNORED
    | IN_Q_OVERFLOW
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="writes /proc/sys/fs/inotify sysctls")


@pytest.fixture
async def ino() -> AsyncIterator[Inotify]:
    """A fresh inotify instance, closed afterwards."""
    with Inotify() as instance:
        yield instance


@pytest.fixture
def top(tmp_path: Path) -> bytes:
    """The temporary directory as bytes."""
    return os.fsencode(tmp_path)


async def read_until(
    ino: Inotify, done: Callable[[list[RawEvent]], bool], within: float = 5.0
) -> list[RawEvent]:
    """Read batches until ``done(all events so far)`` holds."""
    events: list[RawEvent] = []
    async with asyncio.timeout(within):
        while not done(events):
            events.extend(await ino.read())
    return events


def has(mask: int, name: bytes) -> Callable[[list[RawEvent]], bool]:
    """A predicate: some event carries all of ``mask`` for ``name``."""
    return lambda events: any(e.mask & mask == mask and e.name == name for e in events)


def summary(events: list[RawEvent]) -> list[tuple[int, bytes]]:
    """(event bits without flags, name) per event."""
    return [(e.mask & _KIND_BITS, e.name) for e in events]


def touch(path: bytes, data: bytes = b"") -> None:
    """Create (or truncate) the file at ``path`` and write ``data``."""
    with open(path, "wb") as file:
        file.write(data)


def slurp(path: bytes) -> bytes:
    """Open, read and close the file at ``path``."""
    with open(path, "rb") as file:
        return file.read()


@contextlib.contextmanager
def sysctl(name: str, value: int) -> Iterator[int]:
    """Set /proc/sys/fs/inotify/NAME for the block; restore it on exit, whatever happens."""
    path = _SYSCTL / name
    original = path.read_text()
    path.write_text(f"{value}\n")
    try:
        yield int(original)
    finally:
        path.write_text(original)


def watches_in_use(uid: int) -> int:
    """Count the inotify watches held by processes of ``uid`` (from /proc/*/fdinfo)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as info:
                    total += sum(1 for line in info if line.startswith(b"inotify wd:"))
        except OSError:  # the process or fd went away while we looked
            continue
    return total


async def test_file_lifecycle_events_arrive_in_order(ino: Inotify, top: bytes) -> None:
    """Create, write, chmod and delete of a file give the matching events, in kernel order."""
    wd = ino.add_watch(top)
    path = os.path.join(top, b"f")
    touch(path, b"x")
    os.chmod(path, 0o600)
    os.unlink(path)
    events = await read_until(ino, has(IN_DELETE, b"f"))
    assert {e.wd for e in events} == {wd}
    assert summary(events) == [
        (IN_CREATE, b"f"),
        (IN_MODIFY, b"f"),
        (IN_CLOSE_WRITE, b"f"),
        (IN_ATTRIB, b"f"),
        (IN_DELETE, b"f"),
    ]


async def test_parsed_events_are_frozen_equal_and_hashable(ino: Inotify, top: bytes) -> None:
    """Events from read() behave like RawEvent(...): equal, same hash, immutable."""
    wd = ino.add_watch(top)
    os.mkdir(os.path.join(top, b"d"))
    (event,) = await read_until(ino, has(IN_CREATE, b"d"))
    expected = RawEvent(wd=wd, mask=IN_CREATE | IN_ISDIR, cookie=0, name=b"d")
    assert event == expected
    assert hash(event) == hash(expected)
    assert repr(event) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = b"other"  # type: ignore[misc]


async def test_directory_events_carry_isdir(ino: Inotify, top: bytes) -> None:
    """mkdir and rmdir of a child give IN_CREATE and IN_DELETE with IN_ISDIR."""
    ino.add_watch(top)
    os.mkdir(os.path.join(top, b"d"))
    os.rmdir(os.path.join(top, b"d"))
    events = await read_until(ino, has(IN_DELETE, b"d"))
    assert [(e.mask, e.name) for e in events] == [
        (IN_CREATE | IN_ISDIR, b"d"),
        (IN_DELETE | IN_ISDIR, b"d"),
    ]


async def test_reads_do_not_generate_events(ino: Inotify, top: bytes) -> None:
    """Opening, reading and listing a watched directory's files queue nothing (no access/open)."""
    path = os.path.join(top, b"r")
    touch(path, b"data")
    ino.add_watch(top)
    assert slurp(path) == b"data"
    os.listdir(top)
    os.mkdir(os.path.join(top, b"marker"))
    events = await read_until(ino, has(IN_CREATE, b"marker"))
    assert summary(events) == [(IN_CREATE, b"marker")]


async def test_rename_pairs_by_cookie(ino: Inotify, top: bytes) -> None:
    """A rename within and across watched dirs gives MOVED_FROM/MOVED_TO with one shared cookie."""
    other = os.path.join(top, b"other")
    os.mkdir(other)
    wd_top = ino.add_watch(top)
    wd_other = ino.add_watch(other)
    touch(os.path.join(top, b"a"))
    os.rename(os.path.join(top, b"a"), os.path.join(top, b"b"))
    os.rename(os.path.join(top, b"b"), os.path.join(other, b"c"))
    events = await read_until(ino, has(IN_MOVED_TO, b"c"))
    moves = [e for e in events if e.mask & (IN_MOVED_FROM | IN_MOVED_TO)]
    assert [(e.wd, e.mask, e.name) for e in moves] == [
        (wd_top, IN_MOVED_FROM, b"a"),
        (wd_top, IN_MOVED_TO, b"b"),
        (wd_top, IN_MOVED_FROM, b"b"),
        (wd_other, IN_MOVED_TO, b"c"),
    ]
    assert moves[0].cookie == moves[1].cookie != 0
    assert moves[2].cookie == moves[3].cookie != 0
    assert moves[0].cookie != moves[2].cookie


async def test_move_out_of_watched_tree_is_unpaired(
    ino: Inotify, top: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A move to an unwatched directory gives only MOVED_FROM, no MOVED_TO."""
    outside = os.fsencode(tmp_path_factory.mktemp("outside"))
    ino.add_watch(top)
    touch(os.path.join(top, b"leaving"))
    os.rename(os.path.join(top, b"leaving"), os.path.join(outside, b"gone"))
    os.mkdir(os.path.join(top, b"marker"))
    events = await read_until(ino, has(IN_CREATE, b"marker"))
    assert summary(events)[2:] == [(IN_MOVED_FROM, b"leaving"), (IN_CREATE, b"marker")]
    assert not any(e.mask & IN_MOVED_TO for e in events)


async def test_non_utf8_file_name_arrives_as_raw_bytes(ino: Inotify, top: bytes) -> None:
    """A file named with invalid UTF-8 (and a newline) arrives byte for byte."""
    names = [b"caf\xe9", b"\xff\xfe", b"line\nbreak"]
    ino.add_watch(top)
    for name in names:
        touch(os.path.join(top, name))
    events = await read_until(ino, has(IN_CLOSE_WRITE, names[-1]))
    assert [e.name for e in events if e.mask & IN_CREATE] == names


@pytest.mark.parametrize("dirname", [b"d\xff\xfe", b"new\nline", "ünïcode".encode()])
async def test_directory_with_any_name_can_be_watched(
    ino: Inotify, top: bytes, dirname: bytes
) -> None:
    """Directories named with invalid UTF-8 or a newline can be watched, and report events."""
    path = os.path.join(top, dirname)
    os.mkdir(path)
    wd = ino.add_watch(path)
    os.mkdir(os.path.join(path, b"inner\x80"))
    events = await read_until(ino, has(IN_CREATE, b"inner\x80"))
    assert events == [RawEvent(wd, IN_CREATE | IN_ISDIR, 0, b"inner\x80")]


async def test_events_on_watched_dir_itself_have_empty_name(ino: Inotify, top: bytes) -> None:
    """Deleting a watched dir gives IN_DELETE_SELF then IN_IGNORED, both with name b""."""
    sub = os.path.join(top, b"sub")
    os.mkdir(sub)
    wd = ino.add_watch(sub)
    os.rmdir(sub)
    events = await read_until(ino, lambda evs: any(e.mask & IN_IGNORED for e in evs))
    assert [(e.wd, e.mask & _KIND_BITS, e.name) for e in events] == [
        (wd, IN_DELETE_SELF, b""),
        (wd, IN_IGNORED, b""),
    ]


async def test_rm_watch_after_directory_deleted_does_not_raise(ino: Inotify, top: bytes) -> None:
    """rm_watch of a wd the kernel already dropped (dir deleted, or never valid) is a no-op."""
    sub = os.path.join(top, b"sub")
    os.mkdir(sub)
    wd = ino.add_watch(sub)
    os.rmdir(sub)
    await read_until(ino, lambda evs: any(e.mask & IN_IGNORED for e in evs))
    ino.rm_watch(wd)
    ino.rm_watch(2**30)


async def test_rm_watch_queues_ignored_and_stops_events(ino: Inotify, top: bytes) -> None:
    """After rm_watch the wd reports IN_IGNORED and nothing more."""
    sub = os.path.join(top, b"sub")
    os.mkdir(sub)
    wd_sub = ino.add_watch(sub)
    ino.add_watch(top)
    ino.rm_watch(wd_sub)
    touch(os.path.join(sub, b"unseen"))
    touch(os.path.join(top, b"seen"))
    events = await read_until(ino, has(IN_CLOSE_WRITE, b"seen"))
    assert [(e.wd, e.mask) for e in events if e.wd == wd_sub] == [(wd_sub, IN_IGNORED)]
    assert all(e.name != b"unseen" for e in events)


async def test_same_inode_gives_same_wd(ino: Inotify, top: bytes) -> None:
    """Watching an inode twice, even through another path, returns the same wd."""
    sub = os.path.join(top, b"sub")
    os.mkdir(sub)
    wd = ino.add_watch(sub)
    assert ino.add_watch(sub + b"/.") == wd
    assert ino.add_watch(top) != wd


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda top: os.path.join(top, b"missing\xff"), "ENOENT"),
        (lambda top: _file(os.path.join(top, b"plain")), "ENOTDIR"),
        (lambda top: _symlink_to_dir(top), "ENOTDIR"),
    ],
    ids=["missing", "file", "symlink-to-dir"],
)
async def test_add_watch_failure_names_path_and_errno(
    ino: Inotify, top: bytes, make: Callable[[bytes], bytes], code: str
) -> None:
    """A path that is missing, not a directory, or a symlink raises WatchError naming both."""
    path = make(top)
    with pytest.raises(WatchError) as info:
        ino.add_watch(path)
    assert not isinstance(info.value, WatchLimitError)
    message = str(info.value)
    assert code in message
    assert os.path.basename(path).decode("utf-8", "backslashreplace") in message
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == getattr(errno, code)


def _file(path: bytes) -> bytes:
    touch(path)
    return path


def _symlink_to_dir(top: bytes) -> bytes:
    link = os.path.join(top, b"link")
    os.symlink(top, link)
    return link


async def test_add_watch_rejects_nul_byte(ino: Inotify, top: bytes) -> None:
    """A path with a NUL byte is refused with WatchError, not silently truncated."""
    with pytest.raises(WatchError, match="NUL"):
        ino.add_watch(top + b"\0/etc")


async def test_one_read_drains_a_burst(ino: Inotify, top: bytes) -> None:
    """A single read() returns a whole queued burst (batched reads), in kernel order."""
    paths = [os.path.join(top, b"f%03d" % i) for i in range(100)]
    for path in paths:
        touch(path)
    ino.add_watch(top, IN_ATTRIB)
    for i in range(3000):
        os.utime(paths[i % len(paths)])
    events = await ino.read()
    assert len(events) > 1000
    names = [os.path.basename(path) for path in paths]
    assert [e.name for e in events] == [names[i % len(names)] for i in range(len(events))]


async def test_cancelled_read_leaves_instance_usable(ino: Inotify, top: bytes) -> None:
    """Cancelling a read() that is waiting loses nothing: the next read gets the next events."""
    ino.add_watch(top)
    waiting = asyncio.create_task(ino.read())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    os.mkdir(os.path.join(top, b"after"))
    events = await read_until(ino, has(IN_CREATE, b"after"))
    assert summary(events) == [(IN_CREATE, b"after")]


async def test_second_concurrent_reader_is_refused(ino: Inotify, top: bytes) -> None:
    """Only one task reads at a time; a second read() raises RuntimeError."""
    ino.add_watch(top)
    first = asyncio.create_task(ino.read())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="already"):
        await ino.read()
    os.mkdir(os.path.join(top, b"wake"))
    async with asyncio.timeout(5):
        assert (await first)[0].name == b"wake"


async def test_close_is_idempotent_and_final(top: bytes) -> None:
    """close() twice is fine; afterwards every operation raises WatchError."""
    ino = Inotify()
    fd = ino.fileno()
    ino.close()
    ino.close()
    assert ino.closed
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    with pytest.raises(WatchError):
        ino.fileno()
    with pytest.raises(WatchError):
        ino.add_watch(top)
    with pytest.raises(WatchError):
        ino.rm_watch(1)
    with pytest.raises(WatchError):
        await ino.read()


async def test_close_wakes_a_waiting_reader(top: bytes) -> None:
    """close() while a task waits in read() makes that read raise WatchError."""
    ino = Inotify()
    ino.add_watch(top)
    waiting = asyncio.create_task(ino.read())
    await asyncio.sleep(0.01)
    ino.close()
    async with asyncio.timeout(5):
        with pytest.raises(WatchError, match="closed"):
            await waiting


async def test_async_context_manager_closes() -> None:
    """``async with Inotify()`` closes the instance on exit."""
    async with Inotify() as ino:
        assert not ino.closed
    assert ino.closed


def test_descriptor_is_nonblocking_and_cloexec() -> None:
    """The inotify fd is non-blocking and not inherited by child processes."""
    with Inotify() as ino:
        assert not os.get_blocking(ino.fileno())
        assert not os.get_inheritable(ino.fileno())


def test_dir_mask_asks_for_mutations_only() -> None:
    """DIR_MASK never asks for access/open/close-nowrite events (our own reads stay silent)."""
    in_access, in_close_nowrite, in_open = 0x1, 0x10, 0x20
    assert DIR_MASK & (in_access | in_close_nowrite | in_open) == 0
    assert DIR_MASK & _KIND_BITS == _KIND_BITS & ~(IN_IGNORED | IN_Q_OVERFLOW)


def test_read_limits_matches_proc() -> None:
    """read_limits() returns the three /proc/sys/fs/inotify values."""
    limits = read_limits()
    assert limits.max_user_watches == int((_SYSCTL / "max_user_watches").read_text())
    assert limits.max_user_instances == int((_SYSCTL / "max_user_instances").read_text())
    assert limits.max_queued_events == int((_SYSCTL / "max_queued_events").read_text())


def test_init_emfile_names_the_limits() -> None:
    """When no fd can be opened, Inotify() raises WatchError naming max_user_instances."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        with pytest.raises(WatchError, match=r"EMFILE.*fs\.inotify\.max_user_instances"):
            Inotify()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.root
@needs_root
async def test_queue_overflow_reaches_the_reader(top: bytes) -> None:
    """With a 16-event queue, a burst yields IN_Q_OVERFLOW (wd -1) as the last event."""
    with sysctl("max_queued_events", 16):
        ino = Inotify()  # the queue length is fixed at creation
    with ino:
        ino.add_watch(top, IN_CREATE)
        for i in range(40):
            os.mkdir(os.path.join(top, b"d%d" % i))
        events = await read_until(ino, lambda evs: any(e.mask & IN_Q_OVERFLOW for e in evs))
    assert events[-1] == RawEvent(-1, IN_Q_OVERFLOW, 0, b"")
    assert [e.name for e in events[:-1]] == [b"d%d" % i for i in range(16)]


@pytest.mark.root
@needs_root
async def test_watch_limit_raises_watch_limit_error(ino: Inotify, top: bytes) -> None:
    """ENOSPC gives WatchLimitError naming the path, the limit and the sysctl; then recovers."""
    dirs = [os.path.join(top, b"w%02d" % i) for i in range(64)]
    for path in dirs:
        os.mkdir(path)
    failed: WatchLimitError | None = None
    limit = watches_in_use(os.geteuid()) + 8
    with sysctl("max_user_watches", limit):  # shared by the whole uid: keep this window short
        for path in dirs:
            try:
                ino.add_watch(path)
            except WatchLimitError as exc:
                failed, failed_path = exc, path
                break
    assert failed is not None, "64 watches did not hit a limit of in-use + 8"
    message = str(failed)
    assert "fs.inotify.max_user_watches" in message
    assert f"= {limit}" in message
    assert "1.3 KB" in message
    assert failed_path.decode() in message
    assert ino.add_watch(failed_path) > 0  # limit restored: the same path can be watched now
