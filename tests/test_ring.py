"""The pipeline is a ring: on three shims (loopback), each token id goes from the last stage
straight to the coordinator, never back through the middle stage, and the greedy text is the
single-stage engine's.

Observable in every node's ``status``: each hosted stage counts the steps it computed and, on
the last stage, the picked ids it sent to a coordinator's tail (``tokens_out``). The coordinator
(node 0, whichever stage the plan gives it) gets one id per step from the last stage; the
other stages compute the same steps and send no id anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.shim_cluster import ShimCluster
from test_shim_e2e import N_TOKENS, ask, reference  # noqa: F401 - the fixture

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]


def _rows(cluster: ShimCluster, i: int) -> list[dict]:
    return json.loads(cluster.llm("omni", "status", "--json", i=i))["hosted"]


def test_token_ids_go_straight_from_the_last_stage_to_the_coordinator(
    tmp_path: Path,
    smollm2_path: Path,
    reference: dict[str, str],  # noqa: F811
):
    with ShimCluster(tmp_path, 3) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(3)
        content, want = next(iter(reference.items()))
        assert ask(cluster, content) == want  # greedy: the single-stage engine's text
        (plan,) = json.loads(cluster.llm("omni", "status", "--json"))["plans"]
        nodes = [s["node_id"] for s in plan["stages"]]
        assert len(set(nodes)) == 3, plan  # node0 coordinates, wherever its stage is
        first, middle, last = (_rows(cluster, cluster.node_ids.index(n)) for n in nodes)
        (first,), (middle,), (last,) = first, middle, last
        assert first["first"] and last["last"] and not (middle["first"] or middle["last"])
        # one prefill step, then one step a token but the last (max_tokens ends it)
        steps = 1 + (N_TOKENS - 1)
        assert first["steps"] == middle["steps"] == last["steps"] == steps, (first, middle, last)
        assert last["tokens_out"] == steps  # each answer left the last stage once, on the tail
        assert first["tokens_out"] == middle["tokens_out"] == 0
