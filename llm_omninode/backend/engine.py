"""A stage: a contiguous slice of transformer blocks executed with MLX.

The first stage also embeds token ids; the last also applies the final norm and the output
projection. Between stages hidden states travel as float16 (T, d_model); inside a stage the
compute dtype is float32 by default.

Two numerics: by default the model is computed as written, in float32 (it agrees with a
float64 forward to ~1e-4). ``ggml_numerics=True`` instead rounds where llama.cpp's CPU
backend rounds: activations quantized to Q8_0/Q8_1 before quantized matmuls (rounded to f16
before f16 ones), ggml's RMS norm, queries and attention probabilities rounded to float16
(flash attention off). Each op then matches llama.cpp to float32 summation order, but that
is not enough to reproduce its logits: a last-bit difference flips a few 8-bit roundings,
and over 30 blocks those grow to the same ~0.13 logit spread that separates the float32
forward from llama.cpp (measured on SmolLM2; a one-ulp nudge of the embeddings moves the
emulated logits as much). So it is off by default; only a bit-exact emulation of ggml's
summation order (and its exp) would track llama.cpp's near-tied greedy choices.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import blas, host_step, kquants
from .blas import HostWeight
from .ggml_types import GGMLType
from .kv_cache import HOST_DTYPES, ContextOverflowError, KVCache, SequenceCaches, SequenceLimitError
from .linear import (
    DENSE_PREFILL_MIN,
    HOST_WEIGHTS,
    HostStack,
    Linear,
    dense_prefill_wins,
)
from .qmatvec import PackedWeight
from .quant import VEC_DOT_TYPE, QuantizedWeight, TensorData, Weight, load_tensor
from .spec import ModelSpec, UnsupportedModelError

__all__ = [
    "DENSE_PREFILL_MIN",
    "ContextOverflowError",
    "Linear",
    "SequenceLimitError",
    "Stage",
    "TensorData",
    "dense_prefill_wins",
]

MAX_SEQ_ID_LEN = 256
# Long prompts are run through the blocks in chunks so attention scores stay bounded
# (T x T per head); the result is the same as one pass, the caller still makes one call.
PREFILL_CHUNK = 512


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
        w: _Loader,
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
        if self.ggml_numerics or not all(
            lin is not None and isinstance(lin.weight, HOST_WEIGHTS) and lin.act is None
            for lin in lins
        ):
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
            y = self.step_host(np.asarray(x.astype(mx.float32))[0], cache, layer)
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

    def step_host(self, x: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """Positions (T, d_model) float32 in NumPy; see host_step.py."""
        assert self.qkv is not None and self.host is not None
        o = host_step.attend(self.qkv.host_apply(x), cache, layer, self.spec, self.host)
        return self.o_proj.host_apply(o)


class MLP:
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU for llama."""

    def __init__(self, spec: ModelSpec, w: _Loader, prefix: str) -> None:
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
        return self.host_act is not None and all(
            lin is not None and isinstance(lin.weight, HOST_WEIGHTS) and lin.act is None
            for lin in lins
        )

    def step_host(self, x: np.ndarray) -> np.ndarray:
        assert self.host_act is not None
        if self.gate_up is not None:
            g, u = np.split(self.gate_up.host_apply(x), [self.d_ff], axis=-1)
        else:
            g, u = self.gate.host_apply(x), self.up.host_apply(x)  # type: ignore[union-attr]
        return self.down.host_apply(self.host_act(g) * u)


class Block:
    def __init__(
        self, spec: ModelSpec, w: _Loader, index: int, rope_freqs: mx.array | None
    ) -> None:
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

    def step_host(self, x: np.ndarray, cache: KVCache, layer: int) -> np.ndarray:
        """Positions (T, d_model) float32 through the block in NumPy."""
        an, fn, pan, pfn = self.host_norms
        a = self.attn.step_host(host_step.rms_norm(x, an, self.eps), cache, layer)
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


class _Loader:
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


class Stage:
    """Blocks [start, end) of a model, with a KV cache per sequence.

    ``forward(seq_id, x)`` takes int32 token ids (T,) on the first stage, float16 hidden
    states (T, d_model) otherwise (times ``spec.boundary_scale``, so that gemma's large
    residual stream fits float16); it returns float16 hidden states (T, d_model), or on the
    last stage float32 logits (vocab,) of the last position.
    """

    def __init__(
        self,
        spec: ModelSpec,
        tensors: Mapping[str, TensorData],
        start: int,
        end: int,
        *,
        max_sequences: int = 8,
        max_context: int | None = None,
        dtype: mx.Dtype = mx.float32,
        kv_dtype: mx.Dtype = mx.float16,
        ggml_numerics: bool = False,
    ) -> None:
        if not 0 <= start < end <= spec.n_blocks:
            raise ValueError(f"bad block range [{start}, {end}) for {spec.n_blocks} blocks")
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):
            raise ValueError(f"compute dtype must be a float type, got {dtype}")
        self.spec = spec
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == spec.n_blocks
        self.dtype = dtype
        self.max_context = max_context or spec.context_length
        d = spec.d_model
        self.ggml_numerics = ggml_numerics
        # A stage boundary rounds the hidden state to float16. In ggml mode a perturbation
        # that small already changes later 8-bit roundings and so the tokens, so the state is
        # rounded after every block instead: then any split computes bit for bit the same.
        self.round_residual = ggml_numerics
        w = _Loader(tensors, dtype, ggml_numerics)

        rope_freqs = None
        if spec.rope_freq_factors:
            # llama.cpp divides each frequency by its factor; MLX's freqs are periods
            factors = w.dense("rope_freqs.weight", (spec.rope_dim // 2,)).astype(mx.float32)
            exps = mx.arange(0, spec.rope_dim, 2, dtype=mx.float32) / spec.rope_dim
            rope_freqs = mx.power(spec.rope_base, exps) * factors

        tied = spec.tied_embedding or "output.weight" not in tensors
        self.embedding: Weight | None = None
        if self.is_first or (self.is_last and tied):
            self.embedding = w.weight("token_embd.weight", (d, spec.vocab_size))
        self.blocks = [Block(spec, w, i, rope_freqs) for i in range(start, end)]
        self.output_norm = self.output = None
        if self.is_last:
            self.output_norm = w.dense("output_norm.weight", (d,))
            if tied:
                head = Linear(self.embedding, act=w.act_type("token_embd.weight"))
                self.output = w.with_source(head, "token_embd.weight")
            else:
                self.output = w.linear("output.weight", (d, spec.vocab_size))
        if not self.is_first:
            self.embedding = None  # only the tied head holds on to it
        mx.eval([a for a in self._parameters() if isinstance(a, mx.array)])
        self.host_step = False
        self.host_blas = blas.wanted(sum(lin.host_nbytes() for lin in self._linears()))
        for linear in self._linears():
            if self.host_blas:
                linear.to_host()
            linear.source = None
            ready = [block.enable_host() for block in self.blocks]
            # one position at a time in NumPy: float32 compute, no ggml roundings to emulate
            self.host_step = all(ready) and dtype == mx.float32 and not ggml_numerics
        self._caches = SequenceCaches(
            max_sequences,
            n_layers=end - start,
            n_kv_heads=spec.n_kv_heads,
            head_dim=spec.head_dim,
            max_len=self.max_context,
            dtype=kv_dtype,
            host=self.host_blas and kv_dtype in HOST_DTYPES,
        )
        self._lock = threading.Lock()

    def _walk(self) -> Iterator[object]:
        def walk(obj: object) -> Iterator[object]:
            yield obj
            if isinstance(obj, list | tuple):
                for o in obj:
                    yield from walk(o)
            elif isinstance(obj, HostStack):
                yield from walk(obj.parts)
            elif isinstance(obj, Linear | Attention | MLP | Block):
                for v in vars(obj).values():
                    yield from walk(v)

        return walk([self.embedding, self.blocks, self.output_norm, self.output])

    def _linears(self) -> list[Linear]:
        return [o for o in self._walk() if isinstance(o, Linear)]

    def _parameters(self) -> list[mx.array | np.ndarray]:
        out: list[mx.array | np.ndarray] = []
        for obj in self._walk():
            if isinstance(obj, mx.array):
                out.append(obj)
            elif isinstance(obj, QuantizedWeight):
                out.extend([obj.weight, obj.scales, obj.biases])
            elif isinstance(obj, HostWeight):
                out.append(obj.wt)
                if obj.biases is not None:
                    out.append(obj.biases)
            elif isinstance(obj, PackedWeight):
                out.extend([obj.qt, obj.scales, obj.offsets])

        return out

    @property
    def nbytes(self) -> int:
        """Bytes of weights this stage holds (shared arrays counted once)."""
        return sum({id(a): a.nbytes for a in self._parameters()}.values())

    # ---- sequences ------------------------------------------------------------------------
    def sequences(self) -> list[str]:
        with self._lock:
            return self._caches.ids()

    def free(self, seq_id: str) -> None:
        with self._lock:
            self._caches.free(seq_id)

    def evict_idle(self, max_idle_s: float) -> list[str]:
        """Free sequences unused for ``max_idle_s`` seconds; returns their ids."""
        with self._lock:
            return self._caches.evict_idle(max_idle_s)

    def position(self, seq_id: str) -> int:
        """Tokens cached for the sequence (0 if unknown)."""
        with self._lock:
            return self._caches.position(seq_id)

    def adopt(self, old_id: str, new_id: str, keep: int) -> int:
        """Start ``new_id`` from the first ``keep`` cached positions of ``old_id`` (prefix
        reuse); the positions kept, 0 if that prefix is not here."""
        with self._lock:
            return self._caches.adopt(old_id, new_id, keep)

    # ---- compute --------------------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.is_first:
            if x.ndim != 1 or x.size == 0 or x.dtype.kind not in "iu":
                raise ValueError(
                    f"first stage takes token ids of shape (T,), got {x.dtype}{x.shape}"
                )
            if x.min() < 0 or x.max() >= self.spec.vocab_size:
                raise ValueError(f"token id out of range [0, {self.spec.vocab_size})")
            return x.astype(np.int32, copy=False)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.spec.d_model:
            raise ValueError(
                f"stage takes hidden states of shape (T, {self.spec.d_model}), got {x.shape}"
            )
        if x.dtype != np.float16:
            raise ValueError(f"hidden states must be float16, got {x.dtype}")
        return x

    def _embed(self, ids: mx.array) -> mx.array:
        e = self.embedding
        h = e.take_rows(ids) if isinstance(e, QuantizedWeight) else e[ids]
        h = h.astype(self.dtype)
        if self.spec.embed_scale is not None:
            h = h * self.spec.embed_scale
        return h

    def _step_host(self, x: np.ndarray, cache: KVCache) -> mx.array:
        """``_run`` in NumPy (host_step.py)."""
        s = self.spec.boundary_scale
        h = np.asarray(self._embed(mx.array(x))) if self.is_first else x.astype(np.float32) / s
        for i, block in enumerate(self.blocks):
            h = block.step_host(h, cache, i)
        if not self.is_last:
            return mx.array((h * np.float32(s)).astype(np.float16))
        h = host_step.rms_norm(h[-1:], np.array(self.output_norm), self.spec.rms_eps)
        assert self.output is not None
        return self._softcap(mx.array(self.output.host_apply(h)[0]))

    def _softcap(self, logits: mx.array) -> mx.array:
        c = self.spec.final_softcap
        return logits if c is None else mx.tanh(logits / c) * c

    def _run(self, x: np.ndarray, cache: KVCache) -> mx.array:
        T = x.shape[0]
        if self.host_step and cache.host and (T == 1 or host_step.PREFILL):
            return self._step_host(x, cache)
        s = self.spec.boundary_scale  # a power of two: scaling is exact
        h = self._embed(mx.array(x)) if self.is_first else mx.array(x).astype(self.dtype) / s
        h = h[None]
        mask = "causal" if T > 1 else None
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i, mask)
            if self.round_residual:
                h = (h * s).astype(mx.float16).astype(self.dtype) * (1 / s)
        if not self.is_last:
            return (h[0] * s).astype(mx.float16)
        norm = rms_norm_ggml if self.ggml_numerics else mx.fast.rms_norm
        h = norm(h[:, -1, :], self.output_norm, self.spec.rms_eps)
        return self._softcap(self.output(h)[0].astype(mx.float32))

    def forward(self, seq_id: str, x: np.ndarray) -> np.ndarray:
        if not isinstance(seq_id, str) or not 0 < len(seq_id) <= MAX_SEQ_ID_LEN:
            raise ValueError(f"seq_id must be a non-empty string of <= {MAX_SEQ_ID_LEN} chars")
        x = self._check_input(x)
        T = x.shape[0]
        with self._lock:
            cache = self._caches.get(seq_id)
            cache.reserve(T)  # raises ContextOverflowError before anything changes
            self._caches.keep(seq_id, cache)
            outs = []
            for s in range(0, T, PREFILL_CHUNK):
                chunk = x[s : s + PREFILL_CHUNK]
                out = self._run(chunk, cache)
                mx.eval(out, cache.pending())
                cache.commit(chunk.shape[0])
                outs.append(out)
        if self.is_last:
            return np.array(outs[-1])
        return np.array(outs[0] if len(outs) == 1 else mx.concatenate(outs))
