"""Tool calling without a model: specs, the call syntax a template teaches, rendering with tools,
finding calls in replies (whole and streamed, junk included), and the bodies' tool fields."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omninode_shim.http.parse import ApiError, parse_ollama_chat, parse_openai_chat

from llm_omninode.backend.chat_template import ChatTemplate
from llm_omninode.backend.generate import Chunk, split_chunk
from llm_omninode.backend.tool_calls import (
    MAX_CALLS,
    ToolCall,
    ToolCallStream,
    ToolSpecError,
    call_constraint,
    call_schema,
    check_tools,
    forced_prefix,
    parse_calls,
    reply_prefix,
    reply_stream,
    tool_format,
    tool_variables,
)
from llm_omninode.request import GenerationRequest, Message, RequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
TOOLS = check_tools([WEATHER])

# Qwen2.5's template as its GGUF files carry it, cut to the parts about tools
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\nYou may call functions.\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nReturn calls in <tool_call></tool_call> tags.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response>"
    "<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# written like Llama 3.1's: one call an assistant turn, results as "ipython" turns
LLAMA3 = (
    "{%- for m in messages %}{%- if 'tool_calls' in m %}"
    "{%- set call = m.tool_calls[0].function %}<|start_header_id|>assistant<|end_header_id|>"
    '{{- \'{"name": "\' + call.name + \'", "parameters": \' }}{{- call.arguments | tojson }}'
    "{{- '}<|eot_id|>' }}{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>"
    "{{- m.content | trim }}<|eot_id|>{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "{{- m.content | trim }}{% if tools and loop.last %} Functions: "
    "{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}<|eot_id|>{%- endif %}{%- endfor %}"
    "<|start_header_id|>assistant<|end_header_id|>"
)
MISTRAL = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}[TOOL_CALLS]{% endif %}"
SMOLLM2 = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
)


def test_which_syntax_a_template_teaches():
    assert tool_format(QWEN) == "hermes"
    assert tool_format(LLAMA3) == "llama3"
    assert tool_format("{% if tools %}<|python_tag|>{% endif %}") == "llama3"
    assert tool_format(MISTRAL) == "mistral"
    assert tool_format(SMOLLM2) is None and tool_format(None) is None  # gemma3: no template


def request(**fields) -> GenerationRequest:
    return GenerationRequest(model="m", messages=(Message("user", "Weather in Paris?"),),
                             tools=TOOLS, **fields)  # fmt: skip


def test_rendering_with_tools_calls_and_results():
    history = (
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}, "call_1"),)),
        Message("tool", "22 C, sunny", tool_call_id="call_1", tool_name="get_weather"),
    )
    r = GenerationRequest(model="m", messages=history, tools=TOOLS)
    template = ChatTemplate(QWEN)
    text = template.render(r.chat_messages(), **tool_variables(template, r))
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text  # the spec, as tojson writes it
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in text and "<tool_response>\n22 C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # no tools, or tool_choice none: rendered without them
    plain = GenerationRequest(model="m", messages=history, tools=TOOLS, tool_choice="none")
    assert tool_variables(template, plain) == {} and reply_stream(template, plain) is None


def test_rendering_llama3_style():
    history = (
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}),)),
        Message("tool", " 22 C ", tool_name="get_weather"),
        Message("user", "And?"),
    )
    r = GenerationRequest(model="m", messages=history, tools=TOOLS)
    template = ChatTemplate(LLAMA3)
    text = template.render(r.chat_messages(), **tool_variables(template, r))
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "ipython<|end_header_id|>22 C<|eot_id|>" in text and '"get_weather"' in text
    assert parse_calls("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}')[1]


def test_a_model_without_tool_support_refuses_tools():
    for template in (ChatTemplate(SMOLLM2), ChatTemplate(None)):
        with pytest.raises(ToolSpecError, match="does not support tools"):
            tool_variables(template, request())
        assert tool_variables(template, request(tool_choice="none")) == {}


def test_forced_calls_are_begun_and_constrained():
    t = ChatTemplate(QWEN)
    assert reply_prefix(t, request()) == "" and call_constraint(t, request()) is None
    # the call's opening in the prompt, the call object constrained to the functions' schema
    forced = request(forced_tool="get_weather")
    assert reply_prefix(t, forced) == "<tool_call>\n"
    constraint = call_constraint(t, forced)
    assert constraint is not None and constraint.kind == "json_schema"
    schema = json.loads(constraint.source)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]
    stream = reply_stream(t, forced)  # the answer the grammar lets through, ended by it
    assert stream is not None
    assert [*stream.feed('{"name": "get_weather", "arguments": {"city": "Paris"}}'),
            *stream.finish()] == [ToolCall("get_weather", {"city": "Paris"})]  # fmt: skip
    two = check_tools([WEATHER, {"function": {"name": "now"}}])
    either = call_schema("hermes", two, None)
    assert [v["properties"]["name"]["const"] for v in either["anyOf"]] == ["get_weather", "now"]
    assert call_schema("mistral", two, "now")["type"] == "array"
    assert call_schema("llama3", two, "now")["required"] == ["name", "parameters"]
    # a schema the matcher cannot take: the call is only begun, further, in the prompt
    odd = check_tools([{"function": {"name": "f", "parameters": {"not": {"type": "string"}}}}])
    unconstrained = GenerationRequest(model="m", prompt="x", tools=odd, forced_tool="f")
    assert call_constraint(t, unconstrained) is None
    assert reply_prefix(t, unconstrained) == '<tool_call>\n{"name": "f", "arguments": '
    assert forced_prefix("llama3", "f") == '{"name": "f", "parameters": '
    assert forced_prefix("hermes", None) == '<tool_call>\n{"name": "'
    with pytest.raises(ValueError, match="not among"):
        request(forced_tool="nope")
    with pytest.raises(ValueError, match="no tools"):
        GenerationRequest(model="m", prompt="x", tool_choice="required")


@pytest.mark.parametrize(
    "fmt,text,content,calls",
    [
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "",
         [("f", {"a": 1})]),
        ("hermes", 'Sure.\n<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>\n'
         '<tool_call>{"name": "g"}</tool_call>', "Sure.\n", [("f", {"a": 2}), ("g", {})]),
        ("hermes", '```json\n{"name": "f", "arguments": {"a": 1}}\n```', "", [("f", {"a": 1})]),
        ("hermes", '{"name": "f", "arguments": {}}', "", [("f", {})]),
        ("hermes", "<tool_call>not json</tool_call> ok", "<tool_call>not json</tool_call> ok",
         []),
        ("hermes", '<tool_call>{"name": "f"}', "", [("f", {})]),  # cut off by the end token
        ("hermes", '<tool_call>{"name": "f"', '<tool_call>{"name": "f"', []),  # cut too soon
        ("hermes", "a <tool_ca", "a <tool_ca", []),
        ("hermes", '{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but no call
        ("hermes", "```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
        ("llama3", '{"name": "f", "parameters": {"a": 1}}', "", [("f", {"a": 1})]),
        ("llama3", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters":'
         ' {}}', "", [("f", {}), ("g", {})]),
        ("llama3", '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
        ("llama3", "The answer is {x}.", "The answer is {x}.", []),
        ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]', "",
         [("f", {"a": 1})]),
        ("mistral", "[TOOL_CALLS] nope", "[TOOL_CALLS] nope", []),
    ],
)  # fmt: skip
def test_calls_found_in_replies(fmt, text, content, calls):
    got_content, got = parse_calls(fmt, text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    # fed one character at a time, the same content and calls come out
    stream = ToolCallStream(fmt)
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert "".join(e for e in events if isinstance(e, str)) == content
    assert [e for e in events if isinstance(e, ToolCall)] == got


def test_content_streams_at_once_and_calls_come_whole():
    stream = ToolCallStream("hermes")
    assert stream.feed("Let me check. <tool") == ["Let me check. "]
    assert stream.feed('_call>\n{"name": "f", ') == []
    assert stream.feed('"arguments": {}}\n</tool_call>') == [ToolCall("f", {})]
    assert stream.finish() == []


def test_chunks_split_into_content_and_calls():
    stream, found = ToolCallStream("hermes"), []
    out = split_chunk(stream, Chunk('Hi <tool_call>{"name": "f"}', token_ids=(1, 2)), found)
    assert [c.text for c in out] == ["Hi "] and out[0].token_ids == (1, 2)
    out = split_chunk(stream, Chunk("</tool_call>", (3,)), found)
    assert out[0].tool_calls == (ToolCall("f", {}),)
    assert out[1] == Chunk("", token_ids=(3,))  # held text's ids still count
    done = Chunk("", done=True, done_reason="stop", prompt_tokens=5, completion_tokens=3)
    (last,) = split_chunk(stream, done, found)
    assert last.done and last.tool_calls == (ToolCall("f", {}),) and last.prompt_tokens == 5


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='<>/{}[]":,;`\n abtoolcalnmeprsgu_|TOOLS0123'), st.integers(1, 9))
def test_junk_never_raises_and_loses_nothing(text, step):
    for fmt in ("hermes", "llama3", "mistral"):
        stream = ToolCallStream(fmt)
        events = [e for i in range(0, len(text), step) for e in stream.feed(text[i : i + step])]
        events += stream.finish()
        if not any(isinstance(e, ToolCall) for e in events):  # no call: the text is all there
            assert "".join(e for e in events if isinstance(e, str)) == text


def test_many_calls_are_capped():
    text = '<tool_call>{"name": "f"}</tool_call>' * (MAX_CALLS + 5)
    assert len(parse_calls("hermes", text)[1]) == MAX_CALLS


def _deep(n: int) -> dict:
    doc: dict = {}
    for _ in range(n):
        doc = {"x": doc}
    return {"deep": doc}


@pytest.mark.parametrize(
    "tools,word",
    [("x", "list"), ([1], "tools[0]"), ([{"type": "retrieval"}], "type"),
     ([{"function": {"name": "a b"}}], "name"), ([{"function": {}}], "name"),
     ([WEATHER, WEATHER], "twice"), ([{"function": {"name": "f", "parameters": []}}], "schema"),
     ([{"function": {"name": "f", "description": 3}}], "description"),
     ([{"function": {"name": "f", "parameters": _deep(40)}}], "deeper"),
     ([{"function": {"name": f"f{i}"}} for i in range(200)], "at most"),
     ([{"function": {"name": "f", "description": "x" * 300_000}}], "bytes"),
     ([{"function": {"name": "f", "description": "\ud800"}}], "JSON")],
)  # fmt: skip
def test_bad_tool_specs_are_named(tools, word):
    with pytest.raises(ToolSpecError) as refused:
        check_tools(tools)
    assert word in str(refused.value)
    with pytest.raises(ApiError) as info:
        parse_ollama_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                           "tools": tools})  # fmt: skip
    assert info.value.status == 400 and word in info.value.message


def test_openai_bodies_with_tools():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "22 C"},
    ]  # fmt: skip
    body = {"model": "m", "messages": messages, "tools": [WEATHER]}
    r = parse_openai_chat({**body, "tool_choice": "auto"}).request
    assert r.tools == TOOLS and r.tool_choice == "auto"
    assert r.messages[1].tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "call_9"),)
    assert r.messages[2].tool_name == "get_weather"  # named from the call it answers
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = parse_openai_chat({**body, "tool_choice": choice}).request
    assert (r.tool_choice, r.forced_tool) == ("required", "get_weather")
    for bad, word in [("maybe", "tool_choice"), ({"function": {"name": "nope"}}, "not among"),
                      ({"type": "x"}, "tool_choice"), (3, "tool_choice")]:  # fmt: skip
        with pytest.raises(ApiError, match=word):
            parse_openai_chat({**body, "tool_choice": bad})
    with pytest.raises(ApiError, match="no tools"):
        parse_openai_chat({"model": "m", "messages": messages[:1], "tool_choice": "required"})
    with pytest.raises(ApiError, match="response_format"):
        parse_openai_chat({**body, "tool_choice": "required",
                           "response_format": {"type": "json_object"}})  # fmt: skip
    broken = [
        messages[0],
        {**messages[1], "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
    ]
    with pytest.raises(ApiError, match="JSON"):
        parse_openai_chat({"model": "m", "messages": broken})


def test_ollama_tool_messages():
    body = {"model": "m", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 C", "tool_name": "get_weather"}]}  # fmt: skip
    r = parse_ollama_chat(body).request
    assert r.messages[2] == Message("tool", "22 C", tool_name="get_weather")
    view = r.chat_messages()[1]["tool_calls"][0]
    function = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert view == {"type": "function", "function": function}


def test_the_wire_carries_tools_and_checks_them():
    r = GenerationRequest(
        model="m",
        messages=(Message("user", "x"), Message("assistant", "", (ToolCall("f", {"a": 1}, "c"),)),
                  Message("tool", "out", tool_name="f", tool_call_id="c")),
        tools=check_tools([{"function": {"name": "f"}}]), tool_choice="required",
    )  # fmt: skip
    assert GenerationRequest.from_wire(json.loads(json.dumps(r.to_wire()))) == r
    plain = GenerationRequest(model="m", prompt="x").to_wire()
    assert "tools" not in plain and "tool_choice" not in plain  # older shims still take it
    for patch, word in [
        ({"tools": [{"function": {"name": ""}}]}, "name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": 1}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x", "tool_name": "n" * 300}]}, "tool_name"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": 5}]}]}, "name"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}, "list"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0]"),
    ]:
        with pytest.raises(RequestError) as refused:
            GenerationRequest.from_wire({**r.to_wire(), **patch})
        assert word in str(refused.value)


def test_llm_prompt_chain_becomes_messages():
    import llm
    from llm.parts import Message as LlmMessage
    from llm.parts import TextPart, ToolCallPart, ToolResultPart

    from llm_omninode.llm_model import OmniModel
    from llm_omninode.llm_tools import request_messages, request_tools

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    model = OmniModel("qwen")
    chain = [
        LlmMessage("user", [TextPart("Weather in Paris?")]),
        LlmMessage("assistant", [ToolCallPart("get_weather", {"city": "Paris"}, "tc_1")]),
        LlmMessage("tool", [ToolResultPart("get_weather", "sunny", "tc_1")]),
    ]
    prompt = llm.Prompt(None, model, messages=chain, tools=[get_weather], system="Be brief")
    system, messages = request_messages(prompt)
    assert system == "Be brief"
    assert messages == (
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}, "tc_1"),)),
        Message("tool", "sunny", tool_name="get_weather", tool_call_id="tc_1"),
    )
    (spec,) = request_tools(prompt)
    assert spec["function"]["name"] == "get_weather"
    assert spec["function"]["parameters"]["properties"]["city"]["type"] == "string"
    built = model.build_request(prompt, None)
    assert built.tools == (spec,) and built.messages == messages


def test_the_pulled_models_templates(qwen2_path, gemma3_path, smollm2_path):
    """Qwen2.5-Coder's template takes tools (hermes); gemma3's file has no template and
    SmolLM2-135M's is plain ChatML: neither does."""
    from llm_omninode.backend.gguf import open_gguf

    def template(path) -> ChatTemplate:
        with open_gguf(path) as f:
            return ChatTemplate.from_metadata(f.metadata)

    qwen = template(qwen2_path)
    assert tool_format(qwen.source) == "hermes"
    r = GenerationRequest(
        model="q", tools=TOOLS, messages=(
            Message("user", "Weather in Paris?"),
            Message("assistant", "", (ToolCall("get_weather", {"city": "Paris"}),)),
            Message("tool", "22 C", tool_name="get_weather"),
        ),
    )  # fmt: skip
    text = qwen.render(r.chat_messages(), **tool_variables(qwen, r))
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\n22 C\n</tool_response><|im_end|>" in text
    for other in (template(gemma3_path), template(smollm2_path)):
        with pytest.raises(ToolSpecError, match="does not support tools"):
            tool_variables(other, r)
