"""The layers of a transformer block (attention, gated MLP, norms) and the loader that checks
their tensors, for MLX and, on a Linux CPU host, for NumPy single steps (host_step.py).

See engine.py for the two numerics (float32 as written, or llama.cpp's CPU roundings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import host_step, kquants
from .ggml_types import GGMLType
from .kv_cache import KVCache
from .linear import Linear
from .quant import VEC_DOT_TYPE, QuantizedWeight, TensorData, Weight, load_tensor
from .spec import ModelSpec, UnsupportedModelError


def rms_norm_ggml(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMS norm rounded as ggml's CPU code rounds it (bit for bit in float32).

    ggml sums the float32 squares in double, takes ``scale = 1/sqrtf(mean + eps)`` in float,
    multiplies by it and then, as a separate op, by the weight. mx.fast.rms_norm differs in the
    last bit for about half the elements, which is enough to flip a few roundings of the 8-bit
    activation quantization that follows (see quant.round_activations).
    """
    ss = (x * x).astype(mx.float64).sum(axis=-1, keepdims=True)
    mean = (ss / x.shape[-1]).astype(x.dtype)
    return (x * (1.0 / mx.sqrt(mean + eps))) * weight


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
        self.ggml_numerics = w.ggml_numerics
        self.rope_base, self.rope_scale = spec.layer_rope(layer)
        self.window = spec.sliding_window if spec.is_sliding(layer) else 0
        nh, nkv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_model
        parts = []
        for name, n_out in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            bias = w.dense(f"{prefix}attn_{name}.bias", (n_out,)) if spec.attn_bias else None
            parts.append(w.linear(f"{prefix}attn_{name}.weight", (d, n_out), bias))
        self.qkv = Linear.fused(parts)
        self.q_proj, self.k_proj, self.v_proj = parts if self.qkv is None else (None,) * 3
        self.o_proj = w.linear(f"{prefix}attn_output.weight", (nh * hd, d))
        self.q_norm = self.k_norm = None
        if spec.qk_norm:
            self.q_norm = w.dense(f"{prefix}attn_q_norm.weight", (hd,))
            self.k_norm = w.dense(f"{prefix}attn_k_norm.weight", (hd,))
        self.rope_freqs = rope_freqs
        self.splits = [nh * hd, (nh + nkv) * hd]
        self.host: host_step.HostAttention | None = None

    def enable_host(self) -> None:
        """Run one-position steps in NumPy (host_step.py) if the projections allow it."""
        if self.qkv is None:
            # q/k/v of different quant types (a Q4_K_M mix) fuse once they are all on the host
            self.qkv = Linear.fused([self.q_proj, self.k_proj, self.v_proj])
            if self.qkv is not None:
                self.q_proj = self.k_proj = self.v_proj = None
        lins = (self.qkv, self.o_proj)
        if self.ggml_numerics or not all(lin is not None and lin.on_host for lin in lins):
            return
        freqs, qn, kn = (
            None if a is None else np.array(a.astype(mx.float32))
            for a in (self.rope_freqs, self.q_norm, self.k_norm)
        )
        inv = host_step.inv_freqs(self.spec, freqs, self.rope_base)
        self.host = host_step.HostAttention(inv, self.rope_scale, qn, kn, self.window)

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

    def _attend_ggml(
        self, q: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None
    ) -> mx.array:
        """Attention rounded as llama.cpp's CPU graph without flash attention rounds it.

        There ``KQ = mul_mat(K, Q)`` with K from the float16 cache converts Q to float16 first
        (products and sums in float32), the scaled, masked softmax is float32, and
        ``KQV = mul_mat(V, KQ)`` converts the probabilities to float16. q: (1, H, T, hd) in the
        compute dtype; keys, values: (1, H_kv, S, hd) as cached.
        """
        _, nh, T, hd = q.shape
        nkv, S = keys.shape[1], keys.shape[2]
        dt = q.dtype
        # query head h reads kv head h // (nh // nkv), as in ggml's broadcasting mul_mat
        q = q.reshape(1, nkv, nh // nkv * T, hd).astype(mx.float16).astype(dt)
        scores = (q @ keys.astype(dt).swapaxes(-1, -2)) * self.spec.scale
        if mask is not None:
            if isinstance(mask, str):  # causal, aligned to the last query
                mask = mx.arange(T)[:, None] + (S - T) >= mx.arange(S)[None]
            # row r of a group is query position r % T
            scores = mx.where(mx.tile(mask, (nh // nkv, 1)), scores, -mx.inf)
        probs = mx.softmax(scores, axis=-1, precise=True)
        o = probs.astype(mx.float16).astype(dt) @ values.astype(dt)
        return o.reshape(1, nh, T, hd)

    def __call__(self, x: mx.array, cache: KVCache, layer: int, mask: str | None) -> mx.array:
        s = self.spec
        _, T, _ = x.shape
        if T == 1 and cache.host and self.host is not None:
            y = self.step_host(np.asarray(x.astype(mx.float32))[0], [cache], layer)
            return mx.array(y[None]).astype(x.dtype)
        if self.qkv is not None:
            q, k, v = mx.split(self.qkv(x), self.splits, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
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
        if self.window and T == 1 and keys.shape[2] > self.window:
            keys, values = keys[..., -self.window :, :], values[..., -self.window :, :]
        else:
            mask = attention_mask(T, cache.offset, keys.shape[2], self.window)
        if self.ggml_numerics:
            o = self._attend_ggml(q, keys, values, mask if T > 1 else None)
        else:
            o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=s.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(1, T, s.n_heads * s.head_dim))

    def step_host(self, x: np.ndarray, caches: Sequence[KVCache], layer: int) -> np.ndarray:
        """Rows (T, d_model) float32 in NumPy (host_step.py): T positions of one sequence if
        one cache is given, else one position of each sequence in ``caches``."""
        assert self.qkv is not None and self.host is not None
        qkv, spec, h = self.qkv.host_apply(x), self.spec, self.host
        if len(caches) == 1:
            o = host_step.attend(qkv, caches[0], layer, spec, h)
        else:
            rows = [
                host_step.attend(qkv[i : i + 1], c, layer, spec, h) for i, c in enumerate(caches)
            ]
            o = np.concatenate(rows)
        return self.o_proj.host_apply(o)


class MLP:
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU for llama."""

    def __init__(self, spec: ModelSpec, w: Loader, prefix: str) -> None:
        d, f = spec.d_model, spec.d_ff
        gate = w.linear(f"{prefix}ffn_gate.weight", (d, f))
        up = w.linear(f"{prefix}ffn_up.weight", (d, f))
        self.gate_up = Linear.fused([gate, up])
        self.gate, self.up = (gate, up) if self.gate_up is None else (None, None)
        self.down = w.linear(f"{prefix}ffn_down.weight", (f, d))
        self.d_ff = f
        self.host_act = host_step.ACTIVATIONS.get(spec.activation)
        if spec.activation == "silu":
            self.act = nn.silu
        elif spec.activation == "gelu":
            self.act = nn.gelu_approx  # gemma's gelu_pytorch_tanh, as llama.cpp's ggml_gelu
        else:
            raise UnsupportedModelError(f"activation {spec.activation!r} is not supported")

    def __call__(self, x: mx.array) -> mx.array:
        if self.gate_up is not None:
            g, u = mx.split(self.gate_up(x), [self.d_ff], axis=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(self.act(g) * u)

    def host_ready(self) -> bool:
        lins = [self.down] + ([self.gate_up] if self.gate_up else [self.gate, self.up])
        return self.host_act is not None and all(lin is not None and lin.on_host for lin in lins)

    def step_host(self, x: np.ndarray) -> np.ndarray:
        assert self.host_act is not None
        if self.gate_up is not None:
            g, u = np.split(self.gate_up.host_apply(x), [self.d_ff], axis=-1)
        else:
            g, u = self.gate.host_apply(x), self.up.host_apply(x)  # type: ignore[union-attr]
        return self.down.host_apply(self.host_act(g) * u)


class Block:
    def __init__(self, spec: ModelSpec, w: Loader, index: int, rope_freqs: mx.array | None) -> None:
        p = f"blk.{index}."
        d = spec.d_model
        self.eps = spec.rms_eps
        self.norm = rms_norm_ggml if w.ggml_numerics else mx.fast.rms_norm
        self.attn_norm = w.dense(f"{p}attn_norm.weight", (d,))
        self.attn = Attention(spec, w, p, rope_freqs, index)
        self.ffn_norm = w.dense(f"{p}ffn_norm.weight", (d,))
        self.mlp = MLP(spec, w, p)
        self.post_attn_norm = self.post_ffn_norm = None
        if spec.post_norms:
            self.post_attn_norm = w.dense(f"{p}post_attention_norm.weight", (d,))
            self.post_ffn_norm = w.dense(f"{p}post_ffw_norm.weight", (d,))

    def enable_host(self) -> bool:
        """Prepare NumPy single-position steps (host_step.py); whether they are possible."""
        self.attn.enable_host()
        if self.attn.host is None or not self.mlp.host_ready():
            return False
        norms = (self.attn_norm, self.ffn_norm, self.post_attn_norm, self.post_ffn_norm)
        self.host_norms = [None if w is None else np.array(w.astype(mx.float32)) for w in norms]
        return True

    def step_host(self, x: np.ndarray, caches: Sequence[KVCache], layer: int) -> np.ndarray:
        """Rows (T, d_model) float32 through the block in NumPy (see Attention.step_host)."""
        an, fn, pan, pfn = self.host_norms
        a = self.attn.step_host(host_step.rms_norm(x, an, self.eps), caches, layer)
        if pan is not None:
            a = host_step.rms_norm(a, pan, self.eps)
        h = x + a
        m = self.mlp.step_host(host_step.rms_norm(h, fn, self.eps))
        if pfn is not None:
            m = host_step.rms_norm(m, pfn, self.eps)
        return h + m

    def __call__(self, x: mx.array, cache: KVCache, layer: int, mask: str | None) -> mx.array:
        a = self.attn(self.norm(x, self.attn_norm, self.eps), cache, layer, mask)
        if self.post_attn_norm is not None:
            a = self.norm(a, self.post_attn_norm, self.eps)
        h = x + a
        m = self.mlp(self.norm(h, self.ffn_norm, self.eps))
        if self.post_ffn_norm is not None:
            m = self.norm(m, self.post_ffn_norm, self.eps)
        return h + m


class Loader:
    """Loads named tensors after checking they exist with the shape the spec implies."""

    def __init__(
        self, tensors: Mapping[str, TensorData], dtype: mx.Dtype, ggml_numerics: bool
    ) -> None:
        self.tensors = tensors
        self.dtype = dtype
        self.ggml_numerics = ggml_numerics

    def _get(self, name: str, shape: tuple[int, ...]) -> TensorData:
        t = self.tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"tensor {name} is missing")
        if tuple(t.shape) != shape:
            raise UnsupportedModelError(
                f"tensor {name} has shape {tuple(t.shape)}, the model spec implies {shape}"
            )
        return t

    def weight(self, name: str, shape: tuple[int, ...]) -> Weight:
        return load_tensor(self._get(name, shape), dtype=self.dtype)

    def act_type(self, name: str) -> GGMLType | None:
        """What ggml rounds the activations to before a matmul with this weight, if emulated."""
        act = VEC_DOT_TYPE.get(GGMLType(self.tensors[name].ggml_type))
        return act if self.ggml_numerics and act != GGMLType.F32 else None

    def linear(self, name: str, shape: tuple[int, ...], bias: mx.array | None = None) -> Linear:
        lin = Linear(self.weight(name, shape), bias, self.act_type(name))
        return self.with_source(lin, name)

    def with_source(self, lin: Linear, name: str) -> Linear:
        """``lin`` knowing its tensor's bytes, if the host could pack what MLX holds as float16."""
        t = self.tensors[name]
        if GGMLType(t.ggml_type) in kquants.FLOAT16_TYPES:
            lin.source = t
        return lin

    def dense(self, name: str, shape: tuple[int, ...]) -> mx.array:
        w = self.weight(name, shape)
        if isinstance(w, QuantizedWeight):
            w = w.dequantize()  # a quantized norm or bias vector is odd but harmless
        return w
