"""How a sequence's final hidden states (after the output norm) become one embedding vector.

The kind comes from the GGUF's ``{arch}.pooling_type`` (llama.cpp's codes: 0 none, 1 mean,
2 cls, 3 last, 4 rank). A causal LM has no such key; for it, and for ``none``, the embedding is
the last position's state, as Ollama's runner does (llama.cpp pools nothing there and Ollama
falls back to the last token's embedding). ``rank`` (a reranker's score head) is refused.

A ``Pooler`` takes the states a piece of the prompt at a time (a long prompt reaches the last
stage in pieces, each computed in chunks), keeping only what its kind needs: a running sum for
``mean``, one row for ``cls`` and ``last``; never every position's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

POOLING_CODES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLINGS = ("mean", "cls", "last")  # what a Pooler computes ("none" is "last" here)


class PoolingError(ValueError):
    """A model whose pooling this engine does not compute, or a pooler used wrongly."""


def pooling_of(metadata: Mapping[str, Any]) -> str:
    """The pooling an embedding of this model uses (one of POOLINGS)."""
    arch = metadata.get("general.architecture")
    code = metadata.get(f"{arch}.pooling_type") if isinstance(arch, str) else None
    if code is None:
        return "last"
    if type(code) is not int or code not in POOLING_CODES:
        raise PoolingError(f"unknown pooling_type {code!r}")
    kind = POOLING_CODES[code]
    if kind == "rank":
        raise PoolingError("this model ranks (pooling_type rank): it gives no embeddings")
    return "last" if kind == "none" else kind


def has_pooling(metadata: Mapping[str, Any]) -> bool:
    """Whether the GGUF says how to pool (an embedding model, to Ollama's /api/show)."""
    arch = metadata.get("general.architecture")
    return isinstance(arch, str) and f"{arch}.pooling_type" in metadata


class Pooler:
    """One sequence's embedding, built from its positions' final states in order."""

    def __init__(self, kind: str, width: int) -> None:
        if kind not in POOLINGS:
            raise PoolingError(f"pooling must be one of {POOLINGS}, not {kind!r}")
        self.kind = kind
        self.width = width
        self.count = 0  # positions seen
        self._acc: np.ndarray | None = None  # mean: float64 sum; cls/last: the row

    def rows(self) -> str:
        """Which rows of the next piece the engine must hand over: "all", "first" or "last"."""
        return {"mean": "all", "cls": "first", "last": "last"}[self.kind]

    def add(self, states: np.ndarray, positions: int) -> None:
        """The final states of the next ``positions`` positions: all of them (``rows() ==
        "all"``), else only the one asked for."""
        states = np.asarray(states, np.float32)
        want = positions if self.kind == "mean" else 1
        if positions < 1 or states.shape != (want, self.width):
            raise PoolingError(f"expected states of shape {(want, self.width)}, got {states.shape}")
        if self.kind == "mean":
            total = states.sum(axis=0, dtype=np.float64)
            self._acc = total if self._acc is None else self._acc + total
        elif self.kind == "last" or self._acc is None:  # cls keeps the first position's
            self._acc = states[0].astype(np.float64)
        self.count += positions

    def result(self) -> np.ndarray:
        """The pooled vector, float32 (width,)."""
        if self._acc is None:
            raise PoolingError("no positions were pooled")
        acc = self._acc / self.count if self.kind == "mean" else self._acc
        return acc.astype(np.float32)


def l2_normalized(vec: np.ndarray) -> np.ndarray:
    """``vec`` scaled to unit length as Ollama does (a zero vector stays zero); ValueError if
    it holds NaN or infinity."""
    v = np.asarray(vec, np.float32)
    if not np.isfinite(v).all():
        raise ValueError("embedding contains NaN or Inf values")
    norm = float(np.sqrt(np.sum(v.astype(np.float64) ** 2)))
    return (v / np.float32(max(norm, 1e-12))).astype(np.float32)
