"""Authenticated QUIC endpoints for OmniNode: ``serve()`` and ``connect()``.

Everything QUIC stays inside net/: callers see node ids, frames, ``FrameStream``s and the
errors below (from net/streams.py). How a connection is authenticated and admitted is told in
net/session.py; the aioquic internals it needs are in net/tls.py; the wire format is
net/frames.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic.connection import QuicConnection

from . import tls
from .admission import Admission
from .client_protocol import ClientProtocol
from .frames import Frame, FrameType
from .identity import NodeIdentity
from .session import (
    BATCH,
    RECV_SIZE,
    Handler,
    ReceiveBatch,
    ServerProtocol,
)
from .settings import QuicSettings
from .streams import (
    CloseCode,
    ConnectionClosed,
    FrameStream,
    NetError,
    PeerLost,
    PeerRefused,
    RemoteError,
)
from .unreachable import PORT_UNREACHABLE, report_unreachable, unreachable

log = logging.getLogger(__name__)


class Server:
    """A listening endpoint; ``close()`` stops it and drops its connections."""

    def __init__(
        self, identity: NodeIdentity, admission: Admission, handler: Handler, settings
    ) -> None:
        self.identity = identity
        self.admission = admission
        self.handler = handler
        self.settings = settings
        self.host = ""
        self.port = 0
        self._quic_server: QuicServer | None = None
        self._protocols: set[ServerProtocol] = set()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def peers(self) -> list[str]:
        """Node ids of the admitted peers connected now."""
        return sorted({p.peer_id for p in self._protocols if p.admitted and p.peer_id})

    def close(self) -> None:
        for protocol in list(self._protocols):
            protocol.shutdown(CloseCode.NO_ERROR, "server closing")
        self._protocols.clear()
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def serve(
    host: str,
    port: int,
    identity: NodeIdentity,
    admission: Admission,
    handler: Handler,
    settings: QuicSettings | None = None,
    on_lost: Callable[[str, str], None] | None = None,
) -> Server:
    """Listen on UDP ``host:port`` (port 0: any) and serve admitted peers with ``handler``.

    ``handler(peer_node_id, first_frame, stream)`` may ``await stream.send(frame)`` any number
    of times and/or ``async for frame in stream`` (a channel); the frame it returns, if any, is
    sent last and the stream is ended. An exception becomes an ERROR frame.
    """
    tls.check_internals()
    settings = settings or QuicSettings()
    server = Server(identity, admission, handler, settings)
    configuration = settings.quic_configuration(identity, is_client=False, host=host)

    batch = ReceiveBatch()

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> ServerProtocol:
        protocol = ServerProtocol(
            quic,
            handler=handler,
            registry=server._protocols,
            batch=batch,
            identity=identity,
            admission=admission,
            settings=settings,
        )
        protocol.on_lost = on_lost
        return protocol

    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _size_socket(sock, settings.socket_buffer)
        report_unreachable(sock)
        sock.bind((host, port))
        transport, quic_server = await loop.create_datagram_endpoint(
            lambda: _BatchingQuicServer(
                sock,
                batch,
                server._protocols,
                configuration=configuration,
                create_protocol=create_protocol,
            ),
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    server._quic_server = quic_server
    server.host, server.port = transport.get_extra_info("sockname")[:2]
    log.info("serving %s on %s:%d", identity.node_id, server.host, server.port)
    return server


class _BatchingQuicServer(QuicServer):
    """aioquic's server, reading every datagram already queued on the socket per wake-up and
    answering each connection once per burst (uploads to a server gain their speed here)."""

    def __init__(
        self,
        sock: socket.socket,
        batch: ReceiveBatch,
        protocols: set[ServerProtocol],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._sock = sock
        self._batch = batch
        self._peers = protocols

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self._batch.begin()
        try:
            super().datagram_received(data, addr)
            for _ in range(BATCH):
                try:
                    data, addr = self._sock.recvfrom(RECV_SIZE)
                except ConnectionRefusedError as exc:  # an ICMP error came in between
                    self.error_received(exc)
                    break
                except OSError:  # BlockingIOError: drained
                    break
                super().datagram_received(data, addr)
        finally:
            self._batch.end()

    def error_received(self, exc: Exception) -> None:
        """A client's port is unreachable (its process is gone): drop its connections now,
        which ends what they were doing (a generation for a killed ``llm``, a pipeline)."""
        if not isinstance(exc, ConnectionRefusedError):
            return
        for addr in unreachable(self._sock):
            for protocol in list(self._peers):
                if protocol.peer_addr and tuple(protocol.peer_addr[:2]) == tuple(addr[:2]):
                    protocol.peer_lost(PORT_UNREACHABLE)


def _size_socket(sock: socket.socket, size: int) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


class Connection:
    """An admitted connection to one peer. Many requests may run at once, one stream each."""

    def __init__(self, protocol: ClientProtocol, transport: asyncio.DatagramTransport) -> None:
        self._protocol = protocol
        self._transport = transport
        self._next_id = 1

    @property
    def peer_id(self) -> str:
        return self._protocol.peer_id or ""

    @property
    def node_id(self) -> str:
        return self._protocol.identity.node_id

    @property
    def closed(self) -> bool:
        return self._protocol.close_code is not None

    @property
    def last_received(self) -> float:
        """time.monotonic() of the last datagram from the peer (ACKs included)."""
        return self._protocol.last_received

    def next_id(self) -> int:
        """A fresh request id for this connection."""
        self._next_id += 1
        return self._next_id - 1

    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:
        """Send one frame on a new stream; return the one frame answered. ERROR -> RemoteError."""
        timeout = self._protocol.settings.request_timeout if timeout is None else timeout
        stream = self._protocol.open_stream()
        try:
            stream.end(frame)
            reply, extra = await asyncio.wait_for(_two_frames(stream), timeout)
            if reply is None:
                raise ConnectionClosed("stream ended without an answer")
            if extra is not None:
                raise NetError(f"expected one answer frame, got more ({extra.type.name})")
        finally:
            self._protocol.forget_stream(stream.stream_id)
        return _checked(reply)

    async def stream(
        self, frame: Frame, timeout: float | None = None
    ) -> AsyncGenerator[Frame, None]:
        """Send one frame; yield every frame answered until the peer ends the stream.
        ``timeout`` bounds the wait for each frame. ERROR -> RemoteError."""
        timeout = self._protocol.settings.request_timeout if timeout is None else timeout
        stream = self._protocol.open_stream()
        try:
            stream.end(frame)
            while (reply := await stream.recv(timeout)) is not None:
                yield _checked(reply)
        finally:
            self._protocol.forget_stream(stream.stream_id)

    async def channel(self, first: Frame | None = None) -> FrameStream:
        """A long-lived bidirectional stream (a pipeline edge for the decode loop).
        The server's handler receives ``first`` (required by the server to dispatch)."""
        stream = self._protocol.open_stream()
        if first is not None:
            try:
                await stream.send(first)
            except BaseException:
                # cancelled (or failed) while the frame waited for room: the peer may have
                # the stream already, and nobody here would ever end it
                stream.close_now()
                raise
        return stream

    async def close(self) -> None:
        self._protocol.shutdown(CloseCode.NO_ERROR, "client closing")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._protocol.wait_closed(), 1.0)
        self._transport.close()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _two_frames(stream: FrameStream) -> tuple[Frame | None, Frame | None]:
    first = await stream.recv()
    return first, (await stream.recv() if first is not None else None)


def _checked(frame: Frame) -> Frame:
    if frame.type == FrameType.ERROR:
        raise RemoteError(frame)
    return frame


async def connect(
    host: str,
    port: int,
    identity: NodeIdentity,
    admission: Admission,
    expected_node_id: str | None = None,
    settings: QuicSettings | None = None,
    on_lost: Callable[[str, str], None] | None = None,
) -> Connection:
    """Connect, authenticate the server (against ``expected_node_id`` if given), prove our
    membership and check the server's with ``admission``. PeerRefused if either side says no."""
    tls.check_internals()
    settings = settings or QuicSettings()
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    configuration = settings.quic_configuration(identity, is_client=True, host=addr[0])
    quic = QuicConnection(configuration=configuration)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _size_socket(sock, settings.socket_buffer)
        report_unreachable(sock)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: ClientProtocol(
                quic,
                expected_node_id=expected_node_id,
                identity=identity,
                admission=admission,
                settings=settings,
            ),
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    protocol.peer_addr = addr
    protocol._sock = sock
    protocol.on_lost = on_lost
    try:
        protocol.connect(addr)
        await asyncio.wait_for(asyncio.shield(protocol.ready), settings.connect_timeout)
    except BaseException as exc:
        protocol.shutdown(CloseCode.NO_ERROR, "connect failed")
        transport.close()
        if isinstance(exc, asyncio.TimeoutError):
            message = f"no admitted connection within {settings.connect_timeout} s"
            raise ConnectionClosed(message) from None
        raise
    return Connection(protocol, transport)


__all__ = [
    "PORT_UNREACHABLE",
    "CloseCode",
    "Connection",
    "ConnectionClosed",
    "FrameStream",
    "Handler",
    "NetError",
    "PeerLost",
    "PeerRefused",
    "QuicSettings",
    "RemoteError",
    "Server",
    "connect",
    "serve",
]
