"""The fanotify adapter against the real kernel fanotify, on temporary directories (root)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from watcher.core.errors import WatchError
from watcher.live.fanotify import FILESYSTEM, INODE, AttributedEvent, Fanotify
from watcher.live.inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    RawEvent,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify marks need CAP_SYS_ADMIN")


@pytest.fixture(params=[FILESYSTEM, INODE])
async def fan(request: pytest.FixtureRequest) -> AsyncIterator[Fanotify]:
    """A fresh group with each marking strategy, closed afterwards."""
    with Fanotify(marks=request.param) as group:
        yield group


@pytest.fixture
def top(tmp_path: Path) -> bytes:
    """The temporary directory as bytes."""
    return os.fsencode(tmp_path)


async def read_until(
    fan: Fanotify, done: Callable[[list[RawEvent]], bool], within: float = 5.0
) -> list[RawEvent]:
    """Read batches until ``done(all events so far)`` holds."""
    events: list[RawEvent] = []
    async with asyncio.timeout(within):
        while not done(events):
            events.extend(await fan.read())
    return events


def has(mask: int, name: bytes, wd: int | None = None) -> Callable[[list[RawEvent]], bool]:
    """A predicate: some event carries all of ``mask`` for ``name`` (on ``wd``, if given)."""
    return lambda events: any(
        e.mask & mask == mask and e.name == name and wd in (None, e.wd) for e in events
    )


def touch(path: bytes, data: bytes = b"") -> None:
    """Create (or truncate) the file at ``path`` and write ``data``."""
    with open(path, "wb") as file:
        file.write(data)


async def test_directory_events_arrive_as_inotify_events(fan: Fanotify, top: bytes) -> None:
    """Create, write, chmod, rename, delete: the same bits and names inotify would give."""
    wd = fan.add_watch(top)
    touch(top + b"/f", b"x")
    os.chmod(top + b"/f", 0o600)
    os.rename(top + b"/f", top + b"/g")
    os.mkdir(top + b"/d")
    os.unlink(top + b"/g")
    events = await read_until(fan, has(IN_DELETE, b"g"))
    assert all(e.wd == wd and e.cookie == 0 for e in events)
    for mask, name in [
        (IN_CREATE, b"f"),
        (IN_MODIFY, b"f"),
        (IN_ATTRIB, b"f"),
        (IN_MOVED_FROM, b"f"),
        (IN_MOVED_TO, b"g"),
        (IN_CREATE | IN_ISDIR, b"d"),
    ]:
        assert has(mask, name)(events), (mask, name, events)
    # The kernel may merge an event into a queued one of the same name: order by first seen.
    order = [e.name for e in events if e.mask & (IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE)]
    assert order[:2] == [b"f", b"g"]


async def test_event_on_the_directory_itself_has_an_empty_name(fan: Fanotify, top: bytes) -> None:
    """``.`` (the directory itself) comes out as ``b""``, on the directory's own wd."""
    os.mkdir(top + b"/d")
    fan.add_watch(top)
    wd = fan.add_watch(top + b"/d")
    os.chmod(top + b"/d", 0o700)
    await read_until(fan, has(IN_ATTRIB, b"", wd))


async def test_unfollowed_directories_are_filtered(fan: Fanotify, top: bytes) -> None:
    """Events of a directory nobody follows never reach the caller."""
    os.mkdir(top + b"/followed")
    os.mkdir(top + b"/other")
    wd = fan.add_watch(top + b"/followed")
    for i in range(20):
        touch(top + b"/other/f%d" % i, b"x")
    touch(top + b"/followed/last")
    events = await read_until(fan, has(IN_CREATE, b"last"))
    assert {e.wd for e in events} == {wd}
    assert not [e for e in events if e.name.startswith(b"f")]


async def test_deleted_directory_says_delete_self_then_ignored(fan: Fanotify, top: bytes) -> None:
    """rmdir of a followed directory: IN_DELETE_SELF, IN_IGNORED, and its wd is forgotten."""
    os.mkdir(top + b"/d")
    wd = fan.add_watch(top + b"/d")
    os.rmdir(top + b"/d")
    events = await read_until(fan, has(IN_IGNORED, b"", wd))
    selfs = [e.mask & (IN_DELETE_SELF | IN_IGNORED) for e in events if e.wd == wd]
    assert selfs[-2:] == [IN_DELETE_SELF, IN_IGNORED]
    os.mkdir(top + b"/d")  # a new directory under the old name is a new watch
    assert fan.add_watch(top + b"/d") != wd


async def test_a_moved_directory_keeps_its_wd(fan: Fanotify, top: bytes) -> None:
    """The same inode added again (after a rename) answers the same wd, as inotify does."""
    os.mkdir(top + b"/a")
    wd = fan.add_watch(top + b"/a")
    os.rename(top + b"/a", top + b"/b")
    assert fan.add_watch(top + b"/b") == wd
    touch(top + b"/b/f")
    await read_until(fan, has(IN_CREATE, b"f", wd))


async def test_removed_watch_reports_nothing_more(fan: Fanotify, top: bytes) -> None:
    """After rm_watch the directory's events are dropped; other directories still report."""
    os.mkdir(top + b"/a")
    os.mkdir(top + b"/b")
    gone = fan.add_watch(top + b"/a")
    kept = fan.add_watch(top + b"/b")
    fan.rm_watch(gone)
    fan.rm_watch(gone)  # twice is fine
    touch(top + b"/a/f")
    touch(top + b"/b/f")
    events = await read_until(fan, has(IN_CREATE, b"f", kept))
    assert gone not in {e.wd for e in events}


async def test_last_directory_removes_the_filesystem_mark(top: bytes) -> None:
    """One filesystem mark while directories of it are followed, none after."""
    with Fanotify() as fan:
        wds = [fan.add_watch(top)]
        os.mkdir(top + b"/d")
        wds.append(fan.add_watch(top + b"/d"))
        assert list(fan.strategies.values()) == [FILESYSTEM]
        assert _marks(fan) == ["sdev"]
        for wd in wds:
            fan.rm_watch(wd)
        assert fan.strategies == {}
        assert _marks(fan) == []


async def test_inode_marks_one_per_directory(top: bytes) -> None:
    """``marks="inode"``: one kernel mark per followed directory, removed with its watch."""
    with Fanotify(marks=INODE) as fan:
        os.mkdir(top + b"/d")
        first = fan.add_watch(top)
        fan.add_watch(top + b"/d")
        assert _marks(fan) == ["ino", "ino"]
        fan.rm_watch(first)
        assert _marks(fan) == ["ino"]


def _marks(fan: Fanotify) -> list[str]:
    """The kind of each mark the group holds (``/proc/self/fdinfo``: ``fanotify ino:`` ...)."""
    text = Path(f"/proc/self/fdinfo/{fan.fileno()}").read_text()
    lines = [line.split()[1] for line in text.splitlines() if line.startswith("fanotify ")]
    return [field.split(":")[0] for field in lines if not field.startswith("flags:")]


async def test_attribution_names_the_writer(top: bytes, tmp_path: Path) -> None:
    """With attribution, an event carries the writer's pid, comm, exe and ids."""
    writer = tmp_path / "lw-writer"
    shutil.copy("/bin/sh", writer)  # comm is the executable's base name
    with Fanotify(attribution=True) as fan:
        wd = fan.add_watch(top)
        # It stays to be read: /proc is read when the event is, not when it happened.
        script = f"echo x > {tmp_path}/f; while :; do sleep 1; done"
        child = await asyncio.create_subprocess_exec(str(writer), "-c", script)
        try:
            events = await read_until(fan, has(IN_MODIFY, b"f", wd))
        finally:
            child.kill()
            await child.wait()
    event = next(e for e in events if e.name == b"f")
    assert isinstance(event, AttributedEvent)
    assert event.process is not None
    assert event.process.pid == child.pid
    assert event.process.comm == "lw-writer"
    assert event.process.exe == str(writer)
    assert (event.process.uid, event.process.gid) == (os.geteuid(), os.getegid())
    assert event.process.cgroup is not None


async def test_writer_gone_before_the_read_still_yields_its_event(top: bytes) -> None:
    """A writer that exited before the read: the event comes with its pid and nulls."""
    with Fanotify(attribution=True) as fan:
        wd = fan.add_watch(top)
        done = await asyncio.create_subprocess_exec("sh", "-c", f"echo x > {os.fsdecode(top)}/f")
        assert await done.wait() == 0
        events = await read_until(fan, has(IN_MODIFY, b"f", wd))
    process = next(e for e in events if e.name == b"f").process  # type: ignore[attr-defined]
    assert process is not None
    assert process.pid == done.pid
    assert (process.comm, process.exe, process.uid) == (None, None, None)


async def test_bad_arguments_raise_clear_errors(top: bytes) -> None:
    """An unknown strategy, a file, a missing path, a closed group: each says so."""
    with pytest.raises(ValueError, match="marks must be"):
        Fanotify(marks="mount")
    fan = Fanotify()
    touch(top + b"/file")
    with pytest.raises(WatchError, match="ENOTDIR"):
        fan.add_watch(top + b"/file")
    with pytest.raises(WatchError, match="ENOENT"):
        fan.add_watch(top + b"/missing")
    with pytest.raises(WatchError, match="NUL"):
        fan.add_watch(b"a\0b")
    fan.close()
    fan.close()
    with pytest.raises(WatchError, match="closed"):
        fan.add_watch(top)
    with pytest.raises(WatchError, match="closed"):
        await fan.read()


async def test_close_wakes_a_waiting_reader(top: bytes) -> None:
    """close() while a task waits in read(): the reader gets WatchError, not a hang."""
    fan = Fanotify()
    fan.add_watch(top)
    reader = asyncio.create_task(fan.read())
    await asyncio.sleep(0.05)
    fan.close()
    with pytest.raises(WatchError):
        async with asyncio.timeout(5):
            await reader


async def test_removing_a_moved_directory_keeps_the_mark_of_the_one_now_at_its_path(
    top: bytes,
) -> None:
    """Inode marks are removed through a path: when another followed directory is there now,
    its mark stays (removing it would silence that directory)."""
    with Fanotify(marks=INODE) as fan:
        os.mkdir(top + b"/p")
        old = fan.add_watch(top + b"/p")
        os.rename(top + b"/p", top + b"/moved")
        os.mkdir(top + b"/p")
        new = fan.add_watch(top + b"/p")
        fan.rm_watch(old)  # the tracker drops the old one after adding the new (a rescan)
        touch(top + b"/p/f")
        await read_until(fan, has(IN_CREATE, b"f", new))
