"""Load: 32 concurrent requests, half through the HTTP API of node0 and half through the llm
plugin to node1 (two coordinators sharing the same stages), three rounds on a 2-node cluster.

Every answer must be the text the same prompt gets alone; afterwards no sequence is left
anywhere (pipelines, KV caches, samplers, queued generations) and resident memory is back
near where it was after the first, sequential round.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llm
import ollama
import pytest
from support.shim_cluster import ShimCluster, leftovers

from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.client import ShimClient

pytestmark = [pytest.mark.model, pytest.mark.cluster]

N = 8
PROMPTS = [
    "Name a fruit.",
    "Write a haiku about snow.",
    "What is 2 + 2?",
    "Give me a word that rhymes with cat.",
]
ROUNDS = 3
CONCURRENT = 32


def _status(cluster: ShimCluster, i: int) -> dict:
    with ShimClient("127.0.0.1", cluster.ports[i]) as client:
        return client.request("status")


def _wait_idle(cluster: ShimCluster) -> list[dict]:
    """Both nodes' status once nothing is left running (frees are asynchronous)."""
    for _ in range(300):
        statuses = [_status(cluster, i) for i in range(2)]
        if not any(any(leftovers(s).values()) for s in statuses):
            return statuses
        time.sleep(0.1)
    raise AssertionError(f"sequences left behind: {[leftovers(s) for s in statuses]}")


def test_32_concurrent_requests_three_rounds(tmp_path: Path, smollm2_path: Path, monkeypatch):
    with ShimCluster(tmp_path, 2) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        for key, value in cluster.env(0).items():  # the plugin, in this process, as node0's
            monkeypatch.setenv(key, value)  # member, talking to node1
        monkeypatch.setenv("OMNI_SHIM", f"127.0.0.1:{cluster.ports[1]}")
        plugin = llm.get_model("omni/smollm2")
        http = ollama.Client(host=cluster.api_url(0), timeout=600)

        def by_http(prompt: str) -> str:
            options = {"temperature": 0, "num_predict": N}
            return http.generate(model="smollm2", prompt=prompt, options=options).response

        def by_plugin(prompt: str) -> str:
            return plugin.prompt(prompt, temperature=0, max_tokens=N).text()

        want = {p: by_http(p) for p in PROMPTS}  # alone, one after the other
        assert {p: by_plugin(p) for p in PROMPTS} == want
        baseline = [s["rss"] for s in _wait_idle(cluster)]

        jobs = [(by_http if k % 2 else by_plugin, PROMPTS[k % len(PROMPTS)])
                for k in range(CONCURRENT)]  # fmt: skip
        for k in range(ROUNDS):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENT) as pool:
                answers = list(pool.map(lambda job: job[0](job[1]), jobs))
            print(f"round {k}: {CONCURRENT} requests in {time.perf_counter() - t0:.1f} s")
            assert answers == [want[p] for _, p in jobs]
            statuses = _wait_idle(cluster)
        after = [s["rss"] for s in statuses]
        assert all(h["parked"] <= 4 for s in statuses for h in s["hosted"])
        pairs = list(zip(baseline, after, strict=True))
        print("resident MiB after the first round / after the last:",
              [(b >> 20, a >> 20) for b, a in pairs])  # fmt: skip
        for before, now in pairs:
            assert now <= before * 1.25 + (64 << 20), (before >> 20, now >> 20)
