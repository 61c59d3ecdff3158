"""Repacking GGUF Q4_0/Q4_1/Q8_0 into MLX affine quantization, checked against gguf's oracle;
float tensors kept as stored; the bytes held against the GGUF bytes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from llm_omninode.backend.ggml_types import GGMLType, tensor_nbytes
from llm_omninode.backend.quant import DenseWeight, QuantizedWeight, TensorData, load_tensor
from llm_omninode.backend.spec import UnsupportedModelError

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

QTYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0]


def quantized(values: np.ndarray, ggml_type: GGMLType, name: str = "w") -> TensorData:
    """values: (rows, cols) in MLX order; returns the GGUF tensor (shape (cols, rows))."""
    raw = quantize(values.astype(np.float32), gguf.GGMLQuantizationType(int(ggml_type)))
    shape = tuple(reversed(values.shape))
    return TensorData(name, ggml_type, shape, raw.reshape(-1).view(np.uint8))


def reference(t: TensorData) -> np.ndarray:
    rows = t.data.size // (tensor_nbytes(t.ggml_type, (t.shape[0],)))
    qt = gguf.GGMLQuantizationType(int(t.ggml_type))
    return dequantize(t.data.reshape(rows, -1), qt).reshape(tuple(reversed(t.shape)))


@pytest.mark.parametrize("ggml_type", QTYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (48, 160)])
def test_dequantize_matches_gguf(ggml_type: GGMLType, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape) + ggml_type)
    values = rng.standard_normal(shape) * rng.uniform(0.01, 3, size=(shape[0], 1))
    t = quantized(values, ggml_type)
    w = load_tensor(t)
    assert isinstance(w, QuantizedWeight)
    assert w.shape == shape and w.group_size == 32
    assert w.bits == (8 if ggml_type == GGMLType.Q8_0 else 4)
    assert w.weight.dtype == mx.uint32
    ours = np.array(w.dequantize())
    ref = reference(t)
    if ggml_type == GGMLType.Q4_1:
        # d*q + m: both sides round the same f32 sum, but allow one ulp for fused multiply-add
        np.testing.assert_allclose(ours, ref, rtol=0, atol=np.abs(ref).max() * 2**-22)
    else:
        np.testing.assert_array_equal(ours, ref)  # d*(q-8) and d*q are exact in f32


@pytest.mark.parametrize("ggml_type", QTYPES)
def test_quantized_matmul_matches_dense(ggml_type: GGMLType) -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal((96, 128))
    t = quantized(values, ggml_type)
    w = load_tensor(t)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    dense = x @ reference(t).T
    np.testing.assert_allclose(np.array(w.matmul(mx.array(x))), dense, rtol=1e-4, atol=1e-4)
    ids = mx.array([3, 0, 95, 3])
    np.testing.assert_array_equal(np.array(w.take_rows(ids)), reference(t)[[3, 0, 95, 3]])


def test_nibble_order_by_hand() -> None:
    """One Q4_0 block built by hand: byte j holds element j (low) and element j+16 (high)."""
    d = np.float16(0.5).tobytes()
    qs = bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))
    t = TensorData("w", GGMLType.Q4_0, (32, 1), np.frombuffer(d + qs, np.uint8))
    got = np.array(load_tensor(t).dequantize())[0]
    q = np.array([j % 16 for j in range(16)] + [15 - j % 16 for j in range(16)])
    np.testing.assert_array_equal(got, 0.5 * (q - 8))


def test_q8_0_extremes_by_hand() -> None:
    d = np.float16(0.25).tobytes()
    qs = np.array([-128, 127, 0, -1] * 8, np.int8).tobytes()
    t = TensorData("w", GGMLType.Q8_0, (32, 1), np.frombuffer(d + qs, np.uint8))
    got = np.array(load_tensor(t).dequantize())[0]
    np.testing.assert_array_equal(got, 0.25 * np.array([-128, 127, 0, -1] * 8))


def test_q4_1_by_hand() -> None:
    head = np.array([2.0, -3.0], np.float16).tobytes()  # d, m
    qs = bytes(range(0, 256, 17))[:16]  # low == high nibble == j
    t = TensorData("w", GGMLType.Q4_1, (32, 1), np.frombuffer(head + qs, np.uint8))
    got = np.array(load_tensor(t).dequantize())[0]
    q = np.array(list(range(16)) * 2)
    np.testing.assert_array_equal(got, 2.0 * q - 3.0)


@pytest.mark.parametrize("ggml_type", QTYPES)
def test_float16_constants_are_exact(ggml_type: GGMLType) -> None:
    """What a stage holds: d, m, -8d and -128d are float16 numbers, so the values are the same
    as with float32 constants, at about the GGUF size (a 16-bit scale and bias per 32)."""
    values = np.random.default_rng(2).standard_normal((64, 256))
    t = quantized(values, ggml_type)
    w = load_tensor(t, scale_dtype=mx.float16)
    assert isinstance(w, QuantizedWeight) and w.scales.dtype == mx.float16
    np.testing.assert_array_equal(np.array(w.dequantize()), np.array(load_tensor(t).dequantize()))
    held = sum(a.nbytes for a in w.arrays())
    ratio = held / t.data.nbytes
    print(f"{ggml_type.name}: {held} bytes held for {t.data.nbytes} GGUF bytes ({ratio:.3f}x)")
    assert ratio <= {GGMLType.Q4_0: 1.112, GGMLType.Q4_1: 1.0, GGMLType.Q8_0: 1.06}[ggml_type]


def test_float16_constants_that_would_overflow_stay_float32() -> None:
    d = np.float16(1000.0).tobytes()  # -128d is past float16's range
    qs = np.array([-128, 127] * 16, np.int8).tobytes()
    t = TensorData("w", GGMLType.Q8_0, (32, 1), np.frombuffer(d + qs, np.uint8))
    w = load_tensor(t, scale_dtype=mx.float16)
    assert w.scales.dtype == mx.float32  # type: ignore[attr-defined]
    np.testing.assert_array_equal(np.array(w.dequantize())[0], 1000.0 * np.array([-128, 127] * 16))


def test_three_dimensional_tensor_folds_into_rows() -> None:
    values = np.random.default_rng(3).standard_normal((6, 64))
    raw = quantize(values.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    t = TensorData("w", GGMLType.Q8_0, (64, 3, 2), raw.reshape(-1))
    assert load_tensor(t).shape == (6, 64)


def test_dense_types() -> None:
    """Float tensors are kept as stored: float16 and bfloat16 are not widened."""
    values = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 4
    f32 = TensorData("a", GGMLType.F32, (4, 3), values.view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(np.array(load_tensor(f32).dequantize()), values)
    f16 = TensorData("a", GGMLType.F16, (4, 3), values.astype(np.float16).view(np.uint8).ravel())
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact: few mantissa bits
    b16 = TensorData("a", GGMLType.BF16, (4, 3), bf16.view(np.uint8).reshape(-1))
    for t, dtype in ((f32, mx.float32), (f16, mx.float16), (b16, mx.bfloat16)):
        w = load_tensor(t)
        assert isinstance(w, DenseWeight) and w.w.dtype == dtype and w.shape == (3, 4)
        assert w.w.nbytes == t.data.nbytes
        np.testing.assert_array_equal(np.array(w.dequantize()), values)
        np.testing.assert_array_equal(np.array(w.take_rows(mx.array([2, 0]))), values[[2, 0]])
        x = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal(np.array(w.matmul(mx.array(x))), x @ values.T)
    vec = TensorData("n", GGMLType.F32, (4,), values[0].view(np.uint8))
    assert load_tensor(vec).shape == (4,)


@pytest.mark.parametrize("ggml_type", [GGMLType.Q8_K, GGMLType.IQ4_XS, GGMLType.IQ2_S, GGMLType.I8])
def test_unsupported_types_are_named(ggml_type: GGMLType) -> None:
    shape = (256, 2)
    data = np.zeros(tensor_nbytes(ggml_type, shape), np.uint8)
    with pytest.raises(UnsupportedModelError, match=ggml_type.name):
        load_tensor(TensorData("blk.0.ffn_up.weight", ggml_type, shape, data))


def test_unknown_type_number() -> None:
    with pytest.raises(UnsupportedModelError, match="unknown tensor type 99"):
        load_tensor(TensorData("w", 99, (32,), np.zeros(34, np.uint8)))  # type: ignore[arg-type]


def test_size_and_shape_checks() -> None:
    with pytest.raises(ValueError, match="bytes of data"):
        load_tensor(TensorData("w", GGMLType.Q8_0, (32, 2), np.zeros(34, np.uint8)))
    with pytest.raises(ValueError, match="not a multiple"):
        load_tensor(TensorData("w", GGMLType.Q4_0, (48, 1), np.zeros(27, np.uint8)))
    with pytest.raises(ValueError, match="bad shape"):
        load_tensor(TensorData("w", GGMLType.F32, (0,), np.zeros(0, np.uint8)))


def test_repacked_weight_does_not_alias_input() -> None:
    values = np.random.default_rng(4).standard_normal((2, 32))
    t = quantized(values, GGMLType.Q4_1)
    w = load_tensor(t)
    before = np.array(w.dequantize())
    t.data[:] = 0  # the caller may release or reuse its buffer after loading
    np.testing.assert_array_equal(np.array(w.dequantize()), before)
