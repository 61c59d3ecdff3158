"""gemma-3-270m and Qwen2.5-Coder-0.5B (Q4_K_M) against llama.cpp's own outputs on the same
files (tests/data/*-llamacpp.json): tokenization, rendered chat prompts, and tensors converted
as gguf's dequantizer does. How close the engines' logits come is teacher-forced elsewhere
(test_ggml_stage.py, test_mlx_fidelity.py), and splits in test_splits.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llm_omninode.backend.chat_template import ChatTemplate
from llm_omninode.backend.engine import TensorData
from llm_omninode.backend.ggml_types import GGMLType
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.quant import load_tensor
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.backend.tokenizer import Tokenizer

pytestmark = pytest.mark.large_model
DATA = Path(__file__).parent / "data"
GOLDEN = {"qwen2": "qwen2.5-coder-0.5b-llamacpp.json", "gemma3": "gemma3-270m-llamacpp.json"}


class Loaded:
    """A real file: spec, tensors, tokenizer, golden data, and one- and two-stage pipelines."""

    def __init__(self, path: Path, arch: str) -> None:
        self.file = open_gguf(path)
        self.spec = ModelSpec.from_metadata(self.file.metadata, self.file.tensors)
        assert self.spec.arch == arch
        self.tensors = {
            n: TensorData(n, t.ggml_type, t.shape, self.file.tensor_data(n))
            for n, t in self.file.tensors.items()
        }
        self.golden = json.loads((DATA / GOLDEN[arch]).read_text())
        self.tokenizer = Tokenizer.from_metadata(self.file.metadata)


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def model(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    arch = request.param
    path = request.getfixturevalue("qwen2_path" if arch == "qwen2" else "gemma3_path")
    loaded = Loaded(path, arch)
    yield loaded
    loaded.file.close()


def test_tokenization_is_exact(model: Loaded) -> None:
    tok, golden = model.tokenizer, model.golden
    for case in golden["tokenize"]:
        assert tok.encode(case["text"], add_special=False) == case["ids"], case["text"]
        assert (
            tok.encode(case["text"], add_special=False, parse_special=True) == (case["ids_special"])
        )
        assert tok.decode(case["ids"]) == case["text"]
    for chat in golden["chat"]:
        assert tok.encode(chat["prompt"], parse_special=True) == chat["prompt_ids"]
        assert tok.decode(chat["greedy_ids"]) == chat["greedy_text"]


def test_chat_prompt(model: Loaded) -> None:
    template = ChatTemplate.from_metadata(model.file.metadata, model.tokenizer)
    for chat in model.golden["chat"]:
        rendered = template.render(chat["messages"], add_generation_prompt=True)
        if model.spec.arch == "qwen2":
            assert rendered == chat["prompt"]
        else:  # gemma-3-270m has no template: the golden run used the raw text
            assert "tokenizer.chat_template" not in model.file.metadata
            assert chat["prompt"] in rendered


def test_real_tensors_convert_as_the_oracle(model: Loaded) -> None:
    """The smallest tensor of each quantized type in the file, against gguf's dequantizer."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    smallest: dict[GGMLType, TensorData] = {}
    for t in model.tensors.values():
        best = smallest.get(t.ggml_type)
        if t.ggml_type not in (GGMLType.F32,) and (best is None or t.data.size < best.data.size):
            smallest[t.ggml_type] = t
    assert {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q8_0} <= set(smallest)
    for t in smallest.values():
        rows = int(np.prod(t.shape[1:]))
        qt = gguf.GGMLQuantizationType(int(t.ggml_type))
        want = dequantize(np.asarray(t.data).reshape(rows, -1), qt).reshape(rows, t.shape[0])
        w = load_tensor(t)
        got = np.array(w.dequantize(), np.float32)
        np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7)
