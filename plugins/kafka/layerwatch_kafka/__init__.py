"""layerwatch sink for Kafka: the only module that imports ``aiokafka``.

Records go to one topic, keyed by mount, so each mount's events share a partition and keep
their order. ``acks="all"``: a record counts as written once every in-sync replica has it.
``send`` hands the whole batch to the producer, then waits for every delivery report; one
failure fails the batch and the runner sends all of it again. Kafka cannot refuse a copy it
already holds, so a retried batch may leave duplicates (and, after a failed batch, copies that
land after later records): consumers dedupe by event ``id`` and order by ``sequence``.
``enable_idempotence`` only removes the duplicates of the producer's own internal retries.

Events follow the CloudEvents Kafka protocol binding: in ``structured`` mode (the default)
the value is the whole event and the header ``content-type`` is
``application/cloudevents+json``; in ``binary`` mode the value is ``data`` (JSON), the
attributes are ``ce_*`` headers and ``content-type`` is ``application/json``.

Options (``[sinks.NAME]`` with ``type = "kafka"``):

- ``bootstrap_servers``: ``host:port`` or a list of them (default ``127.0.0.1:9092``).
- ``topic``: the topic (default ``layerwatch``).
- ``mode``: ``structured`` or ``binary`` (default ``structured``).
- ``enable_idempotence``: the idempotent producer (default false; needs broker support).
- ``request_timeout_ms``: how long the producer waits for a broker (default 30000).
- ``linger_ms``: how long the producer gathers records into one request (default 0: the
  runner already hands over whole batches).
- ``client_id``: default ``layerwatch-NAME``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiokafka  # type: ignore[import-untyped]
import aiokafka.errors  # type: ignore[import-untyped]
import orjson
import structlog

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["KafkaSink", "binary_message"]

_log = structlog.get_logger()

STRUCTURED_CONTENT_TYPE: Final = b"application/cloudevents+json"

_PERMANENT: Final = (
    aiokafka.errors.MessageSizeTooLargeError,
    aiokafka.errors.RecordTooLargeError,
    aiokafka.errors.InvalidTopicError,
    aiokafka.errors.TopicAuthorizationFailedError,
    aiokafka.errors.ClusterAuthorizationFailedError,
)
"""Errors a retry of the same batch cannot cure."""

_CE_ATTRIBUTES: Final = ("specversion", "id", "source", "type", "time", "subject", "sequence")


def binary_message(body: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of an event in the binding's binary mode.

    Args:
        body: the event in structured JSON (``Record.body``).

    Returns:
        ``data`` as JSON, and a ``ce_*`` header for each attribute plus ``content-type``.
    """
    event: dict[str, Any] = orjson.loads(body)
    headers = [
        (f"ce_{name}", str(event[name]).encode()) for name in _CE_ATTRIBUTES if name in event
    ]
    content_type = str(event.get("datacontenttype", "application/json"))
    headers.append(("content-type", content_type.encode()))
    return orjson.dumps(event.get("data")), headers


class KafkaSink:
    """Produces events to a Kafka topic, keyed by mount.

    A ``SinkFactory`` (``watcher.delivery.sinks``); its options are in the module docstring.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        self.name = name
        opts = Options(name, options)
        self._idempotence = opts.boolean("enable_idempotence", False)
        self._servers = list(opts.strings("bootstrap_servers", ["127.0.0.1:9092"]))
        self._topic = opts.string("topic", "layerwatch")
        self._binary = opts.choice("mode", ("structured", "binary"), "structured") == "binary"
        self._request_timeout_ms = opts.integer("request_timeout_ms", 30000, minimum=1)
        self._linger_ms = opts.integer("linger_ms", 0, minimum=0)
        self._client_id = opts.string("client_id", f"layerwatch-{name}")
        opts.finish()
        self._producer: Any = None
        self._health = Health(ok=True)
        self._log = _log.bind(sink=name, topic=self._topic)

    def message(self, record: Record) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """The key, value and headers ``record`` is produced with."""
        key = record.mount.encode()
        if self._binary:
            value, headers = binary_message(record.body)
            return key, value, headers
        return key, record.body, [("content-type", STRUCTURED_CONTENT_TYPE)]

    async def open(self) -> None:
        """Start the producer (fetches the cluster's metadata).

        Raises:
            SinkUnavailable: no broker answered.
        """
        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=self._servers,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=self._idempotence,
            request_timeout_ms=self._request_timeout_ms,
            linger_ms=self._linger_ms,
        )
        try:
            await producer.start()
        except (OSError, aiokafka.errors.KafkaError) as exc:
            await producer.stop()
            self._health = Health(ok=False, detail=f"connect: {exc!r}")
            raise SinkUnavailable(f"kafka: cannot start producer: {exc!r}") from exc
        self._producer = producer
        self._health = Health(ok=True)
        self._log.info("kafka_sink_opened", servers=self._servers, idempotence=self._idempotence)

    async def send(self, batch: Sequence[Record]) -> None:
        """Produce ``batch`` and return once every record is acknowledged by all replicas.

        Raises:
            SinkUnavailable: a broker is unreachable or timed out; some records may be written.
            SinkRejected: a record is too large or the topic is invalid or forbidden.
        """
        if self._producer is None:
            raise SinkUnavailable("kafka: not open")
        futures: list[asyncio.Future[Any]] = []
        try:
            for record in batch:
                key, value, headers = self.message(record)
                futures.append(
                    await self._producer.send(self._topic, value, key=key, headers=headers)
                )
            results = await asyncio.gather(*futures, return_exceptions=True)
        except _PERMANENT as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkRejected(f"kafka: record refused: {exc!r}") from exc
        except (OSError, aiokafka.errors.KafkaError) as exc:
            self._health = Health(ok=False, detail=repr(exc))
            raise SinkUnavailable(f"kafka: produce failed: {exc!r}") from exc
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            first = errors[0]
            self._health = Health(ok=False, detail=repr(first))
            message = f"kafka: {len(errors)} of {len(batch)} records failed: {first!r}"
            if all(isinstance(error, _PERMANENT) for error in errors):
                raise SinkRejected(message) from first
            raise SinkUnavailable(message) from first
        self._health = Health(ok=True)

    def health(self) -> Health:
        """The outcome of the last start or batch."""
        return self._health

    async def close(self) -> None:
        """Flush and stop the producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except (OSError, aiokafka.errors.KafkaError) as exc:
                self._log.warning("kafka_close_failed", error=repr(exc))
