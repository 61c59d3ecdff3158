"""A live shim against hostile members: oversized and malformed frames, wrong tensors, unknown
sequences, and a flood of streams. Every test ends the same way: the node is still up, answers
a normal request, and its store lost nothing (``LiveShim.assert_intact``).

One shim process (module-scoped) holds a tiny model (file-backed) and one 24 MiB shard of
random bytes received "from a peer" (stored under its CID), so shard reads have something big
to ask for. The peers are in this process, on real QUIC with the cluster secret: members, so
what they send reaches the request handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import numpy as np
import pytest
from support.live_peer import LiveShim, arun, error_code, exchange_raw, rss_kib
from support.shim_cluster import ShimCluster
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.store import ShardStore
from llm_omninode.net import frames as F
from llm_omninode.net.frames import FIXED, MAGIC, MAX_HEADER, MAX_PAYLOAD, ErrorCode, FrameType
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import QuicSettings, RemoteError
from llm_omninode.net.transfer import ShardSource, fetch_shard

pytestmark = pytest.mark.cluster  # starts omni-shim processes

MiB = 1024 * 1024
BIG = 24 * MiB  # one shard; a flood of reads of it must not be held in memory at once
FLOOD = 48  # streams the flooding peer opens at once (each asks for the whole big shard)
D_MODEL = 64
N_BLOCKS = 4


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    gguf = write_tiny_llama(root / "tiny.gguf", n_blocks=N_BLOCKS, d_model=D_MODEL)
    with ShimCluster(root, 1, max_memory="1GiB") as cluster:
        registry = ModelRegistry(cluster.dirs[0])
        record = registry.add_file(gguf, alias="tiny")
        big = os.urandom(BIG)
        registry.store.put_bytes(cid_of(big), big)
        cluster.start(0)
        live = LiveShim(cluster)
        live.model_id = record.model_id
        live.manifest = record.manifest
        live.big_cid = cid_of(big)
        yield live


@pytest.fixture
def before(shim: LiveShim):
    snapshot = shim.snapshot()
    yield snapshot
    shim.assert_intact(snapshot)
    # no hostile input was mistaken for a bug of ours (a handler exception logs a traceback)
    assert "Traceback" not in shim.cluster.log(0), shim.cluster.log(0)


def fixed(ftype: int, header: bytes = b"", payload_len: int = 0, *, magic=MAGIC, version=1,
          flags=0, header_len: int | None = None) -> bytes:  # fmt: skip
    """A fixed frame header with any field wrong, followed by ``header``."""
    length = len(header) if header_len is None else header_len
    return FIXED.pack(magic, version, ftype, flags, length, payload_len) + header


# ---- frames that must never reach a handler -----------------------------------------------


def test_oversized_frames(shim, before):
    """Length fields past the limits are refused on the 16-byte header, before buffering."""
    cases = [
        fixed(FrameType.REQUEST, header_len=MAX_HEADER + 1),
        fixed(FrameType.REQUEST, header_len=2**32 - 1, payload_len=2**32 - 1),
        fixed(FrameType.SHARD_DATA, b"{}", MAX_PAYLOAD + 1),
        fixed(FrameType.HIDDEN, b"{}", 2**32 - 1),
        # a valid REQUEST header announcing a 64 MiB payload, then 10 bytes and the end
        fixed(FrameType.REQUEST, b'{"id":1,"method":"models"}', MAX_PAYLOAD) + b"x" * 10,
        # HIDDEN whose shape promises more than a frame may carry
        fixed(
            FrameType.HIDDEN,
            json.dumps({"seq": "s", "shape": [2**20, 2**20], "dtype": "float16"}).encode(),
            8,
        ),  # fmt: skip
    ]

    async def main():
        conn = await shim.connect()
        try:
            for data in cases:
                assert error_code(await exchange_raw(conn, data)) == ErrorCode.BAD_FRAME
            # the same connection still serves
            reply = await conn.request(F.request_frame(conn.next_id(), "models"))
            assert "tiny" in reply.header["models"]
        finally:
            await conn.close()

    arun(main())


def test_malformed_frames(shim, before):
    request = b'{"id":1,"method":"models"}'
    bad_frame = [
        fixed(FrameType.REQUEST, request, magic=b"OMNJ"),
        fixed(FrameType.REQUEST, request, version=2),
        fixed(99, request),
        fixed(0, request),
        fixed(FrameType.REQUEST, request, flags=0x8000),
        fixed(FrameType.REQUEST, b"\xff\xfe garbage"),
        fixed(FrameType.REQUEST, b'{"id":1,"method":"models"'),  # cut JSON
        fixed(FrameType.REQUEST, b"[1,2,3]"),
        fixed(FrameType.REQUEST, b'{"id":1,"id":2,"method":"models"}'),
        fixed(FrameType.REQUEST, b'{"id":NaN,"method":"models"}'),
        fixed(FrameType.REQUEST, b"[" * 5000 + b"]" * 5000),
        fixed(FrameType.REQUEST, b'{"id":-1,"method":"models"}'),
        fixed(FrameType.REQUEST, b'{"id":1,"method":"../../etc/passwd"}'),
        fixed(FrameType.REQUEST, b'{"id":1}'),
        fixed(FrameType.SHARD_READ, b'{"id":1,"cid":"../shards","offset":0,"length":1}'),
        fixed(FrameType.SHARD_READ, b'{"id":1,"cid":"bafy","offset":0,"length":0}'),
        b"OMNI",  # cut inside the fixed header
    ]
    not_served = [  # well-formed frames that are no request
        F.encode(F.join_frame(shim.member.node_id, None)),
        F.encode(F.stream_end_frame(3)),
        F.encode(F.token_frame("s", [1, 2])),
        F.encode(F.error_frame("bad_request", "x", 1)),
        F.encode(F.request_frame(7, "no.such-method")),
    ]

    async def main():
        conn = await shim.connect()
        try:
            for data in bad_frame:
                assert error_code(await exchange_raw(conn, data)) == ErrorCode.BAD_FRAME, data
            for data in not_served:
                assert error_code(await exchange_raw(conn, data)) == ErrorCode.UNSUPPORTED
            # CIDs that are well-formed on the wire but name nothing (or nothing valid)
            for cid in ("bafkr4i" + "a" * 52, "b" + "a" * 127):
                read = F.shard_read_frame(conn.next_id(), cid, 0, 1024)
                with pytest.raises(RemoteError) as refused:
                    await conn.request(read)
                assert refused.value.code in (ErrorCode.NOT_FOUND, ErrorCode.BAD_REQUEST)
            for fields in ({"model": 5}, {"model": "x" * 300}, {}):
                with pytest.raises(RemoteError):
                    await conn.request(F.request_frame(conn.next_id(), "manifest", **fields))
        finally:
            await conn.close()

    arun(main())


def test_hostile_request_fields(shim, before):
    """Well-formed REQUEST frames whose fields are of the wrong type, size or range, for
    every method: each gets an ERROR that names the problem, never an internal error."""
    cid = "bafkr4i" + "a" * 52
    hop = {"node": shim.node_id, "host": "127.0.0.1", "port": shim.port, "start": 0, "end": 4}
    manifest = shim.manifest.to_json()
    requests = [
        ("generate", b"", {}),
        ("generate", b"", {"request": None}),
        ("generate", b"", {"request": "hi"}),
        ("generate", b"", {"request": {"model": 5, "prompt": []}}),
        ("generate", b"", {"request": {"model": "tiny", "prompt": "x", "max_tokens": -1}}),
        ("generate", b"", {"request": {"model": "tiny", "prompt": "x" * 60_000}}),
        ("generate", b"", {"request": {"model": "nope", "prompt": "hi"}}),
        ("stage.load", b"", {"model": shim.model_id, "start": 0, "end": 1}),
        ("stage.load", b"\x00" * 1000, {"model": shim.model_id, "start": 0, "end": 1}),
        ("stage.load", b"[]", {"model": shim.model_id, "start": 0, "end": 1}),
        ("stage.load", manifest, {"model": cid, "start": 0, "end": 1}),
        ("stage.load", manifest, {"model": shim.model_id, "start": "0", "end": 1}),
        ("stage.load", manifest, {"model": shim.model_id, "start": 3, "end": 1}),
        ("stage.load", manifest, {"model": shim.model_id, "start": -1, "end": 2**53}),
        ("stage.unload", b"", {"model": 5, "start": 0, "end": 1}),
        ("stage.unload", b"", {"model": shim.model_id}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s", "route": "x"}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s", "route": [hop] * 65}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s", "route": [{**hop, "port": 0}]}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s", "route": [{**hop, "x": 1}]}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s", "route": [{**hop, "start": 2}]}),
        ("pipeline", b"", {"model": shim.model_id, "seq": "s",
                           "route": [{**hop, "node": "omni1" + "a" * 52}]}),
        ("manifest", b"", {"model": cid}),
        ("manifest", b"", {"model": ["tiny"]}),
    ]  # fmt: skip

    async def main():
        conn = await shim.connect()
        try:
            for method, payload, fields in requests:
                frame = F.request_frame(conn.next_id(), method, payload, **fields)
                with pytest.raises(RemoteError) as refused:
                    async for _ in conn.stream(frame, timeout=30):
                        pass
                code, message = refused.value.code, refused.value.message
                assert code != ErrorCode.INTERNAL and message, (method, fields, message)
        finally:
            await conn.close()

    arun(main())


# ---- tensors and sequences on a pipeline channel ----------------------------------------


async def _load(conn, start: int, end: int, shim: LiveShim) -> None:
    frame = F.request_frame(conn.next_id(), "stage.load", shim.manifest.to_json(),
                            model=shim.model_id, start=start, end=end)  # fmt: skip
    await conn.request(frame, timeout=60)


def _route(shim: LiveShim, start: int, end: int) -> list[dict]:
    return [{"node": shim.node_id, "host": "127.0.0.1", "port": shim.port, "start": start,
             "end": end}]  # fmt: skip


async def _channel_answer(conn, shim, seq, frames: list[bytes], start=0, end=N_BLOCKS):
    """Open a pipeline channel to the stage [start, end) with sequence ``seq``, write
    ``frames`` raw, and return the frames the node answers until it ends the stream."""
    opening = F.request_frame(conn.next_id(), "pipeline", model=shim.model_id, seq=seq,
                              route=_route(shim, start, end))  # fmt: skip
    stream = conn._protocol.open_stream()
    stream.write_raw(F.encode(opening) + b"".join(frames), end_stream=True)
    answers = []
    try:
        while (frame := await stream.recv(timeout=30)) is not None:
            answers.append(frame)
    finally:
        conn._protocol.forget_stream(stream.stream_id)
    return answers


def _step(payload: bytes, shape, dtype: int | str, *, step=0, pos=0, flags=0, reserved=0):
    """A STEP frame written by hand (its binary header packed here, any field as given)."""
    code = F.STEP_DTYPES.index(dtype) if isinstance(dtype, str) else dtype
    header = F.STEP_HEADER.pack(step, pos, *shape, code, flags, reserved)
    return fixed(FrameType.STEP, header, len(payload)) + payload


async def _open_tail(conn, shim, seq: str, start: int, end=N_BLOCKS):
    """A sequence's tail on the stage [start, end), as a coordinator opens it: the stream
    its picked ids come back on (a refusal is raised as RemoteError)."""
    frame = F.request_frame(conn.next_id(), "pipeline", tail=True, model=shim.model_id, seq=seq,
                            start=start, end=end, sampling=SamplingOptions().to_dict(),
                            recent=[])  # fmt: skip
    stream = await conn.channel(frame)
    ready = await stream.recv(timeout=30)
    assert ready is not None
    if ready.type != FrameType.RESPONSE:
        conn._protocol.forget_stream(stream.stream_id)
        raise RemoteError(ready)
    return stream


def test_hidden_states_of_the_wrong_shape_dtype_or_size(shim, before):
    """Each case is the first step of a fresh sequence; the answer is one ERROR frame whose
    code and message say what was wrong (bad_frame: the frame itself; bad_request: the
    frame is well-formed but not what this stage takes). A good step's token goes to the
    sequence's tail, not back up the channel."""
    half = N_BLOCKS // 2
    act = np.zeros((1, D_MODEL), dtype="<f2").tobytes()
    bad_frame, bad_request = ErrorCode.BAD_FRAME, ErrorCode.BAD_REQUEST
    h = _step
    cases_second = [  # the second stage [half, N) takes float32 or float16 [T, D_MODEL] only
        ("width", h(b"\0" * 2 * (D_MODEL + 1), [1, D_MODEL + 1], "float16"), bad_request,
         "not this model's width"),
        ("token ids", h(b"\0" * 4, [1, 1], "int32"), bad_request, "not this model's width"),
        ("dtype code", h(b"\0" * 8 * D_MODEL, [1, D_MODEL], 4), bad_frame, "dtype"),
        ("bytes short", h(act[:-1], [1, D_MODEL], "float16"), bad_frame, "needs exactly"),
        ("bytes long", h(act + b"\0\0", [1, D_MODEL], "float16"), bad_frame, "needs exactly"),
        ("zero tokens", h(b"", [0, D_MODEL], "float16"), bad_frame, "shape"),
        ("zero width", h(b"", [1, 0], "float16"), bad_frame, "shape"),
        ("flags", h(act, [1, D_MODEL], "float16", flags=0x80), bad_frame, "flags"),
        ("reserved", h(act, [1, D_MODEL], "float16", reserved=1), bad_frame, "reserved"),
        ("short header", fixed(FrameType.STEP, b"\0" * 12, 0), bad_frame, "bytes"),
        ("json header", fixed(FrameType.STEP, b'{"step":0}', 0), bad_frame, "bytes"),
        ("step 1 first", h(act, [1, D_MODEL], "float16", step=1), bad_request, "out of order"),
        ("position", h(act, [1, D_MODEL], "float16", pos=7), bad_request, "out of order"),
        ("no tail", h(act, [1, D_MODEL], "float16"), bad_request, "sampling"),
    ]  # fmt: skip
    ids = lambda *v, dt="<i4": np.array(v, dtype=dt).tobytes()  # noqa: E731
    cases_first = [  # a stage [0, N) takes token ids only, inside the vocabulary and context
        ("activations", h(act, [1, D_MODEL], "float16"), bad_request, "token ids"),
        ("negative id", h(ids(-1), [1, 1], "int32"), bad_request, "out of range"),
        ("id past vocab", h(ids(10**6), [1, 1], "int32"), bad_request, "out of range"),
        ("uint32 max", h(ids(2**32 - 1, dt="<u4"), [1, 1], "uint32"), bad_request, ""),
        ("past context", h(ids(*[5] * 300), [300, 1], "int32"), bad_request, ""),
        ("json hidden", _hidden_json(ids(5), [1, 1], "int32"), bad_request, "STEP"),
    ]  # fmt: skip

    async def main():
        conn = await shim.connect()
        try:
            await _load(conn, half, N_BLOCKS, shim)
            await _load(conn, 0, N_BLOCKS, shim)
            for start, cases in ((half, cases_second), (0, cases_first)):
                for i, (name, frame, code, words) in enumerate(cases):
                    seq = f"s{start}-{i}"
                    # the first stage's own checks run as it computes, after its tail is found
                    tail = await _open_tail(conn, shim, seq, 0) if start == 0 else None
                    answers = await _channel_answer(conn, shim, seq, [frame], start, N_BLOCKS)
                    assert isinstance(answers, list) and len(answers) == 1, (name, answers)
                    header = answers[0].header
                    assert answers[0].type == FrameType.ERROR, (name, answers[0])
                    assert header["code"] == code and words in header["message"], (name, header)
                    if tail is not None:
                        await tail.aclose()
            # the same stage still computes a well-formed step; its token comes on the tail
            tail = await _open_tail(conn, shim, "s", 0)
            good = h(ids(5, 6), [2, 1], "int32")
            assert await _channel_answer(conn, shim, "s", [good], 0, N_BLOCKS) == []
            reply = await tail.recv(timeout=30)
            assert reply.type == FrameType.STEP and len(F.token_ids(reply)) == 1
            assert reply.header["step"] == 0 and reply.header["pos"] == 2
            await tail.aclose()
        finally:
            await conn.close()

    arun(main())


def _hidden_json(payload: bytes, shape, dtype: str) -> bytes:
    """A HIDDEN frame (JSON header): no step of a pipeline channel."""
    data = json.dumps({"seq": "s", "shape": shape, "dtype": dtype}).encode()
    return fixed(FrameType.HIDDEN, data, len(payload)) + payload


def test_tails_refused(shim, before):
    """A tail is opened on a last stage that is loaded here, once per sequence, with valid
    sampling options and prompt ids; anything else is refused with a reason."""
    opts = SamplingOptions().to_dict()
    good = {"tail": True, "seq": "t", "start": 0, "end": N_BLOCKS, "sampling": opts,
            "recent": [1, 2]}  # fmt: skip
    cases = [
        {**good, "start": 0, "end": N_BLOCKS // 2},  # not loaded, and not the last stage
        {**good, "start": "0"},
        {**good, "seq": "../x"},
        {**good, "sampling": {"temperature": "hot"}},
        {**good, "sampling": {"nope": 1}},
        {**good, "recent": [-1]},
        {**good, "recent": [10**6]},
        {**good, "recent": list(range(5000))},
        {**good, "recent": "12"},
        {**good, "constraint": "json"},
        {**good, "constraint": {"kind": "python", "source": "1"}},
        {**good, "constraint": {"kind": "json_schema", "source": '{"not": {}}'}},
        {**good, "constraint": {"kind": "lark", "source": "start: " + "x" * 20_000}},
    ]

    async def main():
        conn = await shim.connect()
        try:
            await _load(conn, 0, N_BLOCKS, shim)
            for fields in cases:
                frame = F.request_frame(conn.next_id(), "pipeline", model=shim.model_id,
                                        **fields)  # fmt: skip
                with pytest.raises(RemoteError) as refused:
                    await conn.request(frame)
                assert refused.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND)
            tail = await _open_tail(conn, shim, "t", 0)
            with pytest.raises(RemoteError) as refused:  # the same sequence twice
                await _open_tail(conn, shim, "t", 0)
            assert refused.value.code == ErrorCode.BUSY
            await tail.aclose()
        finally:
            await conn.close()

    arun(main())


def test_a_tail_with_a_constraint_builds_its_token_table(shim, before):
    schema = {"kind": "json_schema", "source": '{"type": "integer"}'}

    async def main():
        conn = await shim.connect()
        try:
            await _load(conn, 0, N_BLOCKS, shim)
            stream = await conn.channel(F.request_frame(
                conn.next_id(), "pipeline", model=shim.model_id, tail=True, seq="c", start=0,
                end=N_BLOCKS, sampling=SamplingOptions().to_dict(), recent=[1], constraint=schema,
            ))  # fmt: skip
            ready = await stream.recv(timeout=30)  # its token table built from the manifest
            assert ready is not None and ready.type == FrameType.RESPONSE, ready
            await stream.aclose()
        finally:
            await conn.close()

    arun(main())


def test_unknown_sequences_and_stages(shim, before):
    tok = _step(np.array([5], dtype="<i4").tobytes(), [1, 1], "int32")

    async def main():
        conn = await shim.connect()
        try:
            await _load(conn, 0, N_BLOCKS, shim)
            # a step out of its order on this sequence's channel
            later = _step(np.array([5], dtype="<i4").tobytes(), [1, 1], "int32", step=3)
            answers = await _channel_answer(conn, shim, "seq-a", [later])
            assert error_code(answers) == ErrorCode.BAD_REQUEST
            # sequence ids that are no ids
            for seq in ("../x", "a" * 129, "", 7, None):
                answers = await _channel_answer(conn, shim, seq, [tok])
                assert error_code(answers) in (ErrorCode.BAD_REQUEST, ErrorCode.BAD_FRAME)
            # a stage that is not loaded here, a model that is not known, a route elsewhere
            for start, end in ((1, 3), (1, N_BLOCKS), (0, 10**6)):
                answers = await _channel_answer(conn, shim, "s", [tok], start, end)
                assert error_code(answers) in (ErrorCode.NOT_FOUND, ErrorCode.BAD_REQUEST)
            for fields in ({"model": "bafkr4i" + "a" * 52}, {"model": 3}):
                frame = F.request_frame(conn.next_id(), "pipeline", seq="s",
                                        route=_route(shim, 0, N_BLOCKS), **fields)  # fmt: skip
                with pytest.raises(RemoteError):
                    await conn.request(frame)
            # unloading what is not there changes nothing
            frame = F.request_frame(conn.next_id(), "stage.unload", model="bafkr4i" + "a" * 52,
                                    start=0, end=1)  # fmt: skip
            assert (await conn.request(frame)).header["unloaded"] is False
            # a manifest that does not hash to the model named is refused
            frame = F.request_frame(conn.next_id(), "stage.load", shim.manifest.to_json() + b" ",
                                    model=shim.model_id, start=0, end=1)  # fmt: skip
            with pytest.raises(RemoteError):
                await conn.request(frame)
        finally:
            await conn.close()

    arun(main())


# ---- a flood of streams --------------------------------------------------------------------


def _stop_granting_credit(conn) -> None:
    """Make a client connection never raise its receive windows again: a peer that asks
    and never reads. (Test-only surgery on our side of the connection.)"""
    quic = conn._protocol._quic
    quic._write_connection_limits = lambda *a, **k: None
    quic._write_stream_limits = lambda *a, **k: None


def test_flood_of_streams_is_bounded_and_others_are_served(shim, before, tmp_path):
    """A member opens FLOOD streams at once, each asking for a 24 MiB shard, and never reads
    what it asked for. The node must not queue 48 x 24 MiB for it, and must keep serving a
    second peer, which downloads the same shard in full meanwhile. A peer that ignores the
    QUIC stream limit altogether is cut off."""
    stingy = QuicSettings(connect_timeout=10.0, request_timeout=30.0, max_data=256 * 1024,
                          max_stream_data=64 * 1024)  # fmt: skip
    peak_before = rss_kib(shim.pid, "VmHWM")

    async def main():
        flooder = await shim.connect(settings=stingy)
        _stop_granting_credit(flooder)
        streams = []
        for _ in range(FLOOD):
            stream = flooder._protocol.open_stream()
            stream.end(F.shard_read_frame(flooder.next_id(), shim.big_cid, 0, F.MAX_SHARD_WINDOW))
            streams.append(stream)
        try:
            # meanwhile, another member gets answers and a whole 24 MiB shard
            await shim.answers()
            other = await shim.connect(NodeIdentity.generate())  # another member node
            try:
                sink = ShardStore(tmp_path / "other")

                async def again():
                    return other

                source = ShardSource(shim.node_id, again)
                await fetch_shard(shim.big_cid, BIG, [source], sink, timeout=30)
                assert sink.verify(shim.big_cid)
            finally:
                await other.close()
            await asyncio.sleep(0.5)  # give the flood every chance to be queued
            grown = rss_kib(shim.pid, "VmHWM") - peak_before
            # 48 windows queued at once would be over 1 GiB; a bounded node holds a few MiB
            # per stream it serves at a time
            print(f"peak memory of the node grew by {grown // 1024} MiB under the flood")
            assert grown < 256 * 1024, f"peak memory grew by {grown // 1024} MiB"
        finally:
            await flooder.close()

    arun(main(), 120)

    async def rogue():
        """A peer that opens streams past the limit the node announced."""
        conn = await shim.connect()
        quic = conn._protocol._quic
        announced = quic._remote_max_streams_bidi
        quic._remote_max_streams_bidi = 10**6  # pretend the node allowed more
        for _ in range(announced + 8):
            stream = conn._protocol.open_stream()
            stream.end(F.hello_frame(conn.next_id(), shim.member.node_id, "t"))
        for _ in range(200):
            if conn.closed:
                break
            await asyncio.sleep(0.05)
        assert conn.closed
        with contextlib.suppress(Exception):
            await conn.close()
        return announced

    announced = arun(rogue())
    assert 0 < announced <= 128
    print(f"streams a peer may open at once: {announced}")
