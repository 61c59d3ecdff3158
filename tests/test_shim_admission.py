"""A real shim process refuses nodes outside its cluster and keeps serving its members."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest
from support.live_peer import LiveShim, RawClient, arun, raw_session
from support.shim_cluster import LLM, ShimCluster

from llm_omninode.net import frames as F
from llm_omninode.net import tls
from llm_omninode.net.admission import Admission, create_cluster_secret, join_proof, parse_secret
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import CloseCode, PeerRefused

pytestmark = pytest.mark.cluster  # starts omni-shim processes


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


# ---- hostile handshakes against the live shim ---------------------------------------------


def _every_request(node_id: str) -> list[bytes]:
    """One frame of every kind a node serves, as a peer would send it once admitted."""
    manifest_fields = {"model": "bafkr4i" + "a" * 52, "start": 0, "end": 1}
    frames = [
        F.hello_frame(1, node_id, "0"),
        F.shard_read_frame(2, "bafkr4i" + "a" * 52, 0, 1024),
        F.request_frame(3, "generate", request={"model": "x", "prompt": "hi"}),
        F.request_frame(4, "pipeline", model="bafkr4i" + "a" * 52, seq="s", route=[]),
        F.request_frame(5, "stage.load", b"{}", **manifest_fields),
        F.request_frame(6, "stage.unload", **manifest_fields),
        F.request_frame(7, "peers"),
        F.request_frame(8, "status"),
        F.request_frame(9, "models"),
        F.request_frame(10, "manifest", model="x"),
    ]
    return [F.encode(f) for f in frames]


def test_requests_before_admission_or_from_strangers_are_never_served(cluster, tmp_path):
    """Requests of every method: without a JOIN first, after a JOIN with no proof, with a
    proof made from another secret, or with a proof for the wrong role. Each connection is
    closed and the node sends nothing back on any stream (so no handler ran)."""
    port, stranger = cluster.ports[0], NodeIdentity.generate()
    requests = _every_request(stranger.node_id)
    other_secret = os.urandom(32)
    secret = parse_secret(cluster.secret)
    server_id = cluster.node_ids[0]

    def join(proof_of) -> Callable[[RawClient], list[bytes]]:
        def streams(client: RawClient) -> list[bytes]:
            binding = tls.session_binding(client._quic)
            proof = proof_of(binding)
            return [F.encode(F.join_frame(stranger.node_id, proof)), *requests]

        return streams

    cases = {
        "requests first": (requests, CloseCode.PROTOCOL),
        "no proof": (join(lambda b: None), CloseCode.REFUSED),
        "other secret": (
            join(lambda b: join_proof(other_secret, "client", stranger.node_id, server_id, b)),
            CloseCode.REFUSED,
        ),
        "server's role": (
            join(lambda b: join_proof(secret, "server", stranger.node_id, server_id, b)),
            CloseCode.REFUSED,
        ),
        "no certificate": (requests, CloseCode.BAD_CERTIFICATE),
    }

    async def main():
        for name, (streams, code) in cases.items():
            identity = None if name == "no certificate" else stranger
            client = await raw_session(port, identity, streams)
            assert client.terminated is not None, name
            assert client.terminated.error_code == code, (name, client.terminated)
            assert client.received == {}, (name, client.received)

    arun(main())
    log = cluster.log(0)
    assert "no cluster proof" in log and "bad cluster proof" in log
    assert "bad JOIN: frame type HELLO not allowed here" in log
    assert "no certificate presented" in log
    before = LiveShim(cluster).snapshot()
    LiveShim(cluster).assert_intact(before)


def test_replayed_handshake_is_refused(cluster, monkeypatch):
    """A member's admission proof, captured on one connection, is worthless on the next: the
    proof is an HMAC over both node ids and a value derived from that TLS session's master
    secret and transcript (net/tls.py session_binding), which no two connections share."""
    live = LiveShim(cluster)
    honest = Admission.proof
    captured: list[tuple[bytes, bytes]] = []  # (binding, proof) of the client side

    def recording(self, role, client_id, server_id, binding):
        proof = honest(self, role, client_id, server_id, binding)
        if role == "client":
            captured.append((bytes(binding), proof))
        return proof

    def replaying(self, role, client_id, server_id, binding):
        if role == "client":
            captured.append((bytes(binding), captured[0][1]))
            return captured[0][1]
        return honest(self, role, client_id, server_id, binding)

    async def main():
        monkeypatch.setattr(Admission, "proof", recording)
        conn = await live.connect()
        await conn.close()
        monkeypatch.setattr(Admission, "proof", replaying)
        with pytest.raises(PeerRefused) as refused:  # through our own client
            await live.connect()
        assert refused.value.code == CloseCode.REFUSED
        monkeypatch.setattr(Admission, "proof", honest)
        # the captured JOIN frame, byte for byte, on a raw connection with the member's key
        join = F.encode(F.join_frame(live.member.node_id, captured[0][1]))
        client = await raw_session(live.port, live.member, [join])
        assert client.terminated.error_code == CloseCode.REFUSED
        assert client.received == {}
        # and an honest member is still admitted
        await live.answers()

    arun(main())
    assert len({binding for binding, _ in captured}) == len(captured) == 2
    assert cluster.log(0).count("bad cluster proof (wrong secret or replayed)") >= 2
    LiveShim(cluster).assert_intact(live.snapshot())


# ---- the plugin and an --open shim; why a node is refused -----------------------------------


def test_plugin_talks_to_an_open_shim_only_when_told_to(tmp_path):
    """A shim started with --open admits everyone, but the plugin's client still checks whom
    it talks to: a shim outside its cluster is refused, with how to opt in (OMNI_OPEN=1);
    with it, the client gets its answer. The plugin of the shim's own data dir (the same node
    key) needs nothing."""
    with ShimCluster(tmp_path, 1) as cluster:
        (cluster.dirs[0] / "cluster_secret").unlink()  # an open node of no cluster at all
        cluster.start(0, args=["--open"])
        stranger = tmp_path / "stranger"  # another machine's plugin: its own key, no secret
        code, out = peers_as(cluster, stranger)
        assert code != 0, out
        assert f"refused the shim at 127.0.0.1:{cluster.ports[0]}" in out, out
        assert "OMNI_OPEN=1" in out and f"llm omni trust {cluster.node_ids[0]}" in out, out
        result = cluster.run([*LLM, "omni", "peers", "--json"], OMNI_HOME=str(stranger),
                             OMNI_OPEN="1")  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)[0]["node_id"] == cluster.node_ids[0]
        # a member of some cluster, opting in too: it is admitted (open) and admits (OMNI_OPEN)
        member = tmp_path / "member"
        member.mkdir()
        create_cluster_secret(member)
        code, out = peers_as(cluster, member)
        assert code != 0 and "OMNI_OPEN=1" in out, out
        result = cluster.run([*LLM, "omni", "peers"], OMNI_HOME=str(member), OMNI_OPEN="1")
        assert result.returncode == 0 and "node0 (this)" in result.stdout, result.stderr
        # the shim's own data dir: no secret, no trust list, yet its plugin gets in
        assert json.loads(cluster.llm("omni", "peers", "--json"))[0]["name"] == "node0"
    assert "admitted" in cluster.log(0) and "open mode" in cluster.log(0)


def test_a_node_refused_for_a_bad_proof_says_so_in_its_log_and_peers(tmp_path):
    """node1 joins with another cluster's secret and names node0 with --peer: node0 refuses
    its handshake with the reason in the QUIC close; node1 logs it once and shows it in
    ``llm omni peers`` (table and JSON)."""
    with ShimCluster(tmp_path, 2) as cluster:
        cluster.start(0)
        other = tmp_path / "other"
        other.mkdir()
        cluster.start(1, args=["--join", create_cluster_secret(other)])
        where = f"127.0.0.1:{cluster.ports[0]}"
        expected = f"refused by {where}: bad cluster proof"
        deadline = time.monotonic() + 30
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = json.loads(cluster.llm("omni", "peers", "--json", i=1))
            if any(expected in (r.get("error") or "") for r in rows):
                break
            time.sleep(0.5)
        (row,) = [r for r in rows if r.get("source") != "self"]
        assert row["address"] == where and expected in row["error"], rows
        assert row["live"] is False and row["node_id"] == ""
        table = cluster.llm("omni", "peers", i=1)
        assert expected in table, table
        time.sleep(6)  # another round of probing: still refused, not logged again
        log = cluster.log(1)
        assert log.count(expected) == 1, log
        assert "bad cluster proof" in cluster.log(0)
