"""Placement by measured speed: two nodes, each with room for the whole model, one computing
with one ggml thread and the other with two. Each measures its speed at start and announces it;
the plan shares the model so that both stages take about equal time (the slower node holds
fewer blocks), and ``llm omni status`` shows each stage's time per token.

Two threads on a machine shared with other work can measure slower than one (a thread waiting
for a core stalls the other at every step; a process keeping one of two cores busy makes the
two-thread node measure ~1.5 against ~49 for one thread, and its stages really are slower): it
is started again, up to four times in all, until it measures clearly faster; either way the
figures must differ clearly, and the plan must follow the figures the nodes announced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omninode_shim.planner import _work
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.cluster, pytest.mark.model]

PROMPT = "Write a short poem about the sea."
CLEAR = 1.3  # speeds this far apart differ clearly, whatever the noise of a shared machine


def _speeds(cluster: ShimCluster) -> dict[str, float]:
    rows = cluster.wait_for_peers(2)
    return {r["node_id"]: r["speed"] for r in rows if r.get("live")}


def _planned_stages(cluster: ShimCluster, timeout: float = 30.0) -> list[dict]:
    """The ready plan's stages once each shows its node's ms/token (a peer's comes with its
    next INFO, every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(cluster.llm("omni", "status", "--json"))
        (plan,) = status["plans"]
        stages = plan["stages"]
        if plan["ready"] and all(s.get("ms_per_token") for s in stages):
            return stages
        assert time.monotonic() < deadline, f"no ms/token for every stage: {status}"
        time.sleep(1.0)


def test_the_slower_node_holds_fewer_blocks(tmp_path: Path, smollm2_path: Path):
    with ShimCluster(tmp_path, 2) as cluster:
        record = ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        one, two = cluster.node_ids
        cluster.start(0, args=["--threads", "1"])
        for attempt in range(4):
            cluster.start(1, args=["--threads", "2"])
            speeds = _speeds(cluster)
            if speeds[two] >= CLEAR * speeds[one] or attempt == 3:
                break
            cluster.stop(1)  # measured again at its next start
        print(f"speeds: --threads 1 {speeds[one]}, --threads 2 {speeds[two]}")
        slow, fast = sorted((one, two), key=speeds.__getitem__)
        assert speeds[fast] >= CLEAR * speeds[slow], speeds

        cluster.llm("-m", "omni/smollm2", PROMPT, "-o", "temperature", "0",
                    "-o", "max_tokens", "24", "--no-log")  # fmt: skip
        stages = _planned_stages(cluster)
        print("plan:", [(s["name"], s["start"], s["end"], s["ms_per_token"]) for s in stages])
        blocks = {s["node_id"]: s["end"] - s["start"] for s in stages}
        assert set(blocks) == {one, two}  # both budgets hold the whole model: both take part
        assert blocks[slow] < blocks[fast]

        # the split is the one whose slower stage is the quickest by the announced speeds (to
        # within half a block's time on the faster node, as the planner bisects)
        manifest = record.manifest
        cum, head = _work(manifest)
        n, order = manifest.n_blocks, [s["node_id"] for s in stages]

        def slowest(cut: int) -> float:
            works = [cum[cut], cum[n] - cum[cut] + head]
            return max(w / speeds[node] for w, node in zip(works, order, strict=True))

        best = min(slowest(c) for c in range(1, n))
        assert slowest(stages[0]["end"]) <= best + cum[1] / (2 * speeds[fast])

        text = cluster.llm("omni", "status")
        assert text.count("ms/token") == 2, text
        peers = cluster.llm("omni", "peers")
        assert "SPEED" in peers and f"{speeds[one]:g}" in peers, peers
