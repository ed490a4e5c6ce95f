"""layerwatch sink for NATS JetStream: the only module that imports ``nats``.

Every record is published to a JetStream stream with the header ``Nats-Msg-Id`` set to the
event id, so the server drops a retried copy inside the stream's duplicate window. ``send``
pipelines the publishes of a batch (at most ``window`` unacknowledged at once) and returns
only after the stream acknowledged every one of them, in order; a missing or failed ack raises
``SinkUnavailable`` and the runner sends the same batch again.

Options (``[sinks.NAME]`` with ``type = "nats"``):

- ``servers``: a URL or a list of URLs (default ``["nats://127.0.0.1:4222"]``).
- ``stream``: the JetStream stream (default ``LAYERWATCH``), created on open if missing.
- ``subjects``: the stream's subjects when it is created (default ``["layerwatch.>"]``).
- ``subject``: the subject template, ``{mount}`` is the sanitised mount name
  (default ``layerwatch.{mount}``).
- ``service_subject``: the subject of events without a mount (default ``layerwatch._service``).
- ``replicas``: the stream's replicas when created (default 1).
- ``duplicate_window``: seconds the server remembers message ids (default 120).
- ``ack_timeout``: seconds to wait for the acks of a batch (default 10).
- ``window``: publishes in flight before waiting for acks (default 256).
- ``ordered``: true (default) chains each record of a batch to the one before it with
  ``Nats-Expected-Last-Msg-Id``, so a record lost in a broken connection makes every later
  record of the batch fail too and the retry stores the batch in order. It needs this sink to
  be the only publisher to the stream; false to share a stream (then a retry after a lost
  connection may store part of a batch out of order: consumers sort by ``sequence``).
- ``connect_timeout``: seconds ``open`` waits for the first connection (default 5); once
  connected, the client reconnects for ever.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Mapping, Sequence
from typing import Final

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from watcher.errors import SinkRejected, SinkUnavailable
from watcher.events import Record
from watcher.plugins import Options
from watcher.sinks import Health

__all__ = ["NatsSink", "subject_token"]

_log = structlog.get_logger()

_WRONG_LAST_MSG_ID: Final = 10070
"""JetStream's error code for a failed ``Nats-Expected-Last-Msg-Id`` check."""

_TOKEN_SAFE: Final = frozenset(string.ascii_letters + string.digits + "_-")


def subject_token(mount: str) -> str:
    """Turn a mount name into one NATS subject token, reversibly.

    Letters, digits, ``_`` and ``-`` stay; every other byte of the UTF-8 name (``.``, ``*``,
    ``>``, spaces, ``%``, non-ASCII) becomes ``%XX``, so distinct mounts never share a subject.
    """
    out: list[str] = []
    for char in mount:
        if char in _TOKEN_SAFE:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


class NatsSink:
    """Publishes events to a NATS JetStream stream, one subject per mount.

    A ``SinkFactory`` (``watcher.sinks``); its options are in the module docstring.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        self.name = name
        opts = Options(name, options)
        self._ordered = opts.boolean("ordered", True)
        self._servers = list(opts.strings("servers", ["nats://127.0.0.1:4222"]))
        self._stream = opts.string("stream", "LAYERWATCH")
        self._subjects = list(opts.string_list("subjects", ["layerwatch.>"]))
        self.subject = opts.mount_names(
            "subject",
            "layerwatch.{mount}",
            "service_subject",
            "layerwatch._service",
            escape=subject_token,
        )
        """The subject an event of a mount is published to (``""``: service-wide)."""
        self._replicas = opts.integer("replicas", 1, minimum=1)
        self._duplicate_window = opts.number("duplicate_window", 120.0, minimum=0, exclusive=True)
        self._ack_timeout = opts.number("ack_timeout", 10.0, minimum=0, exclusive=True)
        self._window = opts.integer("window", 256, minimum=1)
        self._connect_timeout = opts.number("connect_timeout", 5.0, minimum=0, exclusive=True)
        opts.finish()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._health = Health(ok=True)
        self._log = _log.bind(sink=name, stream=self._stream)

    async def open(self) -> None:
        """Connect and create the stream, or check the one that exists.

        Raises:
            SinkUnavailable: no server answered, or JetStream is not ready.
            SinkRejected: the existing stream cannot serve this sink (no dedupe window).
        """
        nc = Client()
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=self._servers,
                    name=f"layerwatch-{self.name}",
                    connect_timeout=max(1, round(self._connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds, a float works
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                timeout=self._connect_timeout,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            await nc.close()
            self._health = Health(ok=False, detail=f"connect: {exc!r}")
            raise SinkUnavailable(f"nats: cannot connect to {self._servers}: {exc!r}") from exc
        self._nc = nc
        self._js = self._nc.jetstream(
            timeout=self._ack_timeout, publish_async_max_pending=self._window
        )
        try:
            await self._ensure_stream()
        except (SinkUnavailable, SinkRejected) as exc:
            self._health = Health(ok=False, detail=str(exc))
            await self.close()
            raise
        self._health = Health(ok=True)
        self._log.info("nats_sink_opened", servers=self._servers)

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        try:
            try:
                info = await self._js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(
                    StreamConfig(
                        name=self._stream,
                        subjects=self._subjects,
                        num_replicas=self._replicas,
                        duplicate_window=self._duplicate_window,
                        storage=StorageType.FILE,
                    )
                )
                self._log.info("nats_stream_created", subjects=self._subjects)
                return
        except (TimeoutError, nats.errors.Error) as exc:
            raise SinkUnavailable(f"nats: stream {self._stream}: {exc!r}") from exc
        config = info.config
        if not config.duplicate_window:
            raise SinkRejected(f"nats: stream {self._stream} has no duplicate window")
        if config.duplicate_window < self._duplicate_window:
            self._log.warning(
                "nats_stream_short_duplicate_window",
                have=config.duplicate_window,
                want=self._duplicate_window,
            )
        if config.subjects != self._subjects or (config.num_replicas or 1) != self._replicas:
            self._log.warning(
                "nats_stream_config_differs",
                subjects=config.subjects,
                replicas=config.num_replicas,
            )

    async def send(self, batch: Sequence[Record]) -> None:
        """Publish ``batch`` and return once the stream acknowledged every record.

        Raises:
            SinkUnavailable: not connected, an ack timed out, or the stream is not available.
            SinkRejected: the server refused a record for good (too large, wrong stream).
        """
        if self._js is None:
            raise SinkUnavailable("nats: not open")
        futures: list[asyncio.Future[PubAck]] = []
        try:
            previous: str | None = None
            for record in batch:
                headers = {"Nats-Msg-Id": record.id}
                if previous is not None and self._ordered:
                    headers["Nats-Expected-Last-Msg-Id"] = previous
                previous = record.id
                futures.append(
                    await self._js.publish_async(
                        self.subject(record.mount),
                        record.body,
                        wait_stall=self._ack_timeout,
                        stream=self._stream,
                        headers=headers,
                    )
                )
            if futures:
                _, pending = await asyncio.wait(futures, timeout=self._ack_timeout)
                if pending:
                    raise SinkUnavailable(
                        f"nats: {len(pending)} of {len(batch)} acks missing after "
                        f"{self._ack_timeout}s"
                    )
            for future in futures:
                future.result()
        except SinkUnavailable as exc:
            self._health = Health(ok=False, detail=str(exc))
            raise
        except nats.js.errors.APIError as exc:
            self._health = Health(ok=False, detail=repr(exc))
            if exc.err_code == _WRONG_LAST_MSG_ID:
                raise SinkUnavailable(f"nats: an earlier record was lost: {exc!r}") from exc
            if exc.code == 400:
                raise SinkRejected(f"nats: publish refused: {exc!r}") from exc
            raise SinkUnavailable(f"nats: publish failed: {exc!r}") from exc
        except nats.errors.MaxPayloadError as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkRejected(f"nats: record too large: {exc!r}") from exc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkUnavailable(f"nats: publish failed: {exc!r}") from exc
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # seen: asyncio logs an unretrieved failure at exit
        self._health = Health(ok=True)

    def health(self) -> Health:
        """The outcome of the last connect or publish."""
        return self._health

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        try:
            await nc.close()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            self._log.warning("nats_close_failed", error=repr(exc))

    async def _on_error(self, exc: Exception) -> None:
        self._log.warning("nats_connection_error", error=repr(exc))

    async def _on_disconnected(self) -> None:
        if self._nc is None:  # our own close()
            return
        self._health = Health(ok=False, detail="disconnected")
        self._log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self._log.info("nats_reconnected")
