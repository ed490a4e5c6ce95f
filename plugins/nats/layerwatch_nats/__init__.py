"""layerwatch sink for NATS JetStream: the only module that imports ``nats``.

Every record is published to a JetStream stream with the header ``Nats-Msg-Id`` set to the
event id, so the server drops a retried copy inside the stream's duplicate window. ``send``
pipelines the publishes of a batch (at most ``window`` unacknowledged at once) and returns
only after the stream acknowledged every one of them; a missing or failed ack raises
``SinkUnavailable`` and the runner sends the same batch again.

The records of a batch go out in chunks of half a ``window``. A chunk is one blob of ``HPUB``
commands built here, with the headers nats-py would write (``Nats-Msg-Id``,
``Nats-Expected-Stream``, ``Nats-Expected-Last-Msg-Id`` with ``ordered``) and its checks (the
server's ``max_payload``, the client's closed, draining and reconnect-buffer states), queued
in the client in one call: one socket write per chunk, no per-message publish. Each record has
its own reply subject ``INBOX.BATCH.INDEX`` under an inbox the sink subscribes to when it
opens, so an ack names its record, a late ack of an earlier batch is ignored, and counting acks
takes no future and no ``PubAck`` per message. Before a chunk, ``send`` waits until the window
has room for it. Throughput grows with the batch: give the sink a ``batch_size`` of 1000.

Options (``[sinks.NAME]`` with ``type = "nats"``):

- ``servers``: a URL or a list of URLs (default ``["nats://127.0.0.1:4222"]``).
- ``stream``: the JetStream stream (default ``LAYERWATCH``), created on open if missing.
- ``subjects``: the stream's subjects when it is created (default ``["layerwatch.>"]``).
- ``subject``: the subject template, ``{mount}`` is the sanitised mount name
  (default ``layerwatch.{mount}``).
- ``service_subject``: the subject of events without a mount (default ``layerwatch._service``).
- ``replicas``: the stream's replicas when created (default 1).
- ``duplicate_window``: seconds the server remembers message ids (default 120).
- ``ack_timeout``: seconds to wait for acks, for room in the window or for the batch's last
  ones (default 10).
- ``window``: records published and not yet acknowledged, at most (default 256).
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
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Final

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, StorageType, StreamConfig

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["NatsSink", "event_id", "subject_token"]

_log = structlog.get_logger()

_WRONG_LAST_MSG_ID: Final = 10070
"""JetStream's error code for a failed ``Nats-Expected-Last-Msg-Id`` check."""

_TOKEN_SAFE: Final = frozenset(string.ascii_letters + string.digits + "_-")

_PENDING_SIZE: Final = 2 * 1024 * 1024
"""Bytes the client buffers while reconnecting (nats-py's ``pending_size``)."""

_BLANKS: Final = re.compile(r"[ \t\r\n]")
"""What a NATS subject must not contain (nats-py's own check)."""

_NEWLINES: Final = str.maketrans({"\r": " ", "\n": " "})

_ID_PREFIX: Final = b'{"specversion":"1.0","id":"'
"""How every body ``watcher.delivery.events`` encodes starts: the id is the second member."""


def event_id(record: Record) -> str:
    """``record.id``, read from the start of the body instead of parsing all of it.

    The id is the JSON string right after ``_ID_PREFIX``; without a backslash in it, it ends
    at the next quote and needs no unescaping. Any other body goes through ``record.id``.
    """
    body = record.body
    if body.startswith(_ID_PREFIX):
        end = body.find(b'"', len(_ID_PREFIX))
        raw = body[len(_ID_PREFIX) : end]
        if end > 0 and b"\\" not in raw:
            return raw.decode()
    return record.id


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

    A ``SinkFactory`` (``watcher.delivery.sinks``); its options are in the module docstring.
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
        for option, value in (
            ("subject", self.subject.template),
            ("service_subject", self.subject.service),
        ):
            if _BLANKS.search(value):
                raise ConfigError(opts.key(option), f"a NATS subject has no blanks: {value!r}")
        self._replicas = opts.integer("replicas", 1, minimum=1)
        self._duplicate_window = opts.number("duplicate_window", 120.0, minimum=0, exclusive=True)
        self._ack_timeout = opts.number("ack_timeout", 10.0, minimum=0, exclusive=True)
        self._window = opts.integer("window", 256, minimum=1)
        self._connect_timeout = opts.number("connect_timeout", 5.0, minimum=0, exclusive=True)
        opts.finish()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox: str | None = None
        self._batches = 0
        self._acks: _Acks | None = None
        self._subjects_by_mount: dict[str, str] = {}
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
            async with asyncio.timeout(self._connect_timeout):  # wait_for can eat a cancel
                await nc.connect(
                    servers=self._servers,
                    name=f"layerwatch-{self.name}",
                    connect_timeout=max(1, round(self._connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds, a float works
                    pending_size=_PENDING_SIZE,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            await nc.close()
            self._health = Health(ok=False, detail=f"connect: {exc!r}")
            raise SinkUnavailable(f"nats: cannot connect to {self._servers}: {exc!r}") from exc
        self._nc = nc
        self._js = self._nc.jetstream(timeout=self._ack_timeout)
        try:
            inbox = nc.new_inbox()
            await nc.subscribe(f"{inbox}.*.*", cb=self._on_ack)
            self._inbox = inbox
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
        nc = self._nc
        if nc is None or self._inbox is None:
            raise SinkUnavailable("nats: not open")
        if not batch:
            return
        self._batches += 1
        acks = _Acks(f"{self._inbox}.{self._batches}.", len(batch), self._ack_timeout)
        self._acks = acks
        try:
            await self._publish(nc, batch, acks)
            await acks.wait(len(batch))
            acks.raise_first_error()
        except SinkUnavailable as exc:
            self._health = Health(ok=False, detail=str(exc))
            raise
        except nats.js.errors.APIError as exc:  # str: code, err_code and description
            self._health = Health(ok=False, detail=str(exc))
            if exc.err_code == _WRONG_LAST_MSG_ID:
                raise SinkUnavailable(f"nats: an earlier record was lost: {exc}") from exc
            if exc.code == 400:
                raise SinkRejected(f"nats: publish refused: {exc}") from exc
            raise SinkUnavailable(f"nats: publish failed: {exc}") from exc
        except nats.errors.MaxPayloadError as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkRejected(f"nats: record too large: {exc!r}") from exc
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkUnavailable(f"nats: publish failed: {exc!r}") from exc
        finally:
            self._acks = None  # late acks of this batch are ignored
        self._health = Health(ok=True)

    async def _publish(self, nc: Client, batch: Sequence[Record], acks: _Acks) -> None:
        """Publish every record of ``batch`` with its reply subject, at most ``window`` unacked.

        The records go out in chunks of half a window, each chunk one ``HPUB`` blob queued in
        the client and flushed in one write; before a chunk, ``send`` waits until the window
        has room for it. ``_hpub`` writes what ``nc.publish`` would (same headers, same
        checks) without its cost per message.
        """
        window = self._window
        step = max(1, window // 2)
        max_payload = nc.max_payload
        prefix, ordered = acks.prefix, self._ordered
        expect_stream = f"\r\nNats-Expected-Stream: {self._stream}"
        subjects = self._subjects_by_mount
        previous = ""
        for start in range(0, len(batch), step):
            end = min(start + step, len(batch))
            if end - acks.received > window:
                await acks.wait(end - window)
            parts: list[bytes] = []
            for index in range(start, end):
                record = batch[index]
                subject = subjects.get(record.mount)
                if subject is None:
                    subject = subjects[record.mount] = self.subject(record.mount)
                msg_id = event_id(record)
                if "\r" in msg_id or "\n" in msg_id:  # as nats-py writes such a header value
                    msg_id = msg_id.translate(_NEWLINES)
                chain = f"\r\nNats-Expected-Last-Msg-Id: {previous}" if ordered and previous else ""
                previous = msg_id
                header = f"NATS/1.0\r\nNats-Msg-Id: {msg_id}{expect_stream}{chain}\r\n\r\n".encode()
                body = record.body
                size = len(header) + len(body)
                if size > max_payload:
                    raise nats.errors.MaxPayloadError(
                        f"record {index} of the batch: {size} bytes, server maximum {max_payload}"
                    )
                parts += (
                    f"HPUB {subject} {prefix}{index} {len(header)} {size}\r\n".encode(),
                    header,
                    body,
                    b"\r\n",
                )
            await self._hpub(nc, b"".join(parts))

    async def _hpub(self, nc: Client, commands: bytes) -> None:
        """Queue protocol ``commands`` (``HPUB``s) in the client and wake its flusher.

        The checks are those of ``nc.publish``; the two calls are the client's own way to
        queue and flush a command (private in nats-py, the same from 2.6 to 2.16, hence the
        pin ``nats-py<3``).
        """
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not nc.is_connected and nc.pending_data_size + len(commands) > _PENDING_SIZE:
            raise nats.errors.OutboundBufferLimitError
        await nc._send_command(commands)
        await nc._flush_pending()

    async def _on_ack(self, msg: Msg) -> None:
        """The subscription callback of the ack inbox: hand an ack to the batch it belongs to."""
        acks = self._acks
        if acks is not None and msg.subject.startswith(acks.prefix):
            acks.add(msg)

    def health(self) -> Health:
        """The outcome of the last connect or publish."""
        return self._health

    async def close(self) -> None:
        """Drain and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        self._inbox = self._acks = None
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


class _Acks:
    """The JetStream acks of one batch, arriving on the reply subjects ``PREFIX<index>``.

    Attributes:
        prefix: the reply subject of record ``i`` of the batch is ``f"{prefix}{i}"``.
        size: the records in the batch.
        patience: seconds ``wait`` waits for acks.
        received: how many distinct records have an ack (a success or an error).
    """

    __slots__ = (
        "_errors",
        "_seen",
        "_target",
        "_waiter",
        "patience",
        "prefix",
        "received",
        "size",
    )

    def __init__(self, prefix: str, size: int, patience: float) -> None:
        self.prefix = prefix
        self.size = size
        self.patience = patience
        self.received = 0
        self._seen = bytearray(size)
        self._errors: dict[int, Exception] = {}
        self._target = 0
        self._waiter: asyncio.Future[None] | None = None

    def add(self, msg: Msg) -> None:
        """Count the ack ``msg`` (its subject starts with ``prefix``); a repeat is ignored."""
        try:
            index = int(msg.subject[len(self.prefix) :])
        except ValueError:
            return
        if not 0 <= index < self.size or self._seen[index]:
            return
        self._seen[index] = 1
        data = msg.data
        if not data or b'"error"' in data:  # the cheap test; _ack_error decides
            error = _ack_error(msg)
            if error is not None:
                self._errors[index] = error
        self.received += 1
        waiter = self._waiter
        if waiter is not None and self.received >= self._target and not waiter.done():
            waiter.set_result(None)

    async def wait(self, count: int) -> None:
        """Return once ``count`` records have their ack.

        Raises:
            SinkUnavailable: fewer after ``patience`` seconds.
        """
        if self.received >= count:
            return
        self._target = count
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.patience):
                await self._waiter
        except TimeoutError:
            raise SinkUnavailable(
                f"nats: {count - self.received} of {count} acks missing after {self.patience}s "
                f"(batch of {self.size})"
            ) from None
        finally:
            self._waiter = None

    def raise_first_error(self) -> None:
        """Raise the error of the first record (in batch order) whose ack reported one.

        With ``ordered``, the records after a refused one fail their chain check; the first
        error is the cause.
        """
        if self._errors:
            raise self._errors[min(self._errors)]


def _ack_error(msg: Msg) -> Exception | None:
    """What the ack ``msg`` reports: None when the message is stored (or a duplicate)."""
    status = msg.headers.get(Header.STATUS) if msg.headers else None
    if status == "503":
        return SinkUnavailable("nats: no stream answered the publish (503, no responders)")
    if status is not None:
        detail = msg.headers.get(Header.DESCRIPTION, "") if msg.headers else ""
        return SinkUnavailable(f"nats: publish answered with status {status} {detail}")
    try:
        response: Any = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        response = None
    if not isinstance(response, dict):
        return SinkUnavailable(f"nats: unreadable ack {msg.data[:200]!r}")
    error = response.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        return SinkUnavailable(f"nats: unreadable ack {msg.data[:200]!r}")
    return nats.js.errors.APIError(
        code=error.get("code"), description=error.get("description"), err_code=error.get("err_code")
    )
