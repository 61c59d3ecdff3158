"""The wire's vocabulary: limits, frame types, error codes, the Frame itself (frames.py
describes the layout; frame_checks.py checks each type's header)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

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
STEP_POOLED = 0x02  # a tail's answer: one sequence's pooled embedding, float32 [1, width]
MAX_STEP = 2**32 - 1
MAX_SCORE_TOP = 20  # top logprobs a SCORES row carries besides its token's (OpenAI's bound)
MAX_SCORE_ROWS = 4096  # positions one SCORES frame carries (a prompt's go in several)


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
    SCORES = 14  # a tail's scored positions: step, pos, rows, k, pick; payload ids + logprobs


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
