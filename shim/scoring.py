"""Logprobs across the ring: what a sequence's tail asks of its last stage, and what comes back.

When a request asks for logprobs, the tail's opening frame says ``logprobs: k`` (0..20), and
with ``echo: true`` its payload holds the prompt's ids (int32) so the last stage can score each
prompt position against the token after it. The last stage then answers a step with SCORES
frames instead of a token id (llm_omninode/net/frames.py): rows of (token, logprob, top k) from
the step's first position on, at most MAX_SCORE_ROWS a frame, the last frame of an answered
step marked ``pick`` (its last row is the picked token). Without logprobs nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llm_omninode.backend.generate import TokenPicker
from llm_omninode.backend.logprobs import (
    MAX_TOP_LOGPROBS,
    Scores,
    SequenceScorer,
    TokenLogprob,
    token_logprobs,
)
from llm_omninode.net import frames as F
from llm_omninode.net.frames import Frame


class ScoringError(ValueError):
    pass


@dataclass(frozen=True)
class Scoring:
    """A request's logprobs: the top ``k``, and the prompt when it is scored too (echo)."""

    k: int
    echo: tuple[int, ...] | None = None

    def header(self) -> dict[str, object]:
        return {"logprobs": self.k, "echo": self.echo is not None}

    def payload(self) -> bytes:
        return b"" if self.echo is None else np.asarray(self.echo, dtype="<i4").tobytes()

    def scorer(self) -> SequenceScorer:
        return SequenceScorer(self.k, self.echo)


def scoring_from(header: dict, payload: bytes, vocab_size: int, max_context: int):
    """A tail's scorer from its opening frame; None when no logprobs were asked for."""
    k, echo = header.get("logprobs"), header.get("echo", False)
    if k is None:
        if payload or echo:
            raise ScoringError("a tail without logprobs carries no prompt")
        return None
    if type(k) is not int or not 0 <= k <= MAX_TOP_LOGPROBS or type(echo) is not bool:
        raise ScoringError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], echo a bool")
    if not echo:
        if payload:
            raise ScoringError("a prompt travels with echo only")
        return SequenceScorer(k)
    if len(payload) % 4 or not 0 < len(payload) // 4 <= max_context:
        raise ScoringError(f"echo's prompt must be 1..{max_context} int32 ids")
    ids = np.frombuffer(payload, dtype="<i4")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ScoringError("echo's prompt has an id outside the vocabulary")
    return SequenceScorer(k, ids.tolist())


def scored_pick(picker: TokenPicker, scorer: SequenceScorer, logits: np.ndarray) -> Scores:
    """Pick the next token as usual and score it (on the stage's worker thread)."""
    return scorer.picked(logits, picker.pick(logits))


def score_frames(step: int, pos: int, prompt: Scores | None, picked: Scores | None) -> list[Frame]:
    """A step's SCORES frames: the prompt positions it scored (from ``pos`` on), then the
    picked token's row, the last frame marked ``pick`` when there is one."""
    parts = [s for s in (prompt, picked) if s is not None]
    if not parts:
        return []
    rows = Scores.concat(parts) if len(parts) > 1 else parts[0]
    out = []
    for start in range(0, rows.rows, F.MAX_SCORE_ROWS):
        part = rows.take(start, start + F.MAX_SCORE_ROWS)
        last = start + F.MAX_SCORE_ROWS >= rows.rows
        out.append(F.scores_frame(step, pos + start, part.ids, part.logprobs,
                                  last and picked is not None))  # fmt: skip
    return out


class ScoreSink:
    """The coordinator's end: the prompt's scores by position (echo) and the last pick's."""

    def __init__(self, scoring: Scoring, vocab_size: int, prompt: Sequence[int]) -> None:
        self.k, self.vocab_size = scoring.k, vocab_size
        self.ids, self.n_prompt = tuple(prompt), len(prompt)
        self.prompt: dict[int, TokenLogprob] = {}  # position p: the token at p + 1, scored
        self.picked: TokenLogprob | None = None

    def take(self, frame: Frame, step: int) -> int | None:
        """Read one SCORES frame of ``step`` (or of an earlier, unanswered prompt piece);
        the picked id when the frame answers the step. ScoringError if it is not sound."""
        h = frame.header
        try:
            ids, logprobs = F.scores_of(frame)
        except F.FrameError as exc:
            raise ScoringError(str(exc)) from exc
        if h["step"] > step or h["k"] != self.k or ids.max() >= self.vocab_size:
            raise ScoringError(f"scores of step {h['step']} do not fit step {step}")
        rows = token_logprobs(Scores(ids, logprobs))
        if h["pick"] and h["step"] == step:
            self.picked = rows.pop()
            answer: int | None = self.picked.token
        else:
            answer = None
        if rows and h["pos"] + len(rows) >= self.n_prompt:
            raise ScoringError("scores of prompt positions past the prompt")
        for i, row in enumerate(rows):
            self.prompt[h["pos"] + i] = row
        return answer

    def echo(self) -> list[TokenLogprob]:
        """Each prompt token's score (the first has no logprob: nothing comes before it)."""
        none = [TokenLogprob(t, None) for t in self.ids]
        return [none[0], *(self.prompt.get(p, none[p + 1]) for p in range(self.n_prompt - 1))]
