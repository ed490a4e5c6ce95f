"""Secrets and host identity outside the config file: ``${VAR}``, ``*_file``, redaction.

The sink tests use a real webhook receiver (aiohttp on 127.0.0.1) that checks the signature
with the key it was given, independently of the sink; the Redis password test is in
``plugins/redis/tests/test_redis_password.py`` (a real ``redis-server --requirepass``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from watcher.cli import logconfig
from watcher.core.errors import ConfigError
from watcher.service import config
from watcher.service.secrets import MASK, Secrets, expand, read_file
from watcher.service.service import build_sink
from watcher.testing import make_records, opened

SECRET_KEY = b"twenty-four secret bytes"
WHSEC = "whsec_" + base64.b64encode(SECRET_KEY).decode()
TOKEN = "t0ken-from-a-secret-store"


def base() -> dict[str, Any]:
    """A minimal valid document: one attached mount, no sink."""
    return {"mounts": [{"name": "m", "upper": "/srv/u", "lowers": ["/srv/l"]}]}


def error_of(doc: dict[str, Any], env: dict[str, str] | None = None) -> ConfigError:
    """The ConfigError that parsing ``doc`` raises."""
    with pytest.raises(ConfigError) as info:
        config.parse(doc, env)
    return info.value


# -- references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${NODE}", "node-7"),
        ("pre-${NODE}-post", "pre-node-7-post"),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${NODE:-fallback}", "node-7"),
        ("$$", "$"),
        ("$${NODE}", "${NODE}"),
        ("cost $5 and $HOME", "cost $5 and $HOME"),
        ("$$$${NODE}", "$${NODE}"),
        ("${A}${NODE}", "xnode-7"),
    ],
)
def test_references_resolve(value: str, expected: str) -> None:
    """${VAR}, ${VAR:-default} and $$ resolve; any other '$' stays as written."""
    env = {"NODE": "node-7", "EMPTY": "", "A": "x"}
    assert expand("k", value, env) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("${UNSET}", "environment variable UNSET is not set"),
        ("${EMPTY}", "environment variable EMPTY is empty"),
        ("${1X}", "'${' starts no reference"),
        ("${OPEN", "'${' starts no reference"),
        ("${}", "'${' starts no reference"),
    ],
)
def test_unresolvable_references_name_the_key_and_variable(value: str, problem: str) -> None:
    """An unset or empty variable, or a malformed reference, names the key and the variable."""
    with pytest.raises(ConfigError) as info:
        expand("sinks.hook.url", value, {"EMPTY": ""})
    assert info.value.key == "sinks.hook.url"
    assert info.value.problem.startswith(problem)


def test_a_file_value_loses_one_trailing_newline(tmp_path: Path) -> None:
    """A *_file's content is the value, less one trailing newline (LF or CRLF)."""
    cases = {"lf": "v\n", "crlf": "v\r\n", "two": "v\n\n", "none": "v", "inner": "a\nb\n"}
    for name, text in cases.items():
        (tmp_path / name).write_bytes(text.encode())
    got = {name: read_file("k", str(tmp_path / name)) for name in cases}
    assert got == {"lf": "v", "crlf": "v", "two": "v\n", "none": "v", "inner": "a\nb"}


def test_bad_files_name_key_and_path_never_the_content(tmp_path: Path) -> None:
    """Missing, empty, binary, huge or relative: the error names key and path, not content."""
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"s3cr\xffet")
    (tmp_path / "huge").write_text("s3cret" * 20000)
    (tmp_path / "dir").mkdir()
    cases = {
        str(tmp_path / "missing"): "cannot read",
        str(tmp_path / "empty"): "is empty",
        str(tmp_path / "binary"): "is not UTF-8 text",
        str(tmp_path / "huge"): "is larger than 64 KiB",
        str(tmp_path / "dir"): "cannot read",
        "relative/path": "must be an absolute path",
    }
    for path, problem in cases.items():
        with pytest.raises(ConfigError) as info:
            read_file("api.token_file", path)
        assert info.value.key == "api.token_file"
        assert problem in info.value.problem
        assert path in info.value.problem
        assert "s3cr" not in str(info.value)


def test_redaction_blanks_every_secret_longest_first() -> None:
    """Redaction replaces each remembered value, the longer one first; short ones are kept."""
    secrets = Secrets()
    for value in ("abcd", "abcdefgh", "xyz"):
        secrets.add(value)
    assert len(secrets) == 2  # "xyz": too short to blank out safely
    assert secrets.redact("abcdefgh abcd xyz") == f"{MASK} {MASK} xyz"


# -- the keys that accept them ----------------------------------------------------------------


def test_stream_and_host_from_the_environment_are_not_secrets() -> None:
    """service.stream and service.host take ${NODE_NAME}; they are in every event, so they
    are not redacted; without them both are the host name."""
    doc = base() | {"service": {"stream": "${NODE_NAME}", "host": "${NODE_NAME:-x}.k8s"}}
    cfg = config.parse(doc, {"NODE_NAME": "worker-3"})
    assert (cfg.stream, cfg.host) == ("worker-3", "worker-3.k8s")
    assert not cfg.secrets
    plain = config.parse(base())
    assert plain.stream == plain.host == socket.gethostname()


def test_stream_without_its_variable_names_key_and_variable() -> None:
    """An unset NODE_NAME is a ConfigError naming service.stream and NODE_NAME."""
    err = error_of(base() | {"service": {"stream": "${NODE_NAME}"}}, {})
    assert str(err) == "config: service.stream: environment variable NODE_NAME is not set"


def test_stream_and_token_from_files(tmp_path: Path) -> None:
    """stream_file and token_file read files (paths may use ${VAR}); the token is a secret."""
    (tmp_path / "node").write_text("node-from-file\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    doc = base() | {
        "service": {"stream_file": "${DIR}/node"},
        "api": {"listen": "127.0.0.1:0", "token_file": "${DIR}/token"},
    }
    cfg = config.parse(doc, {"DIR": str(tmp_path)})
    assert cfg.stream == "node-from-file"
    assert cfg.api is not None
    assert cfg.api.token == TOKEN
    assert cfg.secrets.redact(f"token {TOKEN}") == f"token {MASK}"
    assert TOKEN not in repr(cfg)


def test_a_key_and_its_file_together_are_refused(tmp_path: Path) -> None:
    """token and token_file both set: an error naming token_file."""
    doc = base() | {"api": {"token": "x", "token_file": "/run/secrets/t"}}
    err = error_of(doc)
    assert (err.key, err.problem) == ("api.token_file", "give token or token_file, not both")


def test_references_are_not_read_in_other_keys() -> None:
    """Keys outside the table keep '${...}' as written (a mount path is not interpolated)."""
    doc = {"mounts": [{"name": "m", "upper": "/srv/${X}", "lowers": ["/srv/l"]}]}
    cfg = config.parse(doc, {"X": "nope"})
    assert str(cfg.mounts[0].upper) == "/srv/${X}"


def test_sink_options_resolve_centrally(tmp_path: Path) -> None:
    """Every sink option string (arrays and tables too) and every OPTION_file is resolved
    before the sink sees its options; what was read is a secret."""
    (tmp_path / "pw").write_text("hunter2-password\n")
    doc = base() | {
        "sinks": {
            "bus": {
                "type": "redis",
                "url_file": str(tmp_path / "pw"),
                "servers": ["nats://${HOST}:4222", "$$literal"],
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "maxlen": 5,
                "filter": {"paths": ["/${NOT_RESOLVED}/*"]},
            }
        }
    }
    cfg = config.parse(doc, {"HOST": "broker.local", "TOKEN": TOKEN})
    (sink,) = cfg.sinks
    assert dict(sink.options) == {
        "url": "hunter2-password",
        "servers": ["nats://broker.local:4222", "$literal"],
        "headers": {"Authorization": f"Bearer {TOKEN}"},
        "maxlen": 5,
    }
    assert sink.paths == ("/${NOT_RESOLVED}/*",)  # the runner's filter is not a sink option
    assert "hunter2" not in repr(cfg)
    assert cfg.secrets.redact(f"{TOKEN} hunter2-password") == f"{MASK} {MASK}"


@pytest.mark.parametrize(
    ("options", "env", "key", "problem"),
    [
        ({"url": "${HOOK_URL}"}, {}, "sinks.s.url", "environment variable HOOK_URL is not set"),
        ({"a": ["x", {"b": "${V}"}]}, {}, "sinks.s.a[1].b", "environment variable V is not set"),
        ({"secret_file": 5}, {}, "sinks.s.secret_file", "must be a string (a file's path), got 5"),
        ({"secret_file": "/nonexistent/s"}, {}, "sinks.s.secret_file", "cannot read"),
        ({"secret": "x", "secret_file": "/s"}, {}, "sinks.s.secret_file", "give secret or"),
    ],
)
def test_bad_sink_references_name_their_key(
    options: dict[str, Any], env: dict[str, str], key: str, problem: str
) -> None:
    """A sink option's unresolvable reference or file names the option's full key."""
    doc = base() | {"sinks": {"s": {"type": "stdout", **options}}}
    err = error_of(doc, env)
    assert err.key == key
    assert err.problem.startswith(problem)


def test_load_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load`` resolves references against os.environ unless given an env."""
    path = tmp_path / "lw.toml"
    path.write_text(
        '[service]\nstream = "${LW_TEST_NODE}"\n'
        '[[mounts]]\nname = "m"\nupper = "/srv/u"\nlowers = ["/srv/l"]\n'
    )
    monkeypatch.setenv("LW_TEST_NODE", "from-environ")
    assert config.load(path).stream == "from-environ"
    assert config.load(path, {"LW_TEST_NODE": "given"}).stream == "given"


# -- never shown ------------------------------------------------------------------------------


def test_a_sink_refusing_a_secret_option_does_not_quote_it() -> None:
    """The webhook sink quotes a bad url; built through the service, the secret part is
    blanked out of the ConfigError (what `layerwatch run` and `check` print)."""
    doc = base() | {"sinks": {"hook": {"type": "webhook", "url": "ftp://${PW}@host/x"}}}
    cfg = config.parse(doc, {"PW": "pa55word-in-url"})
    with pytest.raises(ConfigError) as info:
        build_sink(cfg.sinks[0], cfg.secrets)
    assert info.value.key == "sinks.hook.url"
    assert "pa55word" not in str(info.value)
    assert f"ftp://{MASK}@host/x" in str(info.value)


def test_logs_never_carry_a_secret() -> None:
    """With the config's redaction, a log entry's values and traceback lose every secret."""
    secrets = Secrets()
    secrets.add("pa55word-in-url")
    out = io.StringIO()
    with redirect_stderr(out):
        logconfig.configure(level="info", redact=secrets.redact)
        log = structlog.get_logger("test")
        try:
            raise OSError("cannot reach redis://:pa55word-in-url@host")
        except OSError as exc:
            log.error("sink_failed", url="redis://:pa55word-in-url@h", error=exc, exc_info=True)
        log.info("plain", count=3, ok=True, path="/x")
    logconfig.configure(level="info")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "pa55word" not in out.getvalue()
    assert lines[0]["url"] == f"redis://:{MASK}@h"
    assert MASK in lines[0]["error"]
    assert MASK in lines[0]["exception"]
    assert (lines[1]["count"], lines[1]["ok"], lines[1]["path"]) == (3, True, "/x")


def test_check_prints_no_secret(tmp_path: Path) -> None:
    """`layerwatch check` (a real process) names the bad option without its secret value."""
    (tmp_path / "url").write_text("ftp://user:pa55word-in-url@host/x\n")
    path = tmp_path / "lw.toml"
    path.write_text(
        f'[[mounts]]\nname = "m"\nupper = "{tmp_path}"\nlowers = ["{tmp_path}"]\n'
        f'[spool]\npath = "{tmp_path}/spool.db"\n'
        f'[sinks.hook]\ntype = "webhook"\nurl_file = "{tmp_path}/url"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "sinks.hook.url" in proc.stdout
    assert MASK in proc.stdout
    assert "pa55word" not in proc.stdout + proc.stderr


# -- with a real sink -------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A real HTTP receiver on 127.0.0.1: its URL and the requests it got."""
    seen: list[tuple[dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook", seen
    finally:
        await runner.cleanup()


def signed_with(key: bytes, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks v1: HMAC-SHA256 of id.timestamp.body, checked apart from the sink."""
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    return any(sig.partition(",")[2] == expected for sig in headers["webhook-signature"].split(" "))


async def test_webhook_secret_from_a_file_signs_what_the_receiver_verifies(
    tmp_path: Path, receiver: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    """secret_file (a Kubernetes Secret or systemd credential) signs the webhook's requests:
    the receiver verifies them with the key; the URL comes from the environment."""
    url, seen = receiver
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "hook-secret").write_text(WHSEC + "\n")
    path = tmp_path / "lw.toml"
    path.write_text(
        '[[mounts]]\nname = "m"\nupper = "/srv/u"\nlowers = ["/srv/l"]\n'
        "[sinks.hook]\n"
        'type = "webhook"\n'
        'url = "${HOOK_URL}"\n'
        'secret_file = "${CREDENTIALS_DIRECTORY}/hook-secret"\n'
    )
    cfg = config.load(path, {"HOOK_URL": url, "CREDENTIALS_DIRECTORY": str(creds)})
    records = make_records(1, 3)
    async with opened(build_sink(cfg.sinks[0], cfg.secrets)) as sink:
        await sink.send(records)
    assert len(seen) == 1
    headers, body = seen[0]
    assert signed_with(SECRET_KEY, headers, body)
    assert not signed_with(b"another key of 24 bytes.", headers, body)
    assert [event["id"] for event in json.loads(body)] == [r.id for r in records]
