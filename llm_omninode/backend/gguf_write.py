"""GGUF writer (versions 3 and 2, little-endian): tiny test models, re-packed shards, fixtures.

Everything written is validated first (keys, value types and ranges, tensor names, types,
shapes, and that each tensor's byte count matches its type and shape), so the writer cannot
produce a file the hardened reader in :mod:`gguf` would reject. Bad input raises ``ValueError``
(or ``TypeError`` for a value of the wrong Python type) before anything is written.

Plain Python values are typed by rule; wrap a value in :class:`GGUFValue` for an exact type:

- ``bool`` -> BOOL; ``int`` -> UINT32 if ``0 <= v < 2**32``, else INT64 (UINT64 above that);
- ``float`` -> FLOAT32; ``str`` (and ``bytes``, written raw) -> STRING;
- ``list``/``tuple`` -> ARRAY; the item type follows the first item's kind, and for integers
  the same rule applied to *all* items (so ``[0, -1]`` is INT64, not a failed UINT32);
  nested lists -> ARRAY of ARRAY. An empty list has no item type: use GGUFValue.
- NumPy scalars and 1-D arrays take the type of their dtype.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from .ggml_types import BLOCK_LAYOUT, SCALAR_FORMAT, GGMLType, GGUFValueType, tensor_nbytes
from .gguf import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_ALIGNMENT,
    MAX_ARRAY_DEPTH,
    MAX_DIMS,
    MAX_ELEMENTS,
    MAX_KEY_LENGTH,
    MAX_TENSOR_NAME,
)

__all__ = ["GGUFValue", "gguf_bytes", "write_gguf"]

_INT_RANGE = {
    GGUFValueType.UINT8: (0, 1 << 8),
    GGUFValueType.INT8: (-(1 << 7), 1 << 7),
    GGUFValueType.UINT16: (0, 1 << 16),
    GGUFValueType.INT16: (-(1 << 15), 1 << 15),
    GGUFValueType.UINT32: (0, 1 << 32),
    GGUFValueType.INT32: (-(1 << 31), 1 << 31),
    GGUFValueType.UINT64: (0, 1 << 64),
    GGUFValueType.INT64: (-(1 << 63), 1 << 63),
}
_FLOATS = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
_DTYPE_TYPE = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with an explicit GGUF type (``item_type`` for arrays)."""

    value: Any
    type: GGUFValueType
    item_type: GGUFValueType | None = None


def _int_type(values: Iterable[int]) -> GGUFValueType:
    lo = hi = 0
    for v in values:
        lo, hi = min(lo, v), max(hi, v)
    if lo >= 0 and hi < 1 << 32:
        return GGUFValueType.UINT32
    if lo >= -(1 << 63) and hi < 1 << 63:
        return GGUFValueType.INT64
    if lo >= 0 and hi < 1 << 64:
        return GGUFValueType.UINT64
    raise ValueError(f"integer {lo if lo < -(1 << 63) else hi} does not fit in 64 bits")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _infer(value: Any, key: str) -> GGUFValue:
    """Type a plain Python (or NumPy) value by the module's rules."""
    if isinstance(value, GGUFValue):
        return value
    if isinstance(value, (bool, np.bool_)):
        return GGUFValue(bool(value), GGUFValueType.BOOL)
    if isinstance(value, np.generic):
        vt = _DTYPE_TYPE.get(value.dtype)
        if vt is None:
            raise TypeError(f"{key}: no GGUF type for NumPy {value.dtype}")
        return GGUFValue(value.item(), vt)
    if isinstance(value, int):
        return GGUFValue(value, _int_type((value,)))
    if isinstance(value, float):
        return GGUFValue(value, GGUFValueType.FLOAT32)
    if isinstance(value, (str, bytes)):
        return GGUFValue(value, GGUFValueType.STRING)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"{key}: only 1-D NumPy arrays can be metadata, not {value.shape}")
        it = _DTYPE_TYPE.get(value.dtype)
        if it is None:
            raise TypeError(f"{key}: no GGUF type for NumPy {value.dtype}")
        return GGUFValue(value.tolist(), GGUFValueType.ARRAY, it)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{key}: empty array has no item type; use GGUFValue(..., item_type=)")
        first = value[0]
        if isinstance(first, (bool, np.bool_)):
            it = GGUFValueType.BOOL
        elif _is_int(first):
            if not all(_is_int(v) for v in value):
                raise TypeError(f"{key}: array mixes integers and other values")
            it = _int_type(int(v) for v in value)
        elif isinstance(first, (float, np.floating)):
            it = GGUFValueType.FLOAT32
        elif isinstance(first, (str, bytes)):
            it = GGUFValueType.STRING
        elif isinstance(first, (list, tuple, np.ndarray)) or (
            isinstance(first, GGUFValue) and first.type == GGUFValueType.ARRAY
        ):
            it = GGUFValueType.ARRAY
        else:
            raise TypeError(f"{key}: no GGUF type for array item {type(first).__name__}")
        return GGUFValue(list(value), GGUFValueType.ARRAY, it)
    raise TypeError(f"{key}: no GGUF type for {type(value).__name__}")


class _Encoder:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def string(self, s: str | bytes, key: str) -> None:
        if isinstance(s, str):
            b = s.encode("utf-8")
        elif isinstance(s, (bytes, bytearray)):
            b = bytes(s)
        else:
            raise TypeError(f"{key}: STRING value must be str or bytes, not {type(s).__name__}")
        self.parts.append(struct.pack("<Q", len(b)))
        self.parts.append(b)

    def scalar(self, vt: GGUFValueType, v: Any, key: str) -> None:
        self.parts.append(_pack_scalars(vt, (v,), key))

    def value(self, gv: GGUFValue, key: str, depth: int = 0) -> None:
        vt = GGUFValueType(gv.type)
        if vt is GGUFValueType.STRING:
            self.string(gv.value, key)
        elif vt is GGUFValueType.ARRAY:
            self.array(gv, key, depth + 1)
        else:
            self.scalar(vt, gv.value, key)

    def array(self, gv: GGUFValue, key: str, depth: int) -> None:
        if depth > MAX_ARRAY_DEPTH:
            raise ValueError(f"{key}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        if gv.item_type is None:
            raise ValueError(f"{key}: ARRAY value needs an item_type")
        it = GGUFValueType(gv.item_type)
        items = gv.value
        if isinstance(items, np.ndarray):
            items = items.tolist()
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise TypeError(f"{key}: ARRAY value must be a list, not {type(items).__name__}")
        self.parts.append(struct.pack("<IQ", it, len(items)))
        if it is GGUFValueType.STRING:
            for s in items:
                self.string(s, key)
        elif it is GGUFValueType.ARRAY:
            for sub in items:
                g = _infer(sub, key)
                if g.type != GGUFValueType.ARRAY:
                    raise TypeError(f"{key}: item of an ARRAY-of-ARRAY is not an array")
                self.array(g, key, depth + 1)
        else:
            self.parts.append(_pack_scalars(it, items, key))


def _pack_scalars(vt: GGUFValueType, values: Sequence[Any], key: str) -> bytes:
    if vt in _INT_RANGE:
        lo, hi = _INT_RANGE[vt]
        for v in values:
            if not _is_int(v):
                raise TypeError(f"{key}: {vt.name} value must be an int, not {type(v).__name__}")
            if not lo <= v < hi:
                raise ValueError(f"{key}: {v} does not fit in {vt.name}")
    elif vt is GGUFValueType.BOOL:
        for v in values:
            if not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
                raise TypeError(f"{key}: BOOL value must be a bool, not {v!r}")
    elif vt in _FLOATS:
        for v in values:
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
                raise TypeError(f"{key}: {vt.name} value must be a number, not {v!r}")
    else:
        raise ValueError(f"{key}: {vt.name} is not a scalar type")
    try:
        return struct.pack(f"<{len(values)}{SCALAR_FORMAT[vt]}", *values)
    except (struct.error, OverflowError) as e:  # e.g. a float beyond FLOAT32's range
        raise ValueError(f"{key}: cannot encode as {vt.name}: {e}") from None


def _check_name(name: Any, what: str, max_len: int) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    b = name.encode("utf-8")
    if not b:
        raise ValueError(f"empty {what}")
    if b"\0" in b:
        raise ValueError(f"{what} {name!r} contains a NUL byte")
    if len(b) > max_len:
        raise ValueError(f"{what} {name!r} is {len(b)} bytes, more than {max_len}")
    return b


def _tensor_bytes(data: Any, name: str) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
        return memoryview(data.reshape(-1).view(np.uint8))
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    raise TypeError(f"tensor {name!r}: data must be bytes or a NumPy array, not {type(data)}")


def _encode(
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[str, GGMLType, tuple[int, ...], Any]],
    version: int,
    alignment: int,
) -> tuple[bytes, list[tuple[int, memoryview]]]:
    """Header bytes (ending at the aligned data section) and the padded tensor payloads."""
    if version not in (2, 3):
        raise ValueError(f"can only write GGUF versions 2 and 3, not {version!r}")
    if (
        isinstance(alignment, bool)
        or not isinstance(alignment, int)
        or not 1 <= alignment <= MAX_ALIGNMENT
        or alignment & (alignment - 1)
    ):
        raise ValueError(f"alignment {alignment!r} is not a power of two between 1 and 2**20")

    kvs: list[tuple[str, GGUFValue]] = []
    if "general.alignment" in metadata:
        given = _infer(metadata["general.alignment"], "general.alignment")
        if given.type != GGUFValueType.UINT32 or given.value != alignment:
            raise ValueError(
                f"metadata general.alignment={given.value!r} ({given.type.name}) disagrees with "
                f"alignment={alignment} (it must be the same UINT32; it is written automatically)"
            )
    elif alignment != DEFAULT_ALIGNMENT:
        kvs.append(("general.alignment", GGUFValue(alignment, GGUFValueType.UINT32)))
    for key, value in metadata.items():
        _check_name(key, "metadata key", MAX_KEY_LENGTH)
        kvs.append((key, _infer(value, key)))

    enc = _Encoder()
    for key, gv in kvs:
        enc.string(key, key)
        enc.parts.append(struct.pack("<I", GGUFValueType(gv.type)))
        enc.value(gv, key)

    infos = _Encoder()
    payloads: list[tuple[int, memoryview]] = []
    seen: set[str] = set()
    offset = 0
    for entry in tensors:
        name, ggml_type, shape, data = entry
        _check_name(name, "tensor name", MAX_TENSOR_NAME)
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        gt = GGMLType(ggml_type)
        if gt not in BLOCK_LAYOUT:
            raise ValueError(f"tensor {name!r}: ggml type {gt.name} has no block layout")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= MAX_DIMS or any(d < 1 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} must have 1 to 4 positive dims")
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(f"tensor {name!r}: shape {shape} has too many elements")
        block = BLOCK_LAYOUT[gt][0]
        if shape[0] % block:
            raise ValueError(
                f"tensor {name!r}: shape[0]={shape[0]} is not a multiple of the {gt.name} "
                f"block size {block}"
            )
        mv = _tensor_bytes(data, name)
        nbytes = tensor_nbytes(gt, shape)
        if mv.nbytes != nbytes:
            raise ValueError(
                f"tensor {name!r}: {mv.nbytes} bytes of data, but {gt.name} {shape} needs {nbytes}"
            )
        infos.string(name, name)
        infos.parts.append(struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, gt, offset))
        padded = -(-nbytes // alignment) * alignment
        payloads.append((padded - nbytes, mv))
        offset += padded

    head = b"".join(
        [
            GGUF_MAGIC,
            struct.pack("<IQQ", version, len(payloads), len(kvs)),
            *enc.parts,
            *infos.parts,
        ]
    )
    head += b"\0" * (-len(head) % alignment)
    return head, payloads


def _write(fp: BinaryIO, head: bytes, payloads: list[tuple[int, memoryview]]) -> None:
    fp.write(head)
    for pad, mv in payloads:
        fp.write(mv)
        if pad:
            fp.write(b"\0" * pad)


def gguf_bytes(
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[str, GGMLType, tuple[int, ...], Any]] = (),
    *,
    version: int = 3,
    alignment: int = DEFAULT_ALIGNMENT,
) -> bytes:
    """A whole GGUF file in memory. ``tensors``: (name, ggml type, shape, bytes or ndarray)."""
    head, payloads = _encode(metadata, tensors, version, alignment)
    buf = io.BytesIO()
    _write(buf, head, payloads)
    return buf.getvalue()


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[str, GGMLType, tuple[int, ...], Any]] = (),
    *,
    version: int = 3,
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a GGUF file; tensor data is streamed from the given buffers, not concatenated.

    Everything is validated before the file is opened, so bad input leaves no file behind.
    """
    head, payloads = _encode(metadata, tensors, version, alignment)
    with open(path, "wb") as fp:
        _write(fp, head, payloads)
