"""In-process peers of a real shim process: a member, a stranger, a raw QUIC client.

The shim is a real ``omni-shim`` (tests/support/shim_cluster.py); the peers here speak real QUIC to
it from the test process, so a test can send what no honest node would. ``LiveShim`` also
checks what every hostile-peer test ends with: the node still answers, and its store is
exactly what it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aioquic.asyncio.client import connect as raw_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from llm_omninode.backend.store import ShardStore
from llm_omninode.home import SHIM_STATE_FILE
from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission, parse_secret
from llm_omninode.net.frames import Frame, FrameType
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import Connection, ConnectionClosed, QuicSettings, connect
from support.shim_cluster import ShimCluster

HOST = "127.0.0.1"
SETTINGS = QuicSettings(connect_timeout=10.0, join_timeout=5.0, request_timeout=30.0)


def arun(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS) or its peak (VmHWM), KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise LookupError(field_name)


@dataclass
class LiveShim:
    """Node ``index`` of ``cluster``, seen from the test process."""

    cluster: ShimCluster
    member: NodeIdentity = field(default_factory=NodeIdentity.generate)
    index: int = 0

    @property
    def port(self) -> int:
        return self.cluster.ports[self.index]

    @property
    def node_id(self) -> str:
        return self.cluster.node_ids[self.index]

    @property
    def pid(self) -> int:
        return self.cluster.procs[self.index].pid

    @property
    def secret(self) -> bytes:
        return parse_secret(self.cluster.secret)

    @property
    def store(self) -> ShardStore:
        return ShardStore(self.cluster.dirs[self.index])

    async def connect(
        self,
        identity: NodeIdentity | None = None,
        admission: Admission | None = None,
        settings: QuicSettings = SETTINGS,
    ) -> Connection:
        """A member's connection by default; pass another identity/admission to be someone else."""
        return await connect(
            HOST,
            self.port,
            identity or self.member,
            admission or Admission(secret=self.secret),
            expected_node_id=self.node_id,
            settings=settings,
        )

    # ---- what every hostile-peer test ends with ----------------------------------------
    def snapshot(self) -> dict[str, str]:
        """sha256 of every file of the node's data dir that holds state (not logs, not tmp)."""
        root = self.cluster.dirs[self.index]
        out = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel != SHIM_STATE_FILE and not rel.startswith("tmp/"):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    async def answers(self) -> None:
        """A fresh member connection gets HELLO and ``models`` answered."""
        conn = await self.connect()
        try:
            info = await conn.request(F.hello_frame(conn.next_id(), self.member.node_id, "t"))
            assert info.type == FrameType.INFO and info.header["node_id"] == self.node_id
            reply = await conn.request(F.request_frame(conn.next_id(), "models"))
            assert isinstance(reply.header["models"], dict), reply.header
        finally:
            await conn.close()

    def assert_intact(self, before: dict[str, str]) -> None:
        """The process runs, answers a normal request, and its store lost nothing."""
        assert self.cluster.procs[self.index].poll() is None, self.cluster.log(self.index)
        arun(self.answers(), 30)
        assert self.snapshot() == before
        store = self.store
        for model_id in store.manifests():
            for shard in store.get_manifest(model_id).shards:
                assert store.verify(shard.cid), shard.name
        for cid in store.shards():
            assert store.verify(cid), cid


# ---- talking to a stream without the rules ------------------------------------------------


async def exchange_raw(conn: Connection, data: bytes, timeout: float = 20.0) -> list[Frame] | str:
    """Write ``data`` unframed on a new stream of ``conn`` and end it; the frames answered,
    or ``"reset"`` if the node reset the stream."""
    stream = conn._protocol.open_stream()
    stream.write_raw(data, end_stream=True)
    answers: list[Frame] = []
    try:
        while (frame := await stream.recv(timeout=timeout)) is not None:
            answers.append(frame)
    except ConnectionClosed:
        return "reset"
    finally:
        conn._protocol.forget_stream(stream.stream_id)
    return answers


def error_code(answers: list[Frame] | str) -> str:
    """The code of the single ERROR frame answered (the test fails on anything else)."""
    assert isinstance(answers, list) and len(answers) == 1, answers
    assert answers[0].type == FrameType.ERROR, answers[0]
    return answers[0].header["code"]


class RawClient(QuicConnectionProtocol):
    """aioquic with no OmniNode rules: records what the node sends and how it closes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.terminated: events.ConnectionTerminated | None = None
        self.received: dict[int, bytes] = {}

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, events.StreamDataReceived):
            self.received[event.stream_id] = self.received.get(event.stream_id, b"") + event.data
        super().quic_event_received(event)


async def raw_session(
    port: int,
    identity: NodeIdentity | None,
    streams: Sequence[bytes] | Callable[[RawClient], Sequence[bytes]],
    wait: float = 15.0,
) -> RawClient:
    """Handshake (with ``identity``'s certificate if given), then write each of ``streams``
    (or of what it returns for the handshaken client) on its own new stream at once, and wait
    for the node to close the connection."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["omni/1"], verify_mode=ssl.CERT_NONE)
    if identity is not None:
        config.certificate = identity.certificate
        config.private_key = identity.private_key
    async with raw_connect(HOST, port, configuration=config, create_protocol=RawClient) as client:
        for data in streams(client) if callable(streams) else streams:
            stream_id = client._quic.get_next_available_stream_id()
            client._quic.send_stream_data(stream_id, data, end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.wait_closed(), wait)
        return client
