"""``layerwatch check CONFIG``: is this config runnable here, and what to fix if not.

``check`` never raises and never changes anything: it parses the config, then looks at the
kernel (overlay, aufs), whether the C scan is built (``watcher.core.native``), the privileges
managed mounts need, every layer directory, the spool directory (by creating and removing a
probe file), every sink (installed, and its options build), and the inotify budgets
(directories to watch against what ``max_user_watches`` has left, with the sysctl to raise it
and what that costs). Each finding says what was looked at and, when it is not ``ok``, how to
fix it.

This module also publishes the JSON Schemas of event ``data`` (``schema_for``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from watcher.cli import logconfig as log
from watcher.core.errors import ConfigError, LayerwatchError
from watcher.core.excludes import Excludes
from watcher.core.mounts import find_mount
from watcher.core.native import ENV_PURE_PYTHON
from watcher.core.native import status as scan_status
from watcher.delivery.plugins import available_sinks
from watcher.live.fanotify import Fanotify
from watcher.live.source import FANOTIFY, INOTIFY, open_source
from watcher.service import config as config_mod
from watcher.service.config import Config, MountConfig
from watcher.service.service import build_sink

__all__ = [
    "Finding",
    "check",
    "exit_status",
    "format_findings",
    "run",
]

Level = Literal["ok", "warn", "error"]

_SEPARATORS: Final = (",", ":", "=", "\\")
_CAP_SYS_ADMIN: Final = 21
_WATCH_BYTES: Final = 1024
"""Kernel memory one inotify watch costs on a 64-bit kernel (about 1 KB, unswappable)."""
_QUEUED_EVENT_BYTES: Final = 70
_MIN_QUEUED_EVENTS: Final = 16384
_WALK_LIMIT: Final = 1_000_000
_WALK_SECONDS: Final = 10.0
_HEADROOM: Final = 0.8
_PROC_SYS: Final = Path("/proc/sys/fs/inotify")


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of ``check``.

    Attributes:
        level: ``ok``, ``warn`` (runs, but not as well as it could) or ``error`` (will not run).
        what: what was checked and what was found.
        fix: what to do about it ("" when ``ok``).
    """

    level: Level
    what: str
    fix: str = ""


def exit_status(findings: list[Finding]) -> int:
    """1 when any finding is an error, else 0."""
    return 1 if any(f.level == "error" for f in findings) else 0


def format_findings(findings: list[Finding]) -> str:
    """The findings as text, one per line, each fix indented under its finding."""
    lines = []
    for f in findings:
        lines.append(f"{f.level:<5} {f.what}")
        if f.fix:
            lines.extend(f"      fix: {line}" for line in f.fix.splitlines())
    errors = sum(f.level == "error" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    lines.append(f"{errors} error(s), {warns} warning(s)")
    return "\n".join(lines) + "\n"


def check(config_path: str | Path) -> list[Finding]:
    """Check a config file and this machine; never raises.

    Args:
        config_path: the TOML config ``layerwatch run`` would use.

    Returns:
        The findings, in the order checked. The config is checked first; when it does not
        parse, that is the only finding.
    """
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as exc:
        if exc.key == str(config_path):
            fix = "give the path of a readable TOML file"
        else:
            fix = f"correct {exc.key} in {os.fspath(config_path)}"
        return [Finding("error", str(exc), fix)]
    out = [
        Finding(
            "ok",
            f"config {os.fspath(config_path)}: {len(cfg.mounts)} mount(s), "
            f"{len(cfg.sinks)} sink(s)",
        )
    ]
    out += _kernel(cfg)
    out.append(_scan())
    out += _privileges(cfg)
    uppers: list[tuple[str, Path, Excludes]] = []
    for i, mount in enumerate(cfg.mounts):
        found, upper = _mount(i, mount)
        out += found
        if upper is not None:
            uppers.append((mount.name, upper, mount.exclude))
    out += _spool(cfg)
    out += _sinks(cfg)
    found, chosen = _source(cfg, uppers)
    out += found
    out += _inotify(uppers, in_use=chosen == INOTIFY)
    return out


# -- kernel and privileges -------------------------------------------------------------------


def _filesystems() -> set[str]:
    with contextlib.suppress(OSError), open("/proc/filesystems", encoding="ascii") as fh:
        return {line.split()[-1] for line in fh if line.split()}
    return set()


def _kernel(cfg: Config) -> list[Finding]:
    have = _filesystems()
    out = []
    needed = {"aufs" if m.whiteouts == "aufs" else "overlay" for m in cfg.mounts if m.managed}
    for fstype in sorted(needed):
        if fstype in have:
            out.append(Finding("ok", f"kernel: {fstype} is available"))
        else:
            module = "overlay" if fstype == "overlay" else "aufs"
            out.append(
                Finding(
                    "error",
                    f"kernel: {fstype} is not in /proc/filesystems; managed mounts need it",
                    f"modprobe {module} (and add it to /etc/modules-load.d/ to keep it)",
                )
            )
    return out


def _scan() -> Finding:
    """Which implementation computes change lists (diff, start snapshots, rescans)."""
    native, which = scan_status()
    what = f"change lists: computed in {which}"
    if native:
        return Finding("ok", what)
    if os.environ.get(ENV_PURE_PYTHON, "") not in ("", "0"):
        return Finding("warn", what, f"unset {ENV_PURE_PYTHON} to use the C scan")
    return Finding(
        "warn",
        what + "; the C scan is about 3x faster",
        "install a C compiler and the Python headers (Debian: build-essential python3-dev),\n"
        "then install layerwatch again: pip builds the C scan when it can",
    )


def _effective_caps() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _privileges(cfg: Config) -> list[Finding]:
    if not any(m.managed for m in cfg.mounts):
        return []
    if os.geteuid() == 0 or _effective_caps() >> _CAP_SYS_ADMIN & 1:
        return [Finding("ok", "privileges: CAP_SYS_ADMIN for managed mounts")]
    return [
        Finding(
            "error",
            "privileges: managed mounts (layers = [...]) need root or CAP_SYS_ADMIN",
            "run as root (the systemd unit in deploy/ does), or mount it yourself and attach "
            "with mountpoint = ... only",
        )
    ]


# -- mounts ----------------------------------------------------------------------------------


def _directory(key: str, path: Path, role: str, *, in_options: bool) -> Finding | None:
    """An error finding for a bad layer-like directory, or None when it is fine."""
    text = os.fspath(path)
    if in_options:
        bad = [sep for sep in _SEPARATORS if sep in text]
        if bad:
            return Finding(
                "error",
                f"{key}: {role} {text!r} contains {bad[0]!r}, a mount-option separator",
                "use a path (or a symlink to it) without ',', ':', '=' or '\\'",
            )
    if not path.exists():
        return Finding("error", f"{key}: {role} {text} does not exist", f"create it or fix {key}")
    if not path.is_dir():
        return Finding("error", f"{key}: {role} {text} is not a directory", f"fix {key}")
    return None


def _mount(i: int, mount: MountConfig) -> tuple[list[Finding], Path | None]:
    """Findings for one mount, and its upper dir when it can be watched."""
    where = f"mounts[{i}] ({mount.name})"
    out: list[Finding] = []
    if mount.managed:
        assert mount.rw is not None
        assert mount.mountpoint is not None
        dirs = [(f"{where}.layers[{j}]", p, "layer") for j, p in enumerate(mount.layers)]
        dirs.append((f"{where}.rw", mount.rw, "rw dir"))
        if mount.work is not None:
            dirs.append((f"{where}.work", mount.work, "work dir"))
        bad = [f for k, p, r in dirs if (f := _directory(k, p, r, in_options=True)) is not None]
        if bad:
            return bad, None
        if mount.work is None and any(sep in os.fspath(mount.rw) for sep in _SEPARATORS):
            return [Finding("error", f"{where}.rw: the default work dir has a separator")], None
        info = find_mount(mount.mountpoint)
        if info is not None:
            try:
                upper = info.overlay_dirs()[0] if info.fstype == "overlay" else None
            except LayerwatchError:  # a read-only overlay: not this mount's, reported below
                upper = None
            if upper == os.fsencode(mount.rw):
                out.append(
                    Finding(
                        "warn",
                        f"{where}: {mount.mountpoint} is already mounted with this rw dir "
                        "(a killed run left it); run adopts it",
                        f"nothing, or umount {mount.mountpoint} to start clean",
                    )
                )
            else:
                return [
                    Finding(
                        "error",
                        f"{where}.mountpoint: {mount.mountpoint} already has a {info.fstype} "
                        "mount that is not this mount's rw dir",
                        f"umount {mount.mountpoint}, or choose another mountpoint",
                    )
                ], None
        out.append(Finding("ok", f"{where}: {len(mount.layers)} layer(s) and rw dir are usable"))
        return out, mount.rw
    if mount.upper is not None:
        dirs = [(f"{where}.lowers[{j}]", p, "lower") for j, p in enumerate(mount.lowers)]
        dirs.append((f"{where}.upper", mount.upper, "upper dir"))
        bad = [f for k, p, r in dirs if (f := _directory(k, p, r, in_options=False)) is not None]
        if bad:
            return bad, None
        out.append(Finding("ok", f"{where}: upper and {len(mount.lowers)} lower(s) exist"))
        return out, mount.upper
    assert mount.mountpoint is not None
    info = find_mount(mount.mountpoint)
    if info is None:
        return [
            Finding(
                "error",
                f"{where}.mountpoint: nothing is mounted at {mount.mountpoint}",
                "mount the overlay first, or give layers + rw to let layerwatch mount it",
            )
        ], None
    try:
        upper, _, _ = info.overlay_dirs()
    except LayerwatchError as exc:
        return [Finding("error", f"{where}.mountpoint: {exc}", "attach a writable overlay")], None
    out.append(Finding("ok", f"{where}: attached overlay, upper {os.fsdecode(upper)}"))
    return out, Path(os.fsdecode(upper))


# -- spool -----------------------------------------------------------------------------------


def _spool(cfg: Config) -> list[Finding]:
    directory = cfg.spool.path.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".layerwatch-check-", dir=existing)
    except OSError as exc:
        return [
            Finding(
                "error",
                f"spool.path: cannot write in {existing} ({exc.strerror})",
                f"make {directory} writable (a read-write filesystem) or set spool.path",
            )
        ]
    os.close(fd)
    os.unlink(probe)
    out = [Finding("ok", f"spool: {directory} is writable")]
    if existing != directory:
        out[0] = Finding("ok", f"spool: {directory} will be created (in {existing})")
    st = os.statvfs(existing)
    free = st.f_bavail * st.f_frsize
    if free < cfg.spool.max_bytes:
        out.append(
            Finding(
                "warn",
                f"spool: {_human(free)} free on the spool's filesystem, less than "
                f"spool.max_bytes ({_human(cfg.spool.max_bytes)}); a full disk stops intake "
                "until sinks catch up",
                f"free space, or set spool.max_bytes below {_human(free)}",
            )
        )
    return out


# -- sinks -----------------------------------------------------------------------------------


def _sinks(cfg: Config) -> list[Finding]:
    out = []
    installed = available_sinks()
    for sink in cfg.sinks:
        if sink.type not in installed:
            out.append(
                Finding(
                    "error",
                    f"sinks.{sink.name}.type: {sink.type!r} is not installed "
                    f"(installed: {', '.join(installed) or 'none'})",
                    f"pip install layerwatch-{sink.type} (or the distribution providing it)",
                )
            )
            continue
        try:
            build_sink(sink, cfg.secrets)
        except ConfigError as exc:
            out.append(Finding("error", str(exc), f"correct {exc.key}"))
            continue
        out.append(Finding("ok", f"sinks.{sink.name}: {sink.type} sink builds"))
    return out


# -- inotify ---------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _count_dirs(root: Path, deadline: float, exclude: Excludes) -> tuple[int, int, bool]:
    """Directories under ``root`` (itself included) to watch, and those ``exclude`` saves
    (counted, not walked below); True when the walk was cut short."""
    count = saved = 0
    top = os.fsencode(root)
    stack = [top]
    while stack:
        if count >= _WALK_LIMIT or time.monotonic() > deadline:
            return count, saved, True
        path = stack.pop()
        count += 1
        with contextlib.suppress(OSError), os.scandir(path) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        if exclude.matches(entry.path[len(top) :]):  # the parent is not excluded
                            saved += 1
                        else:
                            stack.append(entry.path)
    return count, saved, False


def _inotify_in_use(uid: int) -> tuple[int, int]:
    """Watches and instances held now by processes of ``uid`` (what the limits count)."""
    watches = instances = 0
    for pid in _pids_of(uid):
        w, i = _inotify_of(pid)
        watches += w
        instances += i
    return watches, instances


def _inotify_of(pid: str) -> tuple[int, int]:
    """Watches and instances held by one process (0, 0 when it is gone)."""
    watches = instances = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                    continue
                instances += 1
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    watches += sum(line.startswith("inotify wd:") for line in fh)
    return watches, instances


def _pids_of(uid: int) -> Iterator[str]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    yield name


def _source(cfg: Config, uppers: list[tuple[str, Path, Excludes]]) -> tuple[list[Finding], str]:
    """Open the event source the service would (``service.source``) and try each upper on
    it: which source, why, how each mount would be marked. Returns the source's name."""
    try:
        choice = open_source(cfg.source, attribution=cfg.attribution)
    except LayerwatchError as exc:
        fix = 'set service.source = "auto" (inotify where fanotify is refused) or run as root'
        return [Finding("error", f"source: {exc}", fix)], FANOTIFY
    what = f"source: {choice.name} (service.source = {cfg.source!r})"
    if cfg.attribution:
        what += "; attribution " + ("on" if choice.attribution else "OFF")
    out: list[Finding] = []
    with contextlib.closing(choice.source):
        if choice.reason:
            fix = "run as root (CAP_SYS_ADMIN) on Linux 5.15 or later for fanotify"
            level: Level = "warn" if cfg.attribution or cfg.source == FANOTIFY else "ok"
            out.append(Finding(level, f"{what}: {choice.reason}", fix))
        else:
            out.append(Finding("ok", what))
        if isinstance(choice.source, Fanotify):
            for name, upper, _ in uppers:
                try:
                    choice.source.add_watch(os.fsencode(upper))
                except LayerwatchError as exc:
                    fix = 'set service.source = "inotify" for this machine'
                    out.append(Finding("error", f"fanotify: mount {name}: {exc}", fix))
                    continue
                strategy = choice.source.strategies.get(os.stat(upper).st_dev, "inode")
                out.append(Finding("ok", f"fanotify: mount {name}: {strategy} mark(s)"))
    return out, choice.name


def _inotify(uppers: list[tuple[str, Path, Excludes]], *, in_use: bool = True) -> list[Finding]:
    """The inotify limits against what the mounts need; with another source in use, what
    would be an error only warns (it matters if the service falls back to inotify)."""
    max_watches = _read_int(_PROC_SYS / "max_user_watches")
    max_instances = _read_int(_PROC_SYS / "max_user_instances")
    max_queued = _read_int(_PROC_SYS / "max_queued_events")
    if max_watches is None or max_instances is None or max_queued is None:
        return [
            Finding(
                "error",
                f"inotify: {_PROC_SYS} is not readable; the kernel lacks inotify",
                "use a kernel built with CONFIG_INOTIFY_USER",
            )
        ]
    out = []
    deadline = time.monotonic() + _WALK_SECONDS
    needed = 1  # the sync barrier's private directory
    for name, upper, exclude in uppers:
        count, saved, cut = _count_dirs(upper, deadline, exclude)
        needed += count
        more = "at least " if cut else ""
        spared = f" ({more}{saved} excluded dir(s) not watched)" if exclude else ""
        out.append(
            Finding("ok", f"inotify: mount {name} needs {more}{count} watch(es) now{spared}")
        )
    used, instances = _inotify_in_use(os.geteuid())
    free = max_watches - used
    raise_to = max(max_watches, 2 * (used + needed), 8192)
    fix = (
        f"sysctl -w fs.inotify.max_user_watches={raise_to}; to keep it, put "
        f"'fs.inotify.max_user_watches = {raise_to}' in /etc/sysctl.d/90-layerwatch.conf "
        f"(each watch costs about 1 KB of kernel memory when used: up to "
        f"{_human(raise_to * _WATCH_BYTES)} at that limit)"
    )
    what = (
        f"inotify: {needed} watch(es) needed, {free} of fs.inotify.max_user_watches="
        f"{max_watches} left ({used} in use by this uid)"
    )
    if needed > free and not in_use:
        what += "; only if layerwatch falls back to inotify: mounts would then degrade"
        out.append(Finding("warn", what, fix))
    elif needed > free:
        out.append(Finding("error", what + "; mounts would degrade to periodic rescans", fix))
    elif needed > _HEADROOM * free:
        out.append(Finding("warn", what + "; little room for new directories", fix))
    else:
        out.append(Finding("ok", what))
    if instances >= max_instances:
        out.append(
            Finding(
                "error",
                f"inotify: this uid holds {instances} instances, the limit "
                f"fs.inotify.max_user_instances={max_instances}",
                f"sysctl -w fs.inotify.max_user_instances={max_instances * 2}",
            )
        )
    if max_queued < _MIN_QUEUED_EVENTS:
        out.append(
            Finding(
                "warn",
                f"inotify: fs.inotify.max_queued_events={max_queued}; bursts overflow the "
                "queue and every overflow costs a full rescan",
                f"sysctl -w fs.inotify.max_queued_events={_MIN_QUEUED_EVENTS * 4} (each queued "
                f"event holds about {_QUEUED_EVENT_BYTES} B of kernel memory while queued)",
            )
        )
    else:
        out.append(Finding("ok", f"inotify: fs.inotify.max_queued_events={max_queued}"))
    return out


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# -- command line ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``layerwatch check CONFIG [--json]``: print the findings (stdout is the command's
    product) and return the exit status, 1 when any finding is an error, else 0."""
    log.configure(level="warning")  # stdout is the findings; logs go to stderr
    findings = check(args.config)
    if args.json:
        rows = [{"level": f.level, "what": f.what, "fix": f.fix} for f in findings]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(format_findings(findings))
    sys.stdout.flush()
    return exit_status(findings)
