"""Tiny llama-family GGUF files written with the project's own writer, for fast tests.

The vocabulary is GPT-2 byte-level (256 byte tokens, a few merges, ChatML control tokens), so
the real tokenizer and chat template code runs on it. Weights are random but fixed by a seed;
quantized types are produced with the `gguf` package's reference quantizers (a test dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_omninode.backend.ggml_types import GGMLType, GGUFValueType
from llm_omninode.backend.gguf_write import GGUFValue, write_gguf

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    alphabet = byte_level_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = SPECIALS + alphabet + merged
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def _quantize(values: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    if ggml_type == GGMLType.F32:
        return values.astype(np.float32)
    if ggml_type == GGMLType.F16:
        return values.astype(np.float16)
    import gguf.quants

    return gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(ggml_type)))


def write_tiny_llama(
    path: Path,
    *,
    n_blocks: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_ff: int = 128,
    context_length: int = 256,
    weight_type: GGMLType = GGMLType.Q4_1,
    embed_type: GGMLType = GGMLType.Q8_0,
    tied: bool = True,
    seed: int = 0,
    chat_template: str | None = CHATML,
) -> Path:
    """Write a tiny llama GGUF to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    # pad the vocabulary to a multiple of 32 so quantized rows of any width stay legal
    while vocab % 32:
        tokens.append(f"<unused{vocab}>")
        types.append(5)
        vocab += 1
    head_dim = d_model // n_heads
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "general.file_type": GGUFValue(3, GGUFValueType.UINT32),
        "llama.block_count": GGUFValue(n_blocks, GGUFValueType.UINT32),
        "llama.context_length": GGUFValue(context_length, GGUFValueType.UINT32),
        "llama.embedding_length": GGUFValue(d_model, GGUFValueType.UINT32),
        "llama.feed_forward_length": GGUFValue(d_ff, GGUFValueType.UINT32),
        "llama.attention.head_count": GGUFValue(n_heads, GGUFValueType.UINT32),
        "llama.attention.head_count_kv": GGUFValue(n_kv_heads, GGUFValueType.UINT32),
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": GGUFValue(head_dim, GGUFValueType.UINT32),
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": GGUFValue(vocab, GGUFValueType.UINT32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": GGUFValue(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": GGUFValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": GGUFValue(merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": GGUFValue(1, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": GGUFValue(2, GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": False,
    }
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template

    def weight(name: str, rows: int, cols: int, ggml_type: GGMLType, scale: float = 0.08):
        values = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return (name, ggml_type, (cols, rows), _quantize(values, ggml_type))

    def norm(name: str, width: int):
        values = (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        return (name, GGMLType.F32, (width,), values)

    tensors = [weight("token_embd.weight", vocab, d_model, embed_type, scale=0.5)]
    kv = n_kv_heads * head_dim
    for i in range(n_blocks):
        p = f"blk.{i}."
        tensors += [
            norm(p + "attn_norm.weight", d_model),
            weight(p + "attn_q.weight", d_model, d_model, weight_type),
            weight(p + "attn_k.weight", kv, d_model, weight_type),
            weight(p + "attn_v.weight", kv, d_model, weight_type),
            weight(p + "attn_output.weight", d_model, d_model, weight_type),
            norm(p + "ffn_norm.weight", d_model),
            weight(p + "ffn_gate.weight", d_ff, d_model, weight_type),
            weight(p + "ffn_up.weight", d_ff, d_model, weight_type),
            weight(p + "ffn_down.weight", d_model, d_ff, weight_type),
        ]
    tensors.append(norm("output_norm.weight", d_model))
    if not tied:
        tensors.append(weight("output.weight", vocab, d_model, weight_type))
    write_gguf(path, metadata, tensors)
    return path
