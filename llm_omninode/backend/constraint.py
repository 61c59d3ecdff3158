"""Structured output: what the last stage may pick, as a JSON schema or a grammar.

A ``Constraint`` is the request's side: a JSON schema (``Constraint.json_schema``; Ollama's
``format``, OpenAI's ``response_format``, ``llm --schema``) or a Lark grammar
(``Constraint.lark``), checked and bounded where it is made, and sent once with a sequence's
sampling setup. A ``TokenTable`` is the model's side: every token's bytes from the GGUF
vocabulary (our tokenizer; no Hugging Face download) and the end-of-generation ids, with the
constraints compiled for it (cached by hash, bounded). ``TokenTable.guide`` gives a sequence
its ``Guide``, which the last stage's TokenPicker (backend/generate.py) asks for each step:
``mask`` sets every id the grammar does not allow to -inf before sampling, ``advance`` takes
the picked id. The end tokens are allowed only once the grammar is complete, and are all that
is allowed once nothing can follow, so the answer ends there.

The matching is llguidance's (Earley parser over lazily built lexer automata; a mask costs
tens of microseconds a token, a schema about a millisecond to compile).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_SOURCE_BYTES = 16 * 1024  # a schema (compact JSON) or a grammar: it travels in a frame header
MAX_DEPTH = 32  # nesting of a schema's JSON
MAX_COMPILED = 32  # constraints a token table keeps compiled
KINDS = ("json_schema", "lark")
# between JSON tokens: nothing, a space, or a newline and some indentation (llama.cpp's
# json-schema-to-grammar allows the same), so a model cannot pad an answer with endless blanks
WHITESPACE = r"(?: |\n[ \t]{0,20})?"
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # Ollama's "json", OpenAI's json_object
# a number's digits, where its schema does not bound them: at most 16 before the point (as
# llama.cpp's JSON grammar) and 10 after it (the finest multipleOf llguidance takes), so a
# small model cannot write digits until its token limit
NUMBER_LIMIT = 10**16 - 1
NUMBER_STEP = 1e-10
# keywords whose value is a schema, a list of schemas, or a map of names to schemas
_SUB_SCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUB_MAPS = ("properties", "$defs", "definitions", "patternProperties")


class ConstraintError(ValueError):
    """A schema or grammar that cannot constrain an answer; the message says why."""


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_schema" | "lark"
    source: str  # the schema as compact JSON, or the grammar's text

    @classmethod
    def json_schema(cls, schema: object) -> Constraint:
        """A JSON schema (an object, or ``true``); ConstraintError if it is too big, too
        deep, or uses what the matcher does not implement (the message names it)."""
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be an object")
        _check_depth(schema, 0)
        try:
            source = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (ValueError, TypeError) as exc:  # NaN, or not JSON at all
            raise ConstraintError(f"the schema is not plain JSON: {exc}") from exc
        return cls._checked("json_schema", source)

    @classmethod
    def any_json(cls) -> Constraint:
        """Any JSON object (what Ollama's ``"json"`` and OpenAI's ``json_object`` ask for)."""
        return cls.json_schema(ANY_OBJECT)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A grammar in llguidance's Lark dialect (it may embed ``%json {...}`` schemas)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConstraintError("a grammar must be non-empty text")
        return cls._checked("lark", grammar)

    @classmethod
    def _checked(cls, kind: str, source: str) -> Constraint:
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > MAX_SOURCE_BYTES:
            raise ConstraintError(f"the {_NAMES[kind]} is {size} bytes; at most "
                                  f"{MAX_SOURCE_BYTES} are taken")  # fmt: skip
        made = cls(kind, source)
        error = llguidance.LLMatcher.validate_grammar(made.grammar())
        if error:
            raise ConstraintError(f"{_NAMES[kind]}: {_first_line(error)}")
        return made

    @property
    def key(self) -> str:
        """What a compiled constraint is cached by."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    def grammar(self) -> str:
        """llguidance's form of it (a schema tightened as Ollama tightens it: ``tighten``)."""
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        try:
            schema = json.dumps(tighten(json.loads(self.source)))  # as text: ints past 2**64
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_pattern": WHITESPACE}
            )
        except ValueError as exc:
            raise ConstraintError(f"JSON schema: {exc}") from exc

    def to_wire(self) -> dict[str, str]:
        return {"kind": self.kind, "source": self.source}

    @classmethod
    def from_wire(cls, doc: object) -> Constraint:
        """A constraint from a peer's JSON object, checked as any other."""
        if not isinstance(doc, dict) or set(doc) != {"kind", "source"}:
            raise ConstraintError("a constraint must be {kind, source}")
        kind, source = doc["kind"], doc["source"]
        if kind not in KINDS or not isinstance(source, str):
            raise ConstraintError(f"constraint kind must be one of {', '.join(KINDS)}")
        if len(source) > MAX_SOURCE_BYTES:
            raise ConstraintError(f"a constraint's source is over {MAX_SOURCE_BYTES} bytes")
        if kind == "lark":
            return cls.lark(source)
        try:
            schema = json.loads(source)
        except ValueError as exc:
            raise ConstraintError(f"constraint source is not JSON: {exc}") from exc
        return cls.json_schema(schema)


_NAMES = {"json_schema": "JSON schema", "lark": "grammar"}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "invalid"


def _check_depth(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ConstraintError(f"the schema nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)


def tighten(schema: Any) -> Any:
    """A copy that allows a subset of what ``schema`` allows, as Ollama (llama.cpp's
    converter) does: every object schema that lists ``properties`` and says nothing of
    ``additionalProperties`` allows no others (a small model is not tempted into keys nobody
    asked for), and a number's digits are bounded where its schema does not bound them
    (NUMBER_LIMIT, NUMBER_STEP). Branches of ``allOf`` are left as they are (a closed branch
    would refuse the others' properties)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    _bound_number(out)
    for name in _SUB_SCHEMA:
        if name in out:
            out[name] = tighten(out[name])
    for name in _SUB_LISTS:
        if isinstance(out.get(name), list):
            out[name] = [tighten(s) for s in out[name]]
    for name in _SUB_MAPS:
        if isinstance(out.get(name), dict):
            out[name] = {k: tighten(s) for k, s in out[name].items()}
    return out


def _bound_number(schema: dict[str, Any]) -> None:
    kind = schema.get("type")
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if not kinds & {"number", "integer"}:
        return
    if "minimum" not in schema and "exclusiveMinimum" not in schema:
        schema["minimum"] = -NUMBER_LIMIT
    if "maximum" not in schema and "exclusiveMaximum" not in schema:
        schema["maximum"] = NUMBER_LIMIT
    if "number" in kinds and "multipleOf" not in schema:
        schema["multipleOf"] = NUMBER_STEP


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads of a tokenizer: token bytes (control tokens
    marked with a leading 0xFF, as llguidance's llama.cpp binding marks them), the end and
    start ids, and a function from text to ids."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, eos: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id
        tokens, special = [], []
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.token_bytes(i)
            if tokenizer.is_special(i):
                piece = b"\xff" + piece
                special.append(i)
            tokens.append(piece)
        tokens += [b""] * (n_vocab - len(tokens))  # head rows past the vocabulary
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


class TokenTable:
    """One model's vocabulary as the matcher sees it, and the constraints compiled for it.
    Building it takes a while for a large vocabulary (~1 s for 152k tokens): keep one per
    model. Safe to use from several threads."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int | None = None) -> None:
        eos = sorted(tokenizer.eog_ids)
        if not eos:
            raise ConstraintError("this model has no end-of-generation token to end an answer")
        self.vocab_size = max(tokenizer.vocab_size, n_vocab or 0)
        vocabulary = _Vocabulary(tokenizer, self.vocab_size, eos)
        self.eos_ids = np.asarray(eos, dtype=np.int64)
        self._lltok = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(vocabulary), n_vocab=self.vocab_size, eos_token=eos
        )
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def guide(self, constraint: Constraint) -> Guide:
        """A fresh guide of ``constraint`` for one sequence; ConstraintError if this
        vocabulary cannot follow it."""
        key = constraint.key
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return Guide(template.deep_copy(), self.vocab_size, self.eos_ids)
        template = llguidance.LLMatcher(self._lltok, constraint.grammar(), log_level=0)
        if template.is_error():
            raise ConstraintError(f"{_NAMES[constraint.kind]}: "
                                  f"{_first_line(template.get_error())}")  # fmt: skip
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
            return Guide(template.deep_copy(), self.vocab_size, self.eos_ids)


class Guide:
    """One sequence's place in its constraint (used by one thread at a time)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: np.ndarray):
        self._matcher = matcher
        self._eos = eos_ids
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._warned = False

    @property
    def done(self) -> bool:
        """Nothing can follow but an end token."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def allowed(self, n: int) -> np.ndarray:
        """Which of the first ``n`` ids may come next (bool); only the end tokens when the
        matcher has failed (it should not: every pick is from its mask)."""
        if self._matcher.is_error():
            if not self._warned:
                log.warning("constraint failed, ending the answer: %s", self.error[:200])
                self._warned = True
            out = np.zeros(n, dtype=bool)
            out[self._eos[self._eos < n]] = True
            return out
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        # bit k of little-endian word w is id 32w + k; ids past the table's (more logits than
        # it has ids) come out as zeros: not allowed
        bits = np.unpackbits(self._words.view(np.uint8), count=n, bitorder="little")
        return bits.view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (one row) with every id the constraint does not allow at -inf."""
        row = np.asarray(logits, dtype=np.float32).reshape(-1)
        return np.where(self.allowed(len(row)), row, np.float32(-np.inf))

    def advance(self, token: int) -> None:
        """Take the id picked from the last mask."""
        if not self._matcher.consume_token(token) and not self._warned:
            log.warning("constraint refused id %d: %s", token, self.error[:200])
            self._warned = True
