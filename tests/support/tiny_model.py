"""Tiny GGUF files (llama, qwen2, gemma3) written with the project's own writer, for fast tests.

The vocabulary is GPT-2 byte-level (256 byte tokens, a few merges, ChatML control tokens), so
the real tokenizer and chat template code runs on it. Weights are random but fixed by a seed;
quantized types are produced with the `gguf` package's reference quantizers (a test dependency)
or, for the K-quants it cannot quantize, as random blocks with sensible scales.
"""

from __future__ import annotations

from collections.abc import Callable
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


# Where each type keeps its float16 scale(s), and what each must be for weights of about
# +-``scale`` (the largest integer factor the block's quants and sub-scales can reach).
_SCALE_FIELDS: dict[GGMLType, tuple[tuple[int, float], ...]] = {
    GGMLType.Q5_0: ((0, 16),),
    GGMLType.Q5_1: ((0, 32), (2, -1)),
    GGMLType.Q4_K: ((0, 63 * 15), (2, 63)),
    GGMLType.Q5_K: ((0, 63 * 31), (2, 63)),
    GGMLType.Q6_K: ((208, 128 * 32),),
    GGMLType.Q3_K: ((108, 32 * 4),),
    GGMLType.Q2_K: ((80, 15 * 3), (82, 15)),
}
RANDOM_BLOCK_TYPES = tuple(_SCALE_FIELDS)


def random_blocks(
    ggml_type: GGMLType, n_elements: int, rng: np.random.Generator, scale: float = 0.08
) -> np.ndarray:
    """Random bytes of ``n_elements`` weights of a K-/5-bit quant type, with finite scales.

    Every bit pattern of quants and sub-block scales occurs; only the float16 scale fields are
    set, so that the weights stay around +-``scale``.
    """
    from llm_omninode.backend.ggml_types import BLOCK_LAYOUT

    block_elems, block_bytes = BLOCK_LAYOUT[ggml_type]
    n_blocks = n_elements // block_elems
    blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset, divisor in _SCALE_FIELDS[ggml_type]:
        value = scale / divisor * rng.uniform(0.5, 1.5, n_blocks)  # Q5_1's m: about -scale
        field = value.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
        blocks[:, offset : offset + 2] = field
    return blocks.reshape(-1)


def _quantize(values: np.ndarray, ggml_type: GGMLType, rng: np.random.Generator) -> np.ndarray:
    if ggml_type in RANDOM_BLOCK_TYPES and ggml_type not in (GGMLType.Q5_0, GGMLType.Q5_1):
        return random_blocks(ggml_type, values.size, rng)
    if ggml_type == GGMLType.F32:
        return values.astype(np.float32)
    if ggml_type == GGMLType.F16:
        return values.astype(np.float16)
    import gguf.quants

    try:
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(ggml_type)))
    except NotImplementedError:  # e.g. IQ4_XS, for files the engine must refuse: any bytes
        from llm_omninode.backend.ggml_types import tensor_nbytes

        nbytes = tensor_nbytes(ggml_type, tuple(reversed(values.shape)))
        return rng.integers(0, 256, nbytes, dtype=np.uint8)


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
    arch: str = "llama",
    head_dim: int | None = None,
    sliding_window: int = 4,
    type_of: Callable[[str], GGMLType | None] | None = None,
    pooling_type: int | None = None,
) -> Path:
    """Write a tiny GGUF of ``arch`` (llama, qwen2 or gemma3) to ``path`` and return it.

    ``type_of(name)`` may choose a tensor's type (None: ``weight_type``), as a Q4_K_M file
    mixes them; ``head_dim`` other than d_model / n_heads is written as key_length (gemma3).
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    # pad the vocabulary to a multiple of 32 so quantized rows of any width stay legal
    while vocab % 32:
        tokens.append(f"<unused{vocab}>")
        types.append(5)
        vocab += 1
    head_dim = head_dim or d_model // n_heads
    u32 = GGUFValueType.UINT32
    metadata = {
        "general.architecture": arch,
        "general.name": f"tiny-{arch}",
        "general.file_type": GGUFValue(3, u32),
        f"{arch}.block_count": GGUFValue(n_blocks, u32),
        f"{arch}.context_length": GGUFValue(context_length, u32),
        f"{arch}.embedding_length": GGUFValue(d_model, u32),
        f"{arch}.feed_forward_length": GGUFValue(d_ff, u32),
        f"{arch}.attention.head_count": GGUFValue(n_heads, u32),
        f"{arch}.attention.head_count_kv": GGUFValue(n_kv_heads, u32),
        # qwen2 and gemma3 files use large bases; 1e6 on global layers, 1e4 on sliding ones
        f"{arch}.rope.freq_base": 10000.0 if arch == "llama" else 1e6,
        f"{arch}.rope.dimension_count": GGUFValue(head_dim, u32),
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": GGUFValue(vocab, u32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": GGUFValue(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": GGUFValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": GGUFValue(merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": GGUFValue(1, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": GGUFValue(2, GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": False,
    }
    if head_dim != d_model // n_heads:
        metadata[f"{arch}.attention.key_length"] = GGUFValue(head_dim, u32)
        metadata[f"{arch}.attention.value_length"] = GGUFValue(head_dim, u32)
    if arch == "gemma3":
        metadata["gemma3.attention.sliding_window"] = GGUFValue(sliding_window, u32)
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    if pooling_type is not None:  # an embedding model's (llama.cpp's codes: 1 mean, 2 cls...)
        metadata[f"{arch}.pooling_type"] = GGUFValue(pooling_type, u32)

    def weight(name: str, rows: int, cols: int, ggml_type: GGMLType, scale: float = 0.08):
        ggml_type = (type_of(name) if type_of else None) or ggml_type
        values = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return (name, ggml_type, (cols, rows), _quantize(values, ggml_type, rng))

    def norm(name: str, width: int):
        values = (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)
        return (name, GGMLType.F32, (width,), values)

    tensors = [weight("token_embd.weight", vocab, d_model, embed_type, scale=0.5)]

    def bias(name: str, width: int):
        return (name, GGMLType.F32, (width,), (rng.standard_normal(width) * 0.5).astype(np.float32))

    kv = n_kv_heads * head_dim
    q_width = n_heads * head_dim
    for i in range(n_blocks):
        p = f"blk.{i}."
        tensors += [
            norm(p + "attn_norm.weight", d_model),
            weight(p + "attn_q.weight", q_width, d_model, weight_type),
            weight(p + "attn_k.weight", kv, d_model, weight_type),
            weight(p + "attn_v.weight", kv, d_model, weight_type),
            weight(p + "attn_output.weight", d_model, q_width, weight_type),
            norm(p + "ffn_norm.weight", d_model),
            weight(p + "ffn_gate.weight", d_ff, d_model, weight_type),
            weight(p + "ffn_up.weight", d_ff, d_model, weight_type),
            weight(p + "ffn_down.weight", d_model, d_ff, weight_type),
        ]
        if arch == "qwen2":
            tensors += [
                bias(p + f"attn_{x}.bias", w) for x, w in zip("qkv", (q_width, kv, kv), strict=True)
            ]
        if arch == "gemma3":
            tensors += [
                norm(p + "attn_q_norm.weight", head_dim),
                norm(p + "attn_k_norm.weight", head_dim),
                norm(p + "post_attention_norm.weight", d_model),
                norm(p + "post_ffw_norm.weight", d_model),
            ]
    tensors.append(norm("output_norm.weight", d_model))
    if not tied:
        tensors.append(weight("output.weight", vocab, d_model, weight_type))
    write_gguf(path, metadata, tensors)
    return path


def split_gguf(path: Path, parts: int, *, no_tensor_first_split: bool = False) -> list[Path]:
    """``path`` cut as llama.cpp's ``gguf-split`` cuts a model: ``STEM-0000N-of-0000M.gguf``
    beside it, each a GGUF with some of the tensors in order; the first also holds all the
    metadata (and with ``no_tensor_first_split``, as gguf-split's flag, only that), and each
    ``split.no`` (0-based), ``split.count`` and ``split.tensors.count``."""
    from llm_omninode.backend.gguf import open_gguf

    stem = path.name.removesuffix(".gguf")
    out = []
    with open_gguf(path) as gguf:
        names = list(gguf.tensors)
        holding = parts - no_tensor_first_split  # parts that hold tensors
        per = -(-len(names) // holding)
        for i in range(parts):
            split = {
                "split.no": GGUFValue(i, GGUFValueType.UINT16),
                "split.count": GGUFValue(parts, GGUFValueType.UINT16),
                "split.tensors.count": GGUFValue(len(names), GGUFValueType.INT32),
            }
            metadata = (
                {k: GGUFValue(v, *gguf.metadata_types[k]) for k, v in gguf.metadata.items()}
                if i == 0
                else {}
            )
            k = i - no_tensor_first_split  # this part's place among those holding tensors
            tensors = [
                (n, gguf.tensors[n].ggml_type, gguf.tensors[n].shape, gguf.tensor_data(n))
                for n in (names[k * per : (k + 1) * per] if k >= 0 else [])
            ]
            part = path.with_name(f"{stem}-{i + 1:05d}-of-{parts:05d}.gguf")
            write_gguf(part, {**metadata, **split}, tensors, alignment=gguf.alignment)
            out.append(part)
            del tensors
    return out
