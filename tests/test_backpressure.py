"""What one stream can make a node hold: ``FrameStream.send`` waits while the peer has more
than ``send_high_water`` bytes of the stream left to read, and gives up (resetting the stream)
on a peer that reads nothing for ``request_timeout``. Real QUIC on loopback, in process."""

from __future__ import annotations

import asyncio

from llm_omninode.net import frames as F
from llm_omninode.net import tls
from llm_omninode.net.admission import Admission
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import ConnectionClosed, QuicSettings, connect, serve

HOST = "127.0.0.1"
MiB = 1024 * 1024
FRAMES = 24  # 1 MiB each
SERVER = QuicSettings(request_timeout=1.0, send_high_water=2 * MiB, connect_timeout=5.0)


def arun(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Firehose:
    """``firehose``: FRAMES frames of 1 MiB on one stream; records the queue after each send."""

    def __init__(self) -> None:
        self.backlogs: list[int] = []
        self.gave_up: list[str] = []

    async def __call__(self, peer: str, frame: F.Frame, stream) -> F.Frame | None:
        if frame.header.get("method") != "firehose":
            return F.response_frame(frame.id, b"still here")
        quic = stream._protocol._quic
        try:
            for i in range(FRAMES):
                await stream.send(F.stream_data_frame(frame.id, i, bytes([i]) * MiB))
                self.backlogs.append(tls.stream_backlog(quic, stream.stream_id) or 0)
        except ConnectionClosed as exc:
            self.gave_up.append(str(exc))
            raise
        return F.stream_end_frame(frame.id)


def test_send_waits_for_the_reader_and_gives_up_on_a_stalled_one():
    handler = Firehose()
    client_id = NodeIdentity.generate()

    async def main():
        server = await serve(HOST, 0, NodeIdentity.generate(), Admission.open_mode(), handler,
                             SERVER)  # fmt: skip
        try:
            # an honest reader gets everything, and the node never queued much for it
            conn = await connect(HOST, server.port, client_id, Admission.open_mode())
            got = [f async for f in conn.stream(F.request_frame(1, "firehose"), timeout=10)]
            assert [f.payload for f in got[:-1]] == [bytes([i]) * MiB for i in range(FRAMES)]
            assert max(handler.backlogs) <= SERVER.send_high_water + MiB + 1024
            assert handler.gave_up == []
            # a reader that asks and never grants more flow-control credit
            stingy = QuicSettings(max_data=256 * 1024, max_stream_data=64 * 1024)
            stalled = await connect(HOST, server.port, client_id, Admission.open_mode(),
                                    settings=stingy)  # fmt: skip
            quic = stalled._protocol._quic
            quic._write_connection_limits = lambda *a, **k: None
            quic._write_stream_limits = lambda *a, **k: None
            stream = stalled._protocol.open_stream()
            stream.end(F.request_frame(2, "firehose"))
            while not handler.gave_up:  # the node resets the stream after request_timeout
                await asyncio.sleep(0.05)
            assert "read nothing" in handler.gave_up[0]
            # it stopped queueing at the high water: 2 MiB queued, the third send waited
            assert len(handler.backlogs) - FRAMES <= SERVER.send_high_water // MiB
            # both connections still serve
            for c in (stalled, conn):
                assert (await c.request(F.request_frame(3, "echo"), timeout=10)).payload
            await stalled.close()
            await conn.close()
        finally:
            server.close()

    arun(main())
