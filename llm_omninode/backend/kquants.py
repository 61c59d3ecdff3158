"""GGUF K-quants and 5-bit quants, decoded once at load into something MLX can run.

Where a GGUF block splits into groups of 32 weights that each read ``w = scale * q + bias``
with unsigned integer ``q``, it becomes an MLX affine-quantized matrix with the same integers
and per-group constants, so no value changes (MLX packs ``bits`` per element as one
little-endian bit stream):

- Q5_0  w = d*(q - 16)          -> 5 bits, scale d,      bias -16d
- Q5_1  w = d*q + m             -> 5 bits, scale d,      bias m
- Q4_K  w = d*sc*q - dmin*mn    -> 4 bits, scale d*sc,   bias -dmin*mn  (8 groups of 32)
- Q5_K  the same with 5-bit q   -> 5 bits

Q6_K, Q3_K and Q2_K give each 16 weights their own scale, and MLX's smallest group is 32. Their
integers are packed the same way (groups of 32, each holding two sub-blocks); the constants stay
per sub-block and quant.SubBlockWeight multiplies each half of a group with its own (see there):

- Q6_K  w = d*sc*(q - 32)       -> 6 bits, scale d*sc per 16 (sc int8)
- Q3_K  w = d*(sc - 32)*(q - 4) -> 3 bits, scale d*(sc - 32) per 16
- Q2_K  w = d*sc*q - dmin*m     -> 2 bits, scale d*sc, bias -dmin*m per 16

Block layouts follow ggml's ``block_q*`` structs (ggml-common.h). Everything is vectorised
NumPy over all blocks of a tensor; sizes are checked by ``quant._blocks`` before we get here.
"""

from __future__ import annotations

import numpy as np

from .ggml_types import GGMLType

# Bits per weight of the types that become MLX affine groups of 32.
AFFINE_BITS = {GGMLType.Q5_0: 5, GGMLType.Q5_1: 5, GGMLType.Q4_K: 4, GGMLType.Q5_K: 5}
# Bits per weight of the types with a scale per 16 weights (quant.SubBlockWeight).
SUB_BLOCK_BITS = {GGMLType.Q6_K: 6, GGMLType.Q3_K: 3, GGMLType.Q2_K: 2}


def f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """A float16 field of every block as float32 (exact), shape (n_blocks,)."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2")[:, 0].astype(np.float32)


def _bits_of(qh: np.ndarray) -> np.ndarray:
    """Little-endian bits of each row of bytes: (n, k) uint8 -> (n, 8k) uint8 of 0/1."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout of 32 weights in 16 bytes: low nibbles are 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (n, 32) below 2**bits -> MLX's packed uint32 words (n, bits).

    Element i of a group occupies bits [i*bits, (i+1)*bits) of the group's little-endian
    stream of ``bits`` words; one pass per element column (32 vectorised ops, not per group).
    """
    words = np.zeros((q.shape[0], bits), np.uint32)
    for i in range(32):
        col = q[:, i].astype(np.uint32)
        w, o = divmod(i * bits, 32)
        words[:, w] |= col << np.uint32(o)  # bits past 32 fall off here...
        if o + bits > 32:
            words[:, w + 1] |= col >> np.uint32(32 - o)  # ...and land in the next word
    return words


# ---- affine types: (q (n_groups, 32) uint8, scale (n_groups,), bias (n_groups,)) ---------------
def _q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d (f16), qh (32 high bits, bit j for weight j), qs (16 bytes of low nibbles)
    d = f16_field(blocks, 0)
    q = _nibbles(blocks[:, 6:22]) | (_bits_of(blocks[:, 2:6]) << 4)
    return q, d, -16.0 * d


def _q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d, m (f16), qh (4 bytes), qs (16 bytes)
    d, m = f16_field(blocks, 0), f16_field(blocks, 2)
    q = _nibbles(blocks[:, 8:24]) | (_bits_of(blocks[:, 4:8]) << 4)
    return q, d, m


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; bytes 8-11 hold the low nibbles of
    scale j+4 (low) and min j+4 (high), whose top two bits are the top bits of bytes j, j+4.
    """
    p = packed.astype(np.uint8)
    sc = np.empty((p.shape[0], 8), np.uint8)
    mn = np.empty((p.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = p[:, 0:4] & 63, p[:, 4:8] & 63
    sc[:, 4:] = (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    return sc, mn


def _k_groups(blocks: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group scale/bias of Q4_K/Q5_K super-blocks, with their q (n, 8, 32)."""
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)
    sc, mn = _k_scales(blocks[:, 4:16])
    scale = d[:, None] * sc.astype(np.float32)
    bias = -(dmin[:, None] * mn.astype(np.float32))
    return q.reshape(-1, 32), scale.reshape(-1), bias.reshape(-1)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> (n, 8, 32): chunk c of 32 bytes gives group 2c (low) and 2c+1 (high)."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d, dmin (f16), scales (12 bytes), qs (128 bytes)
    return _k_groups(blocks, _k_nibbles(blocks[:, 16:144]))


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d, dmin (f16), scales (12), qh (32: bit g of byte l is the 5th bit of weight l of
    # group g), qs (128)
    low = _k_nibbles(blocks[:, 48:176])
    high = _bits_of(blocks[:, 16:48]).reshape(-1, 32, 8).transpose(0, 2, 1)  # (n, g, l)
    return _k_groups(blocks, low | (high << 4))


_AFFINE_DECODERS = {
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
}


def affine_groups(
    ggml_type: GGMLType, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(packed uint32 (n_groups, bits), scales f32, biases f32, bits) of an affine type."""
    q, scale, bias = _AFFINE_DECODERS[ggml_type](blocks)
    bits = AFFINE_BITS[ggml_type]
    return pack_bits(q, bits), scale.astype(np.float32), bias.astype(np.float32), bits


# ---- 16-weight sub-block types: (u (n, 256) uint8, scale (n, 16), zero, minimum (n, 16)) ------
# w = scale * (u - zero) - minimum for each sub-block of 16 consecutive weights, as ggml
# computes it (d * sc first, then * q).
def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    # ql (128: low 4 bits), qh (64: high 2 bits), scales (16 int8), d (f16)
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = f16_field(blocks, 208)
    # each half of 128 weights: ql bytes [64h, 64h+64), qh bytes [32h, 32h+32); weight
    # 32j + l of the half (j = 0..3) takes ql byte l + 32*(j % 2), nibble j // 2, and the
    # 2 bits at 2j of qh byte l; sub-block 8h + 2j + l // 16 follows weight order
    ql = ql.reshape(-1, 2, 2, 32)  # (n, half, j % 2, l)
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
    qh = qh.reshape(-1, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    u = low | (high << 4)  # (n, half, j, l), q = u - 32
    return u.reshape(-1, 256), d[:, None] * sc, 32, None


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 six-bit scales (minus 32): low nibbles from bytes 0-7, top 2 bits
    from bytes 8-11 (scale j takes bits 2*(j // 4) of byte 8 + j % 4)."""
    p = packed.astype(np.uint8)
    low = np.concatenate([p[:, 0:8] & 0x0F, p[:, 0:8] >> 4], axis=1)  # scales 0-7, 8-15
    high = (p[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3
    return (low | (high.reshape(-1, 16) << 4)).astype(np.float32) - 32


def _q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    # hmask (32), qs (64), scales (12), d (f16)
    hmask, qs = blocks[:, 0:32], blocks[:, 32:96]
    sc = _q3_k_scales(blocks[:, 96:108])
    d = f16_field(blocks, 108)
    # weight 128h + 32j + l: 2 bits at 2j of qs byte 32h + l; its high bit is bit 4h + j of
    # hmask byte l, and a clear high bit subtracts 4 (so q = low + 4*high - 4)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    low = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, h, j, l)
    hbits = _bits_of(hmask).reshape(-1, 32, 2, 4).transpose(0, 2, 3, 1)  # (n, h, j, l)
    u = low | (hbits.astype(np.uint8) << 2)
    return u.reshape(-1, 256), d[:, None] * sc, 4, None


def _q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    # scales (16: scale low nibble, min high nibble), qs (64), d, dmin (f16)
    sc = blocks[:, 0:16]
    qs = blocks[:, 16:80]
    d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    u = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3  # (n, h, j, l)
    dl = d[:, None] * (sc & 0x0F).astype(np.float32)
    ml = dmin[:, None] * (sc >> 4).astype(np.float32)
    return u.reshape(-1, 256), dl, 0, ml


def sub_blocks(
    ggml_type: GGMLType, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, int]:
    """(packed uint32 (n_groups, bits) of the unsigned integers in MLX groups of 32, scale
    (n_sub_blocks,) float32, zero, minimum (n_sub_blocks,) or None, bits) of a sub-block type:
    ``w = scale * (u - zero) - minimum`` for each 16 weights."""
    u, scale, zero, minimum = _SUB_BLOCK_DECODERS[ggml_type](blocks)
    bits = SUB_BLOCK_BITS[ggml_type]
    m = None if minimum is None else minimum.reshape(-1).astype(np.float32)
    return pack_bits(u.reshape(-1, 32), bits), scale.reshape(-1).astype(np.float32), zero, m, bits


def _sub_block_values(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    u, scale, zero, minimum = _SUB_BLOCK_DECODERS[ggml_type](blocks)
    q = u.reshape(-1, 16, 16).astype(np.float32) - zero
    w = scale[..., None] * q
    if minimum is not None:
        w = w - minimum[..., None]
    return w.reshape(-1, 256)


_SUB_BLOCK_DECODERS = {GGMLType.Q6_K: _q6_k, GGMLType.Q3_K: _q3_k, GGMLType.Q2_K: _q2_k}


def dequantize_blocks(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    """float32 values (n_blocks * block_elems,) of any type this module decodes."""
    if ggml_type in _SUB_BLOCK_DECODERS:
        return _sub_block_values(ggml_type, blocks).reshape(-1)
    q, scale, bias = _AFFINE_DECODERS[ggml_type](blocks)
    return (scale[:, None] * q.astype(np.float32) + bias[:, None]).reshape(-1)


SUPPORTED = tuple(AFFINE_BITS) + tuple(SUB_BLOCK_BITS)
