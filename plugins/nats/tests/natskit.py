"""What the NATS sink tests need beyond ``watcher.testing``: the server and reading a stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nats

from watcher.delivery.events import Record
from watcher.testing import ServerProcess, check_delivered


class NatsServer(ServerProcess):
    """A ``nats-server`` process."""

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.address}"

    @property
    def server_name(self) -> str:
        """The ``--server_name`` it was started with."""
        return self.argv[self.argv.index("--server_name") + 1]


@dataclass(frozen=True)
class Stored:
    """One message as the stream holds it."""

    subject: str
    msg_id: str
    body: bytes


async def read_stream(url: str, stream: str = "LAYERWATCH") -> list[Stored]:
    """Every message of ``stream``, in stream order."""
    nc = await nats.connect(servers=[url], connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            assert msg.subject is not None
            assert msg.headers is not None
            out.append(Stored(msg.subject, msg.headers["Nats-Msg-Id"], msg.data or b""))
        return out
    finally:
        await nc.close()


def check_stored(stored: Sequence[Stored], sent: Sequence[Record]) -> None:
    """Every sent record is stored once, with its body, each mount's records in seq order."""
    check_delivered(sent, [item.msg_id for item in stored])
    by_id = {record.id: record for record in sent}
    for item in stored:
        assert item.body == by_id[item.msg_id].body
