"""Test kit for sink authors: in-memory parts, real server processes and the sink checks.

In ``records`` (events to send), ``fakes`` (in-memory parts), ``servers`` (real broker
processes) and ``checks`` (the sink checks); every name is re-exported here.

In-memory parts:

- ``make_records``: simple encoded change events (``io.layerwatch.change``) to feed a sink.
- ``mixed_records``: a realistic stream: changes of several mounts (some with non-UTF-8
  paths), snapshot bounds and service-wide bookmarks.
- ``change_list_records``: events of three mounts and the change lists a consumer must
  rebuild from them; ``send_change_lists`` sends them the way a retrying runner does.
- ``batches`` and ``send_stream``: cut records into batches; send them one after the other.
- ``MemoryLog``: an in-memory log with the runner's ``EventLog`` interface
  (``watcher.delivery.runner``).
- ``MemorySink``: records every batch it is sent.
- ``FlakySink``: a ``MemorySink`` that fails its first sends (unavailable, rejected, an
  unexpected error, or hanging forever), to exercise a runner's retries and deadlines.

Real servers and delivery:

- ``free_port`` and ``ServerProcess``: start a broker on a free loopback port, wait until it
  accepts connections, SIGKILL or stop it, and start it again on the same data dir.
- ``opened``: an opened sink for an ``async with`` block.
- ``deliver`` and ``open_when_ready``: retry ``send`` / ``open`` until accepted, with the
  runner's backoff (``watcher.delivery.runner.backoff_delay``).
- ``deliver_through_restart``: a stream delivered while the server is killed mid-stream and
  restarted.

Checks (each raises ``AssertionError`` naming what failed; call them from your tests):

- ``check_sink_contract``: what every sink must do.
- ``check_option_error``: a bad option is a ``ConfigError`` naming ``sinks.NAME.OPTION``.
- ``check_unreachable``: a sink whose server is down is unavailable and unhealthy.
- ``check_delivered``: what a destination holds against what was sent (once, in mount order).
- ``readme_example``: run a README's consumer example.

Example::

    async def test_contract(tmp_path: Path) -> None:
        await check_sink_contract(MySink, {"url": server_url})


    async def test_kill(my_server: ServerProcess) -> None:
        sent = mixed_records(1000)
        async with opened(MySink("s", {"url": my_url})) as sink:
            assert await deliver_through_restart(sink, my_server, sent) >= 1
        check_delivered(sent, await read_back_ids())
"""

from __future__ import annotations

from watcher.testing.checks import (
    check_delivered,
    check_option_error,
    check_sink_contract,
    check_unreachable,
    deliver,
    deliver_through_restart,
    open_when_ready,
    opened,
    readme_example,
    send_change_lists,
    send_stream,
)
from watcher.testing.fakes import FlakySink, MemoryLog, MemorySink
from watcher.testing.records import (
    MOUNTS,
    batches,
    change_list_records,
    make_records,
    mixed_records,
)
from watcher.testing.servers import ServerProcess, free_port

__all__ = [
    "MOUNTS",
    "FlakySink",
    "MemoryLog",
    "MemorySink",
    "ServerProcess",
    "batches",
    "change_list_records",
    "check_delivered",
    "check_option_error",
    "check_sink_contract",
    "check_unreachable",
    "deliver",
    "deliver_through_restart",
    "free_port",
    "make_records",
    "mixed_records",
    "open_when_ready",
    "opened",
    "readme_example",
    "send_change_lists",
    "send_stream",
]
