"""K-quants and Q5_x: our decoders against the `gguf` package's NumPy dequantizers (oracle)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from support.tiny_model import random_blocks

from llm_omninode.backend import kquants
from llm_omninode.backend.ggml_types import BLOCK_LAYOUT, GGMLType, tensor_nbytes
from llm_omninode.backend.quant import (
    QuantizedWeight,
    SubBlockWeight,
    TensorData,
    check_tensor_types,
    load_tensor,
)
from llm_omninode.backend.spec import UnsupportedModelError

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

AFFINE = [GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K]
SUB_BLOCKS = [GGMLType.Q6_K, GGMLType.Q3_K, GGMLType.Q2_K]
# K-quant constants d*sc, dmin*m rounded to float16 (a stage's scale_dtype): relative 2^-11
F16_CONSTANTS_RTOL = 2**-11


def reference(t: TensorData) -> np.ndarray:
    """The oracle's values of a tensor, in MLX order (rows, cols), float32."""
    rows = t.data.size // (tensor_nbytes(t.ggml_type, (t.shape[0],)))
    qt = gguf.GGMLQuantizationType(int(t.ggml_type))
    return dequantize(t.data.reshape(rows, -1), qt).astype(np.float32).reshape(rows, t.shape[0])


def random_tensor(ggml_type: GGMLType, shape: tuple[int, int], seed: int = 0) -> TensorData:
    data = random_blocks(ggml_type, shape[0] * shape[1], np.random.default_rng(seed))
    return TensorData("blk.0.ffn_down.weight", ggml_type, shape, data)


@pytest.mark.parametrize("ggml_type", AFFINE + SUB_BLOCKS, ids=lambda t: t.name)
def test_decoder_is_bit_exact(ggml_type: GGMLType) -> None:
    """Every bit pattern of quants and sub-scales: the same float32 values as the oracle."""
    t = random_tensor(ggml_type, (512, 6), seed=int(ggml_type))
    block_bytes = BLOCK_LAYOUT[ggml_type][1]
    got = kquants.dequantize_blocks(ggml_type, t.data.reshape(-1, block_bytes))
    np.testing.assert_array_equal(got.reshape(6, 512), reference(t))


@pytest.mark.parametrize("ggml_type", AFFINE, ids=lambda t: t.name)
def test_affine_types_become_mlx_groups_without_change(ggml_type: GGMLType) -> None:
    t = random_tensor(ggml_type, (512, 6), seed=1)
    w = load_tensor(t)  # float32 constants: ggml's values
    assert isinstance(w, QuantizedWeight)
    assert (w.bits, w.group_size, w.shape) == (kquants.AFFINE_BITS[ggml_type], 32, (6, 512))
    ref = reference(t)
    # scale*q + bias in float32: ggml's d*q - m, rounded once (exact for Q5_0, Q4_K's d*sc...)
    np.testing.assert_allclose(np.array(w.dequantize()), ref, rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(2).standard_normal((3, 512)).astype(np.float32)
    y = np.array(w.matmul(mx.array(x)))
    np.testing.assert_allclose(y, x.astype(np.float64) @ ref.T.astype(np.float64), atol=1e-4)
    rows = np.array(w.take_rows(mx.array([4, 0])))  # an embedding lookup of such a tensor
    np.testing.assert_allclose(rows, ref[[4, 0]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ggml_type", SUB_BLOCKS, ids=lambda t: t.name)
def test_sub_block_types_keep_their_integers(ggml_type: GGMLType) -> None:
    """16-weight sub-blocks on MLX groups of 32: ggml's values exactly (float32 constants),
    the product and an embedding lookup against float64, and about the GGUF size."""
    t = random_tensor(ggml_type, (512, 6), seed=3)
    w = load_tensor(t)
    assert isinstance(w, SubBlockWeight) and w.shape == (6, 512)
    assert w.bits == kquants.SUB_BLOCK_BITS[ggml_type]
    assert (w.biases is None) == (ggml_type != GGMLType.Q2_K)
    ref = reference(t)
    np.testing.assert_array_equal(np.array(w.dequantize()), ref)  # bit for bit
    rows = np.array(w.take_rows(mx.array([[5, 0], [2, 2]])))
    np.testing.assert_array_equal(rows, ref[[[5, 0], [2, 2]]])
    x = np.random.default_rng(5).standard_normal((2, 3, 512)).astype(np.float32)
    want = x.astype(np.float64) @ ref.T.astype(np.float64)
    got = np.array(w.matmul(mx.array(x)))
    assert got.shape == (2, 3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("ggml_type", AFFINE + SUB_BLOCKS, ids=lambda t: t.name)
def test_float16_constants(ggml_type: GGMLType) -> None:
    """What a stage holds: constants in float16, exact for Q5_0/Q5_1 (d, m, -16d), once
    rounded for the K-quants' products; the bytes held against the GGUF bytes."""
    t = random_tensor(ggml_type, (512, 8), seed=6)
    w = load_tensor(t, scale_dtype=mx.float16)
    ref = reference(t)
    got = np.array(w.dequantize())
    if ggml_type in (GGMLType.Q5_0, GGMLType.Q5_1):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    else:
        # each weight is (scale * q + bias) with both constants off by <= 2^-11 relative
        step = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=0, atol=F16_CONSTANTS_RTOL * 2 * step)
        assert not np.array_equal(got, ref)  # (rounded indeed: random d*sc need > 11 bits)
    x = np.random.default_rng(7).standard_normal((1, 512)).astype(np.float32)
    want = x.astype(np.float64) @ got.T.astype(np.float64)
    np.testing.assert_allclose(np.array(w.matmul(mx.array(x))), want, rtol=1e-5, atol=1e-4)
    held = sum(a.nbytes for a in {id(a): a for a in w.arrays()}.values())
    ratio = held / t.data.nbytes
    print(f"{ggml_type.name}: {held} bytes held for {t.data.nbytes} GGUF bytes ({ratio:.3f}x)")
    # MLX's 16-bit scale and bias per 32 weights (Q2_K: per 16) against GGUF's packing
    limit = {GGMLType.Q5_0: 1.10, GGMLType.Q5_1: 1.0, GGMLType.Q4_K: 1.12, GGMLType.Q5_K: 1.10}
    limit |= {GGMLType.Q6_K: 1.07, GGMLType.Q3_K: 1.164, GGMLType.Q2_K: 1.53}
    assert ratio <= limit[ggml_type] + 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_layout(bits: int) -> None:
    q = np.random.default_rng(bits).integers(0, 2**bits, (7, 32), dtype=np.uint8)
    packed = kquants.pack_bits(q, bits)
    assert packed.shape == (7, bits) and packed.dtype == np.uint32
    ones, zeros = mx.ones((7, 1)), mx.zeros((7, 1))
    got = mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(got), q.astype(np.float32))


def test_sizes_are_checked() -> None:
    t = random_tensor(GGMLType.Q4_K, (256, 2))
    with pytest.raises(ValueError, match="bytes of data"):
        load_tensor(TensorData(t.name, t.ggml_type, (256, 3), t.data))
    with pytest.raises(ValueError, match="not a multiple"):
        load_tensor(TensorData(t.name, GGMLType.Q6_K, (128, 2), t.data[:210]))


def test_converted_weights_do_not_alias_input() -> None:
    for ggml_type in (GGMLType.Q4_K, GGMLType.Q6_K):
        t = random_tensor(ggml_type, (256, 2))
        w = load_tensor(t)
        before = np.array(w.dequantize())
        t.data[:] = 0
        np.testing.assert_array_equal(np.array(w.dequantize()), before)


@pytest.mark.parametrize(
    "ggml_type", [GGMLType.IQ4_XS, GGMLType.Q8_K, GGMLType.TQ1_0], ids=lambda t: t.name
)
def test_unsupported_types_are_named_at_add_time(ggml_type: GGMLType) -> None:
    types = {"token_embd.weight": int(GGMLType.Q8_0), "blk.3.ffn_up.weight": int(ggml_type)}
    with pytest.raises(UnsupportedModelError, match=rf"blk\.3\.ffn_up\.weight.*{ggml_type.name}"):
        check_tensor_types(types)
    check_tensor_types({t.name: int(t) for t in AFFINE + SUB_BLOCKS})
    with pytest.raises(UnsupportedModelError, match="unknown tensor type 77"):
        check_tensor_types({"w": 77})


def test_join_concatenates_alike_weights_and_stacks_the_rest() -> None:
    """q/k/v or gate/up become one weight: concatenated where kind and layout agree (one
    matmul), else side by side; the product and row lookups are the parts'."""
    from llm_omninode.backend.quant import StackedWeight, join

    parts = [
        load_tensor(random_tensor(GGMLType.Q4_K, (256, 3), seed=10)),
        load_tensor(random_tensor(GGMLType.Q4_K, (256, 5), seed=11)),
        load_tensor(random_tensor(GGMLType.Q6_K, (256, 2), seed=12)),
        load_tensor(random_tensor(GGMLType.Q6_K, (256, 4), seed=13)),
    ]
    assert isinstance(join(parts[:2]), QuantizedWeight)
    assert isinstance(join(parts[2:]), SubBlockWeight)
    mixed = join(parts)
    assert isinstance(mixed, StackedWeight) and mixed.shape == (14, 256)
    whole = np.concatenate([np.array(p.dequantize()) for p in parts])
    np.testing.assert_array_equal(np.array(join(parts[:2]).dequantize()), whole[:8])
    np.testing.assert_array_equal(np.array(join(parts[2:]).dequantize()), whole[8:])
    ids = mx.array([13, 0, 7, 8, 3])
    np.testing.assert_array_equal(np.array(mixed.take_rows(ids)), whole[[13, 0, 7, 8, 3]])
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    want = x.astype(np.float64) @ whole.T.astype(np.float64)
    np.testing.assert_allclose(np.array(mixed.matmul(mx.array(x))), want, rtol=1e-5, atol=1e-4)
    assert join(parts[:1]) is parts[0]
