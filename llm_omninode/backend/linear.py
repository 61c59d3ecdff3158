"""A linear layer: ``y = x @ W.T (+ b)`` over any quant.Weight."""

from __future__ import annotations

import mlx.core as mx

from .quant import Weight


class Linear:
    """``y = x @ W.T (+ b)``, in the activations' dtype."""

    def __init__(self, weight: Weight, bias: mx.array | None = None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = self.weight.matmul(x)
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        return y if self.bias is None else y + self.bias
