"""The GGUF writer: typing rules, validation, and write -> read round trips (checked by our reader
and by the independent `gguf` package)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_omninode.backend.ggml_types import GGMLType, GGUFValueType, tensor_nbytes
from llm_omninode.backend.gguf import TensorInfo, open_gguf, parse_gguf
from llm_omninode.backend.gguf_write import GGUFValue, gguf_bytes, write_gguf

VT = GGUFValueType

TYPED = {
    "u8": GGUFValue(255, VT.UINT8),
    "i8": GGUFValue(-128, VT.INT8),
    "u16": GGUFValue(65535, VT.UINT16),
    "i16": GGUFValue(-32768, VT.INT16),
    "u32": GGUFValue(2**32 - 1, VT.UINT32),
    "i32": GGUFValue(-(2**31), VT.INT32),
    "f32": GGUFValue(1.5, VT.FLOAT32),
    "bool": GGUFValue(False, VT.BOOL),
    "str": GGUFValue("ünïcode ✓", VT.STRING),
    "u64": GGUFValue(2**64 - 1, VT.UINT64),
    "i64": GGUFValue(-(2**63), VT.INT64),
    "f64": GGUFValue(math.pi, VT.FLOAT64),
    "arr_i32": GGUFValue([3, 1, -1], VT.ARRAY, VT.INT32),
    "arr_empty": GGUFValue([], VT.ARRAY, VT.STRING),
    "arr_f64": GGUFValue([0.1, 0.2], VT.ARRAY, VT.FLOAT64),
    "arr_nested": GGUFValue([[1, 2], ["a", "b"], [[True]]], VT.ARRAY, VT.ARRAY),
}


def rand_tensors(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (
            "token_embd.weight",
            GGMLType.Q8_0,
            (64, 3),
            rng.integers(0, 256, 3 * 2 * 34, dtype=np.uint8),
        ),
        ("blk.0.attn_norm.weight", GGMLType.F32, (64,), rng.standard_normal(64).astype(np.float32)),
        (
            "blk.0.attn_q.weight",
            GGMLType.F16,
            (64, 5),
            rng.standard_normal((5, 64)).astype(np.float16),
        ),
        ("blk.0.ffn_up.weight", GGMLType.Q4_0, (32, 2), bytes(range(36))),
        ("blk.0.ffn_down.weight", GGMLType.Q4_K, (256,), bytearray(144)),
        ("output_norm.weight", GGMLType.BF16, (8, 1, 1, 2), memoryview(bytes(32))),
    ]


def as_bytes(data) -> bytes:
    return data.tobytes() if isinstance(data, np.ndarray) else bytes(data)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("alignment", [32, 1, 8, 64, 4096])
def test_round_trip(version: int, alignment: int) -> None:
    tensors = rand_tensors()
    buf = gguf_bytes(TYPED, tensors, version=version, alignment=alignment)
    g = parse_gguf(buf)
    assert g.version == version and g.alignment == alignment
    assert g.data_offset % alignment == 0 and len(buf) % alignment == 0
    md = dict(g.metadata)
    if alignment != 32:  # written automatically, first
        assert next(iter(md)) == "general.alignment"
        assert md.pop("general.alignment") == alignment
        assert g.metadata_types["general.alignment"] == (VT.UINT32, None)
    assert list(md) == list(TYPED)
    for key, gv in TYPED.items():
        assert g.metadata_types[key] == (gv.type, gv.item_type), key
        assert md[key] == gv.value, key
    assert list(g.tensors) == [t[0] for t in tensors]
    for name, gtype, shape, data in tensors:
        info = g.tensors[name]
        assert (info.ggml_type, info.shape) == (gtype, shape)
        assert info.offset % alignment == 0 and info.nbytes == tensor_nbytes(gtype, shape)
        assert g.tensor_data(name).tobytes() == as_bytes(data)


def test_plain_values_are_typed_by_rule() -> None:
    md = {
        "bool": True,
        "small": 5,
        "zero": 0,
        "u32max": 2**32 - 1,
        "big": 2**32,
        "neg": -1,
        "huge": 2**64 - 1,
        "float": 1e-5,
        "str": "x",
        "raw": b"\xffraw",
        "ints": [1, 2, 3],
        "mixed_sign": [0, -1],
        "floats": [1.0, 2],
        "strs": ["a", "b"],
        "bools": [True, False],
        "nested": [[1], ["x"]],
        "np_scalar": np.float64(0.5),
        "np_int": np.int16(-3),
        "np_array": np.array([1, 2], dtype=np.uint16),
        "tuple": (1, 2),
    }
    g = parse_gguf(gguf_bytes(md))
    t = {k: v[0] if v[1] is None else v for k, v in g.metadata_types.items()}
    assert t == {
        "bool": VT.BOOL,
        "small": VT.UINT32,
        "zero": VT.UINT32,
        "u32max": VT.UINT32,
        "big": VT.INT64,
        "neg": VT.INT64,
        "huge": VT.UINT64,
        "float": VT.FLOAT32,
        "str": VT.STRING,
        "raw": VT.STRING,
        "ints": (VT.ARRAY, VT.UINT32),
        "mixed_sign": (VT.ARRAY, VT.INT64),
        "floats": (VT.ARRAY, VT.FLOAT32),
        "strs": (VT.ARRAY, VT.STRING),
        "bools": (VT.ARRAY, VT.BOOL),
        "nested": (VT.ARRAY, VT.ARRAY),
        "np_scalar": VT.FLOAT64,
        "np_int": VT.INT16,
        "np_array": (VT.ARRAY, VT.UINT16),
        "tuple": (VT.ARRAY, VT.UINT32),
    }
    assert g.metadata["float"] == struct.unpack("<f", struct.pack("<f", 1e-5))[0]
    assert g.metadata["raw"] == "\ufffdraw"  # raw bytes are written as is; the reader replaces
    assert g.metadata["floats"] == [1.0, 2.0]
    assert g.metadata["nested"] == [[1], ["x"]]
    assert g.metadata["np_array"] == [1, 2] and g.metadata["tuple"] == [1, 2]


def test_write_gguf_to_a_path_and_read_with_mmap(tmp_path) -> None:
    p = tmp_path / "m.gguf"
    tensors = rand_tensors(1)
    write_gguf(p, {"general.architecture": "llama"}, tensors, alignment=64)
    assert p.read_bytes() == gguf_bytes({"general.architecture": "llama"}, tensors, alignment=64)
    with open_gguf(p) as g:
        assert g.path == str(p) and g.alignment == 64
        for name, _, _, data in tensors:
            assert g.tensor_data(name).tobytes() == as_bytes(data)


def test_non_contiguous_arrays_are_written_in_c_order() -> None:
    a = np.arange(64, dtype=np.float32).reshape(8, 8).T  # Fortran-ordered view
    g = parse_gguf(gguf_bytes({}, [("t", GGMLType.F32, (8, 8), a)]))
    assert g.tensor_data("t").tobytes() == np.ascontiguousarray(a).tobytes()


def test_no_tensors_no_metadata() -> None:
    buf = gguf_bytes({})
    assert len(buf) == 32 and buf[:4] == b"GGUF"
    g = parse_gguf(buf)
    assert (g.metadata, g.tensors) == ({}, {})


def test_readable_by_the_gguf_package(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "m.gguf"
    md = {k: v for k, v in TYPED.items() if k not in ("arr_nested", "arr_empty")}
    md["general.architecture"] = "llama"
    tensors = rand_tensors(2)
    write_gguf(p, md, tensors, alignment=64)
    ref = gguf.GGUFReader(str(p))
    assert ref.alignment == 64
    for key, gv in md.items():
        field = ref.fields[key]
        got = field.contents()
        want = gv
        if isinstance(gv, GGUFValue):
            assert int(field.types[0]) == gv.type, key
            want = gv.value
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6)
        elif isinstance(want, list) and want and isinstance(want[0], float):
            assert got == pytest.approx(want)
        else:
            assert got == want, key
    with open_gguf(p) as g:
        for rt in ref.tensors:
            info = g.tensors[rt.name]
            assert int(rt.tensor_type) == info.ggml_type
            assert tuple(int(d) for d in rt.shape) == info.shape
            assert rt.data_offset == g.data_offset + info.offset
            assert np.asarray(rt.data).tobytes() == g.tensor_data(rt.name).tobytes()


# --- validation: the writer refuses what the reader would refuse -----------------------------


def one(name="t", gtype=GGMLType.F32, shape=(8,), data=bytes(32)):
    return [(name, gtype, shape, data)]


@pytest.mark.parametrize(
    ("kwargs", "tensors", "error", "fragment"),
    [
        ({}, one(data=bytes(31)), ValueError, "31 bytes of data, but F32 \\(8,\\) needs 32"),
        ({}, one(gtype=GGMLType.Q4_0, shape=(32,), data=bytes(20)), ValueError, "needs 18"),
        ({}, one(shape=(8, 0)), ValueError, "1 to 4 positive dims"),
        ({}, one(shape=()), ValueError, "1 to 4 positive dims"),
        ({}, one(shape=(1, 1, 1, 1, 8)), ValueError, "1 to 4 positive dims"),
        ({}, one(shape=(2**40, 2**40)), ValueError, "too many elements"),
        ({}, one(gtype=GGMLType.Q8_0, shape=(16,)), ValueError, "not a multiple of the Q8_0"),
        ({}, one(name=""), ValueError, "empty tensor name"),
        ({}, one(name="a\0b"), ValueError, "contains a NUL byte"),
        ({}, one(name="x" * 64), ValueError, "64 bytes, more than 63"),
        ({}, one(name=3), TypeError, "tensor name must be a str"),
        ({}, one() + one(), ValueError, "duplicate tensor name 't'"),
        ({}, one(gtype=4), ValueError, "4"),
        ({}, one(data="text"), TypeError, "data must be bytes or a NumPy array"),
        ({"version": 1}, [], ValueError, "versions 2 and 3"),
        ({"alignment": 48}, [], ValueError, "power of two"),
        ({"alignment": 0}, [], ValueError, "power of two"),
        ({"alignment": 2**21}, [], ValueError, "power of two"),
    ],
)
def test_bad_tensors_and_options(kwargs, tensors, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        gguf_bytes({}, tensors, **kwargs)


@pytest.mark.parametrize(
    ("metadata", "error", "fragment"),
    [
        ({"": 1}, ValueError, "empty metadata key"),
        ({1: 1}, TypeError, "metadata key must be a str"),
        ({"k": []}, ValueError, "empty array has no item type"),
        ({"k": None}, TypeError, "no GGUF type for NoneType"),
        ({"k": {"a": 1}}, TypeError, "no GGUF type for dict"),
        ({"k": [1, "a"]}, TypeError, "mixes integers"),
        ({"k": 2**64}, ValueError, "does not fit in 64 bits"),
        ({"k": -(2**63) - 1}, ValueError, "does not fit in 64 bits"),
        ({"k": GGUFValue(256, VT.UINT8)}, ValueError, "256 does not fit in UINT8"),
        ({"k": GGUFValue(-1, VT.UINT32)}, ValueError, "does not fit in UINT32"),
        ({"k": GGUFValue(1.5, VT.INT32)}, TypeError, "must be an int"),
        ({"k": GGUFValue("1", VT.FLOAT32)}, TypeError, "must be a number"),
        ({"k": GGUFValue(1e39, VT.FLOAT32)}, ValueError, "cannot encode as FLOAT32"),
        ({"k": GGUFValue(2, VT.BOOL)}, TypeError, "must be a bool"),
        ({"k": GGUFValue(1, VT.STRING)}, TypeError, "must be str or bytes"),
        ({"k": GGUFValue([1], VT.ARRAY)}, ValueError, "needs an item_type"),
        ({"k": GGUFValue("abc", VT.ARRAY, VT.UINT8)}, TypeError, "must be a list"),
        ({"k": GGUFValue([1, 300], VT.ARRAY, VT.UINT8)}, ValueError, "300 does not fit"),
        ({"k": GGUFValue([1], VT.ARRAY, VT.ARRAY)}, TypeError, "not an array"),
        ({"k": [[[[[1]]]]]}, ValueError, "nested deeper than 4"),
        ({"general.alignment": 64}, ValueError, "disagrees with alignment=32"),
        ({"general.alignment": GGUFValue(32, VT.UINT64)}, ValueError, "same UINT32"),
    ],
)
def test_bad_metadata(metadata, error, fragment) -> None:
    with pytest.raises(error, match=fragment):
        gguf_bytes(metadata)


def test_explicit_general_alignment_is_kept_in_place() -> None:
    g = parse_gguf(gguf_bytes({"a": 1, "general.alignment": 64, "b": 2}, one(), alignment=64))
    assert list(g.metadata) == ["a", "general.alignment", "b"] and g.alignment == 64
    g = parse_gguf(gguf_bytes({"general.alignment": 32}))
    assert g.metadata == {"general.alignment": 32}


def test_bad_input_leaves_no_file(tmp_path) -> None:
    p = tmp_path / "x.gguf"
    with pytest.raises(ValueError):
        write_gguf(p, {}, one(data=bytes(3)))
    assert not p.exists()


def test_tensor_info_offsets_follow_padding() -> None:
    tensors = [("a", GGMLType.F32, (3,), bytes(12)), ("b", GGMLType.I8, (5,), bytes(5))]
    g = parse_gguf(gguf_bytes({}, tensors, alignment=16))
    assert g.tensors["a"] == TensorInfo("a", GGMLType.F32, (3,), 0, 12)
    assert g.tensors["b"] == TensorInfo("b", GGMLType.I8, (5,), 16, 5)


# --- property: any well-typed metadata survives a round trip --------------------------------

_SCALARS = {
    VT.UINT8: st.integers(0, 2**8 - 1),
    VT.INT8: st.integers(-(2**7), 2**7 - 1),
    VT.UINT16: st.integers(0, 2**16 - 1),
    VT.INT16: st.integers(-(2**15), 2**15 - 1),
    VT.UINT32: st.integers(0, 2**32 - 1),
    VT.INT32: st.integers(-(2**31), 2**31 - 1),
    VT.UINT64: st.integers(0, 2**64 - 1),
    VT.INT64: st.integers(-(2**63), 2**63 - 1),
    VT.FLOAT32: st.floats(width=32, allow_nan=False),
    VT.FLOAT64: st.floats(allow_nan=False),
    VT.BOOL: st.booleans(),
    VT.STRING: st.text(st.characters(exclude_categories=("Cs",)), max_size=20),  # UTF-8 only
}


def _typed_value(depth: int = 0) -> st.SearchStrategy[GGUFValue]:
    scalar = st.sampled_from(list(_SCALARS)).flatmap(
        lambda t: _SCALARS[t].map(lambda v, t=t: GGUFValue(v, t))
    )
    flat_array = st.sampled_from(list(_SCALARS)).flatmap(
        lambda t: st.lists(_SCALARS[t], max_size=6).map(lambda v, t=t: GGUFValue(v, VT.ARRAY, t))
    )
    options = [scalar, flat_array]
    if depth < 2:
        options.append(
            st.lists(_typed_value(depth + 1).filter(lambda g: g.type == VT.ARRAY), max_size=3).map(
                lambda v: GGUFValue(v, VT.ARRAY, VT.ARRAY)
            )
        )
    return st.one_of(options)


def _plain(v):
    return [_plain(x) for x in v.value] if isinstance(v, GGUFValue) else v


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(
        st.text(
            st.characters(exclude_characters="\0", exclude_categories=("Cs",)),
            min_size=1,
            max_size=12,
        ),  # a key is UTF-8: no lone surrogates
        _typed_value(),
        max_size=6,
    ),
    st.sampled_from([2, 3]),
)
def test_round_trip_property(metadata: dict[str, GGUFValue], version: int) -> None:
    metadata.pop("general.alignment", None)
    g = parse_gguf(gguf_bytes(metadata, version=version))
    assert list(g.metadata) == list(metadata)
    for key, gv in metadata.items():
        assert g.metadata_types[key] == (gv.type, gv.item_type)
        want = _plain(gv) if gv.item_type == VT.ARRAY else gv.value
        assert g.metadata[key] == want
