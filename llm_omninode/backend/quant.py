"""GGUF tensor bytes -> MLX arrays, keeping Q4_0/Q4_1/Q8_0 quantized.

(K-quants and Q5_x are decoded in kquants.py; ``load_tensor`` here dispatches to it.)

GGUF's 32-element blocks map one-to-one onto MLX affine quantization groups of 32
(``w = scale * q + bias`` with unsigned q), so the packed integers are only reordered and the
per-block constants rewritten; no weight is ever dequantized:

- Q4_1  w = d*q + m        (q in 0..15)  -> scale d, bias m
- Q4_0  w = d*(q - 8)      (q in 0..15)  -> scale d, bias -8d
- Q8_0  w = d*q            (q in -128..127, int8) -> unsigned q+128, scale d, bias -128d

The products are exact in float32 (an f16 mantissa times a small integer), so MLX's dequantized
values equal ggml's bit for bit, up to the rounding of the final addition for Q4_1.
All work is vectorised NumPy over whole tensors: no Python loop runs per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import kquants
from .ggml_types import BLOCK_LAYOUT, GGMLType, tensor_nbytes
from .spec import UnsupportedModelError

GROUP_SIZE = 32
QUANTIZED_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
DENSE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
# every type load_tensor accepts; anything else is refused by name (also at `add` time)
SUPPORTED_TYPES = QUANTIZED_TYPES + kquants.SUPPORTED + DENSE_TYPES


@dataclass(frozen=True)
class TensorData:
    """One tensor as a stage receives it: raw GGUF bytes (a view into a file or shard)."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous axis
    data: np.ndarray  # uint8, exactly tensor_nbytes(ggml_type, shape) bytes


@dataclass(frozen=True)
class QuantizedWeight:
    """A (rows, cols) matrix in MLX affine quantization; rows are GGUF's ne[1]."""

    weight: mx.array  # uint32 (rows, cols * bits / 32)
    scales: mx.array  # (rows, cols / group_size)
    biases: mx.array  # (rows, cols / group_size)
    bits: int
    group_size: int = GROUP_SIZE
    ggml_type: GGMLType | None = None  # the GGUF type it came from (decides vec_dot_type)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    def dequantize(self) -> mx.array:
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )

    def take_rows(self, ids: mx.array) -> mx.array:
        """Dequantize only the rows ``ids`` (an embedding lookup)."""
        return mx.dequantize(
            self.weight[ids],
            self.scales[ids],
            self.biases[ids],
            group_size=self.group_size,
            bits=self.bits,
        )

    def matmul_t(self, x: mx.array) -> mx.array:
        """``x @ W.T``: what a GGUF linear layer computes."""
        return mx.quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
        )


Weight = mx.array | QuantizedWeight


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


def _dense_numpy(t: TensorData) -> np.ndarray:
    blocks = _blocks(t)
    flat = blocks.reshape(-1)
    if t.ggml_type == GGMLType.F32:
        arr = flat.view("<f4")
    elif t.ggml_type == GGMLType.F16:
        arr = flat.view("<f2")
    else:  # BF16 is the top half of a float32
        arr = (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return arr.reshape(tuple(reversed(t.shape)))


def load_tensor(t: TensorData, *, dtype: mx.Dtype = mx.float32) -> Weight:
    """A GGUF tensor as MLX: a QuantizedWeight for Q4_0/Q4_1/Q8_0, else a dense array.

    Dense arrays come back in MLX order (reversed GGUF shape) cast to ``dtype``; quantized
    scales and biases use ``dtype`` too. Both float32 and float16 hold d, m, -8d and -128d
    exactly; with float16 only the dequantized products round.
    """
    try:
        ggml_type = GGMLType(t.ggml_type)
    except ValueError:
        raise UnsupportedModelError(f"{t.name}: unknown tensor type {t.ggml_type}") from None
    t = TensorData(t.name, ggml_type, tuple(int(d) for d in t.shape), t.data)
    if t.ggml_type in QUANTIZED_TYPES:
        q, scales, biases, bits = repack_numpy(t)
        return QuantizedWeight(
            mx.array(q),
            mx.array(scales).astype(dtype),
            mx.array(biases).astype(dtype),
            bits,
            ggml_type=t.ggml_type,
        )
    if t.ggml_type in kquants.AFFINE_BITS:
        rows, cols = _matrix_shape(t)
        q, scales, biases, bits = kquants.affine_groups(t.ggml_type, _blocks(t))
        groups = cols // GROUP_SIZE
        return QuantizedWeight(
            mx.array(q.reshape(rows, groups * bits)),
            mx.array(scales.reshape(rows, groups)).astype(dtype),
            mx.array(biases.reshape(rows, groups)).astype(dtype),
            bits,
            ggml_type=t.ggml_type,
        )
    if t.ggml_type in kquants.FLOAT16_TYPES:
        # 16-weight sub-blocks do not fit MLX's groups of >= 32: float16, as the issue asks
        values = kquants.dequantize_blocks(t.ggml_type, _blocks(t))
        return mx.array(values.astype(np.float16).reshape(tuple(reversed(t.shape))))
    if t.ggml_type in DENSE_TYPES:
        return mx.array(_dense_numpy(t)).astype(dtype)
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
