"""Linear layers over a GGUF weight: quantized or dense, both MLX."""

from __future__ import annotations

import mlx.core as mx

from .quant import DenseWeight, QuantizedWeight, Weight


class Linear:
    """``y = x @ W.T (+ b)`` over a dense or quantized GGUF weight."""

    def __init__(self, weight: Weight, bias: mx.array | None = None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = self.weight.matmul(x)
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        return y if self.bias is None else y + self.bias

    @classmethod
    def fused(cls, parts: list[Linear]) -> Linear | None:
        """One Linear computing ``parts`` side by side (fewer matmuls per token), if possible."""
        ws = [p.weight for p in parts]
        quantized = [w for w in ws if isinstance(w, QuantizedWeight)]
        dense = [w for w in ws if isinstance(w, DenseWeight)]
        if len(quantized) == len(ws):
            if len({(w.bits, w.group_size, w.scales.dtype) for w in quantized}) != 1:
                return None
            weight: Weight = QuantizedWeight(
                mx.concatenate([w.weight for w in quantized]),
                mx.concatenate([w.scales for w in quantized]),
                mx.concatenate([w.biases for w in quantized]),
                quantized[0].bits,
                quantized[0].group_size,
            )
        elif len(dense) == len(ws):
            if len({w.w.dtype for w in dense}) != 1:
                return None
            weight = DenseWeight(mx.concatenate([w.w for w in dense]))
        else:
            return None
        biases = [p.bias for p in parts if p.bias is not None]
        if not biases:
            bias = None
        elif len(biases) == len(parts):
            bias = mx.concatenate(biases)
        else:
            return None
        return cls(weight, bias)
