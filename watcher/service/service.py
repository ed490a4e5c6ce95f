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
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from watcher.core.digest import Digester
from watcher.core.errors import ConfigError, LayerwatchError, MountError, SpoolError
from watcher.core.model import Change, Control, Item, Kind, Transition, expand
from watcher.core.mounts import Driver, Filesystem, find_mount
from watcher.delivery.events import GAP, Record
from watcher.delivery.histogram import Histogram
from watcher.delivery.intake import Intake
from watcher.delivery.plugins import load_sink
from watcher.delivery.publisher import Publisher
from watcher.delivery.runner import Filter, RunnerConfig, SinkRunner, backoff_delay
from watcher.delivery.sinks import Sink
from watcher.delivery.spool import Spool
from watcher.live import heap
from watcher.live.discovery import Discovered, MountEvent, MountSource
from watcher.live.fanotify import Fanotify
from watcher.live.hub import Hub
from watcher.live.source import Choice, open_source
from watcher.live.tracker import Branch, MountpointBranch, Tracker
from watcher.service.config import Config, DiscoveryConfig, MountConfig, SinkConfig
from watcher.service.secrets import Secrets
from watcher.service.signals import install_stop_signals

__all__ = ["MountState", "Service", "build_sink", "discovered_name", "filesystem_for"]

logger = structlog.get_logger("layerwatch.service")


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


_FAILURE_SHOWN: Final = 60.0
"""Seconds a component's failure stays in health after it (and after which it counts as
having run well, so its restart backoff starts over)."""


@dataclass(frozen=True, slots=True)
class _Failure:
    at: float
    error: str


@dataclass(slots=True)
class MountState:
    """One followed mount (a ``watcher.http.view.MountView``)."""

    config: MountConfig
    fs: Filesystem
    tracker: Tracker
    mounted_by_us: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The mount's name."""
        return self.config.name

    @property
    def managed(self) -> bool:
        """Whether the service mounted it."""
        return self.config.managed

    @property
    def kinds(self) -> Mapping[bytes, Kind]:
        """The live change list."""
        return self.tracker.kinds

    @property
    def watch_count(self) -> int:
        """inotify watches held for it."""
        return self.tracker.watch_count

    @property
    def attribution(self) -> bool:
        """Whether its change events name their writer (``data.process``)."""
        return self.tracker.attribution

    @property
    def degraded(self) -> str | None:
        """Why it is not followed by inotify alone (None: it is)."""
        degraded = self.tracker.degraded
        return None if degraded is None else str(degraded)

    def changes(self) -> list[Change]:
        """The change list, sorted by path."""
        return self.tracker.changes()

    def resync_items(self, reason: str) -> list[Item]:
        """A resync and a snapshot of the list as it is now."""
        return self.tracker.resync_items(reason)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The parts of a running service; made by ``Service.run``, never partly."""

    spool: Spool
    intake: Intake
    publisher: Publisher
    hub: Hub
    source: Choice


Component = Callable[["Service"], Awaitable[None]]
"""A part the composition root adds to a service (the API): run under supervision once the
service runs, cancelled at stop."""


class Service:
    """The running service: what ``layerwatch run`` starts and the API reads.

    It is a ``watcher.http.view.ServiceView``: the API reads it through that Protocol.

    Args:
        config: the parsed configuration.
        components: parts the composition root adds (the API), by name: each runs under
            supervision once the service runs.
    """

    def __init__(
        self, config: Config, *, components: Mapping[str, Component] | None = None
    ) -> None:
        self.config = config
        self.mounts: dict[str, MountState] = {}
        self.runners: dict[str, SinkRunner] = {}
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self._components = dict(components or {})
        self._runtime: Runtime | None = None
        self.failures: dict[str, _Failure] = {}
        """Per component (``sink NAME``, ``mount NAME``, ``discovery``, ``api``, ...), its
        last unexpected failure; shown in health for a while after it."""
        self.restarts: dict[str, int] = {}
        """Per component, how often it failed and was restarted."""
        self._starting: set[str] = set()
        self._digesters: dict[str, Digester] = {}
        self._configured: set[bytes] = set()  # the upper dirs of the [[mounts]] entries
        self._discovered: dict[int, str] = {}  # kernel mount id -> the name it is followed as

    # -- the running parts --------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        """The running parts.

        Raises:
            RuntimeError: the service is not running.
        """
        if self._runtime is None:
            raise RuntimeError("the service is not running")
        return self._runtime

    @property
    def spool(self) -> Spool:
        """The durable log."""
        return self.runtime.spool

    @property
    def intake(self) -> Intake:
        """The group commit into the spool."""
        return self.runtime.intake

    @property
    def publisher(self) -> Publisher:
        """Numbers and encodes every event."""
        return self.runtime.publisher

    @property
    def hub(self) -> Hub:
        """The inotify instance and the trackers it feeds."""
        return self.runtime.hub

    # -- what the API reads (watcher.http.view.ServiceView) -----------------------------------

    @property
    def sinks(self) -> Mapping[str, SinkRunner]:
        """The sink runners, by sink name."""
        return self.runners

    @property
    def stream(self) -> str:
        """The stream name in event ids."""
        return self.config.stream

    @property
    def head_seq(self) -> int:
        """The sequence number of the newest event published."""
        return self.publisher.head_seq

    @property
    def published(self) -> int:
        """Events published since the start."""
        return self.publisher.published

    @property
    def resyncs(self) -> Mapping[tuple[str, str], int]:
        """Resyncs published since the start, by mount and reason."""
        return self.publisher.resyncs

    @property
    def durable_seconds(self) -> Histogram:
        """Per event: from published to committed in the spool."""
        return self.runtime.intake.durable_seconds

    @property
    def watches(self) -> int:
        """inotify watches held for every mount."""
        return self.hub.watch_count

    @property
    def events_read(self) -> int:
        """inotify events read since the start."""
        return self.hub.events_read

    @property
    def overflows(self) -> int:
        """inotify queue overflows since the start."""
        return self.hub.overflows

    @property
    def events_filtered(self) -> int:
        """Events fanotify's filesystem marks delivered for directories no mount follows
        (0 with inotify): what the filesystem marks cost."""
        if self._runtime is None or not isinstance(self._runtime.source.source, Fanotify):
            return 0
        return self._runtime.source.source.events_filtered

    def encode(self, seq: int, mount: str, item: Transition | Control) -> Record:
        """Encode ``item`` as ``mount``'s event at ``seq`` (synthesized snapshots)."""
        return self.publisher.encode_one(seq, mount, item)

    def changes(self, mount: str) -> tuple[list[Change], int]:
        """A mount's change list and the sequence number it is consistent at."""
        return self.mounts[mount].changes(), self.publisher.head_seq

    async def sync(self) -> None:
        """Pass the sync barrier: every change made before the call is published and durable."""
        await self.hub.sync()
        await self.intake.flush()

    async def reset(self, mount: str) -> None:
        """Empty a managed mount's writable branch (unmount, clear, remount), then resync it:
        a rescan (whatever the reset left) and a snapshot, reason ``reset``.

        Raises:
            MountError: the mount is attached, not managed, or the reset failed.
        """
        state = self.mounts[mount]
        if not state.managed:
            raise MountError(f"mount {mount!r} is attached, not managed; not resetting it")
        logger.info("mount_reset", mount=mount)
        await asyncio.to_thread(state.fs.reset)
        await self.sync()
        await self._publish(mount, state.tracker.resync("reset"))
        await self.intake.flush()

    def reopen(self) -> None:
        """SIGHUP: every sink closes and opens again before its next batch (log rotation)."""
        logger.info("reopen_requested", sinks=len(self.runners))
        for runner in self.runners.values():
            runner.reopen()

    @property
    def starting(self) -> int:
        """Configured mounts whose first start has not ended yet."""
        return len(self._starting)

    def is_starting(self, name: str) -> bool:
        """True while the configured mount ``name`` has its first start running."""
        return name in self._starting

    @property
    def source(self) -> Mapping[str, object]:
        """The event source in use and why (``source``, ``requested``, ``attribution``,
        ``reason``); empty before the service runs."""
        return {} if self._runtime is None else self._runtime.source.status()

    def degraded(self) -> list[str]:
        """Why the service is not fully healthy (empty when it is)."""
        reasons = [f"mount {name}: starting" for name in self._starting]
        reasons += [
            f"mount {name}: {state.tracker.degraded}"
            for name, state in self.mounts.items()
            if state.tracker.degraded
        ]
        if self._runtime is not None and self._runtime.intake.error:
            reasons.append(f"spool: {self._runtime.intake.error}")
        reasons += [
            f"sink {name}: {runner.health().detail}"
            for name, runner in self.runners.items()
            if not runner.health().ok
        ]
        now = time.monotonic()
        reasons += [
            f"{component}: failed {now - failure.at:.0f} s ago ({failure.error}); "
            f"restarted {self.restarts[component]} times"
            for component, failure in self.failures.items()
            if now - failure.at < _FAILURE_SHOWN
        ]
        return [self.config.secrets.redact(reason) for reason in reasons]

    # -- life cycle -------------------------------------------------------------------------

    async def run(self, *, signals: bool = True) -> None:
        """Run until ``stop`` is set (or SIGINT/SIGTERM when ``signals``).

        Raises:
            LayerwatchError: at start, a config the environment refuses (a mount, the spool,
                the API address); at stop, events that could not be made durable (how many).
        """
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
            intake = Intake(spool)
            publisher = Publisher(
                intake.put,
                first_seq=spool.last_seq + 1,
                stream=self.config.stream,
                host=self.config.host,
                epoch=spool.epoch,
            )
            source = open_source(self.config.source, attribution=self.config.attribution)
            stack.callback(source.source.close)
            logger.info("source_chosen", **source.status())
            hub = Hub(source.source, self._publish, rescan_interval=self.config.rescan_interval)
            stack.callback(hub.close)
            self._runtime = Runtime(
                spool=spool, intake=intake, publisher=publisher, hub=hub, source=source
            )
            prepared = [(mount, *self._prepare_mount(mount, stack)) for mount in self.config.mounts]
            for sink in self.config.sinks:
                self.runners[sink.name] = SinkRunner(
                    build_sink(sink, self.config.secrets), spool, _runner_config(sink)
                )
            sink_stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                # The writer first: a big snapshot blocks on the intake's backpressure.
                writer = group.create_task(intake.run(), name="intake")
                reader = group.create_task(hub.run(), name="hub")
                for name, runner in self.runners.items():
                    work = functools.partial(runner.run, sink_stop)
                    group.create_task(
                        self._supervise(f"sink {name}", work, until=sink_stop), name=f"sink-{name}"
                    )
                ticker = group.create_task(
                    self._supervise("housekeeping", self._housekeeping), name="housekeeping"
                )
                parts = [
                    group.create_task(
                        self._supervise(name, functools.partial(component, self)), name=name
                    )
                    for name, component in self._components.items()
                ]
                starts = [
                    group.create_task(
                        self._supervise(
                            f"mount {mount.name}",
                            functools.partial(self._start_mount, mount, fs, hub, spool, ours),
                        ),
                        name=f"start-{mount.name}",
                    )
                    for mount, fs, ours in prepared
                ]
                self._starting.update(mount.name for mount, _, _ in prepared)
                self._configured = {_branch_key(fs.rw) for _, fs, _ in prepared}
                self._announce_started()
                if self.config.discovery is not None:
                    work = functools.partial(self._discover, self.config.discovery, hub, spool)
                    starts.append(
                        group.create_task(self._supervise("discovery", work), name="discovery")
                    )
                await self.stop.wait()
                logger.info("service_stopping", starting=sorted(self._starting))
                for start in starts:  # a scan in progress is abandoned at its next directory
                    start.cancel()
                if starts:
                    await asyncio.wait(starts)
                try:
                    async with asyncio.timeout(self.config.shutdown_timeout):
                        await hub.sync()
                except TimeoutError:
                    logger.warning("final_sync_timeout")
                for task in (reader, ticker, *parts):
                    task.cancel()
                try:  # a failing spool must not hold the stop: both under the deadline
                    async with asyncio.timeout(self.config.shutdown_timeout):
                        await publisher.bookmark()
                        await intake.flush()
                except TimeoutError:
                    logger.error("intake_flush_timeout", pending=intake.pending, error=intake.error)
                lost = intake.pending
                writer.cancel()
                sink_stop.set()
            logger.info("service_stopped", head_seq=publisher.head_seq)
        if lost:
            raise SpoolError(
                f"spool {self.config.spool.path}: {lost} events were published but could not be "
                f"made durable before the stop deadline ({intake.error or 'spool too slow'})"
            )

    async def _start_mount(
        self, mount: MountConfig, fs: Filesystem, hub: Hub, spool: Spool, ours: bool
    ) -> None:
        """Follow a configured mount; its first attempt, ok or not, counts for ``started``."""
        try:
            await self._follow(mount, fs, hub, spool, mounted_by_us=ours)
        finally:
            self._starting.discard(mount.name)
            self._announce_started()

    def _announce_started(self) -> None:
        """Once every configured mount had its first start: ``service_started``."""
        if not self._starting and not self.started.is_set() and not self.stop.is_set():
            logger.info("service_started", mounts=len(self.mounts), sinks=len(self.runners))
            self.started.set()

    async def _supervise(
        self,
        component: str,
        work: Callable[[], Awaitable[None]],
        *,
        until: asyncio.Event | None = None,
    ) -> None:
        """Run ``work``; an unexpected exception is logged, shown in health and metrics, and
        ``work`` runs again after a backoff, so one component never stops the others.

        Config errors (the operator must act) and cancellation pass through; once ``until`` is
        set, a failure is not restarted.
        """
        attempt = 0
        while True:
            began = time.monotonic()
            try:
                await work()
                return
            except ConfigError:
                raise
            except Exception as exc:
                if time.monotonic() - began > _FAILURE_SHOWN:
                    attempt = 0  # it ran well for a while: start the backoff over
                delay = backoff_delay(attempt, 0.5, 30.0)
                attempt += 1
                self.failures[component] = _Failure(time.monotonic(), repr(exc))
                self.restarts[component] = self.restarts.get(component, 0) + 1
                logger.error(
                    "component_failed",
                    component=component,
                    error=repr(exc),
                    restart_in=round(delay, 3),
                    exc_info=exc,
                )
                if until is not None and until.is_set():
                    return
                await asyncio.sleep(delay)

    def _prepare_mount(
        self, mount: MountConfig, stack: contextlib.AsyncExitStack
    ) -> tuple[Filesystem, bool]:
        """Mount (or adopt, or attach to) a configured mount; True when it is ours to unmount.

        Raises:
            MountError: it cannot be mounted, or its mountpoint holds something else.
        """
        fs = filesystem_for(mount)
        if not mount.managed:
            return fs, False
        info = find_mount(fs.mountpoint)
        if info is not None and info.fstype == "overlay" and info.overlay_dirs()[0] == fs.rw:
            logger.info("mount_adopted", mount=mount.name)  # left by a run that was killed
        elif info is not None:
            raise MountError(
                f"mounts: {mount.name}: {os.fsdecode(fs.mountpoint)} already has a "
                f"{info.fstype} mount that is not this mount's rw dir"
            )
        else:
            fs.mount()
        # Still managed when adopted: unmounted at stop, like any other.
        stack.push_async_callback(self._umount, mount.name, fs)
        return fs, True

    async def _umount(self, name: str, fs: Filesystem) -> None:
        """Unmount a managed mount at stop, off the event loop; a busy one is left mounted
        (the next start adopts it) and said so."""
        try:
            await asyncio.to_thread(fs.umount)
        except MountError as exc:
            logger.error("umount_failed", mount=name, error=str(exc))

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
        """Start tracking a mount: its snapshot (or, after a restart, what changed) first.

        A ``[[mounts]]`` entry that names only a mountpoint follows whatever overlay is
        mounted there: mounted again over a new upper, the new upper is followed.
        """
        if labels:
            self.publisher.labels[mount.name] = dict(labels)
        if mount.hash:
            self._digesters[mount.name] = Digester.of(
                fs, max_size=mount.hash_max_size, budget=mount.hash_budget
            )
        branch = Branch.of(fs)
        resolve = None
        if labels is None and not mount.managed and mount.upper is None:  # not discovered
            moved = functools.partial(self._moved, mount.name)
            resolve = MountpointBranch(fs, branch.lower, moved)
        tracker = Tracker.of(mount.name, branch, hub, resolve=resolve, exclude=mount.exclude)
        discovery = self.config.discovery
        found = labels is not None and discovery is not None and discovery.attribution
        tracker.attribution = (mount.attribution or found) and self.source.get(
            "attribution"
        ) is True
        persisted = spool.load_list(mount.name) if mount.name in spool.mounts() else None
        await hub.follow(tracker, persisted)
        fs = resolve.fs if resolve is not None else fs  # mounted again while starting
        self.mounts[mount.name] = MountState(mount, fs, tracker, mounted_by_us)
        logger.info(
            "mount_followed",
            mount=mount.name,
            entries=len(tracker.kinds),
            watches=tracker.watch_count,
            restart=persisted is not None,
            **(labels or {}),
        )

    async def _publish(self, mount: str, items: list[Item]) -> None:
        """The hub's outlet: a mount that hashes content gets its digests first, off the
        event loop and within its budget (``core.digest``); then the publisher."""
        digester = self._digesters.get(mount)
        if digester is not None:
            items = await asyncio.to_thread(digester.digest, expand(items))
        await self.publisher.publish(mount, items)

    def _moved(self, name: str, fs: Filesystem) -> None:
        """An attached mount's mountpoint has a new overlay: the API shows its dirs."""
        state = self.mounts.get(name)
        if state is not None:
            state.fs = fs

    async def _discover(self, discovery: DiscoveryConfig, hub: Hub, spool: Spool) -> None:
        """Follow overlay mounts as they appear in the mount table; release them as they go."""
        source = MountSource(
            mountpoint_glob=discovery.mountpoint_glob,
            docker_root=discovery.docker_root,
            containerd_state=discovery.containerd_state,
            interval=discovery.interval,
            mountinfo=str(discovery.mountinfo),
        )
        names = self._discovered  # kept across a restart of discovery, for the releases
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
                        logger.info("mount_released", mount=name, **found.labels)
                    continue
                upper = _branch_key(found.upper)
                if upper in self._configured or any(
                    s.tracker.upper == upper for s in self.mounts.values()
                ):
                    continue  # followed already (a [[mounts]] entry names it, maybe starting)
                try:
                    name = discovered_name(found)
                    if name in self.mounts:
                        raise MountError(f"the name {name!r} is taken by another mount")
                    mount = MountConfig(name=name, mountpoint=Path(os.fsdecode(found.mountpoint)))
                    fs = Filesystem(found.lowers, found.upper, found.mountpoint, work=found.work)
                    await self._follow(mount, fs, hub, spool, labels=found.labels)
                except (OSError, LayerwatchError) as exc:  # gone again before we looked, ...
                    logger.warning(
                        "mount_follow_failed",
                        mountpoint=os.fsdecode(found.mountpoint),
                        error=str(exc),
                    )
                    continue
                names[found.mount_id] = name

    async def _housekeeping(self) -> None:
        """Bookmarks, retention and the heap's free pages, on their own clock."""
        self.failures.pop("housekeeping", None)
        last_bookmark = time.monotonic()
        while True:
            await asyncio.sleep(min(5.0, self.config.bookmark_interval))
            heap.trim()  # what a burst or a big snapshot freed (a fraction of a ms)
            pruned = await asyncio.to_thread(self.spool.prune, time.time())
            if pruned is not None:
                logger.warning(
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


def _branch_key(upper: bytes) -> bytes:
    """An upper dir as its trackers name it (resolved, no trailing slash)."""
    return os.path.realpath(upper).rstrip(b"/")


def build_sink(sink: SinkConfig, secrets: Secrets) -> Sink:
    """The sink ``sink`` configures, not yet opened.

    Raises:
        ConfigError: the sink's type or an option is bad; the message has every value of
            ``secrets`` blanked out (a sink may quote the option it refuses).
    """
    try:
        return load_sink(sink.name, sink.type, sink.options)
    except ConfigError as exc:
        raise ConfigError(exc.key, secrets.redact(exc.problem)) from None


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
