"""Tool calling end to end on Qwen2.5-Coder-0.5B: one real shim (module-scoped), driven by the
``ollama`` and ``openai`` clients, langchain's ChatOllama and the ``llm`` CLI with a tool.

Greedy decoding, and every first turn asks the same question, so the shim's parked prefix
spares most prompts' prefill. Asked for the weather with a weather tool at hand, this model
answers with a call (a fenced JSON object, which the Hermes parser takes as llama.cpp's does).
"""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import openai
import pytest
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.large_model, pytest.mark.cluster]

QUESTION = "What is the weather in Paris today?"
GREEDY = {"temperature": 0, "num_predict": 48}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
        city: The city
    """
    return "22 degrees and sunny"


@pytest.fixture(scope="module")
def cluster(qwen2_path: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    with ShimCluster(root, 1, max_memory="3GiB") as c:
        ModelRegistry(c.dirs[0]).add_file(qwen2_path, alias="qwen")
        c.start_all()
        yield c


@pytest.fixture(scope="module")
def url(cluster: ShimCluster) -> str:
    return cluster.api_url(0)


def test_ollama_client_calls_and_reads_the_result(url: str):
    client = ollama.Client(host=url)
    assert "tools" in client.show("qwen").capabilities
    messages: list = [{"role": "user", "content": QUESTION}]
    reply = client.chat(model="qwen", messages=messages, tools=[WEATHER], options=GREEDY)
    (call,) = reply.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    # streamed: the call arrives whole in one line
    chunks = list(client.chat(model="qwen", messages=messages, tools=[get_weather],
                              options=GREEDY, stream=True))  # fmt: skip
    calls = [c.message.tool_calls for c in chunks if c.message.tool_calls]
    assert [[t.function.name for t in cs] for cs in calls] == [["get_weather"]]
    assert chunks[-1].done
    # the call and its result go back in the history (this small model then calls again,
    # greedily, rather than answer: what it reads is checked by the prompt's growth)
    messages += [reply.message, {"role": "tool", "content": get_weather("Paris"),
                                 "tool_name": "get_weather"}]  # fmt: skip
    again = client.chat(model="qwen", messages=messages, tools=[WEATHER],
                        options={"temperature": 0, "num_predict": 4})  # fmt: skip
    # the call and the result take some 45 tokens as the template writes them
    assert again.prompt_eval_count > reply.prompt_eval_count + 30


def test_openai_client_tools_and_tool_choice(url: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUESTION}]
    done = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER],
                                          temperature=0, max_tokens=48)  # fmt: skip
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # a named function, streamed: the call starts in the prompt, the deltas add up to it
    forced = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER],
                                            tool_choice=forced, temperature=0, max_tokens=24,
                                            stream=True)  # fmt: skip
    name, arguments, finish = "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or ():
            name += part.function.name or ""
            arguments += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    # required, where the model would not call: the grammar makes the answer a valid call
    hello = [{"role": "user", "content": "Say hello."}]
    done = client.chat.completions.create(model="qwen", messages=hello, tools=[WEATHER],
                                          tool_choice="required", temperature=0,
                                          max_tokens=32)  # fmt: skip
    (call,) = done.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and type(arguments.get("city")) is str
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="qwen", messages=messages, tools=[
            {"type": "function", "function": {"name": "bad name!"}}])  # fmt: skip


def test_langchain_bind_tools(url: str):
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model="qwen", base_url=url, temperature=0, num_predict=48)
    message = chat.bind_tools([get_weather]).invoke(QUESTION)
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}


def test_llm_cli_runs_a_tool(cluster: ShimCluster):
    """The model calls the tool, llm runs it (--td shows the call on stderr) and sends the
    result back; the model's next turn reads it (here it echoes it)."""
    code = "def get_weather(city: str) -> str:\n    return '22 degrees and sunny'\n"
    greedy = ["-o", "temperature", "0", "-o", "max_tokens", "48"]
    done = cluster.run([*LLM, "-m", "omni/qwen", QUESTION, "--functions", code, "--td",
                        "--no-log", *greedy])  # fmt: skip
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr
    assert "Tool call: get_weather({'city': 'Paris'})" in done.stderr
    assert "22 degrees and sunny" in done.stdout
