"""What the deployment tests need: private Docker daemons, a simulated node, and the images.

- ``dockerd(top)``: a private ``dockerd`` (its own data root, exec root, socket, pidfile and
  cgroup parent; ``--bridge=none``, no iptables, no registry mirror, and a dead loopback proxy
  so that an accidental pull fails at once instead of reaching a registry). On exit every
  container is removed, the daemon stopped, and what it left (processes naming its
  directory, mounts under it, its cgroups) is removed; the test fails if a network device
  appeared.
- ``Node``: a mount namespace that looks like a Kubernetes node's: ``/run`` and ``/var/lib``
  are fresh, ``/var/lib/docker``, ``/var/lib/containerd``, ``/var/lib/kubelet``,
  ``/var/lib/layerwatch`` and ``/run/containerd`` exist at the node's own paths (backed by
  directories under the test's directory), and ``/`` is shared inside it, so the runtime's
  mounts propagate into a container's ``rslave`` binds exactly as on a node. Nothing mounted
  in it reaches the host.
- ``ensure_images()``: the images, built by ``deploy/Containerfile`` (and a nats-server image
  from Debian's package) with a private dockerd from a Debian base made by ``mmdebstrap``
  (no registry), saved as tars in ``CACHE`` under a hash of everything that goes into them.
  Python packages come from PyPI through the host's ``pip download`` (the host's pip
  configuration), served to the build on a loopback port; Debian packages from the Debian
  mirror through apt inside the build. ``python3 tests/deploykit.py`` builds them (the CI
  step before pytest) and prints the time and sizes.

The cache directory (``LAYERWATCH_CI_CACHE``, default ``/var/cache/layerwatch-ci``) persists
between runs on a machine; on a fresh machine everything is built (about 3 minutes here).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CACHE = Path(os.environ.get("LAYERWATCH_CI_CACHE", "/var/cache/layerwatch-ci"))

SUITE = "bookworm"
SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# debian:bookworm-slim's recipe: minbase, merged /usr, no docs, man pages or translations.
MMDEBSTRAP = (
    "--variant=minbase",
    "--mode=root",
    "--format=tar",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
)
BASE_TAG = "layerwatch-ci/debian:bookworm"
IMAGE_TAG = "layerwatch:0.1.0"  # the name deploy/kubernetes/daemonset.yaml runs
NATS_TAG = "layerwatch-ci/nats-server:debian"
PLUGINS = "nats"
NATS_CONTAINERFILE = f"""\
FROM {BASE_TAG}
RUN apt-get update && apt-get install -y --no-install-recommends nats-server \\
    && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/usr/sbin/nats-server"]
"""
SYSTEMD_TAG = "layerwatch-ci/systemd-host:bookworm"
# A Debian 12 host with systemd as PID 1 and layerwatch installed as docs/operations.md says
# (the venv at /opt/layerwatch is the image's, made by the same pip commands), plus Debian's
# nats-server for the example config's NATS sink.
SYSTEMD_CONTAINERFILE = f"""\
FROM {IMAGE_TAG}
RUN apt-get update && apt-get install -y --no-install-recommends systemd nats-server \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN ln -s /opt/layerwatch/bin/layerwatch /usr/local/bin/layerwatch
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/lib/systemd/systemd"]
CMD []
"""
# Everything the Containerfile copies (after .dockerignore), for the cache key.
IMAGE_INPUTS = (
    "deploy/Containerfile",
    ".dockerignore",
    "pyproject.toml",
    "setup.py",
    "README.md",
    "deploy/layerwatch.toml",
    "watcher",
    "plugins",
)
_IGNORED_PARTS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "tests"}


class DockerError(AssertionError):
    """A docker CLI command failed (an AssertionError: a test that meets it fails)."""


def docker_client() -> str | None:
    """Debian's docker CLI (the daemon's version) when installed, else any ``docker``."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")


def missing_tools() -> list[str]:
    """The commands these tests need that are not installed (Debian packages in brackets)."""
    needed = {
        "dockerd": "docker.io",
        "unshare": "util-linux",
        "nsenter": "util-linux",
        "busybox": "busybox-static",
        "mmdebstrap": "mmdebstrap",
    }
    missing = [f"{tool} ({pkg})" for tool, pkg in needed.items() if shutil.which(tool) is None]
    if docker_client() is None:
        missing.append("docker (docker.io)")
    return missing


@dataclass
class Dockerd:
    """A running private dockerd and how to talk to it."""

    client: str
    env: dict[str, str]
    top: Path
    proc: subprocess.Popen[bytes]

    def call(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a docker CLI command against this daemon; its result, whatever the status."""
        return subprocess.run(
            [self.client, *args],
            env=self.env,
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def docker(self, *args: str, input: bytes | None = None, timeout: float = 120) -> str:
        """Run a docker CLI command; its stdout, or DockerError with its stderr."""
        proc = self.call(*args, input=input, timeout=timeout)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise DockerError(f"docker {' '.join(args)}: {err[-3000:]}")
        return proc.stdout.decode(errors="replace")

    def log_tail(self, size: int = 3000) -> str:
        """The end of the daemon's log."""
        return (self.top / "dockerd.log").read_text(errors="replace")[-size:]


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _processes_naming(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text`` (not this one)."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def _mounts_under(top: Path) -> list[str]:
    """Mountpoints under ``top`` in this process's mount table, deepest first."""
    prefix = str(top) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == str(top):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove_cgroups(parent: str) -> None:
    """Remove the (empty, once the containers are gone) cgroups under ``/parent``."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / parent
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (dockerd stops its containerd and unmounts), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def dockerd(
    top: Path, *, data_root: str | None = None, mount_ns: int | None = None
) -> Iterator[Dockerd]:
    """A private dockerd under ``top`` (a short path: sockets live there), cleaned up after.

    Args:
        top: its directory (socket, exec root, log; data root unless ``data_root``).
        data_root: the data root as the daemon sees it (``/var/lib/docker`` in a ``Node``).
        mount_ns: run it in the mount namespace of this pid (a ``Node``'s).

    Raises:
        DockerError: it did not start within 60 s (with the end of its log).
    """
    client = docker_client()
    assert client is not None, "docker CLI not installed"
    top.mkdir(parents=True, exist_ok=True)
    (top / "daemon.json").write_text("{}")  # not the host's /etc/docker/daemon.json
    name = f"lwci-{top.name}"
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(top)}
    env.update(DOCKER_HOST=f"unix://{top}/sock", DOCKER_CONFIG=str(top / "cli"))
    env.update(DOCKER_BUILDKIT="0")  # the classic builder: BuildKit is not in Debian's CLI
    daemon_env = dict(env)
    # No registry: a pull (which nothing here asks for) meets a closed loopback port.
    daemon_env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    argv = [
        "dockerd",
        f"--config-file={top}/daemon.json",
        f"--data-root={data_root or top / 'data'}",
        f"--exec-root={top}/exec",
        f"--pidfile={top}/pid",
        f"--host=unix://{top}/sock",
        f"--cgroup-parent=/{name}",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--storage-driver=overlay2",
    ]
    if mount_ns is not None:
        argv = ["nsenter", f"--mount=/proc/{mount_ns}/ns/mnt", "--", *argv]
    links = _links()
    log = (top / "dockerd.log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=daemon_env)
    daemon = Dockerd(client, env, top, proc)
    try:
        deadline = time.monotonic() + 60
        while daemon.call("version", timeout=10).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DockerError(f"dockerd did not start: {daemon.log_tail()}")
            time.sleep(0.2)
        yield daemon
    finally:
        with contextlib.suppress(DockerError, subprocess.TimeoutExpired):
            ids = daemon.docker("ps", "-aq", timeout=30).split()
            if ids:
                daemon.docker("rm", "-f", *ids, timeout=60)
        _stop(proc)
        log.close()
        for pid in _processes_naming(str(top)):  # shims or a containerd that outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        roots = [top] if data_root is None or mount_ns is not None else [top, Path(data_root)]
        for point in [p for root in roots for p in _mounts_under(root)]:
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        _remove_cgroups(name)
        shutil.rmtree(top, ignore_errors=True)
        assert _links() <= links, f"network devices left: {_links() - links}"


@dataclass
class Node:
    """A mount namespace laid out like a Kubernetes node's (see the module docstring).

    Attributes:
        pid: a process that holds the namespace (``nsenter --mount=/proc/PID/ns/mnt``).
        top: the host directory that backs the node's paths.
    """

    pid: int
    top: Path

    def host_path(self, path: str) -> Path:
        """Where the host sees what the node has at ``path`` (under one of ``NODE_PATHS``)."""
        for base in NODE_PATHS:
            if path == base or path.startswith(base + "/"):
                return _backing(self.top, base) / path[len(base) :].lstrip("/")
        raise ValueError(f"{path} is not under a node directory backed by the host")

    def run(self, *argv: str) -> str:
        """Run a command in the namespace; its stdout (AssertionError if it fails)."""
        proc = subprocess.run(
            ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--", *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
        return proc.stdout


NODE_PATHS = (
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/lib/layerwatch",
    "/run/containerd",
)
"""The node's directories, each backed by a directory under ``Node.top`` (the host sees the
files, not the mounts made in the namespace)."""


def _backing(top: Path, node_path: str) -> Path:
    return top / node_path.strip("/").replace("/", "-")


@contextlib.contextmanager
def node(top: Path) -> Iterator[Node]:
    """A node's mount namespace (private from the host), ended with its processes after."""
    top.mkdir(parents=True, exist_ok=True)
    script = ["set -e", "mount --make-rprivate /"]
    script += [f"mount -t tmpfs -o mode=0755 node-{d} /{d}" for d in ("run", "var/lib")]
    script.append("mount --make-rshared /")
    for path in NODE_PATHS:
        backing = _backing(top, path)
        backing.mkdir()
        script += [f"mkdir -p {path}", f"mount --bind {backing} {path}"]
    script.append("echo ready")
    script.append("exec sleep 100000")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        first = holder.stdout.readline()
        assert first == b"ready\n", f"node namespace: {first!r} {holder.stdout.read()!r}"
        yield Node(holder.pid, top)
    finally:
        ns = os.readlink(f"/proc/{holder.pid}/ns/mnt") if holder.poll() is None else None
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
        if ns is not None:
            for entry in os.listdir("/proc"):
                with contextlib.suppress(OSError):
                    if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                        os.kill(int(entry), signal.SIGKILL)  # left in the node: ours
        shutil.rmtree(top, ignore_errors=True)


NATS_READER = """
import asyncio, json, sys
import nats

async def main():
    nc = await nats.connect(servers=[sys.argv[1]], connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        try:
            info = await js.stream_info(sys.argv[2])
        except nats.js.errors.NotFoundError:
            return
        if not info.state.messages:
            return
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(sys.argv[2], seq)
            headers = msg.headers or {}
            row = {"subject": msg.subject, "msg_id": headers.get("Nats-Msg-Id"),
                   "event": json.loads(msg.data)}
            print(json.dumps(row))
    finally:
        await nc.close()

asyncio.run(main())
"""


def read_stream(netns_pid: int, url: str, stream: str = "LAYERWATCH") -> list[dict[str, Any]]:
    """Every message of a JetStream stream (subject, msg_id, event), read from inside the
    network namespace of ``netns_pid`` (a container's: only its loopback is used)."""
    proc = subprocess.run(
        ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--",
         sys.executable, "-c", NATS_READER, url, stream],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"reading {stream} at {url}: {proc.stderr[-2000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines()]


def container_pid(daemon: Dockerd, name: str) -> int:
    """The host pid of a running container's first process."""
    return int(daemon.docker("inspect", "-f", "{{.State.Pid}}", name).strip())


def workload_image(daemon: Dockerd, tag: str, lower: dict[str, Any]) -> None:
    """Import ``tag``: static busybox with its applets, and ``lower`` (a cases.json lower
    tree) at /data: what the conformance cases run in."""
    from overlay import build_lower  # tests/ is on sys.path (pytest, or the script dir)

    busybox = shutil.which("busybox")
    assert busybox is not None
    with tempfile.TemporaryDirectory(prefix="lw-img-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        for tool in ("sh", "echo", "rm", "mkdir", "chmod", "mv", "ln", "touch", "true",
                     "sleep", "cat", "ls", "hostname"):  # fmt: skip
            (root / "bin" / tool).symlink_to("busybox")
        for name in ("tmp", "etc", "proc", "sys", "dev"):
            (root / name).mkdir()
        build_lower(str(root), lower)
        proc = subprocess.run(
            ["tar", "-C", str(root), "-c", "."], capture_output=True, check=True, timeout=60
        )
    daemon.docker("import", "-", tag, input=proc.stdout, timeout=120)


# -- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """The saved images (``docker load -i``) and what building them cost."""

    layerwatch: Path
    nats: Path
    systemd: Path
    info: dict[str, Any]

    def load(self, daemon: Dockerd, *, systemd: bool = False) -> None:
        """Load the images into ``daemon`` (``IMAGE_TAG``, ``NATS_TAG``; ``SYSTEMD_TAG``)."""
        for tar in (self.layerwatch, self.nats, *([self.systemd] if systemd else [])):
            daemon.docker("load", "-q", "-i", str(tar), timeout=300)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _tree_digest(paths: Sequence[str]) -> str:
    """A hash of the files under ``paths`` (relative to the repo), as the build context has them."""
    parts: list[bytes] = []
    for rel in paths:
        root = REPO / rel
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            inner = path.relative_to(REPO).parts
            if any(p in _IGNORED_PARTS or p.endswith((".egg-info", ".pyc", ".so")) for p in inner):
                continue
            parts += [str(path.relative_to(REPO)).encode(), path.read_bytes()]
    return _digest(*parts)


def _log(message: str) -> None:
    print(f"deploykit: {message}", file=sys.stderr, flush=True)


def base_tar() -> Path:
    """The Debian base rootfs tar (mmdebstrap), built once per recipe."""
    key = _digest(SUITE.encode(), *(s.encode() for s in SOURCES), *(a.encode() for a in MMDEBSTRAP))
    out = CACHE / f"base-{key}.tar"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    started = time.monotonic()
    proc = subprocess.run(
        ["mmdebstrap", *MMDEBSTRAP, SUITE, str(partial), *SOURCES],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise AssertionError(f"mmdebstrap failed: {proc.stderr[-3000:]}")
    partial.rename(out)
    _log(f"base {out.name}: {time.monotonic() - started:.0f} s")
    return out


def requirements() -> list[str]:
    """What pip installs in the image: the dependencies and the build backends."""
    files = [
        REPO / "pyproject.toml",
        *(REPO / "plugins" / p / "pyproject.toml" for p in PLUGINS.split()),
    ]
    out: list[str] = []
    for path in files:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        out += data["build-system"]["requires"]
        out += [d for d in data["project"]["dependencies"] if not d.startswith("layerwatch")]
    return [*sorted(set(out)), "wheel"]


def wheelhouse() -> Path:
    """Distributions for the image's pip, downloaded by the host's pip (its configuration)."""
    out = CACHE / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / ".requirements"
    wanted = "\n".join(requirements())
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "-d", str(out), *requirements()],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip download failed: {proc.stderr[-3000:]}"
    stamp.write_text(wanted)
    return out


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """``directory`` over HTTP on a loopback port (a pip find-links page); the URL."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0",
             "--directory", str(directory)],
            stdout=subprocess.PIPE,
            stderr=log,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()  # "Serving HTTP on 127.0.0.1 port N (...)"
            port = int(line.split(" port ")[1].split()[0])
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def image_key(base: Path) -> str:
    """The cache key of the images: the base recipe and every file the build reads."""
    return _digest(base.name.encode(), _tree_digest(IMAGE_INPUTS).encode(), PLUGINS.encode(),
                   NATS_CONTAINERFILE.encode())  # fmt: skip


def _save(daemon: Dockerd, tag: str, tar: Path) -> None:
    partial = tar.with_suffix(".partial")
    daemon.docker("save", "-o", str(partial), tag, timeout=300)
    partial.rename(tar)


@contextlib.contextmanager
def _builder() -> Iterator[Dockerd]:
    """The build daemon: its data root persists in ``CACHE/builder`` (the layer cache: after a
    change under watcher/ only the last steps run again); made anew if it cannot start."""
    root = CACHE / "builder"
    for attempt in (1, 2):
        top = Path(tempfile.mkdtemp(prefix="lwb-", dir="/tmp"))
        try:
            with dockerd(top, data_root=str(root)) as daemon:
                yield daemon
                return
        except DockerError as exc:
            if "did not start" not in str(exc) or attempt == 2:
                raise
            _log(f"the build daemon's cache did not start, removed: {exc}")
            shutil.rmtree(root, ignore_errors=True)


def ensure_images() -> Images:
    """The images for this checkout: from the cache, else built now (any failure raises).

    One process at a time (a lock file in the cache): the build daemon's data root is shared.
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_images()


def _ensure_images() -> Images:
    base = base_tar()
    key = image_key(base)
    nats_key = _digest(base.name.encode(), NATS_CONTAINERFILE.encode())
    images = CACHE / "images"
    meta = images / f"layerwatch-{key}.json"
    found = Images(
        images / f"layerwatch-{key}.tar",
        images / f"nats-{nats_key}.tar",
        images / f"systemd-{_digest(key.encode(), SYSTEMD_CONTAINERFILE.encode())}.tar",
        {},
    )
    if meta.is_file() and all(p.is_file() for p in (found.layerwatch, found.nats, found.systemd)):
        return Images(found.layerwatch, found.nats, found.systemd, json.loads(meta.read_text()))
    images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    wheels = wheelhouse()
    info: dict[str, Any] = {"key": key}
    with serve(wheels) as url, _builder() as daemon:
        labels = daemon.call("image", "inspect", "-f", "{{.Config.Labels}}", BASE_TAG)
        if base.stem not in labels.stdout.decode():  # imported once: the layer cache holds
            with base.open("rb") as fh:
                daemon.docker("import", "--change", f"LABEL lwci.base={base.stem}", "-",
                              BASE_TAG, input=fh.read(), timeout=300)  # fmt: skip
        build_started = time.monotonic()
        daemon.docker(
            "build", "--network=host", "-q", "-f", str(DEPLOY / "Containerfile"),
            "--build-arg", f"BASE={BASE_TAG}", "--build-arg", f"PLUGINS={PLUGINS}",
            "--build-arg", f"PIP_FIND_LINKS={url}", "--build-arg", "PIP_NO_INDEX=1",
            "-t", IMAGE_TAG, str(REPO),
            timeout=1800,
        )  # fmt: skip
        info["build_seconds"] = round(time.monotonic() - build_started, 1)
        _save(daemon, IMAGE_TAG, found.layerwatch)
        for recipe, tag, tar in (
            (NATS_CONTAINERFILE, NATS_TAG, found.nats),
            (SYSTEMD_CONTAINERFILE, SYSTEMD_TAG, found.systemd),
        ):
            if tar.is_file():
                continue
            with tempfile.TemporaryDirectory(prefix="lw-ctx-") as context:
                (Path(context) / "Containerfile").write_text(recipe)
                daemon.docker("build", "--network=host", "-q", "-f", f"{context}/Containerfile",
                              "-t", tag, context, timeout=1800)  # fmt: skip
            _save(daemon, tag, tar)
        inspect = json.loads(daemon.docker("image", "inspect", IMAGE_TAG, BASE_TAG))
        info["image_bytes"], info["base_bytes"] = (i["Size"] for i in inspect)
        info["history"] = daemon.docker(
            "history", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE_TAG
        ).splitlines()
        daemon.call("image", "prune", "-f")  # the replaced builds' layers
    info["total_seconds"] = round(time.monotonic() - started, 1)
    meta.write_text(json.dumps(info, indent=1))
    _prune(images)
    return Images(found.layerwatch, found.nats, found.systemd, info)


def _prune(images: Path) -> None:
    """Keep the two newest saved images of each kind (the disk is not endless)."""
    for kind in ("layerwatch", "nats", "systemd"):
        tars = sorted(images.glob(f"{kind}-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in tars[2:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def main() -> int:
    """Build (or find) the images and say what they cost."""
    missing = missing_tools()
    if missing:
        print(f"deploykit: not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    started = time.monotonic()
    images = ensure_images()
    info = images.info
    took = time.monotonic() - started
    print(
        f"deploykit: {IMAGE_TAG} {info['image_bytes'] / 1e6:.1f} MB "
        f"(base {info['base_bytes'] / 1e6:.1f} MB); built in {info['total_seconds']} s "
        f"(docker build {info['build_seconds']} s); this run {took:.1f} s; {images.layerwatch}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
