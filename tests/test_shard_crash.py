"""kill -9 of a shim while it fetches shards from a peer: nothing lands under a valid id, and
the next start resumes from the partial (reusing its bytes) and ends with verified shards.

Real processes: node0 holds a tiny model (file-backed); node1 starts empty and is asked to
load the second half of it, which makes it fetch those shards from node0. node1 runs with the
test-only throttles of net/transfer.py (small windows, and a hang once a shard has received
STALL bytes), so the kill lands mid-download at a known byte without any timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest
from support.live_peer import LiveShim, arun
from support.shim_cluster import ShimCluster
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.store import ShardStore
from llm_omninode.net import frames as F
from llm_omninode.net.transfer import TEST_STALL_ENV, TEST_WINDOW_ENV

pytestmark = pytest.mark.cluster  # starts omni-shim processes

WINDOW = 4096
STALL = 2 * WINDOW  # every shard of the stage is larger than this
N_BLOCKS = 4


def _stage_load(node: LiveShim, manifest, start: int, end: int, timeout: float):
    async def main():
        conn = await node.connect()
        try:
            frame = F.request_frame(conn.next_id(), "stage.load", manifest.to_json(),
                                    model=manifest.model_id, start=start, end=end)  # fmt: skip
            return await conn.request(frame, timeout=timeout)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    return main()


def _partials(store: ShardStore) -> dict[str, int]:
    return {p.name.removesuffix(".part"): p.stat().st_size for p in store.tmp_dir.glob("*.part")}


def test_kill_mid_download_then_resume(tmp_path):
    gguf = write_tiny_llama(tmp_path / "tiny.gguf", n_blocks=N_BLOCKS)
    with ShimCluster(tmp_path, 2, max_memory="1GiB") as cluster:
        record = ModelRegistry(cluster.dirs[0]).add_file(gguf, alias="tiny")
        manifest = record.manifest
        wanted = {s.cid: s.size for s in manifest.shards_for_stage(2, N_BLOCKS)}
        stalled = {cid: size for cid, size in wanted.items() if size > STALL}
        assert len(stalled) >= 3, wanted  # two blocks and the (tied) embedding; the head is tiny
        cluster.start(0)
        cluster.extra_env = {TEST_WINDOW_ENV: str(WINDOW), TEST_STALL_ENV: str(STALL)}
        cluster.start(1)
        cluster.extra_env = {}
        cluster.wait_for_peers(2, i=1)
        node1 = LiveShim(cluster, index=1)
        store1 = ShardStore(cluster.dirs[1])

        def stalled_now() -> dict[str, int] | None:
            """The partials, once every shard of the stage is either whole or hangs at its
            stall (each logs the stall after its last append); None while any moves."""
            stalls = cluster.log(1).count("test stall at byte")
            parts = _partials(store1)
            settled = all(store1.has(cid) or cid in parts for cid in wanted)
            if settled and stalls == len(parts) and set(parts.values()) == {STALL}:
                return parts
            return None

        async def load_until_stalled() -> dict[str, int]:
            task = asyncio.ensure_future(_stage_load(node1, manifest, 2, N_BLOCKS, 120))
            try:
                deadline = time.monotonic() + 60  # a bound on a hang, not a measurement
                while time.monotonic() < deadline:
                    if (parts := stalled_now()) is not None:
                        return parts
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.05)
                raise AssertionError("node1 never reached the stall:\n" + cluster.log(1))
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        hung = arun(load_until_stalled(), 90)
        # every download under way hangs with exactly STALL bytes received: kill -9 now
        assert set(hung) <= set(stalled) and len(hung) >= 1
        print(f"{len(hung)} shard(s) killed at byte {STALL}")
        cluster.stop(1, signal.SIGKILL)
        assert cluster.procs[1].returncode == -signal.SIGKILL
        for cid in hung:  # nothing half-done under a valid name
            assert not store1.has(cid) and not (store1.shard_dir / cid).exists()
        assert all(store1.verify(cid) for cid in store1.shards())  # what did land is whole
        assert _partials(store1) == hung

        # restart (no throttles): the same load resumes from the partials and verifies them
        cluster.start(1)
        cluster.wait_for_peers(2, i=1)
        reply = arun(_stage_load(node1, manifest, 2, N_BLOCKS, 60), 90)
        assert set(hung) <= set(reply.header["fetched"]) <= set(wanted)
        log = cluster.log(1).split("test stall at byte")[-1]  # the second run's lines
        for cid in hung:
            size = wanted[cid]
            assert f"shard {cid}: resuming at byte {STALL} of {size}" in log, log
            # the kept bytes were used, only the rest crossed the network
            assert f"shard {cid} verified: {STALL} bytes kept from before, {size - STALL}" in log
        assert _partials(store1) == {}
        assert all(store1.has(cid) and store1.verify(cid) for cid in wanted)

        # and the cluster answers through the node that was killed
        out = cluster.llm("-m", "omni/tiny", "hi", "-o", "max_tokens", "2", "--no-log")
        assert isinstance(out, str)
