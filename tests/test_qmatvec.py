"""Packed quantized weights and their compiled matvec (qmatvec.py), against float64 products."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from llm_omninode.backend import qmatvec
from llm_omninode.backend.blas import HostWeight
from llm_omninode.backend.linear import HostStack, Linear, packed
from llm_omninode.backend.qmatvec import KERNEL_MAX_ROWS, PackedWeight
from llm_omninode.backend.quant import QuantizedWeight

pytestmark = pytest.mark.skipif(not qmatvec.available(), reason="Numba is not installed")


def random_packed(rows: int, cols: int, group: int, seed: int = 0) -> PackedWeight:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    scales = (rng.random((rows, cols // group), dtype=np.float32) - 0.5) * 0.02
    offsets = (rng.random((rows, cols // group), dtype=np.float32) - 0.5) * 2
    return PackedWeight.from_groups(q, scales, offsets)


def dense64(w: PackedWeight) -> np.ndarray:
    """The (rows, cols) matrix in float64, from the packed fields."""
    g = w.group
    s = np.repeat(w.scales.astype(np.float64), g, axis=0)
    o = np.repeat(w.offsets.astype(np.float64), g, axis=0)
    return (s * w.qt + o).T


@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("t", [1, 2, 3, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 40])
def test_matmul_equals_float64(group: int, t: int) -> None:
    w = random_packed(37, 128, group)  # rows not a multiple of any vector width
    x = np.random.default_rng(1).standard_normal((t, 128)).astype(np.float32)
    want = x.astype(np.float64) @ dense64(w).T
    got = w.matmul_np(x)
    assert got.shape == (t, 37) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_rows_do_not_depend_on_their_batch() -> None:
    """A sequence's numbers are the same whether its step runs alone or batched."""
    w = random_packed(300, 256, 32)
    x = np.random.default_rng(2).standard_normal((KERNEL_MAX_ROWS, 256)).astype(np.float32)
    alone = np.concatenate([w.matmul_np(x[i : i + 1]) for i in range(len(x))])
    for m in range(2, KERNEL_MAX_ROWS + 1):
        assert np.array_equal(w.matmul_np(x[:m]), alone[:m]), m


def test_dequantize() -> None:
    w = random_packed(20, 64, 16)
    np.testing.assert_allclose(w.dequantize(), dense64(w).T.astype(np.float32), rtol=1e-6)


def test_concat_is_the_parts_side_by_side() -> None:
    parts = [random_packed(r, 64, 32, seed=r) for r in (8, 24, 5)]
    joined = PackedWeight.concat(parts)
    assert joined is not None and joined.shape == (37, 64)
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    want = np.concatenate([p.matmul_np(x) for p in parts], axis=1)
    assert np.array_equal(joined.matmul_np(x), want)
    assert PackedWeight.concat([random_packed(4, 64, 32), random_packed(4, 64, 16)]) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ((np.zeros((64, 4), np.int8), np.ones((2, 4), np.float32)), "uint8"),
        ((np.zeros((64, 4), np.uint8), np.ones((3, 4), np.float32)), "do not fit"),
        ((np.zeros((64, 4), np.uint8), np.ones((2, 5), np.float32)), "do not fit"),
    ],
)
def test_bad_fields_are_refused(fields: tuple, message: str) -> None:
    qt, scales = fields
    with pytest.raises(ValueError, match=message):
        PackedWeight(qt, scales, scales.copy())


def test_wrong_input_width() -> None:
    with pytest.raises(ValueError, match="columns"):
        random_packed(4, 64, 32).matmul_np(np.zeros((1, 32), np.float32))


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_packed_from_mlx_groups(bits: int) -> None:
    """An MLX affine weight (as GGUF types load) packs to the same matrix (to the last bit:
    one rounding or two, with or without a fused multiply-add)."""
    w = mx.random.normal((48, 256), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, group_size=32, bits=bits)
    qw = QuantizedWeight(q, s, b, bits)
    p = packed(qw)
    assert p.shape == (48, 256) and p.group == 32
    np.testing.assert_allclose(p.dequantize().T, np.array(qw.dequantize()), rtol=1e-6, atol=1e-6)


def test_linear_to_host_packs_quantized_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    w = mx.random.normal((40, 64), key=mx.random.key(0))
    qw = QuantizedWeight(*mx.quantize(w, group_size=32, bits=4), 4)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    want = np.array(mx.array(x) @ qw.dequantize().T)
    lin = Linear(qw)
    lin.to_host()
    assert isinstance(lin.weight, PackedWeight)
    np.testing.assert_allclose(lin.host_apply(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(lin(mx.array(x))), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(qmatvec, "available", lambda: False)  # no Numba: dense float32
    lin = Linear(qw)
    lin.to_host()
    assert isinstance(lin.weight, HostWeight)


def test_mixed_host_weights_fuse_as_a_stack() -> None:
    """q/k/v of different types (a Q4_K_M mix): packed and dense parts side by side."""
    a = mx.random.normal((16, 64), key=mx.random.key(1))
    qa = QuantizedWeight(*mx.quantize(a, group_size=32, bits=4), 4)
    b = mx.random.normal((8, 64), key=mx.random.key(2)).astype(mx.float16)
    parts = [Linear(qa), Linear(b)]
    for p in parts:
        p.to_host()
    fused = Linear.fused(parts)
    assert fused is not None and isinstance(fused.weight, HostStack)
    assert fused.weight.shape == (24, 64)
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    want = np.concatenate([p.host_apply(x) for p in parts], axis=1)
    assert np.array_equal(fused.host_apply(x), want)


def test_host_bytes_estimate() -> None:
    qw = QuantizedWeight(*mx.quantize(mx.zeros((64, 128)), group_size=32, bits=4), 4)
    lin = Linear(qw)
    assert lin.host_nbytes() == packed(qw).nbytes
    lin.to_host()
    assert lin.weight.nbytes == packed(qw).nbytes
    assert Linear(mx.zeros((64, 128))).host_nbytes() == 4 * 64 * 128
