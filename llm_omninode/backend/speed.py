"""How fast this node computes: a calibration at start, the figure planners share work by.

``measure(threads)`` times a quantized matrix product of the kind a stage's decode step is made
of, with the engine this node computes with: a 4-bit (Q4_0) matrix of 2048 x 4096 weights
(4.5 MiB, repacked as a stage's weights are) times one position (a decode step) and times 4 (the
steps of several sequences at once). The figure is billions of weights multiplied a second over
both, the best of many runs in 0.3 s (other work on the machine only ever adds time), rounded to
2 significant figures so that equal machines announce equal figures. On MLX it is the same
product (``mx.quantized_matmul``, 4 bits in groups of 32) in the same units. A node that cannot
measure says 1.0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .stage_engine import engine_name

log = logging.getLogger("llm_omninode.speed")

ROWS, COLS = 2048, 4096  # output x input features of the matrix
BATCH = 4  # positions of the batched product
SECONDS = 0.15  # timing each product: 0.3 s in all, whatever the node
MIN_RUNS, MAX_RUNS = 3, 1000
DEFAULT = 1.0  # what a node that cannot measure announces


def measure(threads: int | None = None, window: float = SECONDS) -> float:
    """This node's speed in billions of weights multiplied a second (see the module
    docstring); ``threads``: the CPU threads a ggml stage computes with (None: its default)."""
    try:
        if engine_name() == "mlx":
            vector, batch = _mlx_products()
            took = _best(vector, window) + _best(batch, window)
        else:
            products = _GgmlProducts(threads)
            try:
                took = _best(products.vector, window) + _best(products.batch, window)
            finally:
                products.close()
    except Exception as exc:  # noqa: BLE001 - a node that cannot measure still runs
        log.warning("could not measure this node's speed (%s): announcing %s", exc, DEFAULT)
        return DEFAULT
    return round_figure(ROWS * COLS * (1 + BATCH) / took / 1e9)


def round_figure(value: float) -> float:
    """``value`` to 2 significant figures; DEFAULT unless positive and finite."""
    if not (math.isfinite(value) and value > 0):
        return DEFAULT
    return float(f"{value:.2g}")


def _best(product: Callable[[], object], seconds: float) -> float:
    """The shortest run of ``product``, timed again and again for ``seconds`` (at least
    MIN_RUNS times, at most MAX_RUNS) after one untimed run: the more runs, the likelier one
    of them had the cores to itself on a machine shared with other work."""
    product()
    best, runs, until = math.inf, 0, time.perf_counter() + seconds
    while runs < MIN_RUNS or (runs < MAX_RUNS and time.perf_counter() < until):
        t0 = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def _q4_0_bytes(rows: int, cols: int) -> np.ndarray:
    """A Q4_0 matrix's GGUF bytes: per 32 weights, a float16 scale then 16 bytes of nibbles
    (values that mean nothing: the time does not depend on them), made without temporaries."""
    blocks = np.empty((rows * cols // 32, 18), np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[:, 2:] = np.arange(16, dtype=np.uint8) * 17  # nibbles 0..15 and 15..0
    return blocks.reshape(-1)


class _GgmlProducts:
    """The matrix, over the bytes of ``_q4_0_bytes``, times one position and times BATCH: one
    graph each, computed on a CPU backend of ``threads``, as a stage's are."""

    def __init__(self, threads: int | None) -> None:
        import ggml

        from .ggml_graph import F32, GraphBuilder, Weights
        from .ggml_stage import default_repack, default_threads

        self.data = _q4_0_bytes(ROWS, COLS)  # a weight not repacked points at these bytes
        self.weights = Weights(1, default_repack())
        weight = self.weights.add("w", ggml.GGML_TYPE_Q4_0, (COLS, ROWS), self.data)
        self.backend = ggml.ggml_backend_cpu_init()
        ggml.ggml_backend_cpu_set_n_threads(self.backend, threads or default_threads())
        self.graphs = []
        for positions in (1, BATCH):
            builder = GraphBuilder(8, [])
            x = builder.input("x", F32, np.ones((positions, COLS), np.float32))
            y = ggml.ggml_mul_mat(builder.ctx, weight, x)
            self.graphs.append(builder.finish(y, (positions, ROWS)))

    def vector(self) -> object:
        return self.graphs[0].compute(self.backend)

    def batch(self) -> object:
        return self.graphs[1].compute(self.backend)

    def close(self) -> None:
        import ggml

        for graph in self.graphs:
            graph.free()
        ggml.ggml_backend_free(self.backend)
        self.weights.free()


def _mlx_products() -> tuple[Callable[[], object], Callable[[], object]]:
    import mlx.core as mx

    w, scales, biases = mx.quantize(mx.ones((ROWS, COLS)) * 0.01, group_size=32, bits=4)
    vector, batch = mx.ones((1, COLS)), mx.ones((BATCH, COLS))
    mx.eval(w, scales, biases, vector, batch)

    def product(x: Any) -> Callable[[], object]:
        def run() -> object:
            y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4)
            mx.eval(y)
            return y

        return run

    return product(vector), product(batch)
