"""Linear layers on the host BLAS that NumPy ships, for MLX on a Linux CPU.

The mlx-cpu wheel links the reference BLAS (~2 GFLOP/s sgemm on a 2-core x86-64) and its CPU
quantized matmul is a scalar loop (~1 ms for a 1536x576 4-bit matvec), so a Linux CPU stage
spends nearly all its time in those two. NumPy's wheels bundle a runtime-dispatched OpenBLAS
(~120 GFLOP/s sgemm there, sgemv at memory bandwidth). It cannot be swapped in under MLX (its
symbols are renamed and 64-bit-int), nor can PyPI's cmeel-openblas (0.3.31 is built for
SKYLAKEX only: AVX-512, SIGILL on an AVX2 CPU; it also needs the system's libgfortran.so.5).
So the projections run on the host: quantized weights packed as bytes with a compiled matvec
(qmatvec.py: decode steps at a third of float32's memory traffic, prompts dequantize a matrix
at a time into sgemm), float weights (and every weight when ggml roundings are emulated or
Numba is missing) as float32 NumPy matrices here; with float32 compute the rest of a block
runs in NumPy too (host_step.py).

A float32 copy costs memory (~7x a Q4 weight), so the host is used only while the stage's host
weights fit in ``dense_budget()`` (packed ones count ~1.25-1.5 bytes a weight). Not used on
macOS (MLX has Accelerate and Metal there) nor when MLX's default device is a GPU.
OMNI_BLAS=numpy forces it on, OMNI_BLAS=mlx (or "bundled") off; OMNI_DENSE_MAX_MB sets the
budget; OMNI_QMATVEC=0 keeps quantized weights as float32 too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Without OMNI_DENSE_MAX_MB a stage keeps dense weights only up to min(2 GiB, RAM / 8): the
# shim budgets a stage by its GGUF bytes, so the dense copy must stay a bounded surprise.
# 2 GiB lets a whole Qwen2.5-0.5B (2.1 GB dense, with its 151936-token head) or gemma-3-270m
# (1.1 GB) stage run here; MLX's CPU quantized matmul path is ~5x slower for them.
DEFAULT_BUDGET = 2 << 30
DEFAULT_BUDGET_SHARE = 1 / 8
# Below this many rows a matmul is a (memory-bound) matvec, run on DECODE_THREADS OpenBLAS
# threads (0: all). On an idle 2-core machine all threads reach ~36 tok/s decode for SmolLM2
# against ~28 on one, but with one other busy process they drop to ~12 (OpenBLAS's threads
# wait on each other for a core at every call) while one thread keeps ~28: so one by default,
# OMNI_DECODE_THREADS=0 for a machine known to be idle. Prompts use all threads.
THREADED_MIN_ROWS = 16
DECODE_THREADS = int(os.environ.get("OMNI_DECODE_THREADS", "1"))


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

    def matmul_np(self, h: np.ndarray) -> np.ndarray:
        """``h @ W.T`` for float32 rows ``h`` (T, cols)."""
        threads_for(h.shape[0])
        return h @ self.wt


def wanted(host_bytes: int) -> bool:
    """Whether a stage whose projections take ``host_bytes`` on the host should go there."""
    mode = os.environ.get("OMNI_BLAS", "auto").lower()
    if mode == "numpy":
        return True
    if mode in ("mlx", "bundled") or not available():
        return False
    return host_bytes <= dense_budget()


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
    return min(DEFAULT_BUDGET, int(total * DEFAULT_BUDGET_SHARE))


# ---- NumPy's OpenBLAS thread count -----------------------------------------------------------
_threads = {"now": -1, "max": 0}


def set_max_threads(n: int) -> None:
    """Never run more than ``n`` BLAS threads (0: no limit): several nodes sharing a machine
    each take their share, as busy-waiting OpenBLAS threads of one would stall the others."""
    _threads["max"] = max(0, n)
    _threads["now"] = -1


def threads_for(rows: int) -> None:
    """OpenBLAS threads for a matmul of ``rows`` rows: all for a prompt, DECODE_THREADS for a
    decode step (see THREADED_MIN_ROWS)."""
    set_threads(0 if rows >= THREADED_MIN_ROWS else DECODE_THREADS)


def set_threads(n: int) -> None:
    """Run NumPy's BLAS on ``n`` threads (0: its default), if it is an OpenBLAS we can reach."""
    if n == _threads["now"]:
        return
    control = _openblas_threads()
    if control is not None:
        setter, _, default = control
        want = default if n == 0 else n
        setter(min(want, _threads["max"]) if _threads["max"] else want)
    _threads["now"] = n


@functools.cache
def _openblas_threads() -> tuple[Callable[[int], None], Callable[[], int], int] | None:
    """(set_num_threads, get_num_threads, default count) of the OpenBLAS NumPy loaded, found
    in our own maps."""
    names = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
             "scipy_openblas_set_num_threads", "openblas_set_num_threads")  # fmt: skip
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: this only finds its handle
        except OSError:
            continue
        for name in names:
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("set_", "get_"), None)
            if setter is not None and getter is not None:
                setter.argtypes = [ctypes.c_int]
                getter.restype = ctypes.c_int
                return setter, getter, max(1, getter())
    return None
