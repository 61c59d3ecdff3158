import os

import numpy as np
import pytest
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.registry import ModelNotFound, ModelRegistry
from llm_omninode.backend.store import ShardStore, StoreError


def test_put_get_has_verify_remove(tmp_path):
    store = ShardStore(tmp_path)
    data = os.urandom(100_000)
    cid = cid_of(data)
    assert not store.has(cid)
    store.put(cid, [data[:10], data[10:]], size=len(data))
    assert store.has(cid) and store.verify(cid)
    assert bytes(store.open(cid)) == data
    assert store.read(cid, 5, 10) == data[5:15]
    assert list(store.shards()) == [cid]
    assert store.remove(cid) and not store.has(cid)


def test_corrupt_or_short_data_never_lands(tmp_path):
    store = ShardStore(tmp_path)
    data = b"x" * 1000
    cid = cid_of(data)
    with pytest.raises(StoreError, match="hashes to"):
        store.put(cid, [b"y" * 1000])
    with pytest.raises(StoreError, match="expected"):
        store.put(cid, [data[:500]], size=1000)
    with pytest.raises(StoreError, match="more than"):
        store.put(cid, [data, b"z"], size=1000)
    assert not store.has(cid)
    assert list(store.tmp_dir.iterdir()) == []  # no partial file left behind either


def test_crash_mid_write_leaves_no_shard(tmp_path):
    store = ShardStore(tmp_path)
    data = b"abc" * 1000
    cid = cid_of(data)

    def chunks():
        yield data[:100]
        raise KeyboardInterrupt  # the writer dies mid-transfer

    with pytest.raises(KeyboardInterrupt):
        store.put(cid, chunks())
    assert not store.has(cid)
    assert list(store.tmp_dir.iterdir()) == []


def test_flipped_byte_on_disk_is_detected(tmp_path):
    store = ShardStore(tmp_path)
    data = os.urandom(4096)
    cid = cid_of(data)
    path = store.put_bytes(cid, data)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    assert not store.verify(cid)


@pytest.mark.parametrize("bad", ["../escape", "shards", "bafkr4i", ""])
def test_names_must_be_cids(tmp_path, bad):
    store = ShardStore(tmp_path)
    with pytest.raises(ValueError):
        store.has(bad)


def test_file_backed_model_is_not_copied(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    registry = ModelRegistry(tmp_path / "home")
    record = registry.add_file(path, alias="tiny")
    store = registry.store
    assert list(store.shards()) == []  # nothing copied into the store
    assert registry.resolve("tiny") == registry.resolve("omni/tiny") == record.model_id
    assert registry.resolve(record.model_id[:12]) == record.model_id
    with open_gguf(path) as gguf:
        for shard in record.manifest.shards:
            assert store.has(shard.cid)
            assert store.verify(shard.cid)
            views = store.tensor_views(shard, record.model_id)
            for t in shard.tensors:
                assert np.array_equal(views[t.name], gguf.tensor_data(t.name))
                assert not views[t.name].flags.owndata  # a view of the mapping
            assert cid_of(bytes(store.open(shard.cid))) == shard.cid
    # a received copy of a shard serves the same tensors
    embed = record.manifest.shard("embed")
    store.put_bytes(embed.cid, bytes(store.open(embed.cid)))
    assert set(store.tensor_views(embed)) == {t.name for t in embed.tensors}
    # the file changing under us is refused rather than served
    os.utime(path, ns=(1, 1))
    block = record.manifest.shard("block.0")
    with pytest.raises(StoreError, match="changed"):
        store.tensor_views(block, record.model_id)
    store.close()


def test_registry_aliases_and_removal(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    registry = ModelRegistry(tmp_path / "home")
    record = registry.add_file(path, alias="tiny:latest")
    assert registry.resolve("tiny") == record.model_id
    with pytest.raises(ValueError):
        registry.add_file(path, alias="../bad")
    assert [r.alias for r in registry.records()] == ["tiny:latest"]
    registry.remove("tiny")
    with pytest.raises(ModelNotFound):
        registry.resolve("tiny")
    assert registry.records() == []


# ---- resumable partial writes (shard transfer) -------------------------------------------


def test_partial_append_resume_and_commit(tmp_path):
    store = ShardStore(tmp_path)
    data = os.urandom(300_000)
    cid = cid_of(data)
    assert store.partial_size(cid) == 0 and store.size(cid) is None
    store.append_partial(cid, 0, data[:1000])
    store.append_partial(cid, 1000, memoryview(data)[1000:5000])
    assert store.partial_size(cid) == 5000
    with pytest.raises(StoreError, match="append at 4000"):
        store.append_partial(cid, 4000, data[4000:6000])  # not the next byte
    with pytest.raises(StoreError, match="append at 6000"):
        store.append_partial(cid, 6000, data[6000:7000])  # a gap
    assert not store.has(cid)  # a partial is never a shard
    # a fresh store on the same root (a restarted node) resumes where the last one stopped
    store = ShardStore(tmp_path)
    offset = store.partial_size(cid)
    store.append_partial(cid, offset, data[offset:])
    with pytest.raises(StoreError, match="expected 300001"):
        store.commit_partial(cid, len(data) + 1)  # short of the size: kept for resuming
    assert store.partial_size(cid) == len(data)
    path = store.commit_partial(cid, len(data))
    assert path == store.shard_dir / cid and path.read_bytes() == data
    assert store.has(cid) and store.size(cid) == len(data) and store.partial_size(cid) == 0
    assert list(store.tmp_dir.iterdir()) == []


def test_partial_with_bad_bytes_never_lands(tmp_path):
    store = ShardStore(tmp_path)
    data = os.urandom(50_000)
    cid = cid_of(data)
    bad = bytearray(data)
    bad[12345] ^= 0x40
    store.append_partial(cid, 0, bytes(bad))
    with pytest.raises(StoreError) as mismatch:
        store.commit_partial(cid, len(data))
    assert cid in str(mismatch.value) and cid_of(bytes(bad)) in str(mismatch.value)
    assert not store.has(cid) and store.partial_size(cid) == 0  # the bad partial is gone
    store.append_partial(cid, 0, data + b"extra")
    with pytest.raises(StoreError, match="expected 50000"):
        store.commit_partial(cid, len(data))  # too long: deleted, never truncated into place
    assert store.partial_size(cid) == 0 and not store.has(cid)
    store.append_partial(cid, 0, data[:10])
    store.discard_partial(cid)
    store.discard_partial(cid)  # idempotent
    assert store.partial_size(cid) == 0
    with pytest.raises(StoreError, match="no partial"):
        store.commit_partial(cid, len(data))
    empty = cid_of(b"")
    assert store.commit_partial(empty, 0).read_bytes() == b"" and store.size(empty) == 0


@pytest.mark.parametrize("bad", ["../escape", "bafkr4i", "", "bafkr4i" + "a" * 52 + "/"])
def test_partial_names_must_be_cids(tmp_path, bad):
    store = ShardStore(tmp_path)
    for call in (
        lambda: store.partial_size(bad),
        lambda: store.append_partial(bad, 0, b"x"),
        lambda: store.commit_partial(bad, 1),
        lambda: store.discard_partial(bad),
        lambda: store.size(bad),
    ):
        with pytest.raises(ValueError):
            call()
    assert list(store.tmp_dir.iterdir()) == [] and list(tmp_path.parent.glob("escape*")) == []


def test_ranged_reads_of_a_file_backed_shard(tmp_path, monkeypatch):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    registry = ModelRegistry(tmp_path / "home")
    record = registry.add_file(path, alias="tiny")
    store = registry.store
    wholes = {s.cid: bytes(store.open(s.cid)) for s in record.manifest.shards}
    # a ranged read assembles only its range: it must not join the whole shard any more
    import llm_omninode.backend.store as store_module

    def no_whole_shard(*args, **kwargs):
        raise AssertionError("a ranged read joined the whole shard")

    monkeypatch.setattr(store_module, "shard_chunks", no_whole_shard)
    for shard in record.manifest.shards:
        whole = wholes[shard.cid]
        assert store.size(shard.cid) == shard.size == len(whole)
        edges = {0, 1, shard.size - 1, shard.size}
        for t in shard.tensors:  # tensor starts and ends: padding boundaries
            edges |= {t.offset - 1, t.offset, t.offset + 1, t.offset + t.nbytes - 1}
            edges |= {t.offset + t.nbytes, t.offset + t.nbytes + 1}
        edges = sorted(e for e in edges if 0 <= e <= shard.size)
        for start in edges:
            for length in (1, 7, 100, 4096, shard.size):
                assert store.read(shard.cid, start, length) == whole[start : start + length]
        assert store.read(shard.cid) == whole
        with pytest.raises(StoreError, match="outside"):
            store.read(shard.cid, shard.size + 1, 1)
    # a received copy serves the same ranges from its file
    embed = record.manifest.shard("embed")
    store.put_bytes(embed.cid, wholes[embed.cid])
    assert store.read(embed.cid, 3, 5000) == wholes[embed.cid][3:5003]
    assert store.size(cid_of(b"not held")) is None
    store.close()


def test_ranged_read_rebuilds_padding_between_tensors():
    from llm_omninode.backend.ggml_types import GGMLType
    from llm_omninode.backend.shards import ShardEntry, TensorEntry, shard_chunks
    from llm_omninode.backend.store import _shard_range

    # three tensors with zero padding before, between and (none) after them
    sizes, offsets = (5, 40, 3), (3, 32, 96)
    tensors = tuple(
        TensorEntry(f"t{i}", GGMLType.I8, (n,), off, n)
        for i, (n, off) in enumerate(zip(sizes, offsets, strict=True))
    )
    shard = ShardEntry("block.0", "block", 0, "bafkr4i" + "a" * 52, 99, tensors)
    payloads = {
        t.name: np.arange(t.nbytes, dtype=np.uint8) + 1 + 50 * i for i, t in enumerate(tensors)
    }
    whole = b"".join(shard_chunks(shard, payloads.__getitem__))

    def read_at(entry, lo, hi):
        return payloads[entry.name][lo:hi].tobytes()

    assert len(whole) == shard.size
    for start in range(shard.size + 1):
        for end in range(start, shard.size + 1):
            got = b"".join(_shard_range(shard, read_at, start, end))
            assert got == whole[start:end], (start, end)
