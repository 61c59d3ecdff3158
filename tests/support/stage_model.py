"""A GGUF file opened for engine tests: its spec, its tensors, stages over any split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    def stages(self, bounds: Sequence[int], engine: str = "mlx", **kw: Any) -> list[Any]:
        """Stages for blocks [bounds[0], bounds[1]), [bounds[1], bounds[2]), ... of ``engine``
        (mlx: engine.Stage; ggml: one thread each, as several stages share the machine)."""
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        if engine == "ggml":
            from llm_omninode.backend.ggml_stage import GgmlStage

            return [GgmlStage(self.spec, self.tensors, a, b, threads=1, **kw) for a, b in pairs]
        return [Stage(self.spec, self.tensors, a, b, **kw) for a, b in pairs]
