"""Node identity: an Ed25519 key, the node id derived from it, and a TLS certificate of it.

Node id format (``omni1`` ids)::

    node_id = "omni1" + base32_lower_no_padding(raw_ed25519_public_key)   # 5 + 52 = 57 chars

The id *is* the public key (as a libp2p PeerId embeds an Ed25519 key), so anyone holding an id
can check it against a certificate, a TLS handshake or a signature without asking anyone:
``node_id_from_public_key(cert.public_key()) == expected``. Only the canonical encoding is
accepted (lower case, no padding, zero trailing bits), so one key has exactly one id.

The key lives in ``<home>/node_key.pem`` (PKCS#8 PEM, mode 0600), created on first use. The
certificate is self-signed and made in memory at load time; it carries no trust of its own:
peers trust the key through the node id, never through a CA.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

NODE_ID_PREFIX = "omni1"
NODE_ID_LENGTH = len(NODE_ID_PREFIX) + 52
KEY_FILE = "node_key.pem"
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class IdentityError(ValueError):
    """A malformed node id, a key of the wrong kind, or an unreadable key file."""


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


def node_id_from_public_key(public_key: ed25519.Ed25519PublicKey | bytes) -> str:
    """The node id of an Ed25519 public key (object or 32 raw bytes)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif isinstance(public_key, bytes | bytearray) and len(public_key) == 32:
        raw = bytes(public_key)
    else:
        raise IdentityError("a node id needs an Ed25519 public key (32 raw bytes)")
    return NODE_ID_PREFIX + _b32(raw)


def public_key_of_node_id(node_id: str) -> bytes:
    """The 32 raw key bytes inside a node id; IdentityError unless the id is canonical."""
    if not isinstance(node_id, str) or len(node_id) != NODE_ID_LENGTH:
        raise IdentityError(f"not a node id: {node_id!r:.80}")
    if not node_id.startswith(NODE_ID_PREFIX):
        raise IdentityError(f"not a node id (prefix {NODE_ID_PREFIX!r}): {node_id!r:.80}")
    body = node_id[len(NODE_ID_PREFIX) :]
    if not set(body) <= _B32_ALPHABET:
        raise IdentityError(f"not a node id (base32 lower expected): {node_id!r:.80}")
    raw = _unb32(body)
    if len(raw) != 32 or _b32(raw) != body:
        raise IdentityError(f"not a canonical node id: {node_id!r:.80}")
    return raw


def is_node_id(value: object) -> bool:
    try:
        public_key_of_node_id(value)  # type: ignore[arg-type]
    except IdentityError:
        return False
    return True


def node_id_from_certificate(cert: x509.Certificate) -> str:
    """The node id of the key a certificate carries; IdentityError if it is not Ed25519."""
    try:
        key = cert.public_key()
    except (ValueError, TypeError) as exc:  # unsupported or malformed key
        raise IdentityError(f"certificate key unreadable: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IdentityError(f"certificate key is {type(key).__name__}, not Ed25519")
    return node_id_from_public_key(key)


def self_signed_certificate(private_key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    """A self-signed X.509 certificate of the key, subject CN = node id."""
    node_id = node_id_from_public_key(private_key.public_key())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(private_key, algorithm=None)  # Ed25519 signs without a separate digest
    )


@dataclass(frozen=True)
class NodeIdentity:
    """This node's key, id and certificate."""

    private_key: ed25519.Ed25519PrivateKey
    node_id: str = field(init=False)
    certificate: x509.Certificate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", node_id_from_public_key(self.private_key.public_key()))
        object.__setattr__(self, "certificate", self_signed_certificate(self.private_key))

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity kept only in memory (tests, throwaway clients)."""
        return cls(ed25519.Ed25519PrivateKey.generate())


def write_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 holding ``data``, atomically; False if it already exists.

    Written to a temporary name first and linked into place, so a crash never leaves a half
    file under the real name, and of two processes racing to create it exactly one wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # in case a umask or odd filesystem widened it
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_private_file(path: Path) -> bytes:
    """Read a secret file, first narrowing its mode to 0600 if others could read it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s had mode %o; narrowing to 0600", path, mode)
        os.chmod(path, 0o600)
    return path.read_bytes()


def load_or_create_identity(home: str | os.PathLike) -> NodeIdentity:
    """This node's identity from ``<home>/node_key.pem``, creating the key on first use."""
    path = Path(home) / KEY_FILE
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if write_private_file(path, pem):
            identity = NodeIdentity(key)
            log.info("created node key %s (node id %s)", path, identity.node_id)
            return identity
    try:
        loaded = serialization.load_pem_private_key(read_private_file(path), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot read node key {path}: {exc}") from exc
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"node key {path} is {type(loaded).__name__}, not Ed25519")
    return NodeIdentity(loaded)
