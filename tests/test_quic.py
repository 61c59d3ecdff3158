"""Authenticated QUIC endpoints over loopback: who gets in, and what admitted peers can do."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

import pytest
from aioquic.asyncio.client import connect as raw_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration

from llm_omninode.net import frames as F
from llm_omninode.net import tls
from llm_omninode.net.admission import Admission
from llm_omninode.net.frames import FrameType
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import (
    CloseCode,
    ConnectionClosed,
    NetError,
    PeerRefused,
    QuicSettings,
    RemoteError,
    connect,
    serve,
)
from llm_omninode.net.settings import LOOPBACK_DATAGRAM_SIZE

HOST = "127.0.0.1"
CID = "bafkr4i" + "b" * 52
LOG = "llm_omninode.net.quic"
FAST = QuicSettings(connect_timeout=5.0, join_timeout=2.0, request_timeout=10.0)


def arun(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder:
    """A handler covering request/response, streaming, channels and failures."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, FrameType]] = []

    async def __call__(self, peer: str, frame: F.Frame, stream) -> F.Frame | None:
        self.calls.append((peer, frame.type))
        if frame.type == FrameType.HELLO:
            return F.info_frame(frame.id, stream_node_id, "0.1.0", "cpu", 1 << 30, [CID])
        if frame.type == FrameType.SHARD_READ:
            data = bytes(range(256)) * (frame.header["length"] // 256)
            return F.shard_data_frame(frame.id, frame.header["cid"], frame.header["offset"], data)
        method = frame.header.get("method")
        if method == "echo":
            return F.response_frame(frame.id, frame.payload, peer=peer)
        if method == "count":
            for i in range(frame.header["n"]):
                await stream.send(F.stream_data_frame(frame.id, i, str(i).encode()))
            return F.stream_end_frame(frame.id)
        if method == "channel":  # echo every HIDDEN frame until the client ends its side
            async for item in stream:
                ids = F.token_ids(item)
                await stream.send(F.token_frame(item.header["seq"], [i + 1 for i in ids]))
            return None
        if method == "fail":
            raise RuntimeError("handler bug")
        return F.error_frame(F.ErrorCode.UNSUPPORTED, f"no method {method}", frame.id)


stream_node_id = NodeIdentity.generate().node_id  # what INFO frames claim in these tests


@pytest.fixture
def ids():
    return NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()


# ---- aioquic internals (net/tls.py): fail loudly if they move ------------------------------


def test_aioquic_internals_still_there(ids):
    """net/tls.py leans on aioquic internals; this fails loudly when they move."""
    tls.check_internals()
    server_id, client_id, _ = ids
    config = QuicSettings().quic_configuration(server_id, is_client=False, host=HOST)
    assert config.alpn_protocols == ["omni/1"]
    assert config.session_ticket is None and config.verify_mode == ssl.CERT_NONE

    async def main():
        server = await serve(HOST, 0, server_id, Admission.open_mode(), Recorder(), FAST)
        try:
            conn = await connect(HOST, server.port, client_id, Admission.open_mode(), None, FAST)
            server_side = next(iter(server._protocols))
            assert server_side._quic.tls._request_client_certificate is True
            # the server really received (and aioquic verified) the client's certificate
            assert tls.peer_certificate(server_side._quic) == client_id.certificate
            assert tls.peer_certificate(conn._protocol._quic) == server_id.certificate
            assert server_side.binding == tls.session_binding(conn._protocol._quic)
            await conn.close()
        finally:
            server.close()

    arun(main())


def test_datagram_size_follows_the_address():
    settings = QuicSettings()
    loopback = settings.datagram_size("127.0.0.1")
    assert loopback == settings.datagram_size("::1") == LOOPBACK_DATAGRAM_SIZE > 16384
    assert settings.datagram_size("192.168.1.20") == 1452
    assert QuicSettings(max_datagram_size=1200).datagram_size("127.0.0.1") == 1200


def _record_sends(transport) -> list[int]:
    """Sizes of the datagrams ``transport`` sends from now on."""
    sizes: list[int] = []
    send = transport.sendto

    def sendto(data, addr=None):
        sizes.append(len(data))
        send(data, addr)

    transport.sendto = sendto
    return sizes


def test_loopback_packets_are_wide_and_acks_ride_with_data(ids):
    """On loopback a packet carries ~64 KB of a stream (aioquic alone: at most 16 KiB), and
    an answer's packet carries the ACK of what it answers (aioquic alone: one more packet)."""
    server_id, client_id, _ = ids

    async def main():
        server = await serve(HOST, 0, server_id, Admission.open_mode(), Recorder(), FAST)
        try:
            conn = await connect(HOST, server.port, client_id, Admission.open_mode(), None, FAST)
            served = _record_sends(server._quic_server._transport)
            window = 4 * 1024 * 1024
            data = await conn.request(F.shard_read_frame(conn.next_id(), CID, 0, window))
            assert len(data.payload) == window
            assert 16384 < max(served) <= LOOPBACK_DATAGRAM_SIZE
            assert len(served) < window / 16384 / 2

            sent = _record_sends(conn._transport)
            channel = await conn.channel(F.request_frame(conn.next_id(), "channel"))
            steps = 100
            for step in range(steps):  # a decode loop: one frame out, one back, in turn
                await channel.send(F.token_frame("seq", [step]))
                assert F.token_ids(await channel.recv(timeout=5)) == [step + 1]
            # one datagram a step; aioquic alone adds a standalone ACK 1 ms after each answer
            # that the next step does not beat (~30 here); a few spare for a keepalive ping
            # or a late step on a loaded machine
            assert len(sent) < steps * 1.15
            channel.end()
            await conn.close()
        finally:
            server.close()

    arun(main())


# ---- admitted peers -----------------------------------------------------------------------


def test_admitted_peer_requests_streams_and_channels(ids):
    server_id, client_id, _ = ids
    secret = os.urandom(32)
    handler = Recorder()

    async def main():
        server = await serve(HOST, 0, server_id, Admission(secret=secret), handler, FAST)
        try:
            conn = await connect(
                HOST, server.port, client_id, Admission(secret=secret), server_id.node_id, FAST
            )
            assert conn.peer_id == server_id.node_id and conn.node_id == client_id.node_id
            assert server.peers == [client_id.node_id]

            reply = await conn.request(F.request_frame(conn.next_id(), "echo", b"ping"))
            assert reply.type == FrameType.RESPONSE and reply.payload == b"ping"
            assert reply.header["peer"] == client_id.node_id  # handler saw the proven id

            info = await conn.request(F.hello_frame(conn.next_id(), client_id.node_id, "0.1"))
            assert info.type == FrameType.INFO and info.header["shards"] == [CID]

            items = [f async for f in conn.stream(F.request_frame(conn.next_id(), "count", n=5))]
            assert [f.payload for f in items[:-1]] == [b"0", b"1", b"2", b"3", b"4"]
            assert items[-1].type == FrameType.STREAM_END and items[-1].flags == F.FLAG_LAST

            channel = await conn.channel(F.request_frame(conn.next_id(), "channel"))
            for step in range(5):  # a decode loop: one token id out, one back
                await channel.send(F.token_frame("seq-9", [step * 10]))
                back = await channel.recv(timeout=5)
                assert F.token_ids(back) == [step * 10 + 1]
            channel.end()
            assert await channel.recv(timeout=5) is None

            broken = await conn.channel(F.request_frame(conn.next_id(), "channel"))
            await broken.send(F.token_frame(1, [1]))
            assert F.token_ids(await broken.recv(timeout=5)) == [2]
            broken.write_raw(b"OMNI garbage in the middle of a channel", end_stream=True)
            error = await broken.recv(timeout=5)
            assert error.type == FrameType.ERROR and error.header["code"] == "bad_frame"
            assert await broken.recv(timeout=5) is None

            replies = await asyncio.gather(
                *(conn.request(F.request_frame(i, "echo", bytes([i]))) for i in range(100, 160))
            )
            assert [r.payload for r in replies] == [bytes([i]) for i in range(100, 160)]

            window = 8 * 1024 * 1024
            data = await conn.request(F.shard_read_frame(conn.next_id(), CID, 0, window))
            assert data.payload == bytes(range(256)) * (window // 256)

            with pytest.raises(RemoteError) as failed:
                await conn.request(F.request_frame(conn.next_id(), "fail"))
            assert failed.value.code == F.ErrorCode.INTERNAL
            with pytest.raises(RemoteError) as unknown:
                await conn.request(F.request_frame(conn.next_id(), "nope"))
            assert unknown.value.code == F.ErrorCode.UNSUPPORTED
            # still serving after handler errors
            assert (await conn.request(F.request_frame(1, "echo", b"x"))).payload == b"x"

            # both ends share one session binding; another connection gets another one
            server_side = next(iter(server._protocols))
            binding = conn._protocol.binding
            assert server_side.binding == binding and len(binding) >= 32
            assert not tls.session_resumed(conn._protocol._quic)
            members = Admission(secret=secret)
            conn2 = await connect(HOST, server.port, client_id, members, None, FAST)
            assert conn2._protocol.binding != conn._protocol.binding
            await conn2.close()
            await conn.close()
            assert conn.closed
            with pytest.raises(NetError):
                await conn.request(F.request_frame(1, "echo"))
        finally:
            server.close()

    arun(main())
    assert {peer for peer, _ in handler.calls} == {client_id.node_id}


def test_open_mode_admits_anyone(ids):
    server_id, client_id, _ = ids
    handler = Recorder()

    async def main():
        server = await serve(HOST, 0, server_id, Admission.open_mode(), handler, FAST)
        try:
            # the client knows nothing of the server but its id, and trusts that
            client_policy = Admission(trusted=frozenset({server_id.node_id}))
            conn = await connect(HOST, server.port, client_id, client_policy, None, FAST)
            assert (await conn.request(F.request_frame(1, "echo", b"o"))).payload == b"o"
            await conn.close()
        finally:
            server.close()

    arun(main())


# ---- refusals -----------------------------------------------------------------------------


def _refusal_logged(caplog, node_id: str, reason: str) -> bool:
    return any(
        r.name == LOG
        and r.levelno == logging.WARNING
        and node_id in r.getMessage()
        and "127.0.0.1:" in r.getMessage()
        and reason in r.getMessage()
        for r in caplog.records
    )


def test_trust_list_admits_listed_and_refuses_unknown_key(ids, caplog):
    server_id, friend, stranger = ids
    handler = Recorder()
    server_policy = Admission(trusted=frozenset({friend.node_id}))
    client_policy = Admission(trusted=frozenset({server_id.node_id}))

    async def main():
        server = await serve(HOST, 0, server_id, server_policy, handler, FAST)
        try:
            conn = await connect(HOST, server.port, friend, client_policy, server_id.node_id, FAST)
            assert (await conn.request(F.request_frame(1, "echo", b"f"))).payload == b"f"
            await conn.close()
            with pytest.raises(PeerRefused) as refused:
                await connect(HOST, server.port, stranger, client_policy, server_id.node_id, FAST)
            assert refused.value.code == CloseCode.REFUSED
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        arun(main())
    assert _refusal_logged(caplog, stranger.node_id, "unknown node id")
    assert {peer for peer, _ in handler.calls} == {friend.node_id}


def test_wrong_secret_is_refused(ids, caplog):
    server_id, client_id, _ = ids
    handler = Recorder()

    async def main():
        server = await serve(HOST, 0, server_id, Admission(secret=os.urandom(32)), handler, FAST)
        try:
            with pytest.raises(PeerRefused) as refused:
                await connect(
                    HOST, server.port, client_id, Admission(secret=os.urandom(32)), None, FAST
                )
            assert refused.value.code == CloseCode.REFUSED
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        arun(main())
    assert _refusal_logged(caplog, client_id.node_id, "bad cluster proof")
    assert handler.calls == []


def test_client_refuses_server_with_another_key_or_no_membership(ids, caplog):
    server_id, client_id, other = ids
    secret = os.urandom(32)
    handler = Recorder()

    async def main():
        server = await serve(HOST, 0, server_id, Admission(secret=secret), handler, FAST)
        open_server = await serve(HOST, 0, other, Admission.open_mode(), handler, FAST)
        try:
            with pytest.raises(PeerRefused) as wrong_key:
                await connect(
                    HOST, server.port, client_id, Admission(secret=secret), other.node_id, FAST
                )
            assert wrong_key.value.code == CloseCode.BAD_CERTIFICATE
            # an open server admits us, but cannot prove membership of our cluster
            with pytest.raises(PeerRefused) as not_member:
                members = Admission(secret=secret)
                await connect(HOST, open_server.port, client_id, members, None, FAST)
            assert not_member.value.code == CloseCode.REFUSED
        finally:
            server.close()
            open_server.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        arun(main())
    assert _refusal_logged(caplog, server_id.node_id, "expected " + other.node_id)
    assert _refusal_logged(caplog, other.node_id, "no cluster proof")
    assert handler.calls == []


def test_replayed_proof_is_refused(ids, caplog, monkeypatch):
    server_id, client_id, _ = ids
    secret = os.urandom(32)
    handler = Recorder()
    recorded: list[bytes] = []
    honest_proof = Admission.proof

    def recording_proof(self, role, client, server, binding):
        proof = honest_proof(self, role, client, server, binding)
        if role == "client":
            recorded.append(proof)
        return proof

    def replaying_proof(self, role, client, server, binding):
        if role == "client":
            return recorded[0]
        return honest_proof(self, role, client, server, binding)

    async def main():
        server = await serve(HOST, 0, server_id, Admission(secret=secret), handler, FAST)
        try:
            monkeypatch.setattr(Admission, "proof", recording_proof)
            conn = await connect(HOST, server.port, client_id, Admission(secret=secret), None, FAST)
            await conn.close()
            monkeypatch.setattr(Admission, "proof", replaying_proof)
            with pytest.raises(PeerRefused) as refused:
                await connect(HOST, server.port, client_id, Admission(secret=secret), None, FAST)
            assert refused.value.code == CloseCode.REFUSED
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        arun(main())
    assert len(recorded) == 1
    assert _refusal_logged(caplog, client_id.node_id, "replayed")


# ---- peers that skip steps (raw aioquic clients) ------------------------------------------


class RawClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.terminated: events.ConnectionTerminated | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        super().quic_event_received(event)


async def _raw_session(port: int, identity: NodeIdentity | None, send: bytes | None):
    config = QuicConfiguration(is_client=True, alpn_protocols=["omni/1"], verify_mode=ssl.CERT_NONE)
    if identity is not None:
        config.certificate = identity.certificate
        config.private_key = identity.private_key
    async with raw_connect(HOST, port, configuration=config, create_protocol=RawClient) as client:
        if send is not None:
            client._quic.send_stream_data(client._quic.get_next_available_stream_id(), send, True)
            client.transmit()
        await asyncio.wait_for(client.wait_closed(), 5)
        return client.terminated


def test_peers_skipping_authentication_or_admission_are_dropped(ids, caplog):
    server_id, client_id, _ = ids
    handler = Recorder()
    request = F.encode(F.request_frame(1, "echo", b"sneaky"))
    impostor_join = F.encode(F.join_frame(server_id.node_id, None))  # claims another id

    async def main():
        settings = QuicSettings(join_timeout=0.5)
        server = await serve(HOST, 0, server_id, Admission.open_mode(), handler, settings)
        try:
            no_cert = await _raw_session(server.port, None, request)
            assert no_cert.error_code == CloseCode.BAD_CERTIFICATE
            early = await _raw_session(server.port, client_id, request)
            assert early.error_code == CloseCode.PROTOCOL
            impostor = await _raw_session(server.port, client_id, impostor_join)
            assert impostor.error_code == CloseCode.BAD_CERTIFICATE
            silent = await _raw_session(server.port, client_id, None)
            assert silent.error_code == CloseCode.TIMEOUT
        finally:
            server.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        arun(main())
    assert handler.calls == []  # no request reached the handler, even in open mode
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("(unauthenticated)" in m and "no certificate" in m for m in messages)
    assert any(client_id.node_id in m and "bad JOIN" in m for m in messages)
    assert any("claimed node id differs" in m for m in messages)
    assert any("no JOIN in time" in m for m in messages)


def test_server_close_ends_client_requests(ids):
    server_id, client_id, _ = ids

    async def main():
        server = await serve(HOST, 0, server_id, Admission.open_mode(), Recorder(), FAST)
        conn = await connect(HOST, server.port, client_id, Admission.open_mode(), None, FAST)
        server.close()
        for _ in range(50):
            if conn.closed:
                break
            await asyncio.sleep(0.02)
        with pytest.raises((ConnectionClosed, NetError)):
            await conn.request(F.request_frame(1, "echo"), timeout=2)
        await conn.close()

    arun(main())


def test_keepalive_holds_an_idle_connection(ids):
    server_id, client_id, _ = ids
    quick_idle = QuicSettings(idle_timeout=0.5, keepalive=0.1, connect_timeout=5.0)
    no_pings = QuicSettings(idle_timeout=0.5, keepalive=None, connect_timeout=5.0)

    async def main():
        # the server does not ping either (a pinging side keeps every connection it has up)
        server = await serve(HOST, 0, server_id, Admission.open_mode(), Recorder(), no_pings)
        try:
            kept = await connect(
                HOST, server.port, client_id, Admission.open_mode(), None, quick_idle
            )
            idle = await connect(
                HOST, server.port, client_id, Admission.open_mode(), None, no_pings
            )
            await asyncio.sleep(1.5)
            assert idle.closed
            assert not kept.closed
            assert (await kept.request(F.request_frame(1, "echo", b"k"), timeout=2)).payload == b"k"
            await kept.close()
            await idle.close()
        finally:
            server.close()

    arun(main())
