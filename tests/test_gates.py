"""Per-peer concurrency limits (net/gates.py): past its limit a peer waits, others do not."""

from __future__ import annotations

import asyncio

from llm_omninode.net.gates import PeerGates


def test_a_peer_past_its_limit_waits_and_others_go_on():
    gates = PeerGates({"read": 2})
    release = asyncio.Event()
    running: list[str] = []

    async def work(peer: str, tag: str) -> None:
        async with gates.slot(peer, "read"):
            running.append(tag)
            await release.wait()

    async def main():
        tasks = [asyncio.ensure_future(work("a", f"a{i}")) for i in range(5)]
        tasks.append(asyncio.ensure_future(work("b", "b0")))
        for _ in range(5):
            await asyncio.sleep(0)
        assert sorted(running) == ["a0", "a1", "b0"]  # a's other three wait their turn
        assert gates.running("a", "read") == 5 and gates.running("b", "read") == 1
        tasks[2].cancel()  # a waiter that gives up leaves no trace
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert sorted(running) == ["a0", "a1", "a3", "a4", "b0"]
        assert gates._gates == {}  # nothing kept for peers that are done

    asyncio.run(asyncio.wait_for(main(), 10))
