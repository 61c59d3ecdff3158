"""A node's /metrics text (shim/metrics.py): Prometheus's format, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

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
