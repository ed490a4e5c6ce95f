"""The webhook sink against a real aiohttp server on 127.0.0.1; signatures checked independently."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.builtin.webhook import (
    CONTENT_TYPE,
    WebhookSink,
    header_value,
    parse_retry_after,
    sign,
)
from watcher.delivery.runner import RunnerConfig, SinkRunner
from watcher.testing import MemoryLog, check_sink_contract, free_port, make_records

SECRET = "whsec_" + base64.b64encode(b"a test key of 24 bytes..").decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec, apart from the sink's code."""
    key = base64.b64decode(secret[len("whsec_") :])
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > 300:
        return False
    content = msg_id.encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())
    for candidate in headers["webhook-signature"].split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return True
    return False


@dataclass
class Seen:
    """One request the receiver got."""

    at: float
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver that answers from a script, then 200; it records every request."""

    url: str = ""
    script: list[tuple[str, int, dict[str, str | Callable[[], str]]]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    hang: float = 0.6

    async def handle(self, request: web.Request) -> web.Response:
        """Answer the next scripted response."""
        body = await request.read()
        what, status, scripted = self.script.pop(0) if self.script else ("answer", 200, {})
        headers = {k: v() if callable(v) else v for k, v in scripted.items()}
        self.seen.append(Seen(time.monotonic(), status, dict(request.headers), body))
        if what == "hang":
            await asyncio.sleep(self.hang)
        return web.Response(status=status, headers=headers, text="scripted")

    def accepted_ids(self) -> list[str]:
        """Event ids of the 2xx-answered requests, first arrival of each id, in order."""
        ids: dict[str, None] = {}
        for seen in self.seen:
            if 200 <= seen.status < 300:
                for event_id in seen_ids(seen):
                    ids.setdefault(event_id, None)
        return list(ids)


def seen_ids(seen: Seen) -> list[str]:
    """The event ids one request carried, whatever its mode."""
    if "ce-id" in seen.headers:
        return [seen.headers["ce-id"]]
    parsed = orjson.loads(seen.body)
    return [event["id"] for event in (parsed if isinstance(parsed, list) else [parsed])]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real HTTP server on a free 127.0.0.1 port."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    rec.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it is true (15 s at most)."""
    for _ in range(1500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_every_event_arrives_in_order_through_failures(receiver: Receiver) -> None:
    """Through a 500, a timeout and 429/503 with Retry-After, every event arrives, in order."""
    receiver.script = [
        ("answer", 500, {}),
        ("hang", 200, {}),
        ("answer", 429, {"Retry-After": "1"}),
        ("answer", 200, {}),
        ("answer", 503, {"Retry-After": lambda: formatdate(time.time() + 1.5, usegmt=True)}),
    ]
    sink = WebhookSink("hook", {"url": receiver.url, "secret": SECRET, "timeout": 0.3})
    log = MemoryLog(make_records(1, 30))
    stop = asyncio.Event()
    runner = SinkRunner(sink, log, RunnerConfig(batch_size=7, backoff_base=0.01, backoff_cap=0.05))
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: log.cursor("hook") == 30)
    stop.set()
    await task
    assert receiver.accepted_ids() == [f"test:1:{n}" for n in range(1, 31)]
    assert [s.status for s in receiver.seen[:6]] == [500, 200, 429, 200, 503, 200]
    assert len(receiver.seen) == 9  # 5 batches, 4 failed attempts
    assert receiver.seen[4].headers["webhook-id"] == "test:1:8..test:1:14"
    assert all(verify(SECRET, s.headers, s.body) for s in receiver.seen)
    assert all(s.headers["Content-Type"] == CONTENT_TYPE for s in receiver.seen)
    # the retries of a batch reuse its webhook-id and body
    assert receiver.seen[0].body == receiver.seen[1].body == receiver.seen[2].body
    assert receiver.seen[0].headers["webhook-id"] == "test:1:1..test:1:7"
    assert receiver.seen[3].headers["webhook-id"] == "test:1:1..test:1:7"
    # Retry-After was honoured, in seconds and as an HTTP date
    assert receiver.seen[3].at - receiver.seen[2].at >= 0.95
    assert receiver.seen[5].at - receiver.seen[4].at >= 0.45
    assert runner.retries == 4
    assert sink.health().ok


async def test_client_error_is_rejected_and_dead_lettered(
    receiver: Receiver, tmp_path: Path
) -> None:
    """A 4xx other than 408/429 rejects the batch: it is dead-lettered and delivery goes on."""
    receiver.script = [("answer", 422, {})]
    sink = WebhookSink("hook", {"url": receiver.url})
    dead = tmp_path / "dead.jsonl"
    log = MemoryLog(make_records(1, 4))
    stop = asyncio.Event()
    runner = SinkRunner(sink, log, RunnerConfig(batch_size=2, dead_letter=dead))
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: log.cursor("hook") == 4)
    stop.set()
    await task
    lines = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert [line["event"]["id"] for line in lines] == ["test:1:1", "test:1:2"]
    assert "422" in lines[0]["reason"]
    assert receiver.accepted_ids() == ["test:1:3", "test:1:4"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, SinkRejected),
        (401, SinkRejected),
        (404, SinkRejected),
        (408, SinkUnavailable),
        (301, SinkUnavailable),
        (502, SinkUnavailable),
    ],
)
async def test_status_decides_retry_or_reject(
    receiver: Receiver, status: int, error: type[Exception]
) -> None:
    """Each class of HTTP answer maps to retry (SinkUnavailable) or reject (SinkRejected)."""
    receiver.script = [("answer", status, {"Location": "/elsewhere"})]
    sink = WebhookSink("hook", {"url": receiver.url})
    await sink.open()
    with pytest.raises(error, match=str(status)):
        await sink.send(make_records(1, 1))
    assert not sink.health().ok
    await sink.send(make_records(1, 1))
    assert sink.health().ok
    await sink.close()
    assert len(receiver.seen) == 2


async def test_timeout_is_retryable(receiver: Receiver) -> None:
    """A destination that answers too late raises SinkUnavailable after the timeout."""
    receiver.script = [("hang", 200, {})]
    receiver.hang = 1.5
    sink = WebhookSink("hook", {"url": receiver.url, "timeout": 0.2})
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="Timeout"):
        await sink.send(make_records(1, 1))
    assert time.monotonic() - started < 1.2
    await sink.close()


async def test_connection_refused_is_retryable() -> None:
    """Nobody listening at the URL raises SinkUnavailable."""
    sink = WebhookSink("hook", {"url": f"http://127.0.0.1:{free_port()}/hook"})
    await sink.open()
    with pytest.raises(SinkUnavailable, match="failed"):
        await sink.send(make_records(1, 1))
    assert "failed" in sink.health().detail
    await sink.close()


async def test_single_event_id_extra_headers_and_no_secret(receiver: Receiver) -> None:
    """One event uses its own id as webhook-id; extra headers go out; no secret, no signature."""
    sink = WebhookSink("hook", {"url": receiver.url, "headers": {"Authorization": "Bearer t"}})
    await sink.open()
    await sink.send(make_records(5, 1))
    await sink.close()
    [seen] = receiver.seen
    assert seen.headers["webhook-id"] == "test:1:5"
    assert seen.headers["Authorization"] == "Bearer t"
    assert "webhook-signature" not in seen.headers
    assert abs(int(seen.headers["webhook-timestamp"]) - time.time()) < 5
    assert [e["id"] for e in orjson.loads(seen.body)] == ["test:1:5"]


async def test_webhook_keeps_the_contract(receiver: Receiver) -> None:
    """The webhook sink passes the sink contract checks, signatures verifying."""
    await check_sink_contract(WebhookSink, {"url": receiver.url, "secret": SECRET})
    assert len(receiver.seen) == 2
    assert all(verify(SECRET, s.headers, s.body) for s in receiver.seen)


def test_signature_matches_the_spec_test_vector() -> None:
    """sign() reproduces the Standard Webhooks reference vector."""
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_retry_after_parsing() -> None:
    """Retry-After is read as delay-seconds or an HTTP date; junk and the past give 0 or None."""
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after(None, now) is None


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "sinks.h.url"),
        ({"url": "ftp://example.org/x"}, "sinks.h.url"),
        ({"url": "http:///nohost"}, "sinks.h.url"),
        ({"url": "http://x", "secret": "whsec_not base64!"}, "sinks.h.secret"),
        ({"url": "http://x", "secret": "whsec_"}, "sinks.h.secret"),
        ({"url": "http://x", "timeout": 0}, "sinks.h.timeout"),
        ({"url": "http://x", "headers": {"Webhook-Signature": "v1,x"}}, "sinks.h.headers"),
        ({"url": "http://x", "headers": {"X": 1}}, "sinks.h.headers"),
        ({"url": "http://x", "retries": 3}, "sinks.h.retries"),
    ],
)
def test_bad_options_name_the_key(options: Mapping[str, object], key: str) -> None:
    """Missing, malformed and unknown webhook options raise ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        WebhookSink("h", options)
    assert info.value.key == key
    assert "whsec_not" not in str(info.value)


async def test_failures_never_show_the_url_credentials_or_query() -> None:
    """Credentials and the query (where tokens live) stay out of errors and health."""
    sink = WebhookSink(
        "w", {"url": f"http://alice:hunter2@127.0.0.1:{free_port()}/hook?token=SECRET"}
    )
    await sink.open()
    try:
        with pytest.raises(SinkUnavailable) as info:
            await sink.send(make_records(1, 1))
    finally:
        await sink.close()
    for text in (str(info.value), sink.health().detail):
        assert "hunter2" not in text
        assert "SECRET" not in text
        assert "127.0.0.1" in text


OTHER_SECRET = "whsec_" + base64.b64encode(b"the next key, after rotation").decode()


def decode_binary(headers: Mapping[str, str], body: bytes) -> dict[str, object]:
    """A CloudEvent from a binary-mode request, decoded per the HTTP binding (3.1), strictly.

    Raises AssertionError for anything the binding forbids: a raw value with a character that
    must be percent-encoded, a ``ce-datacontenttype`` header, bad UTF-8 after decoding, a
    missing required attribute.
    """
    event: dict[str, object] = {}
    for name, raw in headers.items():
        if not name.lower().startswith("ce-"):
            continue
        assert all(0x21 <= ord(ch) <= 0x7E and ch != '"' for ch in raw), (name, raw)
        attribute = name.lower()[3:]
        assert attribute != "datacontenttype", "ce-datacontenttype must not be sent"
        event[attribute] = urllib.parse.unquote_to_bytes(raw).decode("utf-8", "strict")
    assert event.get("specversion") == "1.0"
    for required in ("id", "source", "type"):
        assert event.get(required), required
    event["datacontenttype"] = headers["Content-Type"]
    assert headers["Content-Type"] == "application/json"
    event["data"] = orjson.loads(body)
    return event


async def run_until_acknowledged(
    sink: WebhookSink, log: MemoryLog, config: RunnerConfig, upto: int
) -> SinkRunner:
    """Run a runner over ``log`` until the sink's cursor reaches ``upto``; stop it."""
    stop = asyncio.Event()
    runner = SinkRunner(sink, log, config)
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: log.cursor("hook") == upto)
    stop.set()
    await task
    return runner


async def test_structured_mode_posts_each_event_once_and_retries_only_the_rest(
    receiver: Receiver,
) -> None:
    """Structured mode: one signed application/cloudevents+json POST per event, in order; a
    failure in the middle of a batch re-posts only the events not yet accepted."""
    receiver.script = [("answer", 200, {}), ("answer", 200, {}), ("answer", 503, {})]
    sink = WebhookSink("hook", {"url": receiver.url, "mode": "structured", "secret": SECRET})
    records = make_records(1, 5)
    config = RunnerConfig(batch_size=5, backoff_base=0.01, backoff_cap=0.05)
    await run_until_acknowledged(sink, MemoryLog(records), config, 5)
    posted = [seen_ids(s)[0] for s in receiver.seen]
    ids = [f"test:1:{n}" for n in range(1, 6)]
    # events 1 and 2 were accepted before the 503 on event 3: the retry starts at event 3
    assert posted == [*ids[:3], *ids[2:]]
    assert receiver.accepted_ids() == ids
    for seen, record in zip(receiver.seen[3:], records[2:], strict=True):
        assert seen.headers["Content-Type"] == "application/cloudevents+json"
        assert seen.body == record.body
        assert seen.headers["webhook-id"] == record.id
        assert verify(SECRET, seen.headers, seen.body)


async def test_binary_mode_satisfies_a_strict_binding_receiver(receiver: Receiver) -> None:
    """Binary mode: a receiver decoding ce- headers per the HTTP binding gets back exactly the
    events, paths with spaces, percent signs, non-ASCII and non-UTF-8 bytes included."""
    paths = [b"/plain", b'/a b%20c"q', "/é/€ 😀".encode(), b"/\xff\xfe"]
    records = make_records(1, 4, paths=paths)
    sink = WebhookSink("hook", {"url": receiver.url, "mode": "binary", "secret": SECRET})
    await sink.open()
    try:
        await sink.send(records)
    finally:
        await sink.close()
    assert len(receiver.seen) == 4
    for seen, record in zip(receiver.seen, records, strict=True):
        assert decode_binary(seen.headers, seen.body) == orjson.loads(record.body)
        assert seen.headers["webhook-id"] == record.id
        assert verify(SECRET, seen.headers, seen.body)  # signed over the body sent: the data


def test_header_value_follows_the_binding_example() -> None:
    """The HTTP binding's own example, and the characters it says must be encoded."""
    assert header_value("Euro \u20ac \U0001f600") == "Euro%20%E2%82%AC%20%F0%9F%98%80"
    assert header_value('a"b%c') == "a%22b%25c"
    assert header_value("tab\there") == "tab%09here"
    assert header_value(True) == "true"
    assert header_value(7) == "7"


async def test_per_event_rejection_dead_letters_only_that_event(
    receiver: Receiver, tmp_path: Path
) -> None:
    """In a per-event mode a 422 for one event dead-letters that event alone; the others of
    its batch are delivered and counted as delivered."""
    receiver.script = [("answer", 200, {}), ("answer", 422, {})]
    sink = WebhookSink("hook", {"url": receiver.url, "mode": "binary"})
    dead = tmp_path / "dead.jsonl"
    config = RunnerConfig(batch_size=4, dead_letter=dead)
    runner = await run_until_acknowledged(sink, MemoryLog(make_records(1, 4)), config, 4)
    lines = [orjson.loads(line) for line in dead.read_bytes().splitlines()]
    assert [line["event"]["id"] for line in lines] == ["test:1:2"]
    assert "422" in lines[0]["reason"]
    assert receiver.accepted_ids() == ["test:1:1", "test:1:3", "test:1:4"]
    assert len(receiver.seen) == 4
    assert (runner.delivered, runner.dead_lettered) == (3, 1)


@pytest.mark.parametrize("form", ["list", "string", "secret"])
@pytest.mark.parametrize("mode", ["batch", "binary"])
async def test_every_secret_signs_so_either_receiver_verifies(
    receiver: Receiver, form: str, mode: str
) -> None:
    """With two secrets (rotation), each request carries two signatures: a receiver that knows
    only the old secret and one that knows only the new one both verify it."""
    secrets: object = [OTHER_SECRET, SECRET] if form == "list" else f"{OTHER_SECRET} {SECRET}"
    key = "secret" if form == "secret" else "secrets"  # secret may hold several, too
    sink = WebhookSink("hook", {"url": receiver.url, "mode": mode, key: secrets})
    await sink.open()
    try:
        await sink.send(make_records(1, 2))
    finally:
        await sink.close()
    assert receiver.seen
    stranger = "whsec_" + base64.b64encode(b"a key nobody signs with").decode()
    for seen in receiver.seen:
        assert len(seen.headers["webhook-signature"].split(" ")) == 2
        assert verify(SECRET, seen.headers, seen.body)
        assert verify(OTHER_SECRET, seen.headers, seen.body)
        assert not verify(stranger, seen.headers, seen.body)


async def test_gone_disables_the_endpoint_until_reopened(
    receiver: Receiver, tmp_path: Path
) -> None:
    """410 Gone (on the second event of a batch): nothing more is posted however fast the
    runner retries; health says why, an error is logged, nothing is dead-lettered or
    acknowledged; reopen (SIGHUP) tries again and delivers from the event that met the 410."""
    receiver.script = [("answer", 200, {}), ("answer", 410, {})]
    sink = WebhookSink("hook", {"url": receiver.url, "mode": "structured"})
    dead = tmp_path / "dead.jsonl"
    log = MemoryLog(make_records(1, 3))
    config = RunnerConfig(
        batch_size=3, backoff_base=0.001, backoff_cap=0.001, retry_after_max=0.001, dead_letter=dead
    )
    runner = SinkRunner(sink, log, config)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(runner.run(stop))
        await until(lambda: runner.retries >= 50)
    assert len(receiver.seen) == 2
    assert log.cursor("hook") == 0
    assert not dead.exists()
    health = runner.health()
    assert not health.ok
    assert "410 Gone" in health.detail
    assert "disabled" in health.detail
    gone = [entry for entry in logs if entry["event"] == "webhook_endpoint_gone"]
    assert len(gone) == 1
    assert gone[0]["log_level"] == "error"
    runner.reopen()
    await until(lambda: log.cursor("hook") == 3)
    stop.set()
    await task
    assert receiver.accepted_ids() == ["test:1:1", "test:1:2", "test:1:3"]
    assert [seen_ids(s)[0] for s in receiver.seen] == [f"test:1:{n}" for n in (1, 2, 2, 3)]
    assert runner.dead_lettered == 0


async def test_reopen_cuts_a_long_backoff_short(receiver: Receiver) -> None:
    """A retry waiting out a long Retry-After goes at once when reopen() is asked for."""
    receiver.script = [("answer", 503, {"Retry-After": "3600"})]
    sink = WebhookSink("hook", {"url": receiver.url})
    log = MemoryLog(make_records(1, 1))
    runner = SinkRunner(sink, log, RunnerConfig(retry_after_max=3600))
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: runner.retries == 1)
    runner.reopen()
    await until(lambda: log.cursor("hook") == 1)
    stop.set()
    await task
    assert [s.status for s in receiver.seen] == [503, 200]


@pytest.mark.parametrize(
    ("options", "key", "problem"),
    [
        ({"mode": "knative"}, "sinks.h.mode", "batch, structured, binary"),
        ({"secret": SECRET, "secrets": [SECRET]}, "sinks.h.secrets", "not both"),
        ({"secrets": []}, "sinks.h.secrets", "list of strings"),
        ({"secrets": "  "}, "sinks.h.secrets", "at least one"),
        ({"secrets": [SECRET, "whsec_bad!"]}, "sinks.h.secrets", "secret #2"),
        ({"secret": f"{SECRET} whsec_bad!"}, "sinks.h.secret", "secret #2"),
        ({"secret": "   "}, "sinks.h.secret", "at least one"),
        ({"headers": {"CE-Type": "x"}}, "sinks.h.headers", "CE-Type"),
    ],
)
def test_bad_mode_and_secrets_name_the_key(
    options: Mapping[str, object], key: str, problem: str
) -> None:
    """A bad mode, secret list or ce- header raises ConfigError naming the key and problem."""
    with pytest.raises(ConfigError) as info:
        WebhookSink("h", {"url": "http://x", **options})
    assert info.value.key == key
    assert problem in info.value.problem
    assert "whsec_bad" not in str(info.value)
