"""One runner per sink: batching, filtering, retry with backoff, dead-lettering, isolation.

A ``SinkRunner`` reads its sink's records from the durable log after the sink's cursor,
filters them, sends them in batches and acknowledges (advances the cursor) only once the sink
accepted a batch. Each runner is its own task and shares nothing with other runners but the
log, so a slow, failing or hanging sink never stalls another sink or the producer.

Guarantees (at-least-once):

- A batch is acknowledged after ``send`` returned, after it was dead-lettered on
  ``SinkRejected`` (only the records it names in ``seqs``, when it names some), or when the
  filter dropped every record in it. Nothing else moves the cursor, so a crash at any point
  re-sends from the last acknowledged record, with the same event ids.
- ``SinkUnavailable`` and any unexpected exception retry the same batch after a jittered
  exponential backoff; ``retry_after`` from the sink is honoured (capped by
  ``retry_after_max``).
- On stop, the runner keeps delivering what the log already held when stop was set, under the
  drain deadline, then closes the sink under the close deadline; an in-flight ``send`` that
  outlives the deadline is cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import os
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from watcher.core.errors import SinkRejected, SinkUnavailable, SpoolError
from watcher.delivery.events import CHANGE, Record
from watcher.delivery.histogram import Histogram
from watcher.delivery.sinks import Health, Sink

__all__ = ["EventLog", "Filter", "RunnerConfig", "SinkRunner", "backoff_delay"]

logger = structlog.get_logger("layerwatch.runner")


class EventLog(Protocol):
    """The part of the durable log (``watcher.delivery.spool.Spool``) a runner uses.

    The runner calls ``read`` and ``ack`` from a worker thread (they may block on disk), so
    they must be thread-safe; ``wait`` runs on the event loop.
    """

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest record (0 when empty)."""

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest record still held."""

    def read(self, after: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with ``seq > after``, in order."""

    async def wait(self, after: int) -> None:
        """Return once ``last_seq > after``."""

    def cursor(self, consumer: str) -> int:
        """The last sequence number ``consumer`` acknowledged (0 for none)."""

    def ack(self, consumer: str, seq: int) -> None:
        """Durably record that ``consumer`` is done with every record up to ``seq``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Filter:
    """Which records a sink receives; the records it drops are acknowledged unsent.

    Attributes:
        mounts: mount names to pass (None: all). Service-wide records (mount ``""``:
            bookmarks, gaps) always pass.
        kinds: change kinds (``A``, ``C``, ``D``) to pass (None: all). A change passes when
            its ``kind`` or its ``prev_kind`` is one of them, so a consumer also sees the
            entry leave the list. Control events always pass for mounts that pass.
        paths: ``fnmatch`` globs on the change's path (``*`` also matches ``/``); empty:
            all. Non-UTF-8 names are matched with surrogate escapes (``os.fsdecode``).
    """

    mounts: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    paths: tuple[str, ...] = ()

    def accepts(self, record: Record) -> bool:
        """Whether ``record`` goes to the sink."""
        if not record.mount:
            return True
        if self.mounts is not None and record.mount not in self.mounts:
            return False
        if record.type != CHANGE or (self.kinds is None and not self.paths):
            return True
        data: dict[str, Any] = orjson.loads(record.body)["data"]
        if self.kinds is not None and not (
            data.get("kind") in self.kinds or data.get("prev_kind") in self.kinds
        ):
            return False
        if self.paths:
            path = _record_path(data)
            return any(fnmatch.fnmatchcase(path, glob) for glob in self.paths)
        return True


def _record_path(data: dict[str, Any]) -> str:
    if "path" in data:
        return str(data["path"])
    return os.fsdecode(base64.b64decode(data["path_b64"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerConfig:
    """How a runner batches and retries.

    Attributes:
        batch_size: most records in one ``send``.
        linger: seconds to wait for a batch to fill once a record is pending; None takes the
            sink's own ``linger`` attribute when it has one (the exec sink's ``debounce``), else 0.
        backoff_base: the first retry delay in seconds (before jitter).
        backoff_cap: the longest computed retry delay in seconds.
        retry_after_max: the longest delay a sink's ``retry_after`` may impose.
        dead_letter: the JSON-lines file rejected batches are appended to; None logs the
            rejected event ids at error level instead.
        drain_timeout: seconds after stop to deliver what the log already holds.
        close_timeout: seconds ``close()`` may take.
        filter: which records the sink receives (None: all).
    """

    batch_size: int = 100
    linger: float | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_max: float = 600.0
    dead_letter: Path | None = None
    drain_timeout: float = 5.0
    close_timeout: float = 5.0
    filter: Filter | None = None


def backoff_delay(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_max: float = 600.0,
) -> float:
    """The delay before retry number ``attempt`` (0-based): equal-jitter exponential backoff.

    The computed delay ``d = min(cap, base * 2**attempt)`` is jittered into ``[d/2, d]``;
    a ``retry_after`` from the destination raises it (capped by ``retry_after_max``).
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_max))
    return delay


async def _race(
    awaitable: Awaitable[object], stop: asyncio.Event, within: float | None = None
) -> bool:
    """Await ``awaitable``: True when it completed, False on stop or after ``within`` s."""
    work = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {work, stopped}, timeout=within, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (work, stopped):
            task.cancel()
        await asyncio.wait({work, stopped})
    if work in done:
        work.result()  # re-raise the log's error
        return True
    return False


class SinkRunner:
    """Delivers the log to one sink. Create one per sink and run each in its own task.

    Args:
        sink: the sink (not yet opened; the runner opens and closes it).
        events: the durable log of events.
        config: batching and retry settings.

    Attributes:
        delivered: records the sink accepted.
        dead_lettered: records the sink rejected (written to the dead-letter file).
        filtered: records the filter dropped (acknowledged unsent).
        retries: failed ``open`` and ``send`` attempts that were retried.
        send_seconds: how long each ``send`` took, failed ones included.
    """

    def __init__(self, sink: Sink, events: EventLog, config: RunnerConfig | None = None) -> None:
        self.sink = sink
        self.config = config or RunnerConfig()
        self.delivered = 0
        self.dead_lettered = 0
        self.filtered = 0
        self.retries = 0
        self.send_seconds = Histogram()
        self._events = events
        self._cursor = events.cursor(sink.name)
        self._opened = False
        self._error = ""
        self._drain_target: int | None = None
        self._reopen = False
        self._wake = asyncio.Event()  # set by reopen(): cuts a retry's backoff short
        self._logger = logger.bind(sink=sink.name)
        linger = self.config.linger
        if linger is None:
            linger = float(getattr(sink, "linger", 0.0))
        self._linger = linger

    @property
    def cursor(self) -> int:
        """The last sequence number this sink acknowledged."""
        return self._cursor

    @property
    def lag(self) -> int:
        """Records in the log this sink has not acknowledged yet."""
        return max(0, self._events.last_seq - self._cursor)

    def health(self) -> Health:
        """The runner's view: not ok while open or send fail, else the sink's own health."""
        if self._error:
            return Health(ok=False, detail=self._error)
        if not self._opened:
            return Health(ok=False, detail="not open")
        try:
            return self.sink.health()
        except Exception as exc:
            return Health(ok=False, detail=f"health() raised {exc!r}")

    def reopen(self) -> None:
        """Close and open the sink again before its next batch or retry (SIGHUP: rotated
        files, a webhook endpoint re-enabled); a retry waiting out its backoff goes at once."""
        self._reopen = True
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set, drain under the deadline, then close the sink.

        Returns normally after stop (a drain or close timeout is logged, not raised). Raises
        only what the log raises (``SpoolError``); the sink is closed in every case.
        """
        pump = asyncio.create_task(self._pump(stop), name=f"sink-{self.sink.name}")
        try:
            await _race(asyncio.shield(pump), stop)
            if not pump.done():
                self._logger.info(
                    "sink_draining", cursor=self._cursor, target=self._events.last_seq
                )
                try:
                    async with asyncio.timeout(self.config.drain_timeout):
                        await asyncio.shield(pump)
                except TimeoutError:
                    self._logger.warning(
                        "sink_drain_timeout", timeout=self.config.drain_timeout, lag=self.lag
                    )
            if pump.done():
                pump.result()
        finally:
            if not pump.done():
                pump.cancel()
                await asyncio.wait({pump})
            await self._close()

    async def _pump(self, stop: asyncio.Event) -> None:
        await self._open()
        while True:
            if stop.is_set():
                if self._drain_target is None:
                    self._drain_target = self._events.last_seq
                if self._cursor >= min(self._drain_target, self._events.last_seq):
                    return
            elif not await self._wait_for_records(stop):
                continue  # stop was set: the loop re-checks as a drain
            await self._reopen_if_asked()
            records = await asyncio.to_thread(
                self._events.read, self._cursor, self.config.batch_size
            )
            if not records:
                # Nothing readable after the cursor although last_seq is ahead (retention
                # moved first_seq past it): skip to just before the oldest held record.
                skip_to = max(self._cursor, self._events.first_seq - 1)
                self._logger.warning("sink_cursor_behind_log", cursor=self._cursor, skip_to=skip_to)
                if skip_to == self._cursor:
                    await asyncio.sleep(0.05)
                    continue
                await self._acknowledge(skip_to)
                continue
            await self._deliver(records)

    async def _wait_for_records(self, stop: asyncio.Event) -> bool:
        """Wait for a record after the cursor, then linger for a fuller batch; False on stop."""
        if self._events.last_seq <= self._cursor and not await _race(
            self._events.wait(self._cursor), stop
        ):
            return False
        if self._linger > 0:
            deadline = time.monotonic() + self._linger
            while self._events.last_seq - self._cursor < self.config.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await _race(
                    self._events.wait(self._events.last_seq), stop, remaining
                ):
                    break
        return True

    async def _reopen_if_asked(self) -> None:
        if self._reopen:
            self._reopen = False
            self._wake.clear()
            await self._close()
            await self._open()
            self._logger.info("sink_reopened")

    async def _open(self) -> None:
        attempt = 0
        while True:
            try:
                await self.sink.open()
            except Exception as exc:
                delay = self._retry_delay(attempt, exc)
                self._logger.warning(
                    "sink_open_failed", attempt=attempt, delay=round(delay, 3), error=repr(exc)
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self._opened = True
            self._error = ""
            self._logger.info("sink_opened", cursor=self._cursor, lag=self.lag)
            return

    async def _deliver(self, records: Sequence[Record]) -> None:
        """Send ``records`` (minus the filtered) until accepted or rejected, then acknowledge."""
        last = records[-1].seq
        selected = self.config.filter
        batch = list(records) if selected is None else [r for r in records if selected.accepts(r)]
        self.filtered += len(records) - len(batch)
        attempt = 0
        while batch:
            if attempt:  # a SIGHUP while a batch is retried applies before the next attempt
                await self._reopen_if_asked()
            try:
                await self._send(batch)
            except SinkRejected as exc:
                refused = [r for r in batch if exc.seqs is None or r.seq in exc.seqs] or batch
                try:
                    await self._dead_letter(refused, exc)
                except OSError as dl_exc:
                    self._error = f"dead-letter write failed: {dl_exc}"
                    self._logger.error("sink_dead_letter_failed", error=repr(dl_exc))
                    delay = backoff_delay(
                        attempt, self.config.backoff_base, self.config.backoff_cap
                    )
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                self.delivered += len(batch) - len(refused)
                break
            except Exception as exc:
                delay = self._retry_delay(attempt, exc)
                details: dict[str, object] = {
                    "attempt": attempt,
                    "delay": round(delay, 3),
                    "first_seq": batch[0].seq,
                    "last_seq": batch[-1].seq,
                    "error": repr(exc),
                }
                if not isinstance(exc, SinkUnavailable):
                    details["exc_info"] = exc  # unexpected: keep the traceback
                self._logger.warning("sink_send_failed", **details)
                attempt += 1
                await self._backoff(delay)
                continue
            self.delivered += len(batch)
            self._error = ""
            if attempt:
                self._logger.info("sink_recovered", attempts=attempt + 1, first_seq=batch[0].seq)
            break
        await self._acknowledge(last)

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or until ``reopen()`` is asked for."""
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _send(self, batch: list[Record]) -> None:
        """The sink's ``send``, timed (``send_seconds``) however it ends."""
        began = time.monotonic()
        try:
            await self.sink.send(batch)
        finally:
            self.send_seconds.observe(time.monotonic() - began)

    def _retry_delay(self, attempt: int, exc: Exception) -> float:
        self.retries += 1
        self._error = str(exc) or type(exc).__name__
        retry_after = exc.retry_after if isinstance(exc, SinkUnavailable) else None
        return backoff_delay(
            attempt,
            self.config.backoff_base,
            self.config.backoff_cap,
            retry_after,
            self.config.retry_after_max,
        )

    async def _acknowledge(self, seq: int) -> None:
        # In a thread: a durable ack may wait for the producer's group commit (an fsync).
        # A failed ack (the spool's disk is full) is retried: the batch was delivered, and
        # crashing here would take the whole service down with it; the drain deadline bounds
        # the retries on stop.
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self._events.ack, self.sink.name, seq)
            except SpoolError as exc:
                self._logger.warning("sink_ack_failed", seq=seq, error=str(exc), delay=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._cursor = seq
            return

    async def _dead_letter(self, batch: Sequence[Record], exc: SinkRejected) -> None:
        ids = [r.id for r in batch]
        path = self.config.dead_letter
        if path is None:
            self._logger.error("sink_rejected_dropped", reason=str(exc), ids=ids)
        else:
            await asyncio.to_thread(_append_dead_letters, path, self.sink.name, str(exc), batch)
            self._logger.error(
                "sink_rejected_dead_lettered",
                reason=str(exc),
                path=str(path),
                first_id=ids[0],
                last_id=ids[-1],
                count=len(ids),
            )
        self.dead_lettered += len(batch)

    async def _close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self.sink.close()
        except TimeoutError:
            self._logger.warning("sink_close_timeout", timeout=self.config.close_timeout)
        except Exception as exc:
            self._logger.warning("sink_close_failed", error=repr(exc))
        else:
            self._logger.info("sink_closed", cursor=self._cursor, lag=self.lag)


def _append_dead_letters(path: Path, sink: str, reason: str, batch: Sequence[Record]) -> None:
    """Append one JSON line per record: ``{"sink", "reason", "time", "event"}``; fsync."""
    now = time.time()
    head = orjson.dumps({"sink": sink, "reason": reason, "time": now})[:-1]
    data = b"".join(head + b',"event":' + record.body + b"}\n" for record in batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
