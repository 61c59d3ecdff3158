"""Quantized weights kept as bytes on the host, multiplied by a compiled matvec (Numba).

A decode step is a chain of matrix-vector products, and on a CPU those are bound by memory
bandwidth: as float32 (blas.HostWeight) SmolLM2 reads ~540 MB of weights per token. Every
4- and 8-bit GGUF type that MLX keeps as affine groups (``w = scale * q + offset``, q
unsigned) is kept here as one byte per weight instead, with per-group scales and offsets
(~1.25 bytes a weight, a third of float32's traffic), and the product is taken on the
groups directly:

    y[r] = sum_g ( scale[g, r] * sum_{j in g} q[j, r] * x[j]  +  offset[g, r] * sum_{j in g} x[j] )

which is exactly ``x @ W.T`` for the dequantized W, up to float32 summation order. MLX's own
CPU quantized matmul is a scalar loop (~20x slower) and NumPy has no such kernel, so this one
is compiled by Numba. The weight is stored transposed (q[j, r]): the innermost loop then runs
over contiguous output rows and vectorises without any horizontal sum.

Several rows of activations (a batch of sequences' decode steps) read each weight byte once;
every row's result is computed by the same operations in the same order whatever the batch
size, so batching does not change a sequence's numbers (up to KERNEL_MAX_ROWS rows). Longer
inputs (prompts) dequantize the matrix into a reused float32 buffer and go to NumPy's BLAS
sgemm, which wins there.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .blas import threads_for

# Up to this many rows the compiled kernel runs; beyond, dequantize + sgemm (measured on a
# 2-core x86-64: the kernel is ~4x sgemm's speed at 1 row and breaks even at ~8).
KERNEL_MAX_ROWS = 8


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (OMNI_QMATVEC=0 turns this path off)."""
    if os.environ.get("OMNI_QMATVEC", "1") == "0":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _matvec(qt, scales, offsets, x, xsum, y, acc):  # noqa: ANN001, ANN202 - compiled below
    """y = x @ W.T for rows x (m, cols), W as packed; acc is (m, rows) scratch."""
    cols, rows = qt.shape
    m = x.shape[0]
    group = cols // scales.shape[0]
    y[:, :] = 0.0
    for g in range(scales.shape[0]):
        acc[:, :] = 0.0
        for j in range(g * group, (g + 1) * group):
            for i in range(m):
                xj = x[i, j]
                for r in range(rows):
                    acc[i, r] += np.float32(qt[j, r]) * xj
        for i in range(m):
            xg = xsum[i, g]
            for r in range(rows):
                y[i, r] += scales[g, r] * acc[i, r] + offsets[g, r] * xg


def _dequantize(qt, scales, offsets, out):  # noqa: ANN001, ANN202 - compiled below
    cols, rows = qt.shape
    group = cols // scales.shape[0]
    for j in range(cols):
        g = j // group
        for r in range(rows):
            out[j, r] = scales[g, r] * np.float32(qt[j, r]) + offsets[g, r]


@functools.cache
def _kernels():  # noqa: ANN202 - Numba dispatchers
    """The two kernels compiled (or loaded from Numba's on-disk cache), on first use."""
    from numba import njit

    # "contract" lets LLVM fuse multiply-adds; nothing is reassociated, so the order of
    # every sum is the one written above
    opts: dict[str, Any] = {"nogil": True, "boundscheck": False, "fastmath": {"contract"}}
    try:
        return tuple(njit(cache=True, **opts)(f) for f in (_matvec, _dequantize))
    except RuntimeError:  # no writable cache location (a read-only install): compile each run
        return tuple(njit(**opts)(f) for f in (_matvec, _dequantize))


@dataclass(frozen=True)
class PackedWeight:
    """A (rows, cols) affine-quantized matrix as transposed bytes: ``W[r, j] = s*q + o``."""

    qt: np.ndarray  # uint8 (cols, rows), C-contiguous
    scales: np.ndarray  # float32 (cols / group, rows)
    offsets: np.ndarray  # float32 (cols / group, rows)

    def __post_init__(self) -> None:
        cols, rows = self.qt.shape
        if self.qt.dtype != np.uint8 or not self.qt.flags.c_contiguous:
            raise ValueError("qt must be C-contiguous uint8")
        n = self.scales.shape[0]
        if n < 1 or cols % n or self.scales.shape != (n, rows) or self.offsets.shape != (n, rows):
            raise ValueError(f"scales/offsets {self.scales.shape} do not fit qt {self.qt.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qt.shape[1], self.qt.shape[0])

    @property
    def group(self) -> int:
        return self.qt.shape[0] // self.scales.shape[0]

    @property
    def nbytes(self) -> int:
        return self.qt.nbytes + self.scales.nbytes + self.offsets.nbytes

    @classmethod
    def from_groups(cls, q: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> PackedWeight:
        """From q (rows, cols) integers in 0..255 and per-group (rows, cols / group) constants."""
        return cls(
            np.ascontiguousarray(q.T, dtype=np.uint8),
            np.ascontiguousarray(scales.T, dtype=np.float32),
            np.ascontiguousarray(offsets.T, dtype=np.float32),
        )

    @classmethod
    def concat(cls, parts: list[PackedWeight]) -> PackedWeight | None:
        """One matrix holding ``parts``' rows in turn (a fused q/k/v), if their groups agree."""
        if len({(p.qt.shape[0], p.group) for p in parts}) != 1:
            return None
        return cls(
            np.concatenate([p.qt for p in parts], axis=1),
            np.concatenate([p.scales for p in parts], axis=1),
            np.concatenate([p.offsets for p in parts], axis=1),
        )

    def dequantize(self) -> np.ndarray:
        """The float32 transpose (cols, rows) of the matrix."""
        out = np.empty(self.qt.shape, np.float32)
        _kernels()[1](self.qt, self.scales, self.offsets, out)
        return out

    def matmul_np(self, h: np.ndarray) -> np.ndarray:
        """``h @ W.T`` for float32 rows ``h`` (T, cols)."""
        h = np.ascontiguousarray(h, dtype=np.float32)
        t, cols = h.shape
        if cols != self.qt.shape[0]:
            raise ValueError(f"input has {cols} columns, the weight {self.qt.shape[0]}")
        # the kernel is single-threaded, but attention's small matmuls go to OpenBLAS, whose
        # idle threads would spin on the core another stage's process needs (see blas.py)
        threads_for(t)
        if t > KERNEL_MAX_ROWS:
            return h @ self._scratch_dense()
        y = np.empty((t, self.qt.shape[1]), np.float32)
        xsum = h.reshape(t, -1, self.group).sum(axis=-1, dtype=np.float32)
        _kernels()[0](self.qt, self.scales, self.offsets, h, xsum, y, _accumulator(t, y.shape[1]))
        return y

    def _scratch_dense(self) -> np.ndarray:
        """This matrix dequantized into a per-thread buffer, reused across calls and layers."""
        buf = _scratch(self.qt.size)[: self.qt.size].reshape(self.qt.shape)
        _kernels()[1](self.qt, self.scales, self.offsets, buf)
        return buf


_local = threading.local()


def _accumulator(m: int, rows: int) -> np.ndarray:
    size = m * rows
    acc = getattr(_local, "acc", None)
    if acc is None or acc.size < size:
        acc = _local.acc = np.empty(size, np.float32)
    return acc[:size].reshape(m, rows)


def _scratch(size: int) -> np.ndarray:
    buf = getattr(_local, "dense", None)
    if buf is None or buf.size < size:
        buf = _local.dense = np.empty(size, np.float32)
    return buf
