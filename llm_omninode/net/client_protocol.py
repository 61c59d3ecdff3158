"""The client side of an authenticated QUIC connection (net/session.py has the steps both
sides take): it checks the server's key against the node id it expected, sends JOIN, checks
JOIN_OK with its own admission policy, then opens one stream per request."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from .frames import FrameDecoder, FrameType, join_frame
from .session import BATCH, RECV_SIZE, OmniProtocol
from .streams import (
    CLOSE_CODES,
    CloseCode,
    ConnectionClosed,
    FrameStream,
    Inbound,
    PeerLost,
    PeerRefused,
)


class ClientProtocol(OmniProtocol):
    role = "client"

    def __init__(self, quic: QuicConnection, *, expected_node_id: str | None, **kwargs) -> None:
        super().__init__(quic, **kwargs)
        self.expected_node_id = expected_node_id
        self._sock: socket.socket | None = None
        self.ready: asyncio.Future[None] = self._loop.create_future()
        # a failure after connect() stopped waiting (timed out) is nobody's to raise
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def refuse(self, code: CloseCode, reason: str) -> None:
        super().refuse(code, reason)
        self._fail(PeerRefused(code, f"we refused {self.peer_id or 'the server'}: {reason}"))

    def peer_lost(self, why: str) -> None:
        super().peer_lost(why)
        self._fail(PeerLost(f"peer lost: {why}"))  # while connecting: no waiting for a timeout

    def _authenticated(self) -> None:
        if self.expected_node_id is not None and self.peer_id != self.expected_node_id:
            self.refuse(
                CloseCode.BAD_CERTIFICATE,
                f"server key is {self.peer_id}, expected {self.expected_node_id}",
            )
            return
        stream_id = self._quic.get_next_available_stream_id()
        self._join_stream = stream_id
        self._join_decoder = FrameDecoder(
            max_header=4096, max_payload=0, types=frozenset({FrameType.JOIN_OK})
        )
        self.send_frame(stream_id, join_frame(self.identity.node_id, self._own_proof()), True)

    def _before_admission(self, event: events.StreamDataReceived) -> None:
        frame = self._join_frame(event, FrameType.JOIN_OK)
        if frame is None or not self._decide(frame):
            return
        self.admitted = True
        if not self.ready.done():
            self.ready.set_result(None)
        self._watch()

    def _new_inbound_stream(self, stream_id: int) -> Inbound | None:
        if stream_id != self._join_stream:  # data on a stream we never opened (or forgot)
            with contextlib.suppress(Exception):
                self._quic.stop_stream(stream_id, CloseCode.PROTOCOL)
        return None

    def _connection_lost(self, event: events.ConnectionTerminated) -> None:
        if event.error_code in CLOSE_CODES and event.error_code != CloseCode.NO_ERROR:
            self._fail(PeerRefused(event.error_code, f"server closed: {event.reason_phrase}"))
        else:
            self._fail(ConnectionClosed(f"closed during set-up: {event.reason_phrase}"))

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """Take every datagram already waiting on the socket, then answer once: one ACK and
        one flush per burst instead of per datagram (bulk downloads gain most of their speed
        here), after whatever the burst wakes has sent (``received``)."""
        if self.peer_addr is None:
            self.peer_addr = addr
        self.last_received = time.monotonic()
        now = self._loop.time
        self._quic.receive_datagram(data, addr, now=now())
        sock = self._sock
        if sock is not None:
            for _ in range(BATCH):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except ConnectionRefusedError as exc:  # an ICMP error came in between
                    self.error_received(exc)
                    break
                except OSError:  # BlockingIOError: drained
                    break
                self._quic.receive_datagram(data, addr, now=now())
        self.received()

    def open_stream(self) -> FrameStream:
        if self.close_code is not None:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        stream_id = self._quic.get_next_available_stream_id()
        inbound = Inbound(FrameDecoder())
        self._streams[stream_id] = inbound
        return FrameStream(self, stream_id, inbound)
