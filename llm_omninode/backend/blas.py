"""Linear layers on the host BLAS that NumPy ships, for MLX on a Linux CPU.

The mlx-cpu wheel links the reference BLAS (~2 GFLOP/s sgemm on a 2-core x86-64) and its CPU
quantized matmul is a scalar loop (~1 ms for a 1536x576 4-bit matvec), so a Linux CPU stage
spends nearly all its time in those two. NumPy's wheels bundle a runtime-dispatched OpenBLAS
(~120 GFLOP/s sgemm there, sgemv at memory bandwidth); it cannot be swapped in under MLX (its
symbols are renamed and 64-bit-int), so instead each projection's weight is dequantized once
into a float32 NumPy matrix and the matmul runs in NumPy; everything else stays in MLX.

It costs memory: float32 is ~7x a Q4 weight (SmolLM2-135M: ~540 MB instead of ~80 MB), so it
is used only while the stage's dense weights fit in ``dense_budget()``. Not used on macOS
(MLX has Accelerate and Metal there) nor when MLX's default device is a GPU.
OMNI_BLAS=numpy forces it on, OMNI_BLAS=mlx (or "bundled") off; OMNI_DENSE_MAX_MB sets the
budget.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Without OMNI_DENSE_MAX_MB, a stage may hold this share of physical memory as dense weights.
DEFAULT_BUDGET_SHARE = 0.25


@dataclass(frozen=True)
class HostWeight:
    """A (rows, cols) weight kept as its float32 transpose in NumPy: ``y = x @ wt``."""

    wt: np.ndarray  # float32 (cols, rows), C-contiguous
    # Q4_1's per-block offsets m, for ggml_numerics' Q8_1 correction (see q8_1_activations)
    biases: mx.array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.wt.shape[1], self.wt.shape[0])

    @property
    def nbytes(self) -> int:
        return self.wt.nbytes + (0 if self.biases is None else self.biases.nbytes)

    @classmethod
    def from_dense(cls, w: mx.array, biases: mx.array | None = None) -> HostWeight:
        dense = np.asarray(w.astype(mx.float32))
        return cls(np.ascontiguousarray(dense.T), biases)

    def matmul_t(self, x: mx.array) -> mx.array:
        """``x @ W.T`` in NumPy's BLAS (this evaluates ``x``), back as an MLX array."""
        dt = x.dtype
        h = np.asarray(x if dt == mx.float32 else x.astype(mx.float32))
        y = h.reshape(-1, h.shape[-1]) @ self.wt
        out = mx.array(y.reshape(*h.shape[:-1], y.shape[-1]))
        return out if dt == mx.float32 else out.astype(dt)


def wanted(dense_bytes: int) -> bool:
    """Whether a stage whose projections hold ``dense_bytes`` as float32 should use HostWeight."""
    mode = os.environ.get("OMNI_BLAS", "auto").lower()
    if mode == "numpy":
        return True
    if mode in ("mlx", "bundled") or not available():
        return False
    return dense_bytes <= dense_budget()


@functools.cache
def available() -> bool:
    """Linux with MLX computing on the CPU (the mlx-cpu wheel)."""
    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu


def dense_budget() -> int:
    """Bytes of float32 weights one stage may keep for the host BLAS."""
    env = os.environ.get("OMNI_DENSE_MAX_MB")
    if env:
        return int(float(env) * 1e6)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return int(total * DEFAULT_BUDGET_SHARE)
