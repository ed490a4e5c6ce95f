"""Layer-diff and rootfs tar exports, checked by applying them (real overlay mounts).

The OCI applier below is the test's own, written from the image-spec layer rules: a
``.wh.NAME`` entry removes NAME, a ``.wh..wh..opq`` entry clears its directory's lower
content, any other entry replaces what is at its path (a directory over a directory merges).
Applying ``export_diff`` to a copy of the lower stack must give the merged view exactly;
extracting ``export_rootfs`` must give the merged tree exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import load_cases
from overlay import (
    LayerEntry,
    Overlay,
    build_layer,
    mount_base,
    mount_overlay,
    requires_overlay,
    run_ops,
    to_aufs,
)

import watcher.core.export
from watcher.core.errors import LayerError
from watcher.core.export import export_diff, export_rootfs
from watcher.core.model import Change, Kind

CASES = load_cases()
pytestmark = [requires_overlay, pytest.mark.root]

CAP_XATTR = "security.capability"
PAX_CAP = "SCHILY.xattr.security.capability"
# VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_BIND_SERVICE (bit 10)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)

Tree = dict[bytes, tuple[Any, ...]]


# ---------------------------------------------------------------------------------------------
# The test's own OCI layer applier and tree snapshot


def _remove(path: bytes) -> None:
    """Remove whatever is at ``path`` (a whole directory tree included); absent is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in ns, from the PAX record when it carries the fraction."""
    raw = member.pax_headers.get("mtime")
    if raw is None:
        return int(member.mtime) * 1_000_000_000
    seconds, _, frac = raw.partition(".")
    return int(seconds) * 1_000_000_000 + int(frac.ljust(9, "0")[:9] or "0")


def apply_layer(data: bytes, target: bytes) -> None:
    """Apply the tar ``data`` onto the directory ``target`` with OCI layer semantics."""
    dirs: list[tuple[bytes, int]] = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for member in tar:
            name = os.fsencode(member.name).rstrip(b"/")
            parent, _, base = name.rpartition(b"/")
            parent_dir = os.path.join(target, parent) if parent else target
            if base == b".wh..wh..opq":
                for child in os.listdir(parent_dir):
                    _remove(os.path.join(parent_dir, child))
                continue
            if base.startswith(b".wh."):
                _remove(os.path.join(parent_dir, base[4:]))
                continue
            path = target if name == b"." else os.path.join(target, name)
            if os.path.lexists(path) and not (
                member.isdir() and os.path.isdir(path) and not os.path.islink(path)
            ):
                _remove(path)
            if member.isdir():
                os.makedirs(path, exist_ok=True)
            elif member.islnk():
                os.link(os.path.join(target, os.fsencode(member.linkname)), path)
                continue
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None
                with open(path, "wb") as fh:
                    fh.write(source.read())
            elif member.issym():
                os.symlink(os.fsencode(member.linkname), path)
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(path, kind | member.mode, os.makedev(member.devmajor, member.devminor))
            elif member.isfifo():
                os.mkfifo(path)
            else:
                raise AssertionError(f"unexpected member type {member.type!r}")
            os.lchown(path, member.uid, member.gid)
            if not member.issym():
                os.chmod(path, member.mode)
            cap = member.pax_headers.get(PAX_CAP)
            if cap is not None:
                os.setxattr(
                    path, CAP_XATTR, cap.encode("utf-8", "surrogateescape"), follow_symlinks=False
                )
            ns = _mtime_ns(member)
            if member.isdir():
                dirs.append((path, ns))
            else:
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
    for path, ns in reversed(dirs):
        os.utime(path, ns=(ns, ns))


def _capability(path: bytes) -> bytes | None:
    try:
        return os.getxattr(path, CAP_XATTR, follow_symlinks=False)
    except OSError:
        return None


def snapshot(root: bytes | str, *, dir_mtime: bool = False, with_root: bool = False) -> Tree:
    """Every entry below ``root``: type, mode, uid, gid, rdev, capability and, for non-dirs,
    size, mtime (ns), content or symlink target. Directory mtimes only with ``dir_mtime``
    (the change list never compares them, so a layer does not carry unchanged ones)."""
    out: Tree = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        fields: list[Any] = [
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            _capability(path),
        ]
        if stat.S_ISDIR(st.st_mode):
            if dir_mtime:
                fields.append(st.st_mtime_ns)
            for name in os.listdir(path):
                visit(os.path.join(path, name), rel.rstrip(b"/") + b"/" + name)
        else:
            fields += [st.st_size, st.st_mtime_ns]
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    fields.append(fh.read())
            elif stat.S_ISLNK(st.st_mode):
                fields.append(os.readlink(path))
        if rel != b"/" or with_root:
            out[rel] = tuple(fields)

    visit(os.fsencode(root), b"/")
    return out


def _members(data: bytes) -> dict[bytes, tarfile.TarInfo]:
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        return {os.fsencode(m.name): m for m in tar}


def _diff_tar(upper: str, lowers: list[str], *, whiteouts: str = "overlay") -> tuple[bytes, int]:
    buf = io.BytesIO()
    count = export_diff(upper, lowers, buf, whiteouts=whiteouts)
    return buf.getvalue(), count


def _copy(src: str, dst: Path) -> bytes:
    """``cp -a`` the tree ``src`` to ``dst`` (hard links, modes, owners, mtimes kept)."""
    subprocess.run(["cp", "-a", src, str(dst)], check=True)
    return os.fsencode(dst)


def _assert_round_trip(ovl: Overlay, tmp_path: Path, *, whiteouts: str = "overlay") -> bytes:
    """Export the overlay's layer, apply it to a copy of its lower stack, compare."""
    expected = snapshot(ovl.merged)
    with mount_base(list(ovl.lowers)) as base:
        copy = _copy(base, tmp_path / "applied")
    data, count = _diff_tar(ovl.upper, list(ovl.lowers), whiteouts=whiteouts)
    assert count == len(_members(data))
    apply_layer(data, copy)
    got = snapshot(copy)
    assert sorted(got.keys() ^ expected.keys()) == []
    assert {p: v for p, v in got.items() if expected[p] != v} == {}
    return data


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def ovl(lower: str, tmp_path: Path) -> Iterator[Overlay]:
    """An overlay over the conformance lower tree, unmounted at the end."""
    base = tmp_path / "ovl"
    base.mkdir()
    with mount_overlay(str(base), [lower]) as mounted:
        yield mounted


@pytest.fixture
def stack(tmp_path: Path) -> list[str]:
    """A two-layer image-like stack whose top layer holds whiteouts and an opaque dir."""
    base, top = tmp_path / "l-base", tmp_path / "l-top"
    build_layer(
        str(base),
        [
            LayerEntry("dir", b"etc", mode=0o755),
            LayerEntry("file", b"etc/conf", b"base\n"),
            LayerEntry("file", b"etc/gone", b"gone\n"),
            LayerEntry("dir", b"opt/app", mode=0o755),
            LayerEntry("file", b"opt/app/old", b"old\n"),
            LayerEntry("file", b"opt/app/bin", b"bin\n", mode=0o755, capability=CAPABILITY),
            LayerEntry("symlink", b"opt/current", b"app"),
        ],
    )
    build_layer(
        str(top),
        [
            LayerEntry("file", b"etc/conf", b"top\n", mode=0o600),
            LayerEntry("whiteout", b"etc/gone"),
            LayerEntry("opaque", b"opt/app", mode=0o750),
            LayerEntry("file", b"opt/app/new", b"new\n"),
            LayerEntry("fifo", b"run-fifo"),
        ],
    )
    return [str(top), str(base)]


# ---------------------------------------------------------------------------------------------
# Layer diff


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_diff_round_trips_conformance_case(
    case: dict[str, Any], ovl: Overlay, tmp_path: Path
) -> None:
    """Applying the exported layer to the lower tree gives the merged view, for every case."""
    run_ops(ovl.merged, case["ops"])
    _assert_round_trip(ovl, tmp_path)


_TARGETS = [
    "data/file1", "data/file2", "data/link1", "data/hl1", "data/hl2", "data/dir2", "data/dir2/c",
    "data/sub", "data/sub/a", "data/sub/deep", "data/sub/deep/b", "data/emptydir", "data/opq",
    "data/opq/o1", "data/rdir", "data/rdir/inner", "data/null", "data/new", "data/sub/new",
    "data/new/x", "top", "etc", "etc/conf", "etc/gone", "opt/app", "opt/app/old", "opt/app/bin",
    "opt/app/new", "opt/current", "run-fifo",
]  # fmt: skip
_TEMPLATES = [
    "rm -rf {p}",
    "mkdir -p {p}",
    "test -p {p} || echo w{n} > {p}",  # never write to a FIFO: it would block
    "test -p {p} || echo a{n} >> {p}",
    "chmod {mode} {p}",
    "chown {n}:{m} {p}",
    "touch -d @{t} {p}",
    "mv {p} {q}",
    "ln {p} {q}",
    "ln -sfn {q} {p}",
    "mkfifo {p}",
    "rm -rf {p} && mkdir -p {p}/deep",
    "printf x > \"$(printf '{p}\\377\\n')\"",
]


def _random_ops(seed: int) -> str:
    """A reproducible random shell script of file operations (failing steps are fine)."""
    rng = random.Random(seed)
    steps = []
    for _ in range(rng.randint(3, 12)):
        template = rng.choice(_TEMPLATES)
        step = template.format(
            p=rng.choice(_TARGETS),
            q=rng.choice(_TARGETS),
            n=rng.randint(1, 9),
            m=rng.randint(1, 9),
            mode=rng.choice(["600", "755", "4755", "700"]),
            t=rng.choice([1_700_000_000, 1_600_000_000]),
        )
        steps.append(f"( {step} ) 2>/dev/null")
    return "; ".join(steps) + "; true"


@pytest.mark.parametrize("seed", range(8))
def test_diff_round_trips_random_ops_on_one_layer(seed: int, ovl: Overlay, tmp_path: Path) -> None:
    """Random operations over the conformance tree: the applied layer equals the merged view."""
    run_ops(ovl.merged, _random_ops(seed))
    _assert_round_trip(ovl, tmp_path)


@pytest.mark.parametrize("seed", range(100, 106))
def test_diff_round_trips_random_ops_on_a_layer_stack(
    seed: int, stack: list[str], tmp_path: Path
) -> None:
    """Over lowers holding whiteouts and opaque dirs, the applied layer equals the merged view."""
    base = tmp_path / "ovl"
    base.mkdir()
    with mount_overlay(str(base), stack) as mounted:
        run_ops(mounted.merged, _random_ops(seed))
        _assert_round_trip(mounted, tmp_path)


def test_diff_round_trips_aufs_whiteouts(lower: str, tmp_path: Path) -> None:
    """An aufs-format upper exports the same layer semantics as its overlay form."""
    base = tmp_path / "ovl"
    base.mkdir()
    with mount_overlay(str(base), [lower]) as mounted:
        run_ops(
            mounted.merged,
            "rm data/file1; rm -rf data/sub; mkdir -p data/sub/deep; echo n > data/n",
        )
        expected = snapshot(mounted.merged)
        copy = _copy(lower, tmp_path / "applied")
    to_aufs(mounted.upper, root_metadata=True)
    data, _ = _diff_tar(mounted.upper, [lower], whiteouts="aufs")
    names = set(_members(data))
    assert b"data/.wh.file1" in names
    assert b"data/sub/.wh..wh..opq" in names
    assert not any(b".wh..wh.aufs" in n or b".wh..wh.plnk" in n for n in names)
    apply_layer(data, copy)
    assert snapshot(copy) == expected


def test_diff_marks_deletes_and_opaque_dirs(ovl: Overlay, tmp_path: Path) -> None:
    """A delete is a `.wh.` file; a refilled dir carries `.wh..wh..opq` and its unchanged kids."""
    run_ops(ovl.merged, "rm data/file1; rm -rf data/sub; mkdir -p data/sub/deep")
    data = _assert_round_trip(ovl, tmp_path)
    members = _members(data)
    assert members[b"data/.wh.file1"].isreg()
    assert members[b"data/.wh.file1"].size == 0
    assert members[b"data/sub/.wh..wh..opq"].isreg()
    # deep equals the lower dir (not in the change list) yet must be in the layer
    assert members[b"data/sub/deep"].isdir()
    assert not any(name.startswith(b"data/sub/.wh.a") for name in members)


def test_diff_keeps_hardlinks_capabilities_and_odd_names(ovl: Overlay, tmp_path: Path) -> None:
    """Hard links stay links, security.capability rides in PAX, any name bytes round-trip."""
    merged = os.fsencode(ovl.merged)
    run_ops(ovl.merged, "echo h > data/h1 && ln data/h1 data/h2 && echo c > data/capped")
    os.setxattr(merged + b"/data/capped", CAP_XATTR, CAPABILITY, follow_symlinks=False)
    for name in (b"data/\xff\xfe raw", b"data/new\nline", b"data/caf\xc3\xa9"):
        with open(merged + b"/" + name, "wb") as fh:
            fh.write(name)
    data = _assert_round_trip(ovl, tmp_path)
    members = _members(data)
    assert members[b"data/h2"].islnk()
    assert members[b"data/h2"].linkname == "data/h1"
    raw = members[b"data/capped"].pax_headers[PAX_CAP].encode("utf-8", "surrogateescape")
    assert raw == CAPABILITY
    assert b"data/\xff\xfe raw" in members


def test_diff_skips_sockets(ovl: Overlay, tmp_path: Path) -> None:
    """A unix socket in the upper is left out of the layer."""
    dir_fd = os.open(os.path.join(ovl.merged, "data"), os.O_PATH)
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock.bind(f"/proc/self/fd/{dir_fd}/sock")
        os.close(dir_fd)
        data, _ = _diff_tar(ovl.upper, list(ovl.lowers))
    members = _members(data)
    assert b"data" in members
    assert b"data/sock" not in members


def test_diff_never_follows_symlinks_out_of_the_root(ovl: Overlay, tmp_path: Path) -> None:
    """Symlinks to /etc/passwd and /etc are stored as symlinks; passwd is never read."""
    secret = Path("/etc/passwd").read_bytes()
    run_ops(
        ovl.merged,
        "ln -s /etc/passwd data/pw; ln -s /etc data/etc; rm -rf data/sub; ln -s /etc data/sub",
    )
    data = _assert_round_trip(ovl, tmp_path)
    members = _members(data)
    assert members[b"data/pw"].issym()
    assert members[b"data/pw"].linkname == "/etc/passwd"
    assert members[b"data/sub"].issym()
    assert secret not in data


def test_diff_does_not_follow_a_symlink_swapped_in_after_compute(
    ovl: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dir replaced by a symlink to /etc between compute and export is not read through."""
    # compute is replaced here to simulate the race deterministically: it reports the list
    # from before the swap, as a real compute would have an instant earlier.
    secret = Path("/etc/passwd").read_bytes()
    run_ops(
        ovl.merged,
        "mkdir data/etc && echo x > data/etc/passwd && rm -rf data/etc && ln -s /etc data/etc",
    )
    stale = [Change(b"/data", Kind.CHANGED), Change(b"/data/etc", Kind.ADDED),
             Change(b"/data/etc/passwd", Kind.ADDED)]  # fmt: skip
    monkeypatch.setattr(watcher.core.export, "compute", lambda *a, **k: stale)
    data, _ = _diff_tar(ovl.upper, list(ovl.lowers))
    members = _members(data)
    assert members[b"data/etc"].issym()
    assert b"data/etc/passwd" not in members
    assert secret not in data


def test_diff_reads_metacopy_data_and_redirected_dirs(lower: str, tmp_path: Path) -> None:
    """With metacopy and redirect_dir on, the layer still carries the merged content."""
    base = tmp_path / "ovl"
    base.mkdir()
    options = "redirect_dir=on,metacopy=on,index=off"
    with mount_overlay(str(base), [lower], options=options) as mounted:
        run_ops(mounted.merged, "chmod 600 data/file1; chown 7 data/sub/a; mv data/rdir data/rdir2")
        upper_file1 = os.path.join(mounted.upper, "data/file1")
        assert b"trusted.overlay.metacopy" in map(os.fsencode, os.listxattr(upper_file1))
        _assert_round_trip(mounted, tmp_path)


# ---------------------------------------------------------------------------------------------
# Rootfs


def _rootfs_tar(merged: str) -> tuple[bytes, int]:
    buf = io.BytesIO()
    count = export_rootfs(merged, buf)
    return buf.getvalue(), count


def test_rootfs_equals_merged_tree(ovl: Overlay, tmp_path: Path) -> None:
    """Extracting the rootfs tar gives the merged tree, directory mtimes and root included."""
    run_ops(
        ovl.merged,
        "rm -rf data/sub; echo n > data/new; ln -s /etc/passwd data/pw; chmod 700 data/dir2",
    )
    expected = snapshot(ovl.merged, dir_mtime=True, with_root=True)
    data, count = _rootfs_tar(ovl.merged)
    members = _members(data)
    assert count == len(members) == len(expected)
    assert members[b"data/hl2"].islnk() or members[b"data/hl1"].islnk()
    assert members[b"data/pw"].issym()
    assert Path("/etc/passwd").read_bytes() not in data
    target = tmp_path / "extracted"
    target.mkdir()
    apply_layer(data, os.fsencode(target))
    assert snapshot(str(target), dir_mtime=True, with_root=True) == expected


def test_rootfs_of_a_missing_dir_is_a_layer_error(tmp_path: Path) -> None:
    """A root that is not a directory raises LayerError."""
    with pytest.raises(LayerError):
        _rootfs_tar(str(tmp_path / "missing"))
