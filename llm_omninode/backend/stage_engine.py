"""Which engine computes a stage: engine.Stage (MLX; NumPy host steps on a Linux CPU) by
default, or, with ``OMNI_ENGINE=ggml`` on Linux, ggml's own kernels on the GGUF bytes as they
are (ggml_stage.GgmlStage). Both take the same arguments and serve the same interface."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from .quant import TensorData
from .spec import ModelSpec

log = logging.getLogger("llm_omninode.engine")
ENGINES = ("default", "ggml")


def engine_name() -> str:
    """The engine OMNI_ENGINE asks for, if this platform has it (else "default")."""
    name = os.environ.get("OMNI_ENGINE", "").strip().lower() or "default"
    if name not in ENGINES:
        raise ValueError(f"OMNI_ENGINE={name!r}: expected one of {', '.join(ENGINES)}")
    if name == "ggml" and not sys.platform.startswith("linux"):
        log.warning("OMNI_ENGINE=ggml is for Linux CPUs; using the default engine here")
        return "default"
    return name


def new_stage(
    spec: ModelSpec, tensors: Mapping[str, TensorData], start: int, end: int, **kw: Any
) -> Any:
    """A stage for blocks [start, end) from the engine ``engine_name()`` names."""
    if engine_name() == "ggml":
        from .ggml_stage import GgmlStage

        return GgmlStage(spec, tensors, start, end, **kw)
    from .engine import Stage

    return Stage(spec, tensors, start, end, **kw)
