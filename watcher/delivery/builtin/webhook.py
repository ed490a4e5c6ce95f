"""The ``webhook`` sink: HTTP POST of CloudEvents, signed per the Standard Webhooks specification.

This module is the only user of aiohttp's client for sinks; every aiohttp error leaves it as
``SinkUnavailable`` or ``SinkRejected``.

Three modes (the CloudEvents HTTP protocol binding's content modes):

- ``batch`` (default): one POST per batch, ``application/cloudevents-batch+json``, a JSON array
  of the events in order.
- ``structured``: one POST per event, ``application/cloudevents+json``, the event's JSON object.
- ``binary``: one POST per event; every attribute but ``data`` and ``datacontenttype`` is a
  ``ce-NAME`` header (the value percent-encoded as the binding says), ``datacontenttype`` is
  the ``Content-Type`` and the body is the event's ``data``.

In the per-event modes the events of a batch are posted one at a time, in order; the sink
remembers which events of the batch in hand were accepted, so a retried batch re-posts only
the others, and a batch is acknowledged only once every one of its events was accepted or
refused for good (only the refused ones are dead-lettered).

The Standard Webhooks headers are:

- ``webhook-id``: the event id (per-event modes, and a one-event batch), else ``FIRST..LAST``
  (the ids of the batch's first and last events). A retry keeps its id; consumers dedupe by
  event id.
- ``webhook-timestamp``: Unix seconds when this attempt was made.
- ``webhook-signature``: for each secret, ``v1,`` + base64 of HMAC-SHA256 over
  ``{id}.{timestamp}.{body}`` keyed with the base64-decoded part of the ``whsec_...`` secret;
  several signatures are space-separated (secret rotation). Absent without secrets.

Status handling: 2xx acknowledges; 408, 429, 5xx, 3xx (redirects are not followed: fix the
URL), timeouts and connection errors raise ``SinkUnavailable`` (retried, honouring
``Retry-After`` in seconds or as an HTTP date); ``410 Gone`` disables the endpoint (logged at
error level, health down, nothing is posted any more until the sink is opened again: restart
or SIGHUP; the events wait in the spool, they are not dead-lettered); other 4xx raise
``SinkRejected`` (dead-lettered).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final

import aiohttp
import orjson
import structlog

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.events import Record
from watcher.delivery.plugins import Options
from watcher.delivery.sinks import Health

__all__ = [
    "CONTENT_TYPE",
    "MODES",
    "STRUCTURED_CONTENT_TYPE",
    "WebhookSink",
    "binary_message",
    "header_value",
    "parse_retry_after",
    "parse_secret",
    "sign",
]

logger = structlog.get_logger("layerwatch.webhook")

CONTENT_TYPE: Final = "application/cloudevents-batch+json"
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"
MODES: Final = ("batch", "structured", "binary")
_RESERVED: Final = frozenset(
    {"content-type", "content-length", "webhook-id", "webhook-timestamp", "webhook-signature"}
)
_SECRET_PREFIX: Final = "whsec_"
_BODY_LOG_LIMIT: Final = 512
# What a disabled endpoint asks the runner to wait (capped by its retry_after_max): the sink
# posts nothing while disabled, so a retry only re-raises; it need not come often.
_GONE_WAIT: Final = 86400.0
# Printable ASCII but space, double quote and percent: what a ce- header value keeps as is.
_HEADER_SAFE: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}


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
    """One ``webhook-signature`` entry: ``v1,`` + base64(HMAC-SHA256(``id.timestamp.body``))."""
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


def header_value(value: object) -> str:
    """A CloudEvents attribute as a binary-mode header value (HTTP binding 3.1.3.2).

    The canonical string (``true``/``false`` for a boolean, decimal for an integer) with
    space, double quote, percent and every character outside printable ASCII percent-encoded
    as UTF-8 bytes, upper-case hex.
    """
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return "".join(
        ch if ch in _HEADER_SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in text
    )


def binary_message(body: bytes) -> tuple[dict[str, str], bytes]:
    """The binary-mode headers and body of one structured CloudEvent JSON object.

    Every attribute but ``data`` and ``datacontenttype`` becomes a ``ce-NAME`` header;
    ``datacontenttype`` becomes ``Content-Type`` (``application/json`` when absent, as the
    JSON format implies); the body is ``data`` encoded as JSON (empty without ``data``).
    """
    event: dict[str, Any] = orjson.loads(body)
    headers = {
        f"ce-{name}": header_value(value)
        for name, value in event.items()
        if name not in ("data", "datacontenttype", "data_base64")
    }
    headers["Content-Type"] = str(event.get("datacontenttype", "application/json"))
    if "data_base64" in event:
        return headers, base64.b64decode(event["data_base64"])
    return headers, orjson.dumps(event["data"]) if "data" in event else b""


def _batch_id(batch: Sequence[Record]) -> str:
    first = batch[0].id
    return first if len(batch) == 1 else f"{first}..{batch[-1].id}"


@dataclass(frozen=True, slots=True)
class _Request:
    """One POST: its Standard Webhooks id, its content headers and its body."""

    msg_id: str
    headers: Mapping[str, str]
    body: bytes


class WebhookSink:
    """POSTs events to a URL as CloudEvents (batch, structured or binary), signed per
    Standard Webhooks.

    Options:
        url (str, required): an ``http`` or ``https`` URL.
        mode (str, default ``batch``): ``batch`` (one request per batch),
            ``structured`` or ``binary`` (one request per event).
        secret (str, optional): ``whsec_`` + base64 key, or several separated by spaces;
            without a secret no signature is sent.
        secrets (list of str, or one str of space-separated secrets, optional): several keys
            (rotation): every request carries one signature per key, in this order. Not with
            ``secret``.
        timeout (float, default 10): seconds for the whole request, answer included.
        headers (table of str, default none): extra request headers (e.g. ``Authorization``);
            they cannot replace the content type, the ``webhook-*`` or the ``ce-*`` headers.
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
        self.mode = opts.choice("mode", MODES, "batch")
        self._keys = _secret_keys(opts, has_secrets="secrets" in options)
        self.timeout = opts.number("timeout", 10.0, exclusive=True)
        self.headers = opts.string_map("headers", {})
        reserved = sorted(
            k for k in self.headers if k.lower() in _RESERVED or k.lower().startswith("ce-")
        )
        if reserved:
            raise ConfigError(opts.key("headers"), f"{reserved[0]!r} is set by the sink")
        opts.finish()
        self.name = name
        self._session: aiohttp.ClientSession | None = None
        self._error = ""
        self._gone = ""
        # Per-event modes: the outcome of each event of the batch in hand, by (epoch, seq):
        # "" accepted, else why it was refused. A retry of the batch skips them.
        self._outcomes: dict[tuple[int, int], str] = {}
        self._logger = logger.bind(sink=name)

    async def open(self) -> None:
        """Create the HTTP client session; a disabled endpoint (410 Gone) is tried again."""
        if self._gone:
            self._logger.info("webhook_reenabled", url=self._shown)
            self._gone = ""
            self._error = ""
        self._connect()

    def _connect(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "layerwatch"},
            )
        return self._session

    async def send(self, batch: Sequence[Record]) -> None:
        """POST the batch (one request, or one per event); return once all were accepted.

        Raises:
            SinkUnavailable: a request failed in a way worth retrying, or the endpoint is
                disabled (410 Gone); a retry re-posts only what was not accepted.
            SinkRejected: the endpoint refused the batch, or (per-event modes) some of its
                events, for good; ``seqs`` names those events.
        """
        if self._gone:
            raise SinkUnavailable(self._gone, retry_after=_GONE_WAIT)
        if self.mode == "batch":
            body = b"[" + b",".join(record.body for record in batch) + b"]"
            await self._post(_Request(_batch_id(batch), {"Content-Type": CONTENT_TYPE}, body))
            return
        keys = {(record.epoch, record.seq) for record in batch}
        self._outcomes = {k: v for k, v in self._outcomes.items() if k in keys}
        for record in batch:
            key = (record.epoch, record.seq)
            if key in self._outcomes:
                continue
            try:
                await self._post(self._request(record))
            except SinkRejected as exc:
                self._outcomes[key] = str(exc)
            else:
                self._outcomes[key] = ""
        refused = {k: why for k, why in self._outcomes.items() if why}
        if refused:
            first = min(refused)
            raise SinkRejected(
                f"{len(refused)} of {len(batch)} events refused; first: {refused[first]}",
                seqs=frozenset(seq for _, seq in refused),
            )

    def _request(self, record: Record) -> _Request:
        if self.mode == "structured":
            return _Request(record.id, {"Content-Type": STRUCTURED_CONTENT_TYPE}, record.body)
        headers, data = binary_message(record.body)
        return _Request(record.id, headers, data)

    async def _post(self, request: _Request) -> None:
        """POST one request; return on a 2xx answer.

        Raises:
            SinkUnavailable: retryable failure, or 410 Gone (the sink is then disabled).
            SinkRejected: any other 4xx.
        """
        session = self._connect()
        timestamp = int(time.time())
        headers = {
            **self.headers,
            **request.headers,
            "webhook-id": request.msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = " ".join(
                sign(key, request.msg_id, timestamp, request.body) for key in self._keys
            )
        try:
            async with session.post(
                self.url, data=request.body, headers=headers, allow_redirects=False
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
        shown_answer = answer.decode("utf-8", "replace")
        if status == 410:
            self._gone = self._error = (
                f"disabled: POST {self._shown} answered 410 Gone (the receiver no longer wants "
                "these events); nothing is posted until layerwatch restarts or gets SIGHUP"
            )
            self._logger.error(
                "webhook_endpoint_gone",
                url=self._shown,
                webhook_id=request.msg_id,
                answer=shown_answer,
                action="fix or re-create the endpoint (or change url), then restart or SIGHUP",
            )
            raise SinkUnavailable(self._gone, retry_after=_GONE_WAIT)
        problem = f"POST {self._shown} answered {status}"
        self._error = problem
        self._logger.warning(
            "webhook_refused",
            status=status,
            webhook_id=request.msg_id,
            retry_after=retry_after,
            answer=shown_answer,
        )
        if status in (408, 429) or status >= 500 or 300 <= status < 400:
            raise SinkUnavailable(problem, retry_after=retry_after)
        raise SinkRejected(problem)

    def health(self) -> Health:
        """Not ok after a failed POST, until the next success; not ok while disabled."""
        return Health(ok=not self._error, detail=self._error)

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _secret_keys(opts: Options, *, has_secrets: bool) -> tuple[bytes, ...]:
    """The HMAC keys of ``secret`` (one string) or ``secrets`` (a list, or one string); in
    both, a string may hold several secrets separated by spaces (rotation, and a secret read
    from a file or the environment that holds the new and the old one).

    Raises:
        ConfigError: both options given, no secret in them, or a secret that is not
            ``whsec_`` + base64 (the message never echoes the secret).
    """
    one = opts.optional_string("secret")
    if has_secrets and one is not None:
        raise ConfigError(opts.key("secrets"), "give secret or secrets, not both")
    if has_secrets:
        option, given = "secrets", opts.strings("secrets")
    elif one is not None:
        option, given = "secret", (one,)
    else:
        return ()
    texts = [part for item in given for part in item.split()]
    if not texts:
        raise ConfigError(opts.key(option), "expected at least one secret")
    keys: list[bytes] = []
    for n, text in enumerate(texts, 1):
        try:
            keys.append(parse_secret(text))
        except ValueError as exc:  # never echo the secret
            where = f"secret #{n}: " if len(texts) > 1 else ""
            raise ConfigError(opts.key(option), f"{where}expected whsec_ + base64: {exc}") from None
    return tuple(keys)
