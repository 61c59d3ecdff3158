"""Malformed frames against a live QUIC endpoint: each gets an ERROR frame or a closed stream,
no handler ever sees one, and the endpoint keeps serving good requests afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import random

from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission
from llm_omninode.net.frames import FIXED, MAGIC, MAX_HEADER, MAX_PAYLOAD, FrameDecoder, FrameType
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import ConnectionClosed, QuicSettings, connect, serve

SEED = int(os.environ.get("OMNI_FUZZ_SEED", "20260101"))
CONNECTIONS = 4
PER_CONNECTION = 520  # 2,080 malformed frames per run
IN_FLIGHT = 32  # concurrent streams per connection
NODE = NodeIdentity.generate().node_id
CID = "bafkr4i" + "c" * 52


def _valid_frames() -> list[bytes]:
    return [
        F.encode(f)
        for f in [
            F.request_frame(1, "echo", b"payload"),
            F.response_frame(2, b"x" * 40, note="n"),
            F.hidden_frame(3, b"\0" * 32, [2, 8]),
            F.token_frame(4, [1, 2, 3]),
            F.step_frame(0, 9, b"\0" * 32, [2, 8], "float16", more=True),
            F.token_step(1, 10, [7]),
            F.shard_read_frame(5, CID, 0, 1024),
            F.shard_data_frame(6, CID, 0, b"abc"),
            F.error_frame("bad_request", "m", 7),
            F.hello_frame(8, NODE, "0.1"),
            F.stream_end_frame(9),
        ]
    ]


def _random_json(rng: random.Random) -> object:
    choices = [
        lambda: rng.randint(-(2**64), 2**64),
        lambda: rng.random(),
        lambda: "".join(rng.choice("ab\u00e9\u4e2d\0") for _ in range(rng.randint(0, 8))),
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: [rng.randint(0, 5) for _ in range(rng.randint(0, 3))],
    ]
    keys = ["id", "method", "seq", "shape", "dtype", "cid", "offset", "length", "code", "x"]
    return {rng.choice(keys): rng.choice(choices)() for _ in range(rng.randint(0, 5))}


def _candidate(rng: random.Random, valid: list[bytes]) -> bytes:
    base = rng.choice(valid)
    kind = rng.randrange(9)
    if kind == 0:  # noise
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:  # one corrupted byte in the fixed header
        data = bytearray(base)
        data[rng.randrange(16)] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # cut short, then the stream ends
        return base[: rng.randrange(1, len(base))]
    if kind == 3:  # lengths over the limits
        ftype = rng.choice(list(FrameType))
        return FIXED.pack(
            MAGIC, 1, ftype, 0, MAX_HEADER + rng.randint(1, 2**20), rng.randint(0, 2**32 - 1)
        )
    if kind == 4:
        ftype = rng.choice(list(FrameType))
        return FIXED.pack(MAGIC, 1, ftype, 0, 2, MAX_PAYLOAD + rng.randint(1, 2**20)) + b"{}"
    if kind == 5:  # a header that is not JSON
        header = rng.randbytes(rng.randint(1, 64))
        return FIXED.pack(MAGIC, 1, rng.choice(list(FrameType)), 0, len(header), 0) + header
    if kind == 6:  # JSON, but not what the type needs
        header = json.dumps(_random_json(rng)).encode()
        payload = rng.randbytes(rng.randint(0, 40))
        ftype = rng.choice(list(FrameType))
        return FIXED.pack(MAGIC, 1, ftype, 0, len(header), len(payload)) + header + payload
    if kind == 7:  # bytes flipped inside the JSON header of a valid frame
        data = bytearray(base)
        header_len = int.from_bytes(data[8:12], "big")
        for _ in range(rng.randint(1, 3)):
            data[16 + rng.randrange(max(header_len, 1))] ^= 1 << rng.randrange(8)
        return bytes(data)
    # HIDDEN whose payload does not match its shape
    tokens, width = rng.randint(1, 4), rng.choice([1, 8, 64])
    dtype = "int32" if width == 1 else "float16"
    size = tokens * width * (4 if width == 1 else 2) + rng.choice([-2, -1, 1, 3])
    header = json.dumps({"seq": 1, "shape": [tokens, width], "dtype": dtype}).encode()
    payload = b"\0" * max(size, 0)
    return FIXED.pack(MAGIC, 1, FrameType.HIDDEN, 0, len(header), len(payload)) + header + payload


def _first_frame_is_malformed(data: bytes) -> bool:
    decoder = FrameDecoder()
    try:
        if decoder.feed(data):
            return False
        decoder.close()
    except F.FrameError:
        return True
    return False


def malformed_samples(rng: random.Random, count: int) -> list[bytes]:
    valid = _valid_frames()
    samples: list[bytes] = []
    while len(samples) < count:
        data = _candidate(rng, valid)
        if _first_frame_is_malformed(data):
            samples.append(data)
    return samples


class Handler:
    def __init__(self) -> None:
        self.seen: list[F.Frame] = []

    async def __call__(self, peer: str, frame: F.Frame, stream) -> F.Frame:
        self.seen.append(frame)
        return F.response_frame(frame.id or 0, frame.payload)


async def _send_malformed(conn, data: bytes) -> str:
    stream = conn._protocol.open_stream()
    stream.write_raw(data, end_stream=True)
    try:
        answers = []
        while (frame := await stream.recv(timeout=10)) is not None:
            answers.append(frame)
    except ConnectionClosed:
        return "reset"
    finally:
        conn._protocol.forget_stream(stream.stream_id)
    if not answers:
        return "closed"
    assert len(answers) == 1, answers
    assert answers[0].type == FrameType.ERROR, answers[0]
    assert answers[0].header["code"] == F.ErrorCode.BAD_FRAME
    return "error"


def test_malformed_frames_over_live_quic():
    rng = random.Random(SEED)
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    handler = Handler()
    settings = QuicSettings(connect_timeout=5.0, request_timeout=10.0)
    outcomes: dict[str, int] = {}

    async def fuzz_one_connection(port: int, samples: list[bytes]):
        conn = await connect("127.0.0.1", port, client_id, Admission.open_mode(), None, settings)
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(data: bytes):
            async with gate:
                outcome = await _send_malformed(conn, data)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(one(d) for d in samples))
        return conn

    async def main():
        server = await serve("127.0.0.1", 0, server_id, Admission.open_mode(), handler, settings)
        try:
            batches = [malformed_samples(rng, PER_CONNECTION) for _ in range(CONNECTIONS)]
            conns = await asyncio.gather(*(fuzz_one_connection(server.port, b) for b in batches))
            assert handler.seen == []  # no malformed frame reached the handler
            for i, conn in enumerate(conns):  # the fuzzed connections still serve
                assert not conn.closed
                reply = await conn.request(F.request_frame(i, "echo", b"still here"), timeout=10)
                assert reply.payload == b"still here"
                await conn.close()
            fresh = await connect(
                "127.0.0.1", server.port, client_id, Admission.open_mode(), None, settings
            )
            assert (await fresh.request(F.request_frame(99, "echo", b"ok"))).payload == b"ok"
            await fresh.close()
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert sum(outcomes.values()) == CONNECTIONS * PER_CONNECTION >= 2000
    assert outcomes.get("error", 0) > CONNECTIONS * PER_CONNECTION // 2, outcomes
    assert len(handler.seen) == CONNECTIONS + 1
