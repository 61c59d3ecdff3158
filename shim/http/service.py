"""What the HTTP adapters are given, and all they use of the node: ``ApiService``.

The node builds one and hands it to ``ApiServer``; nothing under shim/http/ imports the node or
the coordinator. The model and plan types are described here by the fields the routes read, so
the coordinator's own (``ModelText``, ``PlanState``) fit them as they are.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from llm_omninode.backend.chat_template import ChatTemplate
from llm_omninode.backend.generate import Chunk
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.backend.tokenizer import Tokenizer
from llm_omninode.request import GenerationRequest

from ..load_progress import LoadProgress
from ..planner import Plan
from ..request_log import RequestLog


class Model(Protocol):
    """A model ready to run: what /api/show and /api/ps read of it."""

    manifest: Manifest
    spec: ModelSpec
    tokenizer: Tokenizer
    template: ChatTemplate


class Placement(Protocol):
    """Where a loaded model's stages are."""

    plan: Plan


class HeldStage(Protocol):
    """A stage this node holds (shim/stage_host.py's ``HostedStage`` is one): /api/ps lists
    its model on every node that holds one, coordinator or not."""

    model_id: str
    start: int
    end: int
    last_used: float  # time.monotonic() of its last step

    @property
    def weight_bytes(self) -> int: ...


class ModelRunner(Protocol):
    """Runs models across the cluster (shim/node.py's ``ApiRunner`` is one)."""

    async def resolve(self, name: str) -> Model:
        """The model an alias or model id names, here or on a peer; ModelUnknown if none."""
        ...

    def generate(
        self,
        request: GenerationRequest,
        timings: dict[str, float] | None = None,
        keep_alive: float | None = None,
        progress: Callable[[LoadProgress], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """The request's chunks; ``timings`` receives load_s, prefill_s and decode_s;
        ``progress`` hears the model's load, if it has to be loaded first."""
        ...

    async def load(self, name: str, keep_alive: float | None = None) -> Model: ...

    async def unload(self, name: str) -> bool: ...

    def forget(self, model_id: str) -> None:
        """Drop what is remembered of a model removed from this node."""
        ...

    def loaded(self) -> Sequence[tuple[Model, Placement, float | None]]:
        """Each loaded model, its placement, and when it expires (None: never)."""
        ...

    def alias_of(self, model_id: str) -> str | None: ...


class Embeddings(Protocol):
    """A request's pooled vectors (shim/embedding.py's ``Embedded`` is one)."""

    @property
    def vectors(self) -> list[np.ndarray]: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def load_s(self) -> float: ...


class EmbeddingRunner(Protocol):
    """Embeds inputs over a model's plan (shim/embedding.py's ``Embedder`` is one)."""

    async def embed(
        self,
        name: str,
        inputs: Sequence[str | Sequence[int]],
        *,
        truncate: bool = True,
        keep_alive: float | None = None,
        num_ctx: int | None = None,
    ) -> Embeddings: ...


@dataclass(frozen=True)
class ApiService:
    """The node's side of the HTTP API: the coordinator, this node's models, its peers' names."""

    runner: ModelRunner
    registry: ModelRegistry  # this node's models: aliases, pull, remove, copy; their manifests
    peer_aliases: Callable[[], Awaitable[dict[str, str]]]  # alias -> model id, as peers say
    max_context: int | None = None  # the node's cap on a sequence (--max-context)
    metrics: Callable[[], tuple[bytes, str]] | None = None  # /metrics: text, content type
    snapshot: Callable[[], dict[str, Any]] | None = None  # /ui/events: the cluster page's data
    requests: RequestLog | None = None  # generations seen here (their tokens/s, outcomes)
    held: Callable[[], Sequence[HeldStage]] = tuple  # the stages this node holds now
    embedder: EmbeddingRunner | None = None  # /api/embed, /v1/embeddings


SERVICE_KEY: web.AppKey[ApiService] = web.AppKey("service", ApiService)  # handlers find it here
