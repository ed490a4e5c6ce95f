"""The faults: each breaks one thing, waits, and undoes what it did in a ``finally`` (the
watch limit is put back, the ballast removed, the broker restarted, the receiver answers 200
again), so a failure or Ctrl-C in the middle leaves nothing broken behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from soakkit.rig import WATCHES_MARK
from soakkit.schedule import Planned

if TYPE_CHECKING:
    from soakkit.harness import Harness

__all__ = ["MAX_USER_WATCHES", "inject", "inotify_watches_in_use", "kill_orphans"]

MAX_USER_WATCHES: Final = Path("/proc/sys/fs/inotify/max_user_watches")
MAX_QUEUED_EVENTS: Final = Path("/proc/sys/fs/inotify/max_queued_events")
WATCHES_LOCK: Final = Path("/tmp/lw-soak.watch-limit.lock")
"""Held (flock) while a harness has the watch limit lowered."""
ORPHAN_ARGV: Final = b"sleep\x003599\x00"
"""The command line of the child the exec sink's command leaves behind."""


async def inject(h: Harness, planned: Planned) -> None:
    """Inject one planned fault (and undo it)."""
    await _IMPLEMENTATIONS[planned.fault.kind](h, planned)


async def _kill9(h: Harness, planned: Planned) -> None:
    h.ledger.fault("kill9")
    h.service.kill()
    await asyncio.sleep(0.5)
    await h.restart("after kill -9")


async def _sigterm_restart(h: Harness, planned: Planned) -> None:
    took = await h.stop_service("sigterm_restart")
    h.ledger.fault("sigterm_restart", f"stopped in {took:.1f}s")
    await h.restart("after SIGTERM")


async def _sigstop(h: Harness, planned: Planned) -> None:
    rate = h.profile.phases[planned.phase].rate or 0
    queued = int(MAX_QUEUED_EVENTS.read_text())
    seconds = 2.0 if rate == 0 else min(max(1.2 * queued / rate, 2.0), 12.0)
    h.keep_load(planned, seconds)
    before = await h.service.metric("inotify_overflows_total")
    h.service.stop()
    try:
        await asyncio.sleep(seconds)
    finally:
        h.service.cont()
    await asyncio.sleep(1.5)  # the hub reads the overflow at the queue's end
    await h.wait_ready(10.0)
    after = await h.service.metric("inotify_overflows_total")
    overflowed = before is not None and after is not None and after > before
    h.overflows += int(overflowed)
    h.ledger.fault(
        "sigstop",
        f"{seconds:.1f}s at {h.profile.phases[planned.phase].label}, "
        f"{'overflowed' if overflowed else 'no overflow'}",
    )


def inotify_watches_in_use(uid: int = 0) -> int:
    """inotify watches held by processes of ``uid`` (what ``max_user_watches`` counts)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}", "rb") as info:
                    total += sum(1 for line in info if line.startswith(b"inotify wd:"))
    return total


async def _watch_limit(h: Harness, planned: Planned) -> None:
    # One harness at a time on this machine: a second one would read the lowered value as
    # the one to put back, and leave the limit lowered for good.
    lock = os.open(WATCHES_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with contextlib.closing(os.fdopen(lock, "rb")):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h.ledger.fault("watch_limit", "skipped: another harness holds the watch limit")
            return
        original = MAX_USER_WATCHES.read_text()
        h.keep_load(planned, planned.fault.seconds)
        used = await asyncio.to_thread(inotify_watches_in_use)
        reached = len(h.service.log_events("watch_limit_reached"))
        mark = h.rig.base / WATCHES_MARK  # for clean_stale, should the harness be SIGKILLed
        mark.write_text(original)
        try:
            MAX_USER_WATCHES.write_text(f"{max(used, 1)}\n")
            await asyncio.sleep(planned.fault.seconds)
        finally:
            MAX_USER_WATCHES.write_text(original)
            mark.unlink()
    degraded = len(h.service.log_events("watch_limit_reached")) - reached
    h.ledger.fault(
        "watch_limit",
        f"{original.strip()} -> {used} for {planned.fault.seconds:g}s, "
        f"{degraded} mount(s) degraded",
    )


async def _broker_kill(h: Harness, planned: Planned) -> None:
    name = "nats" if planned.fault.kind == "nats_kill" else "redis"
    server = h.brokers.get(name)
    if server is None:
        h.ledger.fault(planned.fault.kind, f"skipped: no {name} server")
        return
    h.ledger.fault(planned.fault.kind)
    h.keep_load(planned, planned.fault.seconds)
    server.kill()
    try:
        await asyncio.sleep(planned.fault.seconds)
    finally:
        await asyncio.to_thread(server.start)
        h.rig.record(server.proc.pid if server.proc else None)


async def _webhook(h: Harness, planned: Planned) -> None:
    mode = planned.fault.kind.removeprefix("webhook_")
    before = h.receiver.answers.get(mode, 0)
    h.keep_load(planned, planned.fault.seconds)
    h.receiver.mode = mode
    try:
        await asyncio.sleep(planned.fault.seconds)
    finally:
        h.receiver.mode = "ok"
    h.ledger.fault(planned.fault.kind, f"{h.receiver.answers.get(mode, 0) - before} answered so")


async def _spool_full(h: Harness, planned: Planned) -> None:
    ballast = h.rig.spool_dir / "ballast"
    h.keep_load(planned, planned.fault.seconds + 1)
    stops_before = len(h.service.log_events("intake_stopped"))
    try:
        filled = await asyncio.to_thread(_fill, ballast)
        await asyncio.sleep(planned.fault.seconds)
    finally:
        with contextlib.suppress(FileNotFoundError):
            ballast.unlink()
    stopped = len(h.service.log_events("intake_stopped")) > stops_before
    h.ledger.fault(
        "spool_full",
        f"{filled >> 20} MiB ballast, {'intake stopped' if stopped else 'intake not hit'}",
    )


def _fill(ballast: Path) -> int:
    """Write ``ballast`` until its filesystem is full; the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        with contextlib.suppress(OSError):  # the last few pages
            while True:
                written += os.write(fd, chunk[:4096])
    finally:
        os.close(fd)
    return written


async def _spool_deleted(h: Harness, planned: Planned) -> None:
    try:
        head = int((await h.service.request("GET", "/healthz"))["head_seq"])
    except Exception:  # unreachable or malformed: what the sinks have seen
        head = max((c.head for c in h.consumers.values()), default=0)
    took = await h.stop_service("spool_deleted")
    for path in h.rig.spool_dir.iterdir():
        if path.is_file():
            path.unlink()
    h.new_epoch()  # before the first event of the new spool can reach an output
    await h.restart("after the spool was deleted")
    first = await h.service.first_seq()
    restarted = first is None or first <= head
    if not restarted:
        h.same_epoch()
    h.ledger.fault(
        "spool_deleted",
        f"stopped in {took:.1f}s; old head {head}, new spool starts at {first}"
        + (" (sequence restarted)" if restarted else ""),
    )


async def _sink_raises(h: Harness, planned: Planned) -> None:
    failed = len(h.service.log_events("sink_send_failed"))
    h.keep_load(planned, planned.fault.seconds)
    h.fault_trigger.touch()
    try:
        await asyncio.sleep(planned.fault.seconds)
    finally:
        with contextlib.suppress(FileNotFoundError):
            h.fault_trigger.unlink()
    failed = len(h.service.log_events("sink_send_failed")) - failed
    h.ledger.fault("sink_raises", f"{failed} failed send(s) logged")


async def _exec_orphan(h: Harness, planned: Planned) -> None:
    left = _orphans(h.orphan_pids)
    h.keep_load(planned, planned.fault.seconds)
    h.orphan_flag.touch()
    try:
        await asyncio.sleep(planned.fault.seconds)
    finally:
        with contextlib.suppress(FileNotFoundError):
            h.orphan_flag.unlink()
    h.ledger.fault("exec_orphan", f"{_orphans(h.orphan_pids) - left} child(ren) left behind")


def _orphans(pid_file: Path) -> int:
    try:
        return len(pid_file.read_text().split())
    except FileNotFoundError:
        return 0


def kill_orphans(pid_file: Path) -> int:
    """SIGKILL the children the exec sink's command left (only those whose command line is
    the harness's ``sleep``); how many."""
    killed = 0
    with contextlib.suppress(FileNotFoundError):
        for word in pid_file.read_text().split():
            with contextlib.suppress(OSError, ValueError):
                pid = int(word)
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if cmdline.read() != ORPHAN_ARGV:
                        continue
                os.kill(pid, 9)
                killed += 1
    return killed


async def _jsonl_dir_removed(h: Harness, planned: Planned) -> None:
    h.ledger.fault("jsonl_dir_removed", str(h.audit_path.parent))
    shutil.rmtree(h.audit_path.parent, ignore_errors=True)


async def _spool_twice(h: Harness, planned: Planned) -> None:
    """A second service whose spool path reaches the running one's file through a symlinked
    directory: it must be refused at start (the spool's lock is on the file itself), and the
    first one must not notice."""
    link = h.rig.base / "spool-link"
    if not link.is_symlink():
        link.symlink_to(h.rig.spool_dir)
    config = h.rig.base / "second.toml"
    config.write_text(
        f'[spool]\npath = "{link / h.rig.spool_path.name}"\n'
        f'[discovery]\nmountpoint_glob = "{h.rig.base}/nothing/*"\n'
    )
    second = await asyncio.create_subprocess_exec(
        h.service.command,
        "run",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=dict(h.service.env),
    )
    try:
        async with asyncio.timeout(20):
            _, err = await second.communicate()
    except TimeoutError:
        second.kill()
        _, err = await second.communicate()
    refused = second.returncode == 1 and b"in use" in err
    h.ledger.fault("spool_twice", f"second run exited {second.returncode}")
    h.ledger.check(
        "spool_one_owner",
        refused and h.service.alive(),
        lambda: (
            f"second run exited {second.returncode} ({err.decode(errors='replace')[-200:]!r}); "
            f"first {'alive' if h.service.alive() else 'gone'}"
        ),
    )


async def _branch_replaced(h: Harness, planned: Planned) -> None:
    candidates = [spec for spec in h.rig.mounts if spec.loaded and spec.name != "big"]
    spec = candidates[h.rig.replaced % len(candidates)]
    h.ledger.fault("branch_replaced", f"{spec.name} ({spec.kind})")
    h.stop_load()
    try:
        await asyncio.to_thread(h.rig.replace_branch, spec)
    finally:
        h.start_load(planned.phase)


_IMPLEMENTATIONS: Final[dict[str, Callable[[Harness, Planned], Awaitable[None]]]] = {
    "kill9": _kill9,
    "sigterm_restart": _sigterm_restart,
    "sigstop": _sigstop,
    "watch_limit": _watch_limit,
    "nats_kill": _broker_kill,
    "redis_kill": _broker_kill,
    "webhook_500": _webhook,
    "webhook_429": _webhook,
    "webhook_timeout": _webhook,
    "spool_full": _spool_full,
    "spool_deleted": _spool_deleted,
    "sink_raises": _sink_raises,
    "exec_orphan": _exec_orphan,
    "jsonl_dir_removed": _jsonl_dir_removed,
    "spool_twice": _spool_twice,
    "branch_replaced": _branch_replaced,
}
