"""Prefix reuse: a chat's next turn starts from the KV caches the previous turn left on every
stage, so only the new tokens are computed, and the answer is the one a full recomputation
gives."""

from __future__ import annotations

import re
from pathlib import Path

import ollama
import pytest
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

OPTIONS = {"temperature": 0, "num_predict": 16}
FIRST = {"role": "user", "content": "Name a famous painter."}
SECOND = {"role": "user", "content": "Name one of their paintings."}
PREFILL = re.compile(r"prefill of (\d+) tokens \((\d+) more cached\)")


def prefills(log: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in PREFILL.findall(log)]


def test_the_next_turn_reuses_the_previous_turns_caches(tmp_path: Path, smollm2_path: Path):
    with ShimCluster(tmp_path, 2) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(2)
        client = ollama.Client(host=cluster.api_url(0))

        def chat(messages):
            return client.chat(model="smollm2", messages=messages, options=OPTIONS).message

        answer = chat([FIRST])
        history = [FIRST, {"role": "assistant", "content": answer.content}, SECOND]
        second = chat(history)
        (n1, c1), (n2, c2) = prefills(cluster.log(0))[-2:]
        assert c1 == 0  # nothing to reuse on the first turn
        assert c2 >= n1 + 8, (n1, n2, c2)  # the whole first turn and most of its answer
        status = client.ps()  # both stages served the split
        assert status.models

        # the same second turn on a cluster that keeps no caches computes every token
        with ShimCluster(tmp_path / "fresh", 2, extra_args=["--no-prefix-cache"]) as fresh:
            ModelRegistry(fresh.dirs[0]).add_file(smollm2_path, alias="smollm2")
            fresh.start_all()
            fresh.wait_for_peers(2)
            other = ollama.Client(host=fresh.api_url(0))
            full = other.chat(model="smollm2", messages=history, options=OPTIONS).message
            assert prefills(fresh.log(0))[-1] == (n2 + c2, 0)
        assert second.content == full.content
