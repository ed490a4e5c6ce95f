"""The API's event streams: replay from the spool after a position, then live.

An :class:`EventStream` serves every stream client of one API (SSE at ``/v1/events``,
WebSocket at ``/v1/events/ws``); ``watcher.http.api`` parses the request (the position, the mount
filter), admits the client, and hands it over here. Streams read the spool, never the
service's queues: a client replays from its position and then follows ``spool.wait``, so a
slow client can only fall behind, never stall the service. Each client holds at most one
batch of events plus the transport's buffer; a client that takes no data for
``write_timeout`` seconds is dropped (``api_stream_dropped`` in the log, a WebSocket close
with the reason) and may resume from its last id. A position older than the spool keeps (or
newer than the head, after a spool was replaced) gets a synthesized resync and snapshot of
the current list per mount, consistent at the head; see ``docs/api.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import WSMsgType, web

from watcher.core.model import Control, Transition, expand
from watcher.http.view import ServiceView

__all__ = ["EventStream", "Frame"]

logger = structlog.get_logger("layerwatch.streams")


@dataclass(slots=True)
class Frame:
    """One stream message.

    Attributes:
        seq: the resume position after this frame (None: the last one still holds).
        body: the CloudEvents JSON object, or None for a heartbeat.
    """

    seq: int | None
    body: bytes | None

    def sse(self, epoch: int) -> bytes:
        """The frame in Server-Sent Events framing (a heartbeat is a comment); its ``id:`` is
        ``EPOCH:SEQ``, so a position from another spool is never taken for one of this."""
        head = b"" if self.seq is None else b"id: %d:%d\n" % (epoch, self.seq)
        if self.body is None:
            return b": keep-alive\n" + head + b"\n"
        return head + b"data: " + self.body + b"\n\n"


class _Dropped(Exception):
    """A stream client took no data for too long."""


class EventStream:
    """The events after a position, for each stream client of one API.

    Attributes:
        snapshots: snapshots synthesized for clients with a lost position.
        dropped: clients dropped as too slow.
    """

    def __init__(
        self,
        service: ServiceView,
        *,
        batch: int,
        heartbeat: float,
        write_timeout: float,
        max_message: int,
    ) -> None:
        """Serve ``service``'s spool.

        Args:
            service: the running service (its spool, publisher and mounts).
            batch: events read from the spool per step: a client's buffer.
            heartbeat: seconds between keep-alive frames on an idle stream.
            write_timeout: seconds a client may take no data before it is dropped.
            max_message: the largest WebSocket message accepted from a client.
        """
        self._service = service
        self._batch = batch
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._max_message = max_message
        self._closing = asyncio.Event()
        self.snapshots = 0
        self.dropped = 0

    def close(self) -> None:
        """End every stream at its next frame boundary; new ones end at once."""
        self._closing.set()

    # -- transports -----------------------------------------------------------------------------

    async def sse(
        self, request: web.Request, since: int, mounts: frozenset[str] | None
    ) -> web.StreamResponse:
        """Server-Sent Events after ``since``; ``id:`` is the resume position."""
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        await resp.write(b": layerwatch events\nretry: 1000\n\n")
        spool = self._service.spool
        try:
            async for frames in self.frames(since, mounts):
                chunk = b"".join(frame.sse(spool.epoch) for frame in frames)
                try:
                    async with asyncio.timeout(self._write_timeout):
                        await resp.write(chunk)
                except TimeoutError:
                    self._dropped("sse", since)
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
        except ConnectionError:
            pass
        return resp

    async def websocket(
        self, request: web.Request, since: int, mounts: frozenset[str] | None
    ) -> web.WebSocketResponse:
        """A WebSocket after ``since``: one CloudEvents JSON text message per event."""
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=self._max_message)
        await ws.prepare(request)
        sender = asyncio.create_task(self._ws_send(ws, since, mounts))
        receiver = asyncio.create_task(_ws_drain(ws))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        if sender.done() and not sender.cancelled() and isinstance(sender.exception(), _Dropped):
            reason = self._dropped("ws", since)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await ws.close(code=1008, message=reason[:120].encode())
            if not ws.closed and request.transport is not None:
                request.transport.abort()
            return ws
        with contextlib.suppress(Exception):
            await ws.close()
        return ws

    async def _ws_send(
        self, ws: web.WebSocketResponse, since: int, mounts: frozenset[str] | None
    ) -> None:
        async for frames in self.frames(since, mounts):
            for frame in frames:
                if frame.body is None:
                    continue
                try:
                    async with asyncio.timeout(self._write_timeout):
                        await ws.send_str(frame.body.decode())
                except TimeoutError:
                    raise _Dropped from None

    def _dropped(self, kind: str, since: int) -> str:
        """Count and log a slow client; the reason it is told."""
        self.dropped += 1
        reason = (
            f"slow consumer: took no data for {self._write_timeout:g} s; "
            "reconnect with your last event id to resume"
        )
        logger.warning("api_stream_dropped", stream=kind, reason="slow_consumer", since=since)
        return reason

    # -- frames ---------------------------------------------------------------------------------

    async def frames(self, since: int, mounts: frozenset[str] | None) -> AsyncIterator[list[Frame]]:
        """The stream after ``since``: replay from the spool, then live; heartbeats when idle.

        Args:
            since: the client's position (every event up to it was delivered); a position
                before the oldest retained event, beyond the head, or negative (one of another
                spool) starts with a snapshot.
            mounts: the mounts to pass (service-wide events always pass); None for all.

        Yields:
            Frames in sequence order, a batch at a time, until :meth:`close`.

        Raises:
            SpoolError: the spool closed under the stream.
        """
        spool = self._service.spool
        cursor = since
        if since < spool.first_seq - 1 or since > self._head:
            frames, cursor = self._snapshot(since, mounts)
            yield frames
        sent = cursor
        while not self._closing.is_set():
            records = await asyncio.to_thread(spool.read, cursor, self._batch)
            if records:
                cursor = records[-1].seq
                batch = [
                    Frame(r.seq, r.body)
                    for r in records
                    if mounts is None or r.mount in mounts or r.mount == ""
                ]
                if batch:
                    sent = cursor
                    batch[-1].seq = cursor
                    yield batch
                continue
            waiter = asyncio.ensure_future(spool.wait(cursor))
            closer = asyncio.ensure_future(self._closing.wait())
            try:
                done, _ = await asyncio.wait(
                    {waiter, closer}, timeout=self._heartbeat, return_when=FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
                closer.cancel()
            if waiter in done:
                waiter.result()  # SpoolError when the spool closed under us
            elif not done:
                yield [Frame(cursor if cursor != sent else None, None)]
                sent = cursor

    @property
    def _head(self) -> int:
        return self._service.head_seq

    def _snapshot(self, since: int, mounts: frozenset[str] | None) -> tuple[list[Frame], int]:
        """A resync and a snapshot of each mount, consistent at the head, for a lost position.

        Every event carries the head ``H`` as its sequence (the list is the one at ``H``); only
        the last frame carries a resume position (``H``), so a client that drops out half-way
        resumes from where it was and gets the whole snapshot again. Event ids are
        ``STREAM~snapshot@H:EPOCH:N``: the same snapshot of the same spool gets the same ids,
        and they never collide with the ids of a spool (``STREAM:EPOCH:SEQ``). The resync's
        reason is ``retention``: the position is not one this spool holds (older than its
        retention, beyond its head, or of another spool).
        """
        service = self._service
        head = service.head_seq
        items: list[tuple[str, Transition | Control]] = []
        names = [n for n in service.mounts if mounts is None or n in mounts]
        for name in names:
            resync = service.mounts[name].resync_items("retention")
            items += [(name, item) for item in expand(resync)]
        self.snapshots += 1
        logger.info("api_stream_snapshot", since=since, head=head, mounts=len(names))
        stream = f"{service.stream}~snapshot@{head}:{service.spool.epoch}"
        frames = []
        for i, (name, item) in enumerate(items, start=1):
            body = orjson.loads(service.encode(head, name, item).body)
            body["id"] = f"{stream}:{i}"
            frames.append(Frame(head if i == len(items) else None, orjson.dumps(body)))
        return frames, head


async def _ws_drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends, so pings and the close handshake work."""
    async for msg in ws:
        if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return
