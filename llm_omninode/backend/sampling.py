"""Choosing the next token from a stage's logits (runs on the last stage).

The chain follows llama.cpp's order: repeat penalty over the last ``repeat_last_n`` ids, then
top-k, top-p, min-p, temperature, and a draw from a seeded generator. ``temperature <= 0`` is
greedy (argmax after the penalty). Defaults are Ollama's, since that is the API users bring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np


class SamplingError(ValueError):
    pass


_MAX_INT = 2**64  # wire integers past this are garbage (a seed is < 2**64 anyway)
_FLOAT_OPTIONS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty"})
_STRIDE = 16  # top-k's cutoff is taken from every _STRIDE-th logit (see _top_k)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repeat_penalty <= 100.0, "repeat_penalty must be in (0, 100]"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1 (-1: the whole context)"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be in [0, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)

    @classmethod
    def greedy(cls) -> SamplingOptions:
        """Plain argmax, no penalty: what the llama.cpp reference outputs were made with."""
        return cls(temperature=0.0, repeat_penalty=1.0)

    def to_dict(self) -> dict[str, float | int | None]:
        """Every option by name: JSON-able, read back by ``from_dict``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, doc: object) -> SamplingOptions:
        """Options from a peer's JSON object: known names only, exact types, every range.

        Missing names keep their defaults. Floats may arrive as JSON integers (``1`` for
        ``1.0``); a bool is never a number, and NaN or infinity never a float.
        """
        if not isinstance(doc, dict):
            raise SamplingError("sampling options must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(repr(k)[:40] for k in doc if k not in known)
        if unknown:  # a hostile doc may hold thousands: name a few
            raise SamplingError(f"unknown sampling option(s): {', '.join(unknown[:5])}")
        values: dict[str, float | int | None] = {}
        for name, value in doc.items():
            if name == "seed" and value is None:
                values[name] = None
            elif type(value) is int and abs(value) < _MAX_INT:  # int-valued floats too
                values[name] = float(value) if name in _FLOAT_OPTIONS else value
            elif name in _FLOAT_OPTIONS and type(value) is float and math.isfinite(value):
                values[name] = value
            else:
                kind = "a finite number" if name in _FLOAT_OPTIONS else "an integer"
                raise SamplingError(f"{name} must be {kind}")
        return cls(**values)  # type: ignore[arg-type]  # __post_init__ checks the ranges

    def updated(self, **changes: object) -> SamplingOptions:
        known = {f.name for f in fields(self)}
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = set(given) - known
        if unknown:
            raise SamplingError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return replace(self, **given)  # type: ignore[arg-type]  # checked in __post_init__


class Sampler:
    """One per sequence: holds the seeded generator so a seed gives the same text every time."""

    def __init__(self, options: SamplingOptions) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        o = self.options
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if o.repeat_penalty != 1.0 and history:
            logits = apply_repeat_penalty(logits, history, o.repeat_penalty, o.repeat_last_n)
        if o.temperature <= 0.0:
            return int(np.argmax(logits))
        ids, probs = _candidates(logits, o)
        return int(ids[self._rng.choice(len(ids), p=probs)])


def apply_repeat_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int
) -> np.ndarray:
    """llama.cpp's penalty: divide positive logits, multiply negative ones, once per id."""
    recent = history if last_n < 0 else history[-last_n:] if last_n else ()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < len(logits))]
    if len(ids) == 0:
        return logits
    out = logits.copy()
    chosen = out[ids]
    out[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def _candidates(logits: np.ndarray, o: SamplingOptions) -> tuple[np.ndarray, np.ndarray]:
    """Surviving ids and their probabilities after top-k, top-p, min-p and temperature."""
    k = len(logits) if o.top_k <= 0 else min(o.top_k, len(logits))
    ids = _top_k(logits, k) if k < len(logits) else np.arange(len(logits))
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    values = logits[ids].astype(np.float64)
    probs = _softmax(values)
    if o.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), o.top_p) + 1)
        ids, values, probs = ids[:keep], values[:keep], probs[:keep]
    if o.min_p > 0.0:
        mask = probs >= o.min_p * probs[0]
        ids, values = ids[mask], values[mask]
    probs = _softmax(values / o.temperature)
    return ids, probs


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest logits, in no order. Partitioning a 150k vocabulary is
    most of a sampled step's Python time, so first a cutoff: the k-th largest of every
    _STRIDE-th logit. At least k logits reach it (those k), so the k largest are among the
    logits that do, a few hundred to partition."""
    sample = logits[::_STRIDE]
    if len(sample) >= 4 * k:
        cut = np.partition(sample, len(sample) - k)[len(sample) - k]
        near = np.flatnonzero(logits >= cut)
        if len(near) >= k:  # else NaNs: the whole vocabulary, as below
            return near[np.argpartition(-logits[near], k - 1)[:k]]
    return np.argpartition(-logits, k - 1)[:k]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
