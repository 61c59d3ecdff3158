"""A stage computed by ggml's own CPU kernels (the ``ggml-python`` bindings) on GGUF blocks as
they are: weight tensors point at the stage's shard bytes (a file mapping), so a stage holds its
slice at its GGUF size and dequantizes nothing to keep it.

Same interface and block structure as engine.Stage (spec.py's flags: llama, mistral, qwen2,
gemma3), written as the graph llama.cpp's CPU backend computes: with ggml built as llama.cpp
builds it (GGML_LLAMAFILE) and weights repacked where its CPU backend repacks them
(``repack``, as llama.cpp does by default), SmolLM2's logits are llama.cpp's bit for bit. A
graph is built per (positions, attended length) shape and kept for decode steps, which only
rewrite its inputs (ids or hidden states, positions, the cache rows written, the mask); each
sequence's KV cache is a float16 NumPy buffer pair (ggml_kv.py) that the graph's cache
tensors are re-pointed at (ggml_graph.py).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import ggml
import numpy as np

from .. import settings
from .ggml_graph import F16, F32, I32, I64, Graph, GraphBuilder, Weights
from .ggml_kv import GgmlKV, GgmlSequences, attended
from .ggml_types import GGMLType
from .logprobs import rows_per_pass
from .memory import KEPT_GRAPHS, MAX_BATCH, PREFILL_CHUNK
from .spec import ModelSpec, UnsupportedModelError
from .stage_base import SequenceStage, check_seq_id, leaving
from .tensor_data import TensorData

__all__ = ["GgmlStage", "default_threads"]

# llama.cpp's graphs of these scale the queries before attention rather than the scores (the
# same up to float16 rounding of tiny query values, which the K.Q product rounds to)
PRESCALED_QUERIES = frozenset({"gemma3"})
# a graph's slot: a sequence's cache, its positions in this run, the cache positions attended
Slot = tuple[GgmlKV, int, int]


def default_threads() -> int:
    """OMNI_GGML_THREADS, else every CPU this process may run on."""
    env = settings.ggml_threads()
    if env:
        return env
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_repack() -> bool:
    """Weights are repacked for ggml's interleaved kernels, as llama.cpp does (its prompt speed
    on K-quants), unless OMNI_GGML_REPACK=0."""
    return settings.ggml_repack()


class GgmlStage(SequenceStage):
    """Blocks [start, end) of a model computed by ggml, with a KV cache per sequence.

    ``forward(seq_id, x)`` as engine.Stage: int32 token ids (T,) on the first stage, hidden
    states (T, d_model) otherwise, float32 or float16 times ``spec.boundary_scale``; returns
    hidden states as ``hidden_dtype`` (float32: unrounded, so any split computes bit for bit
    what one stage computes; float16: half the bytes), or on the last stage float32 logits
    (vocab,) of the last position (of every position with ``all_logits=True``: (T, vocab)).

    ``flash_attn``: ggml's flash attention (as llama.cpp with -fa) instead of softmax(KQ)V.
    ``repack`` (default: yes, unless OMNI_GGML_REPACK=0): weights of the types the CPU backend
    interleaves (Q4_0, Q4_K, ... on AVX2) are repacked, a copy of the same size whose file
    pages are given back: prompts then compute about twice as fast. Groups of 4 rows take the
    interleaved matrix kernel, the rest the vector one, so (as in llama.cpp) a decode step of
    4 or more sequences at once, or a prompt cut into other pieces, rounds differently.
    ``kv_bytes``: the KV caches of all sequences together stay within it (SequenceLimitError).
    """

    prefill_chunk = PREFILL_CHUNK

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
        repack: bool | None = None,
        kv_bytes: int | None = None,
    ) -> None:
        if not 0 <= start < end <= spec.n_blocks:
            raise ValueError(f"bad block range [{start}, {end}) for {spec.n_blocks} blocks")
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        if spec.activation not in ("silu", "gelu"):
            raise UnsupportedModelError(f"activation {spec.activation!r} is not supported")
        self.hidden_dtype = np.dtype(hidden_dtype)
        if self.hidden_dtype not in (np.float16, np.float32):
            raise ValueError(f"hidden states cross as float16 or float32, not {hidden_dtype}")
        self.spec = spec
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == spec.n_blocks
        self.max_context = max_context or spec.context_length
        self.threads = threads or default_threads()
        self.flash_attn = flash_attn
        self.tied = spec.tied_embedding or "output.weight" not in tensors
        self.weights = Weights(len(tensors), default_repack() if repack is None else repack)
        self._load(tensors)
        self.backend = ggml.ggml_backend_cpu_init()
        ggml.ggml_backend_cpu_set_n_threads(self.backend, self.threads)
        self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
        width = spec.n_kv_heads * spec.head_dim
        self._caches = GgmlSequences(
            max_sequences, end - start, width, self.max_context, not flash_attn, kv_bytes
        )
        self._lock = threading.Lock()

    # ---- weights ----------------------------------------------------------------------
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors this stage computes with, and the shape the spec implies for each."""
        s, d = self.spec, self.spec.d_model
        q, kv, hd = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
        want: dict[str, tuple[int, ...]] = {}
        if self.is_first or (self.is_last and self.tied):
            want["token_embd.weight"] = (d, s.vocab_size)
        if s.rope_freq_factors:
            want["rope_freqs.weight"] = (s.rope_dim // 2,)
        for i in range(self.start, self.end):
            shapes = {
                "attn_norm.weight": (d,),
                "attn_q.weight": (d, q),
                "attn_k.weight": (d, kv),
                "attn_v.weight": (d, kv),
                "attn_output.weight": (q, d),
                "ffn_norm.weight": (d,),
                "ffn_gate.weight": (d, s.d_ff),
                "ffn_up.weight": (d, s.d_ff),
                "ffn_down.weight": (s.d_ff, d),
            }
            if s.attn_bias:
                shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
            if s.qk_norm:
                shapes.update({"attn_q_norm.weight": (hd,), "attn_k_norm.weight": (hd,)})
            if s.post_norms:
                shapes.update({"post_attention_norm.weight": (d,), "post_ffw_norm.weight": (d,)})
            want.update({f"blk.{i}.{n}": shape for n, shape in shapes.items()})
        if self.is_last:
            want["output_norm.weight"] = (d,)
            if not self.tied:
                want["output.weight"] = (d, s.vocab_size)
        return want

    def _load(self, tensors: Mapping[str, TensorData]) -> None:
        for name, shape in self._shapes().items():
            t = tensors.get(name)
            if t is None:
                raise UnsupportedModelError(f"tensor {name} is missing")
            if tuple(t.shape) != shape:
                raise UnsupportedModelError(
                    f"tensor {name} has shape {tuple(t.shape)}, the model spec implies {shape}"
                )
            data, kind = np.asarray(t.data), int(t.ggml_type)
            if len(shape) == 1 and kind != F32:  # norms, biases, rope factors: ggml adds f32
                data, kind = _as_float32(t), F32
            if name == "token_embd.weight":  # rows are gathered from it: never repacked
                self.weights.add(name, kind, shape, data, repack=False)
            else:
                self.weights.add(name, kind, shape, data)

    @property
    def nbytes(self) -> int:
        """Bytes of weights this stage holds: their GGUF bytes (shared ones once)."""
        return self.weights.nbytes

    # ---- sequences --------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        with self._lock:
            return self._caches.nbytes

    # ---- graphs -----------------------------------------------------------------------
    def _graph(self, slots: Sequence[Slot], all_logits: bool, pool: str | None = None) -> Graph:
        # without flash attention V is cached transposed: its strides follow the capacity
        shape = tuple((T, n_kv, 0 if self.flash_attn else c.capacity) for c, T, n_kv in slots)
        key = (shape, all_logits, pool)
        g = self._graphs.get(key)
        if g is not None:
            self._graphs.move_to_end(key)
            g.bind([c for c, _, _ in slots])
            return g
        g = self._build(slots, all_logits, pool)
        if all(T == 1 for _, T, _ in slots):  # steps' graphs are worth keeping, prompts' not
            self._graphs[key] = g
            while len(self._graphs) > KEPT_GRAPHS:
                self._graphs.popitem(last=False)[1].free()
        return g

    def _build(self, slots: Sequence[Slot], all_logits: bool, pool: str | None = None) -> Graph:
        """The graph of ``slots``: for each, T positions of a sequence attending over n_kv
        cached ones (its cache); together they go through every projection at once. With
        ``pool`` (one slot, the last stage): the final-norm states of its rows "all", "first"
        or "last" (what a Pooler needs), not logits."""
        s, d = self.spec, self.spec.d_model
        total = sum(T for _, T, _ in slots)
        n_nodes = (64 + 24 * len(slots)) * (self.end - self.start) + 64
        b = GraphBuilder(n_nodes, [c for c, _, _ in slots])
        ctx, w = b.ctx, self.weights.get
        if self.is_first:
            h = ggml.ggml_get_rows(ctx, w("token_embd.weight"), b.input("x", I32, _zeros(total)))
            if s.embed_scale is not None:
                h = ggml.ggml_scale(ctx, h, s.embed_scale)
        else:
            h = b.input("x", F32, np.zeros((total, d), np.float32))
        b.input("pos", I32, _zeros(total))
        width = s.n_kv_heads * s.head_dim
        mtype, mdtype = (F16, np.float16) if self.flash_attn else (F32, np.float32)
        sliding = any(s.is_sliding(i) for i in range(self.start, self.end))
        for j, (_, T, n_kv) in enumerate(slots):
            b.input(f"rows{j}", I64, _zeros(T, np.int64))
            if not self.flash_attn:
                b.input(f"v_rows{j}", I64, _zeros(T * width, np.int64))
            t_pad = -(-T // ggml.GGML_KQ_MASK_PAD) * ggml.GGML_KQ_MASK_PAD
            for name in ("mask", "mask_swa") if sliding else ("mask",):
                b.input(f"{name}{j}", mtype, np.zeros((t_pad, n_kv), mdtype))
        for layer, i in enumerate(range(self.start, self.end)):
            p = f"blk.{i}."
            a = self._attention(b, self._norm(ctx, h, p + "attn_norm.weight"), layer, i, slots)
            if s.post_norms:
                a = self._norm(ctx, a, p + "post_attention_norm.weight")
            h = ggml.ggml_add(ctx, h, a)
            glu = ggml.ggml_swiglu_split if s.activation == "silu" else ggml.ggml_geglu_split
            x = self._norm(ctx, h, p + "ffn_norm.weight")
            gate = ggml.ggml_mul_mat(ctx, w(p + "ffn_gate.weight"), x)
            up = ggml.ggml_mul_mat(ctx, w(p + "ffn_up.weight"), x)
            m = ggml.ggml_mul_mat(ctx, w(p + "ffn_down.weight"), glu(ctx, gate, up))
            if s.post_norms:
                m = self._norm(ctx, m, p + "post_ffw_norm.weight")
            h = ggml.ggml_add(ctx, h, m)
        if not self.is_last:
            return b.finish(h, (total, d))
        if pool is not None:
            rows, first = (total, 0) if pool == "all" else (1, 0 if pool == "first" else total - 1)
            nb1 = h.contents.nb[1]
            h = ggml.ggml_view_2d(ctx, h, d, rows, nb1, first * nb1) if rows < total else h
            return b.finish(self._norm(ctx, h, "output_norm.weight"), (rows, d))
        rows = total
        if len(slots) == 1 and total > 1 and not all_logits:  # a prompt: its last position
            nb1, rows = h.contents.nb[1], 1
            h = ggml.ggml_view_2d(ctx, h, d, 1, nb1, (total - 1) * nb1)
        h = self._norm(ctx, h, "output_norm.weight")
        h = ggml.ggml_mul_mat(ctx, w("token_embd.weight" if self.tied else "output.weight"), h)
        if s.final_softcap is not None:
            c = s.final_softcap
            h = ggml.ggml_scale(ctx, ggml.ggml_tanh(ctx, ggml.ggml_scale(ctx, h, 1 / c)), c)
        return b.finish(h, (rows, s.vocab_size))

    def _attention(
        self, b: GraphBuilder, x: object, layer: int, i: int, slots: Sequence[Slot]
    ) -> object:
        """Block ``i``'s attention (``layer`` of this stage), x: [d, positions of all slots];
        the projections see every slot's positions, each slot attends over its own cache."""
        s, ctx, w = self.spec, b.ctx, self.weights.get
        p, hd, nh, nkv = f"blk.{i}.", s.head_dim, s.n_heads, s.n_kv_heads
        total, width = x.contents.ne[1], nkv * hd  # type: ignore[attr-defined]
        q = ggml.ggml_mul_mat(ctx, w(p + "attn_q.weight"), x)
        k = ggml.ggml_mul_mat(ctx, w(p + "attn_k.weight"), x)
        v = ggml.ggml_mul_mat(ctx, w(p + "attn_v.weight"), x)
        if s.attn_bias:
            q = ggml.ggml_add(ctx, q, w(p + "attn_q.bias"))
            k = ggml.ggml_add(ctx, k, w(p + "attn_k.bias"))
            v = ggml.ggml_add(ctx, v, w(p + "attn_v.bias"))
        q = ggml.ggml_reshape_3d(ctx, q, hd, nh, total)
        k = ggml.ggml_reshape_3d(ctx, k, hd, nkv, total)
        if s.qk_norm:
            q = self._norm(ctx, q, p + "attn_q_norm.weight")
            k = self._norm(ctx, k, p + "attn_k_norm.weight")
        base, scale = s.layer_rope(i)
        mode = 0 if s.rope_traditional else ggml.GGML_ROPE_TYPE_NEOX
        rope = (s.rope_dim, mode, s.context_length, base, scale, 0.0, 1.0, 32.0, 1.0)
        pos, freqs = b.tensor("pos"), w("rope_freqs.weight")
        q = ggml.ggml_rope_ext(ctx, q, pos, freqs, *rope)
        if s.arch in PRESCALED_QUERIES:
            q = ggml.ggml_scale(ctx, q, s.scale)
        k = ggml.ggml_reshape_2d(ctx, ggml.ggml_rope_ext(ctx, k, pos, freqs, *rope), width, total)
        outs, c0 = [], 0
        for j, (cache, T, n_kv) in enumerate(slots):
            cols = (
                (q, k, v)
                if len(slots) == 1
                else (
                    ggml.ggml_view_3d(ctx, q, hd, nh, T, q.contents.nb[1], q.contents.nb[2],
                                      c0 * q.contents.nb[2]),
                    ggml.ggml_view_2d(ctx, k, width, T, k.contents.nb[1], c0 * k.contents.nb[1]),
                    ggml.ggml_view_2d(ctx, v, width, T, v.contents.nb[1], c0 * v.contents.nb[1]),
                )
            )  # fmt: skip
            mask = b.tensor(f"mask_swa{j}" if s.is_sliding(i) else f"mask{j}")
            outs.append(self._attend(b, j, layer, *cols, T, n_kv, cache.capacity, mask))
            c0 += T
        o = outs[0]
        for more in outs[1:]:
            o = ggml.ggml_concat(ctx, o, more, 1)
        return ggml.ggml_mul_mat(ctx, w(p + "attn_output.weight"), o)

    def _attend(
        self, b: GraphBuilder, j: int, layer: int, q: object, k: object, v: object,
        T: int, n_kv: int, cap: int, mask: object,
    ) -> object:  # fmt: skip
        """One slot's attention: write its k, v [width, T] at its rows of the cache, then
        q [hd, nh, T] attends over the cache's n_kv positions; returns [hd * nh, T].

        Keys are cached [width, positions]; values the same with flash attention, else
        transposed as llama.cpp keeps them (a row of positions per channel, written element
        by element)."""
        s, ctx = self.spec, b.ctx
        hd, nh, nkv = s.head_dim, s.n_heads, s.n_kv_heads
        width = nkv * hd
        keys = b.cached(j, layer, 0, (width, n_kv))
        b.expand(ggml.ggml_set_rows(ctx, keys, k, b.tensor(f"rows{j}")))
        qp = ggml.ggml_permute(ctx, q, 0, 2, 1, 3)  # [hd, T, nh]
        kq_scale = 1.0 if s.arch in PRESCALED_QUERIES else s.scale
        kview = ggml.ggml_view_3d(ctx, keys, hd, n_kv, nkv, width * 2, hd * 2, 0)
        if self.flash_attn:
            values = b.cached(j, layer, 1, (width, n_kv))
            b.expand(ggml.ggml_set_rows(ctx, values, v, b.tensor(f"rows{j}")))
            vview = ggml.ggml_view_3d(ctx, values, hd, n_kv, nkv, width * 2, hd * 2, 0)
            o = ggml.ggml_flash_attn_ext(ctx, qp, kview, vview, mask, kq_scale, 0.0, 0.0)
            ggml.ggml_flash_attn_ext_set_prec(o, ggml.GGML_PREC_F32)
            return ggml.ggml_reshape_2d(ctx, o, hd * nh, T)
        values = b.cached(j, layer, 1, (1, width * cap))
        v = v if ggml.ggml_is_contiguous(v) else ggml.ggml_cont(ctx, v)
        flat = ggml.ggml_reshape_2d(ctx, v, 1, width * T)
        b.expand(ggml.ggml_set_rows(ctx, values, flat, b.tensor(f"v_rows{j}")))
        kq = ggml.ggml_soft_max_ext(ctx, ggml.ggml_mul_mat(ctx, kview, qp), mask, kq_scale, 0.0)
        vview = ggml.ggml_view_3d(ctx, values, n_kv, hd, nkv, cap * 2, cap * hd * 2, 0)
        o = ggml.ggml_permute(ctx, ggml.ggml_mul_mat(ctx, vview, kq), 0, 2, 1, 3)
        return ggml.ggml_cont_2d(ctx, o, hd * nh, T)

    def _norm(self, ctx: object, x: object, name: str) -> object:
        norm = ggml.ggml_rms_norm(ctx, x, self.spec.rms_eps)
        return ggml.ggml_mul(ctx, norm, self.weights.get(name))

    # ---- compute ----------------------------------------------------------------------
    def _run(
        self, xs: Sequence[np.ndarray], caches: Sequence[GgmlKV], all_logits: bool,
        pool: str | None = None,
    ) -> list:  # fmt: skip
        """One graph run: positions ``xs[j]`` of the sequence of ``caches[j]``, for each j
        (reserved, committed by the caller); each one's output rows."""
        slots = [
            (cache, x.shape[0], attended(cache.offset + x.shape[0], self.max_context))
            for x, cache in zip(xs, caches, strict=True)
        ]
        g = self._graph(slots, all_logits, pool)
        try:
            _set_inputs(g.inputs, xs, caches, self.spec.sliding_window)
            out = g.compute(self.backend)
        finally:
            if any(T != 1 for _, T, _ in slots):
                g.free()
        if not self.is_last:
            out = leaving(out, self.hidden_dtype, self.spec.boundary_scale)
        if len(xs) == 1:
            return [out]
        return [out[j : j + 1] for j in range(len(xs))]  # one position each

    def forward(
        self,
        seq_id: str,
        x: np.ndarray,
        *,
        all_logits: bool = False,
        each: Callable[[np.ndarray], object] | None = None,
    ) -> np.ndarray:
        """``each`` (last stage): every position's logits are handed to it pass by pass
        (rows bounded by logprobs.rows_per_pass) and only the last position's returned."""
        check_seq_id(seq_id)
        x = self._check_input(x)
        T = x.shape[0]
        scoring = each is not None and self.is_last
        every = all_logits or scoring
        step = rows_per_pass(self.spec.vocab_size, PREFILL_CHUNK) if scoring else PREFILL_CHUNK
        with self._lock:
            cache = self._reserve(seq_id, T)
            outs = []
            for s in range(0, T, step):
                chunk = x[s : s + step]
                out = self._run([chunk], [cache], every)
                cache.commit(chunk.shape[0])
                if each is not None and scoring:
                    each(out[0])
                    out = [out[0][-1:]]
                outs += out
        if self.is_last:
            return np.concatenate(outs) if all_logits and not scoring else outs[-1][-1]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _final_states(self, x: np.ndarray, cache: GgmlKV, rows: str) -> np.ndarray:
        out = self._run([x], [cache], False, rows)[0]
        cache.commit(x.shape[0])
        return out

    @property
    def batches(self) -> bool:
        """Whether ``forward_batch`` computes its steps together: yes."""
        return True

    def forward_batch(
        self, steps: Sequence[tuple[str, np.ndarray]]
    ) -> list[np.ndarray | Exception]:
        """One position each of several sequences: ``forward``'s result for each, or the
        exception ``forward`` would have raised for it (the others still run). They go
        through every projection together (each weight read once for all), each attends
        over its own cache."""
        out: list[np.ndarray | Exception | None] = [None] * len(steps)
        with self._lock:
            taken, rows, caches = self._admit_steps(steps, out)
            results: list[np.ndarray] = []
            for a in range(0, len(rows), MAX_BATCH):
                results += self._run(rows[a : a + MAX_BATCH], caches[a : a + MAX_BATCH], False)
            for cache in caches:
                cache.commit(1)
        for i, y in zip(taken, results, strict=True):
            out[i] = y[0] if self.is_last else y
        return out  # type: ignore[return-value]  # every None was replaced

    def close(self) -> None:
        """Free ggml's memory (graphs, backend, weight buffers); the stage is unusable after."""
        graphs, self._graphs = getattr(self, "_graphs", {}), OrderedDict()
        for g in graphs.values():
            g.free()
        if getattr(self, "backend", None) is not None:
            ggml.ggml_backend_free(self.backend)
            self.backend = None
        if getattr(self, "weights", None) is not None:
            self.weights.free()

    def __del__(self) -> None:
        self.close()


def _zeros(n: int, dtype: type = np.int32) -> np.ndarray:
    return np.zeros(n, dtype)


def _set_inputs(
    inp: dict[str, np.ndarray], xs: Sequence[np.ndarray], caches: Sequence[GgmlKV], window: int
) -> None:
    """A run's inputs: the positions of each slot (from its cache's offset), the cache rows
    they are written to, its masks."""
    inp["x"][...] = xs[0] if len(xs) == 1 else np.concatenate(xs)
    c0 = 0
    for j, (x, cache) in enumerate(zip(xs, caches, strict=True)):
        T = x.shape[0]
        pos = np.arange(cache.offset, cache.offset + T, dtype=np.int32)
        inp["pos"][c0 : c0 + T] = pos
        inp[f"rows{j}"][:] = pos
        if f"v_rows{j}" in inp:  # V transposed: element (t, c) goes to c * capacity + position
            chan = np.arange(cache.width, dtype=np.int64) * cache.capacity
            inp[f"v_rows{j}"][:] = (pos[:, None] + chan[None]).reshape(-1)
        qpos, kpos = pos[:, None], np.arange(inp[f"mask{j}"].shape[1])[None]
        causal = kpos <= qpos
        inp[f"mask{j}"][:] = -np.inf
        inp[f"mask{j}"][:T] = np.where(causal, 0.0, -np.inf)
        if f"mask_swa{j}" in inp:  # llama.cpp: key p0 is hidden from p1 when p1 - p0 >= window
            inp[f"mask_swa{j}"][:] = -np.inf
            inp[f"mask_swa{j}"][:T] = np.where(causal & (qpos - kpos < window), 0.0, -np.inf)
        c0 += T


def _as_float32(t: TensorData) -> np.ndarray:
    """A small (1-D) tensor as float32: F16/BF16 directly; any other type through the MLX
    loader (quantized norms are rare, and only then is MLX imported)."""
    raw = np.asarray(t.data)
    if t.ggml_type == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32)
    if t.ggml_type == GGMLType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    from .quant import load_tensor

    return np.array(load_tensor(t).dequantize(), np.float32)
