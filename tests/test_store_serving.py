"""Serving shards to peers does not grow the server's resident memory (issue 14).

A peer's ranged read of a shard served straight from an added GGUF is read with ``pread``:
the bytes pass through the page cache, not through a mapping of the file, so the pages read do
not stay in this process (RssFile in /proc/self/status). Mapping (``open``, a stage's own
weights) does keep them, which the last part checks to show the measure sees the difference."""

import sys

import pytest
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.registry import ModelRegistry

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status"
)

CHUNK = 256 * 1024  # a peer's ranged read


def rss_file() -> int:
    """Bytes of mapped files resident in this process (RssFile), else all of it (VmRSS)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    kib = fields.get("RssFile") or fields["VmRSS"]
    return int(kib[0]) * 1024


@pytest.fixture
def served(tmp_path):
    """A file-backed model of about 8 MiB (every shard a slice of the GGUF)."""
    path = write_tiny_llama(tmp_path / "m.gguf", d_model=512, d_ff=1536, n_blocks=4)
    registry = ModelRegistry(tmp_path / "home")
    record = registry.add_file(path, alias="m")
    registry.store.close()  # adding hashed it; serve from a store that has read nothing yet
    store = ModelRegistry(tmp_path / "home").store
    yield store, record, path.stat().st_size
    store.close()


def test_serving_shards_does_not_map_the_model(served):
    store, record, file_size = served
    assert file_size > 6 * 1024 * 1024
    shards = record.manifest.shards
    assert not list(store.shards())  # nothing copied: every shard is read from the GGUF
    store.read(shards[0].cid, 0, 1)  # the GGUF's header parsed, the code paths warm
    before = rss_file()
    served_bytes = 0
    for _ in range(2):  # twice: what stays resident would stay from the first pass
        for shard in shards:
            for lo in range(0, shard.size, CHUNK):
                served_bytes += len(store.read(shard.cid, lo, CHUNK))
        assert all(store.verify(shard.cid) for shard in shards)
    grown = rss_file() - before
    print(f"served {served_bytes} bytes of a {file_size}-byte model; RssFile grew {grown} bytes")
    assert served_bytes >= 2 * sum(s.size for s in shards)
    assert grown < 0.05 * file_size, (grown, file_size)

    # the measure is sensitive: the same shards mapped (as a stage maps its own) are resident
    mapped = 0
    for shard in shards:
        for view in store.tensor_views(shard, record.model_id).values():
            view.sum()  # touches every page
            mapped += view.nbytes
    grown_mapped = rss_file() - before
    print(f"mapped and touched {mapped} bytes; RssFile grew {grown_mapped} bytes")
    assert grown_mapped > 0.5 * mapped
