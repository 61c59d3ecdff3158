"""Log-probabilities of tokens, reduced on the last stage from its logits.

A row of logits becomes the log-probability of one token (the picked one, or the prompt's
next one when the prompt itself is scored) and the ``k`` most likely tokens with theirs:
the log-softmax of the raw logits, before any repeat penalty, temperature or truncation, as
llama.cpp's server reports probabilities by default and as OpenAI's logprobs describe the
model's distribution. Only these ``k + 1`` pairs per row leave the stage.

``Scores`` holds rows of them as two arrays (column 0: the scored token, then the top ``k``
best first); ``ScoreRows`` is how a stage reduces logits to them in bounded pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's and Ollama's bound on top_logprobs
# floats of logits one pass of the head may hold when every position is scored (32 MiB):
# a long prompt is scored in pieces of this many rows, never all of it at once
LOGITS_BUDGET = 8 * 2**20


def rows_per_pass(vocab_size: int, limit: int) -> int:
    """Positions whose logits fit LOGITS_BUDGET together (at least 1, at most ``limit``)."""
    return max(1, min(limit, LOGITS_BUDGET // max(1, vocab_size)))


@dataclass(frozen=True)
class Scores:
    """Rows of scored tokens: ``ids[r, 0]`` the token scored at row r, ``ids[r, 1:]`` the top
    ``k`` (best first); ``logprobs`` the same shape. int32 and float32."""

    ids: np.ndarray
    logprobs: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape != self.logprobs.shape or self.ids.shape[1] < 1:
            raise ValueError("scores are two arrays of the same shape [rows, 1 + k]")

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1]) - 1

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        return cls(np.concatenate([p.ids for p in parts]),
                   np.concatenate([p.logprobs for p in parts]))  # fmt: skip

    def take(self, start: int, stop: int) -> Scores:
        return Scores(self.ids[start:stop], self.logprobs[start:stop])


_BLOCK = 64  # the top k is looked for among values at least the k-th largest block maximum


def _top(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of ``row`` and their ids, best first (ties: lower id first).

    k distinct blocks have a maximum >= the k-th largest block maximum, so at least k values
    are >= it: only those few are sorted (a full partition of a 50k-256k vocabulary costs
    about ten times more)."""
    n = len(row) // _BLOCK * _BLOCK
    if n // _BLOCK > k:
        maxima = row[:n].reshape(-1, _BLOCK).max(axis=1)
        floor = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
        ids = np.flatnonzero(row >= floor)
    else:
        ids = np.arange(len(row))
    values = row[ids]
    best = np.lexsort((ids, -values))[:k]
    return ids[best], values[best]


@dataclass(frozen=True)
class TokenLogprob:
    """One scored token as the APIs report it: its log-probability and the top ``k``
    alternatives ``(id, logprob)``, best first. A prompt's first token has none (None)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(scores: Scores) -> list[TokenLogprob]:
    out = []
    for ids, lps in zip(scores.ids.tolist(), scores.logprobs.tolist(), strict=True):
        top = tuple(zip(ids[1:], lps[1:], strict=True))
        out.append(TokenLogprob(ids[0], lps[0], top))
    return out


def score_rows(logits: np.ndarray, actual: Sequence[int] | np.ndarray, k: int) -> Scores:
    """Log-softmax of each row of ``logits`` [rows, vocab]: ``actual[r]``'s value and the
    top ``k`` (ties: the lower id first)."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    actual = np.asarray(actual, dtype=np.int64).reshape(-1)
    rows, vocab = x.shape
    if len(actual) != rows or not 0 <= k <= min(MAX_TOP_LOGPROBS, vocab):
        raise ValueError(f"cannot score {rows} rows for {len(actual)} tokens, top {k}")
    if rows and (actual.min() < 0 or actual.max() >= vocab):
        raise ValueError("a scored token is outside the vocabulary")
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(axis=1, dtype=np.float64))
    ids = np.empty((rows, k + 1), dtype=np.int32)
    lps = np.empty((rows, k + 1), dtype=np.float64)
    ids[:, 0] = actual
    lps[:, 0] = x[np.arange(rows), actual]
    if k:
        for r in range(rows):
            ids[r, 1:], lps[r, 1:] = _top(x[r], k)
    lps -= lse[:, None]
    # a logprob is <= 0; rounding may leave a hair above, a dead logit -inf: keep JSON-able
    return Scores(ids, np.clip(lps, -1e30, 0.0).astype(np.float32))


class PromptRows:
    """A last stage's reducer of every position's logits of one prompt step, pass by pass
    (``Stage.forward(..., each=...)``): row r (position ``pos + r``) is scored against the
    prompt's next token; a row whose next token is not the prompt's (the prompt's last, the
    picked one follows it) is dropped here and scored once picked."""

    def __init__(self, pos: int, prompt: np.ndarray, k: int) -> None:
        self.pos, self.prompt, self.k = pos, prompt, k
        self.seen = 0
        self.parts: list[Scores] = []

    def __call__(self, logits: np.ndarray) -> None:
        rows = np.asarray(logits, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        first = self.pos + self.seen
        self.seen += rows.shape[0]
        known = max(0, min(rows.shape[0], len(self.prompt) - 1 - first))
        if known:
            self.parts.append(score_rows(rows[:known], self.prompt[first + 1 : first + 1 + known],
                                         self.k))  # fmt: skip

    def scores(self) -> Scores | None:
        return Scores.concat(self.parts) if self.parts else None


class SequenceScorer:
    """One per sequence on the last stage, when its logprobs were asked for: the top ``k``,
    and with ``prompt`` (echo) the prompt's ids, so that each prompt position is scored
    against the token that follows it."""

    def __init__(self, k: int, prompt: Sequence[int] | None = None) -> None:
        if not 0 <= k <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        self.k = k
        self.prompt = None if prompt is None else np.asarray(prompt, dtype=np.int64)

    def prompt_rows(self, pos: int, rows: int) -> PromptRows | None:
        """The reducer of a step at ``pos`` of ``rows`` positions if some of them are prompt
        positions to score (echo), else None."""
        if self.prompt is None or pos + 1 >= len(self.prompt) or rows < 1:
            return None
        return PromptRows(pos, self.prompt, self.k)

    def picked(self, logits: np.ndarray, token: int) -> Scores:
        return score_rows(logits, [token], self.k)
