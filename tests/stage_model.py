"""A GGUF file opened for engine tests: its spec, its tensors, stages over any split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llm_omninode.backend.engine import Stage, TensorData
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.spec import ModelSpec


class Model:
    """A GGUF file's spec and tensors (zero-copy views; the file stays open for the test)."""

    def __init__(self, path: Path) -> None:
        self.file = open_gguf(path)
        self.spec = ModelSpec.from_metadata(self.file.metadata, self.file.tensors)
        self.tensors = {
            n: TensorData(n, t.ggml_type, t.shape, self.file.tensor_data(n))
            for n, t in self.file.tensors.items()
        }

    def stages(self, bounds: Sequence[int], **kw: object) -> list[Stage]:
        """Stages for blocks [bounds[0], bounds[1]), [bounds[1], bounds[2]), ..."""
        return [
            Stage(self.spec, self.tensors, a, b, **kw)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
