"""Linear layers over a GGUF weight: quantized (MLX), dense (MLX) or on the host BLAS."""

from __future__ import annotations

import functools
import os
import time

import mlx.core as mx
import numpy as np

from .blas import HostWeight
from .ggml_types import GGMLType
from .quant import QuantizedWeight, Weight, q8_1_activations, round_activations

# From this many positions on, a prefill may dequantize each weight and use a dense matmul
# (BLAS sgemm), when that is faster here than MLX's quantized matmul (see dense_prefill_wins).
DENSE_PREFILL_MIN = 16


@functools.cache
def dense_prefill_wins() -> bool:
    """Whether dequantize + dense matmul beats quantized_matmul for a batch of positions.

    MLX's CPU quantized matmul does not batch well, while its dense matmul goes to whatever
    BLAS the process loaded: with OpenBLAS that is ~8x faster for a prompt, with the reference
    BLAS bundled in the wheel it is slower. So measure once (~0.1 s) instead of guessing.
    OMNI_DENSE_PREFILL=1/0 forces the choice.
    """
    forced = os.environ.get("OMNI_DENSE_PREFILL")
    if forced in ("0", "1"):
        return forced == "1"
    w = mx.random.normal((1024, 1024), key=mx.random.key(0))
    q, s, b = mx.quantize(w, group_size=32, bits=4)
    x = mx.random.normal((64, 1024), key=mx.random.key(1))
    mx.eval(q, s, b, x)

    def best(f: object) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            mx.eval(f())  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return min(times)

    quantized = best(lambda: mx.quantized_matmul(x, q, s, b, group_size=32, bits=4))
    dense = best(lambda: x @ mx.dequantize(q, s, b, group_size=32, bits=4).T)
    return dense < 0.7 * quantized


class Linear:
    """``y = x @ W.T (+ b)`` over a dense or quantized GGUF weight.

    ``act`` is the type ggml converts the activations to before this matmul (see
    ``quant.round_activations``); None computes on the activations as they are.
    """

    def __init__(
        self, weight: Weight, bias: mx.array | None = None, act: GGMLType | None = None
    ) -> None:
        self.weight: Weight | HostWeight = weight
        self.bias = bias
        self.act = act
        self.host_bias: np.ndarray | None = None

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        offsets = None
        if self.act == GGMLType.Q8_1 and getattr(w, "biases", None) is not None:
            x, offsets = q8_1_activations(x)
        elif self.act is not None:
            x = round_activations(x, self.act)
        if isinstance(w, HostWeight):
            y = w.matmul_t(x)
        elif isinstance(w, QuantizedWeight):
            if x.shape[-2] >= DENSE_PREFILL_MIN and dense_prefill_wins():
                y = x @ w.dequantize().T
            else:
                y = w.matmul_t(x)
        else:
            y = x @ w.T
        if offsets is not None:  # see q8_1_activations; biases are Q4_1's per-block m
            y = y + offsets @ w.biases.T  # type: ignore[union-attr]
        return y if self.bias is None else y + self.bias

    def to_host(self) -> None:
        """Move the weight to NumPy's BLAS as dense float32 (see blas.py)."""
        w = self.weight
        if isinstance(w, QuantizedWeight):
            keep = w.biases if self.act == GGMLType.Q8_1 else None
            self.weight = HostWeight.from_dense(w.dequantize(), keep)
        elif isinstance(w, mx.array):
            self.weight = HostWeight.from_dense(w)
        if self.bias is not None:
            self.host_bias = np.array(self.bias.astype(mx.float32))

    def host_apply(self, h: np.ndarray) -> np.ndarray:
        """This layer on float32 NumPy rows (T, in), for a host weight without act rounding."""
        assert isinstance(self.weight, HostWeight) and self.act is None
        y = self.weight.matmul_np(h)
        return y if self.host_bias is None else y + self.host_bias

    @classmethod
    def fused(cls, parts: list[Linear]) -> Linear | None:
        """One Linear computing ``parts`` side by side (fewer matmuls per token), if possible."""
        if len({p.act for p in parts}) != 1:
            return None
        ws = [p.weight for p in parts]
        if all(isinstance(w, QuantizedWeight) for w in ws):
            if len({(w.bits, w.group_size, w.scales.dtype) for w in ws}) != 1:
                return None
            weight: Weight = QuantizedWeight(
                mx.concatenate([w.weight for w in ws]),
                mx.concatenate([w.scales for w in ws]),
                mx.concatenate([w.biases for w in ws]),
                ws[0].bits,
                ws[0].group_size,
                ws[0].ggml_type if len({w.ggml_type for w in ws}) == 1 else None,
            )
        elif all(isinstance(w, mx.array) for w in ws):
            if len({w.dtype for w in ws}) != 1:
                return None
            weight = mx.concatenate(ws)
        elif all(isinstance(w, HostWeight) and w.biases is None for w in ws):
            # on the host every weight is float32, whatever GGUF type it came from
            biases = [p.bias for p in parts]
            with_bias = [p.bias is not None and p.host_bias is not None for p in parts]
            if any(with_bias) and not all(with_bias):
                return None
            host = cls(HostWeight(np.concatenate([w.wt for w in ws], axis=1)), act=parts[0].act)
            if biases[0] is not None:
                host.bias = mx.concatenate(biases)
                host.host_bias = np.concatenate([p.host_bias for p in parts])
            return host
        else:
            return None
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            bias = None
        elif all(b is not None for b in biases):
            bias = mx.concatenate(biases)
        else:
            return None
        return cls(weight, bias, parts[0].act)
