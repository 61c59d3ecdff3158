"""Structured output without a model: the token table and masks on a tiny byte-level vocabulary,
a constrained TokenPicker, the Constraint's bounds and wire form, and the HTTP fields that
make one (Ollama's ``format``, OpenAI's ``response_format``)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from omninode_shim.http.parse import (
    ApiError,
    parse_format,
    parse_ollama_chat,
    parse_openai_chat,
    parse_openai_completion,
    parse_response_format,
)
from support.tiny_model import tiny_vocab

from llm_omninode.backend.constraint import (
    MAX_DEPTH,
    MAX_SOURCE_BYTES,
    NUMBER_LIMIT,
    Constraint,
    ConstraintError,
    TokenTable,
    tighten,
)
from llm_omninode.backend.generate import TokenPicker
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.tokenizer import Tokenizer
from llm_omninode.request import GenerationRequest, RequestError

PADDING = 5  # head rows past the vocabulary, as some GGUF files have


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokens, types, merges = tiny_vocab()
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 2,
    })  # fmt: skip


@pytest.fixture(scope="module")
def table(tok: Tokenizer) -> TokenTable:
    return TokenTable(tok, tok.vocab_size + PADDING)


def pieces(tok: Tokenizer, allowed: np.ndarray) -> set[bytes]:
    return {tok.token_bytes(int(i)) for i in np.flatnonzero(allowed)}


def test_the_table_has_every_token_and_the_head_rows_past_them(tok, table):
    assert table.vocab_size == tok.vocab_size + PADDING
    assert sorted(table.eos_ids.tolist()) == sorted(tok.eog_ids) == [0, 2]
    allowed = table.guide(Constraint.json_schema({"type": "boolean"})).allowed(table.vocab_size)
    assert len(allowed) == table.vocab_size and not allowed[tok.vocab_size :].any()
    assert pieces(tok, allowed) == {b"t", b"f"}  # the only tokens that start true or false
    wider = table.guide(Constraint.json_schema({"type": "boolean"})).allowed(table.vocab_size + 9)
    assert (wider[: table.vocab_size] == allowed).all() and not wider[table.vocab_size :].any()


def test_end_tokens_only_once_the_value_is_complete(tok, table):
    guide = table.guide(Constraint.json_schema({"type": "integer", "minimum": 0, "maximum": 99}))
    digits = {str(d).encode() for d in range(10)}
    ends = {b"<|endoftext|>", b"<|im_end|>"}
    assert pieces(tok, guide.allowed(table.vocab_size)) == digits  # no end before a value
    guide.advance(tok.encode("4")[0])
    assert pieces(tok, guide.allowed(table.vocab_size)) == digits | ends and not guide.done
    guide.advance(tok.encode("2")[0])  # 42: a third digit would pass 99
    assert pieces(tok, guide.allowed(table.vocab_size)) == ends and guide.done


def test_mask_sets_what_is_not_allowed_to_minus_infinity(tok, table):
    guide = table.guide(Constraint.json_schema({"enum": ["yes", "no"]}))
    logits = np.arange(table.vocab_size, dtype=np.float32)
    masked = guide.mask(logits)
    assert masked.dtype == np.float32 and masked.shape == logits.shape
    finite = np.flatnonzero(np.isfinite(masked))
    assert {tok.token_bytes(int(i)) for i in finite} == {b'"'}
    assert (masked[finite] == logits[finite]).all()


@pytest.mark.parametrize("seed", range(4))
def test_a_constrained_picker_writes_valid_json_whatever_the_logits(tok, table, seed):
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
            "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 2},
        },
        "required": ["ok", "n", "tags"],
    }
    picker = TokenPicker(
        SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, seed=seed),
        guide=table.guide(Constraint.json_schema(schema)),
    )
    rng = np.random.default_rng(seed)
    ids = []
    for _ in range(200):
        token = picker.pick(rng.standard_normal(table.vocab_size).astype(np.float32) * 4)
        if token in tok.eog_ids:
            break
        ids.append(token)
    else:
        pytest.fail("the answer did not end")
    doc = json.loads(tok.decode(ids))
    jsonschema.validate(doc, schema)
    assert set(doc) == {"ok", "n", "tags"}  # objects are closed unless the schema opens them


def test_greedy_pick_never_takes_a_forbidden_favourite(tok, table):
    picker = TokenPicker(SamplingOptions.greedy(), guide=table.guide(Constraint.any_json()))
    logits = np.zeros(table.vocab_size, dtype=np.float32)
    logits[tok.encode("x")[0]] = 100.0  # the model's favourite cannot start an object
    assert tok.token_bytes(picker.pick(logits)) == b"{"


def test_a_failed_guide_can_only_end_the_answer(tok, table):
    guide = table.guide(Constraint.json_schema({"type": "boolean"}))
    guide.advance(tok.encode("x")[0])  # never offered by the mask: the matcher fails
    assert guide.error
    assert pieces(tok, guide.allowed(table.vocab_size)) == {b"<|endoftext|>", b"<|im_end|>"}


def test_compiled_constraints_are_cached_and_guides_independent(table):
    c = Constraint.json_schema({"type": "integer"})
    a, b = table.guide(c), table.guide(c)
    assert len(table._compiled) >= 1 and c.key in table._compiled
    a.advance(int(np.flatnonzero(a.allowed(table.vocab_size))[0]))
    assert a.allowed(table.vocab_size).sum() != b.allowed(table.vocab_size).sum()


def test_lark_grammars_constrain_too(tok, table):
    guide = table.guide(Constraint.lark('start: "ab" | "c"'))
    assert pieces(tok, guide.allowed(table.vocab_size)) == {b"a", b"c"}


# ---- the constraint itself -------------------------------------------------------------------
@pytest.mark.parametrize(
    "schema,words",
    [
        ([1, 2], "must be an object"),
        ({"type": "foo"}, "foo"),
        ({"not": {"type": "string"}}, "not"),  # a keyword the matcher does not implement
        ({"$ref": "#/nowhere"}, "nowhere"),
        ({"type": "number", "minimum": float("nan")}, "plain JSON"),
        ({"enum": ["x" * 100] * 200}, f"at most {MAX_SOURCE_BYTES}"),
    ],
)
def test_bad_schemas_are_named(schema, words):
    with pytest.raises(ConstraintError, match=words):
        Constraint.json_schema(schema)


def test_deep_schemas_are_refused_before_anything_walks_them():
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ConstraintError, match="deeper"):
        Constraint.json_schema(deep)


def test_the_wire_form_round_trips_and_is_checked_again():
    c = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert Constraint.from_wire(json.loads(json.dumps(c.to_wire()))) == c
    lark = Constraint.lark('start: "x"')
    assert Constraint.from_wire(lark.to_wire()) == lark
    bad = [
        None, [], {"kind": "json_schema"}, {"kind": "python", "source": "1"},
        {"kind": "json_schema", "source": "{"}, {"kind": "lark", "source": "start: ("},
        {"kind": "json_schema", "source": json.dumps({"type": "foo"})},
        {"kind": "lark", "source": "x" * (MAX_SOURCE_BYTES + 1)}, {**c.to_wire(), "x": 1},
    ]  # fmt: skip
    for doc in bad:
        with pytest.raises(ConstraintError):
            Constraint.from_wire(doc)


def test_requests_carry_their_constraint_over_the_wire():
    c = Constraint.any_json()
    request = GenerationRequest(model="m", prompt="p", constraint=c)
    assert GenerationRequest.from_wire(request.to_wire()).constraint == c
    assert "constraint" not in GenerationRequest(model="m", prompt="p").to_wire()
    with pytest.raises(RequestError, match="constraint"):
        GenerationRequest.from_wire({"model": "m", "prompt": "p", "constraint": {"kind": "x"}})


def test_objects_are_closed_as_ollama_closes_them_but_not_in_all_of():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {}}},
                       "c": {"type": "array", "items": {"properties": {"d": {}}}}},
        "$defs": {"e": {"properties": {}}},
        "allOf": [{"properties": {"f": {}}}],
    }  # fmt: skip
    closed = tighten(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["e"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in schema  # a copy
    opened = {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}}
    assert tighten(opened) == opened


def test_numbers_digits_are_bounded_where_the_schema_does_not_bound_them(tok, table):
    assert tighten({"type": "integer"}) == {"type": "integer", "minimum": -NUMBER_LIMIT,
                                            "maximum": NUMBER_LIMIT}  # fmt: skip
    bounded = {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.5}
    assert tighten(bounded) == bounded
    for schema, text, ok in [
        ({"type": "number"}, "-0.1234567891", True),
        ({"type": "number"}, "0.12345678912", False),  # an 11th decimal
        ({"type": ["number", "null"]}, "1234567890123456", True),
        ({"type": ["number", "null"]}, "12345678901234567", False),  # a 17th digit
        ({"type": "integer", "minimum": 0}, "12345678901234567", False),
        ({"type": "integer", "maximum": 10**20}, "12345678901234567", True),  # its own bound
    ]:
        guide = table.guide(Constraint.json_schema(schema))
        for i in tok.encode(text):
            assert guide.allowed(table.vocab_size)[i] or not ok, (schema, text)
            guide.advance(i)
        assert (not guide.error) == ok, (schema, text)


# ---- the HTTP fields -------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_ollama_format():
    assert parse_format(None) is None and parse_format("") is None
    assert parse_format("json") == Constraint.any_json()
    assert parse_format(SCHEMA) == Constraint.json_schema(SCHEMA)
    call = parse_ollama_chat({**CHAT, "format": SCHEMA})
    assert call.request.constraint == Constraint.json_schema(SCHEMA)
    assert parse_ollama_chat({**CHAT, "format": "json"}).request.constraint is not None
    for bad_format, words in (("xml", '"json"'), (5, '"json"'), ({"type": "foo"}, "format: ")):
        with pytest.raises(ApiError, match=words) as info:
            parse_format(bad_format)
        assert info.value.status == 400


def test_openai_response_format():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == Constraint.any_json()
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}
    assert parse_response_format(fmt) == Constraint.json_schema(SCHEMA)
    assert parse_openai_chat({**CHAT, "response_format": fmt}).request.constraint is not None
    completion = {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}
    assert parse_openai_completion(completion).request.constraint == Constraint.any_json()
    for bad_format, words in (
        ("json", "must be an object"),
        ({"type": "yaml"}, "yaml"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "schema is required"),
        ({"type": "json_schema", "json_schema": {"name": 5, "schema": SCHEMA}}, "name"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "y"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": 7}}}, "schema: "),
    ):
        with pytest.raises(ApiError, match=words):
            parse_response_format(bad_format)
