"""Wire frames: what every byte on an OmniNode QUIC stream is.

Layout (all integers big-endian)::

    offset size  field
    0      4     magic b"OMNI"
    4      1     version (1)
    5      1     type (FrameType)
    6      2     flags (FLAG_LAST; every other bit must be zero)
    8      4     header length H   (0..MAX_HEADER; 0 means an empty header {})
    12     4     payload length P  (0..MAX_PAYLOAD, and 0 for types without payload)
    16     H     header: one UTF-8 JSON object (no NaN/Infinity, no duplicate keys)
    16+H   P     payload: raw bytes

Every length is checked against its limit before a byte of the frame is buffered, and each
type's header fields are checked (types, ranges, and for HIDDEN the exact payload size) before
its payload is allocated. Pure functions and a small incremental decoder; no pickle, no eval.

Hidden states and token ids (HIDDEN): ``shape = [T, hidden_dim]``. ``hidden_dim == 1`` means
token ids, 4 bytes each, ``dtype`` ``int32`` or ``uint32`` (little-endian); a wider
``hidden_dim`` means activations, ``dtype`` ``float32`` (unrounded, the default) or
``float16`` (little-endian); the stage checks that it equals the model width. Payload
bytes == T * hidden_dim * element size, exactly.

Pipeline steps (STEP) carry the same tensors, but their header is a fixed binary struct
(STEP_HEADER, big-endian), not JSON, since one crosses every stage boundary for every token;
the sequence is the channel's, named once when it opened::

    offset size  field
    0      4     step: the step's number on its channel (0, 1, ...)
    4      4     position: the sequence position of the step's first row
    8      4     rows T
    12     4     width hidden_dim (1: token ids)
    16     1     dtype (STEP_DTYPES: 0 float32, 1 float16, 2 int32, 3 uint32)
    17     1     flags (STEP_MORE: a prompt piece nobody answers; every other bit zero)
    18     2     reserved, zero

Decoded, the header is ``{"step", "pos", "shape": [T, hidden_dim], "dtype", "more"}`` and is
checked like a HIDDEN one (payload bytes exact) before the payload is allocated.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .identity import is_node_id

MAGIC = b"OMNI"
VERSION = 1
FIXED = struct.Struct(">4sBBHII")
FIXED_SIZE = FIXED.size  # 16
MAX_HEADER = 64 * 1024
MAX_SHARD_WINDOW = 64 * 1024 * 1024
MAX_PAYLOAD = MAX_SHARD_WINDOW + 64 * 1024
MAX_ID = 2**53  # ids and offsets stay exact in every JSON implementation

FLAG_LAST = 0x0001  # the last frame of a streamed response
KNOWN_FLAGS = FLAG_LAST

DTYPE_SIZES = {"float32": 4, "float16": 2, "int32": 4, "uint32": 4}
ACTIVATION_DTYPES = ("float32", "float16")
TOKEN_DTYPES = ("int32", "uint32")

STEP_HEADER = struct.Struct(">IIIIBBH")  # step, position, rows, width, dtype, flags, reserved
STEP_DTYPES = ("float32", "float16", "int32", "uint32")  # a STEP header's dtype codes
STEP_MORE = 0x01
MAX_STEP = 2**32 - 1


class FrameType(IntEnum):
    JOIN = 1  # client -> server after TLS: node_id, proof (admission.py)
    JOIN_OK = 2  # server -> client: node_id, proof
    HELLO = 3  # request: who are you?
    INFO = 4  # response: node_id, version, device, memory_budget, shards
    REQUEST = 5  # id, method, free-form fields, optional payload
    RESPONSE = 6  # id, free-form fields, optional payload
    STREAM_DATA = 7  # id, seq: one item of a streamed response
    STREAM_END = 8  # id: a streamed response is complete
    HIDDEN = 9  # seq (sequence id), shape [T, hidden_dim], dtype; payload tensor bytes
    SHARD_READ = 10  # id, cid, offset, length (<= MAX_SHARD_WINDOW)
    SHARD_DATA = 11  # id, cid, offset; payload = the bytes read (may be short at EOF)
    ERROR = 12  # code, message, optional id
    STEP = 13  # a pipeline step: binary header (STEP_HEADER), payload tensor bytes


class ErrorCode:
    """Codes of ERROR frames (strings on the wire)."""

    BAD_FRAME = "bad_frame"  # undecodable or invalid frame
    BAD_REQUEST = "bad_request"  # a valid frame the handler cannot act on
    UNSUPPORTED = "unsupported"  # frame type or method not served here
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    CACHE_MISS = "cache_miss"  # a prefix to reuse is no longer cached: compute it again
    LINK_LOST = "link_lost"  # a pipeline link to a further node broke: plan again and replay


class FrameError(ValueError):
    """A malformed frame: bad magic/version/type/flags, a length over its limit, bad header."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""
    flags: int = 0

    @property
    def id(self) -> int | None:
        value = self.header.get("id")
        return value if isinstance(value, int) else None


# ---- header field checks ------------------------------------------------------------------

_METHOD_RE = re.compile(r"^[a-z][a-z0-9_./-]{0,63}$")
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CID_RE = re.compile(r"^b[a-z2-7]{1,127}$")
_HEX_PROOF_RE = re.compile(r"^[0-9a-f]{64}$")


def is_wire_cid(value: object) -> bool:
    """A CID's shape on the wire (the store checks the digest itself)."""
    return isinstance(value, str) and _CID_RE.match(value) is not None


def _fail(ftype: FrameType, message: str) -> FrameError:
    return FrameError(f"{ftype.name}: {message}")


def _int(ftype: FrameType, h: dict, key: str, lo: int = 0, hi: int = MAX_ID, opt=False) -> None:
    value = h.get(key)
    if value is None and opt and key not in h:
        return
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(ftype, f"{key!r} must be an integer in [{lo}, {hi}]")


def _str(ftype: FrameType, h: dict, key: str, limit: int = 256, pattern=None, opt=False) -> None:
    value = h.get(key)
    if value is None and opt and key not in h:
        return
    if not isinstance(value, str) or len(value) > limit:
        raise _fail(ftype, f"{key!r} must be a string of at most {limit} characters")
    if pattern is not None and not pattern.match(value):
        raise _fail(ftype, f"{key!r} is malformed")


def _node_id(ftype: FrameType, h: dict) -> None:
    if not is_node_id(h.get("node_id")):
        raise _fail(ftype, "'node_id' is not a node id")


def _no_payload(ftype: FrameType, payload_len: int) -> None:
    if payload_len:
        raise _fail(ftype, "takes no payload")


def hidden_geometry(header: dict, ftype: FrameType = FrameType.HIDDEN) -> tuple[int, int, str]:
    """(T, hidden_dim, dtype) of a HIDDEN or STEP header; FrameError unless consistent."""
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or any(type(n) is not int or n < 1 or n > MAX_PAYLOAD for n in shape)
    ):
        raise _fail(ftype, "'shape' must be [T, hidden_dim] with positive integers")
    tokens, hidden_dim = shape
    dtype = header.get("dtype")
    if hidden_dim == 1:
        if dtype not in TOKEN_DTYPES:
            raise _fail(ftype, f"hidden_dim 1 means token ids: dtype must be one of {TOKEN_DTYPES}")
    elif dtype not in ACTIVATION_DTYPES:
        raise _fail(
            ftype, f"hidden_dim > 1 means activations: dtype must be one of {ACTIVATION_DTYPES}"
        )
    return tokens, hidden_dim, dtype


def _check_hidden(h: dict, payload_len: int) -> None:
    _seq_id(FrameType.HIDDEN, h)
    tokens, hidden_dim, dtype = hidden_geometry(h)
    expected = tokens * hidden_dim * DTYPE_SIZES[dtype]
    if expected != payload_len:
        raise _fail(
            FrameType.HIDDEN,
            f"payload is {payload_len} bytes; shape {[tokens, hidden_dim]} of {dtype} "
            f"needs exactly {expected}",
        )


def _check_step(h: dict, payload_len: int) -> None:
    ftype = FrameType.STEP
    if set(h) != {"step", "pos", "shape", "dtype", "more"}:
        raise _fail(ftype, "header is exactly {step, pos, shape, dtype, more}")
    _int(ftype, h, "step", hi=MAX_STEP)
    _int(ftype, h, "pos", hi=MAX_STEP)
    if not isinstance(h["more"], bool):
        raise _fail(ftype, "'more' must be true or false")
    tokens, hidden_dim, dtype = hidden_geometry(h, ftype)
    if tokens > MAX_STEP or hidden_dim > MAX_STEP:
        raise _fail(ftype, "'shape' out of range")
    expected = tokens * hidden_dim * DTYPE_SIZES[dtype]
    if expected != payload_len:
        raise _fail(ftype, f"payload is {payload_len} bytes; shape {[tokens, hidden_dim]} of "
                    f"{dtype} needs exactly {expected}")  # fmt: skip


def _step_bytes(h: dict) -> bytes:
    """The binary header of a checked STEP header dict."""
    tokens, hidden_dim = h["shape"]
    flags = STEP_MORE if h["more"] else 0
    code = STEP_DTYPES.index(h["dtype"])
    return STEP_HEADER.pack(h["step"], h["pos"], tokens, hidden_dim, code, flags, 0)


def _step_header(data: bytes | bytearray) -> dict[str, Any]:
    """A STEP header dict from its binary form; FrameError unless every field is valid."""
    if len(data) != STEP_HEADER.size:
        raise _fail(FrameType.STEP, f"header must be {STEP_HEADER.size} bytes")
    step, pos, tokens, hidden_dim, code, flags, reserved = STEP_HEADER.unpack(bytes(data))
    if code >= len(STEP_DTYPES):
        raise _fail(FrameType.STEP, f"unknown dtype code {code}")
    if flags & ~STEP_MORE or reserved:
        raise _fail(FrameType.STEP, f"unknown flags {flags:#x} or reserved bits set")
    return {"step": step, "pos": pos, "shape": [tokens, hidden_dim],
            "dtype": STEP_DTYPES[code], "more": bool(flags & STEP_MORE)}  # fmt: skip


def _seq_id(ftype: FrameType, h: dict) -> None:
    seq = h.get("seq")
    if type(seq) is int:
        _int(ftype, h, "seq")
    else:
        _str(ftype, h, "seq", limit=128)


def _check_header(ftype: FrameType, h: dict, payload_len: int) -> None:
    """Type-specific header checks, run before the payload is allocated."""
    if ftype in (FrameType.JOIN, FrameType.JOIN_OK):
        _node_id(ftype, h)
        proof = h.get("proof")
        if proof is not None and not (isinstance(proof, str) and _HEX_PROOF_RE.match(proof)):
            raise _fail(ftype, "'proof' must be null or 64 hex digits")
        _no_payload(ftype, payload_len)
    elif ftype == FrameType.HELLO:
        _int(ftype, h, "id")
        _node_id(ftype, h)
        _str(ftype, h, "version", limit=64)
        _no_payload(ftype, payload_len)
    elif ftype == FrameType.INFO:
        _int(ftype, h, "id")
        _node_id(ftype, h)
        _str(ftype, h, "version", limit=64)
        _str(ftype, h, "device", limit=256)
        _int(ftype, h, "memory_budget")
        shards = h.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(c, str) and _CID_RE.match(c) for c in shards
        ):
            raise _fail(ftype, "'shards' must be a list of CIDs")
        _no_payload(ftype, payload_len)
    elif ftype == FrameType.REQUEST:
        _int(ftype, h, "id")
        _str(ftype, h, "method", pattern=_METHOD_RE)
    elif ftype == FrameType.RESPONSE:
        _int(ftype, h, "id")
    elif ftype == FrameType.STREAM_DATA:
        _int(ftype, h, "id")
        _int(ftype, h, "seq")
    elif ftype == FrameType.STREAM_END:
        _int(ftype, h, "id")
        _no_payload(ftype, payload_len)
    elif ftype == FrameType.HIDDEN:
        _check_hidden(h, payload_len)
    elif ftype == FrameType.STEP:
        _check_step(h, payload_len)
    elif ftype == FrameType.SHARD_READ:
        _int(ftype, h, "id")
        _str(ftype, h, "cid", pattern=_CID_RE)
        _int(ftype, h, "offset")
        _int(ftype, h, "length", lo=1, hi=MAX_SHARD_WINDOW)
        _no_payload(ftype, payload_len)
    elif ftype == FrameType.SHARD_DATA:
        _int(ftype, h, "id")
        _str(ftype, h, "cid", pattern=_CID_RE)
        _int(ftype, h, "offset")
        if payload_len > MAX_SHARD_WINDOW:
            raise _fail(ftype, f"payload over the {MAX_SHARD_WINDOW}-byte window")
    elif ftype == FrameType.ERROR:
        _int(ftype, h, "id", opt=True)
        _str(ftype, h, "code", limit=64, pattern=_CODE_RE)
        _str(ftype, h, "message", limit=4096)
        _no_payload(ftype, payload_len)


# ---- encoding -----------------------------------------------------------------------------


def _header_bytes(header: dict) -> bytes:
    if not header:
        return b""
    try:
        data = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise FrameError(f"header is not plain JSON: {exc}") from exc
    return data


def encode_parts(frame: Frame) -> tuple[bytes, bytes]:
    """(fixed header + JSON header, payload): send both, in order. Validates like decode."""
    try:
        ftype = FrameType(frame.type)
    except ValueError as exc:
        raise FrameError(f"unknown frame type {frame.type!r}") from exc
    if not isinstance(frame.header, dict):
        raise FrameError("header must be a dict")
    if frame.flags & ~KNOWN_FLAGS or not 0 <= frame.flags <= 0xFFFF:
        raise FrameError(f"unknown flags {frame.flags:#x}")
    payload = frame.payload
    if ftype == FrameType.STEP:  # checked before it is packed
        _check_header(ftype, frame.header, len(payload))
        header = _step_bytes(frame.header)
    else:
        header = _header_bytes(frame.header)
    if len(header) > MAX_HEADER:
        raise FrameError(f"header of {len(header)} bytes over the {MAX_HEADER}-byte limit")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes over the {MAX_PAYLOAD}-byte limit")
    _check_header(ftype, frame.header, len(payload))
    prefix = FIXED.pack(MAGIC, VERSION, ftype, frame.flags, len(header), len(payload)) + header
    return prefix, payload


def encode(frame: Frame) -> bytes:
    prefix, payload = encode_parts(frame)
    return prefix + bytes(payload)


# ---- decoding -----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise FrameError(f"JSON constant {name} not allowed")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise FrameError("duplicate key in JSON header")
    return result


def parse_fixed(
    data: bytes, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD
) -> tuple[FrameType, int, int, int]:
    """(type, flags, header length, payload length) of a 16-byte fixed header, all checked."""
    if len(data) != FIXED_SIZE:
        raise FrameError("fixed header must be 16 bytes")
    magic, version, type_code, flags, header_len, payload_len = FIXED.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}")
    try:
        ftype = FrameType(type_code)
    except ValueError as exc:
        raise FrameError(f"unknown frame type {type_code}") from exc
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flags {flags:#x}")
    if header_len > max_header:
        raise FrameError(f"header length {header_len} over the limit {max_header}")
    if payload_len > max_payload:
        raise FrameError(f"payload length {payload_len} over the limit {max_payload}")
    return ftype, flags, header_len, payload_len


def parse_header(ftype: FrameType, data: bytes | bytearray, payload_len: int) -> dict[str, Any]:
    """The JSON header of a frame (a STEP's binary one), checked for its type (payload length
    already known)."""
    if ftype == FrameType.STEP:
        header: Any = _step_header(data)
    elif not data:
        header = {}
    else:
        try:
            header = json.loads(
                bytes(data).decode("utf-8"),
                parse_constant=_reject_constant,
                object_pairs_hook=_unique_pairs,
            )
        except FrameError:
            raise
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FrameError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("header must be a JSON object")
    _check_header(ftype, header, payload_len)
    return header


def decode(data: bytes) -> Frame:
    """Exactly one frame from ``data``; FrameError on anything else."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    decoder.close()
    if len(frames) != 1:
        raise FrameError(f"expected one frame, found {len(frames)}")
    return frames[0]


class FrameDecoder:
    """Incremental decoder for one stream: ``feed(bytes) -> [Frame, ...]``.

    Buffers at most one frame. After a FrameError it stays failed (the stream is unusable).
    ``types`` restricts which frame types are acceptable (e.g. only JOIN before admission).
    """

    def __init__(
        self,
        max_header: int = MAX_HEADER,
        max_payload: int = MAX_PAYLOAD,
        types: frozenset[FrameType] | None = None,
    ) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self.types = types
        self._failed = False
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._fixed: tuple[FrameType, int, int, int] | None = None
        self._header: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._payload_len = 0

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress."""
        return len(self._buf) + (len(self._payload) if self._payload is not None else 0)

    @property
    def at_boundary(self) -> bool:
        return not self._buf and self._payload is None

    def close(self) -> None:
        """End of stream: FrameError if a frame was cut short."""
        if not self._failed and not self.at_boundary:
            self._failed = True
            raise FrameError("stream ended inside a frame")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed:
            raise FrameError("stream already failed")
        try:
            return self._feed(memoryview(data).cast("B"))
        except FrameError:
            self._failed = True
            raise

    def _feed(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos, end = 0, len(view)
        while True:
            if self._payload is None:
                want = FIXED_SIZE + (self._fixed[2] if self._fixed else 0)
                if len(self._buf) < want:
                    if pos >= end:
                        return frames
                    take = min(want - len(self._buf), end - pos)
                    self._buf += view[pos : pos + take]
                    pos += take
                    continue
                if self._fixed is None:
                    self._fixed = parse_fixed(bytes(self._buf), self.max_header, self.max_payload)
                    if self.types is not None and self._fixed[0] not in self.types:
                        raise FrameError(f"frame type {self._fixed[0].name} not allowed here")
                    continue
                ftype, _flags, _header_len, payload_len = self._fixed
                self._header = parse_header(ftype, self._buf[FIXED_SIZE:], payload_len)
                # all checks passed; the payload grows as its bytes arrive, so a peer that
                # announces 64 MiB and sends 10 bytes costs 10 bytes, not 64 MiB
                self._payload = bytearray()
                self._payload_len = payload_len
            if len(self._payload) < self._payload_len:
                if pos >= end:
                    return frames
                take = min(self._payload_len - len(self._payload), end - pos)
                self._payload += view[pos : pos + take]
                pos += take
                continue
            assert self._fixed is not None and self._header is not None  # read above
            ftype, flags, _, _ = self._fixed
            frames.append(Frame(ftype, self._header, bytes(self._payload), flags))
            self._reset()


# ---- constructors -------------------------------------------------------------------------


def join_frame(node_id: str, proof: bytes | None, ok: bool = False) -> Frame:
    ftype = FrameType.JOIN_OK if ok else FrameType.JOIN
    return Frame(ftype, {"node_id": node_id, "proof": proof.hex() if proof else None})


def hello_frame(request_id: int, node_id: str, version: str) -> Frame:
    return Frame(FrameType.HELLO, {"id": request_id, "node_id": node_id, "version": version})


def info_frame(
    request_id: int,
    node_id: str,
    version: str,
    device: str,
    memory_budget: int,
    shards: Sequence[str] = (),
    **fields: Any,
) -> Frame:
    header = {
        **fields,
        "id": request_id,
        "node_id": node_id,
        "version": version,
        "device": device,
        "memory_budget": memory_budget,
        "shards": list(shards),
    }
    return Frame(FrameType.INFO, header)


def request_frame(request_id: int, method: str, payload: bytes = b"", **fields: Any) -> Frame:
    return Frame(FrameType.REQUEST, {**fields, "id": request_id, "method": method}, payload)


def response_frame(request_id: int, payload: bytes = b"", **fields: Any) -> Frame:
    return Frame(FrameType.RESPONSE, {**fields, "id": request_id}, payload)


def stream_data_frame(request_id: int, seq: int, payload: bytes = b"", **fields: Any) -> Frame:
    return Frame(FrameType.STREAM_DATA, {**fields, "id": request_id, "seq": seq}, payload)


def stream_end_frame(request_id: int, **fields: Any) -> Frame:
    return Frame(FrameType.STREAM_END, {**fields, "id": request_id}, b"", FLAG_LAST)


def error_frame(code: str, message: str, request_id: int | None = None) -> Frame:
    header: dict[str, Any] = {"code": code, "message": message[:4096]}
    if request_id is not None:
        header["id"] = request_id
    return Frame(FrameType.ERROR, header)


def shard_read_frame(request_id: int, cid: str, offset: int, length: int) -> Frame:
    header = {"id": request_id, "cid": cid, "offset": offset, "length": length}
    return Frame(FrameType.SHARD_READ, header)


def shard_data_frame(request_id: int, cid: str, offset: int, data: bytes, **fields: Any) -> Frame:
    header = {**fields, "id": request_id, "cid": cid, "offset": offset}
    return Frame(FrameType.SHARD_DATA, header, data)


def hidden_frame(
    seq: int | str, payload: bytes, shape: Sequence[int], dtype: str = "float16", **fields: Any
) -> Frame:
    """Activations ``[T, hidden_dim]`` (float32 or float16, little-endian), or token ids if
    hidden_dim 1."""
    header = {**fields, "seq": seq, "shape": [int(n) for n in shape], "dtype": dtype}
    return Frame(FrameType.HIDDEN, header, payload)


def token_frame(seq: int | str, token_ids: Sequence[int], dtype: str = "int32", **fields) -> Frame:
    """Token ids as a HIDDEN frame: shape [T, 1], 4 bytes each, little-endian."""
    return hidden_frame(seq, pack_token_ids(token_ids, dtype), [len(token_ids), 1], dtype, **fields)


def pack_token_ids(token_ids: Sequence[int], dtype: str = "int32") -> bytes:
    if dtype not in TOKEN_DTYPES:
        raise FrameError(f"token dtype must be one of {TOKEN_DTYPES}")
    code = "i" if dtype == "int32" else "I"
    try:
        return struct.pack(f"<{len(token_ids)}{code}", *token_ids)
    except struct.error as exc:
        raise FrameError(f"token id out of range for {dtype}: {exc}") from exc


def step_frame(
    step: int, pos: int, payload: bytes, shape: Sequence[int], dtype: str, more: bool = False
) -> Frame:
    """A pipeline step: activations ``[T, hidden_dim]``, or token ids if hidden_dim is 1."""
    header = {"step": step, "pos": pos, "shape": [int(n) for n in shape], "dtype": dtype,
              "more": more}  # fmt: skip
    return Frame(FrameType.STEP, header, payload)


def token_step(step: int, pos: int, token_ids: Sequence[int], more: bool = False) -> Frame:
    """Token ids as a STEP frame: shape [T, 1], int32 little-endian."""
    payload = pack_token_ids(token_ids)
    return step_frame(step, pos, payload, [len(token_ids), 1], "int32", more)


def token_ids(frame: Frame) -> list[int]:
    """The token ids of a HIDDEN or STEP frame with hidden_dim 1; FrameError for activations."""
    if frame.type not in (FrameType.HIDDEN, FrameType.STEP):
        raise FrameError(f"{frame.type.name} frame holds no token ids")
    tokens, hidden_dim, dtype = hidden_geometry(frame.header, frame.type)
    if hidden_dim != 1:
        raise FrameError(f"hidden_dim {hidden_dim}: activations, not token ids")
    code = "i" if dtype == "int32" else "I"
    if len(frame.payload) != 4 * tokens:
        raise FrameError("payload size does not match the shape")
    return list(struct.unpack(f"<{tokens}{code}", frame.payload))
