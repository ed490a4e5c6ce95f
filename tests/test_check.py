"""``layerwatch check``: every problem it knows is found, named, and comes with a fix."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from overlay import mount_overlay, requires_overlay, unmount

from watcher.cli import check as check_mod
from watcher.cli.check import Finding, check, exit_status, format_findings
from watcher.cli.main import build_parser
from watcher.core.mounts import find_mount
from watcher.core.native import ENV_PURE_PYTHON, scanner_type
from watcher.live.inotify import Inotify

pytestmark = requires_overlay


class Setup:
    """Layer dirs, an rw dir, a mountpoint and a spool dir; writes config files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lower, self.rw, self.mnt = root / "lower", root / "rw", root / "mnt"
        self.spool = root / "spool"
        for d in (self.lower, self.rw, self.mnt, self.spool):
            d.mkdir()
        self.mounted: list[Path] = []

    def write(self, mount: str | None = None, sinks: str | None = None, extra: str = "") -> Path:
        if mount is None:
            mount = f'layers = ["{self.lower}"]\nrw = "{self.rw}"\nmountpoint = "{self.mnt}"\n'
        if sinks is None:
            sinks = f'[sinks.out]\ntype = "jsonl"\npath = "{self.root / "out.jsonl"}"\n'
        path = self.root / "layerwatch.toml"
        path.write_text(
            f'[[mounts]]\nname = "m"\n{mount}{sinks}'
            f'[spool]\npath = "{self.spool / "spool.db"}"\nmax_bytes = "1MiB"\n{extra}'
        )
        return path

    def tmpfs(self, target: Path, options: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        self.mounted.append(target)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """A setup whose tmpfs mounts are undone however the test ends."""
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        for target in reversed(s.mounted):
            while find_mount(target) is not None:
                unmount(str(target))


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def only_error(findings: list[Finding]) -> Finding:
    """The one error finding (fails when there is not exactly one)."""
    found = errors(findings)
    assert len(found) == 1, format_findings(findings)
    assert found[0].fix, "an error without a fix"
    return found[0]


def test_good_config_has_no_errors(setup: Setup) -> None:
    """A runnable config on this machine: only ok findings and exit status 0."""
    findings = check(setup.write())
    assert errors(findings) == [], format_findings(findings)
    assert exit_status(findings) == 0
    text = format_findings(findings)
    assert "kernel: overlay is available" in text
    assert "privileges: CAP_SYS_ADMIN" in text
    assert "sinks.out: jsonl sink builds" in text
    assert all(f.fix == "" for f in findings if f.level == "ok")


def test_says_which_scan_computes_change_lists(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C scan when it is built (ok); pure Python when switched off, with the fix (warn)."""
    found = [f for f in check(setup.write()) if f.what.startswith("change lists:")]
    if scanner_type() is not None:
        assert found == [Finding("ok", found[0].what)]
        assert "computed in C (" in found[0].what
    monkeypatch.setenv(ENV_PURE_PYTHON, "1")
    found = [f for f in check(setup.write()) if f.what.startswith("change lists:")]
    assert [f.level for f in found] == ["warn"], found
    assert "pure Python" in found[0].what
    assert ENV_PURE_PYTHON in found[0].fix


def test_counts_the_directories_to_watch(setup: Setup) -> None:
    """The watch count is every directory of the upper dir, itself included."""
    for i in range(7):
        (setup.rw / f"d{i}" / "sub").mkdir(parents=True)
    (setup.rw / "file").write_text("not a dir")
    os.symlink("/", setup.rw / "link")  # never followed
    findings = check(setup.write())
    assert Finding("ok", "inotify: mount m needs 15 watch(es) now") in findings
    budget = next(f for f in findings if "max_user_watches=" in f.what)
    assert "16 watch(es) needed" in budget.what  # plus the sync barrier's directory


def test_counts_the_watches_excludes_save(setup: Setup) -> None:
    """Excluded directories are counted as saved, and nothing below them is walked."""
    for i in range(3):
        (setup.rw / "cache" / f"d{i}" / "sub").mkdir(parents=True)
    (setup.rw / "app" / "src").mkdir(parents=True)
    mount = (
        f'layers = ["{setup.lower}"]\nrw = "{setup.rw}"\nmountpoint = "{setup.mnt}"\n'
        'exclude = ["/cache/*"]\n'
    )
    findings = check(setup.write(mount))
    want = "inotify: mount m needs 4 watch(es) now (3 excluded dir(s) not watched)"
    assert Finding("ok", want) in findings, format_findings(findings)


def test_unparsable_config_is_the_only_finding(setup: Setup) -> None:
    """A config error stops the check with one finding naming the key."""
    path = setup.write(extra='[service]\nrescan_interval = "often"\n')
    findings = check(path)
    assert len(findings) == 1
    assert only_error(findings).what.startswith("config: service.rescan_interval:")
    assert exit_status(findings) == 1
    missing = check(setup.root / "absent.toml")
    assert "cannot read" in only_error(missing).what


def test_missing_layer_is_named(setup: Setup) -> None:
    """A layer that does not exist names mounts[0].layers[0] and the path."""
    setup.lower.rmdir()
    found = only_error(check(setup.write()))
    assert "mounts[0] (m).layers[0]" in found.what
    assert str(setup.lower) in found.what
    assert "does not exist" in found.what


def test_layer_with_separator_is_named(setup: Setup) -> None:
    """A layer path with ':' is refused before mount(2) could misread it."""
    odd = setup.root / "a:b"
    odd.mkdir()
    mount = f'layers = ["{odd}"]\nrw = "{setup.rw}"\nmountpoint = "{setup.mnt}"\n'
    found = only_error(check(setup.write(mount=mount)))
    assert "separator" in found.what
    assert "without" in found.fix


def test_rw_that_is_a_file_is_named(setup: Setup) -> None:
    """An rw path that is a file is not a directory."""
    setup.rw.rmdir()
    setup.rw.write_text("")
    found = only_error(check(setup.write()))
    assert "rw dir" in found.what
    assert "not a directory" in found.what


def test_read_only_spool_directory(setup: Setup) -> None:
    """A spool directory on a read-only filesystem is an error naming spool.path."""
    setup.tmpfs(setup.spool, "ro,size=1m")
    found = only_error(check(setup.write()))
    assert found.what.startswith("spool.path: cannot write")
    assert "Read-only" in found.what


def test_small_spool_disk_is_a_warning(setup: Setup) -> None:
    """Less free space than spool.max_bytes is a warning with the numbers."""
    setup.tmpfs(setup.spool, "size=256k")
    findings = check(setup.write())
    warns = [f for f in findings if f.level == "warn" and f.what.startswith("spool:")]
    assert len(warns) == 1
    assert "spool.max_bytes (1.0 MiB)" in warns[0].what
    assert exit_status(findings) == 0


def test_sink_problems_are_named(setup: Setup) -> None:
    """An uninstalled sink type and a bad sink option name their keys."""
    sinks = (
        '[sinks.a]\ntype = "carrier-pigeon"\n[sinks.b]\ntype = "jsonl"\npath = "/x"\nfsync = 1\n'
    )
    findings = check(setup.write(sinks=sinks))
    what = [f.what for f in errors(findings)]
    assert len(what) == 2
    assert what[0].startswith("sinks.a.type: 'carrier-pigeon' is not installed")
    assert "jsonl" in what[0]
    assert what[1].startswith("config: sinks.b.fsync:")


def test_mountpoint_taken_by_another_filesystem(setup: Setup) -> None:
    """A mountpoint that already has another mount is an error saying which."""
    setup.tmpfs(setup.mnt, "size=1m")
    found = only_error(check(setup.write()))
    assert "already has a tmpfs mount" in found.what
    assert f"umount {setup.mnt}" in found.fix


def test_mount_left_by_a_killed_run_is_a_warning(setup: Setup) -> None:
    """The managed overlay already mounted with this rw dir: run adopts it (a warning)."""
    with mount_overlay(str(setup.root / "ovl"), [str(setup.lower)]) as ovl:
        mount = f'layers = ["{setup.lower}"]\nrw = "{ovl.upper}"\nmountpoint = "{ovl.merged}"\n'
        mount += f'work = "{ovl.work}"\n'
        findings = check(setup.write(mount=mount))
    assert errors(findings) == []
    assert any(f.level == "warn" and "adopts it" in f.what for f in findings)


def test_attached_mounts(setup: Setup) -> None:
    """An attached mountpoint must hold an overlay; its upper dir is what gets counted."""
    missing = only_error(check(setup.write(mount=f'mountpoint = "{setup.mnt}"\n')))
    assert "nothing is mounted" in missing.what
    with mount_overlay(str(setup.root / "ovl"), [str(setup.lower)]) as ovl:
        (Path(ovl.merged) / "new" / "dir").mkdir(parents=True)
        findings = check(setup.write(mount=f'mountpoint = "{ovl.merged}"\n'))
    assert errors(findings) == []
    assert Finding("ok", "inotify: mount m needs 3 watch(es) now") in findings


def test_upper_and_lowers_must_exist(setup: Setup) -> None:
    """An upper + lowers mount names a missing lower."""
    mount = f'upper = "{setup.rw}"\nlowers = ["{setup.lower}", "{setup.root / "gone"}"]\n'
    found = only_error(check(setup.write(mount=mount)))
    assert "mounts[0] (m).lowers[1]" in found.what


@pytest.fixture
def fake_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /proc/sys/fs/inotify (a fake: lowering the real limits would break every
    process of this uid on the machine, other tests included)."""
    limits = tmp_path / "limits"
    limits.mkdir()
    real = Path("/proc/sys/fs/inotify")
    for name in ("max_user_watches", "max_user_instances", "max_queued_events"):
        (limits / name).write_text((real / name).read_text())
    monkeypatch.setattr(check_mod, "_PROC_SYS", limits)
    # Pinned too: other processes of this uid add and drop watches while the test runs.
    monkeypatch.setattr(check_mod, "_inotify_in_use", lambda uid: (IN_USE, 1))
    return limits


IN_USE = 500


def test_counts_watches_in_use(tmp_path: Path) -> None:
    """The watches and instances a process holds are read from /proc (real inotify)."""
    pid = str(os.getpid())
    before = check_mod._inotify_of(pid)
    with Inotify() as inotify:
        for i in range(5):
            (tmp_path / f"d{i}").mkdir()
            inotify.add_watch(os.fsencode(tmp_path / f"d{i}"))
        during = check_mod._inotify_of(pid)
    assert (during[0] - before[0], during[1] - before[1]) == (5, 1)
    assert check_mod._inotify_of(pid) == before


def test_watch_limit_too_low_gives_the_sysctl_and_its_cost(setup: Setup, fake_limits: Path) -> None:
    """Too few free watches is an error with the sysctl line and its kernel memory cost."""
    for i in range(30):
        (setup.rw / f"d{i}").mkdir()
    (fake_limits / "max_user_watches").write_text(f"{IN_USE + 10}\n")
    inotify = '[service]\nsource = "inotify"\n'
    found = only_error(check(setup.write(extra=inotify)))
    assert "32 watch(es) needed" in found.what
    assert "sysctl -w fs.inotify.max_user_watches=" in found.fix
    assert "/etc/sysctl.d/" in found.fix
    assert "1 KB of kernel memory" in found.fix
    (fake_limits / "max_user_watches").write_text(f"{IN_USE + 36}\n")
    findings = check(setup.write(extra=inotify))
    assert errors(findings) == []
    assert any(f.level == "warn" and "little room" in f.what for f in findings)


@pytest.mark.skipif(os.geteuid() != 0, reason="fanotify filesystem marks need root")
def test_fanotify_source_is_reported_and_the_watch_limit_only_warns(
    setup: Setup, fake_limits: Path
) -> None:
    """With fanotify in use, the source and each mount's marking are reported, and an inotify
    watch shortage is a warning about the fallback, not an error."""
    for i in range(30):
        (setup.rw / f"d{i}").mkdir()
    (fake_limits / "max_user_watches").write_text(f"{IN_USE + 10}\n")
    findings = check(setup.write(extra='[service]\nsource = "fanotify"\n'))
    assert errors(findings) == []
    assert Finding("ok", "source: fanotify (service.source = 'fanotify')") in findings
    assert Finding("ok", "fanotify: mount m: filesystem mark(s)") in findings
    warn = next(f for f in findings if "32 watch(es) needed" in f.what)
    assert warn.level == "warn"
    assert "falls back to inotify" in warn.what


def test_attribution_with_inotify_is_a_config_error(setup: Setup) -> None:
    """``attribution = true`` with ``source = "inotify"``: the config error names the key."""
    mount = f'rw = "{setup.rw}"\nlayers = ["{setup.lower}"]\nmountpoint = "{setup.mnt}"\n'
    findings = check(
        setup.write(mount=mount + "attribution = true\n", extra=('[service]\nsource = "inotify"\n'))
    )
    found = only_error(findings)
    assert "service.source" in found.what
    assert "attribution" in found.what


def test_small_event_queue_is_a_warning(setup: Setup, fake_limits: Path) -> None:
    """A small max_queued_events warns that bursts cost full rescans."""
    (fake_limits / "max_queued_events").write_text("1024\n")
    findings = check(setup.write())
    warn = next(f for f in findings if "max_queued_events=1024" in f.what)
    assert warn.level == "warn"
    assert "sysctl -w fs.inotify.max_queued_events=" in warn.fix


def test_no_inotify_is_an_error(setup: Setup, fake_limits: Path) -> None:
    """Without /proc/sys/fs/inotify the kernel has no inotify: an error."""
    (fake_limits / "max_user_watches").unlink()
    assert "lacks inotify" in only_error(check(setup.write())).what


def test_unprivileged_managed_mount(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root or CAP_SYS_ADMIN, managed mounts are an error (uid and caps faked:
    the test runs as root and cannot drop to an unprivileged python here)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(check_mod, "_effective_caps", lambda: 0)
    monkeypatch.setattr(check_mod, "_inotify_in_use", lambda uid: (0, 0))
    found = only_error(check(setup.write()))
    assert "CAP_SYS_ADMIN" in found.what
    monkeypatch.setattr(check_mod, "_effective_caps", lambda: 1 << 21)
    assert errors(check(setup.write())) == []


def _cli(argv: list[str]) -> int:
    """Run the command as the CLI wires it; the logging it configures is put back after."""
    args = build_parser().parse_args(argv)
    saved = structlog.get_config()
    try:
        status: int = args.func(args)
    finally:
        structlog.configure(**saved)
    return status


def test_command_prints_findings_and_sets_the_status(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check CONFIG`` prints text (or --json) and returns 1 exactly when there is an error."""
    good = setup.write()
    assert _cli(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "0 error(s), 0 warning(s)"
    assert _cli(["check", "--json", str(good)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["level"] for row in rows} == {"ok"}
    setup.lower.rmdir()
    assert _cli(["check", str(good)]) == 1
    out = capsys.readouterr().out
    assert "error mounts[0] (m).layers[0]" in out
    assert "      fix: " in out
