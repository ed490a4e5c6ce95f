"""The rig: the harness's temp dir, its tmpfs mounts, the overlay mounts and the config.

Layout (``BASE`` is a temp dir on the root disk, so the sinks' output files do not eat RAM):

- ``BASE/fs``: a tmpfs holding every mount's lower, upper, work and merged dirs;
- ``BASE/spool``: a small tmpfs of its own holding only the spool (filled up by a fault);
- ``BASE/out``: what the file sinks write; ``BASE/logs``: the service's stderr per run;
- ``BASE/plugin``: a dist-info that registers the fault sink (``PYTHONPATH`` of the service).

Mounts: ``big`` (attached: the harness mounts it; its upper holds ``big_entries`` changes
before the first start), ``app`` (attached, empty), ``data`` (detached: the config names its
upper and lowers; the harness mounts it too) and ``base`` (managed: the service mounts it at
start and unmounts it at stop; no load). Every lower holds ``d0..d19``, each with ``l0..l9``
and ``ld/{a,b,c}``, the names the load generator works on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["MountSpec", "Rig", "clean_stale", "mounted", "umount"]

DIRS: Final = 20
PREFIX: Final = "lw-soak-"
"""The temp dir's name: ``lw-soak-PID-XXXX`` (PID: the harness's, for ``clean_stale``)."""
FINISHED: Final = "finished"
"""In a kept temp dir whose run cleaned up: ``clean_stale`` leaves it alone."""
WATCHES_MARK: Final = "max_user_watches.orig"
"""In the temp dir while the harness holds the watch limit lowered: the value to put back."""


def mounted(path: Path) -> bool:
    """Whether something is mounted exactly at ``path`` (from /proc/self/mountinfo)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split(b" ")
            point = fields[4].replace(b"\\040", b" ").replace(b"\\011", b"\t")
            if point.replace(b"\\134", b"\\") == target:
                return True
    return False


def umount(path: Path, *, attempts: int = 30) -> None:
    """Unmount ``path`` (every layer stacked there), lazily if it stays busy."""
    for attempt in range(attempts):
        if not mounted(path):
            return
        lazy = ["-l"] if attempt >= attempts // 2 else []
        subprocess.run(["umount", *lazy, str(path)], capture_output=True, timeout=30)
        time.sleep(0.1 if mounted(path) else 0)


@dataclass(frozen=True)
class MountSpec:
    """One mount of the rig.

    Attributes:
        name: its name in the config and in events.
        kind: ``attached``, ``detached`` or ``managed``.
        root: its directory on the ``fs`` tmpfs.
        loaded: whether the load generator writes through it.
    """

    name: str
    kind: str
    root: Path
    loaded: bool

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def diff_argv(self, layerwatch: str = "layerwatch") -> list[str]:
        """``layerwatch diff`` of this mount, the way an operator asks for it."""
        if self.kind == "attached":
            return [layerwatch, "diff", "--json", str(self.merged)]
        return [
            layerwatch,
            "diff",
            "--json",
            "--upper",
            str(self.upper),
            "--lower",
            str(self.lower),
        ]

    def toml(self) -> str:
        """Its ``[[mounts]]`` table."""
        head = f"[[mounts]]\nname = {_q(self.name)}\n"
        if self.kind == "attached":
            return head + f"mountpoint = {_q(self.merged)}\n"
        if self.kind == "detached":
            return head + f"upper = {_q(self.upper)}\nlowers = [{_q(self.lower)}]\n"
        return (
            head
            + f"layers = [{_q(self.lower)}]\nrw = {_q(self.upper)}\nwork = {_q(self.work)}\n"
            + f"mountpoint = {_q(self.merged)}\n"
        )


def _q(value: object) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(os.fspath(value) if isinstance(value, Path) else str(value))


def toml_value(value: object) -> str:
    """A TOML value for a sink option."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return _q(value)


class Rig:
    """The temp dir, the tmpfs mounts and the overlay mounts of one soak run.

    Args:
        spool_size: the spool tmpfs's size (``"256m"``).
        keep: leave the temp dir in place at clean-up (its tmpfs are unmounted anyway).
    """

    def __init__(self, *, spool_size: str, keep: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self.keep = keep
        self.fs = self.base / "fs"
        self.spool_dir = self.base / "spool"
        self.out = self.base / "out"
        self.logs = self.base / "logs"
        self.plugin = self.base / "plugin"
        self.config = self.base / "layerwatch.toml"
        self.socket = self.base / "api.sock"
        self.spool_size = spool_size
        self._tmpfs: list[Path] = []
        self.mounts: list[MountSpec] = []
        self.replaced = 0

    @property
    def spool_path(self) -> Path:
        return self.spool_dir / "spool.db"

    def setup(self) -> None:
        """Make the dirs and mount the two tmpfs."""
        for path in (self.fs, self.spool_dir, self.out, self.logs, self.plugin):
            path.mkdir()
        self._mount_tmpfs(self.fs, "8g")
        self._mount_tmpfs(self.spool_dir, self.spool_size)

    def _mount_tmpfs(self, target: Path, size: str) -> None:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target)],
            check=True,
            timeout=30,
        )
        self._tmpfs.append(target)

    def add_mount(self, name: str, kind: str, *, loaded: bool, big_entries: int = 0) -> MountSpec:
        """Make a mount's dirs and lower; pre-populate its upper; mount it unless managed."""
        spec = MountSpec(name, kind, self.fs / name, loaded)
        for path in (spec.lower, spec.upper, spec.work, spec.merged):
            path.mkdir(parents=True)
        build_lower(spec.lower)
        if big_entries:
            populate(spec.upper, big_entries)
        if kind != "managed":
            self.mount_overlay(spec)
        self.mounts.append(spec)
        return spec

    def mount_overlay(self, spec: MountSpec) -> None:
        """Mount ``spec``'s overlay at its merged dir."""
        options = f"lowerdir={spec.lower},upperdir={spec.upper},workdir={spec.work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(spec.merged)],
            check=True,
            timeout=30,
        )

    def replace_branch(self, spec: MountSpec) -> None:
        """Unmount ``spec``, replace its upper (and work) dir by new, empty ones at the same
        paths, and mount it again (the load generator must be stopped)."""
        umount(spec.merged)
        self.replaced += 1
        graveyard = self.fs / f".replaced-{self.replaced}"
        graveyard.mkdir()
        os.rename(spec.upper, graveyard / "upper")
        os.rename(spec.work, graveyard / "work")
        spec.upper.mkdir()
        spec.work.mkdir()
        shutil.rmtree(graveyard, ignore_errors=True)
        self.mount_overlay(spec)

    def write_config(
        self,
        *,
        service: Mapping[str, object],
        spool: Mapping[str, object],
        sinks: Mapping[str, Mapping[str, object]],
    ) -> None:
        """Write the TOML config ``layerwatch run`` reads."""
        lines = ["[service]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in service.items()]
        lines += ["", "[spool]", f"path = {_q(self.spool_path)}"]
        lines += [f"{key} = {toml_value(value)}" for key, value in spool.items()]
        lines += ["", "[api]", f"socket = {_q(self.socket)}", ""]
        lines += [spec.toml() for spec in self.mounts]
        for name, options in sinks.items():
            lines += [f"[sinks.{name}]"]
            lines += [f"{key} = {toml_value(value)}" for key, value in options.items()]
            lines += [""]
        self.config.write_text("\n".join(lines))

    def record(self, pid: int | None) -> None:
        """Note a process the harness started (``clean_stale`` ends it if the harness is
        SIGKILLed), with its command line, so a reused pid is never taken for it."""
        if pid is None:
            return
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            with (self.base / "pids").open("ab") as out:
                out.write(f"{pid} ".encode() + cmdline.hex().encode() + b"\n")

    def cleanup(self) -> None:
        """Unmount every overlay and tmpfs of the rig; remove the temp dir unless kept."""
        for spec in reversed(self.mounts):
            umount(spec.merged)
        for target in reversed(self._tmpfs):
            umount(target)
        self._tmpfs.clear()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            (self.base / FINISHED).write_text("cleaned up; kept for reading\n")


def build_lower(lower: Path) -> None:
    """The lower layer the load generator expects."""
    for k in range(DIRS):
        d = lower / f"d{k}"
        (d / "ld").mkdir(parents=True)
        for i in range(10):
            (d / f"l{i}").write_bytes(b"lower")
        for name in ("a", "b", "c"):
            (d / "ld" / name).write_bytes(b"lower")


def populate(upper: Path, entries: int) -> None:
    """Put ``entries`` changes into ``upper`` before it is mounted: new files in new dirs
    (``big/bN/fI``, 1000 per dir), and a whiteout of ``l9`` in every ``dN`` (so the list
    also holds ``D`` and ``C`` entries)."""
    files = max(entries - entries // 1000 - 1 - 2 * DIRS, 0)
    for k in range(DIRS):
        d = upper / f"d{k}"
        d.mkdir(exist_ok=True)
        os.mknod(d / "l9", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    top = upper / "big"
    top.mkdir()
    for first in range(0, files, 1000):
        d = top / f"b{first // 1000}"
        d.mkdir()
        for i in range(first, min(first + 1000, files)):
            os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def write_plugin(where: Path, entry_points: Iterable[tuple[str, str]]) -> None:
    """A dist-info in ``where`` registering sinks in ``layerwatch.sinks`` (no install needed:
    ``where`` goes on the service's ``PYTHONPATH``)."""
    info = where / "layerwatch_soak-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layerwatch-soak\nVersion: 0\n")
    lines = ["[layerwatch.sinks]", *(f"{name} = {target}" for name, target in entry_points)]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def _mount_points() -> list[bytes]:
    with open("/proc/self/mountinfo", "rb") as info:
        return [
            line.split(b" ")[4].replace(b"\\040", b" ").replace(b"\\134", b"\\") for line in info
        ]


def clean_stale(top: Path | None = None) -> list[str]:
    """Undo what a harness that was SIGKILLed left behind (nothing else could): for each
    ``lw-soak-PID-*`` dir whose PID is gone, put the watch limit back if it was lowered,
    SIGKILL the processes it recorded (only those whose command line still matches),
    unmount everything below it (deepest first) and remove it. What was done, as lines."""
    top = top or Path(tempfile.gettempdir())
    done = []
    for base in sorted(top.glob(f"{PREFIX}*-*")):
        pid = base.name.removeprefix(PREFIX).partition("-")[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists() or not base.is_dir():
            continue
        if (base / FINISHED).exists():
            continue
        mark = base / WATCHES_MARK
        with contextlib.suppress(OSError):
            Path("/proc/sys/fs/inotify/max_user_watches").write_text(mark.read_text())
            done.append(f"{base}: fs.inotify.max_user_watches put back")
        with contextlib.suppress(OSError):
            for line in (base / "pids").read_text().splitlines():
                word, _, cmdline = line.partition(" ")
                with contextlib.suppress(OSError, ValueError):
                    if Path(f"/proc/{word}/cmdline").read_bytes() == bytes.fromhex(cmdline):
                        os.kill(int(word), 9)
                        done.append(f"{base}: killed {word}")
        prefix = os.fsencode(base) + b"/"
        for point in sorted(
            (p for p in _mount_points() if p.startswith(prefix)), key=len, reverse=True
        ):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
            done.append(f"{base}: unmounted {os.fsdecode(point)}")
        shutil.rmtree(base, ignore_errors=True)
        done.append(f"{base}: removed")
    return done
