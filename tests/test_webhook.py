"""The webhook sink against a real aiohttp server on 127.0.0.1; signatures checked independently."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from watcher.core.errors import ConfigError, SinkRejected, SinkUnavailable
from watcher.delivery.builtin.webhook import CONTENT_TYPE, WebhookSink, parse_retry_after, sign
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
                for event in orjson.loads(seen.body):
                    ids.setdefault(event["id"], None)
        return list(ids)


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
