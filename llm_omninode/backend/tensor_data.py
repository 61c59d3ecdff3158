"""A tensor as a stage receives it, whichever engine computes it (no engine imported here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ggml_types import GGMLType


@dataclass(frozen=True)
class TensorData:
    """One tensor as a stage receives it: raw GGUF bytes (a view into a file or shard)."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous axis
    data: np.ndarray  # uint8, exactly tensor_nbytes(ggml_type, shape) bytes
