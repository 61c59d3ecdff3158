"""GenerationRequest on the wire: exact round trip, and hostile documents refused by field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_omninode.backend.sampling import SamplingError, SamplingOptions
from llm_omninode.request import (
    MAX_MESSAGES,
    MAX_TEXT_BYTES,
    GenerationRequest,
    Message,
    RequestError,
)

MiB = 1024 * 1024


def wire_trip(request: GenerationRequest) -> GenerationRequest:
    """Through JSON text, as a frame header carries it."""
    return GenerationRequest.from_wire(json.loads(json.dumps(request.to_wire())))


# ---- round trips -------------------------------------------------------------------------

texts = st.text(max_size=40)
options = st.builds(
    SamplingOptions,
    temperature=st.floats(0.0, 100.0),
    top_k=st.integers(0, 10**6),
    top_p=st.floats(0.0, 1.0, exclude_min=True),
    min_p=st.floats(0.0, 1.0),
    repeat_penalty=st.floats(0.0, 100.0, exclude_min=True),
    repeat_last_n=st.integers(-1, 10**6),
    seed=st.none() | st.integers(0, 2**64 - 1),
)
messages = st.lists(
    st.builds(Message, st.sampled_from(["system", "user", "assistant"]), texts), max_size=5
)


@st.composite
def requests(draw):
    msgs = tuple(draw(messages))
    prompt = draw(st.none() | texts) if msgs else draw(texts)
    return GenerationRequest(
        model=draw(st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=30)),
        messages=msgs,
        prompt=prompt,
        system=draw(st.none() | texts),
        raw=draw(st.booleans()),
        options=draw(options),
        max_tokens=draw(st.none() | st.integers(0, 2**31 - 1)),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=10), max_size=4))),
    )


@settings(max_examples=200, deadline=None)
@given(requests())
def test_wire_round_trip(request):
    assert wire_trip(request) == request
    assert GenerationRequest.from_wire(request.to_wire()) == request


@settings(max_examples=100, deadline=None)
@given(options)
def test_sampling_options_round_trip(opts):
    assert SamplingOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts


def test_minimal_doc_takes_defaults():
    request = GenerationRequest.from_wire({"model": "tiny", "prompt": "hi"})
    assert request == GenerationRequest(model="tiny", prompt="hi")
    assert SamplingOptions.from_dict({}) == SamplingOptions()
    assert SamplingOptions.from_dict({"temperature": 1}).temperature == 1.0  # JSON int ok


def test_limits_are_inclusive():
    at_cap = "x" * MAX_TEXT_BYTES
    request = GenerationRequest(
        model="m" * 256,
        messages=tuple(Message("user", "") for _ in range(MAX_MESSAGES - 1))
        + (Message("user", at_cap),),
        stop=tuple("s" * 256 for _ in range(16)),
    )
    assert GenerationRequest.from_wire(request.to_wire()) == request


# ---- hostile documents -------------------------------------------------------------------

BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def doc(**changes):
    out = json.loads(json.dumps(BASE))
    out.update(changes)
    return out


def without(key):
    out = doc()
    del out[key]
    return out


def msg(**fields):
    return doc(messages=[fields])


BIG = "x" * (MAX_TEXT_BYTES // 2)
HOSTILE = [
    # (id, document, word the error must name)
    ("not an object", [BASE], "object"),
    ("null", None, "object"),
    ("unknown key", doc(temperature=0.5), "temperature"),
    ("many unknown keys", {**BASE, **{f"k{i}": 1 for i in range(10_000)}}, "unknown"),
    ("no model", without("model"), "model"),
    ("model not a string", doc(model=7), "model"),
    ("empty model", doc(model=""), "model"),
    ("model too long", doc(model="m" * 257), "model"),
    ("model with newline", doc(model="tiny\nX-Injected: 1"), "model"),
    ("no messages or prompt", doc(messages=[]), "messages or a prompt"),
    ("messages not a list", doc(messages={"role": "user"}), "messages"),
    ("too many messages", doc(messages=[{"role": "user", "content": ""}] * 4097), "messages"),
    ("message not an object", doc(messages=["hi"]), "messages[0]"),
    ("message extra key", msg(role="user", content="hi", name="x"), "messages[0]"),
    ("message missing content", msg(role="user"), "messages[0]"),
    ("bad role", msg(role="robot", content="hi"), "messages[0].role"),
    ("role not a string", msg(role=["user"], content="hi"), "messages[0].role"),
    ("content not a string", msg(role="user", content=5), "messages[0].content"),
    ("content null", msg(role="user", content=None), "messages[0].content"),
    ("content too big", msg(role="user", content="x" * (MAX_TEXT_BYTES + 1)), "content"),
    # 1 Mi characters of 2 bytes each: under the character count, over the byte cap
    ("content too many bytes", msg(role="user", content="é" * (MAX_TEXT_BYTES // 2 + 1)), "con"),
    ("lone surrogate", msg(role="user", content="a\ud800b"), "messages[0].content"),
    (
        "total text too big",
        doc(messages=[{"role": "user", "content": BIG}] * 17),
        "messages[16].content",
    ),
    ("prompt not a string", doc(prompt=["hi"]), "prompt"),
    ("system not a string", doc(system=1), "system"),
    ("raw as int", doc(raw=1), "raw"),
    ("raw as string", doc(raw="true"), "raw"),
    ("options not an object", doc(options=[0.5]), "options"),
    ("unknown option", doc(options={"mirostat": 2}), "mirostat"),
    ("bool temperature", doc(options={"temperature": True}), "temperature"),
    ("string temperature", doc(options={"temperature": "0.5"}), "temperature"),
    ("nan temperature", doc(options={"temperature": float("nan")}), "temperature"),
    ("inf top_p", doc(options={"top_p": float("inf")}), "top_p"),
    ("huge int temperature", doc(options={"temperature": 10**400}), "temperature"),
    ("top_p out of range", doc(options={"top_p": 7}), "top_p"),
    ("float top_k", doc(options={"top_k": 40.0}), "top_k"),
    ("bool top_k", doc(options={"top_k": False}), "top_k"),
    ("negative seed", doc(options={"seed": -1}), "seed"),
    ("seed too big", doc(options={"seed": 2**64}), "seed"),
    ("bool max_tokens", doc(max_tokens=True), "max_tokens"),
    ("float max_tokens", doc(max_tokens=5.0), "max_tokens"),
    ("negative max_tokens", doc(max_tokens=-1), "max_tokens"),
    ("huge max_tokens", doc(max_tokens=2**31), "max_tokens"),
    ("stop not a list", doc(stop="###"), "stop"),
    ("too many stops", doc(stop=["a"] * 17), "stop"),
    ("empty stop", doc(stop=[""]), "stop[0]"),
    ("stop too long", doc(stop=["s" * 257]), "stop[0]"),
    ("stop not a string", doc(stop=[1]), "stop[0]"),
    ("stop lone surrogate", doc(stop=["\udfff"]), "stop[0]"),
]


@pytest.mark.parametrize("document, word", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_documents_are_refused_naming_the_field(document, word):
    with pytest.raises(RequestError) as info:
        GenerationRequest.from_wire(document)
    assert word in str(info.value)
    assert len(str(info.value)) < 400  # never echoes a hostile document back


@pytest.mark.parametrize(
    "bad", [None, [], {"top_k": 1.5}, {"seed": "1"}, {"temperature": -1}, {"x": 1}]
)
def test_sampling_from_dict_refuses(bad):
    with pytest.raises(SamplingError):
        SamplingOptions.from_dict(bad)
