"""The DaemonSet, run for real: deploy/kubernetes/daemonset.yaml's pod on a Docker node.

What runs is the image built from ``deploy/Containerfile`` (``tests/deploykit.py``), with the
pod spec translated to ``docker run``, field by field, from the YAML; a field the translation
does not know fails the test, so the manifest cannot drift away from what is tested:

- the ConfigMap's ``layerwatch.toml`` (the very text of the YAML) is the config file, as is;
  the service resolves its ``${NODE_NAME}`` from the container's environment, which the
  Downward API (``spec.nodeName``: the node's name here) sets.
- each container gets its ``securityContext`` (``runAsUser``/``runAsGroup`` -> ``--user``,
  ``readOnlyRootFilesystem`` -> ``--read-only``, ``capabilities`` -> ``--cap-drop``/
  ``--cap-add``, ``allowPrivilegeEscalation: false`` -> ``no-new-privileges``), the pod's
  ``seccompProfile: RuntimeDefault`` is Docker's default profile, resource limits become
  ``--cpus``/``--memory``, and volumes are binds: a configMap is a directory of its files
  (read-only), an emptyDir a directory of the pod (a tmpfs of ``sizeLimit`` for
  ``medium: Memory``), a hostPath the node's own path, ``mountPropagation: HostToContainer``
  is ``bind-propagation=rslave``.
- the probes' exec commands run with ``docker exec``, as the kubelet runs them.

The node is a mount namespace laid out like a node's (``deploykit.node``) with ONE private
dockerd as its container runtime (data root ``/var/lib/docker``): it runs the workload
containers and the layerwatch pod, as a node's runtime runs both (so the pod also finds its
own container, as on a node). Docker rather than containerd, because ``docker diff`` is what
the lists are checked against.

What differs from a cluster: there is no kubelet or API server (this module plays them); the
pod shares its network namespace with the NATS server's, and only loopback is used:
``nats.layerwatch.svc`` resolves to 127.0.0.1 through the pod's ``/etc/hosts`` instead of the
cluster's DNS; the NATS server is Debian's ``nats-server`` package in a container built here;
this kernel has no AppArmor, so no AppArmor profile applies.

Needs root, overlayfs, Debian's docker.io, util-linux, busybox-static and mmdebstrap (or the
images already in the cache); a failing image build fails the tests, it never skips them.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import deploykit
import pytest
from conftest import load_cases
from deploykit import Dockerd, Node
from overlay import requires_overlay

CASES = load_cases()
MANIFEST = deploykit.DEPLOY / "kubernetes" / "daemonset.yaml"
NODE_NAME = "node-1.layerwatch.test"
POD_NAME = "layerwatch-x7k2p"
POD_DIR = "/var/lib/kubelet/pods/0f3c5a1e-layerwatch"
WORKLOAD = "layerwatch-ci/workload:busybox"
NATS_PORT = 4222
SOCKET = "/run/layerwatch/api.sock"

# The first test's setup builds the images when CI's step has not (tests/deploykit.py).
pytestmark = [requires_overlay, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is not installed (the test extras have it)")


def manifests() -> dict[str, dict[str, Any]]:
    """The documents of daemonset.yaml by kind."""
    return {doc["kind"]: doc for doc in _yaml().safe_load_all(MANIFEST.read_text())}


# -- the pod spec, as docker run arguments ----------------------------------------------------

POD_KEYS = {
    "hostPID",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "terminationGracePeriodSeconds",
    "securityContext",
    "tolerations",
    "containers",
    "volumes",
}
CONTAINER_KEYS = {
    "name",
    "image",
    "command",
    "args",
    "env",
    "securityContext",
    "resources",
    "volumeMounts",
    "startupProbe",
    "livenessProbe",
    "readinessProbe",
}
SECURITY_KEYS = {
    "privileged",
    "runAsUser",
    "runAsGroup",
    "runAsNonRoot",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
}
_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS.get(unit or "", 1)


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _unknown(what: str, found: dict[str, Any], known: set[str]) -> None:
    unknown = set(found) - known
    assert not unknown, f"{what}: the test does not translate {sorted(unknown)}; extend it"


def _security(context: dict[str, Any]) -> list[str]:
    _unknown("securityContext", context, SECURITY_KEYS)
    args: list[str] = []
    assert context.get("privileged", False) is False, "privileged pods are not translated"
    uid = context.get("runAsUser")
    if uid is not None:
        args += [
            "--user",
            f"{uid}:{context['runAsGroup']}" if "runAsGroup" in context else str(uid),
        ]
    if context.get("runAsNonRoot"):
        assert uid not in (None, 0), "runAsNonRoot needs a non-zero runAsUser here"
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges=true"]
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    caps = context.get("capabilities", {})
    _unknown("capabilities", caps, {"drop", "add"})
    args += [f"--cap-drop={cap}" for cap in caps.get("drop", [])]
    args += [f"--cap-add={cap}" for cap in caps.get("add", [])]
    return args


def _resources(resources: dict[str, Any]) -> list[str]:
    _unknown("resources", resources, {"requests", "limits"})
    args: list[str] = []
    limits = resources.get("limits", {})
    _unknown("resources.limits", limits, {"cpu", "memory"})
    if "cpu" in limits:
        args.append(f"--cpus={_cpus(limits['cpu'])}")
    if "memory" in limits:
        args.append(f"--memory={_bytes(limits['memory'])}")
    requests = resources.get("requests", {})
    if "cpu" in requests:  # what the kubelet derives cpu.shares from
        args.append(f"--cpu-shares={max(2, int(_cpus(requests['cpu']) * 1024))}")
    return args


def _env(env: list[dict[str, Any]]) -> list[str]:
    args = []
    for var in env:
        if "value" in var:
            args += ["-e", f"{var['name']}={var['value']}"]
            continue
        field = var["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == "spec.nodeName", f"env {var['name']}: {field} is not translated"
        args += ["-e", f"{var['name']}={NODE_NAME}"]
    return args


def docker_run_args(
    pod: dict[str, Any], container: dict[str, Any], sources: dict[str, str], network: str
) -> list[str]:
    """``docker run`` arguments (after ``run``) for one container of the pod.

    Args:
        pod: the pod template's spec.
        container: one of its containers.
        sources: volume name -> the node path bound for it.
        network: the container whose network namespace the pod uses.
    """
    _unknown("pod spec", pod, POD_KEYS)
    _unknown(f"container {container['name']}", container, CONTAINER_KEYS)
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert not pod.get("hostPID")
    args = ["--pull=never", f"--network=container:{network}"]
    args += _security(container.get("securityContext", {}))
    args += _resources(container.get("resources", {}))
    args += _env(container.get("env", []))
    for mount in container.get("volumeMounts", []):
        _unknown("volumeMount", mount, {"name", "mountPath", "readOnly", "mountPropagation"})
        spec = f"type=bind,source={sources[mount['name']]},target={mount['mountPath']}"
        if mount.get("readOnly"):
            spec += ",readonly"
        propagation = mount.get("mountPropagation", "None")
        assert propagation in ("None", "HostToContainer"), propagation
        if propagation == "HostToContainer":
            spec += ",bind-propagation=rslave"
        args += ["--mount", spec]
    image = deploykit.IMAGE_TAG
    assert container["image"] == image
    if "command" in container:
        command = container["command"]
        return [
            *args,
            f"--entrypoint={command[0]}",
            image,
            *command[1:],
            *container.get("args", []),
        ]
    return [*args, image, *container.get("args", [])]


def prepare_volumes(node: Node, pod: dict[str, Any], config_map: dict[str, Any]) -> dict[str, str]:
    """Make each volume on the node, as the kubelet would; volume name -> node path."""
    sources = {}
    for volume in pod["volumes"]:
        name = volume["name"]
        _unknown(f"volume {name}", volume, {"name", "configMap", "emptyDir", "hostPath"})
        if "hostPath" in volume:
            host = volume["hostPath"]
            assert host["type"] == "DirectoryOrCreate"
            node.run("mkdir", "-p", host["path"])
            sources[name] = host["path"]
        elif "configMap" in volume:
            assert volume["configMap"]["name"] == config_map["metadata"]["name"]
            path = f"{POD_DIR}/volumes/kubernetes.io~configmap/{name}"
            directory = node.host_path(path)
            directory.mkdir(parents=True)
            for key, text in config_map["data"].items():
                (directory / key).write_text(text)
                (directory / key).chmod(0o644)
            sources[name] = path
        else:
            empty = volume["emptyDir"]
            _unknown(f"emptyDir {name}", empty, {"medium", "sizeLimit"})
            path = f"{POD_DIR}/volumes/kubernetes.io~empty-dir/{name}"
            node.host_path(path).mkdir(parents=True)
            if empty.get("medium") == "Memory":
                size = _bytes(empty["sizeLimit"])
                node.run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", name, path)
            else:
                node.host_path(path).chmod(0o777)
            sources[name] = path
    return sources


# -- the pod, running -------------------------------------------------------------------------


@dataclass
class Pod:
    """The layerwatch pod running on the node, and the NATS server it publishes to."""

    daemon: Dockerd
    node: Node
    spec: dict[str, Any]
    container: dict[str, Any]
    config_map: dict[str, Any]
    netns_pid: int

    def exec(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the layerwatch container (``docker exec``)."""
        return self.daemon.call("exec", POD_NAME, *argv, timeout=timeout)

    def probe(self, kind: str) -> int:
        """Run a probe's exec command as the kubelet does; its exit status."""
        probe = self.container[kind]
        try:
            return self.exec(*probe["exec"]["command"], timeout=probe["timeoutSeconds"]).returncode
        except subprocess.TimeoutExpired:
            return -1

    def mounts(self) -> set[str]:
        """The mounts the service follows now, from ``layerwatch status``."""
        out = self.exec("layerwatch", "status").stdout.decode().splitlines()
        header = next(i for i, line in enumerate(out) if line.startswith("MOUNT"))
        return {line.split()[0] for line in out[header + 1 :] if line.strip()}

    def changes(self, mount: str) -> set[str]:
        """A mount's list from the service (``layerwatch diff --server``, after a sync)."""
        proc = self.exec("layerwatch", "diff", "--server", SOCKET, mount)
        assert proc.returncode == 0, proc.stderr.decode()
        return set(proc.stdout.decode().splitlines())

    def events(self) -> list[dict[str, Any]]:
        """Every event stored in NATS, in stream order."""
        url = f"nats://127.0.0.1:{NATS_PORT}"
        return [row["event"] for row in deploykit.read_stream(self.netns_pid, url)]

    def log(self) -> str:
        proc = self.daemon.call("logs", POD_NAME)
        return (proc.stdout + proc.stderr).decode(errors="replace")


def _until(what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _nats_answers(netns_pid: int) -> bool:
    try:
        deploykit.read_stream(netns_pid, f"nats://127.0.0.1:{NATS_PORT}")
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def images() -> deploykit.Images:
    """The images: from the cache, else built now (a failed build is an error, not a skip)."""
    missing = deploykit.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    return deploykit.ensure_images()


@pytest.fixture(scope="module")
def pod(images: deploykit.Images) -> Iterator[Pod]:
    """The node, its runtime, NATS, and the DaemonSet's pod started on it; everything is
    removed at the end."""
    docs = manifests()
    config_map, daemonset = docs["ConfigMap"], docs["DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    nats_host = urlsplit(tomllib.loads(config_map["data"]["layerwatch.toml"])["sinks"]["bus"]
                         ["servers"][0]).hostname  # fmt: skip
    top = Path(tempfile.mkdtemp(prefix="lwp-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        node = stack.enter_context(deploykit.node(top / "node"))
        daemon = stack.enter_context(
            deploykit.dockerd(top / "d", data_root="/var/lib/docker", mount_ns=node.pid)
        )
        images.load(daemon)
        deploykit.workload_image(daemon, WORKLOAD, CASES["lower"])
        # The pod's network namespace (a sandbox, as the kubelet makes one), shared with NATS.
        sandbox = f"{POD_NAME}-sandbox"
        daemon.docker(
            "run", "-d", "--pull=never", "--name", sandbox, "--network=none",
            f"--hostname={POD_NAME}", f"--add-host={nats_host}:127.0.0.1",
            WORKLOAD, "/bin/sleep", "100000",
        )  # fmt: skip
        netns_pid = deploykit.container_pid(daemon, sandbox)
        daemon.docker(
            "run", "-d", "--pull=never", "--name", "nats", f"--network=container:{sandbox}",
            "--mount", "type=volume,source=nats-data,target=/data", deploykit.NATS_TAG,
            "--jetstream", "--store_dir", "/data", "--addr", "127.0.0.1", "--port", str(NATS_PORT),
        )  # fmt: skip
        _until("nats-server", lambda: _nats_answers(netns_pid))
        sources = prepare_volumes(node, spec, config_map)
        main_args = docker_run_args(spec, container, sources, sandbox)
        grace = spec["terminationGracePeriodSeconds"]
        daemon.docker("run", "-d", "--name", POD_NAME, f"--stop-timeout={grace}", *main_args)
        running = Pod(daemon, node, spec, container, config_map, netns_pid)
        probe = container["startupProbe"]
        budget = min(probe["periodSeconds"] * probe["failureThreshold"], 60)
        try:
            _until("the startup probe", lambda: running.probe("startupProbe") == 0, budget)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pod's log:\n{running.log()[-3000:]}") from None
        yield running


def test_image_answers_help_and_holds_only_what_it_needs(
    images: deploykit.Images, pod: Pod
) -> None:
    """`layerwatch --help` answers through the entry point; no pip, compiler or apt lists in
    the image, which stays small (its size is printed)."""
    help_ = pod.daemon.call("run", "--rm", "--pull=never", deploykit.IMAGE_TAG, "--help")
    assert help_.returncode == 0, help_.stderr.decode()
    assert help_.stdout.decode().startswith("usage: layerwatch")
    probe = (
        "import importlib.util, os, shutil, sys; "
        "print(importlib.util.find_spec('pip'), shutil.which('gcc'), shutil.which('cc'), "
        "os.listdir('/var/lib/apt/lists'), sys.prefix)"
    )
    found = pod.daemon.docker(
        "run", "--rm", "--pull=never", "--entrypoint=python3", deploykit.IMAGE_TAG, "-c", probe
    )  # fmt: skip
    assert found.split() == ["None", "None", "None", "[]", "/opt/layerwatch"]
    size = images.info["image_bytes"]
    print(f"{deploykit.IMAGE_TAG}: {size / 1e6:.1f} MB")
    assert size < 160e6


def test_the_config_map_is_the_config_and_names_the_node(pod: Pod) -> None:
    """The service runs the ConfigMap's text as is (no init container renders it); its
    ${NODE_NAME} is the container's variable, set from spec.nodeName."""
    assert "initContainers" not in pod.spec
    text = pod.config_map["data"]["layerwatch.toml"]
    assert pod.exec("cat", "/etc/layerwatch/layerwatch.toml").stdout.decode() == text
    config = tomllib.loads(text)
    assert config["service"]["stream"] == config["service"]["host"] == "${NODE_NAME}"
    assert "discovery" in config
    assert "mounts" not in config
    env = pod.exec("/bin/sh", "-c", 'printf %s "$NODE_NAME"').stdout.decode()
    assert env == NODE_NAME


def test_check_passes_inside_the_pod(pod: Pod) -> None:
    """`layerwatch check` on the config, in the pod's own security context: no error."""
    proc = pod.exec("layerwatch", "check", "/etc/layerwatch/layerwatch.toml", timeout=60)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert re.search(r"^0 error\(s\)", out, re.MULTILINE), out


def test_service_runs_under_tini_as_the_probes_expect(pod: Pod) -> None:
    """PID 1 is tini running the service; the probes answer, the read-only root holds."""
    cmdline = pod.exec("cat", "/proc/1/cmdline").stdout.split(b"\0")
    assert cmdline[:2] == [b"/usr/bin/tini", b"--"]
    assert pod.probe("livenessProbe") == 0
    _until("readiness", lambda: pod.probe("readinessProbe") == 0)
    write = pod.exec("touch", "/etc/layerwatch-was-here")
    assert write.returncode != 0
    assert b"Read-only file system" in write.stderr


def test_follows_new_containers_labels_them_and_releases_them(pod: Pod) -> None:
    """Containers started after the pod are followed; each list equals `docker diff`, in the
    service and rebuilt from the events in NATS; every event names the node and is labelled
    with its container; a removed container is released."""
    cases = [c for c in CASES["cases"] if c["expect"]][:5]
    cids: dict[str, str] = {}
    try:
        for case in cases:
            name = f"wl-{case['name'].replace('_', '-')}"
            cid = pod.daemon.docker(
                "run", "-d", "--pull=never", "--network=none", "--name", name,
                WORKLOAD, "/bin/sleep", "600",
            ).strip()  # fmt: skip
            cids[cid] = name
            mount = f"docker-{cid[:12]}"
            _until(f"{mount} followed", lambda m=mount: m in pod.mounts())  # type: ignore[misc]
            pod.daemon.docker("exec", "-w", "/", cid, "/bin/sh", "-c", case["ops"])
            expected = set(pod.daemon.docker("diff", cid).splitlines())
            assert expected, case["name"]
            assert pod.changes(mount) == expected, case["name"]

        def rebuilt_equal_docker_diff() -> bool:
            events = pod.events()
            return all(
                _rebuild(events, f"docker-{cid[:12]}")
                == set(pod.daemon.docker("diff", cid).splitlines())
                for cid in cids
            )

        _until("the lists rebuilt from NATS", rebuilt_equal_docker_diff)
        events = pod.events()
        for cid, name in cids.items():
            mine = [e for e in events if e["data"].get("mount") == f"docker-{cid[:12]}"]
            assert mine
            for event in mine:
                assert event["id"].startswith(f"{NODE_NAME}:")
                assert event["source"] == f"/layerwatch/{NODE_NAME}"  # not the pod's host name
                labels = event["data"]["labels"]
                assert labels["runtime"] == "docker"
                assert labels["container_id"] == cid
                assert labels["container_name"] == name
                assert labels["image"] == WORKLOAD
        gone = next(iter(cids))
        pod.daemon.docker("rm", "-f", gone)
        _until("the removed container released", lambda: f"docker-{gone[:12]}" not in pod.mounts())
        assert {f"docker-{cid[:12]}" for cid in list(cids)[1:]} <= pod.mounts()
    finally:
        for cid in cids:
            pod.daemon.call("rm", "-f", cid)


def _rebuild(events: list[dict[str, Any]], mount: str) -> set[str]:
    """A mount's change list from its events (snapshots replace, changes update)."""
    state: dict[str, str] = {}
    snapshot: dict[str, str] | None = None
    for event in events:
        data = event["data"]
        if data.get("mount") != mount:
            continue
        if event["type"] == "io.layerwatch.snapshot.begin":
            snapshot = {}
        elif event["type"] == "io.layerwatch.snapshot.end" and snapshot is not None:
            state, snapshot = snapshot, None
        elif event["type"] == "io.layerwatch.change":
            target = snapshot if snapshot is not None else state
            if data["kind"] is None:
                target.pop(data["path"], None)
            else:
                target[data["path"]] = data["kind"]
    return {f"{kind} {path}" for path, kind in state.items()}


def test_readiness_follows_the_broker_and_liveness_does_not(pod: Pod) -> None:
    """NATS down: not ready (degraded), still live; NATS back: ready again, nothing lost."""
    _until("readiness", lambda: pod.probe("readinessProbe") == 0)
    pod.daemon.docker("stop", "nats")
    try:
        _until("not ready", lambda: pod.probe("readinessProbe") != 0)
        assert pod.probe("livenessProbe") == 0
        status = pod.exec("layerwatch", "status")
        assert status.returncode == 2
        assert b"sink bus" in status.stdout
        cid = pod.daemon.docker(
            "run", "-d", "--pull=never", "--network=none", "--name", "wl-during-outage",
            WORKLOAD, "/bin/sh", "-c", "echo x > /made-while-nats-was-down; exec sleep 600",
        ).strip()  # fmt: skip
        _until("followed", lambda: f"docker-{cid[:12]}" in pod.mounts())
    finally:
        pod.daemon.docker("start", "nats")
    _until("NATS back", lambda: _nats_answers(pod.netns_pid))
    _until("ready again", lambda: pod.probe("readinessProbe") == 0, timeout=60)
    _until(
        "the outage's events in NATS",
        lambda: "A /made-while-nats-was-down" in _rebuild(pod.events(), f"docker-{cid[:12]}"),
    )
    pod.daemon.docker("rm", "-f", cid)


def test_sighup_reopens_and_sigterm_stops_within_the_grace_period(pod: Pod) -> None:
    """SIGHUP (tini forwards it) reopens the sinks; `docker stop` (SIGTERM, then SIGKILL after
    terminationGracePeriodSeconds) ends the service cleanly, well before the deadline."""
    pod.daemon.docker("kill", "--signal=HUP", POD_NAME)
    _until("reopen_requested", lambda: "reopen_requested" in pod.log())
    started = time.monotonic()
    pod.daemon.docker("stop", POD_NAME, timeout=120)
    took = time.monotonic() - started
    state = pod.daemon.docker("inspect", "-f", "{{.State.ExitCode}}", POD_NAME).strip()
    assert state == "0", pod.log()[-2000:]
    assert took < pod.spec["terminationGracePeriodSeconds"] / 2, took
    assert "service_stopped" in pod.log()
    print(f"pod stopped in {took:.1f} s; {shlex.join(['docker', 'stop', POD_NAME])}")
