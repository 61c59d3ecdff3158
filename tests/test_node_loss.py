"""A node lost in the middle of a generation: the coordinator notices within seconds (a step
unanswered for 2 s makes the waiting node probe the next one), plans again over the nodes that
remain (they fetch the shards they lack), replays the prompt and the tokens generated so far,
and goes on. The client sees one uninterrupted stream, and greedy text equals a run with no
failure. When the rest cannot hold the model, the client gets a clear error, and nothing hangs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import ollama
import pytest
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

PROMPT = "Tell me a long story about a lighthouse keeper."
N = 120  # tokens: long enough that the kill lands mid-generation
OPTIONS = {"temperature": 0, "num_predict": N}


def _wait_for_decode(cluster: ShimCluster, i: int, prefills: int, timeout: float = 120) -> None:
    """Until node ``i`` has started its ``prefills``-th sequence, then a few tokens more."""
    deadline = time.monotonic() + timeout
    while cluster.log(i).count("prefill of") < prefills and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # some tokens out: the loss lands in the middle of the decode


def _stages(cluster: ShimCluster) -> list[tuple[str, int, int]]:
    status = json.loads(cluster.llm("omni", "status", "--json"))
    (plan,) = [p for p in status["plans"] if p["ready"]] or status["plans"]
    return [(s["node_id"], s["start"], s["end"]) for s in plan["stages"]]


def test_killed_and_leaving_nodes_are_replaced_without_the_client_noticing(
    tmp_path: Path, smollm2_path: Path
):
    with ShimCluster(tmp_path, 2) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        client = ollama.Client(host=cluster.api_url(0))
        want = client.generate(model="smollm2", prompt=PROMPT, options=OPTIONS).response
        assert len({n for n, _, _ in _stages(cluster)}) == 2  # the split spans both nodes

        # SIGKILL of node1 during a streamed HTTP generation
        stream = client.generate(model="smollm2", prompt=PROMPT, options=OPTIONS, stream=True)
        parts = [next(stream)]
        _wait_for_decode(cluster, 0, prefills=2)
        cluster.stop(1, signal.SIGKILL)
        parts += list(stream)  # no error: the stream goes on
        assert "".join(p.response for p in parts) == want
        assert parts[-1].done and parts[-1].eval_count == N
        assert _stages(cluster) == [(cluster.node_ids[0], 0, 30)]

        # node1 comes back (the plan spans both again), then leaves cleanly (SIGTERM) while
        # the llm plugin streams: its sequence moves to node0, no error
        cluster.start(1)
        cluster.wait_for_peers(2)
        assert client.generate(model="smollm2", prompt=PROMPT, options=OPTIONS).response == want
        assert len({n for n, _, _ in _stages(cluster)}) == 2
        # the plugin's defaults are the HTTP API's (Ollama's): the same greedy text as `want`
        argv = [*LLM, "-m", "omni/smollm2", PROMPT, "-o", "temperature", "0", "-o",
                "max_tokens", str(N), "--no-log"]  # fmt: skip
        proc = subprocess.Popen(argv, env=cluster.env(0), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            _wait_for_decode(cluster, 0, prefills=cluster.log(0).count("prefill of") + 1)
            assert cluster.stop(1, signal.SIGTERM) == 0
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert out.rstrip("\n") == want


def test_when_the_rest_cannot_hold_the_model_the_client_hears_why(
    tmp_path: Path, smollm2_path: Path
):
    # each node alone is too small for the model: its runtime (~80 MiB) + weights (92 MiB) +
    # KV cache for 4 sequences of 2048 positions (184 MiB, shared out with the blocks) +
    # compute buffers (~64 MiB) is ~420 MiB, half of it ~300 MiB: the plan needs both
    with ShimCluster(
        tmp_path, 2, max_memory="360MiB", extra_args=["--max-context", "2048"]
    ) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        client = ollama.Client(host=cluster.api_url(0))
        stream = client.generate(model="smollm2", prompt=PROMPT, options=OPTIONS, stream=True)
        assert next(p for p in stream if p.response)  # text (a first load's progress has none)
        cluster.stop(1, signal.SIGKILL)
        with pytest.raises(ollama.ResponseError) as info:
            for _ in stream:
                pass
        assert "cannot take over" in info.value.error, info.value.error
        # node0 stays up and says the same to the next request, at once
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(model="smollm2", prompt="Hi", options=OPTIONS)
        assert info.value.status_code == 500 and "MiB" in info.value.error
