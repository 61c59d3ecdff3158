"""Structured output end to end: real shims, real clients, every answer checked with jsonschema.

Two shims (module-scoped): node0 holds SmolLM2 (and qwen2.5-coder-0.5b where it is pulled) and
runs every stage; node1 may hold nothing (--max-memory 1MiB), so a request sent to node1 is
coordinated there and its constraint crosses the network to node0's last stage, while one sent
to node0 finds the last stage in its own process. The schemas go half to each.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import ollama
import openai
import pydantic
import pytest
from conftest import find_pulled
from langchain_ollama import ChatOllama
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.constraint import MAX_DEPTH, Constraint
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.local_model import LocalModel
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.cluster]

GREEDY = {"temperature": 0, "num_predict": 160}


def obj(required: list[str] | None = None, **properties) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties)}


WORD = {"type": "string", "maxLength": 24}
POINT = obj(x={"type": "number"}, y={"type": "number"})
REF = {"$ref": "#/$defs/point"}


def ints(lo: int, hi: int | None = None) -> dict:
    return {"type": "integer", "minimum": lo, **({} if hi is None else {"maximum": hi})}


def array(items: dict, lo: int = 0, hi: int | None = None) -> dict:
    return {
        "type": "array",
        "items": items,
        "minItems": lo,
        **({} if hi is None else {"maxItems": hi}),
    }


SCHEMAS: list[tuple[str, dict]] = [
    ("A person", obj(name=WORD, age=ints(0, 120))),
    ("The colour of the sky", obj(color={"enum": ["red", "green", "blue"]})),
    ("Is an apple a fruit?", obj(is_fruit={"type": "boolean"})),
    ("Today's temperature in Paris", obj(celsius={"type": "number", "minimum": -50,
                                                  "maximum": 60})),
    ("Some fruits", obj(fruits=array(WORD, 2, 3))),
    ("An address", obj(address=obj(street=WORD, city=WORD),
                       zip={"type": "string", "pattern": "^[0-9]{5}$"})),
    ("A shopping list", obj(items=array(obj(name=WORD, qty=ints(1, 10)), 1, 3))),
    ("A film", obj(["title"], title=WORD, year=ints(1900, 2030))),
    ("A flight code", obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"})),
    ("Will it rain tomorrow?", {"enum": ["yes", "no", "maybe"]}),
    ("A number from one to ten", ints(1, 10)),
    ("Three small numbers", array(ints(0, 99), 3, 3)),
    ("A cat", obj(name=WORD, nickname={"type": ["string", "null"], "maxLength": 24})),
    ("How many legs has a spider?", obj(answer={"anyOf": [{"type": "integer"}, WORD]})),
    ("A line segment", {"$defs": {"point": POINT}, **obj(start=REF, end=REF)}),
    ("A config file", obj(version={"const": 2}, debug={"type": "boolean"})),
    ("A probability", obj(p={"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1})),
    ("A 2x2 matrix", obj(rows=array(array({"type": "integer"}, 2, 2), 2, 2))),
    ("A book", obj(["title", "pages"], title=WORD, pages=ints(1), available={"type": "boolean"},
                   tags=array(WORD, 0, 3))),
    ("A word of three to eight letters", obj(word={"type": "string", "minLength": 3,
                                                   "maxLength": 8, "pattern": "^[a-z]+$"})),
    ("A planet", {**obj(name=WORD), "additionalProperties": False}),
    ("Two teams and a score", obj(home=WORD, away=WORD,
                                  score=obj(home=ints(0, 20), away=ints(0, 20)))),
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(smollm2_path: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    with ShimCluster(root, 2, extra_args=["--max-context", "1024"]) as c:
        registry = ModelRegistry(c.dirs[0])
        registry.add_file(smollm2_path, alias="smollm2")
        qwen = find_pulled("qwen2.5-coder-0.5b", "OMNI_TEST_QWEN2")
        if qwen is not None:
            registry.add_file(qwen, alias="qwen")
        c.start(0, args=["--threads", "2"])  # node1 computes nothing
        c.start(1, args=["--max-memory", "1MiB"])  # holds nothing: coordinates only
        c.wait_for_peers(2, i=1)
        yield c


def ask(url: str, model: str, task: str, schema: dict) -> tuple[str, str]:
    """(the answer's text, done_reason) of a greedy chat constrained to ``schema``."""
    prompt = f"{task}, in JSON."  # short: the schema itself is what holds the answer to it
    reply = ollama.Client(host=url).chat(
        model=model, messages=[{"role": "user", "content": prompt}], format=schema,
        options=GREEDY,
    )  # fmt: skip
    return reply.message.content, reply.done_reason


def check_all(cluster: ShimCluster, model: str) -> None:
    urls = [cluster.api_url(0), cluster.api_url(1)]
    # each coordinator runs 4 at once: node0's stage decodes 8 sequences as one batch
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(urls[i % 2], model, *SCHEMAS[i]),
                                range(len(SCHEMAS))))  # fmt: skip
    for (task, schema), (text, reason) in zip(SCHEMAS, answers, strict=True):
        assert reason == "stop", (task, text)  # the grammar ended it, not the token limit
        jsonschema.validate(json.loads(text), schema)


def test_twenty_schemas_on_smollm2(cluster: ShimCluster):
    check_all(cluster, "smollm2")


def test_twenty_schemas_on_qwen(cluster: ShimCluster, qwen2_path: Path):
    check_all(cluster, "qwen")


def test_any_json_and_the_single_node_path_agree(cluster: ShimCluster, smollm2_path, tmp_path):
    client = ollama.Client(host=cluster.api_url(0))
    question = "Is an apple a fruit? Answer in JSON."
    reply = client.generate(model="smollm2", prompt=question, format="json", options=GREEDY)
    assert isinstance(json.loads(reply.response), dict) and reply.done_reason == "stop"
    # LocalModel (one process, no shim) follows a schema to the same greedy answer
    registry = ModelRegistry(tmp_path)
    registry.add_file(smollm2_path, alias="smollm2")
    schema = SCHEMAS[2][1]  # a short answer
    shim = client.chat(model="smollm2", messages=[{"role": "user", "content": question}],
                       format=schema, options=GREEDY)  # fmt: skip
    request = GenerationRequest(
        model="smollm2", messages=(Message("user", question),), max_tokens=160,
        options=SamplingOptions().updated(temperature=0.0),
        constraint=Constraint.json_schema(schema),
    )  # fmt: skip
    local = "".join(c.text for c in LocalModel.load(registry, "smollm2").run(request))
    assert local == shim.message.content
    jsonschema.validate(json.loads(local), schema)


def test_openai_response_format(cluster: ShimCluster):
    client = openai.OpenAI(base_url=f"{cluster.api_url(1)}/v1", api_key="-")
    schema = SCHEMAS[0][1]
    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Invent a person."}],
        temperature=0, max_tokens=160,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    assert chat.choices[0].finish_reason == "stop"
    loose = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "A JSON object, please."}],
        temperature=0, max_tokens=160, response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(loose.choices[0].message.content), dict)

    class City(pydantic.BaseModel):  # the client's own schema, and its own parsing
        name: str = pydantic.Field(max_length=24)
        population: int = pydantic.Field(ge=0)

    parsed = client.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris."}],
        temperature=0, max_tokens=160, response_format=City,
    )  # fmt: skip
    assert isinstance(parsed.choices[0].message.parsed, City)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n"}},
        )  # fmt: skip


def test_langchain_with_structured_output(cluster: ShimCluster):
    class Movie(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=24, description="the film's title")
        year: int = pydantic.Field(ge=1900, le=2030)

    llm = ChatOllama(model="smollm2", base_url=cluster.api_url(0), temperature=0,
                     num_predict=160)  # fmt: skip
    movie = llm.with_structured_output(Movie, method="json_schema").invoke("Name a famous film.")
    assert isinstance(movie, Movie)


def test_llm_schema(cluster: ShimCluster):
    out = cluster.llm("-m", "omni/smollm2", "--schema", "name, age int", "Invent a person.",
                      "-o", "temperature", "0", "-o", "max_tokens", "160", "--no-log")  # fmt: skip
    doc = json.loads(out)
    assert isinstance(doc["name"], str) and isinstance(doc["age"], int)
    bad = cluster.run([*LLM, "-m", "omni/smollm2", "--schema", '{"type": "foo"}', "x", "--no-log"])
    assert bad.returncode != 0 and "foo" in bad.stderr, bad.stderr


def test_bad_schemas_get_400_and_a_reason(cluster: ShimCluster):
    client = ollama.Client(host=cluster.api_url(1))
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    messages = [{"role": "user", "content": "x"}]
    for fmt, words in (({"type": "foo"}, "foo"), ({"not": {}}, "not"), (deep, "deeper"),
                       ({"enum": ["x" * 100] * 200}, "bytes")):  # fmt: skip
        with pytest.raises(ollama.ResponseError) as info:
            client.chat(model="smollm2", messages=messages, format=fmt)
        assert info.value.status_code == 400 and words in info.value.error, info.value.error
    # what the client would not send
    body = json.dumps({"model": "smollm2", "messages": messages, "format": "xml"}).encode()
    request = urllib.request.Request(f"{cluster.api_url(0)}/api/chat", data=body)
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=60)
    assert http_error.value.code == 400
    assert '"json" or a JSON schema' in json.loads(http_error.value.read())["error"]
