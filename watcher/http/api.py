"""The HTTP API: health, metrics, mounts, change lists, live streams, sync, reset, export.

The aiohttp server: the app, its routes, authentication and errors. ``serve(service,
config)`` listens on a unix socket (mode 0600, its directory created 0700 when missing) and,
when ``listen`` is set, on TCP, where every request needs the bearer token (compared in
constant time) and a non-loopback address is refused unless ``allow_remote``. Cancelling
``serve`` closes the listeners, ends the streams and removes the socket file.

The streams (SSE at ``/v1/events``, WebSocket at ``/v1/events/ws``) are served by
``watcher.http.streams.EventStream``: this module parses their position and mount filter and admits
at most ``Limits.max_streams`` of them. Prometheus text is written by ``watcher.http.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson
import structlog
from aiohttp import web

from watcher.core.errors import ConfigError, LayerwatchError, PathError, WatchError
from watcher.core.export import export_diff, export_rootfs
from watcher.core.model import Kind
from watcher.delivery.events import file_type, path_fields
from watcher.delivery.spool import PositionLost
from watcher.http.metrics import CONTENT_TYPE, Exposition, MetricKind, version
from watcher.http.pipe import Pipe
from watcher.http.streams import EventStream
from watcher.http.view import MountView, ServiceView, SinkView
from watcher.live.inotify import read_limits
from watcher.service.config import DEFAULT_SOCKET, ApiConfig

__all__ = ["COOKIE", "Limits", "build_app", "parse_listen", "serve"]

logger = structlog.get_logger("layerwatch.api")

COOKIE: Final = "layerwatch_session"
"""The page's session cookie on TCP (HttpOnly, SameSite=Strict), set by ``GET /?token=``."""

_STATIC: Final = Path(__file__).parent / "static"
_JSON: Final = "application/json"
_CHUNK: Final = 1 << 16


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds that keep one client from costing the service more than its share.

    Attributes:
        max_body: the largest request body accepted (413 beyond it).
        batch: events read from the spool per step: a stream client's buffer.
        write_timeout: seconds a stream client may take no data before it is dropped.
        heartbeat: seconds between keep-alive frames on an idle stream.
        max_streams: concurrent stream clients (503 beyond it).
        sync_timeout: the default bound of ``POST .../sync`` and ``?sync=1``.
        shutdown_timeout: seconds open requests get to finish when the API stops.
    """

    max_body: int = 64 * 1024
    batch: int = 500
    write_timeout: float = 10.0
    heartbeat: float = 15.0
    max_streams: int = 64
    sync_timeout: float = 10.0
    shutdown_timeout: float = 2.0


class _Refused(Exception):
    """A request the API answers with an error status and a JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REFUSAL_HEADERS = {
    401: {"WWW-Authenticate": 'Bearer realm="layerwatch"'},
    503: {"Retry-After": "1"},  # a mount that is starting
}


def _refuse(status: int, message: str) -> NoReturn:
    raise _Refused(status, message)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": message, "status": status})
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


# -- listening ------------------------------------------------------------------------------


def parse_listen(listen: str, *, allow_remote: bool) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the address may be used.

    Raises:
        ConfigError: (key ``api.listen``) malformed, or not a loopback address while
            ``allow_remote`` is false.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host or int(port_text) > 65535:
        raise ConfigError("api.listen", f"must be HOST:PORT (e.g. 127.0.0.1:8421), got {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not allow_remote and not _is_loopback(host):
        raise ConfigError(
            "api.listen",
            f"{host} is not a loopback address; the API would be reachable from other "
            "machines with the token sent in clear text. Set api.allow_remote = true to "
            "listen there anyway (put TLS in front), or use 127.0.0.1 or the unix socket",
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unix_socket(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from the start (no chmod race)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left by a run that was killed
        else:
            raise ConfigError("api.socket", f"{path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)  # Linux: bind() creates the inode with this mode
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError("api.socket", f"cannot listen on {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


async def serve(service: ServiceView, config: ApiConfig, *, limits: Limits | None = None) -> None:
    """Serve the API for ``service`` until cancelled; then close and remove the socket.

    Raises:
        ConfigError: the socket or TCP address cannot be used (the message says why).
    """
    api = _Api(service, limits or Limits())
    runners: list[web.AppRunner] = []
    socket_path: Path | None = None
    if config.listen is not None:
        host, port = parse_listen(config.listen, allow_remote=config.allow_remote)
        if not config.token:
            raise ConfigError("api.token", "is required when api.listen (TCP) is set")
    try:
        if config.socket is not None or config.listen is None:
            socket_path = config.socket or DEFAULT_SOCKET
            sock = _unix_socket(socket_path)
            runner = await _start(api, None)
            runners.append(runner)
            await web.SockSite(runner, sock).start()
            logger.info("api_listening", socket=str(socket_path))
        if config.listen is not None and config.token:
            runner = await _start(api, config.token)
            runners.append(runner)
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise ConfigError("api.listen", f"cannot listen on {config.listen}: {exc}") from exc
            logger.info("api_listening", listen=config.listen)
        await asyncio.Event().wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
        logger.info("api_stopped")


async def _start(api: _Api, token: str | None) -> web.AppRunner:
    runner = web.AppRunner(
        build_app(api.service, token=token, api=api),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=api.limits.shutdown_timeout,
        logger=_ProtocolLog(),
    )
    await runner.setup()
    return runner


class _ProtocolLog(logging.Logger):
    """aiohttp's protocol logger: a malformed request becomes one structlog line, no traceback.

    Handlers never get here (the ``_errors`` middleware answers every failure); what does is
    a request aiohttp's parser refused (bad request line, header too long), already answered
    with a 400. A client cannot fill the log with tracebacks.
    """

    def __init__(self) -> None:
        super().__init__("layerwatch.api.http")

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        text = str(getattr(exc, "message", None) or exc).strip()
        error = text.splitlines()[0][:200] if isinstance(exc, BaseException) and text else ""
        logger.warning("api_bad_request", error=error, type=type(exc).__name__)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Dropped: aiohttp's debug chatter (non-HTTP traffic on the port)."""


def build_app(
    service: ServiceView,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    api: _Api | None = None,
) -> web.Application:
    """The aiohttp application; with ``token``, every request must carry it (TCP)."""
    api = api or _Api(service, limits or Limits())
    middlewares: list[Any] = [_errors]
    if token is not None:
        middlewares.append(_auth(token))
    app = web.Application(client_max_size=api.limits.max_body, middlewares=middlewares)
    app.on_shutdown.append(api.close_streams)
    app.add_routes(
        [
            web.get("/", api.page),
            web.static("/static/", _STATIC, follow_symlinks=False),
            web.get("/healthz", api.healthz),
            web.get("/metrics", api.metrics),
            web.get("/v1/mounts", api.mounts),
            web.get("/v1/mounts/{name}", api.mount),
            web.get("/v1/mounts/{name}/changes", api.changes),
            web.post("/v1/mounts/{name}/sync", api.sync),
            web.post("/v1/mounts/{name}/reset", api.reset),
            web.get("/v1/mounts/{name}/export", api.export),
            web.get("/v1/mounts/{name}/files/{path:.*}", api.file),
            web.get("/v1/mounts/{name}/dirs", api.directory),
            web.get("/v1/mounts/{name}/dirs/{path:.*}", api.directory),
            web.get("/v1/events", api.events_sse),
            web.get("/v1/events/ws", api.events_ws),
        ]
    )
    return app


# -- middlewares ----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSON error body; a traceback only ever reaches the log."""
    try:
        return await handler(request)
    except _Refused as exc:
        headers = _REFUSAL_HEADERS.get(exc.status)
        return _error(exc.status, exc.message, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _error(exc.status, exc.text or exc.reason, keep)
    except PathError as exc:
        return _error(404, str(exc))
    except LayerwatchError as exc:
        return _error(409, str(exc))
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception:
        logger.exception("api_request_failed", method=request.method, path=request.path)
        return _error(500, "internal error; the service log has the details")


def _cookie_value(token: str) -> str:
    """The session cookie for ``token``: derived from it, so the token itself is not stored."""
    return hmac.new(token.encode(), b"layerwatch page session", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _auth(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Bearer token on every request; the page's cookie for GET requests from the same origin."""
    session = _cookie_value(token)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), token):
            return await handler(request)
        if request.path == "/" and "token" in request.query and request.method == "GET":
            if not _same(request.query["token"], token):
                _refuse(401, "wrong token")
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
            return response
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and _same(cookie, session):
            if request.method not in ("GET", "HEAD"):
                _refuse(401, "the page cookie only allows reads; send Authorization: Bearer")
            origin = request.headers.get("Origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc != request.host:
                _refuse(403, "cross-origin request refused")
            return await handler(request)
        _refuse(401, "missing or wrong bearer token (send Authorization: Bearer TOKEN)")

    return auth


# -- stream requests -----------------------------------------------------------------------


def _since(request: web.Request, head: int, epoch: int) -> int:
    """The client's position: ``Last-Event-ID`` (``EPOCH:SEQ``, as SSE sends it) or
    ``?since=SEQ``; absent: the head (live only). A position of another spool (its epoch is not
    this spool's) is -1: the stream starts with a snapshot."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is None or raw == "":
        return head
    return _position(raw, epoch)


def _position(raw: str, epoch: int) -> int:
    """``SEQ`` or ``EPOCH:SEQ`` as a seq of this spool; -1 for another spool's position."""
    epoch_text, colon, seq_text = raw.rpartition(":")
    try:
        since = int(seq_text)
        other = bool(colon) and int(epoch_text) != epoch
    except ValueError:
        _refuse(400, f"since / Last-Event-ID must be SEQ or EPOCH:SEQ, got {raw[:40]!r}")
    if since < 0:
        _refuse(400, "since must not be negative")
    return -1 if other else since


@dataclass(slots=True)
class _Api:
    service: ServiceView
    limits: Limits
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    events: EventStream = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventStream(
            self.service,
            batch=self.limits.batch,
            heartbeat=self.limits.heartbeat,
            write_timeout=self.limits.write_timeout,
            max_message=self.limits.max_body,
        )

    # -- helpers ------------------------------------------------------------------------------

    def _state(self, request: web.Request) -> MountView:
        name = request.match_info["name"]
        state = self.service.mounts.get(name)
        if state is None:
            if self.service.is_starting(name):
                _refuse(503, f"mount {name!r} is starting (its first scan runs): try again")
            _refuse(404, f"no mount named {name!r}")
        return state

    def _mount_json(self, name: str, state: MountView) -> dict[str, Any]:
        counts = {k.value: 0 for k in Kind}
        for kind in state.kinds.values():
            counts[kind.value] += 1
        return {
            "name": name,
            "managed": state.managed,
            "mountpoint": os.fsdecode(state.fs.mountpoint),
            "upper": os.fsdecode(state.fs.rw),
            "lowers": [os.fsdecode(layer) for layer in state.fs.layers],
            "whiteouts": state.fs.whiteouts.value,
            "entries": len(state.kinds),
            "counts": counts,
            "watches": state.watch_count,
            "attribution": state.attribution,
            "source": self.service.source.get("source"),
            "degraded": state.degraded,
            "errors": list(state.errors),
        }

    async def _sync(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.service.sync()
        except TimeoutError:
            _refuse(504, f"sync did not complete within {seconds:g} s")

    @property
    def _head(self) -> int:
        return self.service.head_seq

    @property
    def _epoch(self) -> int:
        return self.service.spool.epoch

    async def close_streams(self, _app: web.Application) -> None:
        """``on_shutdown``: end every stream (cleanly, at a frame boundary)."""
        self.events.close()

    @contextlib.contextmanager
    def _stream_slot(self) -> Iterator[None]:
        if len(self.streams) >= self.limits.max_streams:
            _refuse(503, f"too many streams (limit {self.limits.max_streams}); try later")
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        try:
            yield
        finally:
            self.streams.discard(task)

    # -- pages and status ---------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The live page."""
        return web.FileResponse(_STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(self, request: web.Request) -> web.Response:
        """200 ``ok``, or 503 ``degraded`` with the reasons."""
        reasons = self.service.degraded()
        source = dict(self.service.source)
        if reasons:
            body = {"status": "degraded", "reasons": reasons, "head_seq": self._head}
            return _json({**body, "source": source}, 503)
        return _json({"status": "ok", "reasons": [], "head_seq": self._head, "source": source})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition (version 0.0.4)."""
        svc = self.service
        spool = await asyncio.to_thread(svc.spool.stats)
        text = Exposition()
        text.family("build_info", "gauge", "Always 1; the version of layerwatch as a label.")
        text.sample("build_info", 1, version=version())
        text.family("events_published_total", "counter", "Events published to the spool.")
        text.sample("events_published_total", svc.published)
        text.family("head_seq", "gauge", "The sequence number of the newest event.")
        text.sample("head_seq", svc.head_seq)
        text.family("spool_first_seq", "gauge", "The oldest sequence number the spool retains.")
        text.sample("spool_first_seq", spool.first_seq)
        text.family("spool_records", "gauge", "Events the spool retains.")
        text.sample("spool_records", spool.records)
        text.family("spool_bytes", "gauge", "Bytes of the events the spool retains.")
        text.sample("spool_bytes", spool.bytes)
        text.family(
            "durable_seconds",
            "histogram",
            "Per event: seconds from published to committed in the spool (group commit).",
        )
        text.histogram("durable_seconds", svc.durable_seconds)
        # Each family's samples follow its HELP and TYPE, together (the text format's rule).
        sinks = sorted(svc.sinks.items())
        sink_families: list[tuple[str, MetricKind, str, Callable[[SinkView], float]]] = [
            (
                "sink_lag",
                "gauge",
                "Events in the spool a sink has not acknowledged.",
                lambda s: s.lag,
            ),
            ("sink_delivered_total", "counter", "Events a sink accepted.", lambda s: s.delivered),
            (
                "sink_retries_total",
                "counter",
                "Failed sink attempts that were retried.",
                lambda s: s.retries,
            ),
            (
                "sink_dead_lettered_total",
                "counter",
                "Events a sink rejected.",
                lambda s: s.dead_lettered,
            ),
            (
                "sink_filtered_total",
                "counter",
                "Events a sink's filter dropped.",
                lambda s: s.filtered,
            ),
            ("sink_up", "gauge", "1 when the sink is healthy.", lambda s: int(s.health().ok)),
        ]
        for family, kind, help_, value in sink_families:
            text.family(family, kind, help_)
            for name, sink in sinks:
                text.sample(family, value(sink), sink=name)
        text.family(
            "sink_send_seconds", "histogram", "Seconds each send of a sink took (failed included)."
        )
        for name, sink in sinks:
            text.histogram("sink_send_seconds", sink.send_seconds, sink=name)
        text.family("inotify_watches", "gauge", "inotify watches held for all mounts.")
        text.sample("inotify_watches", svc.watches)
        with contextlib.suppress(WatchError):
            limits = read_limits()
            text.family("inotify_max_user_watches", "gauge", "fs.inotify.max_user_watches.")
            text.sample("inotify_max_user_watches", limits.max_user_watches)
            text.family("inotify_max_queued_events", "gauge", "fs.inotify.max_queued_events.")
            text.sample("inotify_max_queued_events", limits.max_queued_events)
        text.family("inotify_events_read_total", "counter", "Events read from the source (either).")
        text.sample("inotify_events_read_total", svc.events_read)
        text.family(
            "inotify_overflows_total", "counter", "Source queue overflows (IN_ or FAN_Q_OVERFLOW)."
        )
        text.sample("inotify_overflows_total", svc.overflows)
        text.family(
            "fanotify_events_filtered_total",
            "counter",
            "fanotify events for directories no mount follows (a filesystem mark's cost).",
        )
        text.sample("fanotify_events_filtered_total", svc.events_filtered)
        text.family("resyncs_total", "counter", "Resyncs published, by mount and reason.")
        for (mount, reason), count in sorted(svc.resyncs.items()):
            text.sample("resyncs_total", count, mount=mount, reason=reason)
        mounts = sorted(svc.mounts.items())
        text.family("mount_entries", "gauge", "Entries in a mount's change list.")
        for name, state in mounts:
            text.sample("mount_entries", len(state.kinds), mount=name)
        text.family("mount_watches", "gauge", "inotify watches held for a mount.")
        for name, state in mounts:
            text.sample("mount_watches", state.watch_count, mount=name)
        text.family("mount_degraded", "gauge", "1 when the mount is kept by periodic rescans.")
        for name, state in mounts:
            text.sample("mount_degraded", int(bool(state.degraded)), mount=name)
        text.family(
            "component_restarts_total",
            "counter",
            "Unexpected failures of a component (sink runner, mount start, discovery, API, "
            "housekeeping), each followed by a restart.",
        )
        for component, count in sorted(svc.restarts.items()):
            text.sample("component_restarts_total", count, component=component)
        text.family("mounts_starting", "gauge", "Configured mounts whose first scan runs.")
        text.sample("mounts_starting", svc.starting)
        text.family("api_streams", "gauge", "Stream clients connected.")
        text.sample("api_streams", len(self.streams))
        text.family("api_streams_dropped_total", "counter", "Stream clients dropped as too slow.")
        text.sample("api_streams_dropped_total", self.events.dropped)
        text.family("api_snapshots_total", "counter", "Snapshots synthesized for stream clients.")
        text.sample("api_snapshots_total", self.events.snapshots)
        return web.Response(body=text.render(), headers={"Content-Type": CONTENT_TYPE})

    # -- mounts ---------------------------------------------------------------------------------

    async def mounts(self, request: web.Request) -> web.Response:
        """Every followed mount."""
        rows = [self._mount_json(name, state) for name, state in self.service.mounts.items()]
        return _json({"mounts": rows, "head_seq": self._head})

    async def mount(self, request: web.Request) -> web.Response:
        """One mount."""
        state = self._state(request)
        return _json(self._mount_json(state.name, state))

    async def changes(self, request: web.Request) -> web.Response:
        """The change list (``diff --json`` rows) and the sequence number it is consistent at;
        with ``since=N``, the paths changed after N and what they are now (from the spool)."""
        state = self._state(request)
        flag = request.query.get("sync", "0")
        if flag not in ("0", "1", "true", "false"):
            _refuse(400, "sync must be 0 or 1")
        if flag in ("1", "true"):
            await self._sync(self.limits.sync_timeout)
        if "since" in request.query:
            return await self._changes_since(state.name, request.query["since"])
        changes, seq = state.changes(), self.service.head_seq
        rows = [{"kind": c.kind.value, **path_fields(c.path)} for c in changes]
        return _json({"mount": state.name, "seq": seq, "changes": rows})

    async def _changes_since(self, name: str, raw: str) -> web.Response:
        spool = self.service.spool
        since = _position(raw, spool.epoch)
        if since < 0:
            _refuse(410, f"position {raw!r} is another spool's: read the whole list")
        try:
            answer = await asyncio.to_thread(spool.changes_since, name, since)
        except PositionLost as exc:
            body = {"error": str(exc), "status": 410, "oldest": exc.oldest}
            return _json(body, status=410)
        rows = [
            {"kind": kind.value if kind is not None else None, **path_fields(path), "seq": seq}
            for path, kind, seq in answer.paths
        ]
        return _json(
            {
                "mount": name,
                "since": answer.since,
                "seq": answer.head,
                "epoch": spool.epoch,
                "resync": answer.resync,
                "changes": rows,
            }
        )

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            _refuse(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            _refuse(400, "the body must be a JSON object")
        return body

    async def sync(self, request: web.Request) -> web.Response:
        """Pass the sync barrier; body ``{"timeout": seconds}`` (optional)."""
        state = self._state(request)
        body = await self._body(request)
        timeout = body.get("timeout", self.limits.sync_timeout)
        unknown = sorted(set(body) - {"timeout"})
        if unknown:
            _refuse(400, f"unknown field {unknown[0]!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            _refuse(400, "timeout must be a positive number of seconds")
        await self._sync(min(float(timeout), 300.0))
        changes, seq = state.changes(), self.service.head_seq
        return _json({"mount": state.name, "seq": seq, "entries": len(changes)})

    async def reset(self, request: web.Request) -> web.Response:
        """Empty a managed mount's writable branch (unmount, clear, remount), then resync."""
        state = self._state(request)
        await self._body(request)
        if not state.managed:
            _refuse(409, f"mount {state.name!r} is attached, not managed; not resetting it")
        name = state.name
        logger.info("api_reset", mount=name)
        await self.service.reset(name)
        changes, seq = state.changes(), self.service.head_seq
        return _json({"mount": name, "seq": seq, "entries": len(changes)})

    # -- reading inside the root ----------------------------------------------------------------

    def _inner_path(self, request: web.Request, state: MountView, what: str) -> bytes:
        """The raw bytes of the path after ``/files/`` or ``/dirs/``, checked."""
        raw = request.raw_path.partition("?")[0]
        prefix = f"/v1/mounts/{state.name}/{what}"
        if not raw.startswith(prefix):
            _refuse(400, "write the mount name without percent-encoding")
        path = urllib.parse.unquote_to_bytes(raw[len(prefix) :])
        if b"\0" in path or b".." in path.split(b"/"):
            _refuse(400, "'..' and NUL are not allowed in paths; give a plain path in the root")
        if not _has_merged_view(state):
            _refuse(409, f"mount {state.name!r} has no merged view to read from")
        return b"/" + path.lstrip(b"/")

    async def file(self, request: web.Request) -> web.StreamResponse:
        """A regular file of the merged view; symlinks resolve inside the root only."""
        state = self._state(request)
        path = self._inner_path(request, state, "files")
        try:
            f = await asyncio.to_thread(state.fs.open_file, path)
        except OSError as exc:
            raise PathError(f"{os.fsdecode(path)}: {exc.strerror}") from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            resp = web.StreamResponse(
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            )
            await resp.prepare(request)
            sent = 0
            while sent < size:
                chunk = await asyncio.to_thread(f.read, min(_CHUNK, size - sent))
                if not chunk:
                    break  # the file shrank: the client sees a short body
                await resp.write(chunk)
                sent += len(chunk)
        await resp.write_eof()
        return resp

    async def directory(self, request: web.Request) -> web.Response:
        """A directory listing of the merged view, with each entry's state in the list."""
        state = self._state(request)
        path = self._inner_path(request, state, "dirs")
        entries = await asyncio.to_thread(state.fs.read_dir, path)
        kinds = state.kinds
        rows = []
        for entry in entries:
            child = path.rstrip(b"/") + b"/" + entry.name
            name = path_fields(entry.name)
            kind = kinds.get(child)
            rows.append(
                {
                    **{("name" if k == "path" else "name_b64"): v for k, v in name.items()},
                    "file_type": file_type(entry.st.st_mode),
                    "size": entry.st.st_size,
                    "mode": entry.st.st_mode,
                    "uid": entry.st.st_uid,
                    "gid": entry.st.st_gid,
                    "mtime_ns": str(entry.st.st_mtime_ns),
                    "kind": kind.value if kind is not None else None,
                }
            )
        return _json({"mount": state.name, **path_fields(path), "entries": rows})

    async def export(self, request: web.Request) -> web.StreamResponse:
        """A streamed tar: ``what=diff`` (an OCI layer of the change list) or ``rootfs``."""
        state = self._state(request)
        what = request.query.get("what", "diff")
        fs = state.fs
        write: Callable[[io.BufferedWriter], object]
        if what == "diff":

            def write(out: io.BufferedWriter) -> object:
                return export_diff(
                    fs.rw, fs.layers, out, whiteouts=fs.whiteouts.value,
                    xattr_prefix=fs.xattr_prefix,
                )  # fmt: skip

        elif what == "rootfs":
            if not _has_merged_view(state):
                _refuse(409, f"mount {state.name!r} has no merged view to export")

            def write(out: io.BufferedWriter) -> object:
                return export_rootfs(fs.mountpoint, out)

        else:
            _refuse(400, "what must be 'diff' or 'rootfs'")
        pipe = Pipe(asyncio.get_running_loop())
        worker = asyncio.create_task(asyncio.to_thread(pipe.run, write))
        resp: web.StreamResponse | None = None
        try:
            first = await pipe.get()
            if first is None:
                await worker  # nothing came: a failure is raised here, as a clean JSON error
            filename = f"{state.name}-{what}.tar"
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/x-tar",
                    "Content-Disposition": f'attachment; filename="{filename}"',
                }
            )
            await resp.prepare(request)
            chunk = first
            while chunk is not None:
                await resp.write(chunk)
                chunk = await pipe.get()
            await worker
            await resp.write_eof()
            return resp
        except BaseException as exc:
            pipe.abort()
            with contextlib.suppress(BaseException):
                await worker
            if resp is not None and resp.prepared and request.transport is not None:
                logger.warning("api_export_aborted", mount=state.name, what=what, error=repr(exc))
                request.transport.abort()  # the client must not take a short tar for a whole one
                return resp
            raise

    # -- streams --------------------------------------------------------------------------------

    def _filter(self, request: web.Request) -> frozenset[str] | None:
        names = request.query.getall("mount", [])
        for name in names:  # a mount that is starting will have events: not refused
            if name not in self.service.mounts and not self.service.is_starting(name):
                _refuse(404, f"no mount named {name!r}")
        return frozenset(names) if names else None

    async def events_sse(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events; ``id:`` is ``EPOCH:SEQ``, ``Last-Event-ID`` or ``since`` resumes."""
        since = _since(request, self._head, self._epoch)
        mounts = self._filter(request)
        with self._stream_slot():
            return await self.events.sse(request, since, mounts)

    async def events_ws(self, request: web.Request) -> web.StreamResponse:
        """WebSocket: one CloudEvents JSON text message per event; ``?since=`` resumes."""
        since = _since(request, self._head, self._epoch)
        mounts = self._filter(request)
        with self._stream_slot():
            return await self.events.websocket(request, since, mounts)


def _has_merged_view(state: MountView) -> bool:
    """Whether the mount's merged view can be read (mounted at its mountpoint)."""
    return os.path.isdir(state.fs.mountpoint) and state.fs.is_mounted()
