"""A node's metrics in Prometheus's text format (``GET /metrics``), with prometheus_client.

One registry per node (tests run several nodes in one process). The node's parts record into
it as things happen (requests, tokens, stage steps, shard bytes, refusals, failovers);
memory and live peers are read when scraped, from callables the node hands over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .request_log import Entry

# seconds: a decode step or hop (sub-millisecond to a slow CPU's 100 ms); a request or first
# token (tens of milliseconds to minutes)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class NodeGauges:
    """What a scrape reads from the node now."""

    memory: Callable[[], dict[str, int]]  # budget, runtime, planned, rss, peak (bytes)
    live_peers: Callable[[], int]
    running: Callable[[], int]  # generations running or queued here


class _Now(Collector):
    def __init__(self, gauges: NodeGauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        memory = GaugeMetricFamily(
            "omni_memory_bytes", "This node's memory: budget, runtime, planned, rss, peak",
            labels=["kind"],
        )  # fmt: skip
        for kind, value in self.gauges.memory().items():
            memory.add_metric([kind], float(value))
        yield memory
        yield GaugeMetricFamily("omni_live_peers", "Peers answering now", self.gauges.live_peers())
        yield GaugeMetricFamily(
            "omni_generations", "Generations running or queued here", self.gauges.running()
        )


class Metrics:
    """The counters and histograms a node records into, and their rendering."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "omni_requests", "Generations finished here", ["model", "outcome"], registry=r
        )
        self.tokens = Counter(
            "omni_tokens", "Tokens of generations coordinated here", ["model", "kind"], registry=r
        )
        self.request_seconds = Histogram(
            "omni_request_seconds", "Wall time of a generation", ["model"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token_seconds = Histogram(
            "omni_first_token_seconds", "Time to a generation's first token", ["model"],
            buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "omni_stage_step_seconds", "Compute time of one decode step of a stage hosted here",
            ["model", "blocks"], buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.transfer_bytes = Counter(
            "omni_shard_bytes", "Shard bytes moved between nodes", ["direction"], registry=r
        )
        self.refusals = Counter(
            "omni_refusals", "Requests or loads refused, by reason", ["reason"], registry=r
        )
        self.failovers = Counter(
            "omni_failovers", "Generations re-planned and replayed after a lost node", registry=r
        )

    def finished(self, entry: Entry) -> None:
        """A generation coordinated here ended (request_log.RequestLog's ``on_finish``)."""
        outcome = "error" if entry.outcome.startswith("error") else entry.outcome or "stop"
        self.requests.labels(entry.model, outcome).inc()
        self.tokens.labels(entry.model, "prompt").inc(entry.prompt_tokens)
        self.tokens.labels(entry.model, "completion").inc(entry.tokens)
        if entry.finished is not None:
            self.request_seconds.labels(entry.model).observe(entry.finished - entry.started)
        if entry.first_token is not None:
            self.first_token_seconds.labels(entry.model).observe(entry.first_token - entry.started)

    def watch(self, gauges: NodeGauges) -> None:
        """Read ``gauges`` at every scrape."""
        self.registry.register(_Now(gauges))

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
