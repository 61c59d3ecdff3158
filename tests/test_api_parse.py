"""HTTP bodies -> GenerationRequest: Ollama's and OpenAI's fields, types, ranges and refusals."""

from __future__ import annotations

import pytest
from omninode_shim.http.parse import (
    ApiError,
    parse_keep_alive,
    parse_ollama_chat,
    parse_ollama_generate,
    parse_ollama_options,
    parse_openai_chat,
    parse_openai_completion,
)

from llm_omninode.request import Message

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body, *words: str) -> str:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


def test_generate_maps_every_documented_option():
    call = parse_ollama_generate({
        "model": "smollm2", "prompt": "Why?", "system": "Be brief.", "raw": False,
        "stream": False, "keep_alive": "10m",
        "options": {"temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 7,
                    "num_predict": 12, "stop": ["\n"], "repeat_penalty": 1.2,
                    "repeat_last_n": 32, "num_ctx": 256, "num_thread": 4},
    })  # fmt: skip
    r = call.request
    assert call.model == "smollm2" and call.stream is False and call.keep_alive == 600
    assert (r.prompt, r.system, r.raw, r.max_tokens, r.stop, r.num_ctx) == (
        "Why?", "Be brief.", False, 12, ("\n",), 256,
    )  # fmt: skip
    o = r.options
    assert (o.temperature, o.top_k, o.top_p, o.min_p, o.seed) == (0.0, 5, 0.5, 0.1, 7)
    assert (o.repeat_penalty, o.repeat_last_n) == (1.2, 32)


def test_defaults_are_ollamas():
    call = parse_ollama_generate({"model": "m", "prompt": "x"})
    assert call.stream is True and call.keep_alive is None
    assert call.request.max_tokens is None  # num_predict -1: until the end token or context
    assert call.request.options.temperature == 0.8 and call.request.options.top_k == 40
    assert parse_ollama_options({"num_predict": -2}).max_tokens is None


def test_no_prompt_or_messages_is_a_load_call():
    assert parse_ollama_generate({"model": "m"}).request is None
    assert parse_ollama_chat({"model": "m", "messages": []}).request is None
    assert parse_ollama_chat({"model": "m", "keep_alive": 0}).keep_alive == 0


@pytest.mark.parametrize(
    "field,value",
    [("tools", [{"type": "function"}]), ("images", ["aGk="]), ("think", True), ("suffix", "end"),
     ("template", "{{ .Prompt }}"), ("context", "1 2"), ("logprobs", 1)],
)  # fmt: skip
def test_unsupported_fields_are_named(field, value):
    refused(parse_ollama_generate, {"model": "m", "prompt": "x", field: value}, field)


def test_empty_values_of_unsupported_fields_ask_for_nothing():
    body = {"model": "m", "prompt": "x", "format": "", "tools": [], "images": None,
            "think": False, "context": []}  # fmt: skip
    assert parse_ollama_generate(body).request.prompt == "x"


@pytest.mark.parametrize(
    "options,words",
    [({"temperature": "hot"}, ["temperature"]), ({"top_k": 1.5}, ["top_k"]),
     ({"top_p": 2}, ["top_p"]), ({"seed": True}, ["seed"]), ({"num_predict": "x"}, ["num_predict"]),
     ({"num_ctx": 0}, ["num_ctx"]), ({"stop": [1]}, ["stop"]), ({"mirostat": 2}, ["mirostat"]),
     ({"frequency_penalty": 0.5}, ["frequency_penalty"]), ({"bogus": 1}, ["bogus"]),
     ({"temperature": float("nan")}, ["temperature"])],
)  # fmt: skip
def test_invalid_options_are_400_naming_the_option(options, words):
    refused(parse_ollama_generate, {"model": "m", "prompt": "x", "options": options}, *words)


def test_neutral_values_of_missing_samplers_pass():
    o = parse_ollama_options({"mirostat": 0, "typical_p": 1.0, "presence_penalty": 0})
    assert o.max_tokens is None


@pytest.mark.parametrize(
    "body,word",
    [({"prompt": "x"}, "model"), ({"model": 3, "prompt": "x"}, "model"),
     ({"model": "m", "prompt": 3}, "prompt"), ({"model": "m", "prompt": "x", "stream": "yes"},
     "stream"), ({"model": "m", "prompt": "x", "raw": 1}, "raw"),
     ({"model": "m", "prompt": "x", "options": [1]}, "options"),
     ({"model": "m", "prompt": "x", "keep_alive": "soon"}, "keep_alive")],
)  # fmt: skip
def test_wrong_types_are_400(body, word):
    refused(parse_ollama_generate, body, word)


def test_chat_messages_and_their_checks():
    call = parse_ollama_chat({**CHAT, "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}]})  # fmt: skip
    assert call.request.messages == (
        Message("system", "S"), Message("user", "U"), Message("assistant", "A"),
        Message("user", "U2"),
    )  # fmt: skip
    refused(parse_ollama_chat, {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "role")
    calls = [{"function": {"name": "f", "arguments": {}}}]
    refused(
        parse_ollama_chat,
        {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": calls}]},
        "tool_calls",
    )
    refused(parse_ollama_chat, {**CHAT, "messages": [{"role": "user", "content": 5}]}, "content")
    refused(parse_ollama_chat, {**CHAT, "messages": [{"role": "user", "content": "x",
                                                      "images": ["aGk="]}]}, "images")  # fmt: skip
    refused(parse_ollama_chat, {**CHAT, "messages": "hi"}, "messages")


@pytest.mark.parametrize(
    "value,seconds",
    [(None, None), (0, 0.0), (300, 300.0), (-1, -1.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("10s", 10.0), ("250ms", 0.25), ("-1", -1.0), ("-5m", -1.0), ("30", 30.0)],
)  # fmt: skip
def test_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 m", "5x", "nan", "inf", True, [], {}])
def test_keep_alive_refused(value):
    with pytest.raises(ApiError):
        parse_keep_alive(value)


def test_openai_chat():
    call = parse_openai_chat({
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "D"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "temperature": 0, "top_p": 0.9, "seed": 1, "max_tokens": 9, "stop": "END", "n": 1,
        "presence_penalty": 0, "response_format": {"type": "text"}, "user": "me",
    })  # fmt: skip
    r = call.request
    assert call.stream and call.include_usage
    assert r.messages == (Message("system", "D"), Message("user", "ab"))
    assert (r.max_tokens, r.stop, r.options.temperature, r.options.seed) == (9, ("END",), 0, 1)
    assert parse_openai_chat({**CHAT, "max_completion_tokens": 3}).request.max_tokens == 3


@pytest.mark.parametrize(
    "extra,word",
    [({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"),
     ({"response_format": {"type": "json_schema"}}, "response_format"),
     ({"frequency_penalty": 1}, "frequency_penalty"), ({"logprobs": 1}, "logprobs"),
     ({"max_tokens": -1}, "max_tokens"), ({"temperature": "x"}, "temperature"),
     ({"messages": []}, "messages"),
     ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url")],
)  # fmt: skip
def test_openai_chat_refusals(extra, word):
    refused(parse_openai_chat, {**CHAT, **extra}, word)


def test_openai_completion_is_templated_as_ollama_does():
    call = parse_openai_completion({"model": "m", "prompt": ["Once upon"], "max_tokens": 5})
    assert not call.request.raw and call.request.prompt == "Once upon"
    assert call.request.max_tokens == 5 and not call.stream
    refused(parse_openai_completion, {"model": "m", "prompt": ["a", "b"]}, "prompt")
    refused(parse_openai_completion, {"model": "m", "prompt": "a", "echo": 1}, "echo")
    refused(parse_openai_completion, {"model": "m", "prompt": "a", "suffix": "z"}, "suffix")
