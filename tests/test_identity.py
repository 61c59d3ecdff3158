"""Node identity (key file, node id, certificate) and admission (secret, trust list, proofs)."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from llm_omninode.net.admission import (
    SECRET_FILE,
    Admission,
    AdmissionError,
    cluster_fingerprint,
    create_cluster_secret,
    join_proof,
    load_cluster_secret,
    load_trusted,
    parse_secret,
    parse_trusted,
    save_cluster_secret,
)
from llm_omninode.net.identity import (
    KEY_FILE,
    NODE_ID_LENGTH,
    IdentityError,
    NodeIdentity,
    is_node_id,
    load_or_create_identity,
    node_id_from_certificate,
    node_id_from_public_key,
    public_key_of_node_id,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- identity -----------------------------------------------------------------------------


def test_key_created_once_with_mode_0600_and_reloaded(tmp_path):
    home = tmp_path / "omni"
    first = load_or_create_identity(home)
    key_path = home / KEY_FILE
    assert key_path.is_file()
    assert _mode(key_path) == 0o600
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]
    second = load_or_create_identity(home)
    assert second.node_id == first.node_id
    assert second.public_key_bytes == first.public_key_bytes


def test_wide_key_file_mode_is_narrowed(tmp_path):
    identity = load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    assert load_or_create_identity(tmp_path).node_id == identity.node_id
    assert _mode(tmp_path / KEY_FILE) == 0o600


def test_corrupt_or_wrong_kind_key_file_is_an_error(tmp_path):
    (tmp_path / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)
    other = tmp_path / "ec"
    other.mkdir()
    from cryptography.hazmat.primitives import serialization

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (other / KEY_FILE).write_bytes(pem)
    with pytest.raises(IdentityError, match="not Ed25519"):
        load_or_create_identity(other)


def test_node_id_format_is_the_key():
    identity = NodeIdentity.generate()
    node_id = identity.node_id
    assert node_id.startswith("omni1")
    assert len(node_id) == NODE_ID_LENGTH == 57
    assert node_id == node_id.lower()
    assert public_key_of_node_id(node_id) == identity.public_key_bytes
    assert node_id_from_public_key(identity.public_key_bytes) == node_id
    assert node_id_from_public_key(identity.private_key.public_key()) == node_id
    assert is_node_id(node_id)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "omni1",
        "omni2" + "a" * 52,
        "OMNI1" + "a" * 52,
        "omni1" + "A" * 52,
        "omni1" + "a" * 51,
        "omni1" + "a" * 53,
        "omni1" + "1" * 52,  # not base32
        "omni1" + "a" * 51 + "b",  # trailing bits not zero: not canonical
        None,
        42,
    ],
)
def test_malformed_node_ids_are_rejected(bad):
    assert not is_node_id(bad)
    with pytest.raises(IdentityError):
        public_key_of_node_id(bad)


def test_certificate_is_bound_to_the_node_id():
    identity = NodeIdentity.generate()
    cert = identity.certificate
    assert node_id_from_certificate(cert) == identity.node_id
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.node_id
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes)  # self-signed
    other = NodeIdentity.generate()
    assert node_id_from_certificate(other.certificate) != identity.node_id


def test_certificate_with_another_key_kind_has_no_node_id():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(IdentityError, match="not Ed25519"):
        node_id_from_certificate(cert)


def test_node_id_from_bad_key_input():
    with pytest.raises(IdentityError):
        node_id_from_public_key(b"short")
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(IdentityError):
        node_id_from_public_key(key)  # a private key is not a public key


# ---- admission ----------------------------------------------------------------------------


def test_cluster_secret_created_once_0600_and_round_trips(tmp_path):
    text = create_cluster_secret(tmp_path)
    assert text.startswith("omni-secret-")
    assert _mode(tmp_path / SECRET_FILE) == 0o600
    secret = load_cluster_secret(tmp_path)
    assert secret == parse_secret(text) and len(secret) == 32
    with pytest.raises(AdmissionError, match="exists"):
        create_cluster_secret(tmp_path)  # never silently replaced
    assert load_cluster_secret(tmp_path) == secret

    joiner = tmp_path / "joiner"
    assert save_cluster_secret(joiner, f"  {text}\n") == secret
    assert _mode(joiner / SECRET_FILE) == 0o600
    assert save_cluster_secret(joiner, text) == secret  # idempotent
    with pytest.raises(AdmissionError, match="different"):
        save_cluster_secret(joiner, create_cluster_secret(tmp_path / "other"))
    assert load_cluster_secret(tmp_path / "nothing") is None


@pytest.mark.parametrize(
    "bad", ["", "omni-secret-", "secret-" + "a" * 52, "omni-secret-" + "a" * 51, "omni-secret-!"]
)
def test_malformed_secrets_are_rejected(bad):
    with pytest.raises(AdmissionError):
        parse_secret(bad)


def test_fingerprint_is_public_and_one_way():
    secret = os.urandom(32)
    fingerprint = cluster_fingerprint(secret)
    assert fingerprint == cluster_fingerprint(secret)
    assert fingerprint.startswith("omnifp1") and len(fingerprint) == 7 + 16
    assert fingerprint != cluster_fingerprint(os.urandom(32))
    assert secret.hex() not in fingerprint
    assert Admission(secret=secret).fingerprint == fingerprint
    assert Admission().fingerprint is None


def test_proof_is_bound_to_both_ids_the_role_and_the_session():
    secret = os.urandom(32)
    a, b = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    binding = os.urandom(32)
    proof = join_proof(secret, "client", a, b, binding)
    assert len(proof) == 32
    assert proof == join_proof(secret, "client", a, b, binding)
    for other in [
        join_proof(secret, "server", a, b, binding),
        join_proof(secret, "client", b, a, binding),
        join_proof(secret, "client", a, b, os.urandom(32)),
        join_proof(os.urandom(32), "client", a, b, binding),
    ]:
        assert other != proof
    assert secret not in proof
    with pytest.raises(AdmissionError):
        join_proof(secret, "client", a, b, b"short")
    with pytest.raises(AdmissionError):
        join_proof(secret, "observer", a, b, binding)


def test_decide_policies():
    secret = os.urandom(32)
    client, server = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    binding = os.urandom(32)
    members = Admission(secret=secret)
    good = members.proof("client", client, server, binding)
    assert members.decide("client", client, server, binding, good).admitted
    replay = members.decide("client", client, server, os.urandom(32), good)
    assert not replay.admitted and "replayed" in replay.reason
    wrong = Admission(secret=os.urandom(32)).proof("client", client, server, binding)
    assert not members.decide("client", client, server, binding, wrong).admitted
    assert not members.decide("client", client, server, binding, None).admitted
    reflected = members.proof("server", client, server, binding)  # server's own proof back
    assert not members.decide("client", client, server, binding, reflected).admitted

    trusting = Admission(trusted=frozenset({client}))
    assert trusting.decide("client", client, server, binding, None).admitted
    assert not trusting.decide("server", client, server, binding, None).admitted
    assert trusting.proof("client", client, server, binding) is None

    assert Admission.open_mode().decide("client", client, server, binding, None).admitted
    nobody = Admission().decide("client", client, server, binding, None)
    assert not nobody.admitted and nobody.reason == "unknown node id"


def test_trust_list_file(tmp_path):
    a, b = NodeIdentity.generate().node_id, NodeIdentity.generate().node_id
    (tmp_path / "trusted_nodes").write_text(f"# cluster peers\n{a}\n\n  {b}  # laptop\n")
    assert load_trusted(tmp_path) == {a, b}
    assert load_trusted(tmp_path / "none") == frozenset()
    with pytest.raises(AdmissionError, match="line 2"):
        parse_trusted(f"{a}\nomni1nonsense\n")
    with pytest.raises(AdmissionError):
        Admission(trusted=frozenset({"not-an-id"}))
    with pytest.raises(AdmissionError):
        Admission(secret=b"short")
    create_cluster_secret(tmp_path)
    policy = Admission.from_home(tmp_path)
    assert policy.trusted == {a, b} and policy.secret is not None and not policy.open
