"""A real shim process refuses nodes outside its cluster and keeps serving its members."""

from __future__ import annotations

import json

import pytest
from shim_cluster import LLM, ShimCluster

from llm_omninode.net.admission import create_cluster_secret


@pytest.fixture
def cluster(tmp_path):
    with ShimCluster(tmp_path, 1) as cluster:
        cluster.start(0)
        yield cluster


def peers_as(cluster: ShimCluster, home) -> tuple[int, str]:
    result = cluster.run([*LLM, "omni", "peers", "--json"], OMNI_HOME=str(home))
    return result.returncode, result.stdout + result.stderr


def test_member_is_admitted(cluster):
    rows = json.loads(cluster.llm("omni", "peers", "--json"))
    assert rows[0]["source"] == "self" and rows[0]["name"] == "node0"


def test_unknown_key_and_wrong_secret_are_refused_and_logged(cluster, tmp_path):
    stranger = tmp_path / "stranger"  # a fresh key, no secret at all
    code, out = peers_as(cluster, stranger)
    assert code != 0 and "refused" in out.lower(), out
    impostor = tmp_path / "impostor"  # a secret, but another cluster's
    impostor.mkdir()
    create_cluster_secret(impostor)
    code, out = peers_as(cluster, impostor)
    assert code != 0 and "refused" in out.lower(), out
    log = cluster.log(0)
    assert "bad cluster proof" in log and "no cluster proof" in log
    # the node kept serving its own cluster
    assert json.loads(cluster.llm("omni", "peers", "--json"))[0]["name"] == "node0"
