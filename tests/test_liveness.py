"""Liveness from the transport: a peer process that is killed is known at once (ICMP port
unreachable on its host), one that is frozen once it has been silent for ``lost_after``;
a peer that is only busy keeps its connection. Real QUIC, peers in their own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import ConnectionClosed, NetError, QuicSettings, connect, serve

HOST = "127.0.0.1"
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(sys.platform != "linux", reason="ICMP reports are Linux's"),
]

SERVER = textwrap.dedent("""
    import asyncio, sys
    from llm_omninode.net import frames as F
    from llm_omninode.net.admission import Admission
    from llm_omninode.net.identity import NodeIdentity
    from llm_omninode.net.quic import serve

    async def handler(peer, frame, stream):
        await asyncio.sleep(float(frame.header.get("sleep", 0)))
        return F.response_frame(frame.id)

    async def main():
        server = await serve("127.0.0.1", 0, NodeIdentity.generate(), Admission.open_mode(),
                             handler)
        print(server.port, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")

CLIENT = textwrap.dedent("""
    import asyncio, sys
    from llm_omninode.net import frames as F
    from llm_omninode.net.admission import Admission
    from llm_omninode.net.identity import NodeIdentity
    from llm_omninode.net.quic import connect

    async def main():
        conn = await connect("127.0.0.1", int(sys.argv[1]), NodeIdentity.generate(),
                             Admission.open_mode())
        print("connected", flush=True)
        await conn.request(F.request_frame(conn.next_id(), "wait"), timeout=3600)

    asyncio.run(main())
""")


@contextlib.contextmanager
def _server() -> Iterator[tuple[subprocess.Popen, int]]:
    """A QUIC server in a process of its own, and its port; killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()


async def _closed_within(conn, bound: float) -> float:
    t0 = time.monotonic()
    while not conn.closed:
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"connection still open after {bound} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def test_a_killed_server_is_lost_at_once():
    settings = QuicSettings(keepalive=0.5, lost_after=30.0)

    async def main(proc: subprocess.Popen, port: int):
        conn = await connect(HOST, port, NodeIdentity.generate(), Admission.open_mode(),
                             settings=settings)  # fmt: skip
        waiting = asyncio.ensure_future(
            conn.request(F.request_frame(conn.next_id(), "slow", sleep=60), timeout=120)
        )
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        took = await _closed_within(conn, 5.0)  # the next ping meets a closed port
        with pytest.raises((ConnectionClosed, NetError)) as info:
            await waiting
        assert "unreachable" in str(info.value)
        print(f"killed server: lost after {took:.2f} s")
        await conn.close()

    with _server() as (proc, port):
        asyncio.run(main(proc, port))


def test_a_frozen_server_is_lost_once_silent():
    settings = QuicSettings(keepalive=0.2, lost_after=1.5)

    async def main(proc: subprocess.Popen, port: int):
        conn = await connect(HOST, port, NodeIdentity.generate(), Admission.open_mode(),
                             settings=settings)  # fmt: skip
        await asyncio.sleep(2.5)  # idle but answering pings: kept
        assert not conn.closed
        os.kill(proc.pid, signal.SIGSTOP)
        took = await _closed_within(conn, 6.0)
        assert took >= 1.0
        print(f"frozen server: lost after {took:.2f} s")
        await conn.close()

    with _server() as (proc, port):
        asyncio.run(main(proc, port))


def test_a_killed_client_is_dropped_by_the_server_at_once():
    settings = QuicSettings(keepalive=0.5, lost_after=30.0)
    ended = []

    async def handler(peer, frame, stream):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ended.append(time.monotonic())
            raise

    async def main():
        server = await serve(HOST, 0, NodeIdentity.generate(), Admission.open_mode(), handler,
                             settings)  # fmt: skip
        try:
            proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.port)],
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
            assert proc.stdout is not None
            await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
            for _ in range(100):
                if server.peers:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # its request is being handled
            t0 = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # the server learns at its next packet to the client: its handler ends
            while not ended and time.monotonic() - t0 < 5.0:
                await asyncio.sleep(0.02)
            assert ended, "the killed client's request is still being served"
            print(f"killed client: handler cancelled after {ended[0] - t0:.2f} s")
        finally:
            server.close()

    asyncio.run(main())


def test_a_busy_peer_keeps_its_connection():
    """A server whose handler takes longer than lost_after still answers pings: not lost."""
    settings = QuicSettings(keepalive=0.2, lost_after=1.0)

    async def main(port: int):
        conn = await connect(HOST, port, NodeIdentity.generate(), Admission.open_mode(),
                             settings=settings)  # fmt: skip
        reply = await conn.request(F.request_frame(conn.next_id(), "slow", sleep=3), timeout=10)
        assert reply.type == F.FrameType.RESPONSE
        assert not conn.closed
        await conn.close()

    with _server() as (_, port):
        asyncio.run(main(port))
