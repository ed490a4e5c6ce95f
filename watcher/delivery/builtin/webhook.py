"""The ``webhook`` sink: batched HTTP POST, signed per the Standard Webhooks specification.

This module is the only user of aiohttp's client for sinks; every aiohttp error leaves it as
``SinkUnavailable`` or ``SinkRejected``.

Each batch is one POST of ``application/cloudevents-batch+json``: a JSON array of the events,
in order. The Standard Webhooks headers are:

- ``webhook-id``: the event id when the batch holds one event, else ``FIRST..LAST`` (the ids
  of its first and last events). A retried batch keeps its id; consumers dedupe by event id.
- ``webhook-timestamp``: Unix seconds when this attempt was made.
- ``webhook-signature``: ``v1,`` + base64 of HMAC-SHA256 over ``{id}.{timestamp}.{body}``,
  keyed with the base64-decoded part of the ``whsec_...`` secret (only with ``secret``).

Status handling: 2xx acknowledges; 408, 429, 5xx, 3xx (redirects are not followed: fix the
URL), timeouts and connection errors raise ``SinkUnavailable`` (retried, honouring
``Retry-After`` in seconds or as an HTTP date); other 4xx raise ``SinkRejected`` (the batch
is dead-lettered).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Final

import aiohttp
import structlog

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = ["CONTENT_TYPE", "WebhookSink", "parse_retry_after", "parse_secret", "sign"]

logger = structlog.get_logger("layerwatch.webhook")

CONTENT_TYPE: Final = "application/cloudevents-batch+json"
_RESERVED: Final = frozenset(
    {"content-type", "content-length", "webhook-id", "webhook-timestamp", "webhook-signature"}
)
_SECRET_PREFIX: Final = "whsec_"
_BODY_LOG_LIMIT: Final = 512


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional ``whsec_``.

    Raises:
        ValueError: the rest is not base64 or is empty.
    """
    encoded = secret.removeprefix(_SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64 after the whsec_ prefix") from exc
    if not key:
        raise ValueError("empty key")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(``id.timestamp.body``))."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date).

    Returns None when absent or malformed; never negative.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now)


def _batch_id(batch: Sequence[Record]) -> str:
    first = batch[0].id
    return first if len(batch) == 1 else f"{first}..{batch[-1].id}"


class WebhookSink:
    """POSTs batches of events to a URL, signed per Standard Webhooks.

    Options:
        url (str, required): an ``http`` or ``https`` URL.
        secret (str, optional): ``whsec_`` + base64 key; without it no signature is sent.
        timeout (float, default 10): seconds for the whole request, answer included.
        headers (table of str, default none): extra request headers (e.g. ``Authorization``);
            they cannot replace the content type or the ``webhook-*`` headers.
    """

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        opts = Options(name, options)
        self.url = opts.string("url")
        parts = urllib.parse.urlsplit(self.url)
        # What logs and /healthz may show: no credentials, no query (tokens live there).
        host = parts.netloc.rpartition("@")[2]
        self._shown = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(opts.key("url"), f"expected an http(s) URL, got {self.url!r}")
        secret = opts.optional_string("secret")
        try:
            self._key = parse_secret(secret) if secret is not None else None
        except ValueError as exc:  # never echo the secret
            raise ConfigError(opts.key("secret"), f"expected whsec_ + base64: {exc}") from None
        self.timeout = opts.number("timeout", 10.0, exclusive=True)
        self.headers = opts.string_map("headers", {})
        reserved = sorted(k for k in self.headers if k.lower() in _RESERVED)
        if reserved:
            raise ConfigError(opts.key("headers"), f"{reserved[0]!r} is set by the sink")
        opts.finish()
        self.name = name
        self._session: aiohttp.ClientSession | None = None
        self._error = ""
        self._logger = logger.bind(sink=name)

    async def open(self) -> None:
        """Create the HTTP client session (connections are made per request, and reused)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "layerwatch"},
            )

    async def send(self, batch: Sequence[Record]) -> None:
        """POST the batch; return on a 2xx answer."""
        if self._session is None or self._session.closed:
            await self.open()
        assert self._session is not None
        body = b"[" + b",".join(record.body for record in batch) + b"]"
        msg_id = _batch_id(batch)
        timestamp = int(time.time())
        headers = {
            **self.headers,
            "Content-Type": CONTENT_TYPE,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                answer = await response.content.read(_BODY_LOG_LIMIT)
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = str(exc).replace(self.url, self._shown)
            problem = f"POST {self._shown} failed: {type(exc).__name__}: {detail}"
            self._error = problem
            raise SinkUnavailable(problem) from exc
        if 200 <= status < 300:
            self._error = ""
            return
        problem = f"POST {self._shown} answered {status}"
        self._error = problem
        self._logger.warning(
            "webhook_refused",
            status=status,
            webhook_id=msg_id,
            retry_after=retry_after,
            answer=answer.decode("utf-8", "replace"),
        )
        if status in (408, 429) or status >= 500 or 300 <= status < 400:
            raise SinkUnavailable(problem, retry_after=retry_after)
        raise SinkRejected(problem)

    def health(self) -> Health:
        """Not ok after a failed POST, until the next success."""
        return Health(ok=not self._error, detail=self._error)

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
