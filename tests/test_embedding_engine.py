"""Embeddings in the engines (backend/pooling.py, ``embed`` of ggml_stage and engine): the
last stage's final-norm states, pooled a chunk at a time; the same over any split and any
cutting of the prompt into pieces; ``last`` is the state the logits are computed from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

pytest.importorskip("ggml")
pytest.importorskip("gguf")  # tiny_model's quantizers

from support.stage_model import Model  # noqa: E402
from support.tiny_model import write_tiny_llama  # noqa: E402

from llm_omninode.backend.ggml_types import GGMLType  # noqa: E402
from llm_omninode.backend.pooling import (  # noqa: E402
    Pooler,
    PoolingError,
    has_pooling,
    l2_normalized,
    pooling_of,
)

PROMPT = [5, 70, 80, 90, 100, 120, 7, 9, 31, 64, 3, 44, 5, 200, 7, 8]
ENGINES = ("ggml", "mlx")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Model:
    d = tmp_path_factory.mktemp("embed_tiny")
    f32 = dict(weight_type=GGMLType.F32, embed_type=GGMLType.F32, context_length=1024)
    return Model(write_tiny_llama(d / "llama-f32.gguf", **f32))


def embed(
    stages: Sequence, ids: Sequence[int], kind: str, pieces: Sequence[int] = ()
) -> np.ndarray:
    """The pooled vector of ``ids`` through ``stages``, sent in pieces cut at ``pieces``."""
    pooler = Pooler(kind, stages[-1].spec.d_model)
    cuts = [0, *pieces, len(ids)]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        x = np.asarray(ids[a:b], np.int32)
        for stage in stages[:-1]:
            x = stage.forward("s", x)
        stages[-1].embed("s", x, pooler)
    for stage in stages:
        stage.free("s")
    return pooler.result()


@pytest.mark.parametrize("engine", ENGINES)
def test_pooled_over_any_split_and_pieces(tiny, engine) -> None:
    one = tiny.stages([0, 4], engine, hidden_dtype=np.float32)
    two = tiny.stages([0, 1, 4], engine, hidden_dtype=np.float32)
    for kind in ("mean", "cls", "last"):
        whole = embed(one, PROMPT, kind)
        assert whole.shape == (tiny.spec.d_model,) and whole.dtype == np.float32
        np.testing.assert_allclose(embed(two, PROMPT, kind), whole, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(embed(one, PROMPT, kind, [3, 9]), whole, rtol=1e-4, atol=1e-4)
    assert not one[0].sequences()  # freed: nothing kept after an embedding


def test_engines_agree_and_last_is_what_the_logits_read(tiny) -> None:
    g, m = tiny.stages([0, 4], "ggml"), tiny.stages([0, 4], "mlx")
    for kind in ("mean", "cls", "last"):
        np.testing.assert_allclose(embed(g, PROMPT, kind), embed(m, PROMPT, kind), atol=2e-3)
    last = embed(g, PROMPT, "last")
    logits = g[0].forward("s", np.asarray(PROMPT, np.int32))
    table = np.asarray(tiny.tensors["token_embd.weight"].data).view(np.float32)
    table = table.reshape(tiny.spec.vocab_size, tiny.spec.d_model)
    np.testing.assert_allclose(table @ last, logits, rtol=1e-4, atol=1e-4)  # tied head


def test_mean_is_the_mean_of_every_position(tiny, monkeypatch) -> None:
    """Each position's state is the ``last`` of its prefix; mean pools them, even over the
    engine's chunks (made tiny here so a prompt spans several)."""
    (stage,) = tiny.stages([0, 4], "ggml")
    per = [embed([stage], PROMPT[: n + 1], "last") for n in range(len(PROMPT))]
    first = embed([stage], PROMPT, "cls")
    monkeypatch.setattr(stage, "prefill_chunk", 5)
    np.testing.assert_allclose(embed([stage], PROMPT, "mean"), np.mean(per, axis=0), atol=1e-4)
    np.testing.assert_allclose(first, per[0], atol=1e-5)


def test_pooling_metadata_and_normalisation() -> None:
    assert pooling_of({"general.architecture": "llama"}) == "last"  # a causal LM
    assert pooling_of({"general.architecture": "qwen2", "qwen2.pooling_type": 1}) == "mean"
    assert pooling_of({"general.architecture": "qwen2", "qwen2.pooling_type": 0}) == "last"
    assert pooling_of({"general.architecture": "bert", "bert.pooling_type": 2}) == "cls"
    for bad in (4, 9, "mean"):
        with pytest.raises(PoolingError):
            pooling_of({"general.architecture": "llama", "llama.pooling_type": bad})
    assert has_pooling({"general.architecture": "x", "x.pooling_type": 3})
    assert not has_pooling({"general.architecture": "llama"})
    v = l2_normalized(np.array([3.0, 4.0]))
    np.testing.assert_allclose(v, [0.6, 0.8])
    assert not l2_normalized(np.zeros(3)).any()
    with pytest.raises(ValueError, match="NaN"):
        l2_normalized(np.array([1.0, np.nan]))
    p = Pooler("mean", 2)
    with pytest.raises(PoolingError):
        p.result()
    with pytest.raises(PoolingError):
        p.add(np.zeros((2, 3)), 2)
