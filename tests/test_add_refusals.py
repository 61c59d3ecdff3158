"""`llm omni add` refuses, by name, an architecture or a tensor type the engine cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.ggml_types import GGMLType


def add(path: Path):
    from llm.cli import cli as llm_cli

    return CliRunner().invoke(llm_cli, ["omni", "add", str(path), "--alias", "m"])


def test_unsupported_architecture(omni_home: Path, tmp_path: Path) -> None:
    result = add(write_tiny_llama(tmp_path / "phi.gguf", n_blocks=1, arch="phi3"))
    assert result.exit_code != 0
    assert "architecture 'phi3' is not supported" in result.output
    assert "gemma3" in result.output and "qwen2" in result.output  # what is supported


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ4_XS, GGMLType.Q8_K], ids=lambda t: t.name)
def test_unsupported_tensor_type(omni_home: Path, tmp_path: Path, ggml_type: GGMLType) -> None:
    def type_of(name: str) -> GGMLType | None:
        return ggml_type if name == "blk.0.ffn_down.weight" else None

    path = write_tiny_llama(
        tmp_path / "iq.gguf", n_blocks=1, d_model=256, d_ff=256, n_heads=4, type_of=type_of
    )
    result = add(path)
    assert result.exit_code != 0
    assert f"blk.0.ffn_down.weight: tensor type {ggml_type.name} is not supported" in (
        result.output
    )
    from llm.cli import cli as llm_cli

    listing = CliRunner().invoke(llm_cli, ["omni", "models"]).output
    assert "no models yet" in listing  # nothing was registered


def test_supported_mix_is_added(omni_home: Path, tmp_path: Path) -> None:
    kinds = {"ffn_down": GGMLType.Q6_K, "ffn_up": GGMLType.Q4_K, "ffn_gate": GGMLType.Q5_K}

    def type_of(name: str) -> GGMLType | None:
        return kinds.get(name.split(".")[-2], GGMLType.Q5_0 if "attn_q" in name else None)

    path = write_tiny_llama(
        tmp_path / "mix.gguf", n_blocks=2, d_model=256, d_ff=256, type_of=type_of
    )
    result = add(path)
    assert result.exit_code == 0, result.output
    assert "added m" in result.output
