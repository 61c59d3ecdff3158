"""One decode step (and a prompt) through a block in NumPy, for stages on the host BLAS.

On a Linux CPU, once the projections run in NumPy (blas.py), MLX's own share of a decode step
is what is left, and it is large for such small tensors: every evaluation hands work to MLX's
worker thread and waits (~100 us each, 3-4 per block), rope takes ~80 us for 9 heads, a float16
cache update ~95 us, and scaled_dot_product_attention over ~160 positions ~350 us (its matmuls
go to the reference BLAS). In NumPy the whole block, projections aside, is ~0.2 ms; so a
stage on the host BLAS steps single positions here, reading and writing the sequence's KV
cache in place (KVCache(host=True)).

It computes what Block.__call__ does in float32 with ggml_numerics off: the same rope as
mx.fast.rope, RMS norms, float32 scores and softmax over the cached keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# Prompts too: MLX's scaled_dot_product_attention on a Linux CPU runs its matmuls on the
# reference BLAS, ~1/3 of a 128-token prefill; NumPy's batched matmul uses OpenBLAS.
PREFILL = True

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .spec import ModelSpec


@dataclass(frozen=True)
class HostAttention:
    """What one layer's NumPy attention needs besides its projections."""

    inv: np.ndarray  # rotation rate per pair of rotated dims (see inv_freqs)
    rope_scale: float  # position multiplier of this layer's rope
    q_norm: np.ndarray | None = None  # per-head RMS norm weights (gemma3)
    k_norm: np.ndarray | None = None
    window: int = 0  # sliding window of this layer, 0 for full attention


def inv_freqs(spec: ModelSpec, freqs: np.ndarray | None, base: float | None = None) -> np.ndarray:
    """Rotation rate of each pair of rotated dims (mx.fast.rope's; its freqs are periods)."""
    if freqs is not None:
        return 1.0 / freqs.astype(np.float64)
    d = spec.rope_dim
    base = spec.rope_base if base is None else base
    return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def rope(
    x: np.ndarray, offset: int, spec: ModelSpec, inv: np.ndarray, scale: float | None = None
) -> np.ndarray:
    """mx.fast.rope of ``x`` (T, heads, head_dim) at positions offset.., as Attention._rope.

    As ``x * cos + partner(x) * (-+sin)``, where a dim's partner is the other one of its pair:
    adjacent dims (traditional) or the dim half the rotated width away. ``scale``: the
    layer's position scale (default ``spec.rope_scale``).
    """
    d = spec.rope_dim
    scale = spec.rope_scale if scale is None else scale
    pos = np.arange(offset, offset + x.shape[0], dtype=np.float64) * scale
    theta = pos[:, None] * inv  # (T, d/2)
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    r = x[..., :d]
    if spec.rope_traditional:  # pairs (2i, 2i+1)
        cos, sin = np.repeat(c, 2, axis=-1), np.stack([-s, s], -1).reshape(-1, d)
        partner = r.reshape(*r.shape[:-1], d // 2, 2)[..., ::-1].reshape(r.shape)
    else:  # pairs (i, i + d/2)
        cos, sin = np.concatenate([c, c], -1), np.concatenate([-s, s], -1)
        partner = np.concatenate([r[..., d // 2 :], r[..., : d // 2]], axis=-1)
    rotated = r * cos[:, None] + partner * sin[:, None]
    if d == x.shape[-1]:
        return rotated
    return np.concatenate([rotated, x[..., d:]], axis=-1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def attend(
    qkv: np.ndarray, cache: KVCache, layer: int, spec: ModelSpec, h: HostAttention
) -> np.ndarray:
    """Causal attention output (T, n_heads * head_dim) of T new positions from their fused qkv.

    Stores their keys and values in ``cache`` (not committed: Stage.forward does that).
    """
    q_norm, k_norm = h.q_norm, h.k_norm
    nh, nkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    T, g = qkv.shape[0], nh // nkv
    qk = qkv[:, : (nh + nkv) * hd].reshape(T, nh + nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].reshape(T, nkv, hd)
    if q_norm is not None and k_norm is not None:
        q_, k_ = (
            rms_norm(qk[:, :nh], q_norm, spec.rms_eps),
            rms_norm(qk[:, nh:], k_norm, spec.rms_eps),
        )
        qk = np.concatenate([q_, k_], axis=1)
    offset = cache.offset
    qk = rope(qk, offset, spec, h.inv, h.rope_scale)  # q and k heads together
    q, k = qk[:, :nh], qk[:, nh:]
    keys, values = cache.update_host(layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    start = 0
    if h.window and T == 1 and keys.shape[1] > h.window:
        start = keys.shape[1] - h.window  # a sliding layer's decode step sees only the window
        keys, values = keys[:, start:], values[:, start:]
    # query head h reads kv head h // g; rows of a group are (head in group, position)
    qg = q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T, hd)
    scores = (qg * np.float32(spec.scale)) @ keys.transpose(0, 2, 1)  # (nkv, g*T, S)
    if T > 1:
        kpos = np.arange(start, start + keys.shape[1])[None]
        qpos = (offset + np.arange(T))[:, None]
        hidden = kpos > qpos  # (T, S)
        if h.window:
            hidden |= qpos - kpos >= h.window
        scores[:, np.tile(hidden, (g, 1))] = -np.inf
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    o = (p @ values).reshape(nkv, g, T, hd)  # (nkv, g*T, hd)
    return o.transpose(2, 0, 1, 3).reshape(T, nh * hd)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def gelu_approx(x: np.ndarray) -> np.ndarray:
    """mlx.nn.gelu_approx (tanh approximation)."""
    c = np.float32(np.sqrt(2 / np.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x**3)))


ACTIVATIONS = {"silu": silu, "gelu": gelu_approx}
