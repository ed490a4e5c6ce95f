"""``layerwatch run CONFIG``: many mounts, one inotify instance, a durable spool, the sinks.

Ownership: an ``AsyncExitStack`` owns resources (spool, inotify, hub, mounts), a
``TaskGroup`` owns tasks (the hub's reader, one runner per sink, the housekeeping ticker,
the API). Shutdown is a protocol: a signal sets ``stop``; the hub passes the sync barrier so
every change already made is published, then a bookmark; the runners drain what the spool
holds under the deadline; everything else is cancelled; resources unwind in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from watcher.changes import Change
from watcher.config import Config, DiscoveryConfig, MountConfig, SinkConfig
from watcher.delivery import Filter, RunnerConfig, SinkRunner
from watcher.discovery import Discovered, MountEvent, MountSource
from watcher.errors import LayerwatchError, MountError
from watcher.events import GAP
from watcher.hub import Hub
from watcher.inotify import Inotify
from watcher.intake import Intake
from watcher.layers import LowerStack
from watcher.mounts import Driver, Filesystem, find_mount
from watcher.plugins import load_sink
from watcher.publisher import Publisher
from watcher.spool import Spool
from watcher.tracker import Tracker
from watcher.watch import install_stop_signals

__all__ = ["MountState", "Service", "discovered_name", "filesystem_for"]

log = structlog.get_logger("layerwatch.service")


def filesystem_for(mount: MountConfig) -> Filesystem:
    """The ``Filesystem`` a mount's config describes (not mounted yet for managed mounts).

    Raises:
        MountError: an attached mountpoint has nothing (or no writable overlay) mounted.
    """
    driver = Driver.AUFS if mount.whiteouts == "aufs" else Driver.OVERLAY
    if mount.managed:
        assert mount.rw is not None
        assert mount.mountpoint is not None
        return Filesystem(
            mount.layers,
            mount.rw,
            mount.mountpoint,
            work=mount.work,
            driver=driver,
            userxattr=mount.userxattr,
        )
    if mount.upper is not None:
        return Filesystem(
            mount.lowers,
            mount.upper,
            mount.mountpoint or os.devnull,
            driver=driver,
            userxattr=mount.userxattr,
        )
    assert mount.mountpoint is not None
    return Filesystem.attach(mount.mountpoint)


def discovered_name(found: Discovered) -> str:
    """A discovered mount's name: ``docker-<container id[:12]>`` and the like, stable across
    restarts (so its persisted list is found again), else ``overlay-<dev>-<inode>`` of its
    upper dir.

    Raises:
        OSError: the upper dir is gone already.
    """
    labels = found.labels
    ident = labels.get("container_id") or labels.get("layer_id")
    if ident:
        return f"{labels.get('runtime', 'overlay')}-{ident[:12]}"
    st = os.stat(found.upper)
    return f"overlay-{st.st_dev:x}-{st.st_ino}"


@dataclass(slots=True)
class MountState:
    """One followed mount, as the API shows it."""

    config: MountConfig
    fs: Filesystem
    tracker: Tracker
    mounted_by_us: bool = False
    errors: list[str] = field(default_factory=list)


class Service:
    """The running service: what ``layerwatch run`` starts and the API reads.

    Args:
        config: the parsed configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mounts: dict[str, MountState] = {}
        self.runners: dict[str, SinkRunner] = {}
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self.hub: Hub | None = None
        self.spool: Spool | None = None
        self.publisher: Publisher | None = None
        self.intake: Intake | None = None

    # -- queries for the API ------------------------------------------------------------------

    def changes(self, mount: str) -> tuple[list[Change], int]:
        """A mount's change list and the sequence number it is consistent at."""
        assert self.publisher is not None
        return self.mounts[mount].tracker.changes(), self.publisher.head_seq

    async def sync(self) -> None:
        """Pass the sync barrier: every change made before the call is published and durable."""
        assert self.hub is not None
        assert self.intake is not None
        await self.hub.sync()
        await self.intake.flush()

    def reopen(self) -> None:
        """SIGHUP: every sink closes and opens again before its next batch (log rotation)."""
        log.info("reopen_requested", sinks=len(self.runners))
        for runner in self.runners.values():
            runner.reopen()

    def degraded(self) -> list[str]:
        """Why the service is not fully healthy (empty when it is)."""
        reasons = [
            f"mount {name}: {state.tracker.degraded}"
            for name, state in self.mounts.items()
            if state.tracker.degraded
        ]
        if self.intake is not None and self.intake.error:
            reasons.append(f"spool: {self.intake.error}")
        reasons += [
            f"sink {name}: {runner.health().detail}"
            for name, runner in self.runners.items()
            if not runner.health().ok
        ]
        return reasons

    # -- life cycle -------------------------------------------------------------------------

    async def run(self, *, signals: bool = True) -> None:
        """Run until ``stop`` is set (or SIGINT/SIGTERM when ``signals``)."""
        async with contextlib.AsyncExitStack() as stack:
            if signals:
                stack.callback(install_stop_signals(self.stop))
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGHUP, self.reopen)
                stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            spool = stack.enter_context(
                Spool(
                    self.config.spool.path,
                    max_bytes=self.config.spool.max_bytes,
                    max_age=self.config.spool.max_age,
                )
            )
            self.spool = spool
            intake = self.intake = Intake(spool)
            self.publisher = Publisher(
                intake.put, first_seq=spool.last_seq + 1, stream=self.config.stream
            )
            inotify = stack.enter_context(Inotify())
            hub = Hub(inotify, self.publisher.publish, rescan_interval=self.config.rescan_interval)
            stack.callback(hub.close)
            self.hub = hub
            for mount in self.config.mounts:
                await self._start_mount(mount, hub, spool, stack)
            for sink in self.config.sinks:
                self.runners[sink.name] = SinkRunner(
                    load_sink(sink.name, sink.type, sink.options), spool, _runner_config(sink)
                )
            sink_stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(intake.run(), name="intake")
                reader = group.create_task(hub.run(), name="hub")
                for name, runner in self.runners.items():
                    group.create_task(runner.run(sink_stop), name=f"sink-{name}")
                ticker = group.create_task(self._housekeeping(), name="housekeeping")
                finder = None
                if self.config.discovery is not None:
                    finder = group.create_task(
                        self._discover(self.config.discovery, hub, spool), name="discovery"
                    )
                api_task = await self._start_api(group)
                log.info("service_started", mounts=len(self.mounts), sinks=len(self.runners))
                self.started.set()
                await self.stop.wait()
                log.info("service_stopping")
                try:
                    async with asyncio.timeout(self.config.shutdown_timeout):
                        await hub.sync()
                except TimeoutError:
                    log.warning("final_sync_timeout")
                for task in (reader, ticker, api_task, finder):
                    if task is not None:
                        task.cancel()
                try:  # a failing spool must not hold the stop: both under the deadline
                    async with asyncio.timeout(self.config.shutdown_timeout):
                        await self.publisher.bookmark()
                        await intake.flush()
                except TimeoutError:
                    log.error("intake_flush_timeout", pending=intake.pending, error=intake.error)
                writer.cancel()
                sink_stop.set()
            log.info("service_stopped", head_seq=self.publisher.head_seq)

    async def _start_api(self, group: asyncio.TaskGroup) -> asyncio.Task[None] | None:
        if self.config.api is None:
            return None
        from watcher.api import serve  # the API pulls in aiohttp's server only when configured

        return group.create_task(serve(self, self.config.api), name="api")

    async def _start_mount(
        self, mount: MountConfig, hub: Hub, spool: Spool, stack: contextlib.AsyncExitStack
    ) -> None:
        fs = filesystem_for(mount)
        mounted_by_us = False
        if mount.managed:
            info = find_mount(fs.mountpoint)
            if info is not None and info.fstype == "overlay" and info.overlay_dirs()[0] == fs.rw:
                log.info("mount_adopted", mount=mount.name)  # left by a run that was killed
                mounted_by_us = True  # still managed: unmounted at stop, like any other
                stack.push_async_callback(self._umount, mount.name, fs)
            elif info is not None:
                raise MountError(
                    f"mounts: {mount.name}: {os.fsdecode(fs.mountpoint)} already has a "
                    f"{info.fstype} mount that is not this mount's rw dir"
                )
            else:
                fs.mount()
                mounted_by_us = True
                stack.push_async_callback(self._umount, mount.name, fs)
        await self._follow(mount, fs, hub, spool, mounted_by_us=mounted_by_us)

    async def _umount(self, name: str, fs: Filesystem) -> None:
        """Unmount a managed mount at stop, off the event loop; a busy one is left mounted
        (the next start adopts it) and said so."""
        try:
            await asyncio.to_thread(fs.umount)
        except MountError as exc:
            log.error("umount_failed", mount=name, error=str(exc))

    async def _follow(
        self,
        mount: MountConfig,
        fs: Filesystem,
        hub: Hub,
        spool: Spool,
        *,
        mounted_by_us: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Start tracking a mount: its snapshot (or, after a restart, what changed) first."""
        assert self.publisher is not None
        if labels:
            self.publisher.labels[mount.name] = dict(labels)
        lower = LowerStack(fs.layers, whiteouts=fs.whiteouts, xattr_prefix=fs.xattr_prefix)
        tracker = Tracker(mount.name, fs.rw, lower, hub, xattr_prefix=fs.xattr_prefix)
        persisted = spool.load_list(mount.name) if mount.name in spool.mounts() else None
        await hub.attach(tracker, tracker.start(persisted))
        self.mounts[mount.name] = MountState(mount, fs, tracker, mounted_by_us)
        log.info(
            "mount_followed",
            mount=mount.name,
            entries=len(tracker.kinds),
            watches=tracker.watch_count,
            restart=persisted is not None,
            **(labels or {}),
        )

    async def _discover(self, discovery: DiscoveryConfig, hub: Hub, spool: Spool) -> None:
        """Follow overlay mounts as they appear in the mount table; release them as they go."""
        assert self.publisher is not None
        source = MountSource(
            mountpoint_glob=discovery.mountpoint_glob,
            docker_root=discovery.docker_root,
            containerd_state=discovery.containerd_state,
            interval=discovery.interval,
            mountinfo=str(discovery.mountinfo),
        )
        names: dict[int, str] = {}  # kernel mount id -> the name it was followed under
        async with contextlib.aclosing(source.changes()) as changes:
            async for change in changes:
                found = change.mount
                if change.event is MountEvent.DISAPPEARED:
                    name = names.pop(found.mount_id, None)
                    if name is not None and name in self.mounts:
                        await hub.detach(name)
                        del self.mounts[name]
                        self.publisher.labels.pop(name, None)
                        await asyncio.to_thread(spool.drop_list, name)
                        log.info("mount_released", mount=name, **found.labels)
                    continue
                if any(s.tracker.upper == found.upper for s in self.mounts.values()):
                    continue  # followed already (a [[mounts]] entry names it)
                try:
                    name = discovered_name(found)
                    if name in self.mounts:
                        raise MountError(f"the name {name!r} is taken by another mount")
                    mount = MountConfig(name=name, mountpoint=Path(os.fsdecode(found.mountpoint)))
                    fs = Filesystem(found.lowers, found.upper, found.mountpoint, work=found.work)
                    await self._follow(mount, fs, hub, spool, labels=found.labels)
                except (OSError, LayerwatchError) as exc:  # gone again before we looked, ...
                    log.warning(
                        "mount_follow_failed",
                        mountpoint=os.fsdecode(found.mountpoint),
                        error=str(exc),
                    )
                    continue
                names[found.mount_id] = name

    async def _housekeeping(self) -> None:
        """Bookmarks and retention, on their own clock."""
        assert self.spool is not None
        assert self.publisher is not None
        last_bookmark = time.monotonic()
        while True:
            await asyncio.sleep(min(5.0, self.config.bookmark_interval))
            pruned = await asyncio.to_thread(self.spool.prune, time.time())
            if pruned is not None:
                log.warning(
                    "spool_gap",
                    first=pruned.first_dropped,
                    last=pruned.last_dropped,
                    consumers=pruned.consumers_behind,
                )
                await self.publisher.control(
                    GAP,
                    {
                        "first_seq": pruned.first_dropped,
                        "last_seq": pruned.last_dropped,
                        "consumers": pruned.consumers_behind,
                        "reason": "retention",
                    },
                )
            if time.monotonic() - last_bookmark >= self.config.bookmark_interval:
                await self.publisher.bookmark()
                last_bookmark = time.monotonic()


def _runner_config(sink: SinkConfig) -> RunnerConfig:
    flt = None
    if sink.mounts is not None or sink.kinds is not None or sink.paths:
        flt = Filter(mounts=sink.mounts, kinds=sink.kinds, paths=sink.paths)
    return RunnerConfig(
        batch_size=sink.batch_size,
        linger=sink.linger,
        backoff_base=sink.backoff_base,
        backoff_cap=sink.backoff_cap,
        dead_letter=sink.dead_letter,
        filter=flt,
    )
