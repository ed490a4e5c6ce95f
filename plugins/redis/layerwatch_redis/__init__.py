"""layerwatch sink for Redis Streams: the only module that imports ``redis``.

Each record is ``XADD``-ed to its mount's stream with an explicit entry id made of its spool's
epoch and its sequence number (``EPOCH-SEQ``; the epoch is the spool's creation time in ms, so
the id reads as a time like any Redis entry id). Sequence numbers grow across the whole
service, so they grow within each mount's stream too; a spool made anew after a loss starts
its sequence again at 1 but has a later epoch, so its entries still go after the old ones.
Redis refuses an id equal to or below a stream's last id. A record written by an earlier,
half-acknowledged attempt fails with that error on retry; the sink then reads the entry at
that id, and only when it holds this very event (same event id) counts it as "already
written". Anything else means the stream is ahead of this spool in a way no retry explains
(another writer, a spool whose clock went back): the sink says so loudly (warning
``redis_stream_ahead``, unhealthy) and rejects the batch, so the runner dead-letters it; it
never skips a record silently. No record can be written twice.

The batch goes out as one ``MULTI``/``EXEC`` pipeline (one round trip). A plain pipeline
(``transaction=False``) could write record 5 of a stream after record 4 failed (say, out of
memory for a moment); on retry, record 4's id would then be below the stream's top and it
would be taken as written: lost. Inside ``MULTI`` a command refused while queuing aborts the
whole batch, so the records written for a stream are always a prefix of its records in the
batch and a retry fills in exactly the rest.

The sink packs the batch itself, in one pass (the bytes redis-py's pipeline would send, byte
for byte), sends it on a connection of the client's pool and reads the replies with that
connection's parser (``MULTI``'s ``OK``, a ``QUEUED`` per record, ``EXEC``'s array), under one
deadline for the round trip instead of redis-py's timer per reply. Most of what is left is
parsing a reply per record: install the ``hiredis`` extra for the C parser.

Options (``[sinks.NAME]`` with ``type = "redis"``):

- ``url``: the server (default ``redis://127.0.0.1:6379/0``).
- ``stream``: the key template, ``{mount}`` is the mount name (default ``layerwatch:{mount}``).
- ``service_stream``: the key of events without a mount (default ``layerwatch:_service``).
- ``maxlen``: trim each stream to about this many entries (``MAXLEN ~``); absent: no trimming.
- ``timeout``: seconds for connecting and for each round trip, a whole batch (default 10).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final

import redis.asyncio
import redis.exceptions
import structlog

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["RedisSink", "entry_id", "event_id_bytes"]

_log = structlog.get_logger()

_ALREADY_WRITTEN: Final = "equal or smaller than the target stream top item"
"""The tail of Redis's error for an ``XADD`` id at or below the stream's last id."""


_MULTI: Final = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC: Final = b"*1\r\n$4\r\nEXEC\r\n"

_ID_PREFIX: Final = b'{"specversion":"1.0","id":"'
"""How every body ``watcher.delivery.events`` encodes starts: the id is the second member."""


def event_id_bytes(record: Record) -> bytes:
    """``record.id`` in UTF-8, read from the start of the body instead of parsing all of it.

    The id is the JSON string right after ``_ID_PREFIX``; without a backslash in it, it ends
    at the next quote and its bytes are the id's UTF-8. Any other body goes through
    ``record.id``.
    """
    body = record.body
    if body.startswith(_ID_PREFIX):
        end = body.find(b'"', len(_ID_PREFIX))
        raw = body[len(_ID_PREFIX) : end]
        if end > 0 and b"\\" not in raw:
            return raw
    return record.id.encode()


def entry_id(record: Record) -> str:
    """The stream entry id of ``record``: ``EPOCH-SEQ`` (``0-0``, below every valid id, is
    ``0-1``)."""
    if record.epoch == 0 and record.seq == 0:
        return "0-1"
    return f"{record.epoch}-{record.seq}"


def _parse_id(raw: bytes) -> tuple[int, int]:
    """A stream entry id (``MS-SEQ``) as a pair that sorts like Redis sorts ids."""
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


class RedisSink:
    """Appends events to Redis Streams, one stream per mount.

    A ``SinkFactory`` (``watcher.delivery.sinks``); its options are in the module docstring.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        self.name = name
        opts = Options(name, options)
        self._url = opts.string("url", "redis://127.0.0.1:6379/0")
        self.stream = opts.mount_names(
            "stream", "layerwatch:{mount}", "service_stream", "layerwatch:_service"
        )
        """The stream key an event of a mount is appended to (``""``: service-wide)."""
        self._maxlen = opts.integer("maxlen", 0, minimum=1) if "maxlen" in options else None
        self._timeout = opts.number("timeout", 10.0, minimum=0, exclusive=True)
        opts.finish()
        self._client: redis.asyncio.Redis | None = None
        self._keys: dict[str, bytes] = {}
        self._health = Health(ok=True)
        self._log = _log.bind(sink=name)

    async def open(self) -> None:
        """Connect and check the server answers.

        Raises:
            SinkUnavailable: the server cannot be reached or is still loading its data.
        """
        # No socket_timeout (redis-py's default is 5 s): it arms a timer for every reply read;
        # each round trip of this sink runs under one asyncio.timeout(timeout) instead.
        client = redis.asyncio.Redis.from_url(
            self._url, socket_timeout=None, socket_connect_timeout=self._timeout
        )
        try:
            async with asyncio.timeout(self._timeout):
                await client.ping()
        except (OSError, TimeoutError, redis.exceptions.RedisError) as exc:
            await client.aclose()
            self._health = Health(ok=False, detail=f"connect: {exc!r}")
            raise SinkUnavailable(f"redis: cannot reach {self._url}: {exc!r}") from exc
        self._client = client
        self._keys = {}
        self._health = Health(ok=True)
        self._log.info("redis_sink_opened", url=self._url)

    async def send(self, batch: Sequence[Record]) -> None:
        """Append ``batch`` in one ``MULTI``/``EXEC`` and return once every record is in.

        Raises:
            SinkUnavailable: the server is unreachable, loading, read-only or out of memory.
            SinkRejected: a stream key holds another type (``WRONGTYPE``).
        """
        if self._client is None:
            raise SinkUnavailable("redis: not open")
        if not batch:
            return
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._transaction(self._client, self._commands(batch), len(batch))
        except (OSError, TimeoutError, redis.exceptions.RedisError) as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkUnavailable(f"redis: batch not written: {exc!r}") from exc
        refused = []
        for record, result in zip(batch, results, strict=True):
            if not isinstance(result, redis.exceptions.ResponseError):
                continue
            if _ALREADY_WRITTEN in str(result):
                refused.append(record)
                continue
            self._health = Health(ok=False, detail=repr(result))
            key = self.stream(record.mount)
            if str(result).startswith("WRONGTYPE"):
                raise SinkRejected(f"redis: {key} is not a stream: {result}") from result
            raise SinkUnavailable(f"redis: {key}: {result}") from result
        if refused:
            await self._check_written(refused)
            self._log.info("redis_duplicates_skipped", count=len(refused), batch=len(batch))
        self._health = Health(ok=True)

    def _commands(self, batch: Sequence[Record]) -> bytes:
        """``MULTI``, one ``XADD`` per record, ``EXEC``: the batch in the Redis protocol.

        The commands redis-py's ``pipe.xadd(key, {"id": ..., "type": ..., "event": ...},
        id=EPOCH-SEQ, maxlen=..., approximate=True)`` sends, packed here in one pass.
        """
        keys = self._keys
        parts = [_MULTI]
        for record in batch:
            head = keys.get(record.mount)
            if head is None:
                head = keys[record.mount] = self._xadd_head(record.mount)
            entry = entry_id(record).encode()
            event = event_id_bytes(record)
            kind = record.type.encode()
            body = record.body
            parts += (
                head,
                b"$%d\r\n%s\r\n$2\r\nid\r\n$%d\r\n%s\r\n$4\r\ntype\r\n$%d\r\n%s\r\n"
                b"$5\r\nevent\r\n$%d\r\n"
                % (len(entry), entry, len(event), event, len(kind), kind, len(body)),
                body,
                b"\r\n",
            )
        parts.append(_EXEC)
        return b"".join(parts)

    def _xadd_head(self, mount: str) -> bytes:
        """The start of an ``XADD`` to the stream of ``mount``, up to its entry id."""
        key = self.stream(mount).encode()
        head = b"*%d\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n" % (
            9 if self._maxlen is None else 12,
            len(key),
            key,
        )
        if self._maxlen is not None:
            limit = b"%d" % self._maxlen
            head += b"$6\r\nMAXLEN\r\n$1\r\n~\r\n$%d\r\n%s\r\n" % (len(limit), limit)
        return head

    @staticmethod
    async def _transaction(client: redis.asyncio.Redis, commands: bytes, count: int) -> list[Any]:
        """Send ``commands`` (``MULTI``, ``count`` commands, ``EXEC``) on one connection of the
        pool and return what ``EXEC`` returned: per command its reply or its error.

        Raises:
            redis.exceptions.RedisError: ``MULTI`` refused, or the transaction aborted (a
                command refused while queuing, such as out of memory: the first such error).
            OSError: the connection failed. A connection that failed in any way is dropped.
        """
        pool = client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(commands)
            await conn.read_response()  # MULTI: OK
            queuing: list[redis.exceptions.ResponseError] = []
            for _ in range(count):
                try:
                    await conn.read_response(disable_decoding=True)  # QUEUED
                except redis.exceptions.ResponseError as exc:
                    queuing.append(exc)
            try:
                results = await conn.read_response(disable_decoding=True)
            except redis.exceptions.ExecAbortError as exc:
                raise (queuing[0] if queuing else exc) from exc
            if not isinstance(results, list) or len(results) != count:
                raise redis.exceptions.ResponseError(f"EXEC returned {results!r:.200}")
            return results
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _check_written(self, refused: Sequence[Record]) -> None:
        """Make sure each record Redis refused as "at or below the top" was written before.

        It was when the stream holds this very event at its entry id, or (with ``maxlen``)
        when the id is below the stream's oldest entry: written, then trimmed away.

        Raises:
            SinkRejected: the stream holds something else at the id, or lacks it in the range
                it retains: it is ahead of this spool in a way no retry explains.
            SinkUnavailable: the server could not be asked.
        """
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for record in refused:
            key = self.stream(record.mount)
            pipe.xrange(key, entry_id(record), entry_id(record), count=1)
            pipe.xrange(key, "-", "+", count=1)
        try:
            async with asyncio.timeout(self._timeout):
                found = await pipe.execute()
        except (OSError, TimeoutError, redis.exceptions.RedisError) as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkUnavailable(f"redis: cannot check a retried batch: {exc!r}") from exc
        for i, record in enumerate(refused):
            at, oldest = found[2 * i], found[2 * i + 1]
            held = at[0][1].get(b"id", b"").decode(errors="replace") if at else None
            if held == record.id:
                continue
            trimmed = held is None and self._maxlen is not None and bool(oldest)
            if trimmed and _parse_id(oldest[0][0]) > (record.epoch, record.seq):
                continue  # written, then trimmed away
            key = self.stream(record.mount)
            what = f"holds {held}" if held is not None else "is missing below the top"
            detail = f"redis: {key} is ahead of this spool: entry {entry_id(record)} {what}"
            self._health = Health(ok=False, detail=detail)
            self._log.warning(
                "redis_stream_ahead", stream=key, entry=entry_id(record), id=record.id, held=held
            )
            raise SinkRejected(f"{detail}, not {record.id}")

    def health(self) -> Health:
        """The outcome of the last connect or batch."""
        return self._health

    async def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (OSError, redis.exceptions.RedisError) as exc:
                self._log.warning("redis_close_failed", error=repr(exc))
