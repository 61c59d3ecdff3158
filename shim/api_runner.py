"""What the HTTP API runs models with (shim/http/service.py's ``ModelRunner``), over the
models' lifecycle (shim/lifecycle.py) and their generations (shim/generation.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from llm_omninode.backend.generate import Chunk
from llm_omninode.request import GenerationRequest

from .generation import Generations
from .lifecycle import ModelLifecycle
from .load_progress import LoadProgress
from .model_state import ModelText, PlanState


@dataclass(frozen=True)
class ApiRunner:
    """What the HTTP API runs models with (shim/http/service.py's ``ModelRunner``): the models'
    lifecycle, and their generations."""

    lifecycle: ModelLifecycle
    generations: Generations

    async def resolve(self, name: str) -> ModelText:
        return await self.lifecycle.resolve(name)

    def generate(
        self,
        request: GenerationRequest,
        timings: dict[str, float] | None = None,
        keep_alive: float | None = None,
        progress: Callable[[LoadProgress], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        return self.generations.generate(request, timings, keep_alive, progress)

    async def load(self, name: str, keep_alive: float | None = None) -> ModelText:
        return await self.lifecycle.load(name, keep_alive)

    async def unload(self, name: str) -> bool:
        return await self.lifecycle.unload(name)

    def forget(self, model_id: str) -> None:
        self.lifecycle.forget(model_id)

    def loaded(self) -> list[tuple[ModelText, PlanState, float | None]]:
        return self.lifecycle.loaded()

    def alias_of(self, model_id: str) -> str | None:
        return self.lifecycle.alias_of(model_id)
