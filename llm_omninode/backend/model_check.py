"""A model's GGUF metadata checked against its tensors, before anything trusts either.

Metadata comes from whoever made the file, or from a peer's manifest: a count or a width that
disagrees with the tensors would otherwise be found much later (a 500 on the first request,
garbage text, a token id past the vocabulary) or would size an allocation (``block_count =
10**9`` with two blocks of tensors). :func:`check_model` is called wherever a model is accepted:
``ModelRegistry.add_file`` (``llm omni add``, ``llm omni pull``, the shim's ``/api/pull``) before
the file is hashed, and ``Manifest.from_json`` (manifests from peers, and read back from the
store). Every step is bounded by the size of what the file really holds (its tensor list and its
token list), never by a number the metadata states, and the block count is checked first.

What is checked, each refusal a :class:`ModelCheckError` naming the key and the values:

* ``{arch}.block_count`` against the ``blk.N`` tensors (ModelSpec.from_metadata, first);
  ``{arch}.context_length`` in 1..2^24; the hyper-parameters ModelSpec already checks (head
  counts divide, rope dimension, ...);
* widths: ``embedding_length`` against ``token_embd.weight`` and every norm; head counts and
  head dim against the q/k/v/output projections (and their biases and q/k norms);
  ``feed_forward_length`` against the MLP; every block, not only the first;
* vocabulary: ``{arch}.vocab_size`` (when given), ``tokenizer.ggml.tokens`` and
  ``output.weight`` (when untied) against the rows of ``token_embd.weight``, which must all be
  equal, as llama.cpp requires; ``token_type``/``scores`` cover the token list;
* tokenizer: ``tokenizer.ggml.model`` is one the tokenizer implements, a gpt2 ``pre`` is a
  known pre-tokenizer, every special token id (bos, eos, eot, unk, pad, ...) is a token of the
  list (llama.cpp only warns and ignores such an id; here it is refused);
* ``tokenizer.chat_template`` compiles in the sandboxed Jinja environment (it is not run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .chat_template import ChatTemplate, ChatTemplateError
from .spec import ModelCheckError, ModelSpec
from .vocab_tables import MAX_VOCAB, PRE_TYPES, SPECIAL_ID_KEYS

__all__ = ["TOKENIZER_MODELS", "ModelCheckError", "check_model"]

TOKENIZER_MODELS = ("gpt2", "llama")  # what backend/tokenizer.py implements


def check_model(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, Any]) -> ModelSpec:
    """Refuse metadata that disagrees with the tensors (``name -> GGUF shape``, ne order).

    Returns the model's spec. Raises ModelCheckError (or UnsupportedModelError, or another
    ValueError naming the key, from ModelSpec.from_metadata).
    """
    shapes = {name: _dims(shape) for name, shape in tensor_shapes.items()}
    if not shapes:
        raise ModelCheckError("the file has no tensors")
    # block_count against the blk.N tensors comes first in there, before any loop over blocks
    spec = ModelSpec.from_metadata(metadata, shapes.keys())
    rows = _check_shapes(spec, metadata, shapes)
    _check_tokenizer(metadata, rows)
    _check_chat_template(metadata)
    return spec


def _dims(shape: Any) -> tuple[int, ...]:
    """A shape without trailing 1s (GGUF may write a vector as [n, 1])."""
    dims = tuple(int(d) for d in shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims = dims[:-1]
    return dims


def _show(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _check_shapes(spec: ModelSpec, md: Mapping[str, Any], shapes: dict[str, tuple]) -> int:
    """Every tensor the engine reads has the shape the metadata implies; returns the vocab rows."""
    a = spec.arch
    d, ff, hd = spec.d_model, spec.d_ff, spec.head_dim
    q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
    width = f"{a}.embedding_length={d}"
    heads = f"{a}.attention.head_count={spec.n_heads}, head dim {hd}"
    kv_heads = f"{a}.attention.head_count_kv={spec.n_kv_heads}, head dim {hd}"
    ffn = f"{width}, {a}.feed_forward_length={ff}"

    embd = shapes["token_embd.weight"]  # present: ModelSpec.from_metadata checked
    if len(embd) != 2 or embd[0] != d:
        raise ModelCheckError(
            f"{a}.embedding_length is {d} but token_embd.weight has shape {_show(embd)}"
            f" (width {embd[0]})"
        )
    rows = embd[1]
    if f"{a}.vocab_size" in md and spec.vocab_size != rows:
        raise ModelCheckError(
            f"{a}.vocab_size is {spec.vocab_size} but token_embd.weight has {rows} rows"
        )

    # (name, expected shape, the metadata that implies it)
    expected: list[tuple[str, tuple[int, ...], str]] = [("output_norm.weight", (d,), width)]
    if not spec.tied_embedding:
        expected.append(("output.weight", (d, rows), f"{width}, token_embd.weight rows={rows}"))
    if "rope_freqs.weight" in shapes:
        rope = f"{a}.rope.dimension_count={spec.rope_dim}"
        expected.append(("rope_freqs.weight", (spec.rope_dim // 2,), rope))
    per_block: list[tuple[str, tuple[int, ...], str]] = [
        ("attn_norm.weight", (d,), width),
        ("attn_q.weight", (d, q), f"{width}, {heads}"),
        ("attn_k.weight", (d, kv), f"{width}, {kv_heads}"),
        ("attn_v.weight", (d, kv), f"{width}, {kv_heads}"),
        ("attn_output.weight", (q, d), f"{width}, {heads}"),
        ("ffn_norm.weight", (d,), width),
        ("ffn_gate.weight", (d, ff), ffn),
        ("ffn_up.weight", (d, ff), ffn),
        ("ffn_down.weight", (ff, d), ffn),
    ]
    if spec.attn_bias:
        per_block += [
            ("attn_q.bias", (q,), heads),
            ("attn_k.bias", (kv,), kv_heads),
            ("attn_v.bias", (kv,), kv_heads),
        ]
    if spec.qk_norm:
        per_block += [("attn_q_norm.weight", (hd,), heads), ("attn_k_norm.weight", (hd,), heads)]
    if spec.post_norms:
        per_block += [
            ("post_attention_norm.weight", (d,), width),
            ("post_ffw_norm.weight", (d,), width),
        ]
    # n_blocks matches the blk.N tensors present (checked), so this is bounded by the file
    for b in range(spec.n_blocks):
        expected += [(f"blk.{b}.{name}", dims, why) for name, dims, why in per_block]
        for name, dims, why in expected:
            actual = shapes.get(name)
            if actual is not None and actual != _dims(dims):  # absent: from_metadata named it
                raise ModelCheckError(
                    f"{name} has shape {_show(actual)} but the metadata ({why}) makes it "
                    f"{_show(_dims(dims))}"
                )
        expected = []
    return rows


def _check_tokenizer(md: Mapping[str, Any], rows: int) -> None:
    model = md.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise ModelCheckError(
            f"tokenizer.ggml.model is {'missing' if model is None else repr(model)}: "
            "the file has no vocabulary this engine can tokenize with"
        )
    if model not in TOKENIZER_MODELS:
        raise ModelCheckError(
            f"tokenizer.ggml.model is {model!r}, not a known tokenizer "
            f"(known: {', '.join(map(repr, TOKENIZER_MODELS))})"
        )
    if model == "gpt2":
        pre = md.get("tokenizer.ggml.pre")
        if pre not in (None, "") and pre not in PRE_TYPES:
            raise ModelCheckError(f"tokenizer.ggml.pre is {pre!r}, not a known pre-tokenizer")

    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise ModelCheckError("tokenizer.ggml.tokens is missing or not a list of tokens")
    n = len(tokens)
    if n > MAX_VOCAB:
        raise ModelCheckError(f"tokenizer.ggml.tokens has {n} tokens, more than {MAX_VOCAB}")
    if n != rows:
        raise ModelCheckError(
            f"tokenizer.ggml.tokens has {n} tokens but token_embd.weight has {rows} rows"
        )
    bad = next((i for i, t in enumerate(tokens) if not isinstance(t, str)), None)
    if bad is not None:
        raise ModelCheckError(f"tokenizer.ggml.tokens[{bad}] is not a string")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        value = md.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) < n):
            size = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
            raise ModelCheckError(f"{key} has {size} entries for {n} tokens")

    for id_key, _ in SPECIAL_ID_KEYS:
        key = "tokenizer.ggml." + id_key
        if key not in md:
            continue
        value = md[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelCheckError(f"{key} must be a token id, got {value!r}")
        if not 0 <= value < n:
            raise ModelCheckError(
                f"{key} is {value} but tokenizer.ggml.tokens has {n} tokens (ids 0..{n - 1})"
            )


def _check_chat_template(md: Mapping[str, Any]) -> None:
    source = md.get("tokenizer.chat_template")
    if source is None:
        return  # the fallback template is used
    if not isinstance(source, str):
        raise ModelCheckError(f"tokenizer.chat_template must be a string, got {type(source)}")
    try:
        ChatTemplate(source)  # compiled in the sandbox, not rendered
    except ChatTemplateError as exc:
        raise ModelCheckError(f"tokenizer.chat_template does not compile: {exc}") from exc
