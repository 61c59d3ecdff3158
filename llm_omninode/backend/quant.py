"""GGUF tensor bytes -> MLX weights at about their GGUF size, behind one small protocol.

A stage multiplies by a weight or gathers rows of it (embeddings) only through ``Weight``:
``matmul(x)`` is ``x @ W.T``, ``take_rows(ids)`` dequantizes just those rows, ``arrays()``
is what it holds. Kinds (``load_tensor`` picks one; K-quants and Q5_x are decoded in
kquants.py):

- DenseWeight: F32, F16, BF16 as stored (float16 is not widened).
- QuantizedWeight: MLX affine groups of 32, ``w = scale * q + bias`` with unsigned q. GGUF's
  32-weight blocks map onto them one to one, so the packed integers are only reordered and the
  per-block constants rewritten:
    Q4_1  w = d*q + m        (q in 0..15)  -> scale d, bias m
    Q4_0  w = d*(q - 8)      (q in 0..15)  -> scale d, bias -8d
    Q8_0  w = d*q            (q in -128..127, int8) -> unsigned q+128, scale d, bias -128d
  and Q5_0, Q5_1, Q4_K, Q5_K likewise (kquants.py).
- SubBlockWeight: Q6_K, Q3_K, Q2_K, whose 16-weight sub-blocks each have their own scale
  (MLX's groups are >= 32): the integers in groups of 32, each half of a group with its own
  constants (see the class).
- StackedWeight: weights that cannot be concatenated side by side (q/k/v of a Q4_K_M mix);
  ``join`` concatenates those that can, so q/k/v and gate/up are one matmul where possible.

Scales and biases are float16 in a stage (``scale_dtype``; float32 where a value would
overflow float16), which keeps a tensor at about its GGUF size. That is exact for Q4_0, Q4_1,
Q8_0, Q5_0 and Q5_1 (their constants are GGUF float16 numbers times powers of two); the
K-quants' products d*sc and dmin*m are rounded once to float16 (relative error <= 2^-11 of a
group's step, far below the quantization step). With float32 scales every type's values are
ggml's, bit for bit (up to the rounding of Q4_1's final addition). All decoding is vectorised
NumPy over whole tensors: no Python loop runs per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from . import kquants
from .ggml_types import BLOCK_LAYOUT, GGMLType, tensor_nbytes
from .spec import UnsupportedModelError
from .tensor_data import TensorData

GROUP_SIZE = 32
QUANTIZED_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
DENSE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
# every type load_tensor accepts; anything else is refused by name (also at `add` time)
SUPPORTED_TYPES = QUANTIZED_TYPES + kquants.SUPPORTED + DENSE_TYPES
FLOAT16_MAX = 65504.0


class Weight(Protocol):
    """A (rows, cols) matrix as a stage holds it; rows are GGUF's ne[1] (output features)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def matmul(self, x: mx.array) -> mx.array:
        """``x @ W.T``: what a GGUF linear layer computes."""
        ...

    def take_rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` as float32 (an embedding lookup), without dequantizing the others."""
        ...

    def dequantize(self) -> mx.array:
        """The whole matrix as float32 (for checks and 1-D tensors; a stage never does this)."""
        ...

    def arrays(self) -> list[mx.array]:
        """The arrays it holds (a stage evaluates them at load and counts their bytes)."""
        ...


def nbytes(weights: Sequence[Weight | mx.array]) -> int:
    """Bytes held by ``weights``, an array shared by several counted once."""
    held = [a for w in weights for a in ([w] if isinstance(w, mx.array) else w.arrays())]
    return sum({id(a): a.nbytes for a in held}.values())


@dataclass(frozen=True)
class DenseWeight:
    """A float matrix as stored (float32, float16 or bfloat16), in MLX order."""

    w: mx.array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    def matmul(self, x: mx.array) -> mx.array:
        return x @ self.w.T  # MLX promotes a float16 weight to float32 activations' type

    def take_rows(self, ids: mx.array) -> mx.array:
        return self.w[ids].astype(mx.float32)

    def dequantize(self) -> mx.array:
        return self.w.astype(mx.float32)

    def arrays(self) -> list[mx.array]:
        return [self.w]

    @classmethod
    def concat(cls, ws: Sequence[DenseWeight]) -> DenseWeight | None:
        if len({w.w.dtype for w in ws}) != 1:
            return None
        return cls(mx.concatenate([w.w for w in ws]))


@dataclass(frozen=True)
class QuantizedWeight:
    """A (rows, cols) matrix in MLX affine quantization, groups of ``group_size``."""

    weight: mx.array  # uint32 (rows, cols * bits / 32)
    scales: mx.array  # (rows, cols / group_size)
    biases: mx.array  # (rows, cols / group_size)
    bits: int
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    def matmul(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
        )

    def take_rows(self, ids: mx.array) -> mx.array:
        # the constants widened first: MLX dequantizes in their type
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids].astype(mx.float32),
            self.biases[ids].astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
        )

    def dequantize(self) -> mx.array:
        return self.take_rows(mx.arange(self.shape[0]))

    def arrays(self) -> list[mx.array]:
        return [self.weight, self.scales, self.biases]

    @classmethod
    def concat(cls, ws: Sequence[QuantizedWeight]) -> QuantizedWeight | None:
        if len({(w.bits, w.group_size, w.scales.dtype) for w in ws}) != 1:
            return None
        arrays = zip(*(w.arrays() for w in ws), strict=True)
        q, s, b = (mx.concatenate(list(a)) for a in arrays)
        return cls(q, s, b, ws[0].bits, ws[0].group_size)


@dataclass(frozen=True)
class SubBlockWeight:
    """Q6_K/Q3_K/Q2_K: a scale (and for Q2_K a bias) per 16 weights, on MLX groups of 32.

    The unsigned integers u are packed in MLX groups of 32, so each group holds two
    sub-blocks. ``scales[0]``/``biases[0]`` are the first halves' constants, ``[1]`` the
    second halves'. ``x @ W.T`` is then two quantized matmuls, each over the activations with
    the other halves zeroed: the integers are stored once, the constants at one per 16.
    Without biases (``w = scale * (u - zero)``: Q6_K, Q3_K) the scales also serve as biases,
    so MLX computes ``scale * (u + 1)``, and ``(zero + 1) * scale * sum(x)`` per sub-block is
    taken off after (a small matmul with the scales): no bias array is held.
    """

    weight: mx.array  # uint32 (rows, cols * bits / 32)
    scales: tuple[mx.array, mx.array]  # (rows, cols / 32) each
    biases: tuple[mx.array, mx.array] | None
    zero: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    def matmul(self, x: mx.array) -> mx.array:
        halves = x.reshape(*x.shape[:-1], -1, 2, 16)
        first = (halves * mx.array([[1.0], [0.0]], dtype=x.dtype)).reshape(x.shape)
        parts = (first, x - first)
        biases = self.biases or self.scales
        y = sum(
            mx.quantized_matmul(
                p, self.weight, s, b, transpose=True, group_size=GROUP_SIZE, bits=self.bits
            )
            for p, s, b in zip(parts, self.scales, biases, strict=True)
        )
        if self.biases is None:
            sums = halves.sum(axis=-1)  # (..., cols / 32, 2)
            s0, s1 = self.scales
            y = y - (self.zero + 1) * (sums[..., 0] @ s0.T + sums[..., 1] @ s1.T)
        return y  # type: ignore[return-value]

    def take_rows(self, ids: mx.array) -> mx.array:
        q = self.weight[ids]
        scales = [s[ids].astype(mx.float32) for s in self.scales]
        if self.biases is None:
            biases = [-self.zero * s for s in scales]  # exact: zero is a power of two or 0
        else:
            biases = [b[ids].astype(mx.float32) for b in self.biases]
        first, second = (
            mx.dequantize(q, s, b, group_size=GROUP_SIZE, bits=self.bits)
            for s, b in zip(scales, biases, strict=True)
        )
        in_first = mx.arange(self.shape[1]) % GROUP_SIZE < GROUP_SIZE // 2
        return mx.where(in_first, first, second)

    def dequantize(self) -> mx.array:
        return self.take_rows(mx.arange(self.shape[0]))

    def arrays(self) -> list[mx.array]:
        return [self.weight, *self.scales, *(self.biases or ())]

    @classmethod
    def concat(cls, ws: Sequence[SubBlockWeight]) -> SubBlockWeight | None:
        layouts = {(w.bits, w.zero, w.biases is None, w.scales[0].dtype) for w in ws}
        if len(layouts) != 1:
            return None

        def rows(pick: Callable[[SubBlockWeight], mx.array]) -> mx.array:
            return mx.concatenate([pick(w) for w in ws])

        scales = (rows(lambda w: w.scales[0]), rows(lambda w: w.scales[1]))
        biases = None
        if ws[0].biases is not None:
            biases = (rows(lambda w: w.biases[0]), rows(lambda w: w.biases[1]))  # type: ignore[index]
        return cls(rows(lambda w: w.weight), scales, biases, ws[0].zero, ws[0].bits)


@dataclass(frozen=True)
class StackedWeight:
    """Weights of different kinds computing their rows in turn (one after the other)."""

    parts: tuple[Weight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    def matmul(self, x: mx.array) -> mx.array:
        return mx.concatenate([p.matmul(x) for p in self.parts], axis=-1)

    def take_rows(self, ids: mx.array) -> mx.array:
        out, start = None, 0
        for p in self.parts:
            n = p.shape[0]
            rows = p.take_rows(mx.clip(ids - start, 0, n - 1))
            mine = ((ids >= start) & (ids < start + n))[..., None]
            out = rows if out is None else mx.where(mine, rows, out)
            start += n
        assert out is not None
        return out

    def dequantize(self) -> mx.array:
        return mx.concatenate([p.dequantize() for p in self.parts])

    def arrays(self) -> list[mx.array]:
        return [a for p in self.parts for a in p.arrays()]


def join(weights: Sequence[Weight]) -> Weight:
    """One weight computing ``weights``' rows in turn: their arrays concatenated where they
    are of one kind and layout (one matmul instead of several), else a StackedWeight."""
    first = weights[0]
    if len(weights) == 1:
        return first
    concat = getattr(type(first), "concat", None)
    if concat is not None and all(type(w) is type(first) for w in weights):
        joined = concat(weights)
        if joined is not None:
            return joined
    return StackedWeight(tuple(weights))


def _blocks(t: TensorData) -> np.ndarray:
    """The tensor's bytes as (n_blocks, block_bytes), after checking size and shape."""
    block_elems, block_bytes = BLOCK_LAYOUT[t.ggml_type]
    if not t.shape or any(d <= 0 for d in t.shape):
        raise ValueError(f"{t.name}: bad shape {t.shape}")
    if t.shape[0] % block_elems:
        raise ValueError(
            f"{t.name}: row length {t.shape[0]} is not a multiple of the "
            f"{t.ggml_type.name} block size {block_elems}"
        )
    expected = tensor_nbytes(t.ggml_type, t.shape)
    data = np.asarray(t.data)
    if data.dtype != np.uint8 or data.ndim != 1:
        data = data.reshape(-1).view(np.uint8)
    if data.size != expected:
        raise ValueError(
            f"{t.name}: {data.size} bytes of data, {t.ggml_type.name} {t.shape} needs {expected}"
        )
    return data.reshape(-1, block_bytes)


def _matrix_shape(t: TensorData) -> tuple[int, int]:
    """(rows, cols) in MLX order; higher GGUF dimensions fold into rows."""
    cols = t.shape[0]
    rows = 1
    for d in t.shape[1:]:
        rows *= d
    return rows, cols


_f16_column = kquants.f16_field  # a little-endian float16 field of every block, as float32


def _pack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 nibbles (byte j = element j low, element j+16 high) -> MLX uint32 words.

    MLX stores element i of a group in bits 4*(i%8) of word i//8, i.e. byte b of the
    little-endian stream holds elements 2b (low nibble) and 2b+1 (high nibble).
    """
    lo = qs & 0x0F  # elements 0..15
    hi = qs >> 4  # elements 16..31
    packed = np.concatenate(
        [lo[:, 0::2] | (lo[:, 1::2] << 4), hi[:, 0::2] | (hi[:, 1::2] << 4)], axis=1
    )
    return packed.view("<u4")  # (n_blocks, 4)


def repack_numpy(t: TensorData) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(packed uint32 (rows, cols*bits/32), scales f32, biases f32, bits) of a Q4/Q8 tensor."""
    blocks = _blocks(t)
    rows, cols = _matrix_shape(t)
    if t.ggml_type == GGMLType.Q4_0:
        d = _f16_column(blocks, 0)
        q, scales, biases, bits = _pack_nibbles(blocks[:, 2:]), d, -8.0 * d, 4
    elif t.ggml_type == GGMLType.Q4_1:
        d, m = _f16_column(blocks, 0), _f16_column(blocks, 2)
        q, scales, biases, bits = _pack_nibbles(blocks[:, 4:]), d, m, 4
    elif t.ggml_type == GGMLType.Q8_0:
        d = _f16_column(blocks, 0)
        # int8 -> uint8 by adding 128 is flipping the sign bit; bytes are already in MLX order
        q = np.ascontiguousarray(blocks[:, 2:] ^ 0x80).view("<u4")
        scales, biases, bits = d, -128.0 * d, 8
    else:
        raise UnsupportedModelError(f"{t.name}: {t.ggml_type.name} cannot be repacked")
    groups = cols // GROUP_SIZE
    return (
        q.reshape(rows, groups * bits),  # 32 elements * bits / 32 bits per word
        scales.reshape(rows, groups),
        biases.reshape(rows, groups),
        bits,
    )


def _dense(t: TensorData) -> mx.array:
    """A float tensor as stored, in MLX order (reversed GGUF shape)."""
    flat = _blocks(t).reshape(-1)
    if t.ggml_type == GGMLType.F32:
        arr = mx.array(flat.view("<f4"))
    elif t.ggml_type == GGMLType.F16:
        arr = mx.array(flat.view("<f2"))
    else:  # BF16: MLX has the type; NumPy does not
        arr = mx.array(flat.view("<u2")).view(mx.bfloat16)
    return arr.reshape(tuple(reversed(t.shape)))


def _constants(dtype: mx.Dtype, *values: np.ndarray) -> list[mx.array]:
    """Per-group constants as ``dtype``; float32 if float16 would overflow on any of them."""
    big = any(v.size and float(np.abs(v).max()) > FLOAT16_MAX for v in values)
    dt = mx.float32 if dtype == mx.float16 and big else dtype
    return [mx.array(v).astype(dt) for v in values]


def load_tensor(t: TensorData, *, scale_dtype: mx.Dtype = mx.float32) -> Weight:
    """A GGUF tensor as the Weight kind that keeps it at about its size (see the module doc).

    ``scale_dtype`` is the type of quantization constants: float32 (the default here) gives
    ggml's values exactly, float16 (what a stage holds) about the GGUF size.
    """
    try:
        ggml_type = GGMLType(t.ggml_type)
    except ValueError:
        raise UnsupportedModelError(f"{t.name}: unknown tensor type {t.ggml_type}") from None
    t = TensorData(t.name, ggml_type, tuple(int(d) for d in t.shape), t.data)
    rows, cols = _matrix_shape(t) if t.ggml_type not in DENSE_TYPES else (0, 0)
    if t.ggml_type in QUANTIZED_TYPES:
        q, scales, biases, bits = repack_numpy(t)
        s, b = _constants(scale_dtype, scales, biases)
        return QuantizedWeight(mx.array(q), s, b, bits)
    if t.ggml_type in kquants.AFFINE_BITS:
        q, scales, biases, bits = kquants.affine_groups(t.ggml_type, _blocks(t))
        groups = (rows, cols // GROUP_SIZE)
        s, b = _constants(scale_dtype, scales.reshape(groups), biases.reshape(groups))
        return QuantizedWeight(mx.array(q.reshape(rows, -1)), s, b, bits)
    if t.ggml_type in kquants.SUB_BLOCK_BITS:
        q, scale, zero, minimum, bits = kquants.sub_blocks(t.ggml_type, _blocks(t))
        per_half = [scale.reshape(rows, -1, 2)[..., h] for h in (0, 1)]
        if minimum is not None:  # w = scale * u - minimum
            per_half += [-minimum.reshape(rows, -1, 2)[..., h] for h in (0, 1)]
        consts = _constants(scale_dtype, *per_half)
        return SubBlockWeight(
            mx.array(q.reshape(rows, -1)),
            (consts[0], consts[1]),
            None if minimum is None else (consts[2], consts[3]),
            zero,
            bits,
        )
    if t.ggml_type in DENSE_TYPES:
        return DenseWeight(_dense(t))
    raise UnsupportedModelError(unsupported_type_message(t.name, t.ggml_type))


def unsupported_type_message(name: str, ggml_type: GGMLType) -> str:
    return (
        f"{name}: tensor type {ggml_type.name} is not supported "
        f"(supported: {', '.join(x.name for x in SUPPORTED_TYPES)})"
    )


def check_tensor_types(types: dict[str, int]) -> None:
    """Refuse, naming it, the first tensor whose type load_tensor cannot convert.

    Called when a model is added, so an unsupported quantization is reported then and not
    when a shim first loads the model.
    """
    for name, number in types.items():
        try:
            ggml_type = GGMLType(number)
        except ValueError:
            raise UnsupportedModelError(f"{name}: unknown tensor type {number}") from None
        if ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(unsupported_type_message(name, ggml_type))
