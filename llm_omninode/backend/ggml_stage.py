"""A stage computed by ggml's own CPU kernels (the ``ggml-python`` bindings), on GGUF bytes as
they are: weight tensors point at the stage's shard bytes (a file mapping), so a stage holds its
slice at its GGUF size and dequantizes nothing to keep it.

Same interface and the same block structure as engine.Stage (spec.py's flags: llama, mistral,
qwen2, gemma3), written once more as a ggml graph. A graph is built per (positions, attended
length) shape and kept: a decode step (one position) reuses it, only its inputs change (token
ids or hidden states, positions, the rows of the KV cache written, the attention mask). Each
sequence's KV cache is a float16 NumPy buffer (layers, k/v, positions, kv width) that the graph's
cache tensors point at; a step of another sequence re-points them (views included), nothing is
copied. Attention is ggml's flash attention (K and V both stored row per position, so a cache
grows without changing a graph), as llama.cpp's CPU graph with flash attention on.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import ggml
import numpy as np

from .kv_cache import ContextOverflowError, SequenceCaches, SequenceLimitError
from .quant import TensorData
from .spec import ModelSpec, UnsupportedModelError

__all__ = ["GgmlStage"]

MAX_SEQ_ID_LEN = 256
PREFILL_CHUNK = 512  # positions per graph run of a long prompt (bounds the compute buffer)
KV_STEP = 256  # caches grow, and graphs attend, in steps of this many positions
KEPT_GRAPHS = 4  # one-position graphs kept (one per attended length in use)
_F16, _F32, _I32, _I64 = ggml.GGML_TYPE_F16, ggml.GGML_TYPE_F32, ggml.GGML_TYPE_I32, 27
_NULL = ctypes.POINTER(ggml.ggml_tensor)()
# ggml-python 0.0.45 declares this one's result as a Python int (a truncated pointer): a fresh
# function object (item access, not the attribute the bindings set up) with the right type
_cpu_buffer_type = next(
    lib["ggml_backend_cpu_buffer_type"]
    for lib in ggml.lib._libraries
    if hasattr(lib, "ggml_backend_cpu_buffer_type")
)
_cpu_buffer_type.restype = ctypes.c_void_p
_cpu_buffer_type.argtypes = []


def default_threads() -> int:
    """OMNI_GGML_THREADS, else every CPU this process may run on."""
    env = os.environ.get("OMNI_GGML_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ---- KV cache -----------------------------------------------------------------------------
class GgmlKV:
    """Keys and values of one sequence for a stage's blocks, float16, grown in KV_STEP steps up
    to ``max_len`` positions: keys (layers, positions, n_kv_heads * head_dim); values the same,
    or with ``v_trans`` (layers, n_kv_heads * head_dim, positions) as llama.cpp caches them
    for attention without flash attention."""

    def __init__(self, n_layers: int, width: int, max_len: int, v_trans: bool) -> None:
        self.n_layers, self.width, self.max_len, self.v_trans = n_layers, width, max_len, v_trans
        self.keys = np.zeros((n_layers, 0, width), np.float16)
        self.values = np.zeros(
            (n_layers, width, 0) if v_trans else (n_layers, 0, width), np.float16
        )
        self.offset = 0  # positions already cached
        self.last_used = time.monotonic()

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def reserve(self, n: int) -> None:
        need = self.offset + n
        if need > self.max_len:
            raise ContextOverflowError(
                f"sequence would reach {need} positions; the context is {self.max_len} "
                f"({self.offset} cached + {n} new)"
            )
        if need > self.capacity:
            old, cap = self.capacity, attended(need, self.max_len)
            keys = np.zeros((self.n_layers, cap, self.width), np.float16)
            keys[:, :old] = self.keys
            if self.v_trans:
                values = np.zeros((self.n_layers, self.width, cap), np.float16)
                values[:, :, :old] = self.values
            else:
                values = np.zeros_like(keys)
                values[:, :old] = self.values
            self.keys, self.values = keys, values

    def commit(self, n: int) -> None:
        self.offset += n
        self.last_used = time.monotonic()

    def base(self, layer: int, kind: int) -> int:
        """Address of layer ``layer``'s keys (kind 0) or values (kind 1)."""
        a = self.values if kind else self.keys
        return _ptr(a) + layer * a[0].nbytes

    @property
    def where(self) -> tuple[int, int]:
        """Identifies the buffers (a graph pointed at them need not be re-pointed)."""
        return (_ptr(self.keys), _ptr(self.values))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def attended(positions: int, max_len: int) -> int:
    """Cache positions a step attends over (the rest masked): a multiple of KV_STEP."""
    return min(max_len, -(-positions // KV_STEP) * KV_STEP)


class _Sequences(SequenceCaches):
    """SequenceCaches (count bound, adopt, idle eviction) holding GgmlKV caches."""

    def __init__(
        self, max_sequences: int, n_layers: int, width: int, max_len: int, v_trans: bool
    ) -> None:
        super().__init__(
            max_sequences, n_layers=n_layers, n_kv_heads=0, head_dim=0, max_len=max_len, dtype=None
        )
        self._shape = (n_layers, width, max_len, v_trans)

    def get(self, seq_id: str) -> GgmlKV:  # type: ignore[override]
        cache = self._caches.get(seq_id)
        if cache is not None:
            self._caches.move_to_end(seq_id)
            return cache  # type: ignore[return-value]
        if len(self._caches) >= self.max_sequences:
            raise SequenceLimitError(
                f"stage holds {len(self._caches)} sequences (max_sequences="
                f"{self.max_sequences}); free one before starting {seq_id!r}"
            )
        return GgmlKV(*self._shape)


# ---- graphs -------------------------------------------------------------------------------
@dataclass
class _Graph:
    """A built, allocated graph and what each run writes and reads."""

    ctx: object
    graph: object
    galloc: object
    inputs: dict[str, np.ndarray]  # numpy buffers the graph's input tensors point at
    output: object  # ggml tensor
    out_shape: tuple[int, int]
    # (tensor, layer, kind, byte offset): cache tensors and their views, re-pointed per sequence
    kv_refs: list[tuple[object, int, int, int]] = field(default_factory=list)
    bound: tuple[int, int] | None = None  # GgmlKV.where of the cache pointed at

    def bind(self, cache: GgmlKV) -> None:
        key = cache.where
        if self.bound == key:
            return
        for tensor, layer, kind, offs in self.kv_refs:
            tensor.contents.data = cache.base(layer, kind) + offs
        self.bound = key

    def free(self) -> None:
        if self.galloc is not None:
            ggml.ggml_gallocr_free(self.galloc)
            ggml.ggml_free(self.ctx)
            self.galloc = self.ctx = None


class _Builder:
    """Creates the tensors of one graph in a no-alloc context; inputs point at NumPy arrays."""

    def __init__(self, n_nodes: int) -> None:
        self.size = n_nodes
        mem = ggml.ggml_tensor_overhead() * n_nodes + ggml.ggml_graph_overhead_custom(
            n_nodes, False
        )
        params = ggml.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True)
        self.ctx = ggml.ggml_init(params)
        self.graph = ggml.ggml_new_graph_custom(self.ctx, n_nodes, False)
        self.inputs: dict[str, np.ndarray] = {}

    def input(self, name: str, ggml_type: int, array: np.ndarray) -> object:
        """A tensor over ``array`` (C order: its last axis is ggml's ne0)."""
        ne = (ctypes.c_int64 * 4)(*reversed(array.shape))
        t = ggml.ggml_new_tensor(self.ctx, ggml_type, array.ndim, ne)
        t.contents.data = _ptr(array)
        self.inputs[name] = array
        return t

    def external(self, ggml_type: int, ne: Sequence[int], address: int) -> object:
        t = ggml.ggml_new_tensor(self.ctx, ggml_type, len(ne), (ctypes.c_int64 * 4)(*ne))
        t.contents.data = address
        return t


# ---- the stage ----------------------------------------------------------------------------
class GgmlStage:
    """Blocks [start, end) of a model computed by ggml, with a KV cache per sequence.

    ``forward(seq_id, x)`` as engine.Stage: int32 token ids (T,) on the first stage, float16
    hidden states (T, d_model) times ``spec.boundary_scale`` otherwise; returns float16 hidden
    states, or on the last stage float32 logits (vocab,) of the last position (of every
    position with ``all_logits=True``: (T, vocab)).
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
        threads: int | None = None,
        flash_attn: bool = False,
        hidden_dtype: type = np.float16,
    ) -> None:
        if not 0 <= start < end <= spec.n_blocks:
            raise ValueError(f"bad block range [{start}, {end}) for {spec.n_blocks} blocks")
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        if spec.activation not in ("silu", "gelu"):
            raise UnsupportedModelError(f"activation {spec.activation!r} is not supported")
        self.spec = spec
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == spec.n_blocks
        self.max_context = max_context or spec.context_length
        self.threads = threads or default_threads()
        self.flash_attn = flash_attn
        # what hidden states cross a stage boundary as: float16 as engine.Stage, or float32,
        # with which any split computes bit for bit what one stage computes
        self.hidden_dtype = np.dtype(hidden_dtype)
        if self.hidden_dtype not in (np.float16, np.float32):
            raise ValueError(f"hidden states cross as float16 or float32, not {hidden_dtype}")
        self._held: dict[str, np.ndarray] = {}  # arrays the weight tensors point at
        self._weights: dict[str, object] = {}
        n = len(tensors) + 8
        params = ggml.ggml_init_params(
            mem_size=ggml.ggml_tensor_overhead() * n, mem_buffer=None, no_alloc=True
        )
        self._wctx = ggml.ggml_init(params)
        self._load(tensors)
        self.backend = ggml.ggml_backend_cpu_init()
        ggml.ggml_backend_cpu_set_n_threads(self.backend, self.threads)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        width = spec.n_kv_heads * spec.head_dim
        self._caches = _Sequences(
            max_sequences, end - start, width, self.max_context, not flash_attn
        )
        self._lock = threading.Lock()

    # ---- weights ----------------------------------------------------------------------
    def _load(self, tensors: Mapping[str, TensorData]) -> None:
        s, d = self.spec, self.spec.d_model
        want: dict[str, tuple[int, ...]] = {}
        tied = s.tied_embedding or "output.weight" not in tensors
        if self.is_first or (self.is_last and tied):
            want["token_embd.weight"] = (d, s.vocab_size)
        if s.rope_freq_factors:
            want["rope_freqs.weight"] = (s.rope_dim // 2,)
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        for i in range(self.start, self.end):
            p = f"blk.{i}."
            want.update(
                {
                    p + "attn_norm.weight": (d,),
                    p + "attn_q.weight": (d, q),
                    p + "attn_k.weight": (d, kv),
                    p + "attn_v.weight": (d, kv),
                    p + "attn_output.weight": (q, d),
                    p + "ffn_norm.weight": (d,),
                    p + "ffn_gate.weight": (d, s.d_ff),
                    p + "ffn_up.weight": (d, s.d_ff),
                    p + "ffn_down.weight": (s.d_ff, d),
                }
            )
            if s.attn_bias:
                want.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,)})
                want[p + "attn_v.bias"] = (kv,)
            if s.qk_norm:
                want.update({p + "attn_q_norm.weight": (s.head_dim,)})
                want[p + "attn_k_norm.weight"] = (s.head_dim,)
            if s.post_norms:
                want.update({p + "post_attention_norm.weight": (d,)})
                want[p + "post_ffw_norm.weight"] = (d,)
        if self.is_last:
            want["output_norm.weight"] = (d,)
            if not tied:
                want["output.weight"] = (d, s.vocab_size)
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None:
                raise UnsupportedModelError(f"tensor {name} is missing")
            if tuple(t.shape) != shape:
                raise UnsupportedModelError(
                    f"tensor {name} has shape {tuple(t.shape)}, the model spec implies {shape}"
                )
            data, kind = np.asarray(t.data), int(t.ggml_type)
            if len(shape) == 1 and kind != _F32:  # norms, biases, rope factors: ggml wants f32
                data, kind = _dequantize_vector(t), _F32
            self._held[name] = data
            ne = (ctypes.c_int64 * 4)(*shape)
            w = ggml.ggml_new_tensor(self._wctx, kind, len(shape), ne)
            if ggml.ggml_nbytes(w) != data.nbytes:
                raise UnsupportedModelError(f"tensor {name}: {data.nbytes} bytes for its shape")
            w.contents.data = _ptr(data)
            self._weights[name] = w
        self._tied = tied

    def _w(self, name: str) -> object:
        return self._weights.get(name, _NULL)

    @property
    def nbytes(self) -> int:
        """Bytes of weights this stage holds: its GGUF bytes (mapped, shared ones once)."""
        return sum({_ptr(a): a.nbytes for a in self._held.values()}.values())

    # ---- sequences --------------------------------------------------------------------
    def sequences(self) -> list[str]:
        with self._lock:
            return self._caches.ids()

    def free(self, seq_id: str) -> None:
        with self._lock:
            self._caches.free(seq_id)

    def evict_idle(self, max_idle_s: float) -> list[str]:
        with self._lock:
            return self._caches.evict_idle(max_idle_s)

    def position(self, seq_id: str) -> int:
        with self._lock:
            return self._caches.position(seq_id)

    def adopt(self, old_id: str, new_id: str, keep: int) -> int:
        with self._lock:
            return self._caches.adopt(old_id, new_id, keep)

    @property
    def kv_nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._caches._caches.values())

    # ---- graph ------------------------------------------------------------------------
    def _graph(self, T: int, n_kv: int, all_logits: bool, cache: GgmlKV) -> _Graph:
        # without flash attention V is cached transposed: its strides follow the capacity
        key = (T, n_kv, all_logits, 0 if self.flash_attn else cache.capacity)
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
            g.bind(cache)
            return g
        g = self._build(T, n_kv, all_logits, cache)
        if T == 1:  # prompts come in all lengths: only steps' graphs are worth keeping
            self._graphs[key] = g
            while len(self._graphs) > KEPT_GRAPHS:
                self._graphs.popitem(last=False)[1].free()
        return g

    def _build(self, T: int, n_kv: int, all_logits: bool, cache: GgmlKV) -> _Graph:
        """The graph of T positions attending over n_kv cached ones, pointed at ``cache``."""
        s, d = self.spec, self.spec.d_model
        hd, nh, nkv = s.head_dim, s.n_heads, s.n_kv_heads
        width = nkv * hd
        b = _Builder(64 * (self.end - self.start) + 64)
        ctx = b.ctx
        t_pad = -(-T // ggml.GGML_KQ_MASK_PAD) * ggml.GGML_KQ_MASK_PAD
        if self.is_first:
            ids = b.input("x", _I32, np.zeros(T, np.int32))
            h = ggml.ggml_get_rows(ctx, self._w("token_embd.weight"), ids)
            if s.embed_scale is not None:
                h = ggml.ggml_scale(ctx, h, s.embed_scale)
        else:
            h = b.input("x", _F32, np.zeros((T, d), np.float32))
            if s.boundary_scale != 1.0:
                h = ggml.ggml_scale(ctx, h, 1.0 / s.boundary_scale)
        pos = b.input("pos", _I32, np.zeros(T, np.int32))
        rows = b.input("rows", _I64, np.zeros(T, np.int64))
        cap, flash = cache.capacity, self.flash_attn
        if not flash:
            v_rows = b.input("v_rows", _I64, np.zeros(T * width, np.int64))
        mtype, mdtype = (_F16, np.float16) if flash else (_F32, np.float32)
        masks = {0: b.input("mask", mtype, np.zeros((t_pad, n_kv), mdtype))}
        if s.sliding_window and any(s.is_sliding(i) for i in range(self.start, self.end)):
            masks[s.sliding_window] = b.input("mask_swa", mtype, np.zeros((t_pad, n_kv), mdtype))
        mode = 0 if s.rope_traditional else ggml.GGML_ROPE_TYPE_NEOX
        freqs = self._w("rope_freqs.weight")
        kv_leaves = []
        for layer, i in enumerate(range(self.start, self.end)):
            p = f"blk.{i}."
            w = self._w
            x = self._norm(ctx, h, p + "attn_norm.weight")
            q = ggml.ggml_mul_mat(ctx, w(p + "attn_q.weight"), x)
            k = ggml.ggml_mul_mat(ctx, w(p + "attn_k.weight"), x)
            v = ggml.ggml_mul_mat(ctx, w(p + "attn_v.weight"), x)
            if s.attn_bias:
                q = ggml.ggml_add(ctx, q, w(p + "attn_q.bias"))
                k = ggml.ggml_add(ctx, k, w(p + "attn_k.bias"))
                v = ggml.ggml_add(ctx, v, w(p + "attn_v.bias"))
            q = ggml.ggml_reshape_3d(ctx, q, hd, nh, T)
            k = ggml.ggml_reshape_3d(ctx, k, hd, nkv, T)
            if s.qk_norm:
                q = self._norm(ctx, q, p + "attn_q_norm.weight")
                k = self._norm(ctx, k, p + "attn_k_norm.weight")
            base, scale = s.layer_rope(i)
            rope = (s.rope_dim, mode, s.context_length, base, scale, 0.0, 1.0, 32.0, 1.0)
            q = ggml.ggml_rope_ext(ctx, q, pos, freqs, *rope)
            k = ggml.ggml_rope_ext(ctx, k, pos, freqs, *rope)
            # the cache tensors: [width, n_kv] float16, pointed at the sequence's buffer
            # (without flash attention V is transposed: a row of positions per channel, as
            # llama.cpp caches it; written element by element)
            kc = b.external(_F16, (width, n_kv), cache.base(layer, 0))
            vc = b.external(
                _F16, (width, n_kv) if flash else (1, width * cap), cache.base(layer, 1)
            )
            kv_leaves += [(kc, layer, 0), (vc, layer, 1)]
            k2 = ggml.ggml_reshape_2d(ctx, k, width, T)
            sets = [(kc, k2, rows)]
            sets += (
                [(vc, v, rows)]
                if flash
                else [(vc, ggml.ggml_reshape_2d(ctx, v, 1, width * T), v_rows)]
            )
            for dst, new, at in sets:
                ggml.ggml_build_forward_expand(b.graph, ggml.ggml_set_rows(ctx, dst, new, at))
            keys = ggml.ggml_view_3d(ctx, kc, hd, n_kv, nkv, width * 2, hd * 2, 0)
            mask = masks[s.sliding_window if s.is_sliding(i) else 0]
            qp = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)
            if flash:
                values = ggml.ggml_view_3d(ctx, vc, hd, n_kv, nkv, width * 2, hd * 2, 0)
                o = ggml.ggml_flash_attn_ext(ctx, qp, keys, values, mask, s.scale, 0.0, 0.0)
                ggml.ggml_flash_attn_ext_set_prec(o, ggml.GGML_PREC_F32)
                o = ggml.ggml_reshape_2d(ctx, o, hd * nh, T)
            else:
                kq = ggml.ggml_soft_max_ext(
                    ctx, ggml.ggml_mul_mat(ctx, keys, qp), mask, s.scale, 0.0
                )
                values = ggml.ggml_view_3d(ctx, vc, n_kv, hd, nkv, cap * 2, cap * hd * 2, 0)
                o = ggml.ggml_permute(ctx, ggml.ggml_mul_mat(ctx, values, kq), 0, 2, 1, 3)
                o = ggml.ggml_cont_2d(ctx, o, hd * nh, T)
            a = ggml.ggml_mul_mat(ctx, w(p + "attn_output.weight"), o)
            if s.post_norms:
                a = self._norm(ctx, a, p + "post_attention_norm.weight")
            h = ggml.ggml_add(ctx, h, a)
            x = self._norm(ctx, h, p + "ffn_norm.weight")
            gate = ggml.ggml_mul_mat(ctx, w(p + "ffn_gate.weight"), x)
            up = ggml.ggml_mul_mat(ctx, w(p + "ffn_up.weight"), x)
            glu = ggml.ggml_swiglu_split if s.activation == "silu" else ggml.ggml_geglu_split
            m = ggml.ggml_mul_mat(ctx, w(p + "ffn_down.weight"), glu(ctx, gate, up))
            if s.post_norms:
                m = self._norm(ctx, m, p + "post_ffw_norm.weight")
            h = ggml.ggml_add(ctx, h, m)
        if self.is_last:
            if not all_logits and T > 1:
                nb1 = h.contents.nb[1]
                h = ggml.ggml_view_2d(ctx, h, d, 1, nb1, (T - 1) * nb1)
            h = self._norm(ctx, h, "output_norm.weight")
            head = "token_embd.weight" if self._tied else "output.weight"
            h = ggml.ggml_mul_mat(ctx, self._w(head), h)
            if s.final_softcap is not None:
                c = s.final_softcap
                h = ggml.ggml_scale(ctx, ggml.ggml_tanh(ctx, ggml.ggml_scale(ctx, h, 1 / c)), c)
            out_shape = (T if all_logits else 1, s.vocab_size)
        else:
            out_shape = (T, d)
        ggml.ggml_set_output(h)
        ggml.ggml_build_forward_expand(b.graph, h)
        galloc = ggml.ggml_gallocr_new(_cpu_buffer_type())
        g = _Graph(b.ctx, b.graph, galloc, b.inputs, h, out_shape)
        g.kv_refs = _kv_refs(b.graph, kv_leaves)
        g.bound = cache.where
        if not ggml.ggml_gallocr_alloc_graph(galloc, b.graph):
            g.free()
            raise MemoryError("ggml could not allocate the stage's compute buffer")
        return g

    def _norm(self, ctx: object, x: object, name: str) -> object:
        return ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, x, self.spec.rms_eps), self._w(name))

    # ---- compute ----------------------------------------------------------------------
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
        if x.dtype != self.hidden_dtype:
            raise ValueError(f"hidden states must be {self.hidden_dtype}, got {x.dtype}")
        return x

    def _run(self, x: np.ndarray, cache: GgmlKV, all_logits: bool) -> np.ndarray:
        T, p0 = x.shape[0], cache.offset
        n_kv = attended(p0 + T, self.max_context)
        g = self._graph(T, n_kv, all_logits, cache)
        try:
            inp = g.inputs
            inp["x"][...] = x
            inp["pos"][:] = np.arange(p0, p0 + T, dtype=np.int32)
            inp["rows"][:] = inp["pos"]
            if "v_rows" in inp:
                chan = np.arange(cache.width, dtype=np.int64) * cache.capacity
                inp["v_rows"][:] = (inp["pos"][:, None] + chan[None]).reshape(-1)
            qpos = inp["pos"][:, None]
            kpos = np.arange(n_kv)[None]
            causal = kpos <= qpos
            inp["mask"][:] = -np.inf
            inp["mask"][:T] = np.where(causal, 0.0, -np.inf)
            if "mask_swa" in inp:
                window = causal & (qpos - kpos < self.spec.sliding_window)
                inp["mask_swa"][:] = -np.inf
                inp["mask_swa"][:T] = np.where(window, 0.0, -np.inf)
            status = ggml.ggml_backend_graph_compute(self.backend, g.graph)
            if status != 0:
                raise RuntimeError(f"ggml graph compute failed (status {status})")
            n = g.out_shape[0] * g.out_shape[1]
            buf = (ctypes.c_float * n).from_address(g.output.contents.data)
            out = np.ctypeslib.as_array(buf).reshape(g.out_shape).copy()
        finally:
            if T != 1:
                g.free()
        if self.is_last:
            return out
        return (out * np.float32(self.spec.boundary_scale)).astype(self.hidden_dtype)

    def forward(self, seq_id: str, x: np.ndarray, *, all_logits: bool = False) -> np.ndarray:
        _check_seq_id(seq_id)
        x = self._check_input(x)
        T = x.shape[0]
        with self._lock:
            cache = self._caches.get(seq_id)
            cache.reserve(T)
            self._caches.keep(seq_id, cache)
            outs = []
            for s in range(0, T, PREFILL_CHUNK):
                chunk = x[s : s + PREFILL_CHUNK]
                outs.append(self._run(chunk, cache, all_logits))
                cache.commit(chunk.shape[0])
        if self.is_last:
            return np.concatenate(outs) if all_logits else outs[-1][0]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    @property
    def batches(self) -> bool:
        """Whether ``forward_batch`` computes its steps together (here: one by one)."""
        return False

    def forward_batch(
        self, steps: Sequence[tuple[str, np.ndarray]]
    ) -> list[np.ndarray | Exception]:
        return [_result_or_error(self.forward, seq_id, x) for seq_id, x in steps]

    def close(self) -> None:
        """Free ggml's memory (graphs, backend); the stage is unusable after."""
        graphs, self._graphs = getattr(self, "_graphs", {}), OrderedDict()
        for g in graphs.values():
            g.free()
        if getattr(self, "backend", None) is not None:
            ggml.ggml_backend_free(self.backend)
            self.backend = None
        if getattr(self, "_wctx", None) is not None:
            ggml.ggml_free(self._wctx)
            self._wctx = None

    def __del__(self) -> None:
        self.close()


def _kv_refs(graph: object, leaves: list[tuple[object, int, int]]) -> list:
    """The cache tensors and every view of them in ``graph``, with their byte offsets."""
    where = {ctypes.addressof(t.contents): (layer, kind) for t, layer, kind in leaves}
    refs = [(t, layer, kind, 0) for t, layer, kind in leaves]
    for i in range(ggml.ggml_graph_n_nodes(graph)):
        node = ggml.ggml_graph_node(graph, i)
        src = node.contents.view_src
        if src and ctypes.addressof(src.contents) in where:
            refs.append((node, *where[ctypes.addressof(src.contents)], node.contents.view_offs))
    return refs


def _dequantize_vector(t: TensorData) -> np.ndarray:
    from .quant import load_tensor

    w = load_tensor(t)
    w = w.dequantize() if hasattr(w, "dequantize") else w
    return np.array(w, dtype=np.float32).reshape(-1)


def _check_seq_id(seq_id: object) -> None:
    if not isinstance(seq_id, str) or not 0 < len(seq_id) <= MAX_SEQ_ID_LEN:
        raise ValueError(f"seq_id must be a non-empty string of <= {MAX_SEQ_ID_LEN} chars")


def _result_or_error(fn: Callable[..., np.ndarray], *args: object) -> np.ndarray | Exception:
    try:
        return fn(*args)
    except (ValueError, SequenceLimitError) as exc:
        return exc
