"""Content ids: BLAKE3 digests written as CIDv1 (raw codec, blake3 multihash, base32 lower).

Such ids start with ``bafkr4i``; the layout is fixed, so parsing is a prefix check plus a
base32 decode rather than a general multiformats library.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import blake3

_CID_VERSION = 0x01
_RAW_CODEC = 0x55
_BLAKE3_MULTIHASH = 0x1E
_DIGEST_LEN = 32
# varint(1) varint(0x55) varint(0x1e) varint(32): each fits in one byte.
_PREFIX = bytes([_CID_VERSION, _RAW_CODEC, _BLAKE3_MULTIHASH, _DIGEST_LEN])
_CID_LEN = 1 + 58  # "b" + base32(36 bytes) without padding


class CIDError(ValueError):
    """A string that is not a CIDv1/raw/blake3 id."""


def cid_from_digest(digest: bytes) -> str:
    if len(digest) != _DIGEST_LEN:
        raise CIDError(f"blake3 digest must be {_DIGEST_LEN} bytes, got {len(digest)}")
    text = base64.b32encode(_PREFIX + digest).decode("ascii").lower().rstrip("=")
    return "b" + text


def cid_of(data: bytes | memoryview) -> str:
    """The CID of one byte string."""
    return cid_from_digest(blake3.blake3(data).digest())


def cid_of_chunks(chunks: Iterable[bytes | memoryview]) -> str:
    """The CID of the concatenation of ``chunks``, without joining them in memory."""
    hasher = blake3.blake3()
    for chunk in chunks:
        hasher.update(chunk)
    return cid_from_digest(hasher.digest())


def digest_of_cid(cid: str) -> bytes:
    """The BLAKE3 digest inside ``cid``; raises CIDError for anything else."""
    if not isinstance(cid, str) or len(cid) != _CID_LEN or not cid.startswith("b"):
        raise CIDError(f"not a CIDv1 blake3 id: {cid!r:.80}")
    body = cid[1:]
    if body != body.lower():
        raise CIDError(f"CID must be base32 lower case: {cid!r:.80}")
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise CIDError(f"CID is not valid base32: {cid!r:.80}") from exc
    if raw[:4] != _PREFIX or len(raw) != 4 + _DIGEST_LEN:
        raise CIDError(f"CID is not CIDv1/raw/blake3-256: {cid!r:.80}")
    if cid_from_digest(raw[4:]) != cid:  # non-zero padding bits: two spellings of one id
        raise CIDError(f"CID is not in canonical form: {cid!r:.80}")
    return raw[4:]


def is_cid(value: object) -> bool:
    try:
        digest_of_cid(value)  # type: ignore[arg-type]
    except CIDError:
        return False
    return True
