"""Embeddings through real shims (shim/embedding.py, shim/http/embed.py): SmolLM2 split over
two shims (prompts in pipelined pieces of 8 tokens), asked by the real clients (``ollama``,
``openai``, langchain's OllamaEmbeddings, ``llm embed`` as a subprocess); every vector must be
the in-process engine's (one ggml stage of the whole model), normalised as Ollama does; then
one node leaves and the other, alone, computes the same vectors."""

from __future__ import annotations

import base64
import http.client
import json
import math
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import ollama
import openai
import pytest
from support.http_post import post
from support.shim_cluster import ShimCluster, leftovers
from support.stage_model import Model
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.pooling import Pooler, l2_normalized
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.tokenizer import Tokenizer

pytestmark = [pytest.mark.model, pytest.mark.cluster]

TEXTS = ["The sea is calm tonight.", "Pipelines split a model across devices, block by block."]
LONG = " ".join(["waves"] * 40)  # more than the 16 positions of num_ctx below
TOL = dict(rtol=2e-3, atol=2e-4)  # other threads and prompt pieces round differently


class Reference:
    """The in-process engine: one ggml stage of all the model's blocks, its final-norm states
    pooled (SmolLM2's GGUF has no pooling type, a causal LM: its last position's)."""

    def __init__(self, path: Path, kind: str = "last") -> None:
        from llm_omninode.backend.ggml_stage import GgmlStage

        self.kind = kind
        self.model = Model(path)
        self.tokenizer = Tokenizer.from_metadata(self.model.file.metadata)
        spec = self.model.spec
        self.stage = GgmlStage(spec, self.model.tensors, 0, spec.n_blocks, threads=1)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    def raw(self, text: str | list[int]) -> np.ndarray:
        ids = self.ids(text) if isinstance(text, str) else text
        pooler = Pooler(self.kind, self.model.spec.d_model)
        self.stage.embed("ref", np.asarray(ids, np.int32), pooler)
        self.stage.free("ref")
        return pooler.result()

    def unit(self, text: str | list[int]) -> np.ndarray:
        return l2_normalized(self.raw(text))


@pytest.fixture(scope="module")
def ref(smollm2_path: Path) -> Reference:
    return Reference(smollm2_path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    """A tiny qwen2 GGUF that says how to pool: mean (llama.cpp's pooling_type 1)."""
    where = tmp_path_factory.mktemp("tiny") / "tiny-mean.gguf"
    return write_tiny_llama(where, arch="qwen2", pooling_type=1, chat_template=None)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path: Path, tiny_path: Path):
    root = tmp_path_factory.mktemp("embed")
    with ShimCluster(root, 2, extra_env={"OMNI_PREFILL_PIECE": "8"}) as c:
        registry = ModelRegistry(c.dirs[0])
        registry.add_file(smollm2_path, alias="smollm2")
        registry.add_file(tiny_path, alias="tinymean")
        c.start_all()
        c.wait_for_peers(2)
        yield c


def _status(cluster: ShimCluster, i: int) -> dict:
    return json.loads(cluster.llm("omni", "status", "--json", i=i))


def _stage_nodes(cluster: ShimCluster) -> list[str]:
    """The nodes of SmolLM2's plan's stages, as /api/ps lists them."""
    parts = urlsplit(cluster.api_url(0))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", "/api/ps")
        rows = json.loads(conn.getresponse().read())["models"]
        (row,) = [r for r in rows if r["name"] == "smollm2:latest"]
    finally:
        conn.close()
    return [s["node_id"] for s in row["stages"]]


def _close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL)


def test_ollama_embed_over_a_split(cluster: ShimCluster, ref: Reference):
    client = ollama.Client(host=cluster.api_url(0))
    out = client.embed(model="smollm2", input=TEXTS)
    assert out.model == "smollm2" and len(out.embeddings) == 2
    for got, text in zip(out.embeddings, TEXTS, strict=True):
        assert len(got) == 576 and math.isclose(np.linalg.norm(got), 1.0, rel_tol=1e-5)
        _close(got, ref.unit(text))
    assert out.prompt_eval_count == sum(len(ref.ids(t)) for t in TEXTS)
    assert out.total_duration >= out.load_duration > 0
    assert len(_stage_nodes(cluster)) == 2  # really split

    # dimensions: the first N values of the unit vector, scaled to unit length again
    (short,) = client.embed(model="smollm2", input=TEXTS[0], dimensions=64).embeddings
    _close(short, l2_normalized(ref.unit(TEXTS[0])[:64]))
    # truncate (default): cut to the context; false: refused
    (cut,) = client.embed(model="smollm2", input=LONG, options={"num_ctx": 16}).embeddings
    _close(cut, ref.unit(ref.ids(LONG)[:16]))
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="smollm2", input=LONG, truncate=False, options={"num_ctx": 16})
    assert info.value.status_code == 400 and "exceeds the context length 16" in info.value.error

    # the legacy route: one prompt, the vector as pooled (not normalised)
    legacy = client.embeddings(model="smollm2", prompt=TEXTS[1]).embedding
    _close(legacy, ref.raw(TEXTS[1]))
    assert np.linalg.norm(legacy) > 2
    assert client.embed(model="smollm2", input="").embeddings == []  # loads, embeds nothing
    # /api/show: SmolLM2 has no pooling type, so it completes (Ollama lists embedding only
    # for a GGUF that says how to pool)
    assert client.show("smollm2").capabilities == ["completion"]


def test_openai_and_langchain_clients(cluster: ShimCluster, ref: Reference):
    from langchain_ollama import OllamaEmbeddings

    url = cluster.api_url(0)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.embeddings.create(model="smollm2", input=TEXTS)  # asks for base64
    assert [d.index for d in out.data] == [0, 1] and out.model == "smollm2"
    for d, text in zip(out.data, TEXTS, strict=True):
        _close(d.embedding, ref.unit(text))
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(ref.ids(t)) for t in TEXTS)
    ids = ref.ids(TEXTS[0])
    floats = client.embeddings.create(model="smollm2", input=[ids], encoding_format="float",
                                      dimensions=32)  # fmt: skip
    _close(floats.data[0].embedding, l2_normalized(ref.unit(TEXTS[0])[:32]))

    lc = OllamaEmbeddings(model="smollm2", base_url=url)
    _close(lc.embed_query(TEXTS[1]), ref.unit(TEXTS[1]))
    docs = lc.embed_documents(TEXTS)
    for got, text in zip(docs, TEXTS, strict=True):
        _close(got, ref.unit(text))


def test_llm_embed_cli(cluster: ShimCluster, ref: Reference):
    out = cluster.llm("embed", "-m", "omni/smollm2", "-c", TEXTS[0])
    _close(json.loads(out), ref.unit(TEXTS[0]))


def test_a_model_that_says_how_to_pool(cluster: ShimCluster, tiny_path: Path):
    """A GGUF with a pooling type (mean here) is an embedding model to /api/show, and its
    vectors are the mean of every position's final state, prompt pieces included."""
    client = ollama.Client(host=cluster.api_url(0))
    assert client.show("tinymean").capabilities == ["embedding"]
    ref = Reference(tiny_path, "mean")
    long = " ".join(TEXTS * 3)  # several pieces of 8
    out = client.embed(model="tinymean", input=[*TEXTS, long]).embeddings
    for got, text in zip(out, [*TEXTS, long], strict=True):
        _close(got, ref.unit(text))


def test_bad_requests_are_400s(cluster: ShimCluster):
    url = cluster.api_url(0)
    bad = [
        ("/api/embed", {"model": "smollm2", "input": 5}, "input must be"),
        ("/api/embed", {"model": "smollm2", "input": ["a", 1]}, "input must be"),
        ("/api/embed", {"model": "smollm2", "input": "a", "truncate": "no"}, "truncate"),
        ("/api/embed", {"model": "smollm2", "input": "a", "dimensions": 0}, "dimensions"),
        ("/api/embed", {"model": "smollm2", "input": ["x"] * 2049}, "at most 2048"),
        ("/api/embeddings", {"model": "smollm2", "prompt": ["a"]}, "prompt must be"),
        ("/v1/embeddings", {"model": "smollm2", "input": []}, "input must be"),
        ("/v1/embeddings", {"model": "smollm2", "input": ""}, "empty"),
        ("/v1/embeddings", {"model": "smollm2", "input": [[1, 2], []]}, "input[1]"),
        ("/v1/embeddings", {"model": "smollm2", "input": [1, -2]}, "token ids"),
        ("/v1/embeddings", {"model": "smollm2", "input": [10**6]}, "[0, 49152)"),
        ("/v1/embeddings", {"model": "smollm2", "input": "a", "encoding_format": "hex"}, "base64"),
    ]
    for path, body, words in bad:
        status, doc = post(url, path, body)
        message = doc["error"]["message"] if path.startswith("/v1") else doc["error"]
        assert status == 400 and words in message, (path, body, status, doc)
    status, doc = post(url, "/api/embed", {"model": "nope", "input": "a"})
    assert status == 404


def test_one_node_alone_gives_the_same_vectors(cluster: ShimCluster, ref: Reference):
    """node1 leaves: node0 plans the model on itself alone and embeds the same; no sequence
    is left on any stage."""
    client = ollama.Client(host=cluster.api_url(0))
    split = client.embed(model="smollm2", input=TEXTS).embeddings
    cluster.stop(1)
    alone = client.embed(model="smollm2", input=TEXTS).embeddings
    assert _stage_nodes(cluster) == [cluster.node_ids[0]]
    for a, s, text in zip(alone, split, TEXTS, strict=True):
        _close(a, np.asarray(s, np.float32))
        _close(a, ref.unit(text))
    left = leftovers(_status(cluster, 0))
    assert not any(left.values()), left
    # base64 as OpenAI encodes it: little-endian float32
    client_oa = openai.OpenAI(base_url=f"{cluster.api_url(0)}/v1", api_key="unused")
    raw = client_oa.embeddings.with_raw_response.create(
        model="smollm2", input=TEXTS[0], encoding_format="base64"
    )
    b64 = json.loads(raw.text)["data"][0]["embedding"]
    _close(np.frombuffer(base64.b64decode(b64), "<f4"), ref.unit(TEXTS[0]))
