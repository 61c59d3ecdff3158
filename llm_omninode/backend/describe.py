"""What a model is, in the words listings use: parameter count, quantization, family.

Shared by ``llm omni models`` and the shim's Ollama/OpenAI listings, so both say the same.
"""

from __future__ import annotations

from collections import Counter

from .ggml_types import GGMLType
from .shards import Manifest

# llama.cpp's ``general.file_type`` values (LLAMA_FTYPE_*)
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


def parameter_count(manifest: Manifest) -> int:
    """Parameters: the embedding once, even when the head is tied to it."""
    total = 0
    for shard in manifest.shards:
        for t in shard.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
    return total


def quantization(manifest: Manifest) -> str:
    """The file's declared type, else the commonest tensor type."""
    file_type = manifest.metadata.get("general.file_type")
    if file_type in _FILE_TYPES:
        return _FILE_TYPES[file_type]
    counts = Counter(GGMLType(t.ggml_type).name for shard in manifest.shards for t in shard.tensors)
    return counts.most_common(1)[0][0] if counts else "?"


def short_parameters(n: int) -> str:
    """``135M``, ``1.5B``: how Ollama writes ``parameter_size``."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def details(manifest: Manifest) -> dict[str, object]:
    """Ollama's ``details`` object of a model."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": manifest.arch,
        "families": [manifest.arch],
        "parameter_size": short_parameters(parameter_count(manifest)),
        "quantization_level": quantization(manifest),
    }
