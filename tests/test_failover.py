"""Failover in seconds, on 3 real shims: SIGKILL of a stage's node mid-decode stalls the
client for at most 5 s and the text is the no-failure text; nothing is left unretrieved or
traced in any log. A lost coordinator ends its clients' streams with an error within 5 s,
never silently.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import ollama
import pytest
from support.failover import PROMPT, stream_with_fault
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

N = 120
# from the kill to the next token: the goal is 5 s (bench/failover.py reports the median, ~1 s
# here); the test allows twice that, since CI shares its 2 cores with everything else
STALL_BOUND = 10.0


def _plan(cluster: ShimCluster, i: int = 0) -> list[tuple[str, int, int]]:
    status = json.loads(cluster.llm("omni", "status", "--json", i=i))
    (plan,) = [p for p in status["plans"] if p["ready"]] or status["plans"]
    return [(s["node_id"], s["start"], s["end"]) for s in plan["stages"]]


def _clean_logs(cluster: ShimCluster, nodes: list[int]) -> None:
    for i in nodes:
        log = cluster.log(i)
        assert "exception was never retrieved" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def three(tmp_path_factory, smollm2_path: Path):
    root = tmp_path_factory.mktemp("failover")
    with ShimCluster(root, 3) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(3)
        yield cluster


def test_a_killed_stage_costs_seconds(three: ShimCluster):
    cluster = three
    client = ollama.Client(host=cluster.api_url(0))
    options = {"temperature": 0, "num_predict": N}
    want = client.generate(model="smollm2", prompt=PROMPT, options=options).response
    stages = _plan(cluster)
    assert len(stages) == 3, stages  # every node holds a slice
    holders = [cluster.node_ids.index(n) for n, _, _ in stages]
    victim = next(i for i in holders if i != 0)  # a stage of a node that is not coordinating
    result = stream_with_fault(cluster, 0, victim, signal.SIGKILL, tokens=N)
    print(f"SIGKILL of node{victim} (stage {holders.index(victim)} of 3): "
          f"stall {result.stall_s:.2f} s")  # fmt: skip
    assert result.error is None
    assert result.text == want and result.tokens == N
    assert result.stall_s <= STALL_BOUND, f"stalled {result.stall_s:.1f} s"
    survivors = [i for i in range(3) if i != victim]
    assert {n for n, _, _ in _plan(cluster)} == {cluster.node_ids[i] for i in survivors}
    _clean_logs(cluster, survivors)
    cluster.start(victim)  # back for the next test
    cluster.wait_for_peers(3)


def test_a_lost_coordinator_ends_its_streams_with_an_error(three: ShimCluster):
    cluster = three
    # the llm plugin streaming through node0 (its coordinator), and an Ollama client streaming
    # through node1; both coordinators are killed
    argv = [*LLM, "-m", "omni/smollm2", PROMPT, "-o", "max_tokens", "2000", "--no-log"]
    plugin = subprocess.Popen(argv, env=cluster.env(0), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert plugin.stdout is not None and plugin.stderr is not None
    assert plugin.stdout.read(1), plugin.stderr.read()  # streaming
    stream = ollama.Client(host=cluster.api_url(1)).generate(
        model="smollm2", prompt=PROMPT, options={"num_predict": 2000}, stream=True
    )
    assert next(p for p in stream if p.response)  # text (a first load's progress has none)
    for i in (0, 1):
        cluster.stop(i, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: B017 - httpx's error for a cut stream
        for _ in stream:
            pass
    took = time.monotonic() - t0
    print(f"ollama client: {type(info.value).__name__} after {took:.2f} s: {info.value}")
    assert took <= 5.0
    _, err = plugin.communicate(timeout=30)
    took = time.monotonic() - t0
    print(f"llm: exit {plugin.returncode} after {took:.2f} s: {err.strip()}")
    assert plugin.returncode != 0 and took <= 5.0
    assert f"127.0.0.1:{cluster.ports[0]}" in err, err  # names the node it lost
