"""The shape of a model, read from GGUF metadata alone (no config.json, no hub).

One dataclass describes every decoder-only family the engine runs. Families differ by flags
(attention biases, q/k norms, activation, ...) rather than by separate model classes, so adding
an architecture means adding a row to ``_ARCH_FLAGS`` plus whatever metadata it needs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class UnsupportedModelError(ValueError):
    """The file is well formed but describes a model this engine cannot run."""


class ModelCheckError(ValueError):
    """The metadata contradicts the tensors, or a value is out of any sensible range.

    The message names the key and both values (see backend/model_check.py)."""


# Bounds on counts the metadata states, before anything is sized from them: MAX_BLOCKS (also
# the manifest's limit on its shard list); 2^24 positions is above any released model's
# context (the largest, 10M tokens, is under 2^24) and keeps a hostile value from sizing caches.
MAX_BLOCKS = 4096
MAX_CONTEXT_LENGTH = 1 << 24

_BLOCK_NAME_RE = re.compile(r"blk\.(\d+)\.")


# Per-architecture defaults. GGUF llama/mistral q/k weights are permuted by the converter so
# llama.cpp applies RoPE to adjacent pairs (rope mode NORM), which MLX calls "traditional";
# qwen2 and gemma3 keep the checkpoint's layout, rotated as halves (rope mode NEOX).
_ARCH_FLAGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"rope_traditional": False, "attn_bias": True},
    # gemma3's GGUF norm weights already include gemma's "+1", so they are plain RMS norms
    "gemma3": {
        "rope_traditional": False,
        "qk_norm": True,
        "post_norms": True,
        "activation": "gelu",
    },
}

SUPPORTED_ARCHITECTURES = tuple(_ARCH_FLAGS)

# Tensors every block of the llama family has (GGUF names, without the "blk.N." prefix).
BLOCK_TENSORS = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    n_blocks: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    tied_embedding: bool
    # --- family flags (llama defaults); the engine reads these instead of branching on arch ---
    rope_traditional: bool = True  # llama.cpp rope mode NORM (adjacent pairs); False = NEOX
    rope_scale: float = 1.0  # linear position scaling (1 / rope.scaling.factor)
    rope_freq_factors: bool = False  # a rope_freqs.weight tensor divides the frequencies
    attn_bias: bool = False  # q/k/v projections have biases (qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k (gemma3)
    post_norms: bool = False  # extra RMSNorm after attention and after the MLP (gemma2/3)
    activation: str = "silu"  # gated MLP activation: "silu" (SwiGLU) or "gelu" (GeGLU, tanh)
    embed_scale: float | None = None  # multiply embeddings (gemma: sqrt(d_model))
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    # sliding-window attention (gemma3): a query sees the keys of the last ``sliding_window``
    # positions (itself included) on sliding layers; every ``swa_pattern``-th layer is global
    sliding_window: int = 0  # 0: no layer slides
    swa_pattern: int = 0  # 0: all layers slide (when sliding_window > 0)
    rope_base_swa: float | None = None  # rope base of sliding layers (their scale is 1)
    final_softcap: float | None = None  # logits = c * tanh(logits / c)
    # Hidden states cross a stage boundary as float16 of h * boundary_scale (a power of two,
    # so exact both ways). gemma's residual stream reaches ~1e5 (attention-sink positions),
    # past float16's 65504; scaled down it keeps float16's relative precision.
    boundary_scale: float = 1.0

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return self.swa_pattern == 0 or layer % self.swa_pattern < self.swa_pattern - 1

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(base, position scale) of the rope of one layer (llama.cpp's per-layer rope)."""
        if self.is_sliding(layer) and self.rope_base_swa is not None:
            return self.rope_base_swa, 1.0
        return self.rope_base, self.rope_scale

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def block_tensor_names(self, block: int) -> list[str]:
        names = [f"blk.{block}.{n}" for n in BLOCK_TENSORS]
        if self.attn_bias:
            names += [f"blk.{block}.attn_{p}.bias" for p in "qkv"]
        if self.qk_norm:
            names += [f"blk.{block}.attn_q_norm.weight", f"blk.{block}.attn_k_norm.weight"]
        if self.post_norms:
            names += [
                f"blk.{block}.post_attention_norm.weight",
                f"blk.{block}.post_ffw_norm.weight",
            ]
        return names

    def head_tensor_names(self) -> list[str]:
        return [
            "output_norm.weight",
            "token_embd.weight" if self.tied_embedding else "output.weight",
        ]

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], tensor_names: Iterable[str] = ()
    ) -> ModelSpec:
        """Build and validate a spec; ``tensor_names`` (if given) are checked for completeness.

        Raises UnsupportedModelError for a model this engine cannot run (unknown architecture,
        mixture of experts, unsupported rope scaling, missing tensors) and ValueError subclasses
        with the offending key for nonsensical hyper-parameters. ``block_count`` is checked
        against the ``blk.N`` tensors (ModelCheckError) before anything loops over blocks, and is
        at most MAX_BLOCKS; shapes, vocabulary and chat template are model_check.check_model's.
        """
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise UnsupportedModelError("metadata has no general.architecture string")
        if arch not in _ARCH_FLAGS:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        m = _Meta(metadata, arch)
        names = set(tensor_names)

        expert_count = m.get_int("expert_count", default=0, minimum=0)
        if expert_count > 0 or any(".ffn_gate_exps." in n for n in names):
            raise UnsupportedModelError(
                f"{arch} mixture-of-experts models ({expert_count} experts) are not supported"
            )

        n_blocks = m.get_int("block_count")
        if names:  # before anything loops over the blocks: the count must match the tensors
            _check_block_count(arch, n_blocks, names)
        if n_blocks > MAX_BLOCKS:  # and without tensors, a bound on what may be sized from it
            raise ModelCheckError(
                f"{arch}.block_count is {n_blocks}, more than the {MAX_BLOCKS} blocks supported"
            )
        d_model = m.get_int("embedding_length")
        n_heads = m.get_int("attention.head_count", per_layer=n_blocks)
        n_kv_heads = m.get_int("attention.head_count_kv", default=n_heads, per_layer=n_blocks)
        if n_kv_heads > n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"{arch}.attention.head_count ({n_heads}) must be a multiple of "
                f"{arch}.attention.head_count_kv ({n_kv_heads})"
            )
        if "attention.key_length" not in m and d_model % n_heads:
            raise ValueError(
                f"{arch}.embedding_length ({d_model}) is not divisible by "
                f"{arch}.attention.head_count ({n_heads})"
            )
        head_dim = m.get_int("attention.key_length", default=d_model // n_heads)
        v_dim = m.get_int("attention.value_length", default=head_dim)
        if v_dim != head_dim:
            raise UnsupportedModelError(
                f"{arch}: key length {head_dim} != value length {v_dim} is not supported"
            )
        rope_dim = m.get_int("rope.dimension_count", default=head_dim)
        if rope_dim > head_dim or rope_dim % 2:
            raise ValueError(
                f"{arch}.rope.dimension_count ({rope_dim}) must be even and <= head dim {head_dim}"
            )
        d_ff = m.get_int("feed_forward_length", per_layer=n_blocks)
        context_length = m.get_int("context_length")
        if context_length > MAX_CONTEXT_LENGTH:
            raise ModelCheckError(
                f"{arch}.context_length is {context_length}, more than the "
                f"{MAX_CONTEXT_LENGTH} (2^24) positions supported"
            )
        rms_eps = m.get_float("attention.layer_norm_rms_epsilon")
        rope_base = m.get_float("rope.freq_base", default=10000.0)

        vocab_size = m.get_int("vocab_size", default=0, minimum=0)
        if vocab_size == 0:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if not isinstance(tokens, list) or not tokens:
                raise ValueError(f"no {arch}.vocab_size and no tokenizer.ggml.tokens list")
            vocab_size = len(tokens)

        rope_scale = _rope_scale(m, arch)

        flags = dict(_ARCH_FLAGS[arch])
        if "rope_freqs.weight" in names:
            flags["rope_freq_factors"] = True
        if names and "blk.0.attn_q.bias" in names:
            flags["attn_bias"] = True  # some llama-family fine-tunes carry q/k/v biases
        if arch == "gemma3":
            flags.update(_gemma3_flags(m, d_model, n_heads, n_blocks))
        spec = cls(
            arch=arch,
            n_blocks=n_blocks,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            vocab_size=vocab_size,
            context_length=context_length,
            rms_eps=rms_eps,
            rope_base=rope_base,
            rope_dim=rope_dim,
            # without a tensor list we cannot tell; the stage checks again when it loads
            tied_embedding=bool(names) and "output.weight" not in names,
            rope_scale=rope_scale,
            **flags,
        )
        if names:
            missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in names]
            for b in range(n_blocks):
                missing += [n for n in spec.block_tensor_names(b) if n not in names]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise UnsupportedModelError(
                    f"{arch} model is missing tensors: {', '.join(missing[:5])}{more}"
                )
        return spec


def _check_block_count(arch: str, n_blocks: int, names: set[str]) -> None:
    """``{arch}.block_count`` against the ``blk.N`` tensors present: cost bounded by the names."""
    present = {int(m.group(1)) for n in names if (m := _BLOCK_NAME_RE.match(n))}
    if not present:
        raise ModelCheckError(f"{arch}.block_count is {n_blocks} but the file has no blk.N tensors")
    last = max(present)
    if last + 1 == n_blocks:
        return  # blocks missing in between are named by the tensor check
    if len(present) == last + 1:
        found = f"blocks 0..{last}"
    else:
        shown = sorted(present)
        found = f"blocks {', '.join(map(str, shown[:8]))}{', ...' if len(shown) > 8 else ''}"
    more = f" (more than {n_blocks} blocks)" if last >= n_blocks else ""
    raise ModelCheckError(
        f"{arch}.block_count is {n_blocks} but the file has tensors for {found}{more}"
    )


def _gemma3_flags(m: _Meta, d_model: int, n_heads: int, n_blocks: int) -> dict[str, Any]:
    """gemma3's settings that GGUF leaves to the loader, as llama.cpp sets them.

    Five sliding-window layers to one global layer; sliding layers use rope base 10000
    (unless the file says otherwise) and no rope scaling; embeddings scaled by sqrt(d_model).
    The 27B model (62 blocks) scales queries by 1/sqrt(d_model / n_heads) instead of
    1/sqrt(head_dim): its query_pre_attn_scalar is not in GGUF, so llama.cpp keys it on size.
    """
    flags: dict[str, Any] = {
        "sliding_window": m.get_int("attention.sliding_window"),
        "swa_pattern": 6,
        "rope_base_swa": m.get_float("rope.freq_base_swa", default=10000.0),
        "embed_scale": math.sqrt(d_model),
        "boundary_scale": 2.0**-5,  # gemma-3-270m peaks at ~1.04e5: 3.2e3 on the wire
    }
    if n_blocks == 62:
        flags["attn_scale"] = (d_model // n_heads) ** -0.5
    if "final_logit_softcapping" in m:
        flags["final_softcap"] = m.get_float("final_logit_softcapping")
    return flags


def _rope_scale(m: _Meta, arch: str) -> float:
    """Linear RoPE scaling as a position multiplier; other scaling schemes are refused."""
    kind = m.get_str("rope.scaling.type", default="none")
    if kind == "none":
        factor = m.get_float("rope.scale_linear", default=1.0)
    elif kind == "linear":
        factor = m.get_float("rope.scaling.factor", default=1.0)
    else:
        raise UnsupportedModelError(f"{arch}: rope scaling type {kind!r} is not supported")
    return 1.0 / factor


class _Meta:
    """Typed access to ``{arch}.*`` keys with messages that name the key."""

    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self.md = metadata
        self.arch = arch

    def __contains__(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.md

    def _get(self, key: str, default: Any) -> tuple[str, Any]:
        full = f"{self.arch}.{key}"
        if full not in self.md:
            if default is None:
                raise ValueError(f"metadata key {full} is required")
            return full, default
        return full, self.md[full]

    def get_int(
        self, key: str, *, default: int | None = None, minimum: int = 1, per_layer: int = 0
    ) -> int:
        full, v = self._get(key, default)
        if isinstance(v, list) and per_layer:
            # some files give one value per layer; the engine supports uniform layers only
            if len(v) != per_layer or not v:
                raise ValueError(f"{full} has {len(v)} entries for {per_layer} blocks")
            if any(x != v[0] for x in v):
                raise UnsupportedModelError(f"{full} differs between layers: not supported")
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{full} must be an integer, got {v!r}")
        if v < minimum:
            raise ValueError(f"{full} must be >= {minimum}, got {v}")
        if v > 1 << 31:
            raise ValueError(f"{full} is implausibly large: {v}")
        return v

    def get_float(self, key: str, *, default: float | None = None) -> float:
        full, v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{full} must be a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{full} must be a finite positive number, got {v}")
        return v

    def get_str(self, key: str, *, default: str) -> str:
        full, v = self._get(key, default)
        if not isinstance(v, str):
            raise ValueError(f"{full} must be a string, got {v!r}")
        return v
