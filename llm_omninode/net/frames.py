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
    17     1     flags (STEP_MORE: a prompt piece nobody answers; STEP_POOLED: a tail's
                 answer that is a sequence's pooled embedding, one float32 row; every other
                 bit zero)
    18     2     reserved, zero

Decoded, the header is ``{"step", "pos", "shape": [T, hidden_dim], "dtype", "more"}`` (and
``"pooled": true`` when that flag is set) and is
checked like a HIDDEN one (payload bytes exact) before the payload is allocated.

A tail asked for logprobs answers with SCORES frames: a JSON header ``{"step", "pos", "rows",
"k", "pick"}`` (rows 1..MAX_SCORE_ROWS, k 0..MAX_SCORE_TOP) and a payload of exactly rows x
(k + 1) int32 ids (column 0 the scored token, then the top k) followed by as many float32
logprobs, little-endian; ``scores_of`` also refuses negative ids and logprobs that are not
finite and <= 0.

Here: encoding, decoding (one frame, or incrementally from a stream) and the constructors;
the constants and types are in frame_types.py, each type's header checks in frame_checks.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

# the wire's names are defined in frame_types.py and frame_checks.py; callers use them from here
from .frame_checks import (  # noqa: F401
    check_header,
    hidden_geometry,
    is_wire_cid,
    parse_step_header,
    step_bytes,
)
from .frame_types import (  # noqa: F401
    ACTIVATION_DTYPES,
    DTYPE_SIZES,
    FIXED,
    FIXED_SIZE,
    FLAG_LAST,
    KNOWN_FLAGS,
    MAGIC,
    MAX_HEADER,
    MAX_ID,
    MAX_PAYLOAD,
    MAX_SCORE_ROWS,
    MAX_SCORE_TOP,
    MAX_SHARD_WINDOW,
    MAX_STEP,
    STEP_DTYPES,
    STEP_HEADER,
    STEP_MORE,
    STEP_POOLED,
    TOKEN_DTYPES,
    VERSION,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
)

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
        check_header(ftype, frame.header, len(payload))
        header = step_bytes(frame.header)
    else:
        header = _header_bytes(frame.header)
    if len(header) > MAX_HEADER:
        raise FrameError(f"header of {len(header)} bytes over the {MAX_HEADER}-byte limit")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes over the {MAX_PAYLOAD}-byte limit")
    check_header(ftype, frame.header, len(payload))
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
        header: Any = parse_step_header(data)
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
    check_header(ftype, header, payload_len)
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
        # the payload arrives as slices of the packets it came in, joined once when complete
        # (growing one buffer copied every byte again at each resize, then once more)
        self._payload: list[memoryview] | None = None
        self._payload_have = 0
        self._payload_len = 0

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress."""
        return len(self._buf) + self._payload_have

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
            # payload slices are kept until their frame is whole: of immutable bytes only
            return self._feed(memoryview(data if isinstance(data, bytes) else bytes(data)))
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
                self._payload = []
                self._payload_len = payload_len
            if self._payload_have < self._payload_len:
                if pos >= end:
                    return frames
                take = min(self._payload_len - self._payload_have, end - pos)
                self._payload.append(view[pos : pos + take])
                self._payload_have += take
                pos += take
                continue
            assert self._fixed is not None and self._header is not None  # read above
            ftype, flags, _, _ = self._fixed
            frames.append(Frame(ftype, self._header, b"".join(self._payload), flags))
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


def scores_frame(step: int, pos: int, ids: Any, logprobs: Any, pick: bool) -> Frame:
    """A tail's scored positions (SCORES): ``ids`` int32 and ``logprobs`` float32, both
    ``[rows, 1 + k]`` (column 0 the scored token, then the top k); ``pick``: the last row's
    token is the step's answer."""
    rows, width = ids.shape
    header = {"step": step, "pos": pos, "rows": int(rows), "k": int(width) - 1, "pick": pick}
    payload = ids.astype("<i4").tobytes() + logprobs.astype("<f4").tobytes()
    return Frame(FrameType.SCORES, header, payload)


def scores_of(frame: Frame) -> tuple[Any, Any]:
    """(ids, logprobs) of a SCORES frame, each ``[rows, 1 + k]``; FrameError unless every id
    is >= 0 and every logprob finite and <= 0."""
    import numpy as np  # only the pipeline's ends read scores

    h = frame.header
    if frame.type != FrameType.SCORES:
        raise FrameError(f"{frame.type.name} frame holds no scores")
    shape = (h["rows"], h["k"] + 1)
    n = shape[0] * shape[1]
    if len(frame.payload) != 8 * n:
        raise FrameError("SCORES: payload size does not match rows and k")
    ids = np.frombuffer(frame.payload, dtype="<i4", count=n).reshape(shape)
    logprobs = np.frombuffer(frame.payload, dtype="<f4", count=n, offset=4 * n).reshape(shape)
    if ids.min() < 0 or not np.isfinite(logprobs).all() or logprobs.max() > 0:
        raise FrameError("SCORES: a negative id, or a logprob that is not finite and <= 0")
    return ids, logprobs


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


def pooled_step(step: int, pos: int, vector: bytes, width: int) -> Frame:
    """A sequence's pooled embedding as its tail's answer: ``width`` little-endian float32
    values (one row), flagged pooled."""
    header = {"step": step, "pos": pos, "shape": [1, width], "dtype": "float32",
              "more": False, "pooled": True}  # fmt: skip
    return Frame(FrameType.STEP, header, bytes(vector))


def pooled_bytes(frame: Frame, width: int) -> bytes:
    """The float32 bytes of a pooled STEP frame; FrameError unless it holds ``width`` values."""
    if frame.type != FrameType.STEP or frame.header.get("pooled") is not True:
        raise FrameError(f"expected a pooled step, got a {frame.type.name} frame")
    if frame.header["shape"] != [1, width] or len(frame.payload) != 4 * width:
        raise FrameError(f"a pooled step must hold {width} float32 values")
    return frame.payload
