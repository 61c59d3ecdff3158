"""One authenticated QUIC connection: certificate check, admission, then frame streams.

Connection set-up, in order (nothing else is read before step 4 succeeds):

1. QUIC + TLS 1.3, ALPN ``omni/1``, no session tickets, no 0-RTT. The server requests a client
   certificate (net/tls.py); both sides present a self-signed certificate of their node key.
2. Each side derives the peer's node id from the certificate key (aioquic has already checked
   the CertificateVerify signature, i.e. that the peer holds that key). The client compares it
   with ``expected_node_id`` if it was given one; a missing or non-Ed25519 certificate, or a
   different key, closes the connection (``CloseCode.BAD_CERTIFICATE``).
3. The client sends JOIN (its node id and admission proof) on its first stream; the server
   runs its admission policy on it (admission.py) and either closes the connection with
   ``CloseCode.REFUSED`` (logging node id, address and reason) or answers JOIN_OK with its
   own proof, which the client checks with *its* policy in the same way.
4. Admitted: the client opens one bidirectional stream per request, or a long-lived one
   (a channel) per pipeline edge. The server hands the first frame of each stream and a
   ``FrameStream`` to the handler; a malformed frame gets an ERROR frame (``bad_frame``) and the
   end of that stream, and the connection keeps serving.

What one peer can make us hold is bounded: at most ``settings.max_streams`` streams of its
own at once (QUIC MAX_STREAMS), and on each stream at most ``settings.send_high_water`` bytes
queued for it to read: ``FrameStream.send`` waits (``drain``) until the peer has acknowledged
enough, and resets the stream of a peer that reads nothing for ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from . import tls, wide_frames
from .admission import Admission
from .frames import (
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    encode_parts,
    error_frame,
    join_frame,
)
from .identity import IdentityError, NodeIdentity, node_id_from_certificate
from .settings import QuicSettings
from .streams import (
    EOF_MARK,
    CloseCode,
    ConnectionClosed,
    FrameStream,
    Inbound,
    PeerLost,
)
from .unreachable import PORT_UNREACHABLE, same_addr, unreachable

log = logging.getLogger("llm_omninode.net.quic")

Handler = Callable[[str, Frame, "FrameStream"], Awaitable[Frame | None]]


BATCH = 64  # datagrams taken from the socket per wake-up
RECV_SIZE = 65536


SMALL_PAYLOAD = 256 * 1024  # payloads up to this are copied behind their header and sent at once


class OmniProtocol(QuicConnectionProtocol):
    """QUIC events -> authenticated, admitted frame streams. Subclassed per role."""

    role = ""  # "client" or "server"

    def __init__(
        self,
        quic: QuicConnection,
        *,
        identity: NodeIdentity,
        admission: Admission,
        settings: QuicSettings,
    ) -> None:
        super().__init__(quic)
        self.identity = identity
        self.admission = admission
        self.settings = settings
        self.peer_id: str | None = None
        self.peer_addr: Any = None
        self.binding: bytes | None = None
        self.admitted = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._streams: dict[int, Inbound] = {}
        self._finished: set[int] = set()  # streams served and forgotten: later bytes dropped
        self._join_stream: int | None = None
        self._join_decoder: FrameDecoder | None = None
        self._tasks: set[asyncio.Task] = set()
        self._acked = asyncio.Event()  # set on every receive: acknowledgements may have come
        self._transmit_soon: asyncio.Handle | None = None
        self.last_received = time.monotonic()
        self._watcher: asyncio.TimerHandle | None = None
        self._last_tick = self.last_received
        self._quiet_ticks = 0
        # told (node id, why) when this connection finds its peer gone
        self.on_lost: Callable[[str, str], None] | None = None
        tls.limit_peer_streams(quic, settings.max_streams)
        wide_frames.widen(quic)

    # ---- plumbing ------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.peer_addr is None:
            self.peer_addr = addr
        self.last_received = time.monotonic()  # liveness: a dead process sends nothing
        super().datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        """The socket reported an ICMP error (see ``unreachable``): "port unreachable" from
        the peer's host means no process listens there any more (killed, crashed), so the
        peer is gone now, not at the next timeout."""
        sock = getattr(self, "_sock", None)
        if (
            isinstance(exc, ConnectionRefusedError)
            and sock is not None
            and any(same_addr(a, self.peer_addr) for a in unreachable(sock))
        ):
            self.peer_lost(PORT_UNREACHABLE)

    def peer_lost(self, why: str) -> None:
        """Close as lost: waiters get PeerLost, and ``on_lost`` (the peer table) hears it."""
        if self.close_code is not None:
            return
        # a server's clients come and go (an `llm` command shares its node's key): info only
        level = logging.WARNING if self.role == "client" else logging.INFO
        log.log(level, "%s lost peer %s at %s: %s", self.role, self.peer_id or
                "(unauthenticated)", _format_addr(self.peer_addr), why)  # fmt: skip
        reason = f"peer lost: {why}"
        self._terminate_streams(PeerLost(reason))
        self.shutdown(CloseCode.NO_ERROR, reason)
        if self.on_lost is not None and self.peer_id:
            self.on_lost(self.peer_id, why)

    # ---- liveness ------------------------------------------------------------------------
    def _watch(self) -> None:
        """Every ``keepalive`` s once admitted: ping (so both sides hear each other while
        idle, and a killed peer is found by its port), and drop a connection silent for
        ``lost_after`` s. A peer's event loop answers (ACKs) even while its stage computes on
        the worker thread, so silence means the peer is gone or frozen, not busy."""
        self._watcher = None
        if self.close_code is not None or not self.settings.keepalive:
            return
        now = time.monotonic()
        # ticks in a row with nothing received: when our own loop was starved (one late tick
        # for many seconds), the peer's answers are waiting in the socket, not missing
        self._quiet_ticks = 0 if self.last_received > self._last_tick else self._quiet_ticks + 1
        self._last_tick = now
        silent = now - self.last_received
        lost_after = self.settings.lost_after
        if (
            lost_after
            and silent > lost_after
            and self._quiet_ticks * self.settings.keepalive >= lost_after
        ):
            self.peer_lost(f"nothing heard for {silent:.1f} s")
            return
        self._quic.send_ping(0)  # both sides: a dead peer's host answers with an ICMP error
        self.transmit()
        self._watcher = self._loop.call_later(self.settings.keepalive, self._watch)

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def send_frame(self, stream_id: int, frame: Frame | None, end_stream: bool = False) -> None:
        if frame is None:
            self._send(stream_id, (b"",), end_stream)
            return
        prefix, payload = encode_parts(frame)
        if len(payload) <= SMALL_PAYLOAD:  # one buffer: a hidden state or token id in one go
            self._send(stream_id, (prefix + bytes(payload),), end_stream)
        else:
            self._send(stream_id, (prefix, payload), end_stream)

    def write_raw(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._send(stream_id, (data,), end_stream)

    def _send(self, stream_id: int, parts: tuple[bytes, ...], end_stream: bool) -> None:
        """Queue ``parts`` on the stream, then transmit once: a frame whose header and payload
        were flushed separately cost two packets and twice the CPU per small message."""
        if self.close_code is not None:
            raise ConnectionClosed(f"connection closed: {self.close_reason}")
        try:
            for i, data in enumerate(parts):
                last = i == len(parts) - 1
                self._quic.send_stream_data(stream_id, data, end_stream=end_stream and last)
        except (RuntimeError, ValueError) as exc:  # the peer reset or stopped the stream
            raise ConnectionClosed(f"stream {stream_id} closed: {exc}") from exc
        tls.ack_with_data(self._quic)  # the ACK of what this answers rides in the same packet
        self.transmit()

    def transmit(self) -> None:
        if self._transmit_soon is not None:
            self._transmit_soon.cancel()
            self._transmit_soon = None
        super().transmit()
        self._acked.set()

    def received(self) -> None:
        """After a batch of received datagrams: hand their events over, and transmit (ACKs,
        handshake replies, the timer re-armed) at the loop's next turn, unless a frame sent
        before then transmits them all at once: a task woken by these events and answering
        at once then costs one packet build instead of an empty one and a full one."""
        self._process_events()
        self._acked.set()  # drain(): acknowledgements may have come
        if self._transmit_soon is None:
            self._transmit_soon = self._loop.call_soon(self.transmit)

    async def drain(self, stream_id: int) -> None:
        """Wait until the peer has read our stream down to ``send_high_water`` queued bytes.

        aioquic queues whatever it is given, whatever the peer's flow control lets through, so
        without this a peer that asks for data and never reads it makes us hold it all. A
        stream that makes no progress for ``request_timeout`` is reset (ConnectionClosed)."""
        high_water = self.settings.send_high_water
        backlog = tls.stream_backlog(self._quic, stream_id)
        if backlog is None or backlog <= high_water:
            await asyncio.sleep(0)  # a send always yields, as it did before
            return
        timeout = self.settings.request_timeout
        deadline = self._loop.time() + timeout
        while backlog > high_water:
            if self.close_code is not None:
                raise ConnectionClosed(f"connection closed: {self.close_reason}")
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                with contextlib.suppress(Exception):  # frees what we queued for it
                    self._quic.reset_stream(stream_id, CloseCode.OVERLOAD)
                    self.transmit()
                raise ConnectionClosed(f"stream {stream_id}: the peer read nothing for {timeout} s")
            self._acked.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._acked.wait(), remaining)
            now = tls.stream_backlog(self._quic, stream_id)
            if now is None:
                raise ConnectionClosed(f"stream {stream_id} was reset by the peer")
            if now < backlog:  # progress: the peer is reading
                deadline = self._loop.time() + timeout
            backlog = now

    def forget_stream(self, stream_id: int) -> None:
        """Stop reading a stream: later bytes on it are dropped, never served."""
        self._finished.add(stream_id)
        inbound = self._streams.pop(stream_id, None)
        if inbound is not None:
            if not inbound.done:
                with contextlib.suppress(Exception):
                    self._quic.stop_stream(stream_id, CloseCode.NO_ERROR)
            inbound.finish(EOF_MARK)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refuse(self, code: CloseCode, reason: str) -> None:
        """Close the connection because of the peer, and log who and why."""
        log.warning(
            "%s refused peer %s at %s: %s",
            self.role,
            self.peer_id or "(unauthenticated)",
            _format_addr(self.peer_addr),
            reason,
        )
        self.shutdown(code, reason)

    def shutdown(self, code: int = CloseCode.NO_ERROR, reason: str = "") -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = int(code), reason
        self._stop_watching()
        self.close(error_code=int(code), reason_phrase=reason[:200])
        self._terminate_streams(ConnectionClosed(f"connection closed: {reason or 'local'}"))
        for task in list(self._tasks):
            task.cancel()

    def _terminate_streams(self, error: Exception) -> None:
        for inbound in self._streams.values():
            inbound.finish(error)
        self._streams.clear()

    def _buffered(self) -> int:
        return sum(inbound.buffered for inbound in self._streams.values())

    # ---- events --------------------------------------------------------------------------
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._handshake_completed(event)
        elif isinstance(event, events.StreamDataReceived):
            if self.close_code is not None:
                return
            if not self.admitted:
                self._before_admission(event)
            else:
                self._stream_data(event)
        elif isinstance(event, events.StreamReset):
            self._finished.add(event.stream_id)
            inbound = self._streams.pop(event.stream_id, None)
            if inbound is not None:
                inbound.finish(ConnectionClosed(f"stream reset by peer ({event.error_code})"))
        elif isinstance(event, events.ConnectionTerminated):
            if self.close_code is None:
                self.close_code, self.close_reason = event.error_code, event.reason_phrase
            self._terminate_streams(
                ConnectionClosed(f"connection closed ({event.error_code}: {event.reason_phrase})")
            )
            self._stop_watching()
            self._connection_lost(event)
            for task in list(self._tasks):
                task.cancel()

    def _handshake_completed(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol != tls.ALPN:
            self.refuse(CloseCode.PROTOCOL, f"ALPN {event.alpn_protocol!r}, not {tls.ALPN}")
            return
        if event.session_resumed or event.early_data_accepted:
            self.refuse(CloseCode.PROTOCOL, "session resumption is not allowed")
            return
        cert = tls.peer_certificate(self._quic)
        if cert is None:
            self.refuse(CloseCode.BAD_CERTIFICATE, "no certificate presented")
            return
        try:
            self.peer_id = node_id_from_certificate(cert)
        except IdentityError as exc:
            self.refuse(CloseCode.BAD_CERTIFICATE, str(exc))
            return
        try:
            self.binding = tls.session_binding(self._quic)
        except tls.TlsInternalsError as exc:  # aioquic moved: refuse rather than skip the check
            self.refuse(CloseCode.PROTOCOL, str(exc))
            return
        self._authenticated()

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        inbound = self._streams.get(event.stream_id)
        if inbound is None:
            if event.stream_id in self._finished:
                return
            inbound = self._new_inbound_stream(event.stream_id)
            if inbound is None:
                return
        if inbound.done:
            return
        try:
            for frame in inbound.decoder.feed(event.data):
                inbound.put(frame)
            if event.end_stream:
                inbound.decoder.close()
                inbound.finish(EOF_MARK)
        except FrameError as exc:
            inbound.finish(exc)
            with contextlib.suppress(Exception):
                self._quic.stop_stream(event.stream_id, CloseCode.PROTOCOL)
        if event.data and self._buffered() > self.settings.max_buffered:
            self.refuse(CloseCode.OVERLOAD, "too many inbound bytes buffered")

    # ---- role hooks ----------------------------------------------------------------------
    def _authenticated(self) -> None:
        raise NotImplementedError

    def _before_admission(self, event: events.StreamDataReceived) -> None:
        raise NotImplementedError

    def _new_inbound_stream(self, stream_id: int) -> Inbound | None:
        raise NotImplementedError

    def _connection_lost(self, event: events.ConnectionTerminated) -> None:
        pass

    def _join_frame(self, event: events.StreamDataReceived, allowed: FrameType) -> Frame | None:
        """Decode the single JOIN / JOIN_OK frame; refuse on anything else."""
        if self._join_stream is None:
            self._join_stream = event.stream_id
            self._join_decoder = FrameDecoder(
                max_header=4096, max_payload=0, types=frozenset({allowed})
            )
        if event.stream_id != self._join_stream:
            self.refuse(CloseCode.PROTOCOL, f"stream {event.stream_id} used before admission")
            return None
        try:
            frames = self._join_decoder.feed(event.data)
            if event.end_stream:
                self._join_decoder.close()
        except FrameError as exc:
            self.refuse(CloseCode.PROTOCOL, f"bad {allowed.name}: {exc}")
            return None
        if len(frames) > 1:
            self.refuse(CloseCode.PROTOCOL, f"{allowed.name} must be alone on its stream")
            return None
        if not frames:
            if event.end_stream:
                self.refuse(CloseCode.PROTOCOL, f"{allowed.name} stream ended empty")
            return None
        frame = frames[0]
        if frame.header["node_id"] != self.peer_id:
            self.refuse(CloseCode.BAD_CERTIFICATE, "claimed node id differs from certificate")
            return None
        return frame

    def _decide(self, frame: Frame) -> bool:
        proof_hex = frame.header.get("proof")
        proof = bytes.fromhex(proof_hex) if proof_hex else None
        peer_role = "server" if self.role == "client" else "client"
        client_id, server_id = (
            (self.peer_id, self.identity.node_id)
            if peer_role == "client"
            else (self.identity.node_id, self.peer_id)
        )
        decision = self.admission.decide(peer_role, client_id, server_id, self.binding, proof)
        if not decision.admitted:
            self.refuse(CloseCode.REFUSED, decision.reason)
            return False
        log.info(
            "%s admitted %s at %s (%s)",
            self.role,
            self.peer_id,
            _format_addr(self.peer_addr),
            decision.reason,
        )
        return True

    def _own_proof(self) -> bytes | None:
        client_id, server_id = (
            (self.identity.node_id, self.peer_id)
            if self.role == "client"
            else (self.peer_id, self.identity.node_id)
        )
        return self.admission.proof(self.role, client_id, server_id, self.binding)


def _format_addr(addr: Any) -> str:
    if not addr:
        return "?"
    host, port = addr[0], addr[1]
    if isinstance(host, str) and host.startswith("::ffff:"):
        host = host[7:]
    return f"{host}:{port}"


# ---- server -------------------------------------------------------------------------------


class ReceiveBatch:
    """Connections that received datagrams during one burst read by the server socket."""

    def __init__(self) -> None:
        self.touched: set[ServerProtocol] | None = None

    def begin(self) -> None:
        self.touched = set()

    def end(self) -> None:
        touched, self.touched = self.touched or set(), None
        for protocol in touched:
            protocol.flush()


class ServerProtocol(OmniProtocol):
    role = "server"

    def __init__(
        self,
        quic: QuicConnection,
        *,
        handler: Handler,
        registry: set[ServerProtocol],
        batch: ReceiveBatch | None = None,
        **kwargs: Any,
    ) -> None:
        tls.require_client_certificate(quic)
        super().__init__(quic, **kwargs)
        self.handler = handler
        self.registry = registry
        self.batch = batch
        self._join_timer: asyncio.TimerHandle | None = None
        registry.add(self)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        touched = self.batch.touched if self.batch is not None else None
        if touched is None:
            super().datagram_received(data, addr)
            return
        if self.peer_addr is None:
            self.peer_addr = addr
        self.last_received = time.monotonic()
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        touched.add(self)  # events and transmit once the burst is read (ReceiveBatch.end)

    def flush(self) -> None:
        self.received()

    def _authenticated(self) -> None:
        self._join_timer = self._loop.call_later(self.settings.join_timeout, self._join_timeout)

    def _join_timeout(self) -> None:
        if not self.admitted and self.close_code is None:
            self.refuse(CloseCode.TIMEOUT, "no JOIN in time")

    def _before_admission(self, event: events.StreamDataReceived) -> None:
        if self.peer_id is None or event.stream_id % 4 != 0:
            self.refuse(CloseCode.PROTOCOL, "data before authentication")
            return
        frame = self._join_frame(event, FrameType.JOIN)
        if frame is None or not self._decide(frame):
            return
        self.admitted = True
        if self._join_timer is not None:
            self._join_timer.cancel()
        self._watch()
        self.send_frame(
            event.stream_id, join_frame(self.identity.node_id, self._own_proof(), ok=True), True
        )

    def _new_inbound_stream(self, stream_id: int) -> Inbound | None:
        if stream_id == self._join_stream:
            return None  # the JOIN stream's late FIN; it carries nothing else
        if stream_id % 4 != 0:  # only client-initiated bidirectional streams are used
            self.refuse(CloseCode.PROTOCOL, f"unexpected stream {stream_id}")
            return None
        inbound = Inbound(FrameDecoder())
        self._streams[stream_id] = inbound
        self.spawn(self._serve_stream(FrameStream(self, stream_id, inbound)))
        return inbound

    async def _serve_stream(self, stream: FrameStream) -> None:
        try:
            try:
                first = await stream.recv(timeout=self.settings.request_timeout)
            except FrameError as exc:
                stream.end(error_frame(ErrorCode.BAD_FRAME, str(exc)))
                return
            except ConnectionClosed as exc:  # timed out, reset, or the connection went
                if self.close_code is None:
                    stream.end(error_frame(ErrorCode.TIMEOUT, str(exc)))
                return
            if first is None:
                stream.end()
                return
            try:
                reply = await self.handler(self.peer_id, first, stream)
            except FrameError as exc:
                reply = error_frame(ErrorCode.BAD_FRAME, str(exc), first.id)
            except ConnectionClosed as exc:
                if self.close_code is not None:
                    return  # ours went away: nobody is left to answer
                # another connection the handler used (a peer further down a pipeline) broke:
                # this peer is still here and must hear why, not wait forever
                reply = error_frame(ErrorCode.INTERNAL, f"a connection broke: {exc}", first.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler bug must not take the connection down
                log.exception("handler failed on %s from %s", first.type.name, self.peer_id)
                reply = error_frame(ErrorCode.INTERNAL, type(exc).__name__, first.id)
            stream.end(reply)
        except ConnectionClosed:
            pass
        finally:
            self.forget_stream(stream.stream_id)

    def _connection_lost(self, event: events.ConnectionTerminated) -> None:
        if self._join_timer is not None:
            self._join_timer.cancel()
        self.registry.discard(self)
