"""deploy/compose.yaml, started for real: its services, with their settings, on a private dockerd.

`docker compose` is not packaged here, so this module reads compose.yaml and starts each
service with `docker run`, translating every key it has (a key it does not know fails the
test): ``image``/``build`` (the image built from ``deploy/Containerfile`` by
``tests/deploykit.py``, with the build's context, dockerfile and args checked against the
compose file), ``entrypoint``, ``command``, ``cap_add``, ``security_opt``, ``volumes`` (named
volumes as ``PROJECT_NAME``, ``./`` paths relative to the compose file), ``healthcheck``,
``restart``, ``stop_grace_period``, ``hostname``, ``depends_on`` (start order;
``service_completed_successfully`` waits for exit 0). Container and volume names follow
compose's (``PROJECT-SERVICE-1``, ``PROJECT_VOLUME``).

What differs from `docker compose up`, and why:
- the network: compose gives each service an address on a project bridge and DNS by service
  name. Here no bridge is made (only loopback traffic): every service joins one network
  namespace that has only loopback, where each service name resolves to 127.0.0.1 (its
  /etc/hosts) and whose host name is the one ``hostname`` the file sets. ``ports`` (NATS
  published on the host's 127.0.0.1:4222) is not applied: the test reads NATS from inside
  that namespace instead.
- images from Docker Hub cannot be pulled: ``nats:2.10`` is replaced by an image of Debian's
  ``nats-server`` package (2.9), started with the same command; ``subscriber``
  (``natsio/nats-box``) is not run: the test reads the JetStream stream itself, which is what
  the subscriber would print.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deploykit
import pytest
from deploykit import Dockerd
from overlay import requires_overlay

COMPOSE = deploykit.DEPLOY / "compose.yaml"
SOCKET = "/run/layerwatch/api.sock"
SUBSTITUTES = {"nats:2.10": deploykit.NATS_TAG}
NOT_RUN = {"natsio/nats-box:latest"}
SERVICE_KEYS = {
    "image",
    "build",
    "entrypoint",
    "command",
    "cap_add",
    "security_opt",
    "volumes",
    "ports",
    "healthcheck",
    "restart",
    "stop_grace_period",
    "depends_on",
    "hostname",
}

# The first test's setup builds the images when CI's step has not (tests/deploykit.py).
pytestmark = [requires_overlay, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (the test extras have it)")


def _seconds(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(s|m)", text).groups()  # type: ignore[union-attr]
    return int(number) * (60 if unit == "m" else 1)


def _order(services: dict[str, Any]) -> list[str]:
    """Service names, each after the ones it depends on."""
    done: list[str] = []
    while len(done) < len(services):
        ready = [
            name
            for name, svc in services.items()
            if name not in done and set(svc.get("depends_on", {})) <= set(done)
        ]
        assert ready, f"a dependency cycle among {set(services) - set(done)}"
        done += sorted(ready)
    return done


def _image(service: dict[str, Any]) -> str:
    if "build" in service:
        build = service["build"]
        assert set(build) <= {"context", "dockerfile", "args"}, build
        assert (COMPOSE.parent / build["context"]).resolve() == deploykit.REPO
        assert deploykit.REPO / build["dockerfile"] == deploykit.DEPLOY / "Containerfile"
        assert build.get("args", {}) == {"PLUGINS": deploykit.PLUGINS}
        assert service.get("image", deploykit.IMAGE_TAG) == deploykit.IMAGE_TAG
        return deploykit.IMAGE_TAG
    image: str = service["image"]
    return SUBSTITUTES.get(image, image)


def docker_run_args(
    project: str, name: str, service: dict[str, Any], network: str
) -> tuple[list[str], str]:
    """``docker run`` arguments for a service, and its container name."""
    unknown = set(service) - SERVICE_KEYS
    assert not unknown, f"service {name}: the test does not translate {sorted(unknown)}"
    container = f"{project}-{name}-1"
    args = ["--pull=never", "--name", container, f"--network=container:{network}"]
    args += [f"--cap-add={cap}" for cap in service.get("cap_add", [])]
    args += [f"--security-opt={opt}" for opt in service.get("security_opt", [])]
    restart = service.get("restart", "no")
    args.append(f"--restart={restart}")
    if "stop_grace_period" in service:
        args.append(f"--stop-timeout={_seconds(service['stop_grace_period'])}")
    for volume in service.get("volumes", []):
        source, target, *opts = volume.split(":")
        if source.startswith((".", "/")):
            path = (COMPOSE.parent / source).resolve()
            assert path.exists(), source
            spec = f"type=bind,source={path},target={target}"
        else:
            spec = f"type=volume,source={project}_{source},target={target}"
        for opt in ",".join(opts).split(",") if opts else []:
            assert opt == "ro", f"volume option {opt} is not translated"
            spec += ",readonly"
        args += ["--mount", spec]
    health = service.get("healthcheck")
    if health is not None:
        test = health["test"]
        assert test[0] == "CMD", test
        args += [f"--health-cmd={' '.join(test[1:])}"]
        args += [f"--health-interval={health['interval']}", f"--health-timeout={health['timeout']}"]
        args += [f"--health-retries={health['retries']}"]
        args += [f"--health-start-period={health['start_period']}"]
    entrypoint = service.get("entrypoint")
    if entrypoint is not None:
        args.append(f"--entrypoint={entrypoint[0]}")
    args.append(_image(service))
    if entrypoint is not None:
        args += entrypoint[1:]
    args += service.get("command", [])
    return args, container


@dataclass
class Project:
    """The running services."""

    daemon: Dockerd
    name: str
    containers: dict[str, str]
    netns_pid: int

    def exec(self, service: str, *argv: str) -> str:
        return self.daemon.docker("exec", self.containers[service], *argv)

    def events(self, stream: str = "LAYERWATCH") -> list[dict[str, Any]]:
        rows = deploykit.read_stream(self.netns_pid, "nats://127.0.0.1:4222", stream)
        return [row["event"] for row in rows]


def _until(what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def project() -> Iterator[Project]:
    """compose.yaml's services started in dependency order (the image built or cached)."""
    missing = deploykit.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    images = deploykit.ensure_images()
    doc = _yaml().safe_load(COMPOSE.read_text())
    name = doc["name"]
    services = doc["services"]
    top = Path(tempfile.mkdtemp(prefix="lwc-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        daemon = stack.enter_context(deploykit.dockerd(top / "d"))
        images.load(daemon)
        for volume in doc.get("volumes", {}):
            daemon.docker("volume", "create", f"{name}_{volume}")
        sandbox = f"{name}-network"
        hosts = [f"--add-host={service}:127.0.0.1" for service in services]
        (hostname,) = {s["hostname"] for s in services.values() if "hostname" in s}
        daemon.docker(
            "run", "-d", "--pull=never", "--name", sandbox, "--network=none", *hosts,
            f"--hostname={hostname}",
            "--entrypoint=/bin/sleep", deploykit.NATS_TAG, "100000",
        )  # fmt: skip
        containers: dict[str, str] = {}
        for service in _order(services):
            spec = services[service]
            if spec.get("image") in NOT_RUN:
                continue
            for dependency, how in spec.get("depends_on", {}).items():
                condition = how["condition"]
                if condition == "service_completed_successfully":
                    code = daemon.docker("wait", containers[dependency], timeout=60).strip()
                    assert code == "0", f"{dependency} exited {code}"
                else:
                    assert condition == "service_started", condition
            args, container = docker_run_args(name, service, spec, sandbox)
            daemon.docker("run", "-d", *args)
            containers[service] = container
        project = Project(daemon, name, containers, deploykit.container_pid(daemon, sandbox))

        def healthy() -> bool:
            state = daemon.docker(
                "inspect", "-f", "{{.State.Health.Status}}", containers["layerwatch"]
            )
            assert state.strip() != "unhealthy", daemon.docker("logs", containers["layerwatch"])
            return state.strip() == "healthy"

        _until("layerwatch healthy", healthy)
        yield project


def test_a_change_in_the_demo_mount_reaches_nats(project: Project) -> None:
    """The compose file's own example: a file written in the demo mount is published to
    NATS (with the config's subject), printed by the stdout sink, and in the audit file."""
    project.exec("layerwatch", "sh", "-c", "echo hi > /srv/demo/merged/hello")
    with (deploykit.DEPLOY / "layerwatch.toml").open("rb") as fh:
        config = tomllib.load(fh)
    bus = config["sinks"]["bus"]

    def hello() -> list[dict[str, Any]]:
        return [
            e
            for e in project.events(bus["stream"])
            if e["type"] == "io.layerwatch.change"
            and e["data"].get("path") == "/hello"
            and e["data"]["prev_kind"] is None  # then activity events: kind == prev_kind
        ]

    _until("the change in NATS", lambda: bool(hello()))
    (event,) = hello()
    assert event["data"]["mount"] == "demo"
    assert event["data"]["kind"] == "A"
    rows = deploykit.read_stream(project.netns_pid, "nats://127.0.0.1:4222", bus["stream"])
    (row,) = [r for r in rows if r["event"]["id"] == event["id"]]
    assert row["subject"] == bus["subject"].replace("{mount}", "demo")
    assert row["msg_id"] == event["id"]
    logs = project.daemon.docker("logs", project.containers["layerwatch"])
    assert event["id"] in logs  # the stdout sink
    audit = project.exec("layerwatch", "cat", config["sinks"]["audit"]["path"])
    assert event["id"] in [json.loads(line)["id"] for line in audit.splitlines()]
    listed = project.exec("layerwatch", "layerwatch", "diff", "--server", SOCKET, "demo")
    assert listed.splitlines() == ["A /hello"]


def test_layerwatch_stops_cleanly_and_starts_again_from_its_spool(project: Project) -> None:
    """`docker stop` (SIGTERM) ends the service with status 0; started again (restart after a
    host reboot) it resumes from the spool volume: the same list, the same event stream and
    epoch, the sequence going on."""
    container = project.containers["layerwatch"]
    before = project.events()
    project.daemon.docker("stop", container, timeout=60)
    assert project.daemon.docker("inspect", "-f", "{{.State.ExitCode}}", container).strip() == "0"
    project.daemon.docker("start", container)
    _until("the API", lambda: project.daemon.call("exec", container, "layerwatch", "status")
           .returncode == 0)  # fmt: skip
    listed = project.exec("layerwatch", "layerwatch", "diff", "--server", SOCKET, "demo")
    assert listed.splitlines() == ["A /hello"]
    time.sleep(1)
    after = project.events()[len(before) :]
    assert after  # the restart's snapshot of the mount, and bookmarks
    streams = {e["id"].rsplit(":", 2)[0] for e in before + after}
    assert streams == {"layerwatch-demo"}  # the compose file's hostname
    epochs = {e["id"].split(":")[1] for e in before + after}
    assert len(epochs) == 1  # the same spool: the sequence goes on
    assert int(after[0]["sequence"]) > max(int(e["sequence"]) for e in before)
