"""``layerwatch diff``: print a change list, the way ``docker diff`` prints it.

Of a mountpoint, of ``--upper``/``--lower`` directories, of a container (Docker or
containerd, running or stopped), of one image layer (``--image``), or of a running service's
mount (``--server``). The output is ``K /path`` lines sorted by path bytes, ``--json`` or a
``--format`` template; with ``--exit-code`` the status says whether anything changed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Collection, Mapping, Sequence

from watcher.cli import target
from watcher.cli.lineformat import LineFormat, change_line, escape_path
from watcher.core.errors import LayerwatchError
from watcher.core.excludes import Excludes
from watcher.core.model import Change, Content, Kind
from watcher.core.mounts import Filesystem

__all__ = ["run"]


def _changes(args: argparse.Namespace) -> tuple[list[Change], Filesystem | None]:
    """The list ``args`` point at, and the filesystem it was computed from (None: a
    service's)."""
    if args.image is not None:
        if args.mountpoint is not None or args.upper or args.lower or args.server:
            raise LayerwatchError("--image takes no MOUNTPOINT, --upper, --lower or --server")
        layer = "-1" if args.layer is None else args.layer
        fs = target.image_layer(args.image, layer, docker_root=args.docker_root)
        return fs.changes(_excludes(args)), fs
    if args.layer is not None:
        raise LayerwatchError("--layer needs --image")
    if args.server is not None:
        from watcher.cli import remote

        if args.exclude:
            raise LayerwatchError("--exclude is the service's own with --server (its config)")
        return remote.diff(args), None
    if args.mountpoint is not None and target.is_container_ref(args.mountpoint):
        if args.lower or args.upper:
            raise LayerwatchError("give either a container or --lower/--upper, not both")
        fs = target.container(
            args.mountpoint, docker_root=args.docker_root, containerd_state=args.containerd_state
        )
        return fs.changes(_excludes(args)), fs
    fs = target.filesystem(args)
    return fs.changes(_excludes(args)), fs


def _excludes(args: argparse.Namespace) -> Excludes | None:
    return Excludes(args.exclude, where="--exclude") if args.exclude else None


def _digests(changes: Sequence[Change], fs: Filesystem) -> dict[bytes, Content]:
    """``--hash``: the content of every A/C regular file of the list."""
    from watcher.core.digest import Digester

    digester = Digester.of(fs, budget=math.inf)
    out = {}
    for change in changes:
        if change.kind is not Kind.DELETED:
            content = digester.content(change.path)
            if content.skipped != "gone":  # not a regular file (a dir, a symlink...)
                out[change.path] = content
    return out


def _write(
    changes: Sequence[Change],
    args: argparse.Namespace,
    line: LineFormat | None,
    digests: Mapping[bytes, Content],
    by_content: Collection[bytes] = (),
) -> None:
    out = sys.stdout.buffer
    if args.json:
        import orjson

        from watcher.delivery.events import path_fields

        rows: list[dict[str, str | None]] = [
            {"kind": str(c.kind), **path_fields(c.path)} for c in changes
        ]
        if args.hash or args.content:
            for row, change in zip(rows, changes, strict=True):
                content = digests.get(change.path)
                if content is not None:
                    row["sha256"] = content.sha256
                    if content.skipped is not None:
                        row["sha256_skipped"] = content.skipped
                if change.path in by_content:
                    row["by"] = "content"
        out.write(orjson.dumps(rows) + b"\n")
    elif line is not None:
        out.write("".join(line.render(c) for c in changes).encode())
    elif not digests:
        out.write(b"".join([change_line(c) for c in changes]))
    else:
        lines = []
        for c in changes:
            content = digests.get(c.path)
            tail = "" if content is None else f" {content.sha256 or f'({content.skipped})'}"
            if c.path in by_content:
                tail += " (content)"
            lines.append(f"{c.kind} {escape_path(c.path)}{tail}\n")
        out.write("".join(lines).encode())
    out.flush()


def _since(args: argparse.Namespace) -> int:
    """``--since N --server S``: each path changed after N once, its kind now or ``-`` when
    it is as in the image again; ``--json`` prints the API's whole answer (with ``seq``, the
    position to ask from next time)."""
    if args.server is None:
        raise LayerwatchError("--since needs --server (the positions are the service's)")
    if args.format is not None or args.image is not None:
        raise LayerwatchError("--since takes no --format or --image")
    from watcher.cli import remote

    answer = remote.diff_since(args)
    out = sys.stdout.buffer
    if args.json:
        import orjson

        out.write(orjson.dumps(answer) + b"\n")
    else:
        from watcher.http.client import row_path

        lines = [f"{r['kind'] or '-'} {escape_path(row_path(r))}\n" for r in answer["changes"]]
        out.write("".join(lines).encode())
        if answer["resync"]:
            print(
                f"layerwatch: a resync came after {answer['since']}: this is the whole list",
                file=sys.stderr,
            )
    out.flush()
    return 1 if args.exit_code and answer["changes"] else 0


def run(args: argparse.Namespace) -> int:
    """Print the change list ``args`` point at.

    Returns:
        0; with ``--exit-code``, 1 when the list is not empty.

    Raises:
        LayerwatchError: conflicting options or a bad ``--format``; and whatever finding the
            target raises (``LookupFailed``, ``LayerError``, ``MountError``).
    """
    if args.json and args.format is not None:
        raise LayerwatchError("give --json or --format, not both")
    if args.since is not None:
        return _since(args)
    line = LineFormat(args.format) if args.format is not None else None
    if (args.hash or args.content) and args.format is not None:
        raise LayerwatchError("--hash prints with the default lines or --json, not --format")
    changes, fs = _changes(args)
    hashing = args.hash or args.content
    if hashing and fs is None:
        raise LayerwatchError("--hash reads the files: it needs the mount here, not --server")
    digests = _digests(changes, fs) if hashing and fs is not None else {}
    by_content: dict[bytes, Content] = {}
    if args.content and fs is not None:
        from watcher.core.digest import content_changes

        listed = {c.path for c in changes}
        by_content = dict(content_changes(fs, listed))
        extra = [Change(path, Kind.CHANGED) for path in by_content]
        changes = sorted([*changes, *extra], key=lambda c: c.path)
        digests = {**digests, **by_content}
    _write(changes, args, line, digests, by_content)
    return 1 if args.exit_code and changes else 0
