"""Who may join: a cluster secret, a list of trusted node ids, or (explicitly) everyone.

Cluster secret: 32 random bytes, written once to ``<home>/cluster_secret`` (mode 0600) and
shown to the user once as text (``omni-secret-`` + base32); other nodes are given that text.
The secret itself never crosses the wire. After the TLS handshake each side sends a proof::

    proof = HMAC-SHA256(secret, b"omni/1 join\\0" + role + b"\\0" + client_id + b"\\0"
                                + server_id + b"\\0" + binding)

``role`` is ``client`` or ``server`` (so one side's proof cannot be reflected back as the
other's), the two node ids are the ones proven by the TLS certificates, and ``binding`` is a
32+ byte value only the two ends of *this* TLS session can compute (see ``net/tls.py``), so a
proof recorded on one connection is worthless on any other.

Trusted ids: ``<home>/trusted_nodes``, one node id per line (``#`` comments). A peer whose id
is listed is admitted without a proof. A peer whose id is our own (it proved it holds our
private key, which lies next to the secret: the plugin and the shim of one data directory) is
admitted too. Open mode admits everyone and exists only as a flag (``omni-shim --open``; the
plugin's client: ``OMNI_OPEN=1``).

The cluster fingerprint (``omnifp1`` + 16 base32 chars, 80 bits of SHA-256 over a labelled
secret) is public: mDNS may advertise it so nodes can tell clusters apart; it reveals nothing
usable about the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .identity import IdentityError, public_key_of_node_id, read_private_file, write_private_file

SECRET_FILE = "cluster_secret"
TRUSTED_FILE = "trusted_nodes"
SECRET_PREFIX = "omni-secret-"
SECRET_BYTES = 32
FINGERPRINT_PREFIX = "omnifp1"
PROOF_LABEL = b"omni/1 join"
MIN_BINDING_BYTES = 16
ROLES = ("client", "server")


class AdmissionError(ValueError):
    """A malformed secret, trust list or admission input."""


def format_secret(secret: bytes) -> str:
    return SECRET_PREFIX + base64.b32encode(secret).decode("ascii").rstrip("=").lower()


def parse_secret(text: str) -> bytes:
    """The secret bytes of a ``omni-secret-...`` text (surrounding whitespace ignored)."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise AdmissionError(f"a cluster secret starts with {SECRET_PREFIX!r}")
    body = text[len(SECRET_PREFIX) :]
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise AdmissionError("cluster secret is not valid base32") from exc
    if len(raw) != SECRET_BYTES or format_secret(raw) != text:
        raise AdmissionError(f"a cluster secret holds exactly {SECRET_BYTES} bytes")
    return raw


def cluster_fingerprint(secret: bytes) -> str:
    """Public, one-way tag of a cluster (for mDNS TXT); never the secret."""
    digest = hashlib.sha256(b"omni/1 cluster fingerprint\0" + secret).digest()
    return FINGERPRINT_PREFIX + base64.b32encode(digest[:10]).decode("ascii").lower()


def create_cluster_secret(home: str | os.PathLike) -> str:
    """Make a new secret in ``<home>/cluster_secret`` and return its text, to be shown once.

    Refuses (AdmissionError) if the home already has a secret: replacing it would lock this
    node out of its cluster.
    """
    secret = secrets.token_bytes(SECRET_BYTES)
    text = format_secret(secret)
    if not write_private_file(Path(home) / SECRET_FILE, (text + "\n").encode("ascii")):
        raise AdmissionError(f"{Path(home) / SECRET_FILE} already exists")
    return text


def save_cluster_secret(home: str | os.PathLike, text: str) -> bytes:
    """Store a secret given by the user (joining an existing cluster); returns its bytes."""
    secret = parse_secret(text)
    path = Path(home) / SECRET_FILE
    written = write_private_file(path, (format_secret(secret) + "\n").encode("ascii"))
    if not written and load_cluster_secret(home) != secret:
        raise AdmissionError(f"{path} already holds a different secret")
    return secret


def load_cluster_secret(home: str | os.PathLike) -> bytes | None:
    path = Path(home) / SECRET_FILE
    if not path.exists():
        return None
    try:
        return parse_secret(read_private_file(path).decode("ascii", "replace"))
    except OSError as exc:
        raise AdmissionError(f"cannot read {path}: {exc}") from exc


def parse_trusted(text: str) -> frozenset[str]:
    ids = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            public_key_of_node_id(line)
        except IdentityError as exc:
            raise AdmissionError(f"trusted_nodes line {number}: {exc}") from exc
        ids.add(line)
    return frozenset(ids)


def load_trusted(home: str | os.PathLike) -> frozenset[str]:
    path = Path(home) / TRUSTED_FILE
    if not path.exists():
        return frozenset()
    return parse_trusted(path.read_text(encoding="utf-8"))


def join_proof(secret: bytes, role: str, client_id: str, server_id: str, binding: bytes) -> bytes:
    if role not in ROLES:
        raise AdmissionError(f"role must be one of {ROLES}")
    if len(binding) < MIN_BINDING_BYTES:
        raise AdmissionError("session binding too short")
    message = b"\0".join(
        [PROOF_LABEL, role.encode(), client_id.encode(), server_id.encode(), bytes(binding)]
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: str


@dataclass(frozen=True)
class Admission:
    """The admission policy of one node. ``Admission()`` admits nobody."""

    secret: bytes | None = field(default=None, repr=False)
    trusted: frozenset[str] = frozenset()
    open: bool = False

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret) != SECRET_BYTES:
            raise AdmissionError(f"a cluster secret holds exactly {SECRET_BYTES} bytes")
        object.__setattr__(self, "trusted", frozenset(self.trusted))
        for node_id in self.trusted:
            try:
                public_key_of_node_id(node_id)
            except IdentityError as exc:
                raise AdmissionError(f"trusted id: {exc}") from exc

    @classmethod
    def open_mode(cls) -> Admission:
        """Admit every peer that completes the TLS handshake. Only behind an explicit flag."""
        return cls(open=True)

    @classmethod
    def from_home(cls, home: str | os.PathLike, *, open: bool = False) -> Admission:
        """The policy stored in a home: its cluster secret and trusted_nodes, if any."""
        return cls(secret=load_cluster_secret(home), trusted=load_trusted(home), open=open)

    @property
    def fingerprint(self) -> str | None:
        return cluster_fingerprint(self.secret) if self.secret is not None else None

    def proof(self, role: str, client_id: str, server_id: str, binding: bytes) -> bytes | None:
        """This side's membership proof for one session, or None without a secret."""
        if self.secret is None:
            return None
        return join_proof(self.secret, role, client_id, server_id, binding)

    def decide(
        self,
        peer_role: str,
        client_id: str,
        server_id: str,
        binding: bytes,
        proof: bytes | None,
    ) -> Decision:
        """Admit the peer (whose role is ``peer_role``) or say why not."""
        peer_id = client_id if peer_role == "client" else server_id
        if client_id == server_id:  # the peer holds our own private key: it is this node
            return Decision(True, "this node's own key")  # (the plugin and its local shim)
        if self.open:
            return Decision(True, "open mode")
        if peer_id in self.trusted:
            return Decision(True, "trusted node id")
        if self.secret is not None and proof is not None:
            expected = join_proof(self.secret, peer_role, client_id, server_id, binding)
            if hmac.compare_digest(expected, proof):
                return Decision(True, "cluster secret proof")
            return Decision(False, "bad cluster proof (wrong secret or replayed)")
        if self.secret is not None:
            return Decision(False, "no cluster proof and not a trusted node id")
        return Decision(False, "unknown node id")
