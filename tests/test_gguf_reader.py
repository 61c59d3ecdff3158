"""The hardened GGUF reader: one hand-made malformed file per check, the real model against the
`gguf` package as an oracle, zero-copy views and clean closing."""

from __future__ import annotations

import copy
import mmap
import struct
import sys
import time

import numpy as np
import pytest

from llm_omninode.backend.ggml_types import GGMLType, GGUFValueType
from llm_omninode.backend.gguf import GGUFError, GGUFFile, TensorInfo, open_gguf, parse_gguf
from llm_omninode.backend.gguf_write import GGUFValue, gguf_bytes, write_gguf

VT = GGUFValueType

# --- a tiny struct-level builder, so malformed files can say exactly what is wrong -----------


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, v: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", v))


def arr(item_type: int, n: int, payload: bytes = b"") -> bytes:
    """An array value (item type, count, items) without the outer value type."""
    return struct.pack("<IQ", item_type, n) + payload


def ti(
    name: str | bytes, shape: tuple[int, ...], gtype: int = GGMLType.F32, offset: int = 0
) -> bytes:
    return (
        gstr(name)
        + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
        + struct.pack("<IQ", gtype, offset)
    )


def build(
    kvs: list[bytes] = (),
    tis: list[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    magic: bytes = b"GGUF",
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = magic + struct.pack(
        "<IQQ",
        version,
        len(tis) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    head += b"".join(kvs) + b"".join(tis)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def expect(buf: bytes, fragment: str) -> GGUFError:
    with pytest.raises(GGUFError, match=fragment) as ei:
        parse_gguf(buf, path="bad.gguf")
    err = ei.value
    assert 0 <= err.offset <= len(buf)
    assert f"byte {err.offset}" in str(err) and "bad.gguf" in str(err)
    return err


F32_1x8 = ti("w", (8,), GGMLType.F32, 0)
DATA_32 = bytes(range(32))


# --- valid files ------------------------------------------------------------------------------


def test_minimal_files_parse() -> None:
    g = parse_gguf(build())
    assert (g.version, g.alignment, g.metadata, g.tensors) == (3, 32, {}, {})
    # a file with no tensors need not carry the padding up to the data section
    g = parse_gguf(build([kv_u32("a", 1)], alignment=1))
    assert g.metadata == {"a": 1} and g.metadata_types == {"a": (VT.UINT32, None)}
    g = parse_gguf(build(tis=[F32_1x8], data=DATA_32, version=2))
    assert g.version == 2
    assert g.tensors["w"] == TensorInfo("w", GGMLType.F32, (8,), 0, 32)
    assert g.tensor_data("w").tobytes() == DATA_32


def test_all_value_types_and_nested_arrays() -> None:
    kvs = [
        kv("u8", VT.UINT8, b"\xff"),
        kv("i8", VT.INT8, b"\xff"),
        kv("u16", VT.UINT16, struct.pack("<H", 65535)),
        kv("i16", VT.INT16, struct.pack("<h", -2)),
        kv("u32", VT.UINT32, struct.pack("<I", 2**32 - 1)),
        kv("i32", VT.INT32, struct.pack("<i", -(2**31))),
        kv("f32", VT.FLOAT32, struct.pack("<f", 0.5)),
        kv("bool", VT.BOOL, b"\x01"),
        kv("str", VT.STRING, gstr("héllo")),
        kv("u64", VT.UINT64, struct.pack("<Q", 2**64 - 1)),
        kv("i64", VT.INT64, struct.pack("<q", -(2**63))),
        kv("f64", VT.FLOAT64, struct.pack("<d", 1e300)),
        kv("empty", VT.ARRAY, arr(VT.INT32, 0)),
        kv("bools", VT.ARRAY, arr(VT.BOOL, 3, b"\x01\x00\x01")),
        kv("strs", VT.ARRAY, arr(VT.STRING, 2, gstr("a") + gstr(""))),
        kv(
            "nested",
            VT.ARRAY,
            arr(VT.ARRAY, 2, arr(VT.UINT8, 2, b"\x01\x02") + arr(VT.STRING, 1, gstr("x"))),
        ),
    ]
    g = parse_gguf(build(kvs))
    assert g.metadata == {
        "u8": 255,
        "i8": -1,
        "u16": 65535,
        "i16": -2,
        "u32": 2**32 - 1,
        "i32": -(2**31),
        "f32": 0.5,
        "bool": True,
        "str": "héllo",
        "u64": 2**64 - 1,
        "i64": -(2**63),
        "f64": 1e300,
        "empty": [],
        "bools": [True, False, True],
        "strs": ["a", ""],
        "nested": [[1, 2], ["x"]],
    }
    assert g.metadata_types["nested"] == (VT.ARRAY, VT.ARRAY)
    assert g.metadata_types["strs"] == (VT.ARRAY, VT.STRING)
    assert g.metadata_types["f64"] == (VT.FLOAT64, None)
    assert isinstance(g.metadata["bool"], bool)


def test_invalid_utf8_string_values_are_replaced_not_fatal() -> None:
    g = parse_gguf(
        build([kv("s", VT.STRING, gstr(b"a\xffb")), kv("l", VT.ARRAY, arr(8, 1, gstr(b"\xc3")))])
    )
    assert g.metadata == {"s": "a\ufffdb", "l": ["\ufffd"]}


def test_alignment_from_metadata() -> None:
    buf = build([kv_u32("general.alignment", 64)], [F32_1x8], DATA_32, alignment=64)
    g = parse_gguf(buf)
    assert g.alignment == 64 and g.data_offset % 64 == 0
    assert g.tensor_data("w").tobytes() == DATA_32


def test_tensors_may_be_out_of_order_with_gaps() -> None:
    tis = [ti("b", (8,), GGMLType.F32, 64), ti("a", (8,), GGMLType.F32, 0)]
    g = parse_gguf(build(tis=tis, data=bytes(96)))
    assert list(g.tensors) == ["b", "a"]  # file order


# --- malformed files: one per check -----------------------------------------------------------


def test_error_type_and_message() -> None:
    err = expect(b"GGUX" + bytes(20), "bad magic")
    assert isinstance(err, ValueError) and err.offset == 0 and err.path == "bad.gguf"
    assert "bad magic" in err.problem
    again = copy.deepcopy(err)  # goes through __reduce__, as pickling would
    assert (again.offset, again.problem, again.path, str(again)) == (
        err.offset,
        err.problem,
        err.path,
        str(err),
    )
    assert "invalid GGUF at byte 0" in str(GGUFError(0, "x"))


@pytest.mark.parametrize(
    ("buf", "fragment"),
    [
        (b"", "magic needs 4 bytes"),
        (b"GG", "magic needs 4 bytes"),
        (b"GGUF\x03\x00", "version needs 4 bytes"),
        (b"GGUF" + struct.pack("<I", 3) + bytes(5), "tensor count needs 8"),
        (b"GGUF" + struct.pack("<IQ", 3, 0) + bytes(3), "metadata count needs 8"),
    ],
)
def test_truncated_header(buf: bytes, fragment: str) -> None:
    expect(buf, "truncated: " + fragment)


def test_version() -> None:
    expect(build(version=1), "version 1 is not supported")
    expect(build(version=4), "unsupported GGUF version 4")
    expect(build(version=0), "unsupported GGUF version 0")
    expect(build(version=3 << 24), "big-endian")


def test_huge_counts_rejected_before_allocating() -> None:
    expect(build(n_tensors=2**64 - 1), "tensors and 0 metadata entries need at least")
    expect(build(n_kv=2**63), "metadata entries need at least")
    expect(build([kv_u32("a", 1)], n_kv=2, alignment=1), "0 tensors and 2 metadata entries")
    expect(build(tis=[F32_1x8], data=DATA_32, n_tensors=3, alignment=1), "3 tensors")


def test_huge_string_lengths() -> None:
    expect(build([struct.pack("<Q", 2**64 - 1) + b"k"]), "metadata key length .* exceeds")
    expect(
        build([struct.pack("<Q", 1000) + b"key" + bytes(20)]), "truncated: metadata key needs 1000"
    )
    expect(build([kv("k", VT.STRING, struct.pack("<Q", 2**62))]), "truncated: string value of 'k'")
    expect(
        build([kv("k", VT.ARRAY, arr(VT.STRING, 1, struct.pack("<Q", 2**63)))]),
        "truncated: string 0 in array 'k'",
    )
    expect(
        build(tis=[struct.pack("<Q", 2**40) + b"w" + bytes(40)]), "tensor name length .* exceeds"
    )


def test_huge_array_lengths_checked_against_bytes_left() -> None:
    # 10 uint32 need 40 bytes; the file has fewer left
    expect(
        build([kv("k", VT.ARRAY, arr(VT.UINT32, 10, bytes(36)))], alignment=1), "needs at least 40"
    )
    expect(build([kv("k", VT.ARRAY, arr(VT.UINT64, 2**61))]), "array 'k' of 2305843009213693952")
    expect(build([kv("k", VT.ARRAY, arr(VT.STRING, 2**40))]), "STRING items needs at least")
    expect(build([kv("k", VT.ARRAY, arr(VT.ARRAY, 2**40))]), "ARRAY items needs at least")
    # strings: at least 8 bytes each, so 3 empty strings fit in 24 bytes, 4 do not
    ok = build([kv("k", VT.ARRAY, arr(VT.STRING, 3, bytes(24)))], alignment=1)
    assert parse_gguf(ok).metadata["k"] == ["", "", ""]
    expect(
        build([kv("k", VT.ARRAY, arr(VT.STRING, 4, bytes(24)))], alignment=1),
        "4 STRING items needs at least 32",
    )


def test_truncated_scalar_value() -> None:
    expect(build([kv("k", VT.UINT64, b"\x01\x02")], alignment=1), "truncated: UINT64 value of 'k'")


def test_unknown_value_types() -> None:
    expect(build([kv("k", 13, b"\0" * 8)]), "unknown value type of 'k' 13")
    expect(build([kv("k", 2**32 - 1, b"\0" * 8)]), "unknown value type of 'k' 4294967295")
    expect(build([kv("k", VT.ARRAY, arr(99, 1, bytes(8)))]), "unknown array item type of 'k' 99")


def test_bool_must_be_0_or_1() -> None:
    expect(build([kv("k", VT.BOOL, b"\x02")]), "bool value of 'k' is 2")
    expect(build([kv("k", VT.ARRAY, arr(VT.BOOL, 3, b"\x01\x00\x07"))]), "bool item of 'k' is 7")


def test_nesting_depth_capped() -> None:
    inner = arr(VT.UINT8, 0)
    for _ in range(3):
        inner = arr(VT.ARRAY, 1, inner)
    assert parse_gguf(build([kv("k", VT.ARRAY, inner)])).metadata["k"] == [[[[]]]]
    expect(build([kv("k", VT.ARRAY, arr(VT.ARRAY, 1, inner))]), "nested deeper than 4")


def test_duplicate_and_empty_keys() -> None:
    expect(build([kv_u32("a", 1), kv_u32("b", 1), kv_u32("a", 2)]), "duplicate metadata key 'a'")
    expect(build([kv_u32("", 1)]), "empty metadata key")
    expect(build([kv_u32("a\0", 1)]), "metadata key contains a NUL byte")
    err = expect(build([kv(b"a\xffb", VT.UINT32, bytes(4))]), "metadata key is not valid UTF-8")
    assert err.offset == 24 + 8 + 1  # the bad byte itself


def test_alignment_checks() -> None:
    for bad in (0, 3, 48, 2**21, 2**31):
        expect(build([kv_u32("general.alignment", bad)]), f"general.alignment {bad} is not a power")
    expect(
        build([kv("general.alignment", VT.UINT64, struct.pack("<Q", 32))]),
        "must be UINT32, not UINT64",
    )
    expect(build([kv("general.alignment", VT.INT32, struct.pack("<i", 32))]), "must be UINT32")
    expect(build([kv("general.alignment", VT.STRING, gstr("32"))]), "must be UINT32, not STRING")


def test_tensor_names() -> None:
    expect(build(tis=[F32_1x8, F32_1x8], data=bytes(64)), "duplicate tensor name 'w'")
    expect(build(tis=[ti("", (8,))], data=DATA_32), "empty tensor name")
    expect(
        build(tis=[ti("x" * 64, (8,))], data=DATA_32),
        "tensor name length 64 exceeds the limit of 63",
    )
    assert parse_gguf(build(tis=[ti("x" * 63, (8,))], data=DATA_32)).tensors
    expect(build(tis=[ti(b"\xfe", (8,))], data=DATA_32), "tensor name is not valid UTF-8")
    expect(build(tis=[ti(b"w\0x", (8,))], data=DATA_32), "tensor name contains a NUL byte")


def test_n_dims() -> None:
    expect(build(tis=[ti("w", ())], data=DATA_32), "has 0 dimensions")
    expect(build(tis=[ti("w", (8, 1, 1, 1, 1))], data=DATA_32), "has 5 dimensions")
    g = parse_gguf(build(tis=[ti("w", (2, 1, 2, 2))], data=DATA_32))
    assert g.tensors["w"].shape == (2, 1, 2, 2)
    # n_dims huge: rejected before reading 8 * n_dims bytes
    bad = gstr("w") + struct.pack("<I", 2**32 - 1)
    expect(build(tis=[bad + bytes(40)]), "has 4294967295 dimensions")


def test_zero_dimension() -> None:
    expect(build(tis=[ti("w", (8, 0))], data=DATA_32), r"zero dimension \(8, 0\)")


def test_element_count_overflow() -> None:
    expect(
        build(tis=[ti("w", (2**32, 2**32, 2**32))], data=DATA_32), "more than 2\\*\\*62 elements"
    )
    expect(build(tis=[ti("w", (2**63, 2))], data=DATA_32), "more than 2\\*\\*62 elements")
    # fits the element cap but not the file
    expect(build(tis=[ti("w", (2**31, 2**31))], data=DATA_32), "ends past the end of the file")


def test_ggml_type() -> None:
    expect(build(tis=[ti("w", (8,), 4)], data=DATA_32), "unknown ggml type 4")  # removed Q4_2
    expect(build(tis=[ti("w", (8,), 2**32 - 1)], data=DATA_32), "unknown ggml type 4294967295")
    expect(
        build(tis=[ti("w", (48, 2), GGMLType.Q4_0)], data=bytes(64)),
        "shape\\[0\\]=48, not a multiple of its block size 32",
    )
    expect(build(tis=[ti("w", (128,), GGMLType.Q4_K)], data=bytes(256)), "block size 256")
    g = parse_gguf(build(tis=[ti("w", (64, 2), GGMLType.Q4_0)], data=bytes(96)))
    assert g.tensors["w"].nbytes == 4 * 18


def test_tensor_offsets() -> None:
    expect(build(tis=[ti("w", (8,), offset=16)], data=bytes(64)), "offset 16 is not a multiple")
    expect(build(tis=[ti("w", (8,), offset=32)], data=bytes(63)), "ends past the end of the file")
    expect(build(tis=[ti("w", (8,), offset=2**64 - 32)], data=DATA_32), "ends past the end")
    expect(build(tis=[F32_1x8], data=DATA_32[:31]), "'w' \\(32 bytes at data offset 0\\)")
    # data section starting past the end of the file
    buf = build(tis=[F32_1x8])
    expect(buf[: len(buf) - 5], "truncated")
    # with a larger alignment the offsets must follow it
    align64 = [kv_u32("general.alignment", 64)]
    expect(build(align64, [ti("w", (8,), offset=32)], bytes(128), alignment=64), "alignment 64")


def test_overlapping_tensors() -> None:
    tis = [ti("a", (16,), offset=0), ti("b", (8,), offset=32)]  # a covers 0..64
    expect(build(tis=tis, data=bytes(96)), "tensors 'a' and 'b' overlap")
    tis = [ti("a", (8,), offset=64), ti("b", (8,), offset=64)]
    expect(build(tis=tis, data=bytes(96)), "overlap")
    tis = [ti("a", (8,), offset=32), ti("b", (8,), offset=0)]  # adjacent, out of order: fine
    assert len(parse_gguf(build(tis=tis, data=bytes(64))).tensors) == 2


def test_every_truncation_of_a_valid_file_is_a_gguf_error() -> None:
    kvs = [
        kv("general.architecture", VT.STRING, gstr("llama")),
        kv("nested", VT.ARRAY, arr(VT.ARRAY, 1, arr(VT.INT16, 2, bytes(4)))),
        kv("toks", VT.ARRAY, arr(VT.STRING, 2, gstr("ab") + gstr("c"))),
        kv("b", VT.BOOL, b"\x01"),
    ]
    buf = build(kvs, [ti("a", (32,), GGMLType.Q8_0), ti("b", (4,), GGMLType.F16, 64)], bytes(72))
    parse_gguf(buf)
    for n in range(len(buf)):
        with pytest.raises(GGUFError):
            parse_gguf(buf[:n])


def test_open_empty_and_bad_files(tmp_path) -> None:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file") as ei:
        open_gguf(p)
    assert ei.value.path == str(p)
    p.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(16))
    with pytest.raises(GGUFError, match="version 1"):
        open_gguf(p)
    with pytest.raises(FileNotFoundError):
        open_gguf(tmp_path / "missing.gguf")


# --- zero copy and closing ---------------------------------------------------------------------


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def _tiny_file(tmp_path):
    p = tmp_path / "t.gguf"
    w = np.arange(64, dtype=np.float32).reshape(2, 32)
    write_gguf(p, {"general.architecture": "llama"}, [("w", GGMLType.F32, (32, 2), w)])
    return p, w


def test_tensor_data_is_a_zero_copy_view_of_the_map(tmp_path) -> None:
    p, w = _tiny_file(tmp_path)
    with open_gguf(p) as g:
        a = g.tensor_data("w")
        b = g.tensor_data("w")
        assert a.dtype == np.uint8 and a.shape == (256,) and not a.flags.owndata
        assert not a.flags.writeable  # the map is read-only
        assert np.shares_memory(a, b)
        assert a.view(np.float32).reshape(2, 32).tolist() == w.tolist()
        base = a  # follow the .base chain (ndarray -> memoryview -> mmap): no copy on the way
        while not isinstance(base, mmap.mmap):
            base = base.obj if isinstance(base, memoryview) else base.base
            assert base is not None
        assert isinstance(base, mmap.mmap) and base is g._mmap
        del a, b, base


def test_parse_gguf_views_share_the_callers_buffer() -> None:
    buf = bytearray(build(tis=[F32_1x8], data=DATA_32))
    g = parse_gguf(buf)
    v = g.tensor_data("w")
    assert np.shares_memory(v, np.frombuffer(buf, dtype=np.uint8))
    buf[g.data_offset] = 0xAB  # a change to the buffer shows through: nothing was copied
    assert v[0] == 0xAB
    g2 = parse_gguf(memoryview(bytes(buf)))
    assert g2.tensor_data("w")[0] == 0xAB


def test_close_releases_the_map(tmp_path) -> None:
    p, _ = _tiny_file(tmp_path)
    g = open_gguf(p)
    assert not g.closed and "open" in repr(g)
    g.tensor_data("w")  # a view that is dropped at once
    g.close()
    assert g.closed and "closed" in repr(g)
    g.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        g.tensor_data("w")
    if sys.platform.startswith("linux"):
        assert not _mapped(p)


def test_close_with_live_views_keeps_them_valid(tmp_path) -> None:
    p, w = _tiny_file(tmp_path)
    with open_gguf(p) as g:
        view = g.tensor_data("w")
    assert g.closed
    # the view keeps the map alive (Python refuses to unmap under it) and stays readable
    assert view.view(np.float32).tolist() == w.reshape(-1).tolist()
    if sys.platform.startswith("linux"):
        assert _mapped(p)
        del view
        import gc

        gc.collect()
        assert not _mapped(p)


def test_failed_open_does_not_leak_the_map(tmp_path) -> None:
    p, _ = _tiny_file(tmp_path)
    buf = bytearray(p.read_bytes())
    buf[4] = 1  # version 1
    p.write_bytes(bytes(buf))
    with pytest.raises(GGUFError):
        open_gguf(p)
    if sys.platform.startswith("linux"):
        import gc

        gc.collect()
        assert not _mapped(p)


def test_missing_tensor_is_a_key_error(tmp_path) -> None:
    p, _ = _tiny_file(tmp_path)
    with open_gguf(p) as g, pytest.raises(KeyError):
        g.tensor_data("nope")


# --- the real model, against the `gguf` package -------------------------------------------------


def test_real_model_matches_gguf_package(smollm2_path) -> None:
    gguf = pytest.importorskip("gguf")
    t0 = time.perf_counter()
    g = open_gguf(smollm2_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"parsing took {elapsed:.2f} s"
    try:
        assert isinstance(g, GGUFFile) and g.version == 3 and g.alignment == 32
        ref = gguf.GGUFReader(str(smollm2_path))
        assert g.data_offset == ref.data_offset
        fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert list(g.metadata) == list(fields)
        for key, field in fields.items():
            vtype = VT(int(field.types[0]))
            item = VT(int(field.types[1])) if vtype is VT.ARRAY else None
            assert g.metadata_types[key] == (vtype, item), key
            want = field.contents()
            got = g.metadata[key]
            if vtype is VT.FLOAT32:
                assert np.float32(got) == np.float32(want), key
            else:
                assert got == want, key
        assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
        assert [t.name for t in ref.tensors] == list(g.tensors)
        for rt in ref.tensors:
            info = g.tensors[rt.name]
            assert int(info.ggml_type) == int(rt.tensor_type), rt.name
            assert info.shape == tuple(int(d) for d in rt.shape), rt.name
            assert g.data_offset + info.offset == rt.data_offset, rt.name
            assert info.nbytes == rt.n_bytes, rt.name
        emb = g.tensors["token_embd.weight"]
        assert emb.ggml_type is GGMLType.Q8_0 and emb.shape == (576, 49152)
        assert "output.weight" not in g.tensors
        last = max(g.tensors.values(), key=lambda t: t.offset)
        view = g.tensor_data(last.name)
        assert view.nbytes == last.nbytes
        assert np.array_equal(view, np.asarray(ref.tensors[-1].data).reshape(-1).view(np.uint8))
        del view
    finally:
        g.close()


def test_real_model_rewrites_byte_identical(smollm2_path, tmp_path) -> None:
    """Reader + writer reproduce the real file exactly: every type, offset and pad is right."""
    with open_gguf(smollm2_path) as g:
        md = {k: GGUFValue(v, *g.metadata_types[k]) for k, v in g.metadata.items()}
        tensors = [
            (t.name, t.ggml_type, t.shape, g.tensor_data(t.name)) for t in g.tensors.values()
        ]
        out = tmp_path / "copy.gguf"
        write_gguf(out, md, tensors, version=g.version, alignment=g.alignment)
        del tensors
    with open(smollm2_path, "rb") as a, open(out, "rb") as b:
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            assert x == y
            if not x:
                break
    assert gguf_bytes(md)[:4] == b"GGUF"


def test_parse_gguf_accepts_any_contiguous_buffer() -> None:
    buf = build(tis=[F32_1x8], data=DATA_32)
    as_u32 = np.frombuffer(buf, dtype=np.uint32)
    for b in (memoryview(as_u32), memoryview(buf).cast("B", (len(buf) // 4, 4)), bytearray(buf)):
        g = parse_gguf(b)
        assert g.tensor_data("w").tobytes() == DATA_32
    with pytest.raises(ValueError, match="contiguous"):
        parse_gguf(memoryview(buf)[::2])
