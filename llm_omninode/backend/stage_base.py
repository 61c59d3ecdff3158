"""What every stage engine shares (engine.Stage, ggml_stage.GgmlStage): its sequences' KV
caches under one lock, the checks on a step's input, and the form hidden states leave in.
An engine supplies ``spec``, ``is_first``, ``_lock`` and ``_caches`` (a sequence table with
ids/free/evict_idle/position/adopt/get/keep) and computes; the rest is here, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .pooling import Pooler
from .sequences import SequenceLimitError
from .spec import ModelSpec

MAX_SEQ_ID_LEN = 256


class SequenceStage:
    spec: ModelSpec
    is_first: bool
    is_last: bool
    prefill_chunk: int  # positions one run of a long prompt computes (bounds its buffers)
    _lock: threading.Lock
    _caches: Any

    # ---- sequences ----------------------------------------------------------------------
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

    def _reserve(self, seq_id: str, n: int) -> Any:
        """The sequence's cache with room for ``n`` more positions (held under ``_lock``);
        ContextOverflowError or SequenceLimitError before anything changes."""
        cache = self._caches.get(seq_id)
        cache.reserve(n)
        self._caches.keep(seq_id, cache)
        return cache

    # ---- embeddings ---------------------------------------------------------------------
    def embed(self, seq_id: str, x: np.ndarray, pooler: Pooler) -> None:
        """Run ``x`` (the sequence's next positions, as ``forward``) on the last stage and
        hand their final-norm states to ``pooler`` a chunk at a time: what it keeps is the only
        state held past a chunk."""
        if not self.is_last:
            raise ValueError("only the last stage pools an embedding")
        check_seq_id(seq_id)
        x = self._check_input(x)
        with self._lock:
            cache = self._reserve(seq_id, x.shape[0])
            for s in range(0, x.shape[0], self.prefill_chunk):
                chunk = x[s : s + self.prefill_chunk]
                pooler.add(self._final_states(chunk, cache, pooler.rows()), chunk.shape[0])

    def _final_states(self, x: np.ndarray, cache: Any, rows: str) -> np.ndarray:
        """The engine's run of ``x`` (one chunk, committed to ``cache``): the final-norm
        states of its rows "all", "first" or "last", float32 (rows, d_model)."""
        raise NotImplementedError

    # ---- inputs -------------------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        """Token ids (T,) as int32 on the first stage; hidden states (T, d_model) as float32
        elsewhere (float16 ones arrive times ``spec.boundary_scale``)."""
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
        if x.dtype == np.float16:  # h * boundary_scale, rounded (a power of two: exact)
            return x.astype(np.float32) / np.float32(self.spec.boundary_scale)
        if x.dtype != np.float32:
            raise ValueError(f"hidden states must be float32 or float16, got {x.dtype}")
        return x

    def _admit_steps(
        self, steps: Sequence[tuple[str, np.ndarray]], out: list
    ) -> tuple[list[int], list[np.ndarray], list[Any]]:
        """``forward_batch``'s intake, under ``_lock``: the steps that can run (their indexes,
        checked inputs and reserved caches); each refused one's exception goes to ``out``."""
        taken: list[int] = []
        rows: list[np.ndarray] = []
        caches: list[Any] = []
        seen: set[str] = set()
        for i, (seq_id, x) in enumerate(steps):
            try:
                check_seq_id(seq_id)
                x = self._check_input(x)
                if x.shape[0] != 1 or seq_id in seen:
                    raise ValueError("a batched step is one position of a distinct sequence")
                caches.append(self._reserve(seq_id, 1))
            except (ValueError, SequenceLimitError) as exc:
                out[i] = exc
                continue
            taken.append(i)
            rows.append(x)
            seen.add(seq_id)
        return taken, rows, caches


def leaving(h: np.ndarray, dtype: np.dtype, scale: float) -> np.ndarray:
    """Hidden states as they cross to the next stage: float32 as they are, or float16 of
    h * scale (a power of two that keeps gemma's large residual stream in range)."""
    if dtype == np.float32:
        return h.astype(np.float32, copy=False)
    return (h * np.float32(scale)).astype(np.float16)


def check_seq_id(seq_id: object) -> None:
    if not isinstance(seq_id, str) or not 0 < len(seq_id) <= MAX_SEQ_ID_LEN:
        raise ValueError(f"seq_id must be a non-empty string of <= {MAX_SEQ_ID_LEN} chars")


def result_or_error(fn: Callable[..., np.ndarray], *args: object) -> np.ndarray | Exception:
    try:
        return fn(*args)
    except (ValueError, SequenceLimitError) as exc:
        return exc
