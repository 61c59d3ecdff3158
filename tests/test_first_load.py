"""Two real shims, SmolLM2 split over them (node1 fetches its shards from node0): a first
load streams its progress before the first token (Ollama NDJSON lines, OpenAI SSE comments,
the plugin's QUIC frames), the `ollama` and `openai` clients still parse every stream, both
nodes' /api/ps list the model, and llm's async model runs prompts without blocking."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.request import urlopen

import llm
import ollama
import openai
import pytest
from support.http_post import post_lines
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.client import AsyncShimClient
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.model, pytest.mark.cluster]

GREEDY = {"temperature": 0, "num_predict": 6}
CHAT = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path: Path):
    root = tmp_path_factory.mktemp("first_load")
    with ShimCluster(root, 2, max_memory="1GiB") as c:
        ModelRegistry(c.dirs[0]).add_file(smollm2_path, alias="smollm2")
        c.start_all()
        c.wait_for_peers(2)
        yield c


@pytest.fixture
def as_client(cluster, monkeypatch):
    """This process as a client of node0 (its identity and secret, its alias table)."""
    monkeypatch.setenv("OMNI_HOME", str(cluster.dirs[0]))
    monkeypatch.setenv("OMNI_SHIM", f"127.0.0.1:{cluster.ports[0]}")
    monkeypatch.setenv("LLM_USER_PATH", str(cluster.root / "llm0"))


def _stream(url: str, path: str, body: dict) -> list[bytes]:
    status, lines = post_lines(url, path, body)
    assert status == 200, lines
    return lines


def _unload(cluster: ShimCluster) -> None:
    client = ollama.Client(host=cluster.api_url(0))
    assert client.generate(model="smollm2", keep_alive=0).done_reason == "unload"


def test_a_first_load_streams_progress_before_the_first_token(cluster):
    body = {"model": "smollm2", "messages": CHAT, "options": GREEDY}
    lines = [json.loads(line) for line in _stream(cluster.api_url(0), "/api/chat", body)]
    first_text = next(i for i, d in enumerate(lines) if d["message"]["content"])
    reports = [d["omninode_progress"] for d in lines[:first_text]]
    assert reports and all(not d["done"] for d in lines[:first_text]), lines[:first_text]
    assert not any("omninode_progress" in d for d in lines[first_text:])
    assert {r["stages"] for r in reports} == {2}  # the split
    assert reports[0]["loaded"] == 0 and reports[-1]["loaded"] == 2
    last = reports[-1]
    assert last["total"] > 10_000_000 and last["fetched"] == last["total"]  # node1's shards
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 6

    # the clients parse a first load's stream (a progress line is a chunk with no text)
    _unload(cluster)
    parts = list(ollama.Client(host=cluster.api_url(0)).chat(
        model="smollm2", messages=CHAT, options=GREEDY, stream=True))  # fmt: skip
    assert parts[0].message.content == "" and not parts[0].done
    want = "".join(d["message"]["content"] for d in lines)
    assert "".join(p.message.content for p in parts) == want and parts[-1].done

    _unload(cluster)
    raw = _stream(cluster.api_url(0), "/v1/chat/completions",
                  {"model": "smollm2", "messages": CHAT, "max_tokens": 6, "stream": True,
                   "temperature": 0})  # fmt: skip
    assert raw[0].startswith(b": omninode_progress {")  # an SSE comment
    _unload(cluster)
    client = openai.OpenAI(base_url=cluster.api_url(0) + "/v1", api_key="-")
    chunks = client.chat.completions.create(
        model="smollm2", messages=CHAT, max_tokens=6, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_every_node_lists_what_it_holds_in_ps(cluster):
    ollama.Client(host=cluster.api_url(0)).chat(model="smollm2", messages=CHAT, options=GREEDY)
    rows = []
    for i in range(2):
        (model,) = ollama.Client(host=cluster.api_url(i)).ps().models
        assert model.name == model.model == "smollm2:latest" and model.size > 0
        assert model.details.family == "llama" and model.expires_at is not None
        with urlopen(cluster.api_url(i) + "/api/ps") as r:
            (row,) = json.load(r)["models"]
        assert row["size"] == model.size and row["digest"] == model.digest
        rows.append(row)
    coordinator, holder = rows
    assert coordinator["coordinated_here"] and not holder["coordinated_here"]
    plan = {s["node_id"]: s for s in coordinator["stages"]}
    assert sorted(plan) == sorted(cluster.node_ids)  # the split
    for node_id, row in zip(cluster.node_ids, rows, strict=True):  # what each node holds
        assert row["held"] == [{"start": plan[node_id]["start"], "end": plan[node_id]["end"]}]
        assert row["size"] == plan[node_id]["weight_bytes"]


def test_the_async_model_streams_without_blocking_and_reports_loads(cluster, as_client):
    async def main():
        model = llm.get_async_model("omni/smollm2")
        ticks = 0

        async def ticker():  # runs while the model answers: the loop is never blocked long
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        reports, seen = [], []
        request = GenerationRequest(model="smollm2", messages=(Message("user", "Hi"),),
                                    max_tokens=2)  # fmt: skip
        async with await AsyncShimClient.connect(start=False) as client:
            async for chunk in client.generate(request, reports.append):
                seen.append((len(reports), chunk))

        tick = asyncio.ensure_future(ticker())
        whole = await model.prompt("Name a color.", temperature=0, max_tokens=6).text()
        pieces = [p async for p in model.prompt("Name a color.", temperature=0, max_tokens=6)]
        response = model.prompt("Name a color.", temperature=0, max_tokens=6)
        await response.text()
        usage = await response.usage()
        tick.cancel()
        return whole, pieces, usage, ticks, reports, seen

    _unload(cluster)  # the QUIC client's request below loads it again
    whole, pieces, usage, ticks, reports, seen = asyncio.run(main())
    assert whole and "".join(pieces) == whole
    assert usage.output == 6 and usage.input > 0
    assert ticks > 5
    # the plugin's QUIC client heard the load (the first request after an unload) before
    # the first chunk: every stage loaded, no bytes to fetch any more
    assert reports and all(n == len(reports) for n, _ in seen), (reports, seen)
    assert (reports[-1]["loaded"], reports[-1]["stages"]) == (2, 2)
    assert seen[-1][1].done and seen[-1][1].completion_tokens == 2
