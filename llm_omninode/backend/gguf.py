"""Hardened, zero-copy GGUF reader (versions 2 and 3, little-endian).

The file is mapped (``mmap``) and tensor data is handed out as read-only NumPy ``uint8`` views
of that mapping, so nothing is copied until a consumer needs its own layout.

Every count, length, type, shape, offset and the alignment is checked against the bytes that are
actually there *before* anything is allocated or sliced: the GGUF CVEs of llama.cpp (huge
``n_tensors``/``n_kv``, string and array lengths, overflowing ``ne`` products, bad alignment,
offsets past the end, overlapping tensors, duplicate names) are the checklist. A bad file raises
exactly one error type, :class:`GGUFError` (a ``ValueError``), whose message names the byte
offset and the problem.

Strings: keys and tensor names must be valid UTF-8 (they are identifiers; a bad one is a
GGUFError). String *values* are decoded with ``errors="replace"``: llama.cpp accepts arbitrary
bytes there, and a stray byte in, say, a model description should not make a model unusable.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ggml_types import BLOCK_LAYOUT, SCALAR_FORMAT, GGMLType, GGUFValueType

__all__ = [
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "open_gguf",
    "parse_gguf",
    "GGUF_MAGIC",
    "DEFAULT_ALIGNMENT",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# A sane upper bound: real files use 32 (some 64); anything huge only serves to push offsets out.
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4  # GGML_MAX_DIMS
# llama.cpp stores tensor names in char[GGML_MAX_NAME=64] with a NUL, so 63 bytes is the most a
# file can carry and still load there.
MAX_TENSOR_NAME = 63
MAX_KEY_LENGTH = 1 << 16
MAX_ARRAY_DEPTH = 4  # an array of arrays of ... at most this many array levels
MAX_ELEMENTS = 1 << 62  # per tensor; ggml counts elements in int64

# Smallest possible encoding of one item, used to reject counts the remaining bytes cannot hold
# before a single item is parsed or allocated.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, >=1 key byte, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len, >=1 byte, n_dims, 1 dim, type, offset
_ARRAY_HEADER_BYTES = 4 + 8  # item type + count

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR_STRUCT = {t: struct.Struct("<" + f) for t, f in SCALAR_FORMAT.items()}
_SCALAR_SIZE = {t: s.size for t, s in _SCALAR_STRUCT.items()}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGMLType if t in BLOCK_LAYOUT}


class GGUFError(ValueError):
    """A malformed or unsupported GGUF file. ``str(e)`` names the path, byte offset and problem."""

    def __init__(self, offset: int, problem: str, path: str | None = None) -> None:
        self.offset = offset
        self.problem = problem
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}invalid GGUF at byte {offset}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions copy and pickle as cls(*args); ours takes different arguments.
        return (type(self), (self.offset, self.problem, self.path))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry. ``offset`` is relative to the data section."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # GGUF order: shape[0] = ne[0], the contiguous axis
    offset: int
    nbytes: int


class GGUFFile:
    """A parsed GGUF file; tensor data stays in the underlying buffer (usually an mmap)."""

    def __init__(
        self,
        *,
        path: str | None,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, Any],
        metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]],
        tensors: dict[str, TensorInfo],
        buffer: Any,
        owned_mmap: mmap.mmap | None = None,
    ) -> None:
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.metadata_types = metadata_types
        self.tensors = tensors
        self._buffer = buffer
        self._mmap = owned_mmap

    @property
    def closed(self) -> bool:
        return self._buffer is None

    def tensor_data(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of a tensor's bytes (read-only when backed by the file map)."""
        if self._buffer is None:
            raise ValueError("GGUF file is closed")
        info = self.tensors[name]
        return np.frombuffer(
            self._buffer, dtype=np.uint8, count=info.nbytes, offset=self.data_offset + info.offset
        )

    def close(self) -> None:
        """Release the mapping.

        Views handed out by :meth:`tensor_data` stay valid: if any are still alive the map cannot
        be unmapped now (Python refuses, rather than leaving dangling pointers), so it is simply
        dropped here and unmapped when the last view goes away.
        """
        mm, self._mmap, self._buffer = self._mmap, None, None
        if mm is not None:
            # BufferError: views are alive; the map is unmapped when the last one goes.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<GGUFFile {self.path!r} v{self.version} {len(self.metadata)} keys "
            f"{len(self.tensors)} tensors ({state})>"
        )


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Map and parse a GGUF file. OS errors (missing file, permissions) propagate as OSError."""
    spath = os.fspath(path)
    with open(spath, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFError(0, "empty file", spath)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        gf = parse_gguf(mm, path=spath)
    except BaseException:
        mm.close()
        raise
    gf._mmap = mm
    return gf


def parse_gguf(
    buf: bytes | bytearray | memoryview | mmap.mmap, path: str | None = None
) -> GGUFFile:
    """Parse GGUF from a buffer. The returned file's tensor views share memory with ``buf``."""
    raw = memoryview(buf)
    if not raw.c_contiguous:
        raw.release()
        raise ValueError("parse_gguf needs a contiguous buffer")
    if raw.format != "B" or raw.ndim != 1:
        buf = raw.cast("B")  # kept: tensor_data() must see bytes, not, say, uint32 items
        raw.release()
        raw = memoryview(buf)
    with raw:
        # Slicing bytes or an mmap yields bytes directly, about twice as fast as slicing a
        # memoryview in the vocabulary loop; their indices are the same as the view's.
        fast = buf if isinstance(buf, (bytes, mmap.mmap)) else raw
        parsed = _Parser(raw, path, fast).parse()
    return GGUFFile(path=path, buffer=buf, **parsed)


class _Parser:
    """Sequential reader over a memoryview; every read checks the bytes left first."""

    def __init__(self, mv: memoryview, path: str | None, fast: Any = None) -> None:
        self.mv = mv
        self.fast = mv if fast is None else fast
        self.size = len(mv)
        self.pos = 0
        self.path = path

    def fail(self, problem: str, offset: int | None = None) -> GGUFError:
        return GGUFError(self.pos if offset is None else offset, problem, self.path)

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"truncated: {what} needs {n} bytes, {left} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.mv, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str, max_len: int | None = None) -> bytes:
        start = self.pos
        n = self.u64(f"{what} length")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} length {n} exceeds the limit of {max_len} bytes", start)
        self.need(n, what)
        s = self.mv[self.pos : self.pos + n].tobytes()
        self.pos += n
        return s

    def name(self, what: str, max_len: int) -> str:
        start = self.pos
        b = self.raw_string(what, max_len)
        if not b:
            raise self.fail(f"empty {what}", start)
        if b"\0" in b:  # C readers would cut the name there: two names could become one
            raise self.fail(f"{what} contains a NUL byte", start + 8 + b.index(b"\0"))
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(
                f"{what} is not valid UTF-8 ({e.reason})", start + 8 + e.start
            ) from None

    # -- values ------------------------------------------------------------------------------

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        t = self.u32(what)
        vt = _VALUE_TYPES.get(t)
        if vt is None:
            raise self.fail(f"unknown {what} {t}", at)
        return vt

    def value(self, vt: GGUFValueType, key: str, depth: int = 0) -> Any:
        if vt is GGUFValueType.STRING:
            return self.raw_string(f"string value of {key!r}").decode("utf-8", "replace")
        if vt is GGUFValueType.ARRAY:
            return self.array(key, depth + 1)
        st = _SCALAR_STRUCT[vt]
        self.need(st.size, f"{vt.name} value of {key!r}")
        at = self.pos
        if vt is GGUFValueType.BOOL:
            b = self.mv[at]
            if b > 1:
                raise self.fail(f"bool value of {key!r} is {b}, not 0 or 1", at)
            self.pos += 1
            return bool(b)
        (v,) = st.unpack_from(self.mv, at)
        self.pos += st.size
        return v

    def array(self, key: str, depth: int) -> list[Any]:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays in {key!r} nested deeper than {MAX_ARRAY_DEPTH} levels")
        it = self.value_type(f"array item type of {key!r}")
        at = self.pos
        n = self.u64(f"array length of {key!r}")
        if it is GGUFValueType.STRING:
            min_item = 8
        elif it is GGUFValueType.ARRAY:
            min_item = _ARRAY_HEADER_BYTES
        else:
            min_item = _SCALAR_SIZE[it]
        left = self.size - self.pos
        if n * min_item > left:
            raise self.fail(
                f"array {key!r} of {n} {it.name} items needs at least {n * min_item} bytes, "
                f"{left} left",
                at,
            )
        if it is GGUFValueType.STRING:
            return self.string_items(n, key)
        if it is GGUFValueType.ARRAY:
            return [self.array(key, depth + 1) for _ in range(n)]
        start = self.pos
        end = start + n * min_item
        if it is GGUFValueType.BOOL:
            chunk = self.mv[start:end].tobytes()
            if chunk.translate(None, b"\x00\x01"):
                bad = next(i for i, b in enumerate(chunk) if b > 1)
                raise self.fail(f"bool item of {key!r} is {chunk[bad]}, not 0 or 1", start + bad)
            self.pos = end
            return [b == 1 for b in chunk]
        # One struct call for the whole array: fast enough for 49152-entry vocab tables.
        values = list(struct.unpack_from(f"<{n}{SCALAR_FORMAT[it]}", self.mv, start))
        self.pos = end
        return values

    def string_items(self, n: int, key: str) -> list[str]:
        # The hot loop for vocabularies (tens of thousands of tokens and merges): locals only.
        mv, size, pos = self.fast, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                raise self.fail(f"truncated: length of string {i} in array {key!r}")
            (ln,) = unpack(mv, pos)
            pos += 8
            if ln > size - pos:
                self.pos = pos - 8
                raise self.fail(
                    f"truncated: string {i} in array {key!r} is {ln} bytes, {size - pos} left"
                )
            append(str(mv[pos : pos + ln], "utf-8", "replace"))
            pos += ln
        self.pos = pos
        return out

    # -- file --------------------------------------------------------------------------------

    def parse(self) -> dict[str, Any]:
        self.need(4, "magic")
        magic = self.mv[0:4].tobytes()
        if magic != GGUF_MAGIC:
            raise self.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}", 0)
        self.pos = 4
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version == 1:
                problem = "GGUF version 1 is not supported (only versions 2 and 3)"
            elif int.from_bytes(_U32.pack(version), "big") in SUPPORTED_VERSIONS:
                problem = "big-endian GGUF is not supported"
            else:
                problem = f"unsupported GGUF version {version} (only versions 2 and 3)"
            raise self.fail(problem, 4)
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        left = self.size - self.pos
        need = n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
        if need > left:
            raise self.fail(
                f"{n_tensors} tensors and {n_kv} metadata entries need at least {need} bytes, "
                f"{left} left",
                8,
            )

        metadata: dict[str, Any] = {}
        types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        alignment_at = 0
        for _ in range(n_kv):
            at = self.pos
            key = self.name("metadata key", MAX_KEY_LENGTH)
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}", at)
            vt = self.value_type(f"value type of {key!r}")
            item_type = None
            if vt is GGUFValueType.ARRAY:
                # Peek the item type for metadata_types; array() reads it again and checks it.
                self.need(4, f"array item type of {key!r}")
                item_type = _VALUE_TYPES.get(_U32.unpack_from(self.mv, self.pos)[0])
            if key == "general.alignment":
                alignment_at = self.pos
            metadata[key] = self.value(vt, key)
            types[key] = (vt, item_type)

        alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in metadata:
            a = metadata["general.alignment"]
            if types["general.alignment"][0] is not GGUFValueType.UINT32:
                raise self.fail(
                    f"general.alignment must be UINT32, not {types['general.alignment'][0].name}",
                    alignment_at,
                )
            if a == 0 or a & (a - 1) or a > MAX_ALIGNMENT:
                raise self.fail(
                    f"general.alignment {a} is not a power of two between 1 and {MAX_ALIGNMENT}",
                    alignment_at,
                )
            alignment = a

        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            at = self.pos
            tname = self.name("tensor name", MAX_TENSOR_NAME)
            if tname in tensors:
                raise self.fail(f"duplicate tensor name {tname!r}", at)
            dims_at = self.pos
            n_dims = self.u32(f"n_dims of {tname!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.fail(
                    f"tensor {tname!r} has {n_dims} dimensions (1 to {MAX_DIMS})", dims_at
                )
            shape_at = self.pos
            self.need(8 * n_dims, f"shape of {tname!r}")
            shape = struct.unpack_from(f"<{n_dims}Q", self.mv, self.pos)
            self.pos += 8 * n_dims
            n_elem = 1
            for d in shape:
                if d == 0:
                    raise self.fail(f"tensor {tname!r} has a zero dimension {shape}", shape_at)
                n_elem *= d
                if n_elem > MAX_ELEMENTS:
                    raise self.fail(
                        f"tensor {tname!r} shape {shape} has more than 2**62 elements", shape_at
                    )
            type_at = self.pos
            t = self.u32(f"type of {tname!r}")
            gt = _GGML_TYPES.get(t)
            if gt is None:
                raise self.fail(f"tensor {tname!r} has unknown ggml type {t}", type_at)
            block, block_bytes = BLOCK_LAYOUT[gt]
            if shape[0] % block:
                raise self.fail(
                    f"tensor {tname!r} of type {gt.name} has shape[0]={shape[0]}, "
                    f"not a multiple of its block size {block}",
                    shape_at,
                )
            nbytes = n_elem // block * block_bytes
            off_at = self.pos
            offset = self.u64(f"offset of {tname!r}")
            if offset % alignment:
                raise self.fail(
                    f"tensor {tname!r} offset {offset} is not a multiple of the alignment "
                    f"{alignment}",
                    off_at,
                )
            tensors[tname] = TensorInfo(tname, gt, tuple(shape), offset, nbytes)

        data_offset = -(-self.pos // alignment) * alignment
        data_size = self.size - data_offset
        if tensors:
            if data_size < 0:
                raise self.fail(
                    f"truncated: data section starts at {data_offset}, past the end of the file"
                )
            for ti in tensors.values():
                if ti.offset + ti.nbytes > data_size:
                    raise self.fail(
                        f"truncated: tensor {ti.name!r} ({ti.nbytes} bytes at data offset "
                        f"{ti.offset}) ends past the end of the file (data section is "
                        f"{data_size} bytes)",
                        data_offset + min(ti.offset, data_size),
                    )
            ordered = sorted(tensors.values(), key=lambda ti: ti.offset)
            for a, b in itertools.pairwise(ordered):
                if a.offset + a.nbytes > b.offset:
                    raise self.fail(
                        f"tensors {a.name!r} and {b.name!r} overlap ({a.name!r} occupies data "
                        f"bytes {a.offset}..{a.offset + a.nbytes}, {b.name!r} starts at "
                        f"{b.offset})",
                        data_offset + b.offset,
                    )
        return {
            "version": version,
            "alignment": alignment,
            "data_offset": data_offset,
            "metadata": metadata,
            "metadata_types": types,
            "tensors": tensors,
        }
