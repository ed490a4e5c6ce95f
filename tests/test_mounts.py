"""Filesystem: mount, umount (busy), is_mounted, reset, attach, and reads confined to the root.

Real overlayfs mounts (root only); every mount is unmounted by the ``fs`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay import requires_overlay

from watcher.core.errors import LayerError, MountError, PathError
from watcher.core.model import Change, Kind
from watcher.core.mounts import Driver, Filesystem, find_mount, read_mountinfo

pytestmark = [requires_overlay, pytest.mark.root]


def _layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Two lower layers (top has a file over base's), an rw dir and a mountpoint."""
    top, base, rw, mnt = (tmp_path / n for n in ("top", "base", "rw", "mnt"))
    for d in (top, base, rw):
        d.mkdir()
    (base / "etc").mkdir()
    (base / "etc" / "hosts").write_text("base\n")
    (base / "etc" / "motd").write_text("hello\n")
    (top / "etc").mkdir()
    (top / "etc" / "hosts").write_text("top\n")
    return top, base, rw, mnt


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Filesystem]:
    """A Filesystem over two layers, not yet mounted; unmounted at the end whatever happens."""
    top, base, rw, mnt = _layers(tmp_path)
    filesystem = Filesystem([top, base], rw, mnt)
    try:
        yield filesystem
    finally:
        while find_mount(mnt) is not None:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_mount_orders_layers_top_first(fs: Filesystem) -> None:
    """The first layer wins: the merged view shows top's file over base's."""
    fs.mount()
    assert fs.is_mounted()
    assert (Path(os.fsdecode(fs.mountpoint)) / "etc" / "hosts").read_text() == "top\n"
    assert (Path(os.fsdecode(fs.mountpoint)) / "etc" / "motd").read_text() == "hello\n"


def test_is_mounted_reads_mountinfo(fs: Filesystem) -> None:
    """is_mounted follows /proc/self/mountinfo, before and after."""
    assert not fs.is_mounted()
    fs.mount()
    info = find_mount(fs.mountpoint)
    assert info is not None
    assert info.fstype == "overlay"
    assert info.overlay_dirs()[0] == fs.rw
    assert any(m.mountpoint == fs.mountpoint for m in read_mountinfo())
    fs.umount()
    assert not fs.is_mounted()


def test_double_mount_is_an_error(fs: Filesystem) -> None:
    """Mounting onto a mounted target fails clearly and leaves one mount, not two."""
    fs.mount()
    with pytest.raises(MountError, match="already a mount point"):
        fs.mount()
    count = sum(1 for m in read_mountinfo() if m.mountpoint == fs.mountpoint)
    assert count == 1


def test_busy_umount_retries_then_fails_clearly(fs: Filesystem) -> None:
    """While a process works inside, umount retries, then names the cause; later it works."""
    fs.mount()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        cwd=os.fsdecode(fs.mountpoint),
        stdin=subprocess.PIPE,
    )
    try:
        with pytest.raises(MountError, match="still busy after 3 attempts"):
            fs.umount(attempts=3, delay=0.01)
        assert fs.is_mounted()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    fs.umount()
    assert not fs.is_mounted()


def test_umount_of_nothing_is_an_error(fs: Filesystem) -> None:
    """Unmounting what is not mounted says so."""
    os.makedirs(fs.mountpoint, exist_ok=True)
    with pytest.raises(MountError, match="not mounted"):
        fs.umount()


@pytest.mark.parametrize("bad", ["a,b", "a:b", "a=b", "a\\b"])
def test_layer_path_with_an_option_separator_is_rejected(tmp_path: Path, bad: str) -> None:
    """A layer path holding ',', ':', '=' or a backslash is refused, naming the path."""
    _top, base, rw, mnt = _layers(tmp_path)
    odd = tmp_path / bad
    odd.mkdir()
    fs = Filesystem([odd, base], rw, mnt)
    with pytest.raises(LayerError, match="mount-option separator") as info:
        fs.mount()
    assert repr(str(odd)) in str(info.value)  # the path, quoted unambiguously
    assert find_mount(mnt) is None


def test_missing_layer_is_rejected(tmp_path: Path) -> None:
    """A layer that does not exist is named in the error, and nothing is mounted."""
    _top, base, rw, mnt = _layers(tmp_path)
    fs = Filesystem([tmp_path / "nope", base], rw, mnt)
    with pytest.raises(LayerError, match="nope"):
        fs.mount()
    assert find_mount(mnt) is None


def test_changes_and_reset(fs: Filesystem) -> None:
    """changes() reports the writes; reset() empties rw, stays mounted, lists nothing."""
    fs.mount()
    merged = Path(os.fsdecode(fs.mountpoint))
    (merged / "etc" / "motd").write_text("changed\n")
    (merged / "etc" / "hosts").unlink()
    (merged / "new").mkdir()
    assert fs.changes() == [
        Change(b"/etc", Kind.CHANGED),
        Change(b"/etc/hosts", Kind.DELETED),
        Change(b"/etc/motd", Kind.CHANGED),
        Change(b"/new", Kind.ADDED),
    ]
    fs.reset()
    assert fs.is_mounted()
    assert fs.changes() == []
    assert os.listdir(fs.rw) == []
    assert (merged / "etc" / "hosts").read_text() == "top\n"
    (merged / "again").write_text("x")  # still usable
    assert fs.changes() == [Change(b"/again", Kind.ADDED)]


def test_attach_reads_layers_from_mountinfo(fs: Filesystem) -> None:
    """attach() finds upper, lowers (top first) and work of an existing overlay."""
    fs.mount()
    attached = Filesystem.attach(fs.mountpoint)
    assert attached.rw == fs.rw
    assert attached.layers == fs.layers
    assert attached.work == fs.work
    with pytest.raises(MountError, match="nothing is mounted"):
        Filesystem.attach(fs.rw)


def test_reads_stay_inside_the_root(fs: Filesystem) -> None:
    """open_file and read_dir refuse '..' and resolve symlinks inside the root, not the host's."""
    fs.mount()
    merged = Path(os.fsdecode(fs.mountpoint))
    (merged / "escape").symlink_to("/etc/passwd")
    (merged / "up").symlink_to("../../../../../../etc")
    with fs.open_file("/etc/hosts") as f:
        assert f.read() == b"top\n"
    with pytest.raises(PathError):
        fs.open_file("/escape")  # /etc/passwd inside this root does not exist
    with pytest.raises(PathError, match=r"\.\."):
        fs.open_file("etc/../../etc/passwd")
    names = [entry.name for entry in fs.read_dir("/up")]  # '..' clamps at the root: /etc
    assert names == [b"hosts", b"motd"]
    with pytest.raises(PathError):
        fs.open_file("/etc")  # a directory is not a file
    os.mkfifo(merged / "pipe")
    with pytest.raises(PathError, match="not a regular file"):
        fs.open_file("/pipe")  # refused at once: opening it must not wait for a writer


def test_aufs_is_refused_where_the_kernel_lacks_it(tmp_path: Path) -> None:
    """Without aufs in /proc/filesystems, mounting it is a clear error."""
    with open("/proc/filesystems") as f:
        if "\taufs\n" in f.read():
            pytest.skip("this kernel has aufs")
    top, base, rw, mnt = _layers(tmp_path)
    with pytest.raises(MountError, match="aufs is not available"):
        Filesystem([top, base], rw, mnt, driver=Driver.AUFS).mount()
