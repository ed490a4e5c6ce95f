"""layerwatch sink for Kafka: the only module that imports ``aiokafka``.

Records go to one topic, keyed by mount, so each mount's events share a partition and keep
their order. ``acks="all"``: a record counts as written once every in-sync replica has it.
``send`` hands the whole batch to the producer, then waits for every delivery report; one
failure fails the batch and the runner sends all of it again. Kafka cannot refuse a copy it
already holds, so a retried batch may leave duplicates (and, after a failed batch, copies that
land after later records): consumers dedupe by event ``id`` and order by ``sequence``.
``enable_idempotence`` only removes the duplicates of the producer's own internal retries.

The sink builds the record batches itself (``create_batch``/``send_batch``): each record goes
to the partition ``producer.send`` would pick for its key, in batch order, into record batches
of up to ``max_batch_size`` bytes, one delivery report per record batch instead of a future
per record. A batch of the runner is then one produce request, or a few.

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
- ``linger_ms``: how long the producer holds a record batch before sending it (default 0:
  the runner already hands over whole batches).
- ``max_batch_size``: the most bytes of records in one record batch (default 524288); keep
  it under the broker's and the topic's ``max.message.bytes`` (1 MiB by default).
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
from aiokafka.partitioner import DefaultPartitioner  # type: ignore[import-untyped]
from aiokafka.record.default_records import (  # type: ignore[import-untyped]
    DefaultRecordBatchBuilder,
)

from watcher.core.errors import SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["KafkaSink", "binary_message"]

_log = structlog.get_logger()

STRUCTURED_CONTENT_TYPE: Final = b"application/cloudevents+json"

_STRUCTURED_HEADERS: Final = [("content-type", STRUCTURED_CONTENT_TYPE)]

_MAX_REQUEST_SIZE: Final = 1024 * 1024
"""The largest record the sink hands over (aiokafka's ``max_request_size``, its default)."""

_PARTITIONER: Final = DefaultPartitioner()
"""Key -> partition, as ``producer.send`` picks it: murmur2 of the key over the partitions."""

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
        self.max_batch_size = opts.integer("max_batch_size", 512 * 1024, minimum=1024)
        """The most bytes of records in one record batch (aiokafka's ``max_batch_size``)."""
        self._client_id = opts.string("client_id", f"layerwatch-{name}")
        opts.finish()
        self._producer: Any = None
        self._partitions: list[int] = []
        self._partition_of: dict[bytes, int] = {}
        self._health = Health(ok=True)
        self._log = _log.bind(sink=name, topic=self._topic)

    def message(self, record: Record) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """The key, value and headers ``record`` is produced with."""
        key = record.mount.encode()
        if self._binary:
            value, headers = binary_message(record.body)
            return key, value, headers
        return key, record.body, _STRUCTURED_HEADERS

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
            max_batch_size=self.max_batch_size,
            max_request_size=_MAX_REQUEST_SIZE,
            partitioner=_PARTITIONER,
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
        if not batch:
            return
        futures: list[asyncio.Future[Any]] = []
        try:
            await self._produce(self._producer, batch, futures)
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
            message = f"kafka: {len(errors)} of {len(futures)} record batches failed: {first!r}"
            if all(isinstance(error, _PERMANENT) for error in errors):
                raise SinkRejected(message) from first
            raise SinkUnavailable(message) from first
        self._health = Health(ok=True)

    async def _produce(
        self, producer: Any, batch: Sequence[Record], futures: list[asyncio.Future[Any]]
    ) -> None:
        """Hand ``batch`` to the producer as record batches, one or more per partition.

        Each record goes to the partition the producer's default partitioner picks for its key
        (murmur2 of the mount, as ``producer.send`` does), appended in batch order to that
        partition's builder; a full builder is handed over and the next one started, so each
        partition's records stay in order. A delivery future per record batch goes into
        ``futures``.

        Raises:
            aiokafka.errors.MessageSizeTooLargeError: a record is over ``max_request_size``
                (checked before anything of the batch is handed over, as ``send`` does).
        """
        messages = [self.message(record) for record in batch]
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        for key, value, headers in messages:
            if (size := estimate(key, value, headers)) > _MAX_REQUEST_SIZE:
                raise aiokafka.errors.MessageSizeTooLargeError(
                    f"a record of {size} bytes is over max_request_size {_MAX_REQUEST_SIZE}"
                )
        partitions = sorted(await producer.partitions_for(self._topic))
        if partitions != self._partitions:
            self._partitions, self._partition_of = partitions, {}
        builders: dict[int, Any] = {}
        for key, value, headers in messages:
            partition = self._partition_of.get(key)
            if partition is None:
                partition = self._partition_of[key] = _PARTITIONER(key, partitions, partitions)
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(builder, self._topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)  # fits
        for partition, builder in builders.items():
            futures.append(await producer.send_batch(builder, self._topic, partition=partition))

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
