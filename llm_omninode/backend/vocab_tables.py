"""llama.cpp's vocabulary tables for tokenizer.py: token types and attributes, the
pre-tokenizer regexes by ``tokenizer.ggml.pre``, GPT-2's byte alphabet, and the texts that mark
end-of-generation and fill-in-the-middle tokens. Data only, no behaviour.
"""

from __future__ import annotations

import re

# GGUF token types (tokenizer.ggml.token_type), as in llama.cpp's llama_token_type.
TYPE_UNDEFINED = 0
TYPE_NORMAL = 1
TYPE_UNKNOWN = 2
TYPE_CONTROL = 3
TYPE_USER_DEFINED = 4
TYPE_UNUSED = 5
TYPE_BYTE = 6

# llama.cpp's llama_token_attr bits; token types are turned into these at load, and some tokens
# get extra bits from name-based heuristics (e.g. "<|im_end|>" is forced to CONTROL).
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

TYPE_TO_ATTR = {
    TYPE_UNKNOWN: ATTR_UNKNOWN,
    TYPE_UNUSED: ATTR_UNUSED,
    TYPE_NORMAL: ATTR_NORMAL,
    TYPE_CONTROL: ATTR_CONTROL,
    TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    TYPE_BYTE: ATTR_BYTE,
}
ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL  # what decode(skip_special=True) leaves out

# --- pre-tokenizer regexes, verbatim from llama.cpp's llm_tokenizer_bpe -----------------------
# (the "adapted" forms: (?i:'s|...) written as '[sS]... so no Unicode case folding sneaks in)
RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
RE_LLAMA3 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_QWEN2 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RES_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
RES_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"]


# name -> (regexes, ignore_merges, default add_bos); names and groups as in llama-vocab.cpp
def pre_table() -> dict[str, tuple[list[str], bool, bool]]:
    table: dict[str, tuple[list[str], bool, bool]] = {}

    def put(names: str, regexes: list[str], ignore_merges: bool = False, add_bos: bool = False):
        for name in names.split():
            table[name] = (regexes, ignore_merges, add_bos)

    put("default", RES_DEFAULT)
    put(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        [RE_LLAMA3],
        True,
        True,
    )
    put("dbrx smaug-bpe glm4 chatglm-bpe", [RE_LLAMA3])
    put(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
        "exaone4 mpt olmo jais trillion granite-docling jina-v1-en jina-v2-code roberta-bpe",
        [RE_GPT2],
    )
    put(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        [r"\p{N}", RE_GPT2],
    )
    put(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open",
        [RE_QWEN2],
    )
    put("falcon", RES_FALCON)
    # short aliases used in this project's docs
    table["gpt2"] = table["gpt-2"]
    return table


PRE_TYPES = pre_table()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (llama.cpp unicode_byte_to_utf8_map)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}

# llama.cpp's name-based end-of-generation detection (llama_vocab::impl::load)
EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
EOG_TEXTS = frozenset(
    (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
        "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
        "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
    )
)  # fmt: skip
FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
FIM_SEP_TEXTS = ("<|file_sep|>",)

# metadata key suffix -> attribute, in llama.cpp's order (a later key overrides, as there)
SPECIAL_ID_KEYS = (
    ("bos_token_id", "bos_id"),
    ("eos_token_id", "eos_id"),
    ("eot_token_id", "eot_id"),
    ("eom_token_id", "eom_id"),
    ("unknown_token_id", "unk_id"),
    ("seperator_token_id", "sep_id"),  # sic: llama.cpp's key name
    ("padding_token_id", "pad_id"),
    ("mask_token_id", "mask_id"),
    ("fim_pre_token_id", "fim_pre_id"),
    ("fim_suf_token_id", "fim_suf_id"),
    ("fim_mid_token_id", "fim_mid_id"),
    ("fim_pad_token_id", "fim_pad_id"),
    ("fim_rep_token_id", "fim_rep_id"),
    ("fim_sep_token_id", "fim_sep_id"),
    ("prefix_token_id", "fim_pre_id"),
    ("suffix_token_id", "fim_suf_id"),
    ("middle_token_id", "fim_mid_id"),
)

MAX_VOCAB = 4_000_000  # far above any real vocabulary; refuses absurd metadata early
ASCII_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, used by LSTRIP/RSTRIP
SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: not encodable as UTF-8


def is_hex_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")
