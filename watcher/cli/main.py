"""The ``layerwatch`` command; the only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence

import orjson

from watcher.cli import logconfig as log
from watcher.cli import remote
from watcher.cli.check import add_check_command
from watcher.cli.demo import run_demo
from watcher.core.errors import LayerwatchError
from watcher.core.layers import Whiteouts
from watcher.core.model import Change, Kind
from watcher.core.mounts import Driver, Filesystem
from watcher.delivery.events import path_fields
from watcher.service import config
from watcher.service.service import Service
from watcher.service.signals import install_stop_signals
from watcher.service.watch import StreamOutlet, watch

__all__ = ["escape_path", "main", "service_for"]

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]}


def escape_path(path: bytes) -> str:
    """A path as one printable line: backslash, control characters and invalid UTF-8 escaped."""
    text = path.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL)


_NEEDS_ESCAPE = re.compile(rb"[\x00-\x1f\x7f-\xff\\]")
"""A byte ``escape_path`` would change: a path without one is printed as it is."""


def _line(kind: Kind, path: bytes) -> bytes:
    if _NEEDS_ESCAPE.search(path) is None:
        return b"%s %s\n" % (kind.value.encode(), path)
    return f"{kind} {escape_path(path)}\n".encode()


def _write_changes(changes: Sequence[Change], as_json: bool) -> None:
    out = sys.stdout.buffer
    if as_json:
        rows = [{"kind": str(c.kind), **path_fields(c.path)} for c in changes]
        out.write(orjson.dumps(rows) + b"\n")
    else:
        out.write(b"".join([_line(kind, path) for path, kind in changes]))
    out.flush()


def _filesystem(args: argparse.Namespace) -> Filesystem:
    if args.mountpoint is not None:
        if args.lower or args.upper:
            raise LayerwatchError("give either a MOUNTPOINT or --lower/--upper, not both")
        return Filesystem.attach(args.mountpoint)
    if not args.lower or args.upper is None:
        raise LayerwatchError("give a MOUNTPOINT, or --upper DIR and at least one --lower DIR")
    driver = Driver.AUFS if args.whiteouts == Whiteouts.AUFS else Driver.OVERLAY
    return Filesystem(args.lower, args.upper, os.devnull, driver=driver)


def _cmd_diff(args: argparse.Namespace) -> int:
    if args.server is not None:
        _write_changes(remote.diff(args), args.json)
        return 0
    _write_changes(_filesystem(args).changes(), args.json)
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    fs = _filesystem(args)
    log.configure(level=args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        undo = install_stop_signals(stop)
        try:
            await watch(fs, StreamOutlet(sys.stdout.buffer), stop, name=args.name)
        finally:
            undo()

    asyncio.run(main())
    return 0


def service_for(cfg: config.Config) -> Service:
    """The service ``layerwatch run`` runs: the service, and beside it the API when the
    config has an ``[api]`` table (the composition: the service knows nothing of HTTP)."""
    if cfg.api is None:
        return Service(cfg)
    from watcher.http.api import serve  # aiohttp's server only when an API is configured

    return Service(cfg, components={"api": functools.partial(serve, config=cfg.api)})


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    log.configure(level=cfg.log_level)
    asyncio.run(service_for(cfg).run())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    log.configure(level=args.log_level)
    return asyncio.run(run_demo(pause=args.pause))


def _cmd_export(args: argparse.Namespace) -> int:
    fs = _filesystem(args)
    write = fs.tar if args.rootfs else fs.export_diff
    if args.output == "-":
        count = write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        # Into a temporary file beside the output, renamed over it only when complete: a
        # failed export never truncates what was there.
        tmp = f"{args.output}.partial-{os.getpid()}"
        try:
            with open(tmp, "wb") as out:
                count = write(out)
            os.replace(tmp, args.output)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    print(f"layerwatch: wrote {count} entries", file=sys.stderr)
    return 0


def _managed(args: argparse.Namespace) -> Filesystem:
    driver = Driver(args.driver)
    return Filesystem(args.layer, args.rw, args.mountpoint, work=args.work, driver=driver)


def _cmd_mount(args: argparse.Namespace) -> int:
    _managed(args).mount()
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    Filesystem([], os.devnull, args.mountpoint).umount()
    return 0


def _cmd_reset(args: argparse.Namespace) -> int:
    _managed(args).reset()
    return 0


def _add_view_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", nargs="?", help="an overlay mount (layers from mountinfo)")
    parser.add_argument(
        "--lower",
        action="append",
        default=[],
        metavar="DIR",
        help="a lower layer; repeat, top first, base last",
    )
    parser.add_argument("--upper", metavar="DIR", help="the writable branch")
    parser.add_argument(
        "--whiteouts",
        choices=[w.value for w in Whiteouts],
        default=Whiteouts.OVERLAY.value,
        help="how the branches mark deletions (default: overlay)",
    )


def _add_managed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", help="where the union is mounted")
    parser.add_argument(
        "--layer",
        action="append",
        required=True,
        metavar="DIR",
        help="a read-only layer; repeat, top first, base last",
    )
    parser.add_argument("--rw", required=True, metavar="DIR", help="the writable branch")
    parser.add_argument("--work", metavar="DIR", help="overlay work dir (default: RW.work)")
    parser.add_argument("--driver", choices=[d.value for d in Driver], default=Driver.OVERLAY.value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="layerwatch",
        description="Know what changed in a union filesystem, the instant it happens.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_check_command(sub)
    commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
        "diff": ("print the change list (what `docker diff` prints)", _cmd_diff),
        "watch": ("follow one mount: snapshot, then live events as JSON lines", _cmd_watch),
        "export": ("write the change list as a layer tar, or the merged root", _cmd_export),
        "run": ("run the service from a TOML config", _cmd_run),
        "demo": ("mount a sample overlay, change it, show the events", _cmd_demo),
        "mount": ("mount a union filesystem", _cmd_mount),
        "umount": ("unmount a union filesystem (retries while busy)", _cmd_umount),
        "reset": ("empty the writable branch of a union", _cmd_reset),
    }
    parsers = {}
    for name, (help_, func) in commands.items():
        parsers[name] = sub.add_parser(name, help=help_, description=help_)
        parsers[name].set_defaults(func=func)
    remote.add_remote_commands(sub)
    _add_view_args(parsers["diff"])
    remote.add_server_arguments(parsers["diff"])
    parsers["diff"].add_argument("--json", action="store_true", help="a JSON array of changes")
    _add_view_args(parsers["export"])
    what = parsers["export"].add_mutually_exclusive_group()
    what.add_argument("--diff", action="store_true", help="an OCI layer tar (default)")
    what.add_argument("--rootfs", action="store_true", help="the merged root (needs a mountpoint)")
    parsers["export"].add_argument("-o", "--output", default="-", help="file (default: stdout)")
    parsers["run"].add_argument("config", help="the TOML configuration file")
    _add_view_args(parsers["watch"])
    parsers["watch"].add_argument("--name", default="default", help="the mount's name in events")
    parsers["demo"].add_argument("--pause", type=float, default=0.3, help="seconds between steps")
    for name in ("watch", "demo"):
        parsers[name].add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )
    _add_managed_args(parsers["mount"])
    _add_managed_args(parsers["reset"])
    parsers["umount"].add_argument("mountpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except LayerwatchError as exc:
        print(f"layerwatch: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        name = os.fsdecode(exc.filename) if exc.filename is not None else "?"
        print(f"layerwatch: error: {exc.strerror}: {name}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
