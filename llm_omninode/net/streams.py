"""Frame streams over QUIC, and the errors and close codes callers of net/ see."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from enum import IntEnum
from typing import Any, Protocol

from .frames import Frame, FrameDecoder


class _Sender(Protocol):
    """What a FrameStream needs of its connection (session.OmniProtocol)."""

    peer_id: str | None

    def send_frame(self, stream_id: int, frame: Frame | None, end_stream: bool = False) -> None: ...

    def write_raw(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def forget_stream(self, stream_id: int) -> None: ...

    async def drain(self, stream_id: int) -> None: ...


class CloseCode(IntEnum):
    """QUIC application close codes."""

    NO_ERROR = 0x0
    REFUSED = 0x100  # admission refused
    BAD_CERTIFICATE = 0x101  # no certificate, not Ed25519, or not the expected node id
    PROTOCOL = 0x102  # a frame where none may be (before admission, bad JOIN, ...)
    TIMEOUT = 0x103  # no JOIN in time
    OVERLOAD = 0x104  # the peer made us buffer too much


class NetError(Exception):
    """Base of the errors net/ raises to callers."""


class PeerRefused(NetError):
    """The handshake or admission failed, on our side or the peer's."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{CloseCode(code).name if code in CLOSE_CODES else code}: {reason}")
        self.code = code
        self.reason = reason


class ConnectionClosed(NetError):
    """The connection or stream ended before the answer came."""


class PeerLost(ConnectionClosed):
    """The peer is gone: its port is unreachable (process killed), or it fell silent."""


class RemoteError(NetError):
    """The peer answered with an ERROR frame."""

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.code = frame.header.get("code", "")
        self.message = frame.header.get("message", "")
        super().__init__(f"{self.code}: {self.message}")


CLOSE_CODES = {int(c) for c in CloseCode}

EOF_MARK = object()


class Inbound:
    """Frames arriving on one stream, decoded as they come.

    A deque and the futures of whoever waits, rather than an asyncio.Queue under
    ``asyncio.wait_for``: a wait with a timeout then costs a timer, not a task of its own and
    the extra turns of the event loop that task takes (a pipeline waits so for every token).
    """

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self.queued_bytes = 0  # payload bytes decoded but not yet taken
        self.done = False  # EOF or error queued: later bytes are dropped

    @property
    def buffered(self) -> int:
        return self.queued_bytes + self.decoder.buffered

    def put(self, frame: Frame) -> None:
        self.queued_bytes += len(frame.payload)
        self._push(frame)

    async def get(self, timeout: float | None = None) -> Any:
        """The next frame or final mark; asyncio.TimeoutError after ``timeout`` seconds."""
        while not self._items:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._getters.append(waiter)
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            except BaseException:
                if timer is not None:
                    timer.cancel()
                if _woken(waiter):  # woken, then cancelled: the next waiter takes the item
                    self._wake()
                else:  # timed out or cancelled while still listed
                    with contextlib.suppress(ValueError):
                        self._getters.remove(waiter)
                raise
            if timer is not None:
                timer.cancel()
        item = self._items.popleft()
        if isinstance(item, Frame):
            self.queued_bytes -= len(item.payload)
        if self._items:  # more for another waiter (one may have been woken and cancelled)
            self._wake()
        return item

    def finish(self, item: Any) -> None:
        if not self.done:
            self.done = True
            self._push(item)

    def _push(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _woken(waiter: asyncio.Future[None]) -> bool:
    """Whether ``_wake`` took ``waiter`` off the list and resolved it."""
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class FrameStream:
    """One bidirectional QUIC stream carrying frames: ``send``, ``recv``, ``end``."""

    def __init__(self, protocol: _Sender, stream_id: int, inbound: Inbound) -> None:
        self._protocol = protocol
        self.stream_id = stream_id
        self._inbound = inbound
        self._final: Any = None
        self.ended = False

    @property
    def peer_id(self) -> str:
        return self._protocol.peer_id or ""

    @property
    def peer_host(self) -> str | None:
        """The address the peer's packets come from (its host part), if known."""
        addr = getattr(self._protocol, "peer_addr", None)
        return str(addr[0]) if addr else None

    async def send(self, frame: Frame) -> None:
        """Send a frame; waits while the peer has too much of this stream left to read."""
        if self.ended:
            raise ConnectionClosed("stream already ended")
        self._protocol.send_frame(self.stream_id, frame)
        await self._protocol.drain(self.stream_id)

    def end(self, frame: Frame | None = None) -> None:
        """Send the last frame (if any) and close our sending side."""
        if self.ended:
            return
        self.ended = True
        self._protocol.send_frame(self.stream_id, frame, end_stream=True)

    def write_raw(self, data: bytes, end_stream: bool = False) -> None:
        """Unframed bytes onto the stream: only for tests and fuzzing of the peer's decoder."""
        self._protocol.write_raw(self.stream_id, data, end_stream)
        self.ended = self.ended or end_stream

    async def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None once the peer ended the stream. Raises FrameError for a
        malformed frame, ConnectionClosed if the stream or connection went away."""
        if self._final is not None:
            self._raise_final()
            return None
        try:
            item = await self._inbound.get(timeout)
        except asyncio.TimeoutError as exc:
            raise ConnectionClosed(f"no frame within {timeout} s") from exc
        if isinstance(item, Frame):
            return item
        self._final = item
        self._raise_final()
        return None

    def _raise_final(self) -> None:
        if self._final is EOF_MARK:
            return None
        raise self._final

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Frame]:
        while (frame := await self.recv()) is not None:
            yield frame

    async def aclose(self) -> None:
        """End our side and stop reading theirs."""
        self.close_now()

    def close_now(self) -> None:
        """``aclose`` without awaiting: for cleanup that must not be cancelled half-way."""
        self.end()
        self._protocol.forget_stream(self.stream_id)
