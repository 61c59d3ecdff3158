import json

import pytest
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.ggml_types import GGMLType
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.shards import (
    Manifest,
    ManifestError,
    classify_tensor,
    manifest_from_gguf,
    plan_shards,
    shard_chunks,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("token_embd.weight", ("embed", None)),
        ("blk.0.attn_q.weight", ("block", 0)),
        ("blk.29.ffn_down.weight", ("block", 29)),
        ("output_norm.weight", ("head", None)),
        ("output.weight", ("head", None)),
        ("rope_freqs.weight", ("shared", None)),
    ],
)
def test_classify(name, expected):
    assert classify_tensor(name) == expected


@pytest.mark.parametrize("name", ["blk.x.attn_q.weight", "mystery.weight", "blk.1", ""])
def test_classify_refuses_unknown(name):
    with pytest.raises(ManifestError):
        classify_tensor(name)


def _t(name, shape=(32,), ggml_type=GGMLType.F32, offset=0):
    return (name, ggml_type, shape, offset)


def test_plan_order_alignment_and_tied_head():
    layouts = plan_shards(
        [
            _t("blk.1.attn_norm.weight", (3,), offset=100),
            _t("token_embd.weight", (32, 2), GGMLType.Q8_0),
            _t("blk.0.b", (5,), offset=10),
            _t("blk.0.a", (7,), offset=0),
            _t("output_norm.weight"),
        ]
    )
    assert [s.name for s in layouts] == ["embed", "block.0", "block.1", "head"]
    block0 = layouts[1]
    assert [t.name for t in block0.tensors] == ["blk.0.a", "blk.0.b"]  # file order
    assert [t.offset for t in block0.tensors] == [0, 32]  # 32-byte aligned inside the shard
    assert block0.size == 32 + 20
    assert layouts[-1].refs == ("token_embd.weight",)
    assert layouts[0].tensors[0].nbytes == 2 * 34


def test_plan_untied_head_has_no_refs():
    layouts = plan_shards(
        [_t("token_embd.weight"), _t("blk.0.x"), _t("output_norm.weight"), _t("output.weight")]
    )
    assert layouts[-1].refs == ()
    assert {t.name for t in layouts[-1].tensors} == {"output_norm.weight", "output.weight"}


@pytest.mark.parametrize(
    "tensors, problem",
    [
        ([_t("blk.0.x"), _t("output_norm.weight")], "token_embd"),
        ([_t("token_embd.weight"), _t("output_norm.weight")], "blk"),
        ([_t("token_embd.weight"), _t("blk.0.x"), _t("blk.2.x"), _t("output.weight")], "gaps"),
    ],
)
def test_plan_refuses_incomplete_models(tensors, problem):
    with pytest.raises(ManifestError, match=problem):
        plan_shards(tensors)


def test_manifest_of_tiny_model(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_blocks=3)
    with open_gguf(path) as gguf:
        manifest = manifest_from_gguf(gguf)
        # each shard's CID is the BLAKE3 of exactly its bytes
        for shard in manifest.shards:
            data = b"".join(shard_chunks(shard, gguf.tensor_data))
            assert len(data) == shard.size
            assert cid_of(data) == shard.cid
        assert manifest.metadata["general.architecture"] == "llama"
        assert manifest.metadata["tokenizer.ggml.tokens"] == gguf.metadata["tokenizer.ggml.tokens"]
    assert [s.name for s in manifest.shards] == ["embed", "block.0", "block.1", "block.2", "head"]
    assert manifest.model_id == cid_of(manifest.to_json())
    assert manifest.model_id.startswith("bafkr4i")
    # a stage's shard set: the last stage of a tied model pulls in the embedding
    assert [s.name for s in manifest.shards_for_stage(2, 3)] == ["block.2", "head", "embed"]
    assert [s.name for s in manifest.shards_for_stage(0, 1)] == ["embed", "block.0"]
    # same file, same id; another seed, another id
    path2 = write_tiny_llama(tmp_path / "tiny2.gguf", n_blocks=3, seed=1)
    with open_gguf(path2) as gguf2:
        assert manifest_from_gguf(gguf2).model_id != manifest.model_id


def test_manifest_json_round_trip_and_hostile_edits(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf", n_blocks=2)
    with open_gguf(path) as gguf:
        manifest = manifest_from_gguf(gguf)
    raw = manifest.to_json()
    again = Manifest.from_json(raw)
    assert again.model_id == manifest.model_id
    assert again.shards == manifest.shards

    def edited(change):
        doc = json.loads(raw)
        change(doc)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    hostile = [
        lambda d: d.update(format="other"),
        lambda d: d["shards"][1].update(cid="bafkr4i" + "a" * 10),
        lambda d: d["shards"][1].update(size=d["shards"][1]["size"] + 1),
        lambda d: d["shards"][1]["tensors"][0].update(nbytes=10**18),
        lambda d: d["shards"][1]["tensors"][0].update(shape=[0]),
        lambda d: d["shards"][1]["tensors"][0].update(shape=[1, 1, 1, 1, 1]),
        lambda d: d["shards"][1]["tensors"][0].update(type=999),
        lambda d: d["shards"][1]["tensors"][1].update(offset=0),  # overlap
        lambda d: d["shards"][1]["tensors"][0].update(name="../../etc/passwd"),
        lambda d: d["shards"][1].update(name="block.7"),
        lambda d: d["shards"].reverse(),
        lambda d: d["shards"][-1].update(refs=["nope.weight"]),
        lambda d: d["shards"][2].update(cid=d["shards"][1]["cid"]),
        lambda d: d["metadata_types"].pop("general.name"),
    ]
    for change in hostile:
        with pytest.raises(ManifestError):
            Manifest.from_json(edited(change))
    for junk in [b"", b"[]", b"{", b"\xff\xfe", b'{"format": 1}', raw + b" "]:
        with pytest.raises(ManifestError):
            Manifest.from_json(junk)
