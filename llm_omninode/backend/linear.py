"""Linear layers over a GGUF weight: quantized (MLX), dense (MLX) or on the host BLAS."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import qmatvec
from .blas import HostWeight
from .ggml_types import GGMLType
from .qmatvec import PackedWeight
from .quant import (
    QuantizedWeight,
    TensorData,
    Weight,
    q8_1_activations,
    round_activations,
    small_group_weight,
)

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


@dataclass(frozen=True)
class HostStack:
    """Host weights of different kinds side by side (a fused q/k/v of a Q4_K_M mix)."""

    parts: tuple[HostWeight | PackedWeight | HostStack, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def matmul_np(self, h: np.ndarray) -> np.ndarray:
        return np.concatenate([p.matmul_np(h) for p in self.parts], axis=-1)


# what a Linear's weight is once on the host (see Linear.to_host)
HOST_WEIGHTS = (HostWeight, PackedWeight, HostStack)
HostMatrix = HostWeight | PackedWeight | HostStack


def packed(w: QuantizedWeight) -> PackedWeight:
    """``w``'s integers as bytes, with its scales and biases as float32 (see qmatvec.py)."""
    ones = mx.ones(w.scales.shape, dtype=mx.float32)
    q = mx.dequantize(w.weight, ones, mx.zeros_like(ones), group_size=w.group_size, bits=w.bits)
    return PackedWeight.from_groups(
        np.array(q.astype(mx.uint8)),
        np.array(w.scales.astype(mx.float32)),
        np.array(w.biases.astype(mx.float32)),
    )


class Linear:
    """``y = x @ W.T (+ b)`` over a dense or quantized GGUF weight.

    ``act`` is the type ggml converts the activations to before this matmul (see
    ``quant.round_activations``); None computes on the activations as they are.
    """

    def __init__(
        self, weight: Weight, bias: mx.array | None = None, act: GGMLType | None = None
    ) -> None:
        self.weight: Weight | HostMatrix = weight
        self.bias = bias
        self.act = act
        self.host_bias: np.ndarray | None = None
        # a Q6_K/Q3_K/Q2_K tensor's bytes, which MLX holds as float16 but the host can pack;
        # dropped by to_host (or by the stage, without a host) so no input buffer is kept
        self.source: TensorData | None = None

    def _packs(self) -> bool:
        """Whether to_host packs the weight (qmatvec.py) rather than making it float32."""
        w = self.weight
        exact = self.act is None and qmatvec.available()  # ggml roundings need float32
        return exact and (isinstance(w, QuantizedWeight) or self.source is not None)

    def host_nbytes(self) -> int:
        """Bytes the weight will take on the host: ~1.25-1.5 a weight packed, else 4."""
        rows, cols = self.weight.shape
        if not self._packs():
            return 4 * rows * cols
        group = self.weight.group_size if isinstance(self.weight, QuantizedWeight) else 16
        return rows * cols + 8 * rows * cols // group

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight
        offsets = None
        if self.act == GGMLType.Q8_1 and getattr(w, "biases", None) is not None:
            x, offsets = q8_1_activations(x)
        elif self.act is not None:
            x = round_activations(x, self.act)
        if isinstance(w, HOST_WEIGHTS):
            y = _host_matmul_t(w, x)
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
        """Move the weight to the host: packed bytes (qmatvec.py) where it is quantized and no
        ggml rounding is emulated, else dense float32 for NumPy's BLAS (see blas.py)."""
        w, source, packs = self.weight, self.source, self._packs()
        self.source = None
        if packs and isinstance(w, QuantizedWeight):
            self.weight = packed(w)
        elif packs and source is not None:
            self.weight = small_group_weight(source)
        elif isinstance(w, QuantizedWeight):
            keep = w.biases if self.act == GGMLType.Q8_1 else None
            self.weight = HostWeight.from_dense(w.dequantize(), keep)
        elif isinstance(w, mx.array):
            self.weight = HostWeight.from_dense(w)
        if self.bias is not None:
            self.host_bias = np.array(self.bias.astype(mx.float32))

    @property
    def on_host(self) -> bool:
        """Whether ``host_apply`` can run it: a host weight, no ggml rounding to emulate."""
        return isinstance(self.weight, HOST_WEIGHTS) and self.act is None

    def host_apply(self, h: np.ndarray) -> np.ndarray:
        """This layer on float32 NumPy rows (T, in), for a host weight without act rounding."""
        w = self.weight
        assert self.on_host and isinstance(w, HOST_WEIGHTS)
        y = w.matmul_np(h)
        return y if self.host_bias is None else y + self.host_bias

    @classmethod
    def fused(cls, parts: list[Linear]) -> Linear | None:
        """One Linear computing ``parts`` side by side (fewer matmuls per token), if possible."""
        if len({p.act for p in parts}) != 1:
            return None
        ws = [p.weight for p in parts]
        quantized = [w for w in ws if isinstance(w, QuantizedWeight)]
        dense = [w for w in ws if isinstance(w, mx.array)]
        host = [w for w in ws if isinstance(w, HOST_WEIGHTS)]
        if len(quantized) == len(ws):
            if len({(w.bits, w.group_size, w.scales.dtype) for w in quantized}) != 1:
                return None
            weight: Weight = QuantizedWeight(
                mx.concatenate([w.weight for w in quantized]),
                mx.concatenate([w.scales for w in quantized]),
                mx.concatenate([w.biases for w in quantized]),
                quantized[0].bits,
                quantized[0].group_size,
                quantized[0].ggml_type if len({w.ggml_type for w in quantized}) == 1 else None,
            )
        elif len(dense) == len(ws):
            if len({w.dtype for w in dense}) != 1 or any(p.source is not None for p in parts):
                return None  # 16-weight groups: the host packs them apart, then fuses
            weight = mx.concatenate(dense)
        elif len(host) == len(ws) and all(getattr(w, "biases", None) is None for w in host):
            with_bias = [p.bias is not None and p.host_bias is not None for p in parts]
            if any(with_bias) and not all(with_bias):
                return None
            joined = cls(_host_concat(host), act=parts[0].act)  # type: ignore[arg-type]
            if parts[0].bias is not None:
                joined.bias = mx.concatenate([p.bias for p in parts])  # type: ignore[misc]
                joined.host_bias = np.concatenate([p.host_bias for p in parts])
            return joined
        else:
            return None
        biases = [p.bias for p in parts if p.bias is not None]
        if not biases:
            bias = None
        elif len(biases) == len(parts):
            bias = mx.concatenate(biases)
        else:
            return None
        return cls(weight, bias, parts[0].act)


def _host_concat(ws: list[HostMatrix]) -> HostMatrix:
    """One host weight computing ``ws``' rows in turn: concatenated where they are alike."""
    if all(isinstance(w, HostWeight) for w in ws):
        return HostWeight(np.concatenate([w.wt for w in ws], axis=1))  # type: ignore[union-attr]
    if all(isinstance(w, PackedWeight) for w in ws):
        joined = PackedWeight.concat(ws)  # type: ignore[arg-type]
        if joined is not None:
            return joined
    return HostStack(tuple(ws))


def _host_matmul_t(w: HostMatrix, x: mx.array) -> mx.array:
    """``x @ W.T`` on the host (this evaluates ``x``), back as an MLX array."""
    dt = x.dtype
    h = np.asarray(x if dt == mx.float32 else x.astype(mx.float32))
    y = w.matmul_np(h.reshape(-1, h.shape[-1]))
    out = mx.array(y.reshape(*h.shape[:-1], y.shape[-1]))
    return out if dt == mx.float32 else out.astype(dt)
