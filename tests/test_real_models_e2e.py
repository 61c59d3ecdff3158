"""gemma-3-270m and Qwen2.5-Coder-0.5B answer through ``llm -m omni/...`` split over two shims.

Node 0 holds the pulled file; node 1 starts empty and fetches the shards of its stage. The
greedy answer must equal the in-process single-stage engine's; for Qwen's first golden prompt
it is also llama.cpp's ("The capital of France is Paris.", then end of turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.local_model import LocalModel
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.large_model, pytest.mark.cluster]
DATA = Path(__file__).parent / "data"
N_TOKENS = 8
CASES = {
    "qwen2.5-coder-0.5b": ("qwen2_path", "qwen2.5-coder-0.5b-llamacpp.json"),
    "gemma3-270m": ("gemma3_path", "gemma3-270m-llamacpp.json"),
}


def single_stage_answer(
    path: Path, alias: str, content: str, home: Path, n_tokens: int = N_TOKENS
) -> str:
    registry = ModelRegistry(home)
    registry.add_file(path, alias=alias)
    model = LocalModel.load(registry, alias)
    request = GenerationRequest(
        model=alias,
        messages=(Message("user", content),),
        options=SamplingOptions().updated(temperature=0.0),
        max_tokens=n_tokens,
    )
    try:
        return "".join(c.text for c in model.run(request))
    finally:
        model.stages.clear()


@pytest.mark.parametrize("alias", list(CASES))
def test_two_shims_answer(alias: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture, golden_file = CASES[alias]
    path = request.getfixturevalue(fixture)
    golden = json.loads((DATA / golden_file).read_text())
    content = golden["chat"][0]["messages"][-1]["content"]
    want = single_stage_answer(path, alias, content, tmp_path / "ref")
    if alias.startswith("qwen"):
        assert want == golden["chat"][0]["greedy_text"]
    with ShimCluster(tmp_path / "cluster", 2, max_memory="4GiB") as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(path, alias=alias)
        cluster.start_all()
        cluster.wait_for_peers(2)
        got = cluster.llm(
            "-m", f"omni/{alias}", content, "-o", "temperature", "0",
            "-o", "max_tokens", str(N_TOKENS), "--no-log", timeout=600,
        ).rstrip("\n")  # fmt: skip
        print(f"{alias}: {content!r} -> {got!r}")
        assert got == want.rstrip("\n")  # llm prints a newline of its own; we strip them all
        (plan,) = json.loads(cluster.llm("omni", "status", "--json"))["plans"]
        stages = plan["stages"]
        assert len(stages) == 2 and len({s["node_id"] for s in stages}) == 2, stages
        assert list((cluster.dirs[1] / "shards").iterdir()), "node1 fetched nothing"
