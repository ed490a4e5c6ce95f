"""The deployment files in ``deploy/``: they parse, and say what the operations guide says."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from watcher.delivery.plugins import available_sinks, load_sink
from watcher.service.config import Config, parse

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
REPO = DEPLOY.parent
# Options that give a service its own mount namespace: overlays it mounts would be invisible
# to the rest of the host.
NAMESPACING = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateMounts",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RootDirectory",
)


def _yaml() -> Any:
    """The PyYAML module; the test is skipped (with the reason) when it is not installed."""
    return pytest.importorskip("yaml", reason="PyYAML is not installed: YAML files not parsed")


def _unit() -> dict[str, dict[str, str]]:
    """The systemd unit as sections of key -> value (each key appears once in ours)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in (DEPLOY / "layerwatch.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert key not in current, f"{key} set twice"
        current[key] = value
    return sections


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without warnings."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit is not verified")
    # verify needs ExecStart to exist: point it at the installed command, or at /bin/true
    # where the package is not installed as a command (the unit text is otherwise unchanged).
    command = shutil.which("layerwatch") or "/bin/true"
    text = (DEPLOY / "layerwatch.service").read_text()
    unit = tmp_path / "layerwatch.service"
    unit.write_text(text.replace("/usr/local/bin/layerwatch", command))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "layerwatch.service" not in proc.stderr, proc.stderr  # any complaint names the unit


def test_unit_runs_the_service_with_mounts_visible_to_the_host() -> None:
    """The unit runs `layerwatch run`, restarts on failure, keeps CAP_SYS_ADMIN, no mount ns."""
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"] == "/usr/local/bin/layerwatch run /etc/layerwatch/layerwatch.toml"
    assert service["Type"] in ("simple", "notify")
    assert service["Restart"] == "on-failure"
    assert {"CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"} <= set(service["CapabilityBoundingSet"].split())
    assert "@mount" in service["SystemCallFilter"].split()
    assert service["StateDirectory"] == "layerwatch"
    assert not [key for key in service if key in NAMESPACING]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # systemctl reload = SIGHUP (sinks reopen), with the shell's kill: /bin/kill may be absent.
    assert service["ExecReload"] == """/bin/sh -c 'kill -HUP "$MAINPID"'"""
    assert int(service["TimeoutStopSec"].removesuffix("s")) > 10  # shutdown_timeout's default


# The unit's sandboxing settings: each is listed in the operations guide with what it forbids.
HARDENING = (
    "CapabilityBoundingSet",
    "NoNewPrivileges",
    "UMask",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "ProtectHostname",
    "ProtectClock",
    "DevicePolicy",
    "DeviceAllow",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "SystemCallErrorNumber",
    "RestrictAddressFamilies",
)


def test_unit_hardening_is_each_listed_in_the_operations_guide() -> None:
    """Every hardening setting of the unit has a row in docs/operations.md's table, and the
    unit has no sandboxing setting the table does not explain."""
    service = _unit()["Service"]
    guide = (REPO / "docs" / "operations.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)=", guide, re.MULTILINE))
    assert set(HARDENING) <= service.keys()
    assert set(HARDENING) <= rows, set(HARDENING) - rows
    sandboxing = {k for k in service if k.startswith(("Restrict", "Protect", "Private", "Lock"))}
    assert sandboxing <= set(HARDENING), sandboxing - set(HARDENING)


def test_unit_exposure_per_systemd_analyze_security() -> None:
    """`systemd-analyze security --offline` rates the unit's exposure "OK" (below 5)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit is not rated")
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", str(DEPLOY / "layerwatch.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for layerwatch.service: ([\d.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    print(found.group(0))
    assert float(found.group(1)) < 5.0


def _example() -> Config:
    with (DEPLOY / "layerwatch.toml").open("rb") as fh:
        return parse(tomllib.load(fh))


def test_example_config_parses_and_its_sinks_accept_their_options() -> None:
    """The example TOML is a valid config, and each sink type installed takes its options."""
    config = _example()
    assert [m.name for m in config.mounts] == ["demo"]
    assert config.spool.path == Path("/var/lib/layerwatch/spool.db")
    installed = set(available_sinks())
    checked = 0
    for sink in config.sinks:
        if sink.type in installed:
            load_sink(sink.name, sink.type, sink.options)  # raises ConfigError on a bad option
            checked += 1
    assert checked >= 2  # stdout and jsonl are built in


def test_compose_demo_matches_the_example_config() -> None:
    """compose.yaml builds the Containerfile, runs NATS, and mounts what the config names."""
    doc = _yaml().safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert {"nats", "layerwatch"} <= services.keys()
    assert "--jetstream" in services["nats"]["command"]
    lw = services["layerwatch"]
    assert (DEPLOY / lw["build"]["context"]).resolve() == REPO
    assert (REPO / lw["build"]["dockerfile"]).is_file()
    assert "SYS_ADMIN" in lw["cap_add"]
    targets = {}
    for volume in lw["volumes"]:
        source, target = volume.split(":")[:2]
        targets[target] = source
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), source
    config = _example()
    demo = config.mounts[0]
    assert str(demo.layers[0]) in targets
    assert "/etc/layerwatch/layerwatch.toml" in targets
    bus = next(s for s in config.sinks if s.type == "nats")
    assert bus.options["servers"] == ["nats://nats:4222"]


def _manifests() -> dict[str, dict[str, Any]]:
    docs = _yaml().safe_load_all((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def test_daemonset_mounts_runtime_dirs_read_only_with_host_propagation() -> None:
    """Host runtime dirs are read-only, HostToContainer, at the node's own paths; the root
    filesystem is read-only but /tmp is writable; the probes ask `layerwatch status`."""
    manifests = _manifests()
    assert {"Namespace", "ConfigMap", "DaemonSet"} <= manifests.keys()
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    assert not pod.get("hostPID")
    (container,) = pod["containers"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for runtime_dir in ("/var/lib/docker", "/run/containerd", "/var/lib/containerd"):
        (name,) = [n for n, p in host_paths.items() if p == runtime_dir]
        assert mounts[name]["mountPath"] == runtime_dir
        assert mounts[name]["readOnly"] is True
        assert mounts[name]["mountPropagation"] == "HostToContainer"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in mounts.values() if not m.get("readOnly")}
    assert {"/tmp", "/run/layerwatch", "/var/lib/layerwatch"} <= writable
    (tmp,) = [m["name"] for m in mounts.values() if m["mountPath"] == "/tmp"]
    assert tmp in empty_dirs
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "DAC_READ_SEARCH"]}
    limits = container["resources"]["limits"]
    assert {"cpu", "memory"} <= limits.keys()
    assert container["args"] == ["run", "/etc/layerwatch/layerwatch.toml"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "layerwatch status" in " ".join(container[probe]["exec"]["command"]), probe
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > _config_map_on("node-1.example").shutdown_timeout


def _config_map_on(node: str) -> Config:
    """The ConfigMap's config, as the service in the pod on node ``node`` loads it: its
    ${NODE_NAME} from the container's environment, which the Downward API sets."""
    manifests = _manifests()
    spec = manifests["DaemonSet"]["spec"]["template"]["spec"]
    assert "initContainers" not in spec  # the service reads the ConfigMap as is
    (container,) = spec["containers"]
    (env,) = container["env"]
    assert env == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    text: str = manifests["ConfigMap"]["data"]["layerwatch.toml"]
    assert "${NODE_NAME}" in text
    return parse(tomllib.loads(text), {"NODE_NAME": node})


def test_daemonset_configmap_is_a_valid_config() -> None:
    """The ConfigMap, on a node, is a config that discovers the node's containers, names its
    events after the node, and publishes to NATS unordered (one stream, many nodes)."""
    config = _config_map_on("node-1.example")
    assert config.stream == config.host == "node-1.example"
    assert config.spool.path == Path("/var/lib/layerwatch/spool.db")
    assert not config.mounts
    assert config.discovery is not None
    assert config.discovery.docker_root == Path("/var/lib/docker")
    assert config.discovery.containerd_state == Path("/run/containerd")
    (bus,) = config.sinks
    assert bus.type == "nats"
    assert bus.options["ordered"] is False
    if "nats" in available_sinks():
        load_sink(bus.name, bus.type, bus.options)  # raises ConfigError on a bad option


def test_containerfile_copies_what_exists_and_runs_the_service() -> None:
    """The Containerfile builds on a Debian 12 base given as BASE (debian:bookworm-slim by
    default), its COPY sources exist and are not ignored, it runs the CLI under tini.
    (tests/test_deploy_pod.py and tests/test_deploy_compose.py build it and run it.)"""
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^ARG BASE=debian:bookworm-slim$", text, re.MULTILINE)
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.MULTILINE)
    assert froms == [("${BASE}", "runtime"), ("runtime", "build"), ("runtime", "")]
    ignored = [
        line for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]  # fmt: skip
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert source not in ignored, source
    (plugins,) = re.findall(r'^ARG PLUGINS="([^"]*)"', text, re.MULTILINE)
    for plugin in plugins.split():
        assert (REPO / "plugins" / plugin / "pyproject.toml").is_file(), plugin
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/opt/layerwatch/bin/layerwatch"]' in text
    assert 'CMD ["run", "/etc/layerwatch/layerwatch.toml"]' in text
