"""Measure a failover on a live cluster: the stall a streaming client sees when a stage's node
is killed (SIGKILL) or frozen (SIGSTOP) in the middle of its generation.

The stall is the longest gap between two streamed tokens after the signal: tokens already on
their way when it was sent do not hide it. Used by tests/test_failover.py and
bench/failover.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from support.shim_cluster import ShimCluster

PROMPT = "Tell me a long story about a lighthouse keeper."


@dataclass
class Failover:
    stall_s: float  # the longest gap between tokens after the signal
    text: str  # the whole streamed text
    tokens: int
    error: str | None = None  # an {"error": ...} line, if the stream ended with one


def stream_with_fault(
    cluster: ShimCluster,
    coordinator: int,
    victim: int,
    sig: int,
    tokens: int = 120,
    after: int = 20,
) -> Failover:
    """Stream a greedy generation through node ``coordinator``'s Ollama API; after ``after``
    tokens send ``sig`` to node ``victim``; read to the end."""
    parts = urlsplit(cluster.api_url(coordinator))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    body = {"model": "smollm2", "prompt": PROMPT, "stream": True,
            "options": {"temperature": 0, "num_predict": tokens}}  # fmt: skip
    conn.request("POST", "/api/generate", json.dumps(body).encode())
    response = conn.getresponse()
    if response.status != 200:
        raise AssertionError(f"HTTP {response.status}: {response.read()!r}")
    arrivals: list[float] = []
    texts: list[str] = []
    error: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in response:
            doc = json.loads(line)
            arrivals.append(time.monotonic())
            if "error" in doc:
                error.append(doc["error"])
                break
            if doc.get("done"):
                break
            texts.append(doc.get("response", ""))
            if len(arrivals) >= after:
                reached.set()
        reached.set()

    reader = threading.Thread(target=read)
    reader.start()
    reached.wait(300)
    proc = cluster.procs[victim]
    assert proc is not None
    t_signal = time.monotonic()
    os.kill(proc.pid, sig)
    reader.join(600)
    conn.close()
    after_signal = [t for t in arrivals if t > t_signal]
    stall = 0.0
    if after_signal:
        first = arrivals.index(after_signal[0])
        edges = [t_signal, *arrivals[first:]]
        stall = max(b - a for a, b in zip(edges, edges[1:], strict=False))
    return Failover(stall, "".join(texts), len(texts), error[0] if error else None)


def restore(cluster: ShimCluster, victim: int, sig: int) -> None:
    """Bring the victim back as a fresh process (a frozen one is killed first)."""
    proc = cluster.procs[victim]
    if proc is not None and proc.poll() is None:
        if sig == signal.SIGSTOP:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    cluster.start(victim)
    cluster.wait_for_peers(cluster.n)
