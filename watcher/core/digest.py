"""Content digests of changed files, for audit: ``data.sha256`` on ``A`` and ``C`` events.

Opt-in per mount (``hash = true``). A ``Digester`` reads each regular file an ``A`` or ``C``
transition names (activity on such a file included) and hashes its bytes with SHA-256:

- **Where it reads.** Through the merged view when the mount has one (what a process in the
  container reads), else the upper directory (a detached mount: ``upper`` + ``lowers``). Opens
  are confined to that root (``openat2`` with ``RESOLVE_IN_ROOT``) and never follow a final
  symlink, so a container cannot point the service at a file outside it. An upper file that
  holds metadata only (overlay ``metacopy``: its bytes are in a lower layer) is not hashed
  from the upper: ``skipped = "metacopy"``.
- **Bounded.** A file over ``max_size`` bytes (or that grows past it while read) is
  ``skipped = "too_large"``; once a batch has spent ``budget`` seconds hashing, its remaining
  files are ``skipped = "budget"``. So a batch waits at most about ``budget`` plus one file's
  read of ``max_size`` bytes, and the events of other mounts no longer than that.
- **What the digest means.** The bytes the file held when it was read, shortly after the
  event: a later write may have changed them again (its own event then carries its own digest).
  A file removed or replaced by something else before the read is ``skipped = "gone"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import stat
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

from watcher.core.errors import PathError
from watcher.core.layers import LowerStack
from watcher.core.model import Content, Item, Kind, Transition
from watcher.core.mounts import Filesystem, open_in_root

__all__ = ["DEFAULT_BUDGET", "DEFAULT_MAX_SIZE", "Digester", "content_changes"]

DEFAULT_MAX_SIZE: Final = 64 << 20
DEFAULT_BUDGET: Final = 1.0
_CHUNK: Final = 1 << 20
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW


@dataclass(frozen=True, slots=True)
class Digester:
    """Hashes the regular files that transitions name.

    Args:
        root: the directory paths are resolved in: the merged view, or the upper directory.
        max_size: files larger than this many bytes are not hashed.
        budget: seconds of hashing per batch; the rest of the batch is not hashed.
        metacopy_xattr: when ``root`` is an upper directory, the xattr that marks a
            metadata-only file (``trusted.overlay.metacopy``); None through a merged view.
    """

    root: bytes
    max_size: int = DEFAULT_MAX_SIZE
    budget: float = DEFAULT_BUDGET
    metacopy_xattr: bytes | None = None

    @classmethod
    def of(
        cls, fs: Filesystem, *, max_size: int = DEFAULT_MAX_SIZE, budget: float = DEFAULT_BUDGET
    ) -> Digester:
        """The digester of ``fs``'s files: through its merged view when it is mounted, else
        in its upper directory (where a metacopy file's bytes are not)."""
        if fs.is_mounted():
            return cls(fs.mountpoint, max_size, budget)
        metacopy = fs.xattr_prefix + b"metacopy"
        return cls(fs.rw, max_size, budget, metacopy_xattr=metacopy)

    def digest(self, items: Iterable[Item]) -> list[Item]:
        """``items`` with ``content`` set on every ``A``/``C`` transition of a regular file
        (blocking: call it off the event loop)."""
        deadline = time.monotonic() + self.budget
        out: list[Item] = []
        for item in items:
            if (
                isinstance(item, Transition)
                and item.kind in (Kind.ADDED, Kind.CHANGED)
                and item.stat is not None
                and stat.S_ISREG(item.stat.st_mode)
            ):
                content = (
                    self.content(item.path)
                    if time.monotonic() < deadline
                    else Content(None, "budget")
                )
                item = dataclasses.replace(item, content=content)
            out.append(item)
        return out

    def content(self, path: bytes) -> Content:
        """The digest of the regular file at ``path`` now, or why there is none."""
        try:
            fd = open_in_root(self.root, path, _OPEN_FLAGS)
        except PathError:
            return Content(None, "gone")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return Content(None, "gone")
            if st.st_size > self.max_size:
                return Content(None, "too_large")
            if self.metacopy_xattr is not None and _has_xattr(fd, self.metacopy_xattr):
                return Content(None, "metacopy")
            return self._hash(fd)
        except OSError:
            return Content(None, "unreadable")
        finally:
            os.close(fd)

    def _hash(self, fd: int) -> Content:
        sha = hashlib.sha256()
        read = 0
        while chunk := os.read(fd, _CHUNK):
            read += len(chunk)
            if read > self.max_size:
                return Content(None, "too_large")  # it grew while read
            sha.update(chunk)
        return Content(sha.hexdigest())


def content_changes(
    fs: Filesystem, listed: Collection[bytes], *, max_size: int = DEFAULT_MAX_SIZE
) -> list[tuple[bytes, Content]]:
    """The regular files of ``fs``'s upper directory that the list leaves out (their metadata
    equals B's: rule 2 looks at no content) but whose bytes differ from B's file at the same
    path: what ``docker diff`` cannot see (moby#31805). Sorted by path.

    Each file is compared with B's topmost file at its path; a metacopy upper file (its bytes
    are B's), a file over ``max_size`` and one B has not as a regular file are left out.
    """
    lower = LowerStack(fs.layers, whiteouts=fs.whiteouts, xattr_prefix=fs.xattr_prefix)
    mine = Digester(fs.rw, max_size, math.inf, metacopy_xattr=fs.xattr_prefix + b"metacopy")
    out = []
    for path in _regular_files(fs.rw):
        if path in listed:
            continue
        base = lower.lookup(path)
        if base is None or not stat.S_ISREG(base.st.st_mode):
            continue
        ours = mine.content(path)
        if ours.sha256 is None:
            continue
        theirs = Digester(base.layer, max_size, math.inf).content(path)
        if theirs.sha256 is not None and theirs.sha256 != ours.sha256:
            out.append((path, ours))
    return out


def _regular_files(root: bytes) -> list[bytes]:
    """The regular files under ``root``, as paths inside it, sorted (symlinks not followed)."""
    found = []
    for directory, _dirs, files in os.walk(root):
        prefix = directory[len(root) :] or b""
        for name in files:
            path = prefix + b"/" + name
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(directory + b"/" + name).st_mode):
                    found.append(path)
    return sorted(found)


def _has_xattr(fd: int, name: bytes) -> bool:
    try:
        os.getxattr(fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise
    return True
