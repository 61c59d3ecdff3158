"""A node's /metrics text (shim/metrics.py): Prometheus's format, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from omninode_shim.metrics import Metrics, NodeGauges
from prometheus_client.parser import text_string_to_metric_families


def _families(m: Metrics) -> dict:
    text, content_type = m.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def _value(family, **labels) -> float:
    for s in family.samples:
        if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith(
            ("_created", "_bucket")
        ):
            return s.value
    raise KeyError(labels)


def test_counters_histograms_and_gauges_round_trip() -> None:
    m = Metrics()
    memory = {"budget": 2 << 30, "runtime": 80 << 20, "planned": 300 << 20, "rss": 1, "peak": 2}
    m.watch(NodeGauges(lambda: memory, lambda: 2, lambda: 1))
    m.requests.labels("smollm2", "ok").inc()
    m.tokens.labels("smollm2", "completion").inc(32)
    m.request_seconds.labels("smollm2").observe(1.5)
    m.step_seconds.labels("smollm2", "0-15").observe(0.004)
    m.failovers.inc()
    f = _families(m)
    assert _value(f["omni_requests"], model="smollm2", outcome="ok") == 1
    assert _value(f["omni_tokens"], model="smollm2", kind="completion") == 32
    hist = f["omni_request_seconds"]
    assert [s.value for s in hist.samples if s.name.endswith("_count")] == [1]
    assert [s.value for s in hist.samples if s.name.endswith("_sum")] == [1.5]
    step = f["omni_stage_step_seconds"]
    assert [s.value for s in step.samples if s.name.endswith("_sum")] == [0.004]
    assert _value(f["omni_memory_bytes"], kind="planned") == 300 << 20
    assert _value(f["omni_live_peers"]) == 2 and _value(f["omni_generations"]) == 1
    assert _value(f["omni_failovers"]) == 1


def test_each_node_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.failovers.inc()
    assert _value(_families(b)["omni_failovers"]) == 0


@pytest.mark.cluster
def test_a_shim_serves_its_metrics(tmp_path: Path, smollm2_path: Path) -> None:
    """Two shims: after a generation coordinated by node0 over its HTTP API, node0's /metrics
    counts the request and its tokens, its first-token and request times, the steps of the
    stage it hosts, the shard bytes node1 fetched show on node1, and memory is reported."""
    import ollama
    from support.shim_cluster import ShimCluster

    from llm_omninode.backend.registry import ModelRegistry

    with ShimCluster(tmp_path, 2) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        client = ollama.Client(host=cluster.api_url(0))
        out = client.generate(model="smollm2", prompt="Hi", options={"num_predict": 8,
                                                                    "temperature": 0})  # fmt: skip
        scraped = []
        for i in range(2):
            with urllib.request.urlopen(cluster.api_url(i) + "/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                scraped.append(
                    {f.name: f for f in text_string_to_metric_families(r.read().decode())}
                )
    m0, m1 = scraped
    assert _value(m0["omni_requests"], model="smollm2", outcome=out.done_reason) == 1
    assert _value(m0["omni_tokens"], kind="completion") == out.eval_count
    assert _value(m0["omni_tokens"], kind="prompt") == out.prompt_eval_count
    for name in ("omni_request_seconds", "omni_first_token_seconds"):
        assert [s.value for s in m0[name].samples if s.name.endswith("_count")] == [1]
    steps = [s.value for m in (m0, m1) for s in m["omni_stage_step_seconds"].samples
             if s.name.endswith("_count")]  # fmt: skip
    assert steps and min(steps) >= 1
    assert _value(m1["omni_shard_bytes"], direction="in") > 0  # node1 fetched its slice
    for m in (m0, m1):
        assert _value(m["omni_memory_bytes"], kind="rss") > 0
        assert _value(m["omni_live_peers"]) == 1
