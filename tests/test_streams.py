"""The inbound side of a frame stream (net/streams.py): waits, timeouts and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from llm_omninode.net import frames as F
from llm_omninode.net.frames import FrameDecoder
from llm_omninode.net.streams import EOF_MARK, ConnectionClosed, FrameStream, Inbound


class NoSender:
    peer_id = "peer"


def frame(n: int) -> F.Frame:
    return F.token_frame("seq", [n])


def test_frames_come_in_order_and_the_end_after_them():
    async def main():
        inbound = Inbound(FrameDecoder())
        stream = FrameStream(NoSender(), 0, inbound)
        waiting = asyncio.ensure_future(stream.recv(timeout=5))
        await asyncio.sleep(0)
        inbound.put(frame(1))
        inbound.put(frame(2))
        inbound.finish(EOF_MARK)
        assert F.token_ids(await waiting) == [1]
        assert inbound.queued_bytes == len(frame(2).payload)
        assert F.token_ids(await stream.recv(timeout=5)) == [2]
        assert await stream.recv() is None
        assert await stream.recv() is None  # stays ended

    asyncio.run(main())


def test_a_wait_times_out_and_a_later_frame_is_still_read():
    async def main():
        inbound = Inbound(FrameDecoder())
        stream = FrameStream(NoSender(), 0, inbound)
        with pytest.raises(ConnectionClosed, match="no frame within"):
            await stream.recv(timeout=0.01)
        inbound.put(frame(3))
        assert F.token_ids(await stream.recv(timeout=0.01)) == [3]
        inbound.finish(ConnectionClosed("gone"))
        with pytest.raises(ConnectionClosed, match="gone"):
            await stream.recv()

    asyncio.run(main())


def test_a_cancelled_wait_loses_no_frame():
    async def main():
        inbound = Inbound(FrameDecoder())
        first = asyncio.ensure_future(inbound.get())
        second = asyncio.ensure_future(inbound.get(timeout=5))
        await asyncio.sleep(0)
        inbound.put(frame(4))  # wakes the first waiter...
        first.cancel()  # ...which is cancelled before it runs: the second takes the frame
        assert F.token_ids(await second) == [4]
        assert first.cancelled()
        assert inbound.queued_bytes == 0

        waiting = asyncio.ensure_future(inbound.get())
        await asyncio.sleep(0)
        waiting.cancel()  # cancelled while nothing came
        await asyncio.sleep(0)
        inbound.put(frame(5))
        assert F.token_ids(await inbound.get(timeout=1)) == [5]

    asyncio.run(main())
