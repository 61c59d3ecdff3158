"""A model as the coordinator holds it (its text side: tokenizer, chat template) and the
state of its plan; plain data, shared by the coordinator and the decode pass."""

from __future__ import annotations

from dataclasses import dataclass

from llm_omninode.backend.chat_template import ChatTemplate
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.backend.tokenizer import Tokenizer

from .planner import Plan


@dataclass
class ModelText:
    """What the coordinator needs of a model besides its stages."""

    manifest: Manifest
    spec: ModelSpec
    tokenizer: Tokenizer
    template: ChatTemplate

    @classmethod
    def of(cls, manifest: Manifest) -> ModelText:
        spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
        tokenizer = Tokenizer.from_metadata(manifest.metadata)
        return cls(
            manifest, spec, tokenizer, ChatTemplate.from_metadata(manifest.metadata, tokenizer)
        )


@dataclass
class PlanState:
    plan: Plan
    nodes: tuple[str, ...]  # the node set it was made for
    ready: bool = False  # every stage confirmed loaded
