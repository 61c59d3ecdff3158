"""End to end: real shim processes split SmolLM2 and answer through ``llm -m omni/smollm2``.

Node 0 holds the model (added from the pulled GGUF); the others start empty and fetch the
shards of their stages from it. Greedy output must equal the single-stage engine's, token for
token (float16 at stage boundaries is what the single-stage split-invariance test allows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.netns import Topology, netns_available
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.local_model import LocalModel
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.model, pytest.mark.cluster]

N_TOKENS = 12


@pytest.fixture(scope="module")
def reference(smollm2_path: Path, smollm2_golden: dict, tmp_path_factory) -> dict[str, str]:
    """Greedy answers of the single-stage, in-process engine for the golden chat prompts."""
    registry = ModelRegistry(tmp_path_factory.mktemp("ref"))
    registry.add_file(smollm2_path, alias="smollm2")
    model = LocalModel.load(registry, "smollm2")
    out = {}
    for chat in smollm2_golden["chat"][:3]:
        content = chat["messages"][-1]["content"]
        request = GenerationRequest(
            model="smollm2",
            messages=(Message("user", content),),
            options=SamplingOptions().updated(temperature=0.0),
            max_tokens=N_TOKENS,
        )
        out[content] = "".join(c.text for c in model.run(request))
    return out


def ask(cluster: ShimCluster, content: str, i: int = 0) -> str:
    text = cluster.llm(
        "-m", "omni/smollm2", content, "-o", "temperature", "0", "-o", "max_tokens",
        str(N_TOKENS), "--no-log", i=i,
    )  # fmt: skip
    return text.rstrip("\n")


def check_split(cluster: ShimCluster, reference: dict[str, str], n: int) -> None:
    status = json.loads(cluster.llm("omni", "status", "--json"))
    (plan,) = status["plans"]
    stages = plan["stages"]
    assert len(stages) == n, stages
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 30
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:], strict=False))
    assert len({s["node_id"] for s in stages}) == n  # every node holds a slice
    print("split:", [(s["name"], s["start"], s["end"]) for s in stages])
    for i in range(1, n):  # the empty nodes fetched (only) their shards from node 0
        fetched = list((cluster.dirs[i] / "shards").iterdir())
        assert fetched, f"node{i} fetched nothing"
        assert len(fetched) < 32


def run_cluster(cluster: ShimCluster, smollm2_path: Path, reference: dict[str, str], n: int):
    ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
    cluster.start_all()
    rows = cluster.wait_for_peers(n)
    assert {r["name"] for r in rows} >= {f"node{i}" for i in range(n)}
    for content, want in reference.items():
        got = ask(cluster, content)
        print(f"{content!r}: {got!r}")
        assert got == want
    check_split(cluster, reference, n)
    table = cluster.llm("omni", "peers")
    assert all(f"node{i}" in table for i in range(n))


def test_two_shims_on_loopback(tmp_path, smollm2_path, reference):
    with ShimCluster(tmp_path, 2) as cluster:
        run_cluster(cluster, smollm2_path, reference, 2)


def test_prompts_in_pipelined_pieces(tmp_path, smollm2_path, reference):
    """Prompts sent in pieces of 8 tokens (each stage passes a piece on while computing the
    next; see shim/pipeline.py) answer as the whole prompt at once does."""
    with ShimCluster(tmp_path, 2, extra_env={"OMNI_PREFILL_PIECE": "8"}) as cluster:
        run_cluster(cluster, smollm2_path, reference, 2)
        assert re.search(r"prompt sent in \d+ pieces", cluster.logs[0].read_text())


def test_a_piece_refused_downstream_says_why(tmp_path, smollm2_path):
    """Stage 1 refuses a piece the user never waits on (its context is too short): the
    answer to the prompt's last piece carries its reason, not a closed stream's."""
    with ShimCluster(tmp_path, 2, extra_env={"OMNI_PREFILL_PIECE": "64"}) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start(0)
        cluster.start(1, args=["--max-context", "150"])
        cluster.wait_for_peers(2)
        prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)
        result = cluster.run([*LLM, "-m", "omni/smollm2", prompt, "-o", "max_tokens", "4"])
        assert result.returncode != 0
        assert "the context is 150" in result.stderr, result.stderr


def test_three_shims_in_network_namespaces(tmp_path, smollm2_path, reference):
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"no network namespaces here ({reason}); the loopback test covers the rest")
    with Topology(3) as topo, ShimCluster(tmp_path, 3, topology=topo) as cluster:
        run_cluster(cluster, smollm2_path, reference, 3)


def test_corrupt_copies_are_detected_and_fetched_elsewhere(tmp_path, smollm2_path, reference):
    """node1 holds a copy of every shard with one byte flipped and coordinates; node2 starts
    empty and asks node1 first. Both notice (BLAKE3 against the CID) and get the shards from
    node0, and the answer is still the single-stage engine's."""
    with ShimCluster(tmp_path, 3) as cluster:
        good = ModelRegistry(cluster.dirs[0])
        record = good.add_file(smollm2_path, alias="smollm2")
        bad = ModelRegistry(cluster.dirs[1])
        manifest = good.store.get_manifest(record.model_id)
        bad.store.put_manifest(manifest)
        bad.set_alias("smollm2", record.model_id)
        for shard in manifest.shards:
            path = bad.store.put_bytes(shard.cid, bytes(good.store.open(shard.cid)))
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        cluster.start_all()
        cluster.wait_for_peers(3, i=1)
        content, want = next(iter(reference.items()))
        assert ask(cluster, content, i=1) == want
        assert "was corrupt here" in cluster.log(1)
        assert "do not match the CID" in cluster.log(2)
        assert cluster.node_ids[1] in cluster.log(2)  # the peer that served them is named
