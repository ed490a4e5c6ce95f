"""The API's security promises, against a real service: tokens, socket modes, confinement.

Requests that a well-behaved client library would normalise away (``..``, percent-encoded
dots, garbage request lines) are sent as raw bytes over the real socket.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog
from overlay import requires_overlay
from test_api import ApiRun, changes, running, unix_session

from watcher.core.errors import ConfigError
from watcher.http.api import COOKIE, parse_listen, serve
from watcher.service.config import ApiConfig, Config, MountConfig
from watcher.service.service import Service

pytestmark = [requires_overlay]

HOST_PASSWD = Path("/etc/passwd").read_bytes().splitlines()[0]
"""A line of the host's /etc/passwd: it must never come out of the API."""


async def raw_request(run: ApiRun, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as-is over the unix socket; the status and the body."""
    reader, writer = await asyncio.open_unix_connection(str(run.socket))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def get_raw(run: ApiRun, target: bytes) -> tuple[int, bytes]:
    """GET ``target`` (a raw request-target) with Connection: close."""
    return await raw_request(
        run, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )


# -- TCP and tokens ---------------------------------------------------------------------------


async def test_tcp_needs_the_bearer_token(tmp_path: Path) -> None:
    """On TCP, no token or a wrong one gets 401 JSON; the right one gets through."""
    async with running(tmp_path, tcp=True) as run, aiohttp.ClientSession(run.url) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            async with s.get("/v1/mounts", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in (await resp.json())["error"]
        async with s.get("/", headers={}) as resp:
            assert resp.status == 401
        good = {"Authorization": f"Bearer {run.token}"}
        async with s.get("/v1/mounts", headers=good) as resp:
            assert resp.status == 200
        async with unix_session(run) as local, local.get("/v1/mounts") as resp:
            assert resp.status == 200  # the socket's 0600 mode is its guard


async def test_page_token_becomes_an_httponly_cookie(tmp_path: Path) -> None:
    """?token= sets an HttpOnly SameSite cookie (not the token) that allows same-origin reads."""
    jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of an IP address host, as browsers do
    async with (
        running(tmp_path, tcp=True) as run,
        aiohttp.ClientSession(run.url, cookie_jar=jar) as s,
    ):
        async with s.get("/?token=wrong", allow_redirects=False) as resp:
            assert resp.status == 401
        async with s.get(f"/?token={run.token}", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/"
            cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert run.token is not None
        assert run.token not in cookie
        async with s.get("/") as resp:
            assert resp.status == 200
            assert "<title>layerwatch</title>" in await resp.text()
        async with s.get("/v1/mounts") as resp:
            assert resp.status == 200
        async with s.post("/v1/mounts/m/sync") as resp:
            assert resp.status == 401  # writes need the header: no CSRF through the cookie
        async with s.get("/v1/mounts", headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403
        async with (
            aiohttp.ClientSession(run.url, cookies={COOKIE: "forged"}) as forged,
            forged.get("/v1/mounts") as resp,
        ):
            assert resp.status == 401


def test_listen_address_rules() -> None:
    """Loopback addresses are accepted; others need allow_remote, and the error says so."""
    assert parse_listen("127.0.0.1:8421", allow_remote=False) == ("127.0.0.1", 8421)
    assert parse_listen("[::1]:80", allow_remote=False) == ("::1", 80)
    assert parse_listen("localhost:1", allow_remote=False) == ("localhost", 1)
    assert parse_listen("0.0.0.0:80", allow_remote=True) == ("0.0.0.0", 80)
    with pytest.raises(ConfigError, match="allow_remote"):
        parse_listen("0.0.0.0:8421", allow_remote=False)
    with pytest.raises(ConfigError, match="allow_remote"):
        parse_listen("example.com:8421", allow_remote=False)
    for bad in ("8421", "host:", ":80", "h:99999", "h:8x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_listen(bad, allow_remote=False)


async def test_serve_refuses_a_remote_address_before_listening(tmp_path: Path) -> None:
    """serve() raises ConfigError for a non-loopback address and leaves no socket behind."""
    config = Config(mounts=(MountConfig(name="m", upper=tmp_path, lowers=(tmp_path,)),))
    api = ApiConfig(socket=tmp_path / "api.sock", listen="0.0.0.0:1", token="t")
    with pytest.raises(ConfigError, match=r"api\.listen.*allow_remote"):
        await serve(Service(config), api)
    assert not (tmp_path / "api.sock").exists()


async def test_socket_is_0600_in_a_0700_directory(tmp_path: Path) -> None:
    """The unix socket is mode 0600, and the directory made for it 0700."""
    async with running(tmp_path) as run:
        assert stat.S_ISSOCK(run.socket.lstat().st_mode)
        assert stat.S_IMODE(run.socket.lstat().st_mode) == 0o600
        assert stat.S_IMODE(run.socket.parent.stat().st_mode) == 0o700
    assert not run.socket.exists()


# -- paths ------------------------------------------------------------------------------------


def _symlinks(run: ApiRun) -> None:
    os.symlink("/etc/passwd", run.merged / "abs-link")
    os.symlink("../../../../../../../../etc/passwd", run.merged / "rel-link")
    os.symlink("/etc", run.merged / "dir-link")


async def test_traversal_is_refused_for_files_and_dirs(tmp_path: Path) -> None:
    """'..' (plain or percent-encoded) and NUL are refused; nothing of the host leaks."""
    async with running(tmp_path) as run:
        for target in (
            b"/v1/mounts/m/files/../../../../../../etc/passwd",
            b"/v1/mounts/m/files/data/../../../../../etc/passwd",
            b"/v1/mounts/m/files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            b"/v1/mounts/m/files/data/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
            b"/v1/mounts/m/files/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
            b"/v1/mounts/m/files/etc/passwd%00.txt",
            b"/v1/mounts/m/dirs/%2e%2e",
            b"/v1/mounts/m/dirs/..%2f..%2f..",
            b"/v1/mounts/m%2f..%2f..%2fetc/files/passwd",
        ):
            status, body = await get_raw(run, target)
            assert status in (400, 404), (target, status, body)
            assert HOST_PASSWD not in body, target
            assert b"Traceback" not in body
            assert "error" in orjson.loads(body), target


async def test_absolute_paths_and_symlinks_stay_in_the_root(tmp_path: Path) -> None:
    """Absolute paths and symlinks to /etc/passwd resolve inside the mount, never the host."""
    async with running(tmp_path) as run, unix_session(run) as s:
        _symlinks(run)
        inside = (run.lower / "etc" / "passwd").read_bytes()
        for target in (
            b"/v1/mounts/m/files//etc/passwd",
            b"/v1/mounts/m/files/abs-link",
            b"/v1/mounts/m/files/rel-link",
            b"/v1/mounts/m/files/dir-link/passwd",
        ):
            status, body = await get_raw(run, target)
            assert status == 200, (target, body)
            assert body == inside, target
        async with s.get("/v1/mounts/m/dirs/dir-link") as resp:
            names = [e["name"] for e in (await resp.json())["entries"]]
        assert names == ["passwd"]  # the mount's /etc, not the host's
        async with s.get("/v1/mounts/m/files/data") as resp:
            assert resp.status == 404  # a directory is not a file
        async with s.get("/v1/mounts/m/files/missing") as resp:
            assert resp.status == 404
        async with s.get("/v1/mounts/att/files/x") as resp:
            assert resp.status == 409  # no merged view to read from


async def test_export_stores_symlinks_without_following_them(tmp_path: Path) -> None:
    """Both exports keep symlinks to /etc as symlinks; no host content is in the tar."""
    async with running(tmp_path) as run, unix_session(run) as s:
        _symlinks(run)
        await changes(s)
        for what in ("diff", "rootfs"):
            async with s.get(f"/v1/mounts/m/export?what={what}") as resp:
                data = await resp.read()
            assert HOST_PASSWD not in data
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                link = tar.getmember("abs-link")
                assert link.issym()
                assert link.linkname == "/etc/passwd"
                assert tar.getmember("dir-link").issym()


# -- malformed and oversized requests --------------------------------------------------------


async def test_bad_bodies_and_parameters_get_json_4xx(tmp_path: Path) -> None:
    """Oversized or malformed bodies and bad parameters get a 4xx JSON error."""
    async with running(tmp_path) as run, unix_session(run) as s:
        cases: list[tuple[str, str, bytes, int]] = [
            ("POST", "/v1/mounts/m/sync", b"{" + b" " * (1 << 20) + b"}", 413),
            ("POST", "/v1/mounts/m/sync", b"{not json", 400),
            ("POST", "/v1/mounts/m/sync", b"[1, 2]", 400),
            ("POST", "/v1/mounts/m/sync", b'{"timeout": "soon"}', 400),
            ("POST", "/v1/mounts/m/sync", b'{"timeout": 1, "extra": 2}', 400),
            ("GET", "/v1/mounts/m/changes?sync=maybe", b"", 400),
            ("GET", "/v1/events?since=-5", b"", 400),
            ("GET", "/v1/events/ws?since=x", b"", 400),
            ("GET", "/v2/anything", b"", 404),
            ("DELETE", "/v1/mounts", b"", 405),
            ("POST", "/v1/mounts/nope/reset", b"", 404),
        ]
        for method, url, body, status in cases:
            async with s.request(method, url, data=io.BytesIO(body)) as resp:
                assert resp.status == status, (method, url, await resp.text())
                assert resp.content_type == "application/json", url
                error = await resp.json()
                assert error["status"] == status
                assert "Traceback" not in error["error"]
        async with s.get("/healthz") as resp:
            assert resp.status == 200  # and the service is fine


async def test_malformed_http_gets_4xx_without_traceback(tmp_path: Path) -> None:
    """Garbage request lines and huge headers get a 4xx and no traceback."""
    async with running(tmp_path) as run:
        with structlog.testing.capture_logs() as logs:
            status, _ = await raw_request(run, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
        assert status == 400
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["api_bad_request"]
        assert "8190" in logs[-1]["error"]  # one line that says why, no traceback
        for request in (
            b"BLAH\r\n\r\n",
            b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            status, body = await raw_request(run, request)
            assert 400 <= status < 500, (request[:40], status)
            assert b"Traceback" not in body
        status, _ = await get_raw(run, b"/healthz")
        assert status == 200
