"""The HTTP API of a shim that holds no layer of the model: served through the ring.

node1 has too little memory for any block, so the plan puts every block on node0; node1 still
lists the model (it is node0's), answers Ollama requests for it, and when node0 dies in the
middle of a stream, the stream ends with an ``{"error": ...}`` line instead of hanging.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import ollama
import pytest
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

GREEDY = {"temperature": 0, "num_predict": 12}
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def _status(cluster: ShimCluster, i: int) -> dict:
    return json.loads(cluster.llm("omni", "status", "--json", i=i))


def _hosted(cluster: ShimCluster, i: int) -> list[tuple[int, int]]:
    return [(h["start"], h["end"]) for h in _status(cluster, i)["hosted"]]


def test_a_shim_without_layers_serves_through_the_ring(tmp_path: Path, smollm2_path: Path):
    with ShimCluster(tmp_path, 2) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start(0)
        cluster.start(1, args=["--max-memory", "1MiB"])  # smaller than any block
        cluster.wait_for_peers(2, i=1)
        holder = ollama.Client(host=cluster.api_url(0))
        empty = ollama.Client(host=cluster.api_url(1))
        assert [m.model for m in empty.list().models] == ["smollm2:latest"]  # node0's model

        want = holder.chat(model="smollm2", messages=MESSAGES, options=GREEDY).message.content
        got = empty.chat(model="smollm2", messages=MESSAGES, options=GREEDY)
        assert got.message.content == want and got.eval_count == 12
        (plan,) = _status(cluster, 1)["plans"]
        assert [(s["node_id"], s["start"], s["end"]) for s in plan["stages"]] == [
            (cluster.node_ids[0], 0, 30)
        ]
        assert not any((cluster.dirs[1] / "shards").glob("*"))  # it holds no layer

        # node0's own keep-alive unloads the stage node1's plan uses: node1 notices (the
        # stage answers "not loaded"), loads the plan again and serves the request anyway
        assert _hosted(cluster, 0) == [(0, 30)]
        assert holder.generate(model="smollm2", keep_alive=0).done_reason == "unload"
        assert _hosted(cluster, 0) == []
        again = empty.chat(model="smollm2", messages=MESSAGES, options=GREEDY)
        assert again.message.content == want
        assert _hosted(cluster, 0) == [(0, 30)]  # loaded again for node1's plan
        assert [p["ready"] for p in _status(cluster, 1)["plans"]] == [True]

        stream = empty.generate(model="smollm2", prompt="Tell me a very long story.",
                                options={"num_predict": 4000}, stream=True)  # fmt: skip
        assert next(stream).response is not None
        cluster.stop(0, signal.SIGKILL)
        with pytest.raises(ollama.ResponseError) as info:
            for _ in stream:
                pass
        assert "generation failed" in info.value.error
        # node1 keeps serving: the model is gone with node0, and it says so
        with pytest.raises(ollama.ResponseError) as info:
            empty.chat(model="smollm2", messages=MESSAGES, options=GREEDY)
        assert info.value.status_code in (404, 500), info.value
