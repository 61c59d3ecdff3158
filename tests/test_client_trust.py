"""Whom the plugin's client accepts: its cluster, trusted ids, its own key; OMNI_OPEN=1: any."""

from __future__ import annotations

import os

import pytest

from llm_omninode.client import open_trust
from llm_omninode.net.admission import Admission
from llm_omninode.net.identity import NodeIdentity


def test_a_peer_holding_our_own_key_is_us():
    """The plugin and the shim of one data directory share its key: each admits the other
    with no secret and no trust list (the key file lies next to the secret anyway)."""
    me, other = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    binding = os.urandom(32)
    nobody = Admission()
    for role in ("client", "server"):
        assert nobody.decide(role, me, me, binding, None).admitted
        assert not nobody.decide(role, me, other, binding, None).admitted
        assert not nobody.decide(role, other, me, binding, None).admitted


@pytest.mark.parametrize(
    ("value", "wanted"),
    [("1", True), ("yes", True), ("true", True), ("", False), ("0", False), ("no", False)],
)
def test_omni_open_is_an_explicit_yes(monkeypatch, value, wanted):
    monkeypatch.setenv("OMNI_OPEN", value)
    assert open_trust() is wanted
