"""LowerStack: the union of the lower layers, resolved top-down, cached within bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from overlay import LayerEntry, build_layer, requires_overlay

from watcher.core.layers import LowerStack, Whiteouts

pytestmark = [requires_overlay, pytest.mark.root]  # whiteouts are char devices: mknod needs root


def _stack(tmp_path: Path) -> tuple[str, str]:
    top, base = str(tmp_path / "top"), str(tmp_path / "base")
    os.mkdir(top)
    os.mkdir(base)
    build_layer(
        base,
        [
            LayerEntry("dir", b"etc"),
            LayerEntry("file", b"etc/gone", b"x"),
            LayerEntry("file", b"etc/kept", b"base"),
            LayerEntry("dir", b"opt"),
            LayerEntry("file", b"opt/hidden", b"x"),
        ],
    )
    build_layer(
        top,
        [
            LayerEntry("dir", b"etc"),
            LayerEntry("whiteout", b"etc/gone"),
            LayerEntry("file", b"etc/kept", b"top!"),
            LayerEntry("opaque", b"opt"),
            LayerEntry("file", b"opt/new", b"n"),
        ],
    )
    return top, base


def test_resolves_top_down_through_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    """The top layer wins; its whiteouts and opaque dirs hide what lies below."""
    stack = LowerStack(_stack(tmp_path))
    kept = stack.lookup(b"/etc/kept")
    assert kept is not None
    assert kept.st.st_size == 4  # "top!", not "base"
    assert stack.lookup(b"/etc/gone") is None
    assert stack.lookup(b"/opt/hidden") is None
    assert stack.lookup(b"/opt/new") is not None
    assert sorted(stack.names(b"/etc")) == [b"kept"]
    assert sorted(stack.names(b"/opt")) == [b"new"]


def test_symlinked_layer_roots_are_followed_once(tmp_path: Path) -> None:
    """A layer named by a symlink (Docker's overlay2/l/*) resolves like the real directory."""
    top, base = _stack(tmp_path)
    os.symlink(top, tmp_path / "l1")
    stack = LowerStack([str(tmp_path / "l1"), base])
    entry = stack.lookup(b"/etc")
    assert entry is not None
    assert entry.is_dir


def test_names_that_come_and_go_do_not_grow_the_cache(tmp_path: Path) -> None:
    """Lookups of names no layer has are answered from the listing and not kept."""
    stack = LowerStack(_stack(tmp_path))
    stack.lookup(b"/etc/kept")
    before = len(stack._cache)
    for i in range(5000):
        assert stack.lookup(b"/etc/tmp%d" % i) is None
    assert len(stack._cache) == before


def test_aufs_whiteouts(tmp_path: Path) -> None:
    """In aufs format, .wh.NAME hides NAME and is not an entry itself."""
    top, base = str(tmp_path / "top"), str(tmp_path / "base")
    os.makedirs(os.path.join(base, "etc"))
    os.makedirs(os.path.join(top, "etc"))
    Path(base, "etc", "gone").write_text("x")
    Path(top, "etc", ".wh.gone").write_text("")
    stack = LowerStack([top, base], whiteouts=Whiteouts.AUFS)
    assert stack.lookup(b"/etc/gone") is None
    assert stack.lookup(b"/etc/.wh.gone") is None
    assert stack.names(b"/etc") == []
