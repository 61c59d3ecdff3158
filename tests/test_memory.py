"""A stage's planned memory (backend/memory.py) against what ggml really allocates, and the KV
budget a ggml stage keeps (ggml_kv.py): a sequence that would grow past it is refused."""

from __future__ import annotations

import numpy as np
import pytest

ggml = pytest.importorskip("ggml")
pytest.importorskip("gguf")  # tiny_model's quantizers

from support.stage_model import Model  # noqa: E402
from support.tiny_model import write_tiny_llama  # noqa: E402

from llm_omninode.backend.ggml_kv import GgmlKV, attended  # noqa: E402
from llm_omninode.backend.ggml_stage import GgmlStage  # noqa: E402
from llm_omninode.backend.memory import (  # noqa: E402
    DEFAULT_CONTEXT,
    PREFILL_CHUNK,
    compute_bytes,
    context_for,
    kv_bytes_per_position,
    stage_memory,
)
from llm_omninode.backend.sequences import SequenceLimitError  # noqa: E402

ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Model]:
    d = tmp_path_factory.mktemp("memory_tiny")
    return {
        arch: Model(write_tiny_llama(d / f"{arch}.gguf", arch=arch, context_length=2048))
        for arch in ARCHS
    }


def _allocated(stage: GgmlStage, T: int, context: int) -> int:
    """Bytes ggml's allocator gives the graph of T positions attending over ``context``."""
    spec = stage.spec
    cache = GgmlKV(stage.end - stage.start, spec.n_kv_heads * spec.head_dim, context, True)
    cache.reserve(context)
    g = stage._build([(cache, T, attended(context, context))], False)
    try:
        return ggml.ggml_gallocr_get_buffer_size(g.galloc, 0)
    finally:
        g.free()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("context", [64, 1024, 2048])
def test_compute_estimate_bounds_what_ggml_allocates(tiny, arch, context) -> None:
    model = tiny[arch]
    n = model.spec.n_blocks
    for start, end in [(0, n), (0, 1), (1, n)]:
        stage = GgmlStage(model.spec, model.tensors, start, end, threads=1, max_context=context)
        last = end == n
        prompt = _allocated(stage, min(PREFILL_CHUNK, context), context)
        steps = 8 * _allocated(stage, 1, context)  # the decode graphs a stage keeps
        planned = compute_bytes(model.spec, context, last)
        assert prompt + steps <= planned, (arch, context, start, end, prompt, steps, planned)
        stage.close()


def test_plan_arithmetic(tiny) -> None:
    spec = tiny["qwen2"].spec
    assert context_for(spec, None) == min(spec.context_length, DEFAULT_CONTEXT)
    assert context_for(spec, 100) == 100
    assert context_for(spec, 10**9) == spec.context_length  # never past the model's
    m = stage_memory(spec, 1000, blocks=3, last=False, context=64, sequences=4)
    assert m.kv == kv_bytes_per_position(spec) * 3 * 64 * 4
    assert m.total == 1000 + m.kv + compute_bytes(spec, 64, False)
    assert m.to_json() == {"weights": 1000, "kv": m.kv, "compute": m.compute}


def test_kv_budget_refuses_growth_past_it(tiny) -> None:
    """Two sequences of 256 positions fit the budget; a third is refused (nothing changed),
    and one that would grow past the budget is refused too, keeping what it had."""
    model = tiny["llama"]
    spec, n = model.spec, model.spec.n_blocks
    per_seq = kv_bytes_per_position(spec) * n * 256  # a cache grows in steps of 256
    stage = GgmlStage(spec, model.tensors, 0, n, threads=1, max_context=1024, kv_bytes=2 * per_seq)
    ids = np.arange(1, 11, dtype=np.int32)
    stage.forward("a", ids)
    stage.forward("b", ids)
    assert stage.kv_nbytes == 2 * per_seq
    with pytest.raises(SequenceLimitError, match="KV cache budget"):
        stage.forward("c", ids)
    assert stage.sequences() == ["a", "b"]
    with pytest.raises(SequenceLimitError, match="KV cache budget"):
        stage.forward("a", np.ones(300, np.int32))  # past 256 positions: a bigger cache
    assert stage.position("a") == 10 and stage.kv_nbytes == 2 * per_seq
    out = stage.forward_batch([("a", ids[:1]), ("c", ids[:1])])
    assert out[0].shape == (spec.vocab_size,) and isinstance(out[1], SequenceLimitError)
    stage.free("b")
    stage.forward("c", ids)  # room again
    stage.close()
