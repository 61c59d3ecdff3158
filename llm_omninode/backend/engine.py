"""A stage: a contiguous slice of transformer blocks executed with MLX.

The first stage also embeds token ids; the last also applies the final norm and the output
projection. Between stages hidden states travel as ``hidden_dtype`` (T, d_model): float32
(what a shim uses: any split then computes bit for bit what one stage does) or float16;
inside a stage the compute dtype is float32 by default, and the model is computed as written
(it agrees with a float64 forward to ~1e-4). Weights are held at about their GGUF size
(quant.py) and the blocks are blocks.Block, one for every architecture. This is the engine on
Apple silicon; on Linux it runs on MLX's CPU device (ggml_stage.GgmlStage is the Linux engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

from .blocks import Block, Loader
from .kv_cache import ContextOverflowError, KVCache, SequenceCaches, SequenceLimitError
from .linear import Linear
from .logprobs import rows_per_pass
from .quant import TensorData, Weight
from .spec import ModelSpec
from .stage_base import SequenceStage, check_seq_id, result_or_error

__all__ = ["ContextOverflowError", "Linear", "SequenceLimitError", "Stage", "TensorData"]

# Long prompts are run through the blocks in chunks so attention scores stay bounded
# (T x T per head); the result is the same as one pass, the caller still makes one call.
PREFILL_CHUNK = 512


class Stage(SequenceStage):
    """Blocks [start, end) of a model, with a KV cache per sequence.

    ``forward(seq_id, x)`` takes int32 token ids (T,) on the first stage, hidden states
    (T, d_model) otherwise: float32, or float16 times ``spec.boundary_scale`` (so that gemma's
    large residual stream fits float16). It returns hidden states as ``hidden_dtype`` (the
    same two forms), or on the last stage float32 logits (vocab,) of the last position (of
    every position with ``all_logits=True``: (T, vocab)).
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
        dtype: mx.Dtype = mx.float32,
        kv_dtype: mx.Dtype = mx.float16,
        hidden_dtype: type = np.float16,
        scale_dtype: mx.Dtype = mx.float16,
    ) -> None:
        if not 0 <= start < end <= spec.n_blocks:
            raise ValueError(f"bad block range [{start}, {end}) for {spec.n_blocks} blocks")
        if max_context is not None and max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):
            raise ValueError(f"compute dtype must be a float type, got {dtype}")
        # what a stage's hidden states leave as: float32 unrounded (any split then computes
        # what one stage does), or float16 of h * spec.boundary_scale (half the bytes)
        self.hidden_dtype = np.dtype(hidden_dtype)
        if self.hidden_dtype not in (np.float16, np.float32):
            raise ValueError(f"hidden states cross as float16 or float32, not {hidden_dtype}")
        self.spec = spec
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == spec.n_blocks
        self.dtype = dtype
        self.max_context = max_context or spec.context_length
        d = spec.d_model
        # quantization constants: float16 keeps weights at about their GGUF size, float32 gives
        # ggml's values exactly (they differ only for K-quants, see quant.py)
        w = Loader(tensors, dtype, scale_dtype)

        rope_freqs = None
        if spec.rope_freq_factors:
            # llama.cpp divides each frequency by its factor; MLX's freqs are periods
            factors = w.dense("rope_freqs.weight", (spec.rope_dim // 2,)).astype(mx.float32)
            exps = mx.arange(0, spec.rope_dim, 2, dtype=mx.float32) / spec.rope_dim
            rope_freqs = mx.power(spec.rope_base, exps) * factors

        embedding = "token_embd.weight", (d, spec.vocab_size)
        self.embedding: Weight | None = w.weight(*embedding) if self.is_first else None
        self.blocks = [Block(spec, w, i, rope_freqs) for i in range(start, end)]
        self.output_norm: mx.array | None = None
        self.output: Linear | None = None
        if self.is_last:
            self.output_norm = w.dense("output_norm.weight", (d,))
            if spec.tied_embedding or "output.weight" not in tensors:
                self.output = Linear(w.weight(*embedding))  # the same table, loaded once
            else:
                self.output = w.linear(["output"], d, [spec.vocab_size])
        mx.eval(w.arrays())
        self.nbytes = w.nbytes  # bytes of weights held, shared arrays counted once
        self._caches = SequenceCaches(
            max_sequences,
            n_layers=end - start,
            n_kv_heads=spec.n_kv_heads,
            head_dim=spec.head_dim,
            max_len=self.max_context,
            dtype=kv_dtype,
        )
        self._lock = threading.Lock()

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the KV caches held now."""
        with self._lock:
            return self._caches.nbytes

    # ---- compute --------------------------------------------------------------------------
    def _embed(self, ids: mx.array) -> mx.array:
        assert self.embedding is not None
        h = self.embedding.take_rows(ids).astype(self.dtype)
        if self.spec.embed_scale is not None:
            h = h * self.spec.embed_scale
        return h

    def _softcap(self, logits: mx.array) -> mx.array:
        c = self.spec.final_softcap
        return logits if c is None else mx.tanh(logits / c) * c

    def _run(
        self, x: np.ndarray, cache: KVCache, all_logits: bool, pool: str | None = None
    ) -> mx.array:
        s = self.spec.boundary_scale  # a power of two: scaling is exact
        h = self._embed(mx.array(x)) if self.is_first else mx.array(x).astype(self.dtype)
        h = h[None]
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if not self.is_last:
            if self.hidden_dtype == np.float32:
                return h[0].astype(mx.float32)
            return (h[0] * s).astype(mx.float16)
        if pool is not None:  # the final-norm states a Pooler asked for, not logits
            rows = h[0] if pool == "all" else h[0, :1] if pool == "first" else h[0, -1:]
            return mx.fast.rms_norm(rows, self.output_norm, self.spec.rms_eps).astype(mx.float32)
        assert self.output is not None
        h = mx.fast.rms_norm(h[0] if all_logits else h[0, -1], self.output_norm, self.spec.rms_eps)
        return self._softcap(self.output(h).astype(mx.float32))

    @property
    def batches(self) -> bool:
        """Whether ``forward_batch`` computes its steps together: no, one by one."""
        return False

    def forward_batch(
        self, steps: Sequence[tuple[str, np.ndarray]]
    ) -> list[np.ndarray | Exception]:
        """One position each of several sequences: ``forward``'s result for each, or the
        exception ``forward`` would have raised for it (the others still run)."""
        return [result_or_error(self.forward, seq_id, x) for seq_id, x in steps]

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
                out = self._run(chunk, cache, every)
                mx.eval(out, cache.state())
                cache.commit(chunk.shape[0])
                if each is not None and scoring:
                    each(np.array(out))
                    out = out[-1]
                outs.append(out)
        if self.is_last and (scoring or not all_logits):
            return np.array(outs[-1])
        return np.array(outs[0] if len(outs) == 1 else mx.concatenate(outs))

    def _final_states(self, x: np.ndarray, cache: KVCache, rows: str) -> np.ndarray:
        out = self._run(x, cache, False, rows)
        mx.eval(out, cache.state())
        cache.commit(x.shape[0])
        return np.array(out)
