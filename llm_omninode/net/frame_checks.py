"""Each frame type's header checked (types, ranges, exact payload sizes) before its payload is
allocated, and STEP's fixed binary header (the layout is in frames.py's docstring)."""

from __future__ import annotations

import re
from typing import Any

from .frame_types import (
    ACTIVATION_DTYPES,
    DTYPE_SIZES,
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
    FrameError,
    FrameType,
)
from .identity import is_node_id

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
    keys = {"step", "pos", "shape", "dtype", "more"}
    if set(h) != keys and set(h) != keys | {"pooled"}:
        raise _fail(ftype, "header is exactly {step, pos, shape, dtype, more[, pooled]}")
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
    pooled = h.get("pooled", False)  # a tail's embedding: one float32 row, final
    if pooled is not False and (
        pooled is not True or h["more"] or tokens != 1 or dtype != "float32"
    ):
        raise _fail(ftype, "a pooled step is one float32 row, not marked more")


def _check_scores(h: dict, payload_len: int) -> None:
    ftype = FrameType.SCORES
    if set(h) != {"step", "pos", "rows", "k", "pick"}:
        raise _fail(ftype, "header is exactly {step, pos, rows, k, pick}")
    _int(ftype, h, "step", hi=MAX_STEP)
    _int(ftype, h, "pos", hi=MAX_STEP)
    _int(ftype, h, "rows", lo=1, hi=MAX_SCORE_ROWS)
    _int(ftype, h, "k", hi=MAX_SCORE_TOP)
    if not isinstance(h["pick"], bool):
        raise _fail(ftype, "'pick' must be true or false")
    expected = h["rows"] * (h["k"] + 1) * 8  # int32 ids, then float32 logprobs
    if expected != payload_len:
        raise _fail(ftype, f"payload is {payload_len} bytes; {h['rows']} rows of top "
                    f"{h['k']} need exactly {expected}")  # fmt: skip


def step_bytes(h: dict) -> bytes:
    """The binary header of a checked STEP header dict."""
    tokens, hidden_dim = h["shape"]
    flags = (STEP_MORE if h["more"] else 0) | (STEP_POOLED if h.get("pooled") else 0)
    code = STEP_DTYPES.index(h["dtype"])
    return STEP_HEADER.pack(h["step"], h["pos"], tokens, hidden_dim, code, flags, 0)


def parse_step_header(data: bytes | bytearray) -> dict[str, Any]:
    """A STEP header dict from its binary form; FrameError unless every field is valid."""
    if len(data) != STEP_HEADER.size:
        raise _fail(FrameType.STEP, f"header must be {STEP_HEADER.size} bytes")
    step, pos, tokens, hidden_dim, code, flags, reserved = STEP_HEADER.unpack(bytes(data))
    if code >= len(STEP_DTYPES):
        raise _fail(FrameType.STEP, f"unknown dtype code {code}")
    if flags & ~(STEP_MORE | STEP_POOLED) or reserved:
        raise _fail(FrameType.STEP, f"unknown flags {flags:#x} or reserved bits set")
    header = {"step": step, "pos": pos, "shape": [tokens, hidden_dim],
              "dtype": STEP_DTYPES[code], "more": bool(flags & STEP_MORE)}  # fmt: skip
    if flags & STEP_POOLED:  # only then: every other step's header stays as it was
        header["pooled"] = True
    return header


def _seq_id(ftype: FrameType, h: dict) -> None:
    seq = h.get("seq")
    if type(seq) is int:
        _int(ftype, h, "seq")
    else:
        _str(ftype, h, "seq", limit=128)


def check_header(ftype: FrameType, h: dict, payload_len: int) -> None:
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
    elif ftype == FrameType.SCORES:
        _check_scores(h, payload_len)
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
