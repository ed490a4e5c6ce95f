"""Content digests (``hash = true``): the Digester on real files, and the service end to end
on a real overlay with a real jsonl sink."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from pathlib import Path

import jsonschema
import orjson
from overlay import LayerEntry, build_layer, mount_overlay, requires_overlay

from watcher.core.digest import Digester
from watcher.core.model import Content, Control, Item, Kind, Op, Transition
from watcher.delivery.events import CHANGE
from watcher.delivery.schemas import schema_for
from watcher.service.config import parse
from watcher.service.service import Service


def _transition(root: Path, name: str, kind: Kind = Kind.ADDED) -> Transition:
    path = b"/" + name.encode()
    return Transition(path, kind, None, Op.CREATE, os.lstat(root / name))


def test_digests_regular_files_and_says_why_not_otherwise(tmp_path: Path) -> None:
    """A/C regular files get their SHA-256; a file over the limit, one replaced by a symlink
    out of the root, one removed since, and a D or a directory are told apart."""
    (tmp_path / "small").write_bytes(b"hello\n")
    (tmp_path / "big").write_bytes(b"x" * 2048)
    (tmp_path / "swapped").write_bytes(b"was a file")
    (tmp_path / "removed").write_bytes(b"soon gone")
    (tmp_path / "dir").mkdir()
    items: list[Item] = [
        _transition(tmp_path, "small"),
        _transition(tmp_path, "big", Kind.CHANGED),
        _transition(tmp_path, "swapped"),
        _transition(tmp_path, "removed"),
        _transition(tmp_path, "dir"),
        Transition(b"/deleted", Kind.DELETED, None, Op.WHITEOUT, None),
        Control("io.layerwatch.snapshot.begin", {}),
    ]
    (tmp_path / "swapped").unlink()
    (tmp_path / "swapped").symlink_to("/etc/hostname")  # O_NOFOLLOW: never read
    (tmp_path / "removed").unlink()
    out = Digester(os.fsencode(tmp_path), max_size=1024).digest(items)
    got = [item.content if isinstance(item, Transition) else item for item in out]
    assert got == [
        Content(hashlib.sha256(b"hello\n").hexdigest()),
        Content(None, "too_large"),
        Content(None, "gone"),
        Content(None, "gone"),
        None,
        None,
        items[-1],
    ]


def test_a_spent_budget_leaves_the_rest_of_the_batch_unhashed(tmp_path: Path) -> None:
    """Once a batch's hashing time is spent, its remaining files say ``budget``."""
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"%d" % i)
    items = [_transition(tmp_path, f"f{i}") for i in range(3)]
    out = Digester(os.fsencode(tmp_path), budget=0.0).digest(items)
    assert {item.content for item in out if isinstance(item, Transition)} == {
        Content(None, "budget")
    }


def test_a_metacopy_upper_file_is_not_hashed_from_the_upper(tmp_path: Path) -> None:
    """Read in an upper dir, a file marked metacopy holds no bytes of its own: not hashed."""
    (tmp_path / "meta").write_bytes(b"")
    os.setxattr(tmp_path / "meta", b"trusted.overlay.metacopy", b"")
    digester = Digester(os.fsencode(tmp_path), metacopy_xattr=b"trusted.overlay.metacopy")
    assert digester.content(b"/meta") == Content(None, "metacopy")


@requires_overlay
async def test_the_service_puts_sha256_on_events_of_a_hashing_mount(tmp_path: Path) -> None:
    """Through a real overlay and a jsonl sink: A/C files carry the digest of their bytes (the
    last write's), a file over hash_max_size says too_large, a dir and a D carry no digest, a
    mount without ``hash`` has no sha256 key at all; every event validates."""
    lower, rw, merged = tmp_path / "lower", tmp_path / "rw", tmp_path / "merged"
    build_layer(str(lower), [LayerEntry("file", b"etc/motd", b"hi\n")])
    plain_upper, plain_lower = tmp_path / "p-upper", tmp_path / "p-lower"
    plain_upper.mkdir()
    plain_lower.mkdir()
    out = tmp_path / "events.jsonl"
    config = parse(
        {
            "mounts": [
                {"name": "h", "mountpoint": str(merged), "hash": True, "hash_max_size": 1024},
                {"name": "p", "upper": str(plain_upper), "lowers": [str(plain_lower)]},
            ],
            "sinks": {"out": {"type": "jsonl", "path": str(out), "batch_size": 10}},
            "spool": {"path": str(tmp_path / "spool.db")},
        }
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(mount_overlay(str(rw), [str(lower)], merged=str(merged)))
        service = Service(config)
        task = asyncio.create_task(service.run(signals=False))
        try:
            async with asyncio.timeout(30):
                await service.started.wait()
            (merged / "new.txt").write_bytes(b"first")
            await service.sync()
            (merged / "new.txt").write_bytes(b"second")
            (merged / "etc" / "motd").write_bytes(b"changed\n")
            (merged / "big").write_bytes(b"x" * 4096)
            (merged / "d").mkdir()
            (merged / "etc" / "motd").unlink()
            (plain_upper / "q").write_bytes(b"not hashed")
            await service.sync()
        finally:
            service.stop.set()
            async with asyncio.timeout(30):
                await task
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    for event in events:
        jsonschema.validate(event["data"], schema_for(event["type"]))
    changes = [e["data"] for e in events if e["type"] == CHANGE]
    by_path: dict[str, list[dict[str, object]]] = {}
    for data in changes:
        by_path.setdefault(str(data["path"]), []).append(data)
    new = by_path["/new.txt"]
    assert new[0]["sha256"] == hashlib.sha256(b"first").hexdigest()
    assert new[-1]["sha256"] == hashlib.sha256(b"second").hexdigest()
    assert by_path["/big"][-1]["sha256"] is None
    assert by_path["/big"][-1]["sha256_skipped"] == "too_large"
    assert "sha256" not in by_path["/d"][-1]
    assert by_path["/etc/motd"][-1]["kind"] == "D"
    assert "sha256" not in by_path["/etc/motd"][-1]
    assert all("sha256" not in data for data in by_path["/q"])


def test_diff_hash_prints_each_files_digest(tmp_path: Path) -> None:
    """``layerwatch diff --hash`` on a branch: regular A/C files get their SHA-256 after the
    path (or why not), dirs and D none; ``--json`` has the same in sha256 keys."""
    import subprocess
    import sys

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    build_layer(
        str(lower), [LayerEntry("file", b"etc/motd", b"hi\n"), LayerEntry("file", b"gone", b"")]
    )
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_bytes(b"changed\n")
    (upper / "big").write_bytes(b"x" * (65 << 20))
    os.mknod(upper / "gone", 0o600 | stat.S_IFCHR, 0)  # a whiteout: D
    args = [sys.executable, "-m", "watcher.cli", "diff", "--upper", str(upper)]
    args += ["--lower", str(lower), "--hash"]
    out = subprocess.run(args, capture_output=True, check=True).stdout.decode()
    motd = hashlib.sha256(b"changed\n").hexdigest()
    assert out.splitlines() == [
        "A /big (too_large)",
        "C /etc",
        f"C /etc/motd {motd}",
        "D /gone",
    ]
    rows = orjson.loads(subprocess.run([*args, "--json"], capture_output=True, check=True).stdout)
    assert rows[2] == {"kind": "C", "path": "/etc/motd", "sha256": motd}
    assert "sha256" not in rows[1]


def test_diff_content_lists_what_docker_diff_cannot_see(tmp_path: Path) -> None:
    """A copied-up file with the lower file's size, mtime, mode and owner but other bytes is
    not in the list (as for Docker); ``--content`` adds it, marked, with its digest; a
    copy-up with the same bytes stays out."""
    import subprocess
    import sys

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    build_layer(
        str(lower),
        [LayerEntry("file", b"etc/conf", b"abc\n"), LayerEntry("file", b"etc/same", b"xyz\n")],
    )
    (upper / "etc").mkdir(parents=True)
    for name, data in (("conf", b"abd\n"), ("same", b"xyz\n")):
        target = upper / "etc" / name
        target.write_bytes(data)
        st = os.stat(lower / "etc" / name)
        os.chmod(target, st.st_mode & 0o7777)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(upper / "etc", ns=(os.stat(lower / "etc").st_mtime_ns,) * 2)
    args = [sys.executable, "-m", "watcher.cli", "diff", "--upper", str(upper)]
    args += ["--lower", str(lower)]
    assert subprocess.run(args, capture_output=True, check=True).stdout == b""
    out = subprocess.run([*args, "--content"], capture_output=True, check=True).stdout.decode()
    digest = hashlib.sha256(b"abd\n").hexdigest()
    assert out == f"C /etc/conf {digest} (content)\n"
    rows = orjson.loads(subprocess.run([*args, "--content", "--json"], capture_output=True).stdout)
    assert rows == [
        {
            "kind": "C",
            "path": "/etc/conf",
            "sha256": digest,
            "by": "content",
        }
    ]
