"""Wire frames: round trips, every limit, and the incremental decoder."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from llm_omninode.net import frames as F
from llm_omninode.net.frames import (
    FIXED,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_SHARD_WINDOW,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
)
from llm_omninode.net.identity import NodeIdentity

NODE = NodeIdentity.generate().node_id
CID = "bafkr4i" + "a" * 52


def raw(ftype: int, header: bytes, payload: bytes = b"", *, flags=0, version=1, magic=MAGIC,
        header_len=None, payload_len=None) -> bytes:  # fmt: skip
    """A frame assembled by hand, lengths overridable to lie."""
    hl = len(header) if header_len is None else header_len
    pl = len(payload) if payload_len is None else payload_len
    return FIXED.pack(magic, version, ftype, flags, hl, pl) + header + payload


def sample_frames() -> list[Frame]:
    activations = np.arange(3 * 8, dtype=np.float16).reshape(3, 8)
    return [
        F.join_frame(NODE, bytes(range(32))),
        F.join_frame(NODE, None, ok=True),
        F.hello_frame(1, NODE, "0.1.0"),
        F.info_frame(2, NODE, "0.1.0", "cpu", 8 << 30, [CID], extra={"a": 1}),
        F.request_frame(3, "generate", b"\x00\x01", prompt="hi \u00e9\u4e2d"),
        F.response_frame(3, b"ok", done=True),
        F.stream_data_frame(4, 0, b"tok"),
        F.stream_end_frame(4, reason="stop"),
        F.hidden_frame("seq-1", activations.tobytes(), activations.shape, pos=7),
        F.token_frame(9, [1, 2, 3, 2**31 - 1, -5]),
        F.token_frame(9, [0, 2**32 - 1], dtype="uint32"),
        F.step_frame(0, 0, activations.tobytes(), activations.shape, "float16"),
        F.step_frame(2**32 - 1, 2**32 - 1, b"\0" * 32, [1, 8], "float32", more=True),
        F.token_step(5, 12, [1, 2**31 - 1, -5], more=True),
        F.shard_read_frame(5, CID, 2**40, MAX_SHARD_WINDOW),
        F.shard_data_frame(5, CID, 0, b"\xff" * 1000, size=1000),
        F.error_frame(F.ErrorCode.NOT_FOUND, "no such shard", 5),
        F.error_frame(F.ErrorCode.BAD_FRAME, "x"),
        Frame(FrameType.RESPONSE, {"id": 0}),
    ]


@pytest.mark.parametrize("frame", sample_frames(), ids=lambda f: f.type.name)
def test_round_trip(frame):
    data = F.encode(frame)
    assert data[:4] == MAGIC
    assert F.decode(data) == frame
    prefix, payload = F.encode_parts(frame)
    assert prefix + payload == data


def test_decoder_any_split_and_many_frames():
    frames = sample_frames()
    stream = b"".join(F.encode(f) for f in frames)
    rng = random.Random(1)
    for _ in range(20):
        decoder = FrameDecoder()
        out, pos = [], 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 7, 16, 100, 5000])
            out += decoder.feed(stream[pos : pos + step])
            pos += step
        decoder.close()
        assert out == frames
    one_byte = FrameDecoder()
    got = [f for b in stream for f in one_byte.feed(bytes([b]))]
    assert got == frames and one_byte.at_boundary


def test_hidden_activations_and_token_ids():
    x = np.random.default_rng(0).standard_normal((5, 64)).astype("<f2")
    frame = F.decode(F.encode(F.hidden_frame(1, x.tobytes(), [5, 64])))
    tokens, width, dtype = F.hidden_geometry(frame.header)
    assert (tokens, width, dtype) == (5, 64, "float16")
    back = np.frombuffer(frame.payload, dtype="<f2").reshape(tokens, width)
    assert np.array_equal(back, x)
    ids = F.decode(F.encode(F.token_frame("s", [42])))
    assert ids.header["shape"] == [1, 1] and len(ids.payload) == 4
    assert F.token_ids(ids) == [42]
    with pytest.raises(FrameError):
        F.token_ids(frame)  # activations are not token ids
    with pytest.raises(FrameError):
        F.pack_token_ids([2**31], "int32")
    with pytest.raises(FrameError):
        F.pack_token_ids([-1], "uint32")


@pytest.mark.parametrize(
    "shape,dtype,nbytes",
    [
        ([2, 8], "float16", 31),  # one byte short
        ([2, 8], "float16", 33),  # one byte over
        ([2, 1], "int32", 7),
        ([2, 1], "float16", 4),  # hidden_dim 1 means token ids
        ([2, 8], "int32", 64),  # wide means float16
        ([2, 8], "float64", 128),  # activations are float32 or float16
        ([2, 8], "float32", 32),  # float32 is 4 bytes each
        ([0, 8], "float16", 0),
        ([2], "float16", 4),
        ([2, 8, 1], "float16", 32),
        ([2, True], "int32", 8),
        ("2x8", "float16", 32),
    ],
)
def test_hidden_size_must_match_shape_exactly(shape, dtype, nbytes):
    header = {"seq": 1, "shape": shape, "dtype": dtype}
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.HIDDEN, header, b"\0" * nbytes))
    data = raw(FrameType.HIDDEN, F._header_bytes(header), b"\0" * nbytes)
    with pytest.raises(FrameError):
        F.decode(data)


def test_hidden_size_checked_before_payload_arrives():
    header = F._header_bytes({"seq": 1, "shape": [4, 4096], "dtype": "float16"})
    data = raw(FrameType.HIDDEN, header, payload_len=4 * 4096 * 2 + 2)
    decoder = FrameDecoder()
    with pytest.raises(FrameError, match="needs exactly"):
        decoder.feed(data)  # fixed + JSON header only: refused without the payload


def test_length_limits_are_checked_from_the_fixed_header_alone():
    too_long_header = raw(FrameType.REQUEST, b"", header_len=MAX_HEADER + 1)
    with pytest.raises(FrameError, match="header length"):
        FrameDecoder().feed(too_long_header)
    too_long_payload = raw(FrameType.REQUEST, b"", payload_len=MAX_PAYLOAD + 1)
    with pytest.raises(FrameError, match="payload length"):
        FrameDecoder().feed(too_long_payload)
    huge = raw(FrameType.REQUEST, b"", header_len=2**32 - 1, payload_len=2**32 - 1)
    with pytest.raises(FrameError):
        FrameDecoder().feed(huge)
    small = FrameDecoder(max_header=10, max_payload=5)
    with pytest.raises(FrameError):
        small.feed(raw(FrameType.RESPONSE, b'{"id":1234}'))
    small = FrameDecoder(max_payload=5)
    with pytest.raises(FrameError):
        small.feed(raw(FrameType.RESPONSE, b'{"id":1}', payload_len=6))
    # exactly at the limits is fine
    assert FrameDecoder(max_header=8, max_payload=5).feed(
        raw(FrameType.RESPONSE, b'{"id":1}', b"12345")
    )


def test_maximum_header_and_payload_round_trip():
    pad = "x" * (MAX_HEADER - len('{"id":1,"pad":""}'))
    big = Frame(FrameType.RESPONSE, {"id": 1, "pad": pad}, b"\x01" * MAX_PAYLOAD)
    data = F.encode(big)
    assert len(data) == 16 + MAX_HEADER + MAX_PAYLOAD
    assert F.decode(data) == big
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.RESPONSE, {"id": 1, "pad": pad + "x"}))
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.RESPONSE, {"id": 1}, b"\x01" * (MAX_PAYLOAD + 1)))


def test_shard_window_limits():
    with pytest.raises(FrameError):
        F.encode(F.shard_read_frame(1, CID, 0, MAX_SHARD_WINDOW + 1))
    with pytest.raises(FrameError):
        F.encode(F.shard_read_frame(1, CID, 0, 0))
    with pytest.raises(FrameError):
        F.encode(F.shard_read_frame(1, CID, -1, 10))
    with pytest.raises(FrameError):
        F.encode(F.shard_read_frame(1, "../../etc/passwd", 0, 10))
    with pytest.raises(FrameError):
        F.encode(F.shard_data_frame(1, CID, 0, b"\0" * (MAX_SHARD_WINDOW + 1)))
    header = F._header_bytes({"id": 1, "cid": CID, "offset": 0})
    with pytest.raises(FrameError, match="window"):
        FrameDecoder().feed(raw(FrameType.SHARD_DATA, header, payload_len=MAX_SHARD_WINDOW + 1))


@pytest.mark.parametrize(
    "data,match",
    [
        (raw(FrameType.RESPONSE, b'{"id":1}', magic=b"OMNJ"), "magic"),
        (raw(FrameType.RESPONSE, b'{"id":1}', version=2), "version"),
        (raw(0, b""), "unknown frame type"),
        (raw(200, b""), "unknown frame type"),
        (raw(FrameType.RESPONSE, b'{"id":1}', flags=0x8000), "flags"),
        (raw(FrameType.RESPONSE, b"[1]"), "JSON object"),
        (raw(FrameType.RESPONSE, b'{"id":1,"x":NaN}'), "NaN"),
        (raw(FrameType.RESPONSE, b'{"id":1,"x":Infinity}'), "Infinity"),
        (raw(FrameType.RESPONSE, b'{"id":1,"id":2}'), "duplicate"),
        (raw(FrameType.RESPONSE, b'{"id":1,"x":"\xff"}'), "JSON"),
        (raw(FrameType.RESPONSE, b'{"id":1'), "JSON"),
        (raw(FrameType.RESPONSE, b"[" * 5000 + b"]" * 5000), "JSON"),
        (raw(FrameType.RESPONSE, b'{"id":' + b"9" * 5000 + b"}"), "JSON"),
        (raw(FrameType.RESPONSE, b'{"id":true}'), "'id'"),
        (raw(FrameType.RESPONSE, b'{"id":-1}'), "'id'"),
        (raw(FrameType.RESPONSE, b'{"id":1.5}'), "'id'"),
        (raw(FrameType.RESPONSE, b'{"id":9007199254740993}'), "'id'"),
        (raw(FrameType.REQUEST, b'{"id":1,"method":"Bad Method"}'), "method"),
        (raw(FrameType.REQUEST, b'{"id":1}'), "method"),
        (raw(FrameType.ERROR, b'{"message":"m"}'), "code"),
        (raw(FrameType.ERROR, b'{"code":"x","message":"m"}', b"p"), "no payload"),
        (raw(FrameType.JOIN, b'{"node_id":"omni1x","proof":null}'), "node id"),
        (raw(FrameType.STREAM_END, b'{"id":1}', b"x"), "no payload"),
        (raw(FrameType.INFO, b'{"id":1}'), "node_id"),
    ],
)
def test_malformed_frames_raise(data, match):
    with pytest.raises(FrameError, match=match):
        F.decode(data)


def test_truncated_and_trailing_bytes():
    data = F.encode(F.response_frame(1, b"abc"))
    for cut in range(len(data)):
        decoder = FrameDecoder()
        assert decoder.feed(data[:cut]) == []
        if cut:
            with pytest.raises(FrameError, match="inside a frame"):
                decoder.close()
    with pytest.raises(FrameError):
        F.decode(data + b"\x00")
    with pytest.raises(FrameError, match="one frame"):
        F.decode(data + data)


def test_decoder_stays_failed_and_honours_type_filter():
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(b"garbage-garbage-garbage")
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(F.encode(F.response_frame(1)))
    join_only = FrameDecoder(types=frozenset({FrameType.JOIN}))
    with pytest.raises(FrameError, match="not allowed"):
        join_only.feed(F.encode(F.request_frame(1, "x")))
    assert FrameDecoder(types=frozenset({FrameType.JOIN})).feed(F.encode(F.join_frame(NODE, None)))


def test_buffered_is_bounded_by_the_frame():
    decoder = FrameDecoder()
    data = F.encode(F.response_frame(1, b"x" * 1000))
    decoder.feed(data[:500])
    assert decoder.buffered <= len(data)
    decoder.feed(data[500:])
    assert decoder.buffered == 0 and decoder.at_boundary


def test_encode_rejects_what_decode_would():
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.RESPONSE, {"id": 1, "x": float("nan")}))
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.RESPONSE, {"id": 1, "x": object()}))
    with pytest.raises(FrameError):
        F.encode(Frame(FrameType.RESPONSE, {"id": 1}, flags=0x10))
    with pytest.raises(FrameError):
        F.encode(Frame(99, {}))  # type: ignore[arg-type]
    with pytest.raises(FrameError):
        F.encode(F.join_frame(NODE, b"\x01" * 31))  # proofs are 32 bytes


def test_fixed_header_layout():
    frame = F.response_frame(7, b"xy")
    data = F.encode(frame)
    magic, version, ftype, flags, hlen, plen = struct.unpack(">4sBBHII", data[:16])
    assert (magic, version, ftype, flags, plen) == (b"OMNI", 1, FrameType.RESPONSE, 0, 2)
    assert data[16 : 16 + hlen] == b'{"id":7}'
    assert data[16 + hlen :] == b"xy"


def test_step_header_is_a_fixed_struct():
    """A STEP frame's header is 20 bytes of binary fields, not JSON; every field is checked
    before the payload is taken, and the payload must match its shape exactly."""
    frame = F.token_step(3, 17, [42])
    data = F.encode(frame)
    assert len(data) == F.FIXED_SIZE + F.STEP_HEADER.size + 4
    assert F.STEP_HEADER.unpack(data[16:36]) == (3, 17, 1, 1, 2, 0, 0)
    assert F.decode(data).header == {"step": 3, "pos": 17, "shape": [1, 1], "dtype": "int32",
                                     "more": False}  # fmt: skip
    assert F.token_ids(F.decode(data)) == [42]

    def step(*fields, payload=b"\0" * 4):
        return raw(FrameType.STEP, F.STEP_HEADER.pack(*fields), payload)

    bad = [
        step(0, 0, 1, 1, 4, 0, 0),  # dtype code
        step(0, 0, 1, 1, 2, 2, 0),  # unknown flag
        step(0, 0, 1, 1, 2, 0, 1),  # reserved bits
        step(0, 0, 0, 1, 2, 0, 0),  # zero rows
        step(0, 0, 1, 0, 2, 0, 0),  # zero width
        step(0, 0, 2, 1, 2, 0, 0),  # payload short of the shape
        step(0, 0, 1, 1, 2, 0, 0, payload=b"\0" * 5),  # payload past it
        step(0, 0, 1, 8, 2, 0, 0, payload=b"\0" * 32),  # token ids are one wide only
        step(0, 0, 2**20, 2**20, 0, 0, 0, payload=b""),  # a shape past any payload
        raw(FrameType.STEP, b'{"step":0,"pos":0}', b""),  # JSON is no STEP header
        raw(FrameType.STEP, b"\0" * 19, b""),
        raw(FrameType.STEP, b"", b""),
    ]
    for data in bad:
        with pytest.raises(FrameError):
            F.decode(data)
    # nor does one leave with a header that is not exactly its fields
    good = {"step": 0, "pos": 0, "shape": [1, 1], "dtype": "int32", "more": False}
    wrong = [{"step": -1}, {"pos": 2**32}, {"more": 1}, {"extra": 0}, {"dtype": "float64"}]
    for header in [{k: v for k, v in good.items() if k != "more"}] + [good | w for w in wrong]:
        with pytest.raises(FrameError):
            F.encode(Frame(FrameType.STEP, header, b"\0" * 4))
