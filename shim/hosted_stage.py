"""A stage this node hosts, as the stage host keeps it (shim/stage_host.py): the engine's stage,
what was planned for it, its use and step times, and on a last stage each sequence's end (the
sampler's ``Tail``, or an embedding's ``PoolTail``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_omninode.backend.constraint import TokenTable
from llm_omninode.backend.generate import TokenPicker
from llm_omninode.backend.logprobs import SequenceScorer
from llm_omninode.backend.memory import StageMemory
from llm_omninode.backend.pooling import Pooler
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.net.frames import Frame

STEP_WEIGHT = 0.2  # of the newest decode step in a stage's moving average of step time


@dataclass
class Tail:
    """A sequence's end on its last stage: the sampler (options, seed and penalty history, set
    once when the sequence opened, the history kept from the ids it picks; the answer's
    constraint, if any, advanced the same way) and where each picked id goes: straight to the
    coordinator (shim/pipeline.py ``serve_tail``), or to its queue when the coordinator is
    this node."""

    picker: TokenPicker
    deliver: Callable[[Frame], Awaitable[None]]  # the STEP frame of one picked id
    scorer: SequenceScorer | None = None  # logprobs asked for: SCORES frames instead


@dataclass
class PoolTail:
    """An embedding sequence's end on its last stage (shim/embedding.py): its pooler, fed a
    step at a time, and where the pooled vector goes once the prompt's last piece is in."""

    pooler: Pooler
    deliver: Callable[[Frame], Awaitable[None]]  # the pooled STEP frame


@dataclass
class HostedStage:
    model_id: str
    start: int
    end: int
    spec: ModelSpec
    stage: Any  # stage_engine.new_stage's
    memory: StageMemory  # what was planned for it (weights: their kept size)
    loaded_s: float
    fetched: dict[str, str] = field(default_factory=dict)  # cid -> node it came from
    tails: dict[str, Tail] = field(default_factory=dict)  # last stage: per sequence
    pools: dict[str, PoolTail] = field(default_factory=dict)  # last stage: embedding ones
    active: int = 0  # pipeline links using it now
    steps: int = 0  # pipeline steps computed
    tokens_out: int = 0  # last stage: picked ids sent straight to a coordinator's tail
    # finished sequences whose KV caches are kept for a next turn to reuse, oldest first
    parked: dict[str, float] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    # decode steps waiting for the worker thread, taken together by the next batch (see
    # StageHost.forward); appended on the event loop, taken on the worker, hence the lock
    waiting: list[tuple[str, np.ndarray, asyncio.Future, Callable | None]] = field(
        default_factory=list
    )
    waiting_lock: threading.Lock = field(default_factory=threading.Lock)
    # the worker thread's time for a decode step (one position; a batch of steps is one), an
    # exponential moving average in ms; None until the first step
    ms_per_token: float | None = None
    # last stage: the vocabulary as constraints see it, built at the first constrained sequence
    token_table: asyncio.Future[TokenTable] | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.model_id, self.start, self.end)

    @property
    def weight_bytes(self) -> int:
        return self.memory.weights

    def note_step(self, seconds: float) -> None:
        """Count a decode step's compute time in ``ms_per_token``."""
        ms = seconds * 1000
        last = self.ms_per_token
        self.ms_per_token = ms if last is None else last + STEP_WEIGHT * (ms - last)

    def row(self) -> dict[str, object]:
        return {
            "model": self.model_id,
            "start": self.start,
            "end": self.end,
            "first": self.stage.is_first,
            "last": self.stage.is_last,
            "weight_bytes": self.weight_bytes,
            "planned": self.memory.total,
            "kv_bytes": self.stage.kv_nbytes,  # KV caches held now (planned: memory.kv)
            "sequences": len(self.stage.sequences()),  # KV caches held
            "pickers": len(self.tails),  # last stage: samplers of live sequences
            "parked": len(self.parked),  # finished, kept for prefix reuse
            "steps": self.steps,
            "tokens_out": self.tokens_out,
            "ms_per_token": None if self.ms_per_token is None else round(self.ms_per_token, 3),
        }
