"""The independent reference for the change list: compare two trees, the way moby does.

``changes_dirs(merged, base)`` walks the merged view of a mounted overlay and the base view
(the lower stack alone) and compares them, as moby's ``ChangesDirs(merged, base)`` does for
``docker diff`` on overlay2 (``docs/rules.md``, rules 1, 2, 7 and 8):

- a path only in the merged tree is ``A``, and so is everything below it;
- a path only in the base tree is ``D``, reported for the topmost name only;
- a path in both is ``C`` when mode (type included), uid, gid, rdev or the raw
  ``security.capability`` xattr differ, or, for non-directories, size or mtime differ (mtimes
  are equal to the ns, or in the same second when either has 0 ns);
- a base directory replaced by a non-directory hides its old children (no ``D`` below it);
- every directory with a change below it that is not itself ``A`` or ``C`` is ``C``; ``/``
  never is.

It never reads an upper directory and never imports ``watcher``: it is the yardstick the
upper-only computation is held to.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Final

CAPABILITY: Final = b"security.capability"


@dataclass(slots=True)
class Node:
    """One walked entry: the compared attributes and, for a directory, its children."""

    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    mtime_ns: int
    capability: bytes | None
    children: dict[bytes, Node] | None = field(default=None)

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)


def _capability(path: bytes) -> bytes | None:
    """The raw ``security.capability`` xattr of ``path`` (not followed), or None."""
    try:
        return os.getxattr(path, CAPABILITY, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def _node(path: bytes) -> Node:
    """lstat ``path`` (and its capability xattr) into a childless Node."""
    st = os.lstat(path)
    return Node(
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        capability=_capability(path),
    )


def walk(root: bytes | str) -> Node:
    """Walk the tree at ``root`` (no symlinks followed) into a Node tree."""
    broot = os.fsencode(root)
    top = _node(broot)
    stack = [(broot, top)]
    while stack:
        path, node = stack.pop()
        node.children = {}
        with os.scandir(path) as it:
            entries = list(it)
        for entry in entries:
            try:
                child = _node(entry.path)
            except FileNotFoundError:
                # overlayfs lists a lower whiteout in a directory that is not merged with a
                # layer below, but the name resolves to nothing: it is not an entry.
                continue
            node.children[entry.name] = child
            if child.is_dir:
                stack.append((entry.path, child))
    return top


def same_mtime(a_ns: int, b_ns: int) -> bool:
    """mtimes are equal to the ns, or share the second when either has 0 ns."""
    if a_ns == b_ns:
        return True
    a_s, a_frac = divmod(a_ns, 1_000_000_000)
    b_s, b_frac = divmod(b_ns, 1_000_000_000)
    return a_s == b_s and (a_frac == 0 or b_frac == 0)


def differs(old: Node, new: Node) -> bool:
    """Rule 2: whether two entries at the same path differ."""
    if (old.mode, old.uid, old.gid, old.rdev, old.capability) != (
        new.mode,
        new.uid,
        new.gid,
        new.rdev,
        new.capability,
    ):
        return True
    if new.is_dir:
        return False
    return old.size != new.size or not same_mtime(old.mtime_ns, new.mtime_ns)


def _join(parent: bytes, name: bytes) -> bytes:
    """Root-relative child path."""
    return b"/" + name if parent == b"/" else parent + b"/" + name


def _compare(path: bytes, new: Node, old: Node | None, marked: bool, out: dict[bytes, str]) -> None:
    """Record the changes of ``new`` (at ``path``) against ``old`` into ``out``.

    ``marked`` says ``path`` itself is already ``A`` or ``C``.
    """
    before = len(out)
    old_children = dict(old.children or {}) if old is not None and new.is_dir else {}
    for name, child in (new.children or {}).items():
        child_path = _join(path, name)
        old_child = old_children.pop(name, None)
        child_marked = False
        if old_child is None:
            out[child_path] = "A"
            child_marked = True
        elif differs(old_child, child):
            out[child_path] = "C"
            child_marked = True
        _compare(child_path, child, old_child, child_marked, out)
    for name in old_children:
        out[_join(path, name)] = "D"
    if len(out) > before and new.is_dir and not marked and path != b"/":
        out[path] = "C"


def compare_trees(new: Node, old: Node) -> list[tuple[bytes, str]]:
    """The change list of tree ``new`` against tree ``old``: (path, kind) sorted by path."""
    out: dict[bytes, str] = {}
    _compare(b"/", new, old, True, out)
    return sorted(out.items())


def changes_dirs(merged: bytes | str, base: bytes | str) -> list[tuple[bytes, str]]:
    """Walk the merged view and the base view and return their change list.

    Args:
        merged: the mounted overlay's merged directory.
        base: the base view (the lower stack alone), e.g. from ``overlay.mount_base``.

    Returns:
        ``(path, kind)`` pairs, path absolute inside the root as bytes, kind ``A``/``C``/``D``,
        sorted by path bytes.
    """
    return compare_trees(walk(merged), walk(base))


def lines(changes: list[tuple[bytes, str]]) -> set[str]:
    """Render pairs as ``docker diff`` lines (``"K /path"``; undecodable bytes escaped)."""
    return {f"{kind} {os.fsdecode(path)}" for path, kind in changes}
