"""deploy/layerwatch.service, run by systemd: installed as docs/operations.md says, on a
Debian 12 system whose PID 1 is systemd.

The "host" is a container of a private dockerd: the image is ``deploykit.SYSTEMD_TAG`` (the
layerwatch image with Debian's systemd and nats-server added, and
``/usr/local/bin/layerwatch`` linked to the venv, as the install steps do). The unit file, the
example config ``deploy/layerwatch.toml`` and the demo layer are copied in as the install steps
copy them; the example config's NATS server (``nats:4222``) is Debian's nats-server on the
host's loopback, started as a transient unit. Then systemd starts, reloads and stops the
service with every hardening setting of the unit in force (seccomp filter, capability bounding
set, no new privileges, device policy, W^X memory, ...), and the test checks what each
promise of the unit means: the service runs and is healthy, the overlay it mounts is visible
outside the service (no mount namespace), ``systemctl reload`` is a SIGHUP, ``systemctl stop``
drains and unmounts.

What differs from a real host: the host is a container (systemd detects it and skips what a
container cannot do, such as setting the clock); it gets every capability this machine allows
and no seccomp profile of its own, as a host's PID 1 has; its network is loopback only.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import deploykit
import pytest
from deploykit import Dockerd
from overlay import requires_overlay

# The first test's setup builds the images when CI's step has not (tests/deploykit.py).
pytestmark = [requires_overlay, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

HOST = "lw-host"
API_TOKEN = "credential-token-4f9c2e7a"
CREDENTIAL = "/etc/layerwatch/credentials/api-token"
# Capability numbers (linux/capability.h), to give the host every one this machine has.
# fmt: off
CAPS = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# fmt: on
UNIT_CAPS = {
    "SYS_ADMIN",
    "DAC_READ_SEARCH",
    "DAC_OVERRIDE",
    "FOWNER",
    "CHOWN",
    "FSETID",
    "MKNOD",
    "SETFCAP",
}


def _caps_of(mask: int) -> set[str]:
    return {name for bit, name in enumerate(CAPS) if mask >> bit & 1}


def _own_caps() -> set[str]:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return _caps_of(int(line.split()[1], 16))
    raise AssertionError("no CapBnd in /proc/self/status")


@dataclass
class Host:
    """The systemd host container."""

    daemon: Dockerd

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> str:
        proc = self.daemon.call("exec", HOST, "/bin/sh", "-c", script, timeout=timeout)
        out = proc.stdout.decode(errors="replace")
        if check:
            assert proc.returncode == 0, f"{script}: {out}{proc.stderr.decode(errors='replace')}"
        return out

    def journal(self) -> str:
        return self.sh("journalctl -u layerwatch -o cat --no-pager")


def _until(what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """A booted systemd host with layerwatch installed and started by systemd."""
    missing = deploykit.missing_tools()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    images = deploykit.ensure_images()
    top = Path(tempfile.mkdtemp(prefix="lws-", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        daemon = stack.enter_context(deploykit.dockerd(top / "d"))
        images.load(daemon, systemd=True)
        absent = sorted(set(CAPS) - _own_caps())
        daemon.docker(
            "run", "-d", "--pull=never", "--name", HOST, "--hostname", "host-1",
            "--network=none", "--add-host=nats:127.0.0.1",
            "--cap-add=ALL", *[f"--cap-drop={cap}" for cap in absent],
            "--security-opt=seccomp=unconfined", "--cgroupns=host",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
            deploykit.SYSTEMD_TAG,
        )  # fmt: skip
        running = Host(daemon)
        _until(
            "systemd",
            lambda: (
                running.sh("systemctl is-system-running", check=False).strip()
                in ("running", "degraded")
            ),
        )
        # The install steps (docs/operations.md); the venv and the link are in the image.
        deploy = deploykit.DEPLOY
        daemon.docker("cp", str(deploy / "layerwatch.service"), f"{HOST}:/etc/systemd/system/")
        daemon.docker("cp", str(deploy / "layerwatch.toml"), f"{HOST}:/etc/layerwatch/")
        running.sh("mkdir -p /srv/demo && chmod 0600 /etc/layerwatch/layerwatch.toml")
        # A host's systemd makes every mount shared at boot; in a container it leaves them
        # private, and then the credentials it mounts for a unit (in a namespace of its own,
        # propagated back) never reach the service. Shared, as on a host:
        running.sh("mount --make-rshared /")
        # The API on TCP with its token from a systemd credential: the example config's two
        # commented lines enabled, the credential's file, and a drop-in that loads it.
        running.sh(
            "sed -i -e 's|^# listen = |listen = |' -e 's|^# token_file = |token_file = |' "
            "/etc/layerwatch/layerwatch.toml && grep -q '^token_file = ' "
            "/etc/layerwatch/layerwatch.toml"
        )
        running.sh(
            f"install -d -m 0700 {Path(CREDENTIAL).parent} && umask 077 && "
            f"echo {API_TOKEN} > {CREDENTIAL} && "
            "install -d /etc/systemd/system/layerwatch.service.d && "
            f"printf '[Service]\\nLoadCredential=api-token:{CREDENTIAL}\\n' "
            "> /etc/systemd/system/layerwatch.service.d/credentials.conf"
        )
        daemon.docker("cp", str(deploy / "demo" / "base"), f"{HOST}:/srv/demo/base")
        running.sh("install -d -m 0700 /var/lib/layerwatch/demo/rw")  # the example's rw dir
        running.sh("systemctl disable --now nats-server.service")  # the package's, no JetStream
        running.sh(
            "systemd-run --unit=nats --property=StateDirectory=nats "
            "/usr/sbin/nats-server --jetstream --store_dir /var/lib/nats --addr 127.0.0.1"
        )
        print(running.sh("layerwatch check /etc/layerwatch/layerwatch.toml"))  # an error fails
        running.sh("systemctl daemon-reload && systemctl enable --now layerwatch")
        yield running
        print(running.journal()[-4000:])  # shown when a test failed


def test_started_by_systemd_healthy_and_hardened(host: Host) -> None:
    """The service runs, `layerwatch status` says healthy, and the process has exactly the
    unit's bounding set, no new privileges, and a seccomp filter."""
    _until("healthy", lambda: host.sh("layerwatch status", check=False).startswith("service: ok"))
    assert host.sh("systemctl is-active layerwatch").strip() == "active"
    pid = host.sh("systemctl show -p MainPID --value layerwatch").strip()
    status = dict(
        line.split(":\t", 1)
        for line in host.sh(f"cat /proc/{pid}/status").splitlines()
        if ":\t" in line
    )
    assert _caps_of(int(status["CapBnd"], 16)) == UNIT_CAPS
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a filter
    mnt_service = host.sh(f"readlink /proc/{pid}/ns/mnt").strip()
    assert mnt_service == host.sh("readlink /proc/1/ns/mnt").strip()  # no mount namespace


def test_a_systemd_credential_is_the_api_token_and_is_never_logged(host: Host) -> None:
    """LoadCredential= hands the token to the hardened service through
    $CREDENTIALS_DIRECTORY, which the config's token_file names: the TCP API accepts that
    token and refuses another, and the journal never holds it."""
    pid = host.sh("systemctl show -p MainPID --value layerwatch").strip()
    environ = host.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert "CREDENTIALS_DIRECTORY=/run/credentials/layerwatch.service" in environ
    status = "layerwatch status --server http://127.0.0.1:8787 --token-file"
    _until("the API on TCP", lambda: host.sh(f"{status} {CREDENTIAL}", check=False) != "")
    assert host.sh(f"{status} {CREDENTIAL}", check=False).startswith("service: ")
    host.sh("echo another-token > /tmp/wrong && chmod 0600 /tmp/wrong")
    refused = host.daemon.call("exec", HOST, "/bin/sh", "-c", f"{status} /tmp/wrong")
    assert refused.returncode == 1
    assert b"401" in refused.stdout + refused.stderr
    assert API_TOKEN not in host.journal()


def test_its_managed_mount_is_the_hosts_and_changes_are_published(host: Host) -> None:
    """The overlay the service mounts is visible to the rest of the host; a change in it is
    in the audit file and in NATS."""
    assert "overlay" in host.sh("findmnt -n -o FSTYPE /srv/demo/merged")
    host.sh("echo hi > /srv/demo/merged/from-the-host")
    pid = int(deploykit.container_pid(host.daemon, HOST))

    def published() -> bool:
        events = [r["event"] for r in deploykit.read_stream(pid, "nats://127.0.0.1:4222")]
        return any(e["data"].get("path") == "/from-the-host" for e in events)

    _until("the event in NATS", published)
    audit = host.sh("cat /var/lib/layerwatch/audit/events.jsonl").splitlines()
    assert any(json.loads(line)["data"].get("path") == "/from-the-host" for line in audit)


def test_reload_is_a_sighup_that_reopens_the_sinks(host: Host) -> None:
    """`systemctl reload` sends SIGHUP: the service asks every sink to reopen, keeps running
    under the same pid, and the sinks reopen before their next batch."""
    pid = host.sh("systemctl show -p MainPID --value layerwatch").strip()
    host.sh("systemctl reload layerwatch")
    _until("reopen_requested", lambda: "reopen_requested" in host.journal())
    host.sh("echo again > /srv/demo/merged/after-reload")
    _until("sink_reopened", lambda: "sink_reopened" in host.journal())
    assert host.sh("systemctl show -p MainPID --value layerwatch").strip() == pid
    assert host.sh("systemctl is-active layerwatch").strip() == "active"


def test_stop_drains_and_unmounts(host: Host) -> None:
    """`systemctl stop`: SIGTERM, a clean exit well within TimeoutStopSec, the mount gone."""
    started = time.monotonic()
    host.sh("systemctl stop layerwatch")
    assert time.monotonic() - started < 15
    assert host.sh("systemctl is-active layerwatch", check=False).strip() == "inactive"
    result = host.sh("systemctl show -p Result --value layerwatch").strip()
    assert result == "success", host.journal()[-2000:]
    assert "service_stopped" in host.journal()
    assert host.sh("findmnt /srv/demo/merged", check=False) == ""
