"""A client that goes away costs nothing: on a real 2-node split, 100 streaming clients per
endpoint that drop at once (before the first byte, or after it), and plugin clients killed
mid-stream, leave no generation, pipeline, live KV cache, sampler or slot behind, and the next
request is answered. SIGTERM stops a node within 5 s whatever it is doing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import ollama
import pytest
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

DROPPED = 100
LONG = {"temperature": 0, "num_predict": 2000}
ROUTES = {
    "/api/chat": {"model": "smollm2", "stream": True, "options": LONG,
                  "messages": [{"role": "user", "content": "Tell me a very long story."}]},
    "/api/generate": {"model": "smollm2", "stream": True, "options": LONG,
                      "prompt": "Tell me a very long story."},
    "/v1/chat/completions": {"model": "smollm2", "stream": True, "max_tokens": 2000,
                             "messages": [{"role": "user", "content": "A long story, please."}]},
    "/v1/completions": {"model": "smollm2", "stream": True, "max_tokens": 2000,
                        "prompt": "Once upon a time"},
}  # fmt: skip


def _wait_clean(cluster: ShimCluster, bound: float) -> float:
    """Seconds until nothing is left on any node; AssertionError past ``bound``."""
    t0 = time.monotonic()
    while True:
        rows = [cluster.leftovers(i) for i in range(cluster.n)]
        if not any(any(r.values()) for r in rows):
            return time.monotonic() - t0
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"left behind after {bound} s: {rows}")
        time.sleep(0.1)


def _post(url: str, path: str, body: dict) -> bytes:
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _drop(url: str, request: bytes, read_first: bool) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        sock.sendall(request)
        if read_first:  # the response has started: the head and a first chunk
            sock.recv(4096)
    # closed here: before its first byte, queued behind the others, or mid-stream


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_path: Path):
    root = tmp_path_factory.mktemp("dropped")
    with ShimCluster(root, 2, extra_args=["--parallel", "4"]) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        saved = os.environ.get("OMNI_HOME")
        os.environ["OMNI_HOME"] = str(cluster.dirs[0])  # this process asks for status as node0
        try:
            yield cluster
        finally:
            if saved is None:
                os.environ.pop("OMNI_HOME", None)
            else:
                os.environ["OMNI_HOME"] = saved


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_hundred_streaming_clients_that_drop(cluster: ShimCluster, path: str):
    url = cluster.api_url(0)
    client = ollama.Client(host=url)
    client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1})  # loaded
    request = _post(url, path, ROUTES[path])
    threads = [
        threading.Thread(target=_drop, args=(url, request, i % 12 == 1)) for i in range(DROPPED)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = _wait_clean(cluster, bound=10.0)
    print(f"{path}: {DROPPED} dropped clients, nothing left after {took:.2f} s")
    answer = client.generate(model="smollm2", prompt="Name a fruit.",
                             options={"temperature": 0, "num_predict": 8})  # fmt: skip
    assert answer.done and answer.eval_count == 8


def test_plugin_clients_killed_mid_stream(cluster: ShimCluster):
    cluster.llm("-m", "omni/smollm2", "-o", "max_tokens", "1", "Hi")  # llm sets up its dir once
    procs = []
    for i in range(4):
        proc = subprocess.Popen(
            [*LLM, "-m", "omni/smollm2", "-o", "max_tokens", "2000", "--no-log", f"Story {i}:"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=cluster.env(0, OMNI_SHIM=f"127.0.0.1:{cluster.ports[i % 2]}"),  # both nodes
        )  # fmt: skip
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.read(1), proc.stderr.read() if proc.stderr else ""  # streaming
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    took = _wait_clean(cluster, bound=10.0)
    print(f"4 killed plugin clients: nothing left after {took:.2f} s")
    out = cluster.llm("-m", "omni/smollm2", "-o", "max_tokens", "4", "Hi")
    assert out.strip()


def test_sigterm_stops_a_busy_node_within_5_s(tmp_path: Path, smollm2_path: Path):
    with ShimCluster(tmp_path, 1) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        url = cluster.api_url(0)
        long_prompt = "word " * 1500  # a long prefill on the worker thread
        request = _post(url, "/api/generate", {"model": "smollm2", "prompt": long_prompt,
                                               "stream": True, "options": LONG})  # fmt: skip
        holders = [threading.Thread(target=_drop, args=(url, request, True)) for _ in range(6)]
        for t in holders:
            t.start()
        time.sleep(1.0)
        proc = cluster.procs[0]
        assert proc is not None and proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        print(f"SIGTERM to exit: {took:.2f} s")
        assert took <= 5.0, f"SIGTERM took {took:.1f} s"
        for t in holders:
            t.join()
        assert os.path.exists(cluster.logs[0])
