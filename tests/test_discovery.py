"""mDNS discovery: TXT encoding, and real nodes in separate network namespaces.

The multi-process test binds every node's mDNS to its own namespace address, so nothing is
ever sent on the host's interfaces; it is skipped where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.netns import Topology, netns_available

from llm_omninode.net.admission import cluster_fingerprint
from llm_omninode.net.discovery import (
    PROTOCOL_VERSION,
    Advert,
    Discovery,
    DiscoveryError,
    decode_txt,
    encode_txt,
    liveness_bound,
)
from llm_omninode.net.identity import NodeIdentity

NODE_SCRIPT = Path(__file__).parent / "support" / "discovery_node.py"
NODE_ID = NodeIdentity.generate().node_id
FP = cluster_fingerprint(b"\x01" * 32)


def as_wire(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in txt.items()}


def good_txt() -> dict[bytes, bytes | None]:
    return as_wire(encode_txt(Advert(node_id=NODE_ID, port=7000, fingerprint=FP, name="box")))


# -- TXT encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", [FP, "open"])
@pytest.mark.parametrize("name", ["", "studio-mac", "Mäc Studio ☕", "x" * 63])
def test_txt_round_trip(fingerprint, name):
    advert = Advert(node_id=NODE_ID, port=65535, fingerprint=fingerprint, name=name)
    txt = encode_txt(advert)
    assert set(txt) == {"id", "fp", "port", "v", "name"}
    assert txt["v"] == PROTOCOL_VERSION and txt["port"] == "65535"
    assert decode_txt(as_wire(txt)) == advert


def test_txt_keys_case_insensitive_unknown_ignored_first_wins():
    props = {k.upper(): v for k, v in good_txt().items()}
    props[b"future"] = b"\xff" * 1000  # unknown keys may hold anything
    props[b"flag"] = None
    assert decode_txt(props).node_id == NODE_ID
    props = {**good_txt(), b"PORT": b"9"}  # a later duplicate (other case) is ignored
    assert decode_txt(props).port == 7000


def test_txt_name_optional():
    props = good_txt()
    del props[b"name"]
    assert decode_txt(props).name == ""


def _without(key: bytes) -> dict:
    props = good_txt()
    del props[key]
    return props


def _with(key: bytes, value: bytes | None) -> dict:
    return {**good_txt(), key: value}


MALFORMED = {
    "missing id": _without(b"id"),
    "missing fp": _without(b"fp"),
    "missing port": _without(b"port"),
    "missing version": _without(b"v"),
    "id without value": _with(b"id", None),
    "bad id": _with(b"id", b"omni1notanid"),
    "upper-case id": _with(b"id", NODE_ID.upper().encode()),
    "port 0": _with(b"port", b"0"),
    "port 70000": _with(b"port", b"70000"),
    "port 65536": _with(b"port", b"65536"),
    "port non-numeric": _with(b"port", b"http"),
    "port negative": _with(b"port", b"-1"),
    "port padded": _with(b"port", b" 80"),
    "port leading zero": _with(b"port", b"0080"),
    "port empty": _with(b"port", b""),
    "huge port": _with(b"port", b"9" * 100_000),
    "huge id": _with(b"id", b"omni1" + b"a" * 100_000),
    "huge name": _with(b"name", "é".encode() * 10_000),
    "huge fp": _with(b"fp", b"omnifp1" + b"a" * 10_000),
    "name of 64 chars": _with(b"name", b"n" * 64),
    "name with escape codes": _with(b"name", b"\x1b[2Jowned"),
    "non-UTF-8 name": _with(b"name", b"\xff\xfe"),
    "non-UTF-8 id": _with(b"id", b"\xc3" + NODE_ID.encode()[1:]),
    "wrong version": _with(b"v", b"2"),
    "empty version": _with(b"v", b""),
    "bad fingerprint": _with(b"fp", b"omnifp1short"),
    "fingerprint that looks like a secret": _with(b"fp", b"omni-secret-abc"),
    "value not bytes": _with(b"port", 7000),  # type: ignore[dict-item]
    "key not bytes": {**good_txt(), "id": b"x"},
}


@pytest.mark.parametrize("props", MALFORMED.values(), ids=MALFORMED.keys())
def test_txt_malformed_rejected(props):
    with pytest.raises(DiscoveryError):
        decode_txt(props)


@pytest.mark.parametrize(
    "advert",
    [
        Advert(node_id="nope", port=7000, fingerprint=FP),
        Advert(node_id=NODE_ID, port=0, fingerprint=FP),
        Advert(node_id=NODE_ID, port=True, fingerprint=FP),
        Advert(node_id=NODE_ID, port=7000, fingerprint=FP, version="2"),
        Advert(node_id=NODE_ID, port=7000, fingerprint="omni-secret-" + "a" * 52),
        Advert(node_id=NODE_ID, port=7000, fingerprint=FP, name="y" * 64),
        Advert(node_id=NODE_ID, port=7000, fingerprint=FP, name="a\nb"),
    ],
)
def test_bad_advert_refused(advert):
    with pytest.raises(DiscoveryError):
        encode_txt(advert)
    with pytest.raises(DiscoveryError):
        Discovery(advert, interfaces=["198.18.0.1"])


@pytest.mark.parametrize("kwargs", [{"ttl": 1}, {"ttl": 4501}, {"interfaces": ["eth0"]}])
def test_bad_discovery_options_refused(kwargs):
    with pytest.raises(ValueError):
        Discovery(Advert(node_id=NODE_ID, port=7000, fingerprint=FP), **kwargs)


# -- real nodes in network namespaces -------------------------------------------------------------


class Node:
    """A discovery_node.py process in a namespace, with its stdout table and stderr log."""

    def __init__(self, topo: Topology, i: int, node_id: str, fp: str, ttl: int, port: int):
        self.node_id = node_id
        argv = [
            sys.executable,
            str(NODE_SCRIPT),
            "--addr",
            topo.addresses[i],
            "--node-id",
            node_id,
            "--fp",
            fp,
            "--ttl",
            str(ttl),
            "--port",
            str(port),
            "--name",
            f"n{i}",
        ]
        self.proc = topo.popen(
            i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.log: list[str] = []
        self.table: list[dict] | None = None  # latest peer table the node printed
        self.ever: set[str] = set()  # every node id it ever listed
        self.table_time = 0.0  # the node's monotonic time of the latest table
        self.stopped = False
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.log.append(f"stdout: {line.rstrip()}")

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def _apply(self, event: dict) -> None:
        if event.get("event") == "peers":
            self.table = event["peers"]
            self.table_time = event["t"]
            self.ever.update(p["node_id"] for p in self.table)
        elif event.get("event") == "stopped":
            self.stopped = True

    def _fail(self, what: str) -> None:
        tail = "\n".join(self.log[-30:])
        pytest.fail(f"{what} (node {self.node_id[:12]}, table {self.table}); log:\n{tail}")

    def pump(self, until: float) -> None:
        """Apply events until time.monotonic() reaches ``until``."""
        while (remaining := until - time.monotonic()) > 0:
            try:
                self._apply(self.events.get(timeout=remaining))
            except queue.Empty:
                return

    def wait(self, predicate: Callable[[list[dict]], bool], timeout: float, what: str) -> float:
        """Apply events until the table satisfies ``predicate``; the node's time of that table."""
        deadline = time.monotonic() + timeout
        while self.table is None or not predicate(self.table):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"timed out waiting until {what}")
            try:
                self._apply(self.events.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                if self.proc.poll() is not None:
                    self._fail(f"exited (rc {self.proc.returncode}) before {what}")
        return self.table_time

    def wait_log(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                if text in line:
                    return line
            time.sleep(0.05)
        self._fail(f"no log line with {text!r}")
        raise AssertionError  # unreachable: pytest.fail raises

    def terminate(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.pump(time.monotonic() + 0.2)  # let the reader deliver the last lines
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def ids_of(table: list[dict]) -> list[str]:
    return [p["node_id"] for p in table]


@pytest.fixture
def topology():
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with Topology(3, prefix="omnidisc") as topo:
        yield topo


@pytest.mark.cluster
def test_discovery_liveness_across_namespaces(topology):
    a_id, b_id, c_id = (NodeIdentity.generate().node_id for _ in range(3))
    fp = cluster_fingerprint(os.urandom(32))
    other_fp = cluster_fingerprint(os.urandom(32))
    nodes: list[Node] = []
    try:
        # a long TTL for a and b, so only a goodbye can remove b quickly
        a = Node(topology, 0, a_id, fp, ttl=30, port=7001)
        nodes.append(a)
        b = Node(topology, 1, b_id, fp, ttl=30, port=7002)
        nodes.append(b)
        c = Node(topology, 2, c_id, other_fp, ttl=30, port=7003)
        nodes.append(c)

        # the two same-cluster nodes find each other, with the right address and port
        a.wait(lambda t: ids_of(t) == [b_id], 15, "a sees b")
        b.wait(lambda t: ids_of(t) == [a_id], 15, "b sees a")
        (peer_b,) = a.table
        assert peer_b["addresses"] == [topology.addresses[1]]
        assert (peer_b["port"], peer_b["name"], peer_b["fingerprint"]) == (7002, "n1", fp)
        (peer_a,) = b.table
        assert peer_a["addresses"] == [topology.addresses[0]] and peer_a["port"] == 7001

        # c's adverts reach both, and both turn it away (and c turns them away)
        for node, foreign in ((a, c_id), (b, c_id), (c, a_id), (c, b_id)):
            assert "other cluster" in node.wait_log(f"ignoring {foreign}", 10)
        for node in nodes:
            node.pump(time.monotonic() + 0.3)
        assert c_id not in a.ever | b.ever
        assert c.ever == set() and c.table == []

        # b stops cleanly: its goodbye removes it long before its 30 s TTL could
        assert b.terminate() == 0 and b.stopped
        a.wait(lambda t: t == [], 5, "a drops b after its goodbye")

        # b comes back (same id) with a 4 s TTL; refreshes keep it listed beyond its TTL ...
        ttl = 4
        b2 = Node(topology, 1, b_id, fp, ttl=ttl, port=7004)
        nodes.append(b2)
        a.wait(lambda t: ids_of(t) == [b_id] and t[0]["port"] == 7004, 15, "a sees b again")
        b2.wait(lambda t: ids_of(t) == [a_id], 15, "b again sees a")
        until = time.monotonic() + ttl + 1.5
        while time.monotonic() < until:
            a.pump(min(until, time.monotonic() + 0.2))
            assert ids_of(a.table) == [b_id], "a live peer with a short TTL was dropped"

        # ... and once killed (no goodbye) it is gone within the documented bound
        killed_at = time.monotonic()
        b2.kill()
        gone_at = a.wait(lambda t: t == [], liveness_bound(ttl) + 5, "a drops the killed b")
        assert gone_at - killed_at <= liveness_bound(ttl)
        assert a.proc.poll() is None and c.proc.poll() is None
    finally:
        for node in nodes:
            node.kill()
