"""The ``layerwatch`` command line, run as a subprocess against real overlay mounts.

Every command runs as ``python -m watcher.cli`` in a child process, so exit codes, stdout and
stderr are what a shell sees. Expected change lists are written out by hand from the layers
each test builds (by the rules of ``docs/rules.md``), never computed by the code under test.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from overlay import (
    LayerEntry,
    Overlay,
    build_layer,
    make_opaque,
    mount_overlay,
    requires_overlay,
    run_ops,
    to_aufs,
    unmount,
    whiteout,
)

from watcher.cli.main import build_parser, main
from watcher.core.mounts import find_mount

pytestmark = [requires_overlay, pytest.mark.root]

REPO = Path(__file__).resolve().parents[1]
CLI = (sys.executable, "-m", "watcher.cli")


# ---------------------------------------------------------------------------------------------
# Running the command


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run ``layerwatch ARGS`` to completion; output captured, exit code not checked."""
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, timeout=timeout, check=False, cwd=REPO
    )


def ok(*args: str | Path) -> bytes:
    """Run ``layerwatch ARGS``, require exit 0 and no error line; return stdout."""
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"layerwatch: error" not in proc.stderr
    return proc.stdout


def fails(*args: str | Path) -> str:
    """Run ``layerwatch ARGS``, require the error contract; return the one stderr line.

    The contract: exit 1, nothing on stdout, exactly one line on stderr that starts with
    ``layerwatch: error:``.
    """
    proc = run_cli(*args)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr {err!r}"
    assert proc.stdout == b""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("layerwatch: error: "), err
    return lines[0]


def diff_lines(*args: str | Path) -> list[str]:
    """``layerwatch diff ARGS`` as text lines."""
    return ok("diff", *args).decode().splitlines()


def diff_json(*args: str | Path) -> list[tuple[str, bytes]]:
    """``layerwatch diff --json ARGS`` as ``(kind, raw path)`` pairs, checking each row's shape."""
    rows = orjson.loads(ok("diff", "--json", *args))
    assert isinstance(rows, list)
    out = []
    for row in rows:
        if "path" in row:
            assert set(row) == {"kind", "path"}
            out.append((row["kind"], row["path"].encode()))
        else:
            assert set(row) == {"kind", "path_b64"}
            raw = base64.b64decode(row["path_b64"], validate=True)
            with pytest.raises(UnicodeDecodeError):
                raw.decode()  # path_b64 is only for names that are not UTF-8
            out.append((row["kind"], raw))
    return out


def mounted_at(path: str | Path) -> bool:
    """Whether something is mounted at ``path`` (from mountinfo)."""
    return find_mount(str(path)) is not None


# ---------------------------------------------------------------------------------------------
# Layers


def _file(path: bytes, data: bytes = b"x\n") -> LayerEntry:
    return LayerEntry("file", path, data)


def _dir(path: bytes) -> LayerEntry:
    return LayerEntry("dir", path, mode=0o755)


@pytest.fixture
def odd_names(tmp_path: Path) -> tuple[Path, Path]:
    """A lower and an unmounted upper holding awkward names; returns ``(lower, upper)``."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    build_layer(str(lower), [_dir(b"a"), _dir(b"etc"), _file(b"etc/passwd")])
    build_layer(
        str(upper),
        [
            _dir(b"a"),
            _file(b"a/b"),
            _file(b"a-b"),
            _file(b"a.c"),
            _file(b"nl\nname"),
            _file(b"back\\slash"),
            _file(b"ctl\x01x"),
            _file(b"bad\xffname"),
            _dir(b"etc"),
        ],
    )
    whiteout(os.path.join(os.fsencode(upper), b"etc/passwd"))
    return lower, upper


ODD_EXPECTED = [
    ("C", b"/a"),
    ("A", b"/a-b"),
    ("A", b"/a.c"),
    ("A", b"/a/b"),
    ("A", b"/back\\slash"),
    ("A", b"/bad\xffname"),
    ("A", b"/ctl\x01x"),
    ("C", b"/etc"),
    ("D", b"/etc/passwd"),
    ("A", b"/nl\nname"),
]


@pytest.fixture
def stacked(tmp_path: Path) -> Iterator[Overlay]:
    """Two lowers (the top one with a whiteout and an opaque dir) under a changed, mounted upper.

    base: ``/etc/passwd``, ``/etc/gone``, ``/opt/x``; top: a whiteout at ``/etc/gone``, ``/opt``
    opaque with ``/opt/new``. In the merged view: ``rm etc/passwd``, create ``etc/gone``,
    ``rm opt/new``, create ``opt/x``.
    """
    top, base = tmp_path / "top", tmp_path / "base"
    top.mkdir()
    base.mkdir()
    build_layer(
        str(base),
        [_dir(b"etc"), _file(b"etc/passwd"), _file(b"etc/gone"), _dir(b"opt"), _file(b"opt/x")],
    )
    build_layer(
        str(top),
        [
            _dir(b"etc"),
            LayerEntry("whiteout", b"etc/gone"),
            LayerEntry("opaque", b"opt", mode=0o755),
            _file(b"opt/new"),
        ],
    )
    (tmp_path / "ovl").mkdir()
    with mount_overlay(str(tmp_path / "ovl"), [str(top), str(base)]) as ovl:
        run_ops(ovl.merged, "rm etc/passwd && echo g > etc/gone && rm opt/new && echo y > opt/x")
        yield ovl


STACKED_EXPECTED = [
    "C /etc",
    "A /etc/gone",  # the top layer's whiteout hides the base's /etc/gone: it is new
    "D /etc/passwd",
    "C /opt",
    "D /opt/new",
    "A /opt/x",  # the top layer's opaque /opt hides the base's /opt/x: it is new
]


# ---------------------------------------------------------------------------------------------
# diff


def test_diff_text_is_sorted_by_path_bytes_one_escaped_line_per_change(
    odd_names: tuple[Path, Path],
) -> None:
    """diff prints `K /path` lines sorted by path bytes, each name escaped onto one line."""
    lower, upper = odd_names
    assert diff_lines("--lower", lower, "--upper", upper) == [
        "C /a",
        "A /a-b",
        "A /a.c",
        "A /a/b",
        r"A /back\\slash",
        r"A /bad\xffname",
        r"A /ctl\x01x",
        "C /etc",
        "D /etc/passwd",
        r"A /nl\x0aname",
    ]


def test_diff_json_round_trips_raw_names(odd_names: tuple[Path, Path]) -> None:
    """diff --json gives {kind, path}, or {kind, path_b64} for non-UTF-8 names, losslessly."""
    lower, upper = odd_names
    assert diff_json("--lower", lower, "--upper", upper) == ODD_EXPECTED


def test_diff_resolves_several_lowers_top_first_with_their_whiteouts(stacked: Overlay) -> None:
    """diff with --lower repeated (top first) honours whiteouts and opaque dirs in the lowers."""
    top, base = stacked.lowers
    assert diff_lines("--lower", top, "--lower", base, "--upper", stacked.upper) == (
        STACKED_EXPECTED
    )


def test_diff_of_a_mountpoint_equals_the_explicit_form(stacked: Overlay) -> None:
    """diff MOUNTPOINT reads the layers from mountinfo and prints what the explicit form does."""
    top, base = stacked.lowers
    explicit = ("--lower", top, "--lower", base, "--upper", stacked.upper)
    assert diff_lines(stacked.merged) == diff_lines(*explicit) == STACKED_EXPECTED
    assert diff_json(stacked.merged) == diff_json(*explicit)


def test_diff_reads_an_aufs_format_upper(tmp_path: Path) -> None:
    """diff --whiteouts aufs reads .wh. whiteouts and .wh..wh..opq, skipping aufs metadata."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    build_layer(
        str(lower),
        [_dir(b"etc"), _file(b"etc/passwd"), _file(b"etc/hosts"), _dir(b"opt"), _file(b"opt/x")],
    )
    build_layer(str(upper), [_dir(b"etc"), _dir(b"opt"), _file(b"opt/new"), _file(b"new")])
    whiteout(str(upper / "etc/passwd"))
    make_opaque(str(upper / "opt"))
    expected = ["C /etc", "D /etc/passwd", "A /new", "C /opt", "A /opt/new", "D /opt/x"]
    assert diff_lines("--lower", lower, "--upper", upper) == expected

    to_aufs(str(upper), root_metadata=True)
    assert (upper / "etc/.wh.passwd").is_file()
    assert diff_lines("--whiteouts", "aufs", "--lower", lower, "--upper", upper) == expected
    # Read as overlay, the same branch is a different list: the flag is what makes it right.
    assert "A /etc/.wh.passwd" in diff_lines("--lower", lower, "--upper", upper)


# ---------------------------------------------------------------------------------------------
# Errors


def test_diff_missing_upper_is_one_error_line(tmp_path: Path) -> None:
    """diff with a missing --upper exits 1 with one error line naming the upper."""
    (tmp_path / "lower").mkdir()
    line = fails("diff", "--lower", tmp_path / "lower", "--upper", tmp_path / "no-upper")
    assert str(tmp_path / "no-upper") in line


def test_diff_missing_lower_is_one_error_line(tmp_path: Path) -> None:
    """diff with a missing --lower exits 1 with one error line naming the lower."""
    (tmp_path / "upper").mkdir()
    line = fails("diff", "--lower", tmp_path / "no-lower", "--upper", tmp_path / "upper")
    assert str(tmp_path / "no-lower") in line


def test_diff_of_a_directory_that_is_not_a_mount_is_one_error_line(tmp_path: Path) -> None:
    """diff DIR where nothing is mounted exits 1 with one error line naming DIR."""
    line = fails("diff", tmp_path)
    assert str(tmp_path) in line
    assert "mounted" in line


def test_diff_with_a_mountpoint_and_upper_is_one_error_line(stacked: Overlay) -> None:
    """diff MOUNTPOINT --upper U exits 1 with one error line saying to give one or the other."""
    line = fails("diff", stacked.merged, "--upper", stacked.upper)
    assert "MOUNTPOINT" in line
    assert "--upper" in line


def test_watch_missing_upper_is_one_error_line(tmp_path: Path) -> None:
    """watch with a missing --upper exits 1 at once with one error line naming the upper."""
    (tmp_path / "lower").mkdir()
    line = fails("watch", "--lower", tmp_path / "lower", "--upper", tmp_path / "no-upper")
    assert str(tmp_path / "no-upper") in line


def test_watch_missing_upper_names_the_path_as_text(tmp_path: Path) -> None:
    """watch with a missing --upper names the path as text, not as a Python bytes literal."""
    (tmp_path / "lower").mkdir()
    line = fails("watch", "--lower", tmp_path / "lower", "--upper", tmp_path / "no-upper")
    assert "b'" not in line


def test_export_with_a_bad_upper_leaves_the_output_file_alone(tmp_path: Path) -> None:
    """export -o FILE with a missing --upper fails without truncating FILE."""
    (tmp_path / "lower").mkdir()
    out = tmp_path / "keep.tar"
    out.write_bytes(b"an earlier export")
    fails("export", "-o", out, "--lower", tmp_path / "lower", "--upper", tmp_path / "no-upper")
    assert out.read_bytes() == b"an earlier export"


# ---------------------------------------------------------------------------------------------
# mount / umount / reset


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Path]]:
    """Two layers, an rw dir and a mountpoint ``(top, base, rw, mnt)``; unmounted at the end."""
    top, base, rw, mnt = (tmp_path / n for n in ("top", "base", "rw", "mnt"))
    for d in (top, base, rw):
        d.mkdir()
    build_layer(str(base), [_file(b"f", b"base\n"), _file(b"only-base", b"b\n")])
    build_layer(str(top), [_file(b"f", b"top\n")])
    try:
        yield top, base, rw, mnt
    finally:
        while mounted_at(mnt):
            unmount(str(mnt))


def test_mount_reset_umount_through_the_cli(layers: tuple[Path, Path, Path, Path]) -> None:
    """mount stacks --layer top first under --rw; reset empties rw and stays mounted; umount."""
    top, base, rw, mnt = layers
    managed = ("--layer", top, "--layer", base, "--rw", rw, mnt)
    assert ok("mount", *managed) == b""
    info = find_mount(str(mnt))
    assert info is not None
    assert info.fstype == "overlay"
    upper, lowers, _work = info.overlay_dirs()
    assert (upper, lowers) == (os.fsencode(rw), [os.fsencode(top), os.fsencode(base)])
    assert (mnt / "f").read_text() == "top\n"  # the first --layer is on top
    assert (mnt / "only-base").is_file()

    (mnt / "written").write_text("w\n")
    assert diff_lines(mnt) == ["A /written"]
    assert "already a mount point" in fails("mount", *managed)

    ok("reset", *managed)
    assert mounted_at(mnt)
    assert list(rw.iterdir()) == []
    assert not (mnt / "written").exists()
    assert (mnt / "f").read_text() == "top\n"

    ok("umount", mnt)
    assert not mounted_at(mnt)
    assert str(mnt) in fails("umount", mnt)


@pytest.mark.parametrize("separator", [",", ":"])
def test_mount_rejects_a_layer_path_with_an_option_separator(
    layers: tuple[Path, Path, Path, Path], separator: str
) -> None:
    """mount with a layer path containing ',' or ':' exits 1 naming the path; nothing mounts."""
    top, _base, rw, mnt = layers
    odd = top.parent / f"lay{separator}er"
    shutil.copytree(top, odd)
    line = fails("mount", "--layer", odd, "--rw", rw, mnt)
    assert str(odd) in line
    assert not mounted_at(mnt)


# ---------------------------------------------------------------------------------------------
# export


def test_export_diff_writes_a_layer_tar_with_whiteouts(stacked: Overlay, tmp_path: Path) -> None:
    """export --diff -o FILE writes a tar whose .wh. entries are the deletions."""
    out = tmp_path / "layer.tar"
    assert ok("export", "--diff", "-o", out, stacked.merged) == b""
    with tarfile.open(out, encoding="utf-8", errors="surrogateescape") as tar:
        names = {m.name.rstrip("/") for m in tar.getmembers()}
    assert {"etc/.wh.passwd", "opt/.wh.new", "etc/gone", "opt/x"} <= names
    assert not any(n.endswith((".wh.gone", ".wh.x")) for n in names)


# ---------------------------------------------------------------------------------------------
# watch


class Lines:
    """Reads a child's stdout as JSON lines, with a deadline on every wait."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        self.raw: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.eof = False

    def _read(self, timeout: float) -> None:
        if self.eof or not self._selector.select(timeout):
            return
        chunk = os.read(self._fd, 65536)
        if not chunk:
            self.eof = True
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self.raw.append(line)
            event = orjson.loads(line)
            assert isinstance(event, dict), line
            self.events.append(event)

    def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 15) -> None:
        """Read until ``done(events)`` is true; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.events):
            left = deadline - time.monotonic()
            assert left > 0, f"gave up waiting; got {self.raw[-5:]!r}"
            assert not self.eof, f"stdout ended early; got {self.raw[-5:]!r}"
            self._read(min(left, 0.5))

    def rest(self, timeout: float = 10) -> None:
        """Read to end of file."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, "stdout did not end"
            self._read(0.5)
        assert self._buf == b"", "output ends in a partial line"


def _changes(events: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    """``(path, kind)`` of every change event."""
    return {
        (e["data"]["path"], e["data"]["kind"])
        for e in events
        if e["type"] == "io.layerwatch.change" and "path" in e["data"]
    }


@pytest.mark.parametrize("form", ["mountpoint", "branches"])
def test_watch_streams_snapshot_changes_and_a_bookmark_on_sigint(
    stacked: Overlay, tmp_path: Path, form: str
) -> None:
    """watch prints JSON lines: snapshot, live changes, every change before SIGINT, a bookmark."""
    top, base = stacked.lowers
    where = (
        [stacked.merged]
        if form == "mountpoint"
        else ["--lower", top, "--lower", base, "--upper", stacked.upper]
    )
    with (tmp_path / "watch.err").open("wb") as err:
        proc = subprocess.Popen([*CLI, "watch", *where], stdout=subprocess.PIPE, stderr=err)
    try:
        lines = Lines(proc)
        lines.until(lambda ev: any(e["type"] == "io.layerwatch.snapshot.end" for e in ev))
        assert lines.events[0]["type"] == "io.layerwatch.snapshot.begin"
        assert ("/etc/passwd", "D") in _changes(lines.events)

        run_ops(stacked.merged, "echo n > new.txt && mkdir -p var/log && echo l > var/log/a")
        live = {("/new.txt", "A"), ("/var", "A"), ("/var/log/a", "A")}
        lines.until(lambda ev: live <= _changes(ev))

        # Changes made just before the signal, without waiting for them: the stop passes the
        # sync barrier, so they must be printed before the process exits.
        run_ops(stacked.merged, "rm etc/gone && echo late > late.txt && rm new.txt")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    late = {("/etc/gone", None), ("/late.txt", "A"), ("/new.txt", None)}
    assert late <= _changes(lines.events)
    assert lines.events[-1]["type"] == "io.layerwatch.bookmark"
    assert lines.events[-1]["data"]["head_seq"] == int(lines.events[-1]["sequence"])
    assert b"layerwatch: error" not in (tmp_path / "watch.err").read_bytes()


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_prints_cloudevents_narrates_and_unmounts() -> None:
    """demo --pause 0 exits 0: CloudEvents lines on stdout, narration on stderr, no mount left."""
    proc = run_cli("demo", "--pause", "0")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    events = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert events
    for event in events:
        assert event["specversion"] == "1.0"
        assert event["id"]
        assert event["type"].startswith("io.layerwatch.")
    assert any(e["type"] == "io.layerwatch.change" for e in events)
    assert events[-1]["type"] == "io.layerwatch.bookmark"
    match = re.search(r"mounted a sample overlay at (\S+);", err)
    assert match is not None, err
    assert "delete /etc/hostname" in err
    merged = match.group(1)
    assert "layerwatch-demo" in merged
    assert not mounted_at(merged)
    assert not os.path.exists(merged)
    with open("/proc/self/mountinfo", "rb") as f:
        assert os.fsencode(merged) not in f.read()


# ---------------------------------------------------------------------------------------------
# --help


def _subcommands() -> list[str]:
    """Every subcommand name of ``build_parser()``."""
    actions = build_parser()._actions
    subs = [a for a in actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return sorted(subs[0].choices)


SUBCOMMANDS = _subcommands()


def test_the_parser_has_the_documented_subcommands() -> None:
    """build_parser() offers every subcommand layerwatch promises (README's, reset, demo)."""
    expected = {"diff", "watch", "run", "mount", "umount", "reset", "export", "check", "demo"}
    assert expected <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`layerwatch COMMAND --help` prints its usage and exits 0."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: layerwatch {command}")


def test_installed_command_prints_help() -> None:
    """The installed `layerwatch` script runs the CLI: --help exits 0 and lists the commands."""
    script = shutil.which("layerwatch")
    assert script is not None, "the layerwatch console script is not installed"
    proc = subprocess.run([script, "--help"], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert all(name in proc.stdout.decode() for name in SUBCOMMANDS)


# ---------------------------------------------------------------------------------------------
# diff --format, --exit-code; --version; what each command imports


def test_diff_format_fills_kind_and_path_per_change(odd_names: tuple[Path, Path]) -> None:
    """--format prints the template once per change: {{.Kind}}, {{.Path}} (escaped as the
    default output), JSON forms, and \\t as a tab."""
    lower, upper = odd_names
    layers = ("--lower", lower, "--upper", upper)
    lines = diff_lines(*layers, "--format", r"{{.Path}}\t{{ .Kind }}")
    assert lines[:3] == ["/a\tC", "/a-b\tA", "/a.c\tA"]
    assert r"/bad\xffname	A" in lines
    rows = [orjson.loads(line) for line in diff_lines(*layers, "--format", "{{json .}}")]
    assert rows[0] == {"kind": "C", "path": "/a"}
    assert {"kind": "A", "path_b64": base64.b64encode(b"/bad\xffname").decode()} in rows
    assert diff_lines(*layers, "--format", "{{json .Path}}")[-1] == r'"/nl\\x0aname"'


def test_diff_format_with_an_unknown_placeholder_is_one_error_line(
    odd_names: tuple[Path, Path],
) -> None:
    """An unknown placeholder is an error naming it and the ones that exist."""
    lower, upper = odd_names
    line = fails("diff", "--lower", lower, "--upper", upper, "--format", "{{.Name}}")
    assert "unknown placeholder {{.Name}}" in line
    assert "{{.Kind}}" in line


def test_diff_exit_code_is_1_with_changes_0_without_2_on_an_error(
    odd_names: tuple[Path, Path], tmp_path: Path
) -> None:
    """--exit-code: 1 when the list has entries, 0 when empty, 2 when the diff failed."""
    lower, upper = odd_names
    changed = run_cli("diff", "--exit-code", "--lower", lower, "--upper", upper)
    assert changed.returncode == 1
    assert len(changed.stdout.splitlines()) == len(ODD_EXPECTED)
    (tmp_path / "empty").mkdir()
    unchanged = run_cli("diff", "--exit-code", "--lower", lower, "--upper", tmp_path / "empty")
    assert (unchanged.returncode, unchanged.stdout) == (0, b"")
    broken = run_cli("diff", "--exit-code", "--lower", lower, "--upper", tmp_path / "missing")
    assert broken.returncode == 2
    assert broken.stderr.startswith(b"layerwatch: error: ")
    assert run_cli("diff", "--lower", lower, "--upper", upper).returncode == 0


def test_version_flag_prints_the_installed_version() -> None:
    """`layerwatch --version` exits 0 and prints `layerwatch VERSION`, the version
    `watcher.__version__` and the distribution's metadata give."""
    from importlib.metadata import version

    import watcher

    assert watcher.__version__ == version("layerwatch")
    assert ok("--version").decode() == f"layerwatch {version('layerwatch')}\n"


def test_version_without_distribution_metadata_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run from a tree that was never installed, the version says so instead of failing."""
    import importlib.metadata

    from watcher.core.version import UNKNOWN, installed_version

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert installed_version() == UNKNOWN


def _modules_after(*argv: str) -> set[str]:
    """The modules loaded by the time `layerwatch ARGV` returns, in a fresh interpreter."""
    program = (
        "import sys\n"
        "from watcher.cli.main import main\n"
        f"status = main({list(argv)!r})\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, timeout=60, check=False, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return set(proc.stderr.decode().split())


def test_diff_imports_neither_aiohttp_nor_the_service(odd_names: tuple[Path, Path]) -> None:
    """`layerwatch diff` loads no aiohttp, no HTTP layer, no asyncio and no service: each
    command imports only what it runs."""
    lower, upper = odd_names
    loaded = _modules_after("diff", "--lower", str(lower), "--upper", str(upper))
    assert "watcher.cli.diff" in loaded
    heavy = {"aiohttp", "asyncio", "structlog", "watcher.http", "watcher.service"}
    assert not {m for m in loaded if m.split(".")[0] in heavy or m.rsplit(".", 1)[0] in heavy}


def test_the_parser_constants_match_what_they_stand_for() -> None:
    """The values the parser spells out (so as not to import their modules) are the real ones."""
    from watcher.cli.main import DEFAULT_SOCKET as PARSER_SOCKET
    from watcher.cli.main import DRIVERS
    from watcher.core.mounts import Driver
    from watcher.service.config import DEFAULT_SOCKET

    assert str(DEFAULT_SOCKET) == PARSER_SOCKET
    assert tuple(d.value for d in Driver) == DRIVERS


def test_lineformat_docstring_example_runs() -> None:
    """The --format module's docstring example prints what it shows."""
    import doctest

    from watcher.cli import lineformat

    result = doctest.testmod(lineformat)
    assert result.attempted > 0
    assert result.failed == 0


def test_diff_of_a_containerd_container_by_id_prefix_and_kubernetes_name(
    stacked: Overlay, tmp_path: Path
) -> None:
    """A running containerd container (its rootfs mounted where containerd mounts it, found
    by discovery's recogniser) is diffed by id, id prefix or Kubernetes container name; a
    name nothing has exits 2 saying where it looked. The layout is containerd's, made by the
    test: no containerd runs here."""
    state = tmp_path / "run-containerd"
    bundle = state / "io.containerd.runtime.v2.task" / "k8s.io" / "abc123def"
    annotations = {"io.kubernetes.cri.container-name": "app"}
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(orjson.dumps({"annotations": annotations}).decode())
    where = ("--docker-root", tmp_path / "no-docker", "--containerd-state", state)
    with mount_overlay(str(tmp_path / "ctd"), list(stacked.lowers), merged=str(bundle / "rootfs")):
        run_ops(str(bundle / "rootfs"), "rm etc/passwd && echo g > etc/gone")
        expected = ["C /etc", "A /etc/gone", "D /etc/passwd"]
        for ref in ("abc123def", "abc", "app"):
            assert diff_lines(ref, *where) == expected, ref
        proc = run_cli("diff", "nothing", *where)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "no-docker is not a Docker data root" in err
    assert f"no running containerd container under {state} is 'nothing'" in err
