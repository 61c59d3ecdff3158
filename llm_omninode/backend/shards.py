"""Shard planning and the model manifest.

A model is cut into content-addressed shards by tensor name: ``token_embd.*`` -> ``embed``,
``blk.N.*`` -> ``block.N``, ``output_norm.*``/``output.*`` -> ``head``, and the few tensors every
block reads (llama 3's ``rope_freqs``) -> ``shared``. A shard's bytes are its tensors' bytes in
file order, each started at a 32-byte boundary (zero padding), so any node can rebuild the same
bytes, and so the same CID, from its own copy of the file.

The manifest holds all GGUF metadata and the ordered shard list; the model id is the CID of its
canonical JSON. Manifests also arrive from peers, so ``Manifest.from_json`` checks everything,
the model's metadata against its tensors included (backend/model_check.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cid import CIDError, cid_of, cid_of_chunks, digest_of_cid
from .ggml_types import BLOCK_LAYOUT, GGMLType, GGUFValueType, tensor_nbytes
from .spec import MAX_BLOCKS

MANIFEST_FORMAT = "omninode/manifest/1"
SHARD_ALIGNMENT = 32
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_TENSORS_PER_SHARD = 4096
# Tensors read by every block rather than owned by one (llama 3 rope scaling factors).
SHARED_TENSORS = frozenset(
    {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
)

_BLOCK_RE = re.compile(r"blk\.(\d{1,6})\.[A-Za-z0-9_.]+")


class ManifestError(ValueError):
    """A tensor set that cannot be sharded, or a manifest that is malformed."""


def classify_tensor(name: str) -> tuple[str, int | None]:
    """``(kind, block index)`` of a tensor, by name alone."""
    if name.startswith("token_embd."):
        return "embed", None
    if name.startswith(("output_norm.", "output.")):
        return "head", None
    if name in SHARED_TENSORS:
        return "shared", None
    match = _BLOCK_RE.fullmatch(name)
    if match:
        return "block", int(match.group(1))
    raise ManifestError(f"tensor {name!r} belongs to no shard (not embed, blk.N, output or shared)")


def shard_name(kind: str, index: int | None) -> str:
    return f"block.{index}" if kind == "block" else kind


@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a shard; ``offset`` is from the start of the shard's bytes."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShardEntry:
    name: str  # "embed", "block.N", "head", "shared"
    kind: str
    index: int | None
    cid: str
    size: int
    tensors: tuple[TensorEntry, ...]
    # tensors this shard's stage needs from other shards (a tied head reads token_embd)
    refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardLayout:
    """The plan of one shard before hashing: which tensors, where in the shard's bytes."""

    name: str
    kind: str
    index: int | None
    tensors: tuple[TensorEntry, ...]
    size: int
    refs: tuple[str, ...] = ()


def _align(n: int, alignment: int = SHARD_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def plan_shards(tensors: Iterable[tuple[str, GGMLType, tuple[int, ...], int]]) -> list[ShardLayout]:
    """Group ``(name, type, shape, file_offset)`` tuples into ordered shard layouts.

    Pure: no bytes are read. Order is embed, shared, block 0..N-1, head; block indices must be
    0..N-1 with no gap, since a stage owns a contiguous range of them.
    """
    groups: dict[str, list[tuple[int, str, GGMLType, tuple[int, ...]]]] = {}
    kinds: dict[str, tuple[str, int | None]] = {}
    for name, ggml_type, shape, file_offset in tensors:
        kind, index = classify_tensor(name)
        key = shard_name(kind, index)
        kinds[key] = (kind, index)
        groups.setdefault(key, []).append((file_offset, name, GGMLType(ggml_type), tuple(shape)))
    if "embed" not in groups:
        raise ManifestError("model has no token_embd tensor")
    block_indices = sorted(i for k, i in kinds.values() if k == "block" and i is not None)
    if not block_indices:
        raise ManifestError("model has no blk.N tensors")
    if block_indices != list(range(len(block_indices))):
        raise ManifestError(f"block indices are not 0..{len(block_indices) - 1} without gaps")
    names = {name for group in groups.values() for _, name, _, _ in group}
    head_refs: tuple[str, ...] = ()
    if "output.weight" not in names:
        head_refs = ("token_embd.weight",)  # tied embedding: referenced, not duplicated
        kinds.setdefault("head", ("head", None))
        groups.setdefault("head", [])
    if not groups["head"] and "output_norm.weight" not in names:
        raise ManifestError("model has no output_norm tensor")

    order = ["embed"] + (["shared"] if "shared" in groups else [])
    order += [f"block.{i}" for i in block_indices] + ["head"]
    layouts = []
    for key in order:
        entries = []
        offset = 0
        for _, name, ggml_type, shape in sorted(groups[key], key=lambda t: (t[0], t[1])):
            offset = _align(offset)
            nbytes = tensor_nbytes(ggml_type, shape)
            entries.append(TensorEntry(name, ggml_type, shape, offset, nbytes))
            offset += nbytes
        kind, index = kinds[key]
        refs = head_refs if key == "head" else ()
        layouts.append(ShardLayout(key, kind, index, tuple(entries), offset, refs))
    return layouts


def shard_chunks(layout: ShardLayout | ShardEntry, tensor_bytes) -> Iterator[memoryview | bytes]:
    """The shard's bytes as chunks: each tensor via ``tensor_bytes(name)``, zero padding between."""
    position = 0
    for entry in layout.tensors:
        if entry.offset > position:
            yield bytes(entry.offset - position)
        data = memoryview(tensor_bytes(entry.name)).cast("B")
        if len(data) != entry.nbytes:
            raise ManifestError(
                f"tensor {entry.name} has {len(data)} bytes, expected {entry.nbytes}"
            )
        yield data
        position = entry.offset + entry.nbytes


@dataclass(frozen=True)
class Manifest:
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[int, int | None]]
    shards: tuple[ShardEntry, ...]
    _json: bytes = field(default=b"", repr=False, compare=False)

    # ---- identity -------------------------------------------------------------------------
    def to_json(self) -> bytes:
        """Canonical JSON: sorted keys, no spaces, UTF-8, so every node derives the same id."""
        if self._json:
            return self._json
        doc = {
            "format": MANIFEST_FORMAT,
            "metadata": self.metadata,
            "metadata_types": {k: list(v) for k, v in self.metadata_types.items()},
            "shards": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "index": s.index,
                    "cid": s.cid,
                    "size": s.size,
                    "refs": list(s.refs),
                    "tensors": [
                        {
                            "name": t.name,
                            "type": int(t.ggml_type),
                            "shape": list(t.shape),
                            "offset": t.offset,
                            "nbytes": t.nbytes,
                        }
                        for t in s.tensors
                    ],
                }
                for s in self.shards
            ],
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        object.__setattr__(self, "_json", raw.encode("utf-8"))
        return self._json

    @property
    def model_id(self) -> str:
        return cid_of(self.to_json())

    # ---- views ----------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def n_blocks(self) -> int:
        return sum(1 for s in self.shards if s.kind == "block")

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def shard(self, name: str) -> ShardEntry:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(name)

    def tensor_home(self) -> dict[str, ShardEntry]:
        """Which shard holds each tensor."""
        return {t.name: s for s in self.shards for t in s.tensors}

    def shards_for_stage(self, start: int, end: int) -> list[ShardEntry]:
        """Shards a stage running blocks [start, end) needs, references included."""
        if not 0 <= start < end <= self.n_blocks:
            raise ValueError(f"block range [{start}, {end}) outside 0..{self.n_blocks}")
        wanted = [f"block.{i}" for i in range(start, end)]
        if start == 0:
            wanted.insert(0, "embed")
        if end == self.n_blocks:
            wanted.append("head")
        if any(s.name == "shared" for s in self.shards):
            wanted.insert(0, "shared")
        chosen = [self.shard(n) for n in wanted]
        homes = self.tensor_home()
        for s in list(chosen):
            for ref in s.refs:
                home = homes[ref]
                if home not in chosen:
                    chosen.append(home)
        return chosen

    # ---- parsing (hostile input) ----------------------------------------------------------
    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        manifest = _manifest_from_doc(doc)
        if manifest.to_json() != raw:
            raise ManifestError("manifest is not in canonical form")
        # well formed; now its metadata against its tensors (a peer's block_count, widths,
        # vocabulary, special ids and chat template are no more trusted than a file's)
        from .model_check import check_model

        check_model(
            manifest.metadata, {t.name: t.shape for s in manifest.shards for t in s.tensors}
        )
        return manifest


def _check(cond: bool, problem: str) -> None:
    if not cond:
        raise ManifestError(problem)


def _int(value: Any, what: str, low: int = 0, high: int = 2**62) -> int:
    _check(type(value) is int and low <= value <= high, f"{what} must be an int in [{low}, {high}]")
    return value


def _manifest_from_doc(doc: Any) -> Manifest:
    _check(isinstance(doc, dict), "manifest must be an object")
    _check(doc.get("format") == MANIFEST_FORMAT, f"manifest format must be {MANIFEST_FORMAT!r}")
    metadata = doc.get("metadata")
    types = doc.get("metadata_types")
    _check(isinstance(metadata, dict) and isinstance(types, dict), "metadata must be objects")
    _check(set(metadata) == set(types), "metadata and metadata_types name different keys")
    metadata_types: dict[str, tuple[int, int | None]] = {}
    for key, pair in types.items():
        _check(isinstance(pair, list) and len(pair) == 2, f"metadata type of {key!r} malformed")
        vtype = _int(pair[0], f"type of {key!r}", 0, max(GGUFValueType))
        item = pair[1]
        _check(item is None or type(item) is int, f"item type of {key!r} malformed")
        metadata_types[key] = (vtype, item)
    shards_doc = doc.get("shards")
    _check(isinstance(shards_doc, list) and 0 < len(shards_doc) <= MAX_BLOCKS + 3, "bad shard list")
    shards = []
    seen_cids: set[str] = set()
    for i, s in enumerate(shards_doc):
        _check(isinstance(s, dict), f"shard {i} must be an object")
        name, kind, index = s.get("name"), s.get("kind"), s.get("index")
        _check(kind in ("embed", "block", "head", "shared"), f"shard {i} has unknown kind")
        if kind == "block":
            index = _int(index, f"shard {i} index", 0, MAX_BLOCKS)
        else:
            _check(index is None, f"shard {i} of kind {kind} has an index")
        _check(name == shard_name(kind, index), f"shard {i} name {name!r} does not match its kind")
        cid = s.get("cid")
        try:
            digest_of_cid(cid)
        except CIDError as exc:
            raise ManifestError(f"shard {name}: {exc}") from exc
        _check(cid not in seen_cids, f"shard {name} repeats a CID")
        seen_cids.add(cid)
        size = _int(s.get("size"), f"shard {name} size")
        refs = s.get("refs")
        _check(isinstance(refs, list) and all(isinstance(r, str) for r in refs), "bad refs")
        tensors_doc = s.get("tensors")
        _check(
            isinstance(tensors_doc, list) and len(tensors_doc) <= MAX_TENSORS_PER_SHARD,
            f"shard {name} tensor list malformed",
        )
        tensors = []
        end = 0
        for t in tensors_doc:
            _check(isinstance(t, dict), f"shard {name}: tensor entry must be an object")
            tname = t.get("name")
            _check(isinstance(tname, str) and 0 < len(tname) <= 256, "bad tensor name")
            _check(classify_tensor(tname)[0] == kind, f"tensor {tname} does not belong in {name}")
            try:
                ttype = GGMLType(_int(t.get("type"), f"type of {tname}", 0, 255))
            except ValueError as exc:
                raise ManifestError(f"tensor {tname} has an unknown ggml type") from exc
            shape = t.get("shape")
            _check(isinstance(shape, list) and 1 <= len(shape) <= 4, f"bad shape of {tname}")
            shape_t = tuple(_int(d, f"dim of {tname}", 1, 2**40) for d in shape)
            _check(shape_t[0] % BLOCK_LAYOUT[ttype][0] == 0, f"{tname}: ne[0] not whole blocks")
            nbytes = _int(t.get("nbytes"), f"nbytes of {tname}")
            _check(nbytes == tensor_nbytes(ttype, shape_t), f"nbytes of {tname} disagrees")
            offset = _int(t.get("offset"), f"offset of {tname}")
            _check(
                offset >= end and offset % SHARD_ALIGNMENT == 0, f"{tname} overlaps or unaligned"
            )
            end = offset + nbytes
            tensors.append(TensorEntry(tname, ttype, shape_t, offset, nbytes))
        _check(end == size, f"shard {name} size {size} does not match its tensors ({end})")
        shards.append(ShardEntry(name, kind, index, cid, size, tuple(tensors), tuple(refs)))
    names = [s.name for s in shards]
    n_blocks = sum(1 for s in shards if s.kind == "block")
    expected = ["embed"] + (["shared"] if "shared" in names else [])
    expected += [f"block.{i}" for i in range(n_blocks)] + ["head"]
    _check(names == expected, "shards are not embed, [shared], block.0..N-1, head in order")
    homes = {t.name for s in shards for t in s.tensors}
    for s in shards:
        for ref in s.refs:
            _check(ref in homes, f"shard {s.name} references unknown tensor {ref}")
    return Manifest(dict(metadata), metadata_types, tuple(shards))


def build_manifest(
    metadata: Mapping[str, Any],
    metadata_types: Mapping[str, tuple[int, int | None]],
    tensors: Iterable[tuple[str, GGMLType, tuple[int, ...], int]],
    tensor_bytes,
) -> Manifest:
    """Plan shards, hash each one's bytes (read via ``tensor_bytes(name)``), build the manifest."""
    shards = []
    for layout in plan_shards(tensors):
        cid = cid_of_chunks(shard_chunks(layout, tensor_bytes))
        shards.append(
            ShardEntry(
                layout.name,
                layout.kind,
                layout.index,
                cid,
                layout.size,
                layout.tensors,
                layout.refs,
            )
        )
    types = {k: (int(v[0]), None if v[1] is None else int(v[1])) for k, v in metadata_types.items()}
    return Manifest(_jsonable(dict(metadata)), types, tuple(shards))


def _jsonable(value: Any) -> Any:
    """Metadata as JSON keeps it: tuples become lists, NumPy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def manifest_from_gguf(gguf) -> Manifest:
    """The manifest of an open GGUF file (``llm_omninode.backend.gguf.GGUFFile``)."""
    tensors = [(t.name, t.ggml_type, t.shape, t.offset) for t in gguf.tensors.values()]
    return build_manifest(gguf.metadata, gguf.metadata_types, tensors, gguf.tensor_data)
