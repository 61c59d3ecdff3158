"""A model loaded on this machine: tokenizer, chat template and in-process stages.

This is the single-node path (the llm plugin uses it until a shim takes over, and the shim uses
it for the stages it hosts). Stages are chained in-process here; the shim chains them over QUIC.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..request import GenerationRequest
from .chat_template import ChatTemplate
from .constraint import Constraint, Guide, TokenTable
from .generate import Chunk, TokenPicker, generate
from .registry import ModelRecord, ModelRegistry
from .sampling import SamplingOptions
from .shards import Manifest
from .spec import ModelSpec
from .stage_engine import new_stage
from .store import ShardStore
from .tensor_data import TensorData
from .tokenizer import Tokenizer


def stage_tensors(
    store: ShardStore, manifest: Manifest, start: int, end: int, model_id: str | None = None
) -> dict[str, TensorData]:
    """The tensors a stage for blocks [start, end) loads, as zero-copy views from the store."""
    tensors: dict[str, TensorData] = {}
    for shard in manifest.shards_for_stage(start, end):
        views = store.tensor_views(shard, model_id)
        for entry in shard.tensors:
            tensors[entry.name] = TensorData(
                entry.name, entry.ggml_type, entry.shape, views[entry.name]
            )
    return tensors


def even_split(n_blocks: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges of nearly equal size (the shim's planner weighs by memory)."""
    if not 1 <= n_stages <= n_blocks:
        raise ValueError(f"cannot split {n_blocks} blocks into {n_stages} stages")
    bounds = [round(i * n_blocks / n_stages) for i in range(n_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def prompt_ids(
    tokenizer: Tokenizer, template: ChatTemplate, request: GenerationRequest
) -> list[int]:
    """Template (unless raw) and tokenize; special tokens in the template are parsed."""
    if request.raw:
        text = request.prompt or ""
    else:
        text = template.render(request.chat_messages(), add_generation_prompt=True)
    bos = tokenizer.bos_id
    # a template that writes the BOS text itself must not get a second one
    bos_text = tokenizer.token_bytes(bos).decode("utf-8", "replace") if bos else ""
    add_special = not (bos_text and text.startswith(bos_text))
    return tokenizer.encode(text, add_special=add_special, parse_special=True)


@dataclass
class LocalModel:
    record: ModelRecord
    spec: ModelSpec
    tokenizer: Tokenizer
    template: ChatTemplate
    stages: list[Any]  # stage_engine.new_stage's (ggml on Linux, else MLX)
    pickers: dict[str, TokenPicker] = field(default_factory=dict)
    table: TokenTable | None = None  # built at the first constrained request

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
        return self.pickers[seq_id].pick(self.forward(seq_id, ids))

    def guide(self, constraint: Constraint) -> Guide:
        """A sequence's guide of ``constraint`` (ConstraintError if it cannot be followed)."""
        if self.table is None:
            self.table = TokenTable(self.tokenizer, self.spec.vocab_size)
        return self.table.guide(constraint)

    def free(self, seq_id: str) -> None:
        self.pickers.pop(seq_id, None)
        for stage in self.stages:
            stage.free(seq_id)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_ids(self.tokenizer, self.template, request)

    def run(self, request: GenerationRequest) -> Iterator[Chunk]:
        ids = self.prompt_ids(request)
        guide = None if request.constraint is None else self.guide(request.constraint)
        return generate(
            functools.partial(self.next_token, guide=guide),
            self.tokenizer,
            ids,
            options=request.options,
            max_tokens=request.max_tokens,
            stop=request.stop,
            context_length=self.context_length,
            free=self.free,
            seq_id=uuid.uuid4().hex,
        )
