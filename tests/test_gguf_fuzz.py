"""Property-based fuzzing of the GGUF reader: mutated copies of a small valid file must either
parse into something self-consistent or raise GGUFError -- never another exception, a hang or a
crash, and never an allocation the file's bytes cannot back."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_omninode.backend.ggml_types import GGMLType, GGUFValueType
from llm_omninode.backend.gguf import GGUFError, parse_gguf
from llm_omninode.backend.gguf_write import GGUFValue, gguf_bytes

VT = GGUFValueType


def _seed() -> bytes:
    rng = np.random.default_rng(0)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 1,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.tokens": ["<s>", "a", "bc", "\u0120d"],
        "tokenizer.ggml.token_type": GGUFValue([3, 1, 1, 1], VT.ARRAY, VT.INT32),
        "nested": GGUFValue([[1, 2], ["x"]], VT.ARRAY, VT.ARRAY),
        "i64": GGUFValue(-5, VT.INT64),
        "f64": GGUFValue(0.25, VT.FLOAT64),
        "u8": GGUFValue(7, VT.UINT8),
    }
    tensors = [
        ("token_embd.weight", GGMLType.Q8_0, (32, 2), rng.integers(0, 256, 68, dtype=np.uint8)),
        ("blk.0.attn_norm.weight", GGMLType.F32, (8,), rng.standard_normal(8).astype(np.float32)),
        ("output.weight", GGMLType.F16, (4, 2), rng.standard_normal(8).astype(np.float16)),
    ]
    return gguf_bytes(metadata, tensors)


SEED = _seed()


def _field_offsets(buf: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dim and offset field of the valid seed.

    Overwriting exactly these is what the CVEs did; random positions rarely hit them."""
    fields: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    pos = 24

    def u32() -> int:
        nonlocal pos
        fields.append((pos, 4))
        pos += 4
        return struct.unpack_from("<I", buf, pos - 4)[0]

    def u64() -> int:
        nonlocal pos
        fields.append((pos, 8))
        pos += 8
        return struct.unpack_from("<Q", buf, pos - 8)[0]

    def string() -> None:
        nonlocal pos
        n = u64()  # not `pos += u64()`: that would read pos before u64() advances it
        pos += n

    def value(t: int) -> None:
        nonlocal pos
        if t == VT.STRING:
            string()
        elif t == VT.ARRAY:
            it, n = u32(), u64()
            for _ in range(n):
                value(it)
        else:
            pos += struct.calcsize("<" + "BbHhIif?__Qqd"[t])

    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    for _ in range(n_kv):
        string()
        value(u32())
    for _ in range(n_tensors):
        string()
        for _ in range(u32()):
            u64()
        u32()
        u64()
    return fields


FIELDS = _field_offsets(SEED)
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    5,
    13,
    31,
    32,
    63,
    64,
    255,
    len(SEED),
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**61,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]

flip = st.tuples(st.just("flip"), st.integers(0, len(SEED) - 1), st.integers(1, 255))
setbyte = st.tuples(st.just("set"), st.integers(0, len(SEED) - 1), st.integers(0, 255))
truncate = st.tuples(st.just("truncate"), st.integers(0, len(SEED) - 1), st.just(0))
insert = st.tuples(st.just("insert"), st.integers(0, len(SEED)), st.binary(min_size=1, max_size=16))
delete = st.tuples(st.just("delete"), st.integers(0, len(SEED) - 1), st.integers(1, 16))
field = st.tuples(st.just("field"), st.sampled_from(FIELDS), st.sampled_from(INTERESTING))
field_any = st.tuples(st.just("field"), st.sampled_from(FIELDS), st.integers(0, 2**64 - 1))
anywhere = st.tuples(st.just("u64"), st.integers(0, len(SEED) - 8), st.sampled_from(INTERESTING))
mutation = st.one_of(flip, setbyte, truncate, insert, delete, field, field, field_any, anywhere)


def _overwrite(b: bytearray, off: int, width: int, value: int) -> None:
    # Never grows the buffer: after an insertion or deletion a field offset may point anywhere.
    chunk = (value % (1 << (8 * width))).to_bytes(width, "little")[: max(0, len(b) - off)]
    b[off : off + len(chunk)] = chunk


def mutate(buf: bytes, mutations: list[tuple]) -> bytes:
    b = bytearray(buf)
    for kind, where, what in mutations:
        if kind == "field":
            _overwrite(b, where[0], where[1], what)
        elif kind == "u64":
            _overwrite(b, where, 8, what)
        elif kind == "flip" and where < len(b):
            b[where] ^= what
        elif kind == "set" and where < len(b):
            b[where] = what
        elif kind == "truncate":
            del b[where:]
        elif kind == "insert":
            b[where:where] = what
        elif kind == "delete":
            del b[where : where + what]
    return bytes(b)


def check(buf: bytes) -> None:
    try:
        g = parse_gguf(buf)
    except GGUFError as e:
        assert 0 <= e.offset <= len(buf), e
        assert e.problem and str(e.offset) in str(e)
        return
    # It parsed: then everything it promises must hold.
    assert g.version in (2, 3)
    assert g.alignment & (g.alignment - 1) == 0 and g.data_offset % g.alignment == 0
    spans = []
    for name, info in g.tensors.items():
        assert name and 1 <= len(info.shape) <= 4 and all(d > 0 for d in info.shape)
        assert info.offset % g.alignment == 0
        assert g.data_offset + info.offset + info.nbytes <= len(buf)
        view = g.tensor_data(name)
        assert view.nbytes == info.nbytes
        spans.append((info.offset, info.offset + info.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert set(g.metadata) == set(g.metadata_types) and all(g.metadata)


def test_seed_is_valid_and_fields_were_found() -> None:
    g = parse_gguf(SEED)
    assert len(g.tensors) == 3 and len(g.metadata) == 10
    assert len(FIELDS) > 40


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_raise_only_gguf_error(mutations: list[tuple]) -> None:
    check(mutate(SEED, mutations))


@pytest.mark.parametrize("value", [0x00, 0xFF, 0x80, 0x7F])
def test_every_byte_overwritten(value: int) -> None:
    """Deterministic sweep: each byte of the header set to a boundary value in turn."""
    g = parse_gguf(SEED)
    for i in range(g.data_offset):
        b = bytearray(SEED)
        b[i] = value
        check(bytes(b))


def test_every_field_set_to_every_interesting_value() -> None:
    for off, width in FIELDS:
        for v in INTERESTING:
            b = bytearray(SEED)
            _overwrite(b, off, width, v)
            check(bytes(b))


def test_every_truncation() -> None:
    g = parse_gguf(SEED)
    end = g.data_offset + max(t.offset + t.nbytes for t in g.tensors.values())
    assert end < len(SEED)  # the last tensor is padded
    for n in range(end):
        with pytest.raises(GGUFError):
            parse_gguf(SEED[:n])
    # the padding after the last tensor is not needed to read it
    for n in range(end, len(SEED)):
        assert len(parse_gguf(SEED[:n]).tensors) == 3
