"""A GGUF whose chat template reaches for Python internals is served by a real shim: every
escape attempt is a 400 with a clear error on the HTTP API, nothing runs, and the shim keeps
serving (the same model raw, and a model with an honest template).

Each hostile template would run ``touch <tmp>/PWNED-<n>`` if it escaped the sandbox
(backend/chat_template.py); the test checks that no such file appears.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.shim_cluster import ShimCluster
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.registry import ModelRegistry

pytestmark = pytest.mark.cluster  # starts omni-shim processes

ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {pwned}').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {pwned}') }}",
    "{{ joiner.__init__.__globals__['os'].system('touch {pwned}') }}",
    "{{ namespace.__init__.__globals__.os.system('touch {pwned}') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c('touch {pwned}', shell=True) }}{% endif %}{% endfor %}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ messages[0].__class__ }}{{ messages.pop() }}",
    "{{ messages.append(messages) }}{{ messages[0].update({'role': 'system'}) }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {pwned}') }}",
]


def _post(url: str, path: str, doc: dict) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read().split(b"\n")[0])
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    pwned = [root / f"PWNED-{n}" for n in range(len(ESCAPES))]
    with ShimCluster(root, 1, max_memory="1GiB") as cluster:
        registry = ModelRegistry(cluster.dirs[0])
        for n, template in enumerate(ESCAPES):
            source = template.replace("{pwned}", str(pwned[n]))
            path = write_tiny_llama(root / f"evil{n}.gguf", chat_template=source, seed=n)
            registry.add_file(path, alias=f"evil{n}")
        registry.add_file(write_tiny_llama(root / "honest.gguf", seed=99), alias="honest")
        cluster.start(0)
        yield cluster, pwned


@pytest.mark.parametrize("n", range(len(ESCAPES)))
def test_template_escape_is_refused_over_http(served, n: int):
    cluster, pwned = served
    url = cluster.api_url(0)
    chat = {"model": f"evil{n}", "messages": [{"role": "user", "content": "hi"}],
            "stream": False, "options": {"num_predict": 1}}  # fmt: skip
    status, body = _post(url, "/api/chat", chat)
    assert status == 400, (status, body)
    assert "chat template" in body["error"] and "unsafe" in body["error"], body
    status, body = _post(url, "/v1/chat/completions", {**chat, "max_tokens": 1})
    assert status == 400 and "chat template" in body["error"]["message"], body
    assert not Path(pwned[n]).exists()
    assert cluster.procs[0].poll() is None, cluster.log(0)
    # the same model still serves a raw prompt (no template), and an honest model chats
    status, body = _post(url, "/api/generate", {"model": f"evil{n}", "prompt": "hi",
                                                "raw": True, "stream": False,
                                                "options": {"num_predict": 1}})  # fmt: skip
    assert status == 200 and body["done"], body
    status, body = _post(url, "/api/chat", {**chat, "model": "honest"})
    assert status == 200 and body["done"], body
