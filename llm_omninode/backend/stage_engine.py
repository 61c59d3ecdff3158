"""Which engine computes a stage. On Linux (any CPU): ggml's own kernels on the GGUF bytes as
they are (ggml_stage.GgmlStage). Elsewhere (Apple silicon): MLX (engine.Stage).
``OMNI_ENGINE=mlx`` asks for MLX on Linux too (its CPU device: how the Apple path is tested
here). Both take the same arguments and serve the same interface; ``stage_tensors`` gathers what
a stage loads from the shard store."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import settings
from .spec import ModelSpec
from .tensor_data import TensorData

if TYPE_CHECKING:
    from .shards import Manifest
    from .store import ShardStore

log = logging.getLogger("llm_omninode.engine")
ENGINES = ("ggml", "mlx")


def platform_engine() -> str:
    """The engine this platform computes with unless told otherwise."""
    return "ggml" if sys.platform.startswith("linux") else "mlx"


def engine_name() -> str:
    """The engine OMNI_ENGINE asks for if this platform has it, else the platform's."""
    name = settings.engine()
    if name in ("", "default"):
        return platform_engine()
    if name not in ENGINES:
        raise ValueError(f"OMNI_ENGINE={name!r}: expected one of {', '.join(ENGINES)}")
    if name == "ggml" and not sys.platform.startswith("linux"):
        log.warning("OMNI_ENGINE=ggml is for Linux CPUs; using MLX here")
        return "mlx"
    return name


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


def new_stage(
    spec: ModelSpec, tensors: Mapping[str, TensorData], start: int, end: int, **kw: Any
) -> Any:
    """A stage for blocks [start, end) from the engine ``engine_name()`` names."""
    if engine_name() == "ggml":
        from .ggml_stage import GgmlStage

        return GgmlStage(spec, tensors, start, end, **kw)
    from .engine import Stage

    kw.pop("threads", None)  # MLX schedules its own
    kw.pop("kv_bytes", None)  # MLX caches are bounded by sequences and context only
    return Stage(spec, tensors, start, end, **kw)


def preload() -> None:
    """Import the engine now, so the runtime a node measures at start includes it."""
    if engine_name() == "ggml":
        from . import ggml_stage  # noqa: F401
    else:
        from . import engine  # noqa: F401
