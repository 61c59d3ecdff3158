"""Chat templates: HF-compatible rendering, golden SmolLM2 prompts, and the sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.tiny_model import CHATML, tiny_vocab

from llm_omninode.backend.chat_template import (
    MAX_OUTPUT,
    ChatTemplate,
    ChatTemplateError,
)
from llm_omninode.backend.tokenizer import Tokenizer

# tokenizer.chat_template of SmolLM2-135M-Instruct, verbatim, so the golden check runs without
# the model file too (test_smollm2_file_template checks it against the file when present)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2-llamacpp.json").read_text())
USER = [{"role": "user", "content": "hi"}]


def test_golden_prompts() -> None:
    tmpl = ChatTemplate(SMOLLM2_TEMPLATE)
    for chat in GOLDEN["chat"]:
        assert tmpl.render(chat["messages"]) == chat["prompt"]


def test_smollm2_file_template(smollm2_path: Path) -> None:
    from test_tokenizer import read_metadata

    md = read_metadata(smollm2_path)
    assert md["tokenizer.chat_template"] == SMOLLM2_TEMPLATE
    tok = Tokenizer.from_metadata(md)
    tmpl = ChatTemplate.from_metadata(md, tok)
    assert not tmpl.is_fallback
    assert (tmpl.bos_token, tmpl.eos_token) == ("<|im_start|>", "<|im_end|>")
    for chat in GOLDEN["chat"]:
        prompt = tmpl.render(chat["messages"])
        assert prompt == chat["prompt"]
        assert tok.encode(prompt, parse_special=True) == chat["prompt_ids"]


def test_no_generation_prompt() -> None:
    out = ChatTemplate(SMOLLM2_TEMPLATE).render(USER, add_generation_prompt=False)
    assert out.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_hf_environment_features() -> None:
    src = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}\n"
        "  {% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{% generation %}[{{ eos_token }}]{% endgeneration %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tmpl = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    out = tmpl.render(
        [{"role": "user", "content": "héllo"}, {"role": "x", "content": "y"}],
        tools=[{"name": "f"}],
    )
    # tojson keeps non-ASCII; lstrip_blocks removed the indentation before {% if %}
    # trim_blocks ate the newline after endfor, lstrip_blocks the indentation before {% if %}
    assert out == '<s>{"role": "user", "content": "héllo"}[\n  {\n    "name": "f"\n  }\n][</s>]4'
    assert tmpl.render(USER) == '<s>{"role": "user", "content": "hi"}[</s>]4'


def test_trim_blocks() -> None:
    src = "{% for m in messages %}\n{{ m.content }}\n{% endfor %}\n"
    assert ChatTemplate(src).render(USER + USER) == "hi\nhi\n"


def test_raise_exception() -> None:
    src = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="need a system"):
        ChatTemplate(src).render(USER)


def test_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="syntax"):
        ChatTemplate("{% for m in messages %}{{ m }")


def test_runtime_error_is_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(USER)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ 1 / 0 }}").render(USER)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__['os'] }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ raise_exception.__code__.co_consts }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{{ range.__class__ }}",
        "{{ (messages | first).__class__.__base__ }}",
        "{{ messages[0]['__class__'] }}",
        "{{ self.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages.pop() }}",
        "{% set x = messages.__iter__ %}{{ x }}",
        "{{ lipsum.__globals__ }}",
        "{{ ''.format.__self__ }}",
        "{{ '{0.__class__}'.format('') }}",
    ],
)
def test_python_internals_are_refused(source: str) -> None:
    tmpl = ChatTemplate(source)
    with pytest.raises(ChatTemplateError):
        tmpl.render(USER)


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 100000000 }}",
        "{{ [1, 2] * 100000000 }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ 'x' | indent(1000000000) }}",
        "{{ '%999999999d' % 1 }}",
        "{{ '%*d' % (999999999, 1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ 9 ** 9999999 }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "{% for i in range(9999) %}{{ 'y' * 1000 }}{% endfor %}",
        "{% for i in range(1000000) %}{% endfor %}",
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "{{ ('a' * 1000) | replace('', 'b' * 10000) }}",
        "{{ ('a' * 1000).replace('', 'b' * 10000) }}",
    ],
)
def test_template_bombs_fail_fast(source: str) -> None:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render(USER)
    assert time.monotonic() - start < 5


def test_silent_loops_hit_the_deadline() -> None:
    src = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="too long"):
        ChatTemplate(src, timeout=0.5).render(USER)
    assert time.monotonic() - start < 3


def test_output_cap() -> None:
    big = [{"role": "user", "content": "z" * (MAX_OUTPUT // 2)}] * 3
    with pytest.raises(ChatTemplateError, match="exceeds"):
        ChatTemplate(CHATML).render(big)
    ok = [{"role": "user", "content": "z" * 1000}]
    assert len(ChatTemplate(CHATML).render(ok)) > 1000


def test_fallback_chatml() -> None:
    tmpl = ChatTemplate(None)
    assert tmpl.is_fallback
    assert tmpl.render(USER) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_from_metadata_fallbacks() -> None:
    tokens, types, merges = tiny_vocab()  # has <|im_start|> / <|im_end|>
    md = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.eos_token_id": 2}
    tmpl = ChatTemplate.from_metadata(md)
    assert tmpl.is_fallback and tmpl.eos_token == "<|im_end|>"
    assert tmpl.render(USER).startswith("<|im_start|>user\n")
    # a vocabulary without ChatML tokens gets a plain transcript
    plain = ChatTemplate.from_metadata({"tokenizer.ggml.tokens": ["<s>", "</s>", "a"]})
    assert plain.is_fallback
    assert plain.render(USER) == "user: hi\n\nassistant:"
    assert plain.render(USER, add_generation_prompt=False) == "user: hi\n\n"


def test_from_metadata_uses_file_template() -> None:
    tokens, types, merges = tiny_vocab()
    md = {
        "tokenizer.chat_template": "{{ bos_token }}|{{ eos_token }}|{{ messages | length }}",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert ChatTemplate.from_metadata(md).render(USER) == "<|im_start|>|<|im_end|>|1"
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_metadata({"tokenizer.chat_template": 5})


# Qwen2.5's template (tools branch included): renders the golden Qwen prompts exactly and
# exercises tojson, loop.index0 lookbehind, `is defined` and attribute-style access.
QWEN = "\n".join(
    [
        "{%- if tools %}",
        "    {{- '<|im_start|>system\\n' }}",
        "    {%- if messages[0]['role'] == 'system' %}",
        "        {{- messages[0]['content'] }}",
        "    {%- else %}",
        "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}",
        "    {%- endif %}",
        '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with t'
        "he user query.\\n\\nYou are provided with function signatures within <tools></t"
        'ools> XML tags:\\n<tools>" }}',
        "    {%- for tool in tools %}",
        '        {{- "\\n" }}',
        "        {{- tool | tojson }}",
        "    {%- endfor %}",
        '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with fun'
        "ction name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>"
        '\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_'
        'call><|im_end|>\\n" }}',
        "{%- else %}",
        "    {%- if messages[0]['role'] == 'system' %}",
        "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}",
        "    {%- else %}",
        "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You a"
        "re a helpful assistant.<|im_end|>\\n' }}",
        "    {%- endif %}",
        "{%- endif %}",
        "{%- for message in messages %}",
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.f'
        'irst) or (message.role == "assistant" and not message.tool_calls) %}',
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end"
        "|>' + '\\n' }}",
        '    {%- elif message.role == "assistant" %}',
        "        {{- '<|im_start|>' + message.role }}",
        "        {%- if message.content %}",
        "            {{- '\\n' + message.content }}",
        "        {%- endif %}",
        "        {%- for tool_call in message.tool_calls %}",
        "            {%- if tool_call.function is defined %}",
        "                {%- set tool_call = tool_call.function %}",
        "            {%- endif %}",
        '            {{- \'\\n<tool_call>\\n{"name": "\' }}',
        "            {{- tool_call.name }}",
        '            {{- \'", "arguments": \' }}',
        "            {{- tool_call.arguments | tojson }}",
        "            {{- '}\\n</tool_call>' }}",
        "        {%- endfor %}",
        "        {{- '<|im_end|>\\n' }}",
        '    {%- elif message.role == "tool" %}',
        '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}',
        "            {{- '<|im_start|>user' }}",
        "        {%- endif %}",
        "        {{- '\\n<tool_response>\\n' }}",
        "        {{- message.content }}",
        "        {{- '\\n</tool_response>' }}",
        '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
        "            {{- '<|im_end|>\\n' }}",
        "        {%- endif %}",
        "    {%- endif %}",
        "{%- endfor %}",
        "{%- if add_generation_prompt %}",
        "    {{- '<|im_start|>assistant\\n' }}",
        "{%- endif %}",
        "",
    ]
)


def test_qwen_golden_prompts_and_tools() -> None:
    golden = json.loads(
        (Path(__file__).parent / "data" / "qwen2.5-coder-0.5b-llamacpp.json").read_text()
    )
    tmpl = ChatTemplate(QWEN)
    for chat in golden["chat"]:
        assert tmpl.render(chat["messages"]) == chat["prompt"]
    out = tmpl.render(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
            },
            {"role": "tool", "content": "42"},
        ],
        tools=[{"type": "function", "function": {"name": "f"}}],
    )
    assert '{"type": "function", "function": {"name": "f"}}' in out
    assert '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>' in out
    assert out.endswith("<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
