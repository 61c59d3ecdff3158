"""Teacher-forced fidelity against llama.cpp: its top-20 log-probabilities at every position.

The golden files (tests/data/*-teacher.json) hold, for chats (prompt in one batch, then one
token per step along llama.cpp's own greedy continuation) and passages (one batch, logits of
every position), llama.cpp's top 20 log-softmax values and its top1 - top2 logit margin. A
stage pipeline is fed exactly the same tokens, so every position is compared, not only the
first greedy token: where llama.cpp's margin is clear our top token must be its top token, and
the KL divergence over its top 20 says how close the distributions are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).parent.parent / "data"


def golden(name: str) -> dict:
    return json.loads((DATA / f"{name}-teacher.json").read_text())


@dataclass
class Fidelity:
    margins: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def add(self, logits: np.ndarray, ref: dict) -> None:
        x = logits.astype(np.float64)
        logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        ids = np.array([t for t, _ in ref["top"]])
        ref_logp = np.array([v for _, v in ref["top"]])
        p = np.exp(ref_logp)
        self.kl.append(float((p * (ref_logp - logp[ids])).sum()))
        self.margins.append(ref["margin"])
        self.agree.append(int(np.argmax(x)) == int(ids[0]))

    def agreement(self, min_margin: float) -> tuple[int, int]:
        pairs = [a for a, m in zip(self.agree, self.margins, strict=True) if m >= min_margin]
        return sum(pairs), len(pairs)

    @property
    def mean_kl(self) -> float:
        return float(np.mean(self.kl))

    def summary(self) -> str:
        a5, n5 = self.agreement(0.5)
        a1, n1 = self.agreement(0.1)
        return (
            f"{len(self.kl)} positions; top-1 agreement at margin >= 0.5: {a5}/{n5}, "
            f">= 0.1: {a1}/{n1}; mean KL over llama.cpp's top 20: {self.mean_kl:.2e}"
        )


def teacher_forced(
    gold: dict,
    forward: Callable[[str, np.ndarray], np.ndarray],
    forward_all: Callable[[str, np.ndarray], np.ndarray],
    free: Callable[[str], None],
) -> Fidelity:
    """``forward(seq, ids) -> last logits``; ``forward_all(seq, ids) -> (T, vocab)``."""
    fid = Fidelity()
    for i, chat in enumerate(gold["chat"]):
        seq = f"chat{i}"
        logits = forward(seq, np.asarray(chat["prompt_ids"], np.int32))
        for k, step in enumerate(chat["steps"]):
            if k:
                logits = forward(seq, np.asarray(chat["greedy_ids"][k - 1 : k], np.int32))
            fid.add(logits, step)
        free(seq)
    for i, passage in enumerate(gold["passages"]):
        seq = f"passage{i}"
        rows = forward_all(seq, np.asarray(passage["ids"], np.int32))
        for row, ref in zip(rows, passage["positions"], strict=True):
            fid.add(row, ref)
        free(seq)
    return fid


def through_stages(gold: dict, stages: Sequence[Any]) -> Fidelity:
    """``teacher_forced`` through a chain of stages (either engine), each sequence freed after."""

    def forward(seq: str, ids: np.ndarray, **kw: bool) -> np.ndarray:
        x = ids
        for stage in stages[:-1]:
            x = stage.forward(seq, x)
        return stages[-1].forward(seq, x, **kw)

    def free(seq: str) -> None:
        for stage in stages:
            stage.free(seq)

    return teacher_forced(gold, forward, lambda s, x: forward(s, x, all_logits=True), free)
