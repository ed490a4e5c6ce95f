"""The service under test: ``layerwatch run CONFIG`` in its own process, the way an operator
runs it (stdout to a file per run, JSON logs on stderr), and its HTTP API on the unix socket.

Every request has a timeout; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from soakkit.outputs import RunFiles

__all__ = ["ApiError", "Service"]


class ApiError(Exception):
    """The API could not be reached, or answered with an error status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Service:
    """Starts, stops, signals and questions one ``layerwatch run`` process at a time.

    Args:
        config: the TOML file.
        socket: the API's unix socket.
        logs: where each run's stderr goes (``run-N.err``).
        out: where each run's stdout goes (``stdout-N.jsonl``), read by ``stdout``.
        stdout: the stdout sink's output reader.
        env: the process's environment.
        command: the ``layerwatch`` executable.
    """

    config: Path
    socket: Path
    logs: Path
    out: Path
    stdout: RunFiles
    env: Mapping[str, str]
    command: str = "layerwatch"
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    expected_down: bool = True
    frozen: bool = False
    started_at: float = 0.0
    peak_rss_kib: int = 0
    rss_kib: int = 0
    rss_by_run: dict[int, int] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stderr_path(self, run: int | None = None) -> Path:
        return self.logs / f"run-{run or self.runs}.err"

    async def start(self, ready_within: float, mounts: Sequence[str]) -> float | None:
        """Start a run; seconds until its API lists every mount of ``mounts`` (each one
        followed), or None if it did not in time (or the process exited first)."""
        assert self.proc is None or self.proc.poll() is not None, "a run is still going"
        self.runs += 1
        stdout_file = self.out / f"stdout-{self.runs}.jsonl"
        self.stdout.begin_run(stdout_file)
        self.proc = await asyncio.to_thread(self._spawn, stdout_file)
        self.expected_down = False
        self.frozen = False
        self.started_at = time.monotonic()
        deadline = self.started_at + ready_within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return None
            with contextlib.suppress(ApiError, KeyError, TypeError):
                listed = await self.request("GET", "/v1/mounts", within=2.0)
                if set(mounts) <= {m["name"] for m in listed["mounts"]}:
                    return time.monotonic() - self.started_at
            await asyncio.sleep(0.2)
        return None

    def _spawn(self, stdout_file: Path) -> subprocess.Popen[bytes]:
        with stdout_file.open("wb") as out, self.stderr_path().open("wb") as err:
            return subprocess.Popen(
                [self.command, "run", str(self.config)],
                stdout=out,
                stderr=err,
                env=dict(self.env),
                start_new_session=True,  # a Ctrl-C of the harness reaches it only through us
            )

    def alive(self) -> bool:
        """Whether the process is running (or stopped by SIGSTOP)."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap (expected: the harness did it)."""
        self.expected_down = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.frozen = False

    async def terminate(self, deadline: float) -> tuple[float, int | None]:
        """SIGTERM; the seconds until it exited and its status (None: it did not exit within
        ``deadline`` + 10 s and was killed)."""
        self.expected_down = True
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, None if self.proc is None else self.proc.returncode
        if self.frozen:
            self.cont()
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.to_thread(self.proc.wait, deadline + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return time.monotonic() - started, None
        return time.monotonic() - started, status

    def stop(self) -> None:
        """SIGSTOP the process."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)
            self.frozen = True

    def cont(self) -> None:
        """SIGCONT it."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def sample_rss(self) -> int | None:
        """The process's VmRSS in KiB (and the peaks so far)."""
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.pid}/status", "rb") as status:
                for line in status:
                    if line.startswith(b"VmRSS:"):
                        kib = int(line.split()[1])
                        self.rss_kib = kib
                        self.peak_rss_kib = max(self.peak_rss_kib, kib)
                        self.rss_by_run[self.runs] = max(self.rss_by_run.get(self.runs, 0), kib)
                        return kib
        except (OSError, ValueError):
            return None
        return None

    def stderr_tail(self, lines: int = 6, run: int | None = None) -> str:
        """The last error-ish lines of a run's stderr (tracebacks, error logs)."""
        try:
            text = self.stderr_path(run).read_bytes()[-200_000:].decode(errors="replace")
        except OSError:
            return ""
        keep = [line for line in text.splitlines() if line.strip()]
        errors = [
            line
            for line in keep
            if '"level": "error"' in line or '"level":"error"' in line or "Error" in line
        ]
        return " | ".join((errors or keep)[-lines:])[-1500:]

    def log_events(self, name: str, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log entries of a run whose ``event`` is ``name``."""
        out = []
        try:
            with self.stderr_path(run).open("rb") as err:
                for line in err:
                    if name.encode() in line:
                        with contextlib.suppress(orjson.JSONDecodeError):
                            entry = orjson.loads(line)
                            if isinstance(entry, dict) and entry.get("event") == name:
                                out.append(entry)
        except OSError:
            pass
        return out

    # -- the API --------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, *, body: object = None, within: float = 10.0
    ) -> Any:
        """One request on the unix socket; the JSON answer (or text for non-JSON).

        Raises:
            ApiError: unreachable, timed out, or an error status (503 of /healthz is fine).
        """
        if self._session is None:
            connector = aiohttp.UnixConnector(path=str(self.socket), force_close=True)
            self._session = aiohttp.ClientSession("http://layerwatch", connector=connector)
        try:
            async with self._session.request(
                method,
                path,
                data=orjson.dumps(body) if body is not None else None,
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=aiohttp.ClientTimeout(total=within),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400 and not (path == "/healthz" and resp.status == 503):
                    raise ApiError(f"{method} {path}: {resp.status} {raw[:300]!r}", resp.status)
                if resp.content_type == "application/json":
                    return orjson.loads(raw)
                return raw.decode(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ApiError(f"{method} {path}: {exc!r}") from exc

    async def first_seq(self, within: float = 10.0) -> int | None:
        """The sequence number of the oldest event the spool holds (``/v1/events?since=0``,
        first frame); None if it cannot be read."""
        if self._session is None:
            with contextlib.suppress(ApiError):
                await self.request("GET", "/healthz", within=within)
        if self._session is None:
            return None
        try:
            async with asyncio.timeout(within), self._session.get("/v1/events?since=0") as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        return int(orjson.loads(line[5:])["sequence"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
            return None
        return None

    async def metric(self, name: str) -> float | None:
        """One unlabelled value of ``/metrics`` (``layerwatch_`` + name)."""
        try:
            text = await self.request("GET", "/metrics", within=5.0)
        except ApiError:
            return None
        for line in str(text).splitlines():
            if line.startswith(f"layerwatch_{name} "):
                return float(line.split()[1])
        return None

    async def close(self) -> None:
        """Close the API session; SIGKILL a run that is still going (clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
            self.kill()
        session, self._session = self._session, None
        if session is not None:
            await session.close()
