"""The built-in sinks (stdout, jsonl, exec), their discovery by entry point, and the test kit."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.builtin.command import ExecSink
from watcher.delivery.builtin.jsonl import JsonlSink
from watcher.delivery.builtin.stdout import StdoutSink
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options, available_sinks, load_sink
from watcher.delivery.runner import RunnerConfig, SinkRunner
from watcher.delivery.sinks import Sink
from watcher.testing import FlakySink, MemoryLog, MemorySink, check_sink_contract, make_records


def ids(data: bytes) -> list[str]:
    """The event ids of JSON lines."""
    return [orjson.loads(line)["id"] for line in data.splitlines()]


def record_ids(records: list[Record]) -> list[str]:
    """The event ids of records."""
    return [r.id for r in records]


@contextlib.contextmanager
def piped_stdout() -> Iterator[int]:
    """sys.stdout replaced by the write end of a real pipe; yields the read end.

    Used inside the test body: pytest's own capture resets sys.stdout between test phases.
    """
    read_fd, write_fd = os.pipe()
    saved = sys.stdout
    writer = io.TextIOWrapper(open(write_fd, "wb"))  # noqa: SIM115 - closed below
    sys.stdout = writer
    try:
        yield read_fd
    finally:
        sys.stdout = saved
        writer.close()
        with contextlib.suppress(OSError):
            os.close(read_fd)


def listing(directory: Path) -> list[str]:
    """The sorted names in ``directory``."""
    return sorted(p.name for p in directory.iterdir())


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (and is not a zombie)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def pids_in(path: Path) -> list[int]:
    """The pids a test command wrote to ``path``, one a line."""
    try:
        return [int(word) for word in path.read_text().split()]
    except FileNotFoundError:
        return []


async def wait_for_pids(path: Path, count: int) -> list[int]:
    """The pids in ``path`` once there are ``count`` of them (within 5 s)."""
    for _ in range(500):
        pids = pids_in(path)
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} holds {pids_in(path)}, expected {count} pids")


async def all_gone(pids: list[int], within: float = 2.0) -> bool:
    """Whether every process in ``pids`` has exited (zombies count as gone) within ``within`` s."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """A file test commands append their pids to; any still alive after the test are killed."""
    path = tmp_path / "pids"
    yield path
    for pid in pids_in(path):
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def read_available(fd: int) -> bytes:
    """What the pipe holds now."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


# -- stdout ------------------------------------------------------------------------------------


async def test_stdout_writes_one_line_per_event() -> None:
    """stdout gets each event body followed by a newline, in order."""
    sink = StdoutSink("out", {})
    batch = make_records(1, 5)
    with piped_stdout() as read_fd:
        await sink.open()
        await sink.send(batch)
        await sink.close()
        assert read_available(read_fd) == b"".join(r.body + b"\n" for r in batch)


async def test_stdout_closed_pipe_rejects() -> None:
    """When the reader of stdout went away, batches are rejected and health says why."""
    sink = StdoutSink("out", {})
    with piped_stdout() as read_fd:
        os.close(read_fd)
        await sink.open()
        with capture_logs() as logs, pytest.raises(SinkRejected, match="broken pipe"):
            await sink.send(make_records(1, 2))
    assert [e["event"] for e in logs] == ["stdout_closed"]
    assert not sink.health().ok
    with pytest.raises(SinkRejected):
        await sink.send(make_records(3, 1))


async def test_stdout_keeps_the_contract() -> None:
    """The stdout sink passes the sink contract checks."""
    with piped_stdout() as read_fd:
        await check_sink_contract(StdoutSink, {})
        assert len(read_available(read_fd).splitlines()) == 6


# -- jsonl -------------------------------------------------------------------------------------


async def test_jsonl_appends_lines(tmp_path: Path) -> None:
    """The jsonl sink appends whole lines across batches and reopenings."""
    path = tmp_path / "sub" / "events.jsonl"
    for start in (1, 4):
        sink = JsonlSink("j", {"path": str(path)})
        await sink.open()
        await sink.send(make_records(start, 3))
        await sink.close()
    assert ids(path.read_bytes()) == [f"test:1:{n}" for n in range(1, 7)]


async def test_jsonl_rotates_and_keeps_files(tmp_path: Path) -> None:
    """Rotation moves full files to path.1.., drops beyond keep, and never splits a line."""
    path = tmp_path / "events.jsonl"
    records = make_records(1, 20)
    line = len(records[0].body) + 1
    assert all(len(r.body) + 1 == line for r in records[:9])
    sink = JsonlSink("j", {"path": str(path), "max_bytes": 3 * line, "keep": 2})
    await sink.open()
    await sink.send(records[:4])
    await sink.send(records[4:9])
    await sink.close()
    assert listing(tmp_path) == [
        "events.jsonl",
        "events.jsonl.1",
        "events.jsonl.2",
    ]
    assert ids(path.read_bytes()) == ["test:1:7", "test:1:8", "test:1:9"]
    assert ids((tmp_path / "events.jsonl.1").read_bytes()) == ["test:1:4", "test:1:5", "test:1:6"]
    assert ids((tmp_path / "events.jsonl.2").read_bytes()) == ["test:1:1", "test:1:2", "test:1:3"]
    assert all((tmp_path / name).stat().st_size <= 3 * line for name in listing(tmp_path))


async def test_jsonl_line_larger_than_max_bytes_gets_its_own_file(tmp_path: Path) -> None:
    """A line above max_bytes is written whole into a file of its own."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink("j", {"path": str(path), "max_bytes": 10, "keep": 5})
    await sink.open()
    await sink.send(make_records(1, 3))
    await sink.close()
    assert ids(path.read_bytes()) == ["test:1:3"]
    assert ids((tmp_path / "events.jsonl.1").read_bytes()) == ["test:1:2"]
    assert ids((tmp_path / "events.jsonl.2").read_bytes()) == ["test:1:1"]


@pytest.mark.parametrize("good_lines", [0, 2])
async def test_jsonl_repairs_a_torn_last_line(tmp_path: Path, good_lines: int) -> None:
    """On open, a last line without its newline is truncated away and logged."""
    path = tmp_path / "events.jsonl"
    good = b"".join(r.body + b"\n" for r in make_records(1, good_lines))
    torn = make_records(good_lines + 1, 1)[0].body[:17]
    path.write_bytes(good + torn)
    sink = JsonlSink("j", {"path": str(path)})
    with capture_logs() as logs:
        await sink.open()
    assert path.read_bytes() == good
    [event] = [e for e in logs if e["event"] == "jsonl_torn_line_truncated"]
    assert event["dropped"] == len(torn)
    await sink.send(make_records(good_lines + 1, 1))
    await sink.close()
    assert ids(path.read_bytes()) == [f"test:1:{n}" for n in range(1, good_lines + 2)]


async def test_jsonl_write_failure_is_retryable(tmp_path: Path) -> None:
    """A full disk (here /dev/full) makes send raise SinkUnavailable and health not ok."""
    sink = JsonlSink("j", {"path": "/dev/full", "fsync": "never"})
    await sink.open()
    with pytest.raises(SinkUnavailable, match="No space left"):
        await sink.send(make_records(1, 1))
    assert not sink.health().ok
    await sink.close()


@pytest.mark.parametrize("removal", ["directory", "file", "rename"])
async def test_jsonl_follows_its_path_when_the_file_goes(tmp_path: Path, removal: str) -> None:
    """When the file or its directory is removed (or renamed away), the next batch is written
    to a new file at the path (directory recreated) and a jsonl_reopened warning is logged."""
    directory = tmp_path / "logs"
    path = directory / "events.jsonl"
    sink = JsonlSink("j", {"path": str(path)})
    await sink.open()
    await sink.send(make_records(1, 2))
    if removal == "directory":
        shutil.rmtree(directory)
    elif removal == "file":
        path.unlink()
    else:
        path.rename(directory / "events.jsonl.old")
    with capture_logs() as logs:
        await sink.send(make_records(3, 2))
        await sink.send(make_records(5, 1))
    assert ids(path.read_bytes()) == ["test:1:3", "test:1:4", "test:1:5"]
    [event] = [e for e in logs if e["event"] == "jsonl_reopened"]
    assert event["log_level"] == "warning"
    assert event["reason"] == "missing"
    assert event["path"] == str(path)
    assert sink.health().ok
    await sink.close()
    if removal == "rename":
        assert ids((directory / "events.jsonl.old").read_bytes()) == ["test:1:1", "test:1:2"]


async def test_jsonl_follows_its_path_when_the_file_is_replaced(tmp_path: Path) -> None:
    """A different file renamed onto the path gets the next batch, logged as replaced."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink("j", {"path": str(path)})
    await sink.open()
    await sink.send(make_records(1, 2))
    other = tmp_path / "other.jsonl"
    other.write_bytes(b"".join(r.body + b"\n" for r in make_records(100, 1)))
    other.rename(path)
    with capture_logs() as logs:
        await sink.send(make_records(3, 1))
    await sink.close()
    assert ids(path.read_bytes()) == ["test:1:100", "test:1:3"]
    assert [e["reason"] for e in logs if e["event"] == "jsonl_reopened"] == ["replaced"]


async def test_jsonl_rewrites_a_batch_whose_file_went_during_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory removed between the write and the fsync: the batch is written again at the path.

    The removal is timed by running it just before the real fsync of the batch.
    """
    directory = tmp_path / "logs"
    path = directory / "events.jsonl"
    sink = JsonlSink("j", {"path": str(path)})
    await sink.open()
    await sink.send(make_records(1, 1))
    real_fsync = os.fsync
    removed: list[int] = []

    def remove_then_fsync(fd: int) -> None:
        if not removed:
            removed.append(fd)
            shutil.rmtree(directory)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", remove_then_fsync)
    with capture_logs() as logs:
        await sink.send(make_records(2, 3))
    monkeypatch.undo()
    await sink.close()
    assert removed
    assert ids(path.read_bytes()) == ["test:1:2", "test:1:3", "test:1:4"]
    assert [e["reason"] for e in logs if e["event"] == "jsonl_reopened"] == ["missing"]


async def test_jsonl_rotates_after_its_directory_was_removed(tmp_path: Path) -> None:
    """Size rotation keeps working in a recreated directory."""
    directory = tmp_path / "logs"
    path = directory / "events.jsonl"
    records = make_records(1, 6)
    line = len(records[0].body) + 1
    sink = JsonlSink("j", {"path": str(path), "max_bytes": 3 * line, "keep": 2})
    await sink.open()
    await sink.send(records[:2])
    shutil.rmtree(directory)
    await sink.send(records[2:])
    await sink.close()
    assert listing(directory) == ["events.jsonl", "events.jsonl.1"]
    assert ids((directory / "events.jsonl.1").read_bytes()) == ["test:1:3", "test:1:4", "test:1:5"]
    assert ids(path.read_bytes()) == ["test:1:6"]


async def test_jsonl_rename_then_reopen_starts_a_new_file(tmp_path: Path) -> None:
    """logrotate's rename then SIGHUP (the runner's reopen): a fresh file, no reopen warning."""
    path = tmp_path / "events.jsonl"
    log = MemoryLog(make_records(1, 2))
    stop = asyncio.Event()
    with capture_logs() as logs:
        runner = SinkRunner(JsonlSink("j", {"path": str(path)}), log, RunnerConfig())
        task = asyncio.create_task(runner.run(stop))
        for _ in range(500):
            if log.cursor("j") == 2:
                break
            await asyncio.sleep(0.01)
        path.rename(tmp_path / "events.jsonl.1")
        runner.reopen()
        log.extend(make_records(3, 2))
        for _ in range(500):
            if log.cursor("j") == 4:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
    assert ids((tmp_path / "events.jsonl.1").read_bytes()) == ["test:1:1", "test:1:2"]
    assert ids(path.read_bytes()) == ["test:1:3", "test:1:4"]
    assert not [e for e in logs if e["event"] == "jsonl_reopened"]


@pytest.mark.parametrize("fsync", ["batch", "interval", "never"])
async def test_jsonl_keeps_the_contract(tmp_path: Path, fsync: str) -> None:
    """The jsonl sink passes the sink contract checks under every fsync policy."""
    path = tmp_path / "c.jsonl"
    options = {"path": str(path), "fsync": fsync, "fsync_interval": 0.01}
    await check_sink_contract(JsonlSink, options)
    assert len(ids(path.read_bytes())) == 6


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "sinks.j.path"),
        ({"path": ""}, "sinks.j.path"),
        ({"path": "x", "fsync": "sometimes"}, "sinks.j.fsync"),
        ({"path": "x", "keep": 0}, "sinks.j.keep"),
        ({"path": "x", "max_bytes": -1}, "sinks.j.max_bytes"),
        ({"path": "x", "max_bytes": "1M"}, "sinks.j.max_bytes"),
        ({"path": "x", "fsync_interval": 0}, "sinks.j.fsync_interval"),
        ({"path": "x", "rotate": True}, "sinks.j.rotate"),
    ],
)
def test_jsonl_bad_options_name_the_key(options: Mapping[str, object], key: str) -> None:
    """Missing, malformed and unknown jsonl options raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        JsonlSink("j", options)
    assert info.value.key == key


# -- exec --------------------------------------------------------------------------------------


def sh(script: str, *args: str, **options: object) -> ExecSink:
    """An exec sink running ``sh -c script sh args...``."""
    return ExecSink("x", {"command": ["sh", "-c", script, "sh", *args], **options})


async def test_exec_feeds_batches_on_stdin(tmp_path: Path) -> None:
    """The command gets the batch as JSON lines on stdin, once per send."""
    out = tmp_path / "out.jsonl"
    sink = sh('cat >> "$1"', str(out))
    await sink.open()
    await sink.send(make_records(1, 3))
    await sink.send(make_records(4, 2))
    await sink.close()
    assert ids(out.read_bytes()) == [f"test:1:{n}" for n in range(1, 6)]
    assert sink.health().ok


async def test_exec_failure_is_retryable_and_stderr_logged() -> None:
    """A non-zero exit raises SinkUnavailable and the command's stderr is logged."""
    sink = sh("cat > /dev/null; echo 'remote said no' >&2; exit 3")
    with capture_logs() as logs, pytest.raises(SinkUnavailable, match="status 3"):
        await sink.send(make_records(1, 2))
    [event] = [e for e in logs if e["event"] == "exec_failed"]
    assert event["stderr"] == "remote said no\n"
    assert event["sink"] == "x"
    assert not sink.health().ok


async def test_exec_timeout_kills_the_command(tmp_path: Path) -> None:
    """A command that outlives the timeout is killed and the send is retryable."""
    pidfile = tmp_path / "pid"
    sink = sh('echo $$ > "$1"; exec sleep 60', str(pidfile), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="did not finish"):
        await sink.send(make_records(1, 1))
    assert time.monotonic() - started < 5
    assert not alive(int(pidfile.read_text()))


async def test_exec_cancelled_send_kills_the_command(tmp_path: Path) -> None:
    """Cancelling a send (runner shutdown) kills the running command."""
    pidfile = tmp_path / "pid"
    sink = sh('echo $$ > "$1"; exec sleep 60', str(pidfile))
    task = asyncio.create_task(sink.send(make_records(1, 1)))
    for _ in range(1000):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)


# Commands that leave a process behind in their group; each appends its pids to "$1".
BACKGROUND = 'echo $$ >> "$1"; sleep 60 & echo $! >> "$1"; wait'
FOREGROUND = 'echo $$ >> "$1"; sh -c \'echo $$ >> "$1"; exec sleep 60\' sh "$1"; cat > /dev/null'
IGNORES_TERM = 'trap "" TERM; ' + BACKGROUND


@pytest.mark.parametrize(
    "script", [BACKGROUND, FOREGROUND, IGNORES_TERM], ids=["background", "foreground", "no-term"]
)
async def test_exec_timeout_kills_the_process_group(pidfile: Path, script: str) -> None:
    """At the timeout the command's whole process group is killed, grandchildren holding its
    pipes included, and the send fails retryably at once instead of waiting for them."""
    sink = sh(script, str(pidfile), timeout=0.3)
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(SinkUnavailable, match="did not finish"):
        await asyncio.wait_for(sink.send(make_records(1, 1)), 5)
    assert time.monotonic() - started < 3
    pids = pids_in(pidfile)
    assert len(pids) == 2
    assert await all_gone(pids)
    assert [e["event"] for e in logs if e["event"].startswith("exec_")] == ["exec_timeout"]
    assert not sink.health().ok


async def test_exec_runner_retries_a_command_that_leaves_a_child(
    tmp_path: Path, pidfile: Path
) -> None:
    """Through a runner: each timed-out run is retried with backoff while health is not ok and
    nothing is acknowledged; once the command works the batch is delivered and health is ok."""
    fixed, out = tmp_path / "fixed", tmp_path / "out.jsonl"
    script = 'if [ -e "$2" ]; then exec cat >> "$3"; fi; ' + BACKGROUND
    log = MemoryLog(make_records(1, 3))
    stop = asyncio.Event()
    with capture_logs() as logs:
        sink = sh(script, str(pidfile), str(fixed), str(out), timeout=0.2)
        runner = SinkRunner(sink, log, RunnerConfig(backoff_base=0.05, backoff_cap=0.1))
        task = asyncio.create_task(runner.run(stop))
        for _ in range(500):
            if runner.retries >= 2:
                break
            await asyncio.sleep(0.01)
        assert runner.retries >= 2
        health = runner.health()
        assert not health.ok
        assert "did not finish" in health.detail
        assert log.cursor("x") == 0
        fixed.touch()
        for _ in range(500):
            if log.cursor("x") == 3:
                break
            await asyncio.sleep(0.01)
        assert runner.health().ok
        stop.set()
        await asyncio.wait_for(task, 5)
    failed = [e for e in logs if e["event"] == "sink_send_failed"]
    assert len(failed) >= 2
    assert all("did not finish" in e["error"] for e in failed)
    assert ids(out.read_bytes()) == ["test:1:1", "test:1:2", "test:1:3"]
    pids = pids_in(pidfile)
    assert len(pids) >= 4
    assert await all_gone(pids)


@pytest.mark.parametrize("redirect", ["", " > /dev/null 2>&1"], ids=["on-the-pipes", "detached"])
async def test_exec_success_kills_what_the_command_left_running(
    pidfile: Path, redirect: str
) -> None:
    """Exit 0 acknowledges at once even if a background child holds the output pipes; what the
    command left running in its process group is killed and logged."""
    sink = sh(f'cat > /dev/null; sleep 60{redirect} & echo $! >> "$1"', str(pidfile), timeout=5)
    started = time.monotonic()
    with capture_logs() as logs:
        await asyncio.wait_for(sink.send(make_records(1, 2)), 4)
    assert time.monotonic() - started < 3
    assert sink.health().ok
    assert await all_gone(pids_in(pidfile))
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["exec_leftovers_killed"]


async def test_exec_output_held_by_an_escaped_process_is_not_waited_for(pidfile: Path) -> None:
    """A process that left the group (setsid) and holds the output pipes is not waited for:
    the pipes are closed shortly after the command exits, and that is logged."""
    escape = 'setsid sh -c \'echo $$ >> "$1"; exec sleep 60\' sh "$1" &'
    wait = 'until [ -s "$1" ]; do sleep 0.01; done'  # exit only once it left the group
    sink = sh(f"cat > /dev/null; {escape} {wait}", str(pidfile), timeout=10)
    started = time.monotonic()
    with capture_logs() as logs:
        await asyncio.wait_for(sink.send(make_records(1, 1)), 5)
    assert time.monotonic() - started < 3
    assert sink.health().ok
    assert "exec_output_held_open" in [e["event"] for e in logs]


async def test_exec_close_kills_an_inflight_command(pidfile: Path) -> None:
    """close() kills the process group of a command still running; its send fails retryably."""
    sink = sh(BACKGROUND, str(pidfile))
    await sink.open()
    task = asyncio.create_task(sink.send(make_records(1, 1)))
    pids = await wait_for_pids(pidfile, 2)
    await asyncio.wait_for(sink.close(), 2)
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done
    with pytest.raises(SinkUnavailable):
        task.result()
    assert await all_gone(pids)


async def test_exec_cancelled_send_kills_the_process_group(pidfile: Path) -> None:
    """Cancelling a send (runner shutdown) kills the command's group and finishes promptly."""
    sink = sh(BACKGROUND, str(pidfile))
    task = asyncio.create_task(sink.send(make_records(1, 1)))
    pids = await wait_for_pids(pidfile, 2)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)
    assert task in done
    assert task.cancelled()
    assert await all_gone(pids)


async def test_exec_binary_output_is_logged_truncated() -> None:
    """Large binary output on stdout and stderr is logged decoded and cut to 4 KiB."""
    script = "head -c 100000 /dev/urandom; head -c 100000 /dev/urandom >&2; exit 1"
    sink = sh(script)
    with capture_logs() as logs, pytest.raises(SinkUnavailable, match="status 1"):
        await asyncio.wait_for(sink.send(make_records(1, 1)), 5)
    [event] = [e for e in logs if e["event"] == "exec_failed"]
    for stream in ("stdout", "stderr"):
        assert isinstance(event[stream], str)
        assert 0 < len(event[stream]) <= 4096


async def test_exec_missing_program_is_retryable(tmp_path: Path) -> None:
    """A program that cannot be started raises SinkUnavailable."""
    sink = ExecSink("x", {"command": [str(tmp_path / "no-such-program")]})
    with pytest.raises(SinkUnavailable, match="cannot run"):
        await sink.send(make_records(1, 1))


async def test_exec_debounce_batches_a_burst(tmp_path: Path) -> None:
    """With debounce, a burst of events inside the window triggers one run of the command."""
    out, runs = tmp_path / "out.jsonl", tmp_path / "runs"
    sink = sh('cat >> "$1"; echo run >> "$2"', str(out), str(runs), debounce=0.3)
    log = MemoryLog()
    stop = asyncio.Event()
    task = asyncio.create_task(SinkRunner(sink, log, RunnerConfig()).run(stop))
    for start in range(1, 10, 3):
        log.extend(make_records(start, 3))
        await asyncio.sleep(0.02)
    for _ in range(1000):
        if log.cursor("x") == 9:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert ids(out.read_bytes()) == [f"test:1:{n}" for n in range(1, 10)]
    assert runs.read_text() == "run\n"


async def test_exec_keeps_the_contract(tmp_path: Path) -> None:
    """The exec sink passes the sink contract checks."""
    out = tmp_path / "out.jsonl"
    await check_sink_contract(ExecSink, {"command": ["sh", "-c", f"cat >> {out}"]})
    assert len(ids(out.read_bytes())) == 6


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "sinks.x.command"),
        ({"command": "cat >> /tmp/x"}, "sinks.x.command"),
        ({"command": []}, "sinks.x.command"),
        ({"command": ["cat", 1]}, "sinks.x.command"),
        ({"command": ["cat"], "timeout": 0}, "sinks.x.timeout"),
        ({"command": ["cat"], "debounce": -1}, "sinks.x.debounce"),
        ({"command": ["cat"], "shell": True}, "sinks.x.shell"),
    ],
)
def test_exec_bad_options_name_the_key(options: Mapping[str, object], key: str) -> None:
    """A command that is not a list of strings, and other bad options, raise ConfigError."""
    with pytest.raises(ConfigError) as info:
        ExecSink("x", options)
    assert info.value.key == key


# -- discovery and the test kit ----------------------------------------------------------------


def test_builtin_sinks_are_discovered() -> None:
    """The built-in sinks are found through the layerwatch.sinks entry points."""
    assert {"stdout", "jsonl", "exec", "webhook"} <= set(available_sinks())


def test_load_sink_builds_by_type(tmp_path: Path) -> None:
    """load_sink builds the sink of the named type with its options."""
    sink = load_sink("audit", "jsonl", {"path": str(tmp_path / "a.jsonl")})
    assert isinstance(sink, JsonlSink)
    assert isinstance(sink, Sink)
    assert sink.name == "audit"


def test_load_sink_unknown_type_lists_the_known() -> None:
    """An unknown type raises ConfigError on sinks.NAME.type, listing the known types."""
    with pytest.raises(ConfigError) as info:
        load_sink("audit", "carrier-pigeon", {})
    assert info.value.key == "sinks.audit.type"
    assert "carrier-pigeon" in info.value.problem
    assert "jsonl" in info.value.problem
    assert "webhook" in info.value.problem


def test_load_sink_passes_option_errors_through() -> None:
    """A bad option surfaces as the sink's own ConfigError naming the option."""
    with pytest.raises(ConfigError) as info:
        load_sink("audit", "exec", {"command": "rm -rf /"})
    assert info.value.key == "sinks.audit.command"


async def test_contract_passes_for_the_memory_sink() -> None:
    """The test kit's memory sink passes its own contract checks."""
    await check_sink_contract(MemorySink, {})


async def test_contract_catches_a_hanging_send() -> None:
    """The contract checks fail for a sink whose send never returns."""
    with pytest.raises(AssertionError, match="send did not finish"):
        await check_sink_contract(FlakySink, {"mode": "hang"}, deadline=0.2)


async def test_contract_catches_ignored_unknown_options() -> None:
    """The contract checks fail for a sink that accepts unknown options silently."""

    class Lax(MemorySink):
        def __init__(self, name: str, options: Mapping[str, object]) -> None:
            super().__init__(name)

    with pytest.raises(AssertionError, match="unknown option"):
        await check_sink_contract(Lax, {})


# -- docs/sinks.md -----------------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "sinks.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of ``language`` in docs/sinks.md."""
    parts = DOC.read_text().split("```")
    return [p.removeprefix(language + "\n") for p in parts[1::2] if p.startswith(language + "\n")]


def test_doc_config_example_loads() -> None:
    """The sink table in docs/sinks.md is valid TOML that load_sink accepts."""
    table = tomllib.loads(doc_blocks("toml")[0])["sinks"]["audit"]
    sink = load_sink("audit", table.pop("type"), table)
    assert isinstance(sink, JsonlSink)
    assert sink.keep == 10


async def test_doc_example_sink_keeps_the_contract(tmp_path: Path) -> None:
    """The example sink in docs/sinks.md and its example test both run."""
    example, example_test = doc_blocks("python")
    namespace: dict[str, object] = {"check_sink_contract": check_sink_contract}
    exec(example, namespace)
    exec(example_test, namespace)
    test = namespace["test_counting_sink_keeps_the_contract"]
    assert callable(test)
    await test(tmp_path)
    assert (tmp_path / "counts").read_text() == "3\n3\n"


def test_options_reader_types_and_names_keys() -> None:
    """Options returns typed values and names sinks.NAME.OPTION for each kind of bad value."""
    opts = Options("s", {"flag": True, "n": 3, "x": 1.5, "words": ["a"], "map": {"k": "v"}})
    assert opts.boolean("flag") is True
    assert opts.boolean("absent", False) is False
    assert opts.integer("n", minimum=1) == 3
    assert opts.number("x") == 1.5
    assert opts.string_list("words") == ("a",)
    assert opts.string_map("map") == {"k": "v"}
    opts.finish()
    for value, getter in [(1, "boolean"), (True, "integer"), (float("nan"), "number")]:
        with pytest.raises(ConfigError) as info:
            getattr(Options("s", {"o": value}), getter)("o")
        assert info.value.key == "sinks.s.o"
