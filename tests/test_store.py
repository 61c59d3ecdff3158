import os

import numpy as np
import pytest
from tiny_model import write_tiny_llama

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
