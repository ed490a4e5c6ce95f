"""The process behind a change: what ``/proc`` says of a writer fanotify named.

fanotify gives the writer's pid and a pidfd (a reference that no later process can take
over). :func:`describe` opens ``/proc/PID`` first, then asks the pidfd whether the process is
still there: if it is, the directory opened belongs to it (a recycled pid would have needed it
to exit first), and everything read through that directory descriptor is the writer's, even if
it exits while we read (those reads then fail and the fields stay None). Nothing here waits:
a process that is gone yields a ``Process`` with its pid and nulls.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

__all__ = ["Process", "describe"]


@dataclass(frozen=True, slots=True)
class Process:
    """What could be read about one process; None for what could not.

    Attributes:
        pid: The pid in layerwatch's pid namespace.
        comm: ``/proc/PID/comm`` (the name a process gave itself: ``prctl``, ``exec -a`` does
            not change it, the executable's base name does).
        exe: The executable's path (``/proc/PID/exe``); None for kernel threads, or when the
            process exited.
        uid: The effective uid (``Uid:`` second field of ``/proc/PID/status``).
        gid: The effective gid.
        cgroup: The cgroup v2 path (``0::`` line of ``/proc/PID/cgroup``); on a hybrid host,
            where v2 is left at ``/``, the first v1 hierarchy's path that is not ``/``.
    """

    pid: int
    comm: str | None = None
    exe: str | None = None
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None

    @classmethod
    def gone(cls, pid: int) -> Process:
        """A process that exited before it could be read: its pid only."""
        return cls(pid)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (``data.process`` without the container, which the event
        encoder resolves from the mount's labels)."""
        return {
            "pid": self.pid,
            "comm": self.comm,
            "exe": self.exe,
            "uid": self.uid,
            "gid": self.gid,
            "cgroup": self.cgroup,
        }


def describe(pid: int, pidfd: int) -> Process:
    """Read ``pid``'s identity from ``/proc``, checked against its ``pidfd``.

    Args:
        pid: The pid fanotify reported.
        pidfd: The pidfd fanotify reported for it (the caller closes it).

    Returns:
        What could be read; ``Process.gone(pid)`` when the process exited before its ``/proc``
        directory was opened.
    """
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return Process.gone(pid)
    try:
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            return Process.gone(pid)  # reaped: the directory opened may be another's
        except OSError:
            pass  # EPERM cannot happen as root; the pidfd still pins the identity checked
        comm = _read(dirfd, "comm")
        uid = gid = None
        status = _read(dirfd, "status")
        if status is not None:
            for line in status.splitlines():
                if line.startswith("Uid:"):
                    uid = int(line.split()[2])
                elif line.startswith("Gid:"):
                    gid = int(line.split()[2])
                    break
        try:
            exe: str | None = _text(os.readlink(b"exe", dir_fd=dirfd))
        except OSError:
            exe = None
        return Process(pid, comm, exe, uid, gid, _cgroup(_read(dirfd, "cgroup")))
    finally:
        os.close(dirfd)


def _read(dirfd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        return _text(os.read(fd, 65536)).rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _cgroup(text: str | None) -> str | None:
    if not text:
        return None
    paths = [line.split(":", 2)[-1] for line in text.splitlines()]
    v2 = [line[3:] for line in text.splitlines() if line.startswith("0::")]
    if v2 and v2[0] != "/":
        return v2[0]
    # A hybrid host leaves v2 at the root and places processes in the v1 hierarchies.
    return next((path for path in paths if path != "/"), paths[0] if paths else None)
