"""``llm embed -m omni/<alias>``: an llm.EmbeddingModel whose texts a shim embeds over the
model's plan (shim/embedding.py), through the plugin's QUIC client (client.py ``embed``).
Vectors come back at unit length, as Ollama's /api/embed returns them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import llm


class OmniEmbeddingModel(llm.EmbeddingModel):
    batch_size = 32  # texts per request to the shim (it takes at most 256)

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.model_id = f"omni/{alias}"

    def __str__(self) -> str:
        return f"OmniNode embeddings: {self.model_id}"

    def embed_batch(
        self, items: Iterable[str | bytes], *, key: str | None = None
    ) -> Iterator[list[float]]:
        from .client import ShimClient, ShimError

        del key  # a shim needs none: this machine's node identity admits it
        texts = [item if isinstance(item, str) else item.decode("utf-8") for item in items]
        if not texts:
            return iter(())
        try:
            with ShimClient.connect() as client:
                return iter(client.embed(self.alias, texts))
        except ShimError as exc:
            raise llm.ModelError(str(exc)) from exc
