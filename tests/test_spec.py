"""ModelSpec.from_metadata: the llama family, and clear refusals of everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.spec import BLOCK_TENSORS, ModelSpec, UnsupportedModelError


def llama_metadata(**overrides: object) -> dict[str, object]:
    md: dict[str, object] = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 100,
    }
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    return md


def llama_tensor_names(n_blocks: int = 2, tied: bool = True) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    names += [f"blk.{b}.{n}" for b in range(n_blocks) for n in BLOCK_TENSORS]
    if not tied:
        names.append("output.weight")
    return names


def test_llama_defaults() -> None:
    spec = ModelSpec.from_metadata(llama_metadata(), llama_tensor_names())
    assert (spec.arch, spec.n_blocks, spec.d_model, spec.d_ff) == ("llama", 2, 64, 96)
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.rope_dim == 16  # defaults to the head dimension
    assert spec.vocab_size == 100 and spec.context_length == 128
    assert spec.tied_embedding
    assert spec.rope_traditional  # llama.cpp rope mode NORM
    assert spec.scale == pytest.approx(16**-0.5)
    assert not (spec.attn_bias or spec.qk_norm or spec.post_norms)
    assert spec.head_tensor_names() == ["output_norm.weight", "token_embd.weight"]
    assert "blk.1.ffn_down.weight" in spec.block_tensor_names(1)


def test_untied_and_mistral() -> None:
    spec = ModelSpec.from_metadata(llama_metadata(), llama_tensor_names(tied=False))
    assert not spec.tied_embedding
    assert spec.head_tensor_names()[1] == "output.weight"
    md = {k.replace("llama.", "mistral."): v for k, v in llama_metadata().items()}
    md["general.architecture"] = "mistral"
    assert ModelSpec.from_metadata(md).arch == "mistral"


def test_optional_keys() -> None:
    md = llama_metadata(
        llama__attention__head_count_kv=None,
        llama__rope__freq_base=None,
        llama__vocab_size=None,
        tokenizer__ggml__tokens=["a", "b", "c"],
    )
    spec = ModelSpec.from_metadata(md)
    assert spec.n_kv_heads == spec.n_heads == 4
    assert spec.rope_base == 10000.0
    assert spec.vocab_size == 3


def test_per_layer_lists() -> None:
    spec = ModelSpec.from_metadata(llama_metadata(llama__attention__head_count_kv=[2, 2]))
    assert spec.n_kv_heads == 2
    with pytest.raises(UnsupportedModelError, match="differs between layers"):
        ModelSpec.from_metadata(llama_metadata(llama__attention__head_count_kv=[2, 1]))
    with pytest.raises(ValueError, match="entries for 2 blocks"):
        ModelSpec.from_metadata(llama_metadata(llama__feed_forward_length=[96]))


def test_explicit_head_dim_and_partial_rope() -> None:
    md = llama_metadata(llama__attention__key_length=32, llama__rope__dimension_count=8)
    spec = ModelSpec.from_metadata(md)
    assert spec.head_dim == 32 and spec.rope_dim == 8


def test_rope_scaling() -> None:
    md = llama_metadata(llama__rope__scaling__type="linear", llama__rope__scaling__factor=4.0)
    assert ModelSpec.from_metadata(md).rope_scale == 0.25
    md = llama_metadata(llama__rope__scale_linear=2.0)
    assert ModelSpec.from_metadata(md).rope_scale == 0.5
    md = llama_metadata(llama__rope__scaling__type="yarn", llama__rope__scaling__factor=4.0)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelSpec.from_metadata(md)


def test_rope_freqs_tensor_sets_flag() -> None:
    names = llama_tensor_names() + ["rope_freqs.weight"]
    assert ModelSpec.from_metadata(llama_metadata(), names).rope_freq_factors


@pytest.mark.parametrize("arch", ["gpt2", "qwen3moe", "mamba"])
def test_unknown_architecture_is_named(arch: str) -> None:
    with pytest.raises(UnsupportedModelError, match=arch):
        ModelSpec.from_metadata(llama_metadata(general__architecture=arch))


def test_missing_architecture() -> None:
    with pytest.raises(UnsupportedModelError, match="general.architecture"):
        ModelSpec.from_metadata(llama_metadata(general__architecture=None))


def test_mixture_of_experts_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        ModelSpec.from_metadata(llama_metadata(llama__expert_count=8))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"llama__block_count": 0}, "llama.block_count must be >= 1"),
        ({"llama__block_count": None}, "llama.block_count is required"),
        ({"llama__embedding_length": -64}, "llama.embedding_length must be >= 1"),
        ({"llama__embedding_length": 64.0}, "must be an integer"),
        ({"llama__embedding_length": True}, "must be an integer"),
        ({"llama__embedding_length": "64"}, "must be an integer"),
        ({"llama__embedding_length": 1 << 40}, "implausibly large"),
        ({"llama__attention__head_count": 0}, "head_count must be >= 1"),
        ({"llama__attention__head_count_kv": 3}, "must be a multiple of"),
        ({"llama__attention__head_count_kv": 8}, "must be a multiple of"),
        ({"llama__attention__head_count": 6, "llama__attention__head_count_kv": 6}, "divisible"),
        ({"llama__feed_forward_length": 0}, "feed_forward_length must be >= 1"),
        ({"llama__context_length": 0}, "context_length must be >= 1"),
        ({"llama__attention__layer_norm_rms_epsilon": 0.0}, "positive"),
        ({"llama__attention__layer_norm_rms_epsilon": float("nan")}, "positive"),
        ({"llama__attention__layer_norm_rms_epsilon": None}, "is required"),
        ({"llama__rope__freq_base": -1.0}, "freq_base must be a finite positive"),
        ({"llama__rope__freq_base": "big"}, "must be a number"),
        ({"llama__rope__dimension_count": 7}, "must be even"),
        ({"llama__rope__dimension_count": 32}, "<= head dim"),
        ({"llama__vocab_size": None}, "no llama.vocab_size"),
        ({"llama__rope__scaling__type": "linear", "llama__rope__scaling__factor": 0.0}, "factor"),
        ({"llama__rope__scaling__type": 3}, "must be a string"),
    ],
)
def test_bad_hyper_parameters(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_metadata(llama_metadata(**override))


def test_key_and_value_length_must_agree() -> None:
    md = llama_metadata(llama__attention__key_length=16, llama__attention__value_length=32)
    with pytest.raises(UnsupportedModelError, match="value length"):
        ModelSpec.from_metadata(md)


def test_missing_tensors_named() -> None:
    names = [n for n in llama_tensor_names() if n != "blk.1.ffn_up.weight"]
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_up\.weight"):
        ModelSpec.from_metadata(llama_metadata(), names)
    with pytest.raises(ValueError, match="more than"):
        ModelSpec.from_metadata(llama_metadata(), llama_tensor_names(3))


def test_tiny_gguf_file(tmp_path: Path) -> None:
    from support.tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf", n_blocks=3, tied=False)
    with open_gguf(path) as f:
        spec = ModelSpec.from_metadata(f.metadata, f.tensors)
    assert spec.n_blocks == 3 and not spec.tied_embedding
    assert spec.vocab_size == 288  # tiny vocabulary padded to a multiple of 32


@pytest.mark.model
def test_smollm2_spec(smollm2_path: Path) -> None:
    with open_gguf(smollm2_path) as f:
        spec = ModelSpec.from_metadata(f.metadata, f.tensors)
    assert spec.arch == "llama"
    assert (spec.n_blocks, spec.d_model, spec.n_heads, spec.n_kv_heads) == (30, 576, 9, 3)
    assert (spec.head_dim, spec.d_ff, spec.vocab_size) == (64, 1536, 49152)
    assert spec.rope_base == 100000.0 and spec.rms_eps == pytest.approx(1e-5)
    assert spec.tied_embedding


# ---- qwen2 and gemma3 -------------------------------------------------------------------------
def arch_metadata(arch: str, **overrides: object) -> dict[str, object]:
    md = {k.replace("llama.", f"{arch}."): v for k, v in llama_metadata().items()}
    md["general.architecture"] = arch
    if arch == "gemma3":
        md["gemma3.attention.sliding_window"] = 512
    for key, value in overrides.items():
        if value is None:
            md.pop(key.replace("__", "."), None)
        else:
            md[key.replace("__", ".")] = value
    return md


def test_qwen2_flags_and_required_biases() -> None:
    names = llama_tensor_names(tied=False)
    biases = [f"blk.{b}.attn_{p}.bias" for b in range(2) for p in "qkv"]
    spec = ModelSpec.from_metadata(arch_metadata("qwen2"), names + biases)
    assert spec.attn_bias and not spec.rope_traditional and not spec.tied_embedding
    assert "blk.1.attn_v.bias" in spec.block_tensor_names(1)
    assert spec.sliding_window == 0 and spec.boundary_scale == 1.0
    without = [n for n in names + biases if n != "blk.1.attn_k.bias"]
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.attn_k\.bias"):
        ModelSpec.from_metadata(arch_metadata("qwen2"), without)


def test_gemma3_flags_from_metadata() -> None:
    extra = [
        f"blk.{b}.{n}.weight"
        for b in range(2)
        for n in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")
    ]
    md = arch_metadata(
        "gemma3", gemma3__attention__key_length=32, gemma3__attention__value_length=32
    )
    spec = ModelSpec.from_metadata(md, llama_tensor_names() + extra)
    assert (spec.qk_norm, spec.post_norms, spec.activation) == (True, True, "gelu")
    assert spec.head_dim == 32 and spec.scale == pytest.approx(32**-0.5)
    assert spec.embed_scale == pytest.approx(8.0) and spec.final_softcap is None
    assert spec.sliding_window == 512 and spec.swa_pattern == 6 and spec.boundary_scale < 1
    assert [spec.is_sliding(i) for i in range(12)] == ([True] * 5 + [False]) * 2
    assert spec.layer_rope(0) == (10000.0, 1.0) and spec.layer_rope(5) == (10000.0, 1.0)
    md = arch_metadata(
        "gemma3",
        gemma3__rope__freq_base=1e6,
        gemma3__rope__scaling__type="linear",
        gemma3__rope__scaling__factor=8.0,
        gemma3__final_logit_softcapping=30.0,
    )
    spec = ModelSpec.from_metadata(md)
    # global layers take the file's base and scaling, sliding ones 10000 and none
    assert spec.layer_rope(5) == (1e6, 0.125) and spec.layer_rope(4) == (10000.0, 1.0)
    assert spec.final_softcap == 30.0
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q_norm\.weight"):
        ModelSpec.from_metadata(arch_metadata("gemma3"), llama_tensor_names())
    with pytest.raises(ValueError, match="gemma3.attention.sliding_window is required"):
        ModelSpec.from_metadata(arch_metadata("gemma3", gemma3__attention__sliding_window=None))


@pytest.mark.large_model
def test_real_qwen2_and_gemma3_specs(qwen2_path: Path, gemma3_path: Path) -> None:
    with open_gguf(qwen2_path) as f:
        spec = ModelSpec.from_metadata(f.metadata, f.tensors)
    assert (spec.arch, spec.n_blocks, spec.d_model, spec.n_heads, spec.n_kv_heads) == (
        "qwen2",
        24,
        896,
        14,
        2,
    )
    assert spec.attn_bias and not spec.tied_embedding and spec.vocab_size == 151936
    with open_gguf(gemma3_path) as f:
        spec = ModelSpec.from_metadata(f.metadata, f.tensors)
    assert (spec.arch, spec.n_blocks, spec.d_model, spec.head_dim, spec.n_kv_heads) == (
        "gemma3",
        18,
        640,
        256,
        1,
    )
    assert spec.tied_embedding and spec.sliding_window == 512 and spec.rope_base == 1e6
