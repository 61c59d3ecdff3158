"""Shard transfer over real, admitted QUIC on loopback: ranged, resumable, verified."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

import pytest
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.store import ShardStore
from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission
from llm_omninode.net.frames import FrameType
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import CloseCode, ConnectionClosed, QuicSettings, RemoteError, serve
from llm_omninode.net.quic import connect as quic_connect
from llm_omninode.net.transfer import (
    ShardSource,
    TransferError,
    fetch_shard,
    fetch_shards,
    handle_shard_read,
)

HOST = "127.0.0.1"
MiB = 1024 * 1024
SECRET = os.urandom(32)
FAST = QuicSettings(connect_timeout=5.0, join_timeout=2.0, request_timeout=10.0)
LOG = "llm_omninode.net.transfer"


def arun(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def random_shard(size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return cid_of(data), data


def store_with(path, *shards: bytes) -> ShardStore:
    store = ShardStore(path)
    for data in shards:
        store.put_bytes(cid_of(data), data)
    return store


def serving(reader, chunk: int = 256 * 1024):
    """A node's handler: SHARD_READ goes to handle_shard_read, anything else is refused."""

    async def handler(peer: str, frame: F.Frame, stream) -> F.Frame | None:
        if frame.type == FrameType.SHARD_READ:
            await handle_shard_read(frame, stream, reader, chunk=chunk)
            return None
        return F.error_frame(F.ErrorCode.UNSUPPORTED, frame.type.name, frame.id)

    return handler


@contextlib.asynccontextmanager
async def node(handler):
    server = await serve(HOST, 0, NodeIdentity.generate(), Admission(secret=SECRET), handler, FAST)
    try:
        yield server
    finally:
        server.close()


class Dialer:
    """The fetching node: one cached connection per peer, redialled once it is closed."""

    def __init__(self) -> None:
        self.identity = NodeIdentity.generate()
        self.cached: dict[str, object] = {}
        self.dials: dict[str, int] = {}
        self.all: list = []

    def source(self, server) -> ShardSource:
        async def connect():
            conn = self.cached.get(server.node_id)
            if conn is None or conn.closed:
                conn = await quic_connect(
                    HOST, server.port, self.identity, Admission(secret=SECRET), server.node_id, FAST
                )
                self.cached[server.node_id] = conn
                self.dials[server.node_id] = self.dials.get(server.node_id, 0) + 1
                self.all.append(conn)
            return conn

        return ShardSource(server.node_id, connect)

    async def close(self) -> None:
        for conn in self.all:
            await conn.close()


class WatchedSink:
    """The client's store, checking that nothing is visible as a shard before the commit."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.commits: list[str] = []

    def partial_size(self, cid: str) -> int:
        return self.store.partial_size(cid)

    def append_partial(self, cid: str, offset: int, data: bytes) -> None:
        assert not self.store.has(cid)
        self.store.append_partial(cid, offset, data)

    def commit_partial(self, cid: str, size: int):
        assert not self.store.has(cid)
        self.commits.append(cid)
        return self.store.commit_partial(cid, size)

    def discard_partial(self, cid: str) -> None:
        self.store.discard_partial(cid)


class Reads:
    """A reader that records the ranged reads it serves (and may corrupt one byte)."""

    def __init__(self, store: ShardStore, flip_at: int | None = None) -> None:
        self.store = store
        self.flip_at = flip_at

    def size(self, cid: str) -> int | None:
        return self.store.size(cid)

    def read(self, cid: str, offset: int, length: int) -> bytes:
        data = self.store.read(cid, offset, length)
        if self.flip_at is not None and offset <= self.flip_at < offset + len(data):
            raw = bytearray(data)
            raw[self.flip_at - offset] ^= 0x01
            data = bytes(raw)
        return data


def progress_log():
    seen: list[tuple[str, int, int]] = []
    return seen, lambda cid, done, total: seen.append((cid, done, total))


# ---- the plain path -----------------------------------------------------------------------


def test_fetch_verifies_and_lands_only_after_commit(tmp_path):
    cid, data = random_shard(3 * MiB + 12345)
    served = store_with(tmp_path / "a", data)
    mine = ShardStore(tmp_path / "b")
    sink = WatchedSink(mine)
    seen, progress = progress_log()

    async def main():
        dialer = Dialer()
        async with node(serving(served)) as server:
            try:
                got = await fetch_shard(
                    cid, len(data), [dialer.source(server)], sink, progress=progress, window=MiB
                )
                assert got == server.node_id
            finally:
                await dialer.close()

    arun(main())
    assert sink.commits == [cid]
    assert mine.has(cid) and mine.read(cid) == data and mine.verify(cid)
    assert list(mine.tmp_dir.iterdir()) == []
    dones = [done for c, done, total in seen if c == cid and total == len(data)]
    assert len(dones) == len(seen) > 4 and dones[0] == 0 and dones[-1] == len(data)
    assert dones == sorted(dones)  # monotonic


def test_file_backed_model_is_served_in_ranges(tmp_path):
    """A node that added a GGUF serves its shards from the file's mapping, range by range."""
    registry = ModelRegistry(tmp_path / "home")
    record = registry.add_file(write_tiny_llama(tmp_path / "tiny.gguf"), alias="tiny")
    mine = ShardStore(tmp_path / "mine")
    wants = [(s.cid, s.size) for s in record.manifest.shards]

    async def main():
        dialer = Dialer()
        async with node(serving(registry.store, chunk=5000)) as server:
            try:
                source = dialer.source(server)
                return await fetch_shards(wants, lambda cid: [source], mine, window=7000)
            finally:
                await dialer.close()

    served = arun(main())
    assert set(served) == {cid for cid, _ in wants}
    for shard in record.manifest.shards:
        assert mine.read(shard.cid) == bytes(registry.store.open(shard.cid))
    registry.store.close()


# ---- interruptions ------------------------------------------------------------------------


class Dropper:
    """Serves ranged reads, but the first ``drops`` times kills the connection after
    ``after`` bytes, once the client has written them (so the resume offset is known)."""

    def __init__(self, store, sink_store, cid: str, after: int, drops: int = 1, stall=False):
        self.store, self.sink_store, self.cid = store, sink_store, cid
        self.after, self.drops, self.stall = after, drops, stall
        self.offsets: list[int] = []

    async def __call__(self, peer: str, frame: F.Frame, stream) -> F.Frame | None:
        self.offsets.append(frame.header["offset"])
        if self.drops <= 0:
            await handle_shard_read(frame, stream, self.store, chunk=256 * 1024)
            return None
        self.drops -= 1
        if self.after <= 0:  # drop before a byte is sent: no progress at all
            stream._protocol.shutdown(CloseCode.NO_ERROR, "dropped by the test")
            raise ConnectionClosed("dropped by the test")
        real_send = stream.send

        async def send(reply: F.Frame) -> None:
            await real_send(reply)
            end = reply.header["offset"] + len(reply.payload)
            if end >= self.after:
                for _ in range(200):  # until the client holds these bytes
                    if self.sink_store.partial_size(self.cid) >= end:
                        break
                    await asyncio.sleep(0.01)
                if self.stall:
                    await asyncio.sleep(30)  # the client's frame timeout goes first
                stream._protocol.shutdown(CloseCode.NO_ERROR, "dropped by the test")
                raise ConnectionClosed("dropped by the test")

        stream.send = send
        await handle_shard_read(frame, stream, self.store, chunk=256 * 1024)
        return None


@pytest.mark.parametrize("stall", [False, True], ids=["dropped", "stalled"])
def test_interrupted_transfer_resumes_at_the_partial_offset(tmp_path, stall):
    cid, data = random_shard(3 * MiB + 777)
    served = store_with(tmp_path / "a", data)
    mine = ShardStore(tmp_path / "b")
    dropper = Dropper(served, mine, cid, after=MiB, stall=stall)
    seen, progress = progress_log()

    async def main():
        dialer = Dialer()
        async with node(dropper) as server:
            try:
                got = await fetch_shard(
                    cid,
                    len(data),
                    [dialer.source(server)],
                    mine,
                    progress=progress,
                    timeout=0.5 if stall else 10.0,
                )
                assert got == server.node_id
                return dialer.dials[server.node_id]
            finally:
                await dialer.close()

    dials = arun(main())
    assert len(dropper.offsets) == 2 and dropper.offsets[0] == 0
    assert dropper.offsets[1] >= MiB  # resumed, not restarted
    assert dials == (1 if stall else 2)  # a stalled stream is re-asked on the same connection
    assert mine.read(cid) == data
    dones = [done for _, done, _ in seen]
    assert dones == sorted(dones) and dones[-1] == len(data)


def test_resume_after_a_restart_and_giving_up(tmp_path):
    cid, data = random_shard(2 * MiB + 5)
    served = store_with(tmp_path / "a", data)
    mine = ShardStore(tmp_path / "b")
    mine.append_partial(cid, 0, data[: MiB + 3])  # left by an earlier run
    always = Dropper(served, mine, cid, after=0, drops=10**6)

    async def main():
        dialer = Dialer()
        good_reads = Dropper(served, mine, cid, after=0, drops=0)
        async with node(always) as flaky, node(good_reads) as good:
            try:
                with pytest.raises(TransferError, match="gave up after 2 retries") as failed:
                    await fetch_shard(cid, len(data), [dialer.source(flaky)], mine, retries=2)
                assert set(failed.value.failures) == {flaky.node_id}
                assert await fetch_shard(cid, len(data), [dialer.source(good)], mine) == (
                    good.node_id
                )
                return good_reads.offsets
            finally:
                await dialer.close()

    offsets = arun(main())
    assert always.offsets == [MiB + 3] * 3  # first try + 2 retries, none of them progressing
    assert offsets == [MiB + 3]
    assert mine.read(cid) == data


# ---- bad peers ----------------------------------------------------------------------------


def test_corrupt_peer_is_detected_and_next_peer_serves(tmp_path, caplog):
    cid, data = random_shard(2 * MiB + 99)
    bad_reader = Reads(store_with(tmp_path / "bad", data), flip_at=MiB + 17)
    good_reader = Reads(store_with(tmp_path / "good", data))
    mine = ShardStore(tmp_path / "mine")
    sink = WatchedSink(mine)

    async def main():
        dialer = Dialer()
        async with node(serving(bad_reader)) as bad, node(serving(good_reader)) as good:
            try:
                with pytest.raises(TransferError, match="do not match the CID"):
                    await fetch_shard(cid, len(data), [dialer.source(bad)], sink)
                assert mine.partial_size(cid) == 0 and not mine.has(cid)
                sources = [dialer.source(bad), dialer.source(good)]
                assert await fetch_shard(cid, len(data), sources, sink) == good.node_id
                return bad.node_id
            finally:
                await dialer.close()

    with caplog.at_level(logging.INFO, logger=LOG):
        bad_id = arun(main())
    assert mine.read(cid) == data and list(mine.tmp_dir.iterdir()) == []
    blamed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(blamed) == 2 and all(bad_id in m and "do not match" in m for m in blamed)


def test_unknown_cid_and_bad_reads_get_clean_errors(tmp_path):
    cid, data = random_shard(100_000)
    missing, _ = random_shard(10)
    served = store_with(tmp_path / "a", data)

    async def main():
        dialer = Dialer()
        async with node(serving(served)) as server:
            try:
                with pytest.raises(TransferError, match="does not hold it") as failed:
                    await fetch_shard(missing, 10, [dialer.source(server)], ShardStore(tmp_path))
                assert list(failed.value.failures) == [server.node_id]
                conn = await dialer.source(server).connect()
                for bad_read, code in [
                    (F.shard_read_frame(1, missing, 0, 10), F.ErrorCode.NOT_FOUND),
                    (F.shard_read_frame(2, cid, 100_001, 10), F.ErrorCode.BAD_REQUEST),
                    (F.shard_read_frame(3, "b" + "a" * 58, 0, 10), F.ErrorCode.BAD_REQUEST),
                    (F.request_frame(4, "shard"), F.ErrorCode.UNSUPPORTED),
                ]:
                    with pytest.raises(RemoteError) as refused:
                        await conn.request(bad_read, timeout=5)
                    assert refused.value.code == code
                # the connection still serves, and a read at the very end is empty and last
                end = await conn.request(F.shard_read_frame(5, cid, 100_000, 10), timeout=5)
                assert end.payload == b"" and end.flags == F.FLAG_LAST
                assert end.header == {"id": 5, "cid": cid, "offset": 100_000, "size": 100_000}
            finally:
                await dialer.close()
        with pytest.raises(TransferError, match="no sources"):
            await fetch_shard(cid, len(data), [], ShardStore(tmp_path))
        with pytest.raises(ValueError):
            await fetch_shard("../etc/passwd", 1, [], ShardStore(tmp_path))

    arun(main())


class Hostile:
    """Answers ranged reads with one kind of lie (``mode``), otherwise the true bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.mode = ""

    async def __call__(self, peer: str, frame: F.Frame, stream) -> F.Frame | None:
        h = frame.header
        cid, offset, rid = h["cid"], h["offset"], frame.id
        data = self.data[offset : offset + h["length"]]
        size = len(self.data)
        fields = {"size": size}
        if self.mode == "wrong_cid":
            cid = cid_of(b"another shard")
        elif self.mode == "wrong_offset":
            offset += 1
        elif self.mode == "too_many":
            data += b"\0"
        elif self.mode == "wrong_size":
            fields["size"] = size + 1
        elif self.mode == "no_size":
            fields = {}
        elif self.mode == "wrong_id":
            rid += 1
        elif self.mode == "short":
            data = data[:-1]
        elif self.mode == "empty_frames":
            for _ in range(3):
                await stream.send(F.shard_data_frame(rid, cid, offset, b"", **fields))
        elif self.mode == "other_type":
            return F.response_frame(rid, data)
        elif self.mode == "garbage":
            stream.write_raw(b"OMNI" + b"\xff" * 40, end_stream=True)
            return None
        reply = F.shard_data_frame(rid, cid, offset, data, **fields)
        return dataclasses.replace(reply, flags=F.FLAG_LAST)


HOSTILE = {
    "wrong_cid": "SHARD_DATA of",
    "wrong_offset": "expected 0",
    "too_many": "1 bytes past the asked range",
    "wrong_size": "peer says the shard has",
    "no_size": "peer says the shard has None",
    "wrong_id": "for request",
    "short": "window ended at byte",
    "empty_frames": "empty SHARD_DATA",
    "other_type": "RESPONSE frame",
    "garbage": "protocol violation",
}


def test_hostile_responses_are_rejected(tmp_path):
    cid, data = random_shard(300_000)
    hostile = Hostile(data)
    good_reader = store_with(tmp_path / "good", data)
    mine = ShardStore(tmp_path / "mine")

    async def main():
        dialer = Dialer()
        async with node(hostile) as liar, node(serving(good_reader)) as good:
            try:
                for mode, reason in HOSTILE.items():
                    hostile.mode = mode
                    with pytest.raises(TransferError) as failed:
                        await fetch_shard(cid, len(data), [dialer.source(liar)], mine)
                    assert reason in failed.value.failures[liar.node_id], mode
                    # no lie was written: at most a prefix of the true bytes (kept to resume)
                    partial = mine.tmp_dir / f"{cid}.part"
                    kept = partial.read_bytes() if partial.exists() else b""
                    assert data.startswith(kept) and (mode == "short") == bool(kept), mode
                    mine.discard_partial(cid)
                hostile.mode = ""  # an honest answer from the same peer passes the checks
                assert await fetch_shard(cid, len(data), [dialer.source(liar)], mine)
                mine.remove(cid)
                hostile.mode = "wrong_offset"
                sources = [dialer.source(liar), dialer.source(good)]
                assert await fetch_shard(cid, len(data), sources, mine) == good.node_id
            finally:
                await dialer.close()

    arun(main())
    assert mine.read(cid) == data


def test_a_source_must_be_the_node_it_names(tmp_path):
    cid, data = random_shard(1000)
    served = store_with(tmp_path / "a", data)

    async def main():
        dialer = Dialer()
        async with node(serving(served)) as server:
            try:
                real = dialer.source(server)
                impostor = ShardSource(NodeIdentity.generate().node_id, real.connect)
                with pytest.raises(TransferError, match="connected to"):
                    await fetch_shard(cid, len(data), [impostor], ShardStore(tmp_path / "b"))
            finally:
                await dialer.close()

    arun(main())


# ---- many shards --------------------------------------------------------------------------


def test_many_shards_from_two_peers_at_once(tmp_path):
    shards = [random_shard(MiB + 1000 * i) for i in range(6)]
    both = shards[:4]  # held by both peers; the rest by one each
    store_a = store_with(tmp_path / "a", *(d for _, d in both), shards[4][1])
    store_b = store_with(tmp_path / "b", *(d for _, d in both), shards[5][1])
    mine = ShardStore(tmp_path / "mine")
    seen, progress = progress_log()

    async def main():
        dialer = Dialer()
        async with node(serving(store_a)) as a, node(serving(store_b)) as b:
            try:
                source_a, source_b = dialer.source(a), dialer.source(b)

                def sources_for(cid: str):
                    return [
                        s for s, st in ((source_a, store_a), (source_b, store_b)) if st.has(cid)
                    ]

                wants = [(cid, len(d)) for cid, d in shards] + [(shards[0][0], len(shards[0][1]))]
                served = await fetch_shards(
                    wants, sources_for, mine, concurrency=3, progress=progress
                )
                return served, a.node_id, b.node_id
            finally:
                await dialer.close()

    served, a_id, b_id = arun(main())
    assert set(served) == {cid for cid, _ in shards}
    assert served[shards[4][0]] == a_id and served[shards[5][0]] == b_id
    assert {served[cid] for cid, _ in both} == {a_id, b_id}  # spread over both peers
    for cid, data in shards:
        assert mine.read(cid) == data
        dones = [done for c, done, _ in seen if c == cid]
        assert dones == sorted(dones) and dones[-1] == len(data)


def test_partial_left_by_an_earlier_run(tmp_path):
    """A complete partial is committed without a connection; a complete but bad one is
    discarded and fetched afresh from the first source, which is not blamed for it."""
    cid, data = random_shard(MiB + 3)
    served = store_with(tmp_path / "a", data)
    mine = ShardStore(tmp_path / "b")

    async def main():
        dialer = Dialer()
        async with node(serving(served)) as server:
            try:
                mine.append_partial(cid, 0, data)
                assert await fetch_shard(cid, len(data), [dialer.source(server)], mine)
                assert dialer.dials == {} and mine.read(cid) == data
                mine.remove(cid)
                mine.append_partial(cid, 0, b"\0" * len(data))
                got = await fetch_shard(cid, len(data), [dialer.source(server)], mine)
                assert got == server.node_id and dialer.dials == {server.node_id: 1}
            finally:
                await dialer.close()

    arun(main())
    assert mine.read(cid) == data


def test_many_shards_report_each_failure_and_keep_the_rest(tmp_path):
    cid, data = random_shard(300_000)
    missing, _ = random_shard(10)
    served = store_with(tmp_path / "a", data)
    mine = ShardStore(tmp_path / "mine")

    async def main():
        dialer = Dialer()
        async with node(serving(served)) as server:
            try:
                source = dialer.source(server)
                with pytest.raises(TransferError, match="1 of 2 shards failed") as failed:
                    await fetch_shards([(cid, len(data)), (missing, 10)], lambda c: [source], mine)
                assert list(failed.value.failures) == [missing]
                with pytest.raises(ValueError, match="two sizes"):
                    await fetch_shards([(cid, 1), (cid, 2)], lambda c: [source], mine)
            finally:
                await dialer.close()

    arun(main())
    assert mine.read(cid) == data and not mine.has(missing)
