"""A transformer block in MLX, written once for every architecture: attention (optional q/k/v
biases, per-head q/k norms, sliding windows), a gated MLP, RMS norms (optionally after attention
and MLP too), all chosen by ModelSpec flags; and the Loader that checks a stage's tensors and
keeps account of what it holds. Weights are quant.Weight of any kind: nothing here knows how a
tensor is quantized. A new architecture is a spec (spec.py) and, if it needs one, a flag here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from .kv_cache import KVCache
from .linear import Linear
from .quant import TensorData, Weight, join, load_tensor, nbytes
from .spec import ModelSpec, UnsupportedModelError


def attention_mask(T: int, offset: int, S: int, window: int) -> mx.array | str | None:
    """Which of S cached positions each of T new ones (from ``offset``) may attend to.

    None: all; "causal": the usual triangle (MLX aligns it to the last query); else a boolean
    (T, S) array, for a sliding window (llama.cpp: key p0 is hidden from query p1 when
    p1 - p0 >= window).
    """
    if not window or offset + T <= window:
        return "causal" if T > 1 else None
    qpos = mx.arange(offset, offset + T)[:, None]
    kpos = mx.arange(S)[None]
    return (kpos <= qpos) & (qpos - kpos < window)


class Attention:
    def __init__(
        self,
        spec: ModelSpec,
        w: Loader,
        prefix: str,
        rope_freqs: mx.array | None,
        layer: int = 0,
    ) -> None:
        self.spec = spec
        self.rope_base, self.rope_scale = spec.layer_rope(layer)
        self.window = spec.sliding_window if spec.is_sliding(layer) else 0
        nh, nkv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
        qkv = [f"{prefix}attn_{x}" for x in "qkv"]
        self.qkv = w.linear(qkv, d, [nh * hd, nkv * hd, nkv * hd], bias=spec.attn_bias)
        self.o_proj = w.linear([f"{prefix}attn_output"], nh * hd, [d])
        self.q_norm = self.k_norm = None
        if spec.qk_norm:
            self.q_norm = w.dense(f"{prefix}attn_q_norm.weight", (hd,))
            self.k_norm = w.dense(f"{prefix}attn_k_norm.weight", (hd,))
        self.rope_freqs = rope_freqs
        self.splits = [nh * hd, (nh + nkv) * hd]

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        s = self.spec
        return mx.fast.rope(
            x,
            s.rope_dim,
            traditional=s.rope_traditional,
            base=None if self.rope_freqs is not None else self.rope_base,
            scale=self.rope_scale,
            offset=offset,
            freqs=self.rope_freqs,
        )

    def __call__(self, x: mx.array, cache: KVCache, layer: int) -> mx.array:
        s = self.spec
        _, T, _ = x.shape
        q, k, v = mx.split(self.qkv(x), self.splits, axis=-1)
        q = q.reshape(1, T, s.n_heads, s.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(1, T, s.n_kv_heads, s.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(1, T, s.n_kv_heads, s.head_dim).transpose(0, 2, 1, 3)
        if self.q_norm is not None:
            q = mx.fast.rms_norm(q, self.q_norm, s.rms_eps)
            k = mx.fast.rms_norm(k, self.k_norm, s.rms_eps)
        q = self._rope(q, cache.offset)
        k = self._rope(k, cache.offset)
        keys, values = cache.update(layer, k, v)
        if keys.dtype != q.dtype:
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        mask = None
        if self.window and T == 1 and keys.shape[2] > self.window:
            keys, values = keys[..., -self.window :, :], values[..., -self.window :, :]
        else:
            mask = attention_mask(T, cache.offset, keys.shape[2], self.window)
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=s.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(1, T, s.n_heads * s.head_dim))


class MLP:
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU for llama."""

    def __init__(self, spec: ModelSpec, w: Loader, prefix: str) -> None:
        d, f = spec.d_model, spec.d_ff
        self.gate_up = w.linear([f"{prefix}ffn_gate", f"{prefix}ffn_up"], d, [f, f])
        self.down = w.linear([f"{prefix}ffn_down"], f, [d])
        self.d_ff = f
        if spec.activation == "silu":
            self.act = nn.silu
        elif spec.activation == "gelu":
            self.act = nn.gelu_approx  # gemma's gelu_pytorch_tanh, as llama.cpp's ggml_gelu
        else:
            raise UnsupportedModelError(f"activation {spec.activation!r} is not supported")

    def __call__(self, x: mx.array) -> mx.array:
        g, u = mx.split(self.gate_up(x), [self.d_ff], axis=-1)
        return self.down(self.act(g) * u)


class Block:
    def __init__(self, spec: ModelSpec, w: Loader, index: int, rope_freqs: mx.array | None) -> None:
        p = f"blk.{index}."
        d = spec.d_model
        self.eps = spec.rms_eps
        self.norm = mx.fast.rms_norm
        self.attn_norm = w.dense(f"{p}attn_norm.weight", (d,))
        self.attn = Attention(spec, w, p, rope_freqs, index)
        self.ffn_norm = w.dense(f"{p}ffn_norm.weight", (d,))
        self.mlp = MLP(spec, w, p)
        self.post_attn_norm = self.post_ffn_norm = None
        if spec.post_norms:
            self.post_attn_norm = w.dense(f"{p}post_attention_norm.weight", (d,))
            self.post_ffn_norm = w.dense(f"{p}post_ffw_norm.weight", (d,))

    def __call__(self, x: mx.array, cache: KVCache, layer: int) -> mx.array:
        a = self.attn(self.norm(x, self.attn_norm, self.eps), cache, layer)
        if self.post_attn_norm is not None:
            a = self.norm(a, self.post_attn_norm, self.eps)
        h = x + a
        m = self.mlp(self.norm(h, self.ffn_norm, self.eps))
        if self.post_ffn_norm is not None:
            m = self.norm(m, self.post_ffn_norm, self.eps)
        return h + m


class Loader:
    """Loads a stage's tensors after checking they exist with the shape the spec implies, and
    keeps account of what the stage will hold (``held``, ``nbytes``)."""

    def __init__(
        self, tensors: Mapping[str, TensorData], dtype: mx.Dtype, scale_dtype: mx.Dtype
    ) -> None:
        self.tensors = tensors
        self.dtype = dtype  # of norms and biases: the compute dtype
        self.scale_dtype = scale_dtype  # of quantization constants (see quant.py)
        self.held: list[Weight | mx.array] = []
        self._weights: dict[str, Weight] = {}

    def _get(self, name: str, shape: tuple[int, ...]) -> TensorData:
        t = self.tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise UnsupportedModelError(
                f"tensor {name} has shape {tuple(t.shape)}, the model spec implies {shape}"
            )
        return t

    def _load(self, name: str, shape: tuple[int, ...]) -> Weight:
        return load_tensor(self._get(name, shape), scale_dtype=self.scale_dtype)

    def _vector(self, name: str, n: int) -> mx.array:
        return self._load(name, (n,)).dequantize().astype(self.dtype)

    def weight(self, name: str, shape: tuple[int, ...]) -> Weight:
        """A matrix by name, loaded once however often it is asked for (a tied head)."""
        if name not in self._weights:
            self._weights[name] = self._load(name, shape)
            self.held.append(self._weights[name])
        return self._weights[name]

    def linear(
        self, names: Sequence[str], d_in: int, d_out: Sequence[int], bias: bool = False
    ) -> Linear:
        """The projections ``{name}.weight`` (``{name}.bias`` with ``bias``) side by side:
        one matmul where their weights can be joined (see quant.join)."""
        pairs = list(zip(names, d_out, strict=True))
        weight = join([self._load(f"{n}.weight", (d_in, o)) for n, o in pairs])
        b = mx.concatenate([self._vector(f"{n}.bias", o) for n, o in pairs]) if bias else None
        self.held += [weight] if b is None else [weight, b]
        return Linear(weight, b)

    def dense(self, name: str, shape: tuple[int, ...]) -> mx.array:
        """A norm or other vector, in the compute dtype."""
        (n,) = shape
        a = self._vector(name, n)
        self.held.append(a)
        return a

    @property
    def nbytes(self) -> int:
        return nbytes(self.held)

    def arrays(self) -> list[mx.array]:
        return [a for w in self.held for a in ([w] if isinstance(w, mx.array) else w.arrays())]
