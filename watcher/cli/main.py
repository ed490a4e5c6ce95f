"""The ``layerwatch`` command; the only place that turns errors into exit codes.

The parser of every command is defined here, and only here (``completion`` and ``man`` are
generated from it); each command imports the modules it runs only when it runs, so that
``layerwatch diff`` loads neither asyncio, the service nor the HTTP layer.

Exit status: 0 success; 1 an error (one ``layerwatch: error:`` line on stderr), or ``diff
--exit-code`` found changes; 2 a usage error, a container, image or layer name that is unknown
or ambiguous, any error of ``diff --exit-code``, or ``status`` of a degraded service; 141
stdout closed (``| head``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from watcher.core.errors import LayerwatchError, LookupFailed
from watcher.core.layers import Whiteouts

if TYPE_CHECKING:
    from watcher.core.mounts import Filesystem
    from watcher.service.config import Config
    from watcher.service.service import Service

__all__ = ["build_parser", "main", "service_for"]

DEFAULT_SOCKET = "/run/layerwatch/api.sock"
"""The API socket remote commands use by default (``watcher.service.config.DEFAULT_SOCKET``;
a test holds the two equal: the parser does not import the config module)."""

DRIVERS = ("overlay", "aufs", "fuse-overlayfs")
"""``watcher.core.mounts.Driver``'s values, for ``mount --driver`` (a test holds them equal)."""


def _filesystem(args: argparse.Namespace) -> Filesystem:
    from watcher.cli.target import filesystem

    return filesystem(args)


def _cmd_diff(args: argparse.Namespace) -> int:
    from watcher.cli import diff

    return diff.run(args)


def _cmd_watch(args: argparse.Namespace) -> int:
    import asyncio

    from watcher.cli import logconfig as log
    from watcher.service.signals import install_stop_signals
    from watcher.service.watch import StreamOutlet, watch

    fs = _filesystem(args)
    log.configure(level=args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        undo = install_stop_signals(stop)
        try:
            await watch(
                fs,
                StreamOutlet(sys.stdout.buffer),
                stop,
                name=args.name,
                source=args.source,
                attribution=args.attribution,
            )
        finally:
            undo()

    asyncio.run(main())
    return 0


def service_for(cfg: Config) -> Service:
    """The service ``layerwatch run`` runs: the service, and beside it the API when the
    config has an ``[api]`` table (the composition: the service knows nothing of HTTP)."""
    from watcher.service.service import Service

    if cfg.api is None:
        return Service(cfg)
    import functools

    from watcher.http.api import serve  # aiohttp's server only when an API is configured

    return Service(cfg, components={"api": functools.partial(serve, config=cfg.api)})


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from watcher.cli import logconfig as log
    from watcher.service import config

    cfg = config.load(args.config)
    log.configure(level=cfg.log_level, redact=cfg.secrets.redact)
    try:
        asyncio.run(service_for(cfg).run())
    except LayerwatchError as exc:  # printed by main(): without the config's secrets
        raise LayerwatchError(cfg.secrets.redact(str(exc))) from None
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from watcher.cli import logconfig as log
    from watcher.cli.demo import run_demo

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
    from watcher.core.mounts import Driver, Filesystem

    driver = Driver(args.driver)
    return Filesystem(args.layer, args.rw, args.mountpoint, work=args.work, driver=driver)


def _cmd_mount(args: argparse.Namespace) -> int:
    _managed(args).mount()
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    from watcher.core.mounts import Filesystem

    Filesystem([], os.devnull, args.mountpoint).umount()
    return 0


def _cmd_reset(args: argparse.Namespace) -> int:
    _managed(args).reset()
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from watcher.cli import check

    return check.run(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from watcher.cli import remote

    return remote.status(args)


def _cmd_tail(args: argparse.Namespace) -> int:
    from watcher.cli import remote

    return remote.tail(args)


def _cmd_completion(args: argparse.Namespace) -> int:
    from watcher.cli import completion

    sys.stdout.write(completion.script(build_parser(), args.shell))
    return 0


def _cmd_man(args: argparse.Namespace) -> int:
    from watcher.cli import manpage

    sys.stdout.write(manpage.render(build_parser()))
    return 0


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from watcher.core.version import installed_version

        sys.stdout.write(f"layerwatch {installed_version()}\n")
        parser.exit()


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
    parser.add_argument("--driver", choices=DRIVERS, default=DRIVERS[0], help="default: overlay")


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    """``--server URL|SOCKET`` and ``--token-file PATH`` (the token never on the command line:
    ``ps`` shows that; ``$LAYERWATCH_TOKEN`` is the other way)."""
    parser.add_argument(
        "--server",
        metavar="URL|SOCKET",
        help=f"the service's API: http://HOST:PORT or a unix socket (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding the API token (TCP); default: $LAYERWATCH_TOKEN",
    )


def _add_diff_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mountpoint",
        nargs="?",
        metavar="MOUNTPOINT|CONTAINER",
        help="an overlay mount (layers from mountinfo), or a Docker or containerd container "
        "(name, id or unique id prefix; one without a '/' that is not a path here); with "
        "--server, a mount's name",
    )
    _add_layer_args(parser)
    parser.add_argument(
        "--image",
        metavar="NAME[:TAG]",
        help="what one layer of a Docker image adds, changes and deletes (see --layer)",
    )
    parser.add_argument(
        "--layer",
        metavar="N|ID",
        help="with --image: the layer's index (0 the base, -1 the top: the default) or diff id",
    )
    parser.add_argument(
        "--docker-root",
        default="/var/lib/docker",
        metavar="DIR",
        help="Docker's data root (default: /var/lib/docker)",
    )
    parser.add_argument(
        "--containerd-state",
        default="/run/containerd",
        metavar="DIR",
        help="containerd's state directory (default: /run/containerd)",
    )
    _add_server_args(parser)
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="a JSON array of changes")
    out.add_argument(
        "--format",
        metavar="TEMPLATE",
        help="one line per change from a template: {{.Kind}}, {{.Path}}, {{json .Path}}, "
        "{{json .}}; \\t is a tab",
    )
    parser.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when there are changes, 0 when none, 2 on an error (like git diff)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out paths matching GLOB and all below them ('**' spans directories; "
        "'/x' is anchored at the root, 'x' matches at any depth); repeat for several",
    )
    parser.add_argument(
        "--hash",
        action="store_true",
        help="the SHA-256 of each added or changed regular file after its path (read through "
        "the mount, or in the upper dir); '(too_large)' over 64 MiB",
    )
    parser.add_argument(
        "--content",
        action="store_true",
        help="with the digests of --hash, also list files whose bytes differ from the lower "
        "layer's though their metadata does not: what docker diff misses, marked '(content)'",
    )
    parser.add_argument(
        "--since",
        metavar="SEQ|EPOCH:SEQ",
        help="with --server: the paths changed after that position and what they are now "
        "('-': as in the image again)",
    )


def _add_layer_args(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="layerwatch",
        description="Know what changed in a union filesystem, the instant it happens.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
        "diff": ("print the change list (what `docker diff` prints)", _cmd_diff),
        "watch": ("follow one mount: snapshot, then live events as JSON lines", _cmd_watch),
        "export": ("write the change list as a layer tar, or the merged root", _cmd_export),
        "run": ("run the service from a TOML config", _cmd_run),
        "check": (
            "check a config and this machine: kernel, privileges, layers, spool, sinks, limits",
            _cmd_check,
        ),
        "status": ("health and mounts of a running service", _cmd_status),
        "tail": ("follow a running service's events as JSON lines", _cmd_tail),
        "demo": ("mount a sample overlay, change it, show the events", _cmd_demo),
        "mount": ("mount a union filesystem", _cmd_mount),
        "umount": ("unmount a union filesystem (retries while busy)", _cmd_umount),
        "reset": ("empty the writable branch of a union", _cmd_reset),
        "completion": ("print a bash or zsh completion script for layerwatch", _cmd_completion),
        "man": ("print the layerwatch(1) manual page (roff)", _cmd_man),
    }
    parsers = {}
    for name, (help_, func) in commands.items():
        parsers[name] = sub.add_parser(name, help=help_, description=help_)
        parsers[name].set_defaults(func=func)
    _add_diff_args(parsers["diff"])
    parsers["export"].add_argument(
        "mountpoint", nargs="?", help="an overlay mount (layers from mountinfo)"
    )
    _add_layer_args(parsers["export"])
    what = parsers["export"].add_mutually_exclusive_group()
    what.add_argument("--diff", action="store_true", help="an OCI layer tar (default)")
    what.add_argument("--rootfs", action="store_true", help="the merged root (needs a mountpoint)")
    parsers["export"].add_argument("-o", "--output", default="-", help="file (default: stdout)")
    parsers["run"].add_argument("config", help="the TOML configuration file")
    parsers["check"].add_argument("config", help="the TOML configuration file")
    parsers["check"].add_argument("--json", action="store_true", help="findings as a JSON array")
    parsers["watch"].add_argument(
        "mountpoint", nargs="?", help="an overlay mount (layers from mountinfo)"
    )
    _add_layer_args(parsers["watch"])
    parsers["watch"].add_argument("--name", default="default", help="the mount's name in events")
    for name in ("status", "tail"):
        _add_server_args(parsers[name])
    parsers["tail"].add_argument(
        "--since", type=int, metavar="SEQ", help="replay from after SEQ (default: live only)"
    )
    parsers["tail"].add_argument("--mount", metavar="NAME", help="only this mount's events")
    parsers["tail"].add_argument("--count", type=int, metavar="N", help="stop after N events")
    parsers["watch"].add_argument(
        "--source",
        default="auto",
        choices=["auto", "inotify", "fanotify"],
        help="the kernel event source (auto: fanotify where permitted, else inotify)",
    )
    parsers["watch"].add_argument(
        "--attribution",
        action="store_true",
        help="change events name the process that made them (data.process; needs fanotify)",
    )
    parsers["demo"].add_argument("--pause", type=float, default=0.3, help="seconds between steps")
    for name in ("watch", "demo"):
        parsers[name].add_argument(
            "--log-level", default="info", choices=["debug", "info", "warning", "error"]
        )
    _add_managed_args(parsers["mount"])
    _add_managed_args(parsers["reset"])
    parsers["umount"].add_argument("mountpoint")
    parsers["completion"].add_argument("shell", choices=["bash", "zsh"], help="the shell")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    trouble = 2 if getattr(args, "exit_code", False) else 1
    try:
        status: int = args.func(args)
    except LookupFailed as exc:
        print(f"layerwatch: error: {exc}", file=sys.stderr)
        return 2
    except LayerwatchError as exc:
        print(f"layerwatch: error: {exc}", file=sys.stderr)
        return trouble
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        name = os.fsdecode(exc.filename) if exc.filename is not None else "?"
        print(f"layerwatch: error: {exc.strerror}: {name}", file=sys.stderr)
        return trouble
    except BrokenPipeError:
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
