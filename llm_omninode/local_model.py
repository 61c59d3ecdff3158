"""A model run whole in this process: tokenizer, chat template and its stages chained here.

The shim chains the same stages over QUIC; this is the in-process reference its answers are
checked against (tests), a split or not (``splits``).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend.chat_template import ChatTemplate, prompt_ids
from .backend.constraint import Constraint, Guide, TokenTable
from .backend.generate import Chunk, TokenPicker, generate
from .backend.logprobs import Scores, SequenceScorer
from .backend.registry import ModelRecord, ModelRegistry
from .backend.sampling import SamplingOptions
from .backend.spec import ModelSpec
from .backend.stage_engine import new_stage, stage_tensors
from .backend.tokenizer import Tokenizer
from .backend.tool_calls import call_constraint
from .request import GenerationRequest


@dataclass
class LocalModel:
    record: ModelRecord
    spec: ModelSpec
    tokenizer: Tokenizer
    template: ChatTemplate
    stages: list[Any]  # stage_engine.new_stage's (ggml on Linux, else MLX)
    pickers: dict[str, TokenPicker] = field(default_factory=dict)
    table: TokenTable | None = None  # built at the first constrained request
    scorers: dict[str, SequenceScorer] = field(default_factory=dict)  # logprobs asked for
    scored: dict[str, tuple[Scores | None, Scores]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        registry: ModelRegistry,
        name: str,
        *,
        splits: Sequence[tuple[int, int]] | None = None,
        max_context: int | None = None,
    ) -> LocalModel:
        record = registry.get(name)
        manifest = record.manifest
        spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
        tokenizer = Tokenizer.from_metadata(manifest.metadata)
        template = ChatTemplate.from_metadata(manifest.metadata, tokenizer)
        stages = []
        for start, end in splits or [(0, spec.n_blocks)]:
            tensors = stage_tensors(registry.store, manifest, start, end, record.model_id)
            stages.append(new_stage(spec, tensors, start, end, max_context=max_context))
        return cls(record, spec, tokenizer, template, stages)

    @property
    def context_length(self) -> int:
        return min(stage.max_context for stage in self.stages)

    def forward(self, seq_id: str, x: np.ndarray) -> np.ndarray:
        for stage in self.stages:
            x = stage.forward(seq_id, x)
        return x

    def next_token(
        self,
        seq_id: str,
        ids: np.ndarray,
        options: SamplingOptions | None,
        guide: Guide | None = None,
    ) -> int:
        """Run the stages and pick the next id (``options``, and the sequence's ``guide`` if
        its answer is constrained, on the prefill call only)."""
        if options is not None:
            self.pickers[seq_id] = TokenPicker(options, ids.tolist(), guide)
        picker, scorer = self.pickers[seq_id], self.scorers.get(seq_id)
        if scorer is None:
            return picker.pick(self.forward(seq_id, ids))
        last, x = self.stages[-1], ids
        for stage in self.stages[:-1]:
            x = stage.forward(seq_id, x)
        rows = scorer.prompt_rows(last.position(seq_id), len(ids))
        logits = last.forward(seq_id, x, each=rows)
        token = picker.pick(logits)
        self.scored[seq_id] = (rows.scores() if rows else None, scorer.picked(logits, token))
        return token

    def guide(self, constraint: Constraint) -> Guide:
        """A sequence's guide of ``constraint`` (ConstraintError if it cannot be followed)."""
        if self.table is None:
            self.table = TokenTable(self.tokenizer, self.spec.vocab_size)
        return self.table.guide(constraint)

    def free(self, seq_id: str) -> None:
        self.pickers.pop(seq_id, None)
        self.scorers.pop(seq_id, None)
        self.scored.pop(seq_id, None)
        for stage in self.stages:
            stage.free(seq_id)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self.tokenizer, self.template, request)

    def run(self, request: GenerationRequest) -> Iterator[Chunk]:
        ids = self.prompt_ids(request)
        # a forced tool call is constrained as the shim constrains it (its text, not split)
        constraint = request.constraint or call_constraint(self.template, request)
        guide = None if constraint is None else self.guide(constraint)
        seq_id = uuid.uuid4().hex
        if request.logprobs:
            echo = ids if request.echo else None
            self.scorers[seq_id] = SequenceScorer(request.top_logprobs, echo)
        return generate(
            functools.partial(self.next_token, guide=guide),
            self.tokenizer,
            ids,
            options=request.options,
            max_tokens=request.max_tokens,
            stop=request.stop,
            context_length=self.context_length,
            free=self.free,
            seq_id=seq_id,
            scored=(lambda seq: self.scored.pop(seq)) if request.logprobs else None,
            echo=request.echo,
        )
