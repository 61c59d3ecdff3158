"""Logprobs, echo and Ollama's context through real shims and real clients.

Two shims split SmolLM2 (prompts go round the ring in pieces of 16, so echo's scores come
back in several SCORES frames); the ``openai`` and ``ollama`` packages ask. Every number is
checked against the same engine run in process: the prompt's scores against a teacher-forced
pass over the same pieces, the answer's against a single-stage generation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest
from support.http_post import post
from support.shim_cluster import ShimCluster

from llm_omninode.backend.logprobs import score_rows
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.local_model import LocalModel
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.model, pytest.mark.cluster]

PIECE = 16  # OMNI_PREFILL_PIECE of the shims: a prompt goes in pieces of this many tokens
PASSAGE = (
    "The sea was calm that morning. Gulls circled the harbour while the fishermen mended "
    "their nets, and the smell of salt and tar hung over the quay."
)
QUESTION = "Name three colors."
N = 6
TOL = 2e-3  # same engine, same pieces: only threads may differ


@pytest.fixture(scope="module")
def local(smollm2_path: Path, tmp_path_factory) -> LocalModel:
    registry = ModelRegistry(tmp_path_factory.mktemp("ref"))
    registry.add_file(smollm2_path, alias="smollm2")
    return LocalModel.load(registry, "smollm2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path: Path):
    root = tmp_path_factory.mktemp("logprobs")
    env = {"OMNI_PREFILL_PIECE": str(PIECE)}
    with ShimCluster(root, 2, extra_env=env) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        yield cluster


@pytest.fixture(scope="module")
def oai(cluster: ShimCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.api_url(0) + "/v1", api_key="-", max_retries=0)


def _teacher(local: LocalModel, ids: list[int], k: int):
    """Every position's scores, computed in process over the shims' pieces."""
    stage = local.stages[0]
    rows = np.concatenate(
        [
            stage.forward("teacher", np.asarray(ids[s : s + PIECE], np.int32), all_logits=True)
            for s in range(0, len(ids), PIECE)
        ]
    )
    stage.free("teacher")
    return score_rows(rows[:-1], ids[1:], k)


def test_completions_echo_scores_the_passage_as_the_engine_does(oai, local: LocalModel):
    """/v1/completions with echo and logprobs (openai client): the passage, templated as one
    user turn as Ollama's /v1 does, comes back scored token by token with the engine's own
    numbers; the first token has none."""
    got = oai.completions.create(
        model="smollm2", prompt=PASSAGE, echo=True, logprobs=5, max_tokens=0, temperature=0
    )
    lp = got.choices[0].logprobs
    ids = local.prompt_ids(GenerationRequest(model="smollm2", prompt=PASSAGE))
    assert len(ids) > 2 * PIECE and len(lp.tokens) == len(ids) == got.usage.prompt_tokens
    text = b"".join(local.tokenizer.token_bytes(t) for t in ids).decode()
    assert got.choices[0].text == text and PASSAGE in text  # echo: what the model saw
    assert lp.tokens == [local.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ids]
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(text) - len(lp.tokens[-1])
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _teacher(local, ids, 5)
    assert np.allclose(lp.token_logprobs[1:], ref.logprobs[:, 0], atol=TOL, rtol=0)
    for row, ids_row, lps_row in zip(lp.top_logprobs[1:], ref.ids, ref.logprobs, strict=True):
        assert len(row) == 5
        best = local.tokenizer.token_bytes(int(ids_row[1])).decode("utf-8", "replace")
        assert math.isclose(row[best], float(lps_row[1]), abs_tol=TOL)


def test_completions_of_token_ids_and_their_limits(cluster, oai, local: LocalModel):
    """A prompt of token ids is fed as it is (echo gives them back, then the greedy answer);
    ids outside the vocabulary, logprobs out of range and bad echo are 400s."""
    ids = local.tokenizer.encode("The three primary colors are", add_special=False)
    got = oai.completions.create(
        model="smollm2", prompt=ids, echo=True, logprobs=2, max_tokens=3, temperature=0
    )
    lp = got.choices[0].logprobs
    n = len(ids)
    assert got.usage.prompt_tokens == n and len(lp.tokens) == n + got.usage.completion_tokens
    answer = local.run(GenerationRequest(model="smollm2", prompt_tokens=tuple(ids), raw=True,
                                         options=SamplingOptions().updated(temperature=0.0),
                                         max_tokens=3, logprobs=True))  # fmt: skip
    chunks = list(answer)
    assert got.choices[0].text.endswith("".join(c.text for c in chunks))
    # the raw logits' log-softmax: the repeat penalty changed the pick, not its logprob
    ref = [s.logprob for c in chunks for s in c.logprobs]
    assert np.allclose(lp.token_logprobs[n:], ref, atol=TOL, rtol=0)
    stream = list(oai.completions.create(model="smollm2", prompt=ids, echo=True, logprobs=2,
                                         max_tokens=3, temperature=0, stream=True))  # fmt: skip
    parts = [ev.choices[0] for ev in stream if ev.choices and ev.choices[0].logprobs]
    assert "".join(ev.choices[0].text for ev in stream if ev.choices) == got.choices[0].text
    assert [t for p in parts for t in p.logprobs.tokens] == lp.tokens
    assert [o for p in parts for o in p.logprobs.text_offset] == lp.text_offset
    url = cluster.api_url(0)
    vocab = local.tokenizer.vocab_size
    cases = [
        ({"prompt": [1, vocab]}, "vocabulary"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": [1, -2]}, "token ids"),
    ]
    for extra, words in cases:
        status, body = post(url, "/v1/completions", {"model": "smollm2", **extra})
        assert status == 400 and words in body["error"]["message"], (extra, body)


def test_chat_logprobs_with_the_openai_client(cluster, oai, local: LocalModel):
    """Chat ``logprobs`` + ``top_logprobs``: one entry per generated token, the same streamed
    or not, each the in-process engine's value; top_logprobs > 20, or without logprobs, 400."""
    messages = [{"role": "user", "content": QUESTION}]
    whole = oai.chat.completions.create(
        model="smollm2", messages=messages, logprobs=True, top_logprobs=3, max_tokens=N,
        temperature=0,
    )  # fmt: skip
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == N
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= c.top_logprobs[0].logprob
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
    stream = oai.chat.completions.create(
        model="smollm2", messages=messages, logprobs=True, top_logprobs=3, max_tokens=N,
        temperature=0, stream=True,
    )  # fmt: skip
    streamed = [c for ev in stream if ev.choices and ev.choices[0].logprobs
                for c in ev.choices[0].logprobs.content]  # fmt: skip
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    request = GenerationRequest(model="smollm2", messages=(Message("user", QUESTION),),
                                options=SamplingOptions().updated(temperature=0.0),
                                max_tokens=N, logprobs=True, top_logprobs=3)  # fmt: skip
    ref = [s for chunk in local.run(request) for s in chunk.logprobs]
    assert [list(local.tokenizer.token_bytes(s.token)) for s in ref] == [c.bytes for c in content]
    assert np.allclose([c.logprob for c in content], [s.logprob for s in ref], atol=TOL)
    plain = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    for extra, words in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"top_logprobs": 2}, "needs logprobs")]:  # fmt: skip
        status, body = post(cluster.api_url(0), "/v1/chat/completions",
                             {"model": "smollm2", "messages": messages, **extra})  # fmt: skip
        assert status == 400 and words in body["error"]["message"], body


def test_ollama_logprobs_with_the_ollama_client(cluster, local: LocalModel):
    """Ollama's ``logprobs`` / ``top_logprobs`` on /api/chat and /api/generate (>= 0.12 shape),
    streamed or not."""
    client = ollama.Client(host=cluster.api_url(0))
    options = {"temperature": 0, "num_predict": N}
    chat = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                       logprobs=True, top_logprobs=2, options=options)  # fmt: skip
    assert len(chat.logprobs) == chat.eval_count == N
    assert all(len(x.top_logprobs) == 2 and x.logprob <= x.top_logprobs[0].logprob
               for x in chat.logprobs)  # fmt: skip
    parts = list(client.generate(model="smollm2", prompt=QUESTION, logprobs=True,
                                 options=options, stream=True))  # fmt: skip
    streamed = [x for p in parts if p.logprobs for x in p.logprobs]
    assert [(x.token, x.logprob) for x in streamed] == [
        (x.token, x.logprob) for x in chat.logprobs
    ]  # the same prompt: /api/generate templates it as one user turn
    assert all(not x.top_logprobs for x in streamed)
    status, body = post(cluster.api_url(0), "/api/generate",
                         {"model": "smollm2", "prompt": "x", "logprobs": True,
                          "top_logprobs": 99})  # fmt: skip
    assert status == 400 and "top_logprobs" in body["error"]


def test_generate_context_round_trip(cluster, local: LocalModel):
    """/api/generate returns ``context`` (prompt and answer ids, not when raw); sent back, the
    next prompt continues it, as the in-process engine does with the same ids."""
    client = ollama.Client(host=cluster.api_url(0))
    options = {"temperature": 0, "num_predict": N}
    first = client.generate(model="smollm2", prompt="My name is Ada.", options=options)
    context = list(first.context)
    assert len(context) == first.prompt_eval_count + first.eval_count
    second = client.generate(model="smollm2", prompt="What is my name?", context=context,
                             options=options)  # fmt: skip
    greedy = SamplingOptions().updated(temperature=0.0)
    request = GenerationRequest(model="smollm2", prompt="What is my name?", options=greedy,
                                max_tokens=N, context=tuple(context))  # fmt: skip
    assert second.response == "".join(c.text for c in local.run(request))
    assert second.prompt_eval_count == len(local.prompt_ids(request)) > len(context)
    assert list(second.context[: len(context)]) == context
    raw = client.generate(model="smollm2", prompt="Hi", raw=True, options=options)
    assert raw.context is None
    vocab = local.tokenizer.vocab_size
    for doc, words in [({"context": [vocab]}, "vocabulary"), ({"context": "1 2"}, "context"),
                       ({"context": [1], "raw": True}, "raw")]:  # fmt: skip
        status, body = post(cluster.api_url(0), "/api/generate",
                             {"model": "smollm2", "prompt": "x", **doc})  # fmt: skip
        assert status == 400 and words in body["error"], (doc, body)
