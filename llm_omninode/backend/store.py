"""The on-disk shard store: shards under their CID, manifests under the model id.

Layout under the root (``OMNI_HOME``, by default ``llm.user_dir()/omni``)::

    shards/<cid>            shard bytes received from peers, verified before they got this name
    tmp/                    partial writes; never read as shards
    manifests/<model>.json  canonical manifest JSON, file name = model id
    sources.json            models added from a local GGUF: served from that file, not copied

``put`` writes to a temporary name, hashes while writing, and renames only when the BLAKE3
digest matches the CID, so a crash or a corrupt sender never leaves a bad shard under a valid id.
A transfer from peers (net/transfer.py) appends to ``tmp/<cid>.part`` instead, so it can resume
at any offset after a dropped connection; ``commit_partial`` hashes it and renames it the same way.

A full disk (or quota) while writing anything here raises ``StorageFull``, once what was partly
written is removed: the message says what was being stored, where, and how much room is left.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import numpy as np

from .cid import cid_from_digest, cid_of_chunks, digest_of_cid
from .shards import Manifest, ShardEntry, TensorEntry, shard_chunks

if TYPE_CHECKING:
    from .gguf import GGUFFile

_CHUNK = 8 * 1024 * 1024


class StoreError(RuntimeError):
    """A shard that is missing, corrupt, or cannot be written."""


# what a write gets from a full file system or an exhausted quota
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
PARTLY_WRITTEN = "the partly written file was removed"
PARTIAL_DOWNLOAD = "the partial download was removed"


class StorageFull(StoreError, OSError):
    """The disk (or the quota) ran out while writing; the partly written file is gone.

    An OSError too (errno ENOSPC), so code that tells local failures from a peer's by
    ``OSError`` (net/transfer.py) sees it as ours."""

    def __init__(
        self, message: str, path: Path | None = None, need: int | None = None,
        free: int | None = None, removed: str = "",
    ) -> None:  # fmt: skip
        OSError.__init__(self, errno.ENOSPC, message)
        self.message, self.path, self.need, self.free = message, path, need, free
        self.removed = removed  # what was deleted to give the space back ("" if nothing)

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes a write under ``path`` may still use (None if the file system will not say)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def storage_full(
    what: str, where: str | os.PathLike, need: int | None = None, removed: str = ""
) -> StorageFull:
    """The StorageFull for a write of ``what`` under ``where`` that ran out of room, once
    the partial write is gone (so the free space said is what there really is)."""
    free = free_bytes(where)
    room = [f"needs {human_bytes(need)}"] if need is not None else []
    room += [f"{human_bytes(free)} free"] if free is not None else []
    message = f"disk full while storing {what} in {where}"
    message += f" ({', '.join(room)})" if room else ""
    message += f"; {removed}" if removed else ""
    return StorageFull(message, Path(where), need, free, removed)


@dataclass(frozen=True)
class FileSource:
    """A local GGUF whose tensors back a model's shards."""

    path: str
    size: int
    mtime_ns: int


class ShardStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.tmp_dir = self.root / "tmp"
        self.manifest_dir = self.root / "manifests"
        for d in (self.shard_dir, self.tmp_dir, self.manifest_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._sources_path = self.root / "sources.json"
        self._open_files: dict[str, GGUFFile] = {}
        # manifests are content-addressed (file name = CID of the bytes): safe to keep parsed
        self._manifests: dict[str, Manifest] = {}

    # ---- shards ---------------------------------------------------------------------------
    def _shard_path(self, cid: str) -> Path:
        digest_of_cid(cid)  # a CID is the only name a caller (or a peer) can give us
        return self.shard_dir / cid

    def has(self, cid: str) -> bool:
        return self._shard_path(cid).is_file() or self._file_backed(cid) is not None

    def put(self, cid: str, chunks: Iterable[bytes | memoryview], size: int | None = None) -> Path:
        """Store a shard from ``chunks``; raises StoreError (and keeps nothing) on a mismatch."""
        path = self._shard_path(cid)
        hasher = blake3.blake3()
        written = 0
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=cid[:16] + ".", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise StoreError(f"shard {cid}: more than the expected {size} bytes")
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size is not None and written != size:
                raise StoreError(f"shard {cid}: got {written} bytes, expected {size}")
            got = cid_from_digest(hasher.digest())
            if got != cid:
                raise StoreError(f"shard {cid}: content hashes to {got}")
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            if is_disk_full(exc):
                raise storage_full(f"shard {cid}", self.tmp_dir, size, PARTLY_WRITTEN) from exc
            raise
        return path

    def put_bytes(self, cid: str, data: bytes) -> Path:
        return self.put(cid, [data], size=len(data))

    def remove(self, cid: str) -> bool:
        path = self._shard_path(cid)
        if path.exists():
            path.unlink()
            return True
        return False

    def size(self, cid: str) -> int | None:
        """Byte size of a shard we hold (received or file-backed); None if we do not hold it."""
        path = self._shard_path(cid)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            pass
        backed = self._file_backed(cid)
        return None if backed is None else backed[1].size

    def read(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        """A byte range of a shard (what a peer's ranged read gets); only that range is read.

        Read with ``pread``, from the shard file or the model's GGUF, never through a mapping:
        serving peers leaves no pages of the model in this process (its resident memory), only
        in the page cache. ``open`` maps, for a stage's own weights."""
        path = self._shard_path(cid)
        if path.is_file():
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start, end = _range(cid, size, offset, length)
                return _pread_exactly(f.fileno(), start, end - start)
        backed = self._file_backed(cid)
        if backed is None:
            raise StoreError(f"shard {cid} is not in the store")
        source, shard = backed
        start, end = _range(cid, shard.size, offset, length)
        with self._file_reader(source, shard) as read_at:
            return b"".join(_shard_range(shard, read_at, start, end))

    def open(self, cid: str) -> memoryview:
        """The whole shard, zero-copy (a mapping of the shard file or of the source GGUF)."""
        path = self._shard_path(cid)
        if path.is_file():
            return memoryview(_map(path))
        backed = self._file_backed(cid)
        if backed is None:
            raise StoreError(f"shard {cid} is not in the store")
        source, shard = backed
        # a file-backed shard is only contiguous with padding rebuilt; join once on request
        return memoryview(b"".join(shard_chunks(shard, self._gguf(source).tensor_data)))

    def verify(self, cid: str) -> bool:
        """Re-hash a stored shard, read as ``read`` reads it; a mismatch means the disk changed
        under us."""
        path = self._shard_path(cid)
        if path.is_file():
            with open(path, "rb") as f:
                return cid_of_chunks(iter(lambda: f.read(_CHUNK), b"")) == cid
        backed = self._file_backed(cid)
        if backed is None:
            return False
        source, shard = backed
        with self._file_reader(source, shard) as read_at:
            chunks = (
                b"".join(_shard_range(shard, read_at, lo, min(lo + _CHUNK, shard.size)))
                for lo in range(0, shard.size, _CHUNK)
            )
            return cid_of_chunks(chunks) == cid

    def shards(self) -> Iterator[str]:
        for path in sorted(self.shard_dir.iterdir()):
            yield path.name

    # ---- resumable partial writes (a shard arriving from peers) ------------------------------
    def _partial_path(self, cid: str) -> Path:
        digest_of_cid(cid)  # validated before any path is built
        return self.tmp_dir / f"{cid}.part"

    def partial_size(self, cid: str) -> int:
        """Bytes of ``cid`` received so far (0 if no transfer is under way)."""
        try:
            return self._partial_path(cid).stat().st_size
        except FileNotFoundError:
            return 0

    def append_partial(self, cid: str, offset: int, data: bytes | memoryview) -> None:
        """Append ``data`` at ``offset``, which must be exactly the bytes received so far."""
        path = self._partial_path(cid)
        try:
            with open(path, "ab") as out:
                have = os.fstat(out.fileno()).st_size
                if offset != have:
                    raise StoreError(f"shard {cid}: append at {offset}, but the partial has {have}")
                out.write(data)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            path.unlink(missing_ok=True)  # the space goes back; the next try starts over
            raise storage_full(f"shard {cid}", self.tmp_dir, removed=PARTIAL_DOWNLOAD) from exc

    def commit_partial(self, cid: str, size: int) -> Path:
        """Verify the partial against its CID and give it its name; StoreError on a mismatch
        (a partial with the wrong content or too many bytes is deleted; a short one is kept)."""
        partial = self._partial_path(cid)
        path = self._shard_path(cid)
        if size == 0:
            partial.touch()  # nothing was appended; the empty shard has a CID too
        try:
            f = open(partial, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            raise StoreError(f"shard {cid}: no partial to commit") from None
        with f:
            have = os.fstat(f.fileno()).st_size
            if have != size:
                if have > size:
                    partial.unlink(missing_ok=True)
                raise StoreError(f"shard {cid}: partial has {have} bytes, expected {size}")
            hasher = blake3.blake3()
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                hasher.update(chunk)
            got = cid_from_digest(hasher.digest())
            if got != cid:
                partial.unlink(missing_ok=True)
                raise StoreError(f"shard {cid}: received bytes hash to {got}, expected {cid}")
            try:
                os.fsync(f.fileno())  # the bytes are on disk before the name says they are good
            except OSError as exc:  # delayed allocation: the room may run out only now
                if not is_disk_full(exc):
                    raise
                partial.unlink(missing_ok=True)
                raise storage_full(f"shard {cid}", self.tmp_dir, size, PARTIAL_DOWNLOAD) from exc
        os.replace(partial, path)
        _fsync_dir(self.shard_dir)
        return path

    def discard_partial(self, cid: str) -> None:
        self._partial_path(cid).unlink(missing_ok=True)

    # ---- tensors of a shard -----------------------------------------------------------------
    def tensor_views(self, shard: ShardEntry, model_id: str | None = None) -> dict[str, np.ndarray]:
        """uint8 views of each tensor of ``shard``, zero-copy from whichever copy we hold."""
        path = self._shard_path(shard.cid)
        if path.is_file():
            data = np.frombuffer(_map(path), dtype=np.uint8)
            if len(data) != shard.size:
                raise StoreError(f"shard {shard.name} ({shard.cid}) has the wrong size")
            return {t.name: data[t.offset : t.offset + t.nbytes] for t in shard.tensors}
        backed = self._file_backed(shard.cid, model_id)
        if backed is None:
            raise StoreError(f"shard {shard.name} ({shard.cid}) is not in the store")
        gguf = self._gguf(backed[0])
        return {t.name: gguf.tensor_data(t.name) for t in shard.tensors}

    # ---- manifests and file sources -----------------------------------------------------------
    def put_manifest(self, manifest: Manifest) -> str:
        model_id = manifest.model_id
        target = self.manifest_dir / f"{model_id}.json"
        if not target.exists():
            _atomic_write(target, manifest.to_json())
        return model_id

    def get_manifest(self, model_id: str) -> Manifest:
        digest_of_cid(model_id)
        path = self.manifest_dir / f"{model_id}.json"
        if not path.is_file():
            self._manifests.pop(model_id, None)
            raise StoreError(f"no manifest for model {model_id}")
        manifest = self._manifests.get(model_id)
        if manifest is None:
            manifest = self._manifests[model_id] = Manifest.from_json(path.read_bytes())
        return manifest

    def has_manifest(self, model_id: str) -> bool:
        return (self.manifest_dir / f"{model_id}.json").is_file()

    def remove_manifest(self, model_id: str) -> None:
        digest_of_cid(model_id)
        (self.manifest_dir / f"{model_id}.json").unlink(missing_ok=True)
        self._manifests.pop(model_id, None)
        sources = self._sources()
        if sources.pop(model_id, None) is not None:
            _atomic_write(self._sources_path, json.dumps(sources, indent=1).encode())

    def manifests(self) -> list[str]:
        return sorted(p.stem for p in self.manifest_dir.glob("*.json"))

    def add_file_source(self, model_id: str, path: str | os.PathLike) -> None:
        """Serve ``model_id``'s shards from ``path``: the file is mapped, never copied."""
        st = os.stat(path)
        sources = self._sources()
        sources[model_id] = {
            "path": str(Path(path).resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        _atomic_write(self._sources_path, json.dumps(sources, indent=1).encode())

    def file_source(self, model_id: str) -> FileSource | None:
        entry = self._sources().get(model_id)
        if not isinstance(entry, dict):
            return None
        return FileSource(str(entry["path"]), int(entry["size"]), int(entry["mtime_ns"]))

    def _sources(self) -> dict:
        try:
            data = json.loads(self._sources_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self._sources_path} is unreadable: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def _file_backed(
        self, cid: str, model_id: str | None = None
    ) -> tuple[FileSource, ShardEntry] | None:
        ids = [model_id] if model_id else list(self._sources())
        for mid in ids:
            source = self.file_source(mid)
            if source is None or not self.has_manifest(mid):
                continue
            for shard in self.get_manifest(mid).shards:
                if shard.cid == cid:
                    return source, shard
        return None

    def _gguf(self, source: FileSource):
        from .gguf import open_gguf  # deferred: only needed for file-backed models

        try:
            st = os.stat(source.path)
        except OSError as exc:
            raise StoreError(f"model file {source.path} is gone: {exc}") from exc
        if st.st_size != source.size or st.st_mtime_ns != source.mtime_ns:
            raise StoreError(f"model file {source.path} changed since it was added; add it again")
        gguf = self._open_files.get(source.path)
        if gguf is None:
            gguf = open_gguf(source.path)
            self._open_files[source.path] = gguf
        return gguf

    @contextlib.contextmanager
    def _file_reader(
        self, source: FileSource, shard: ShardEntry
    ) -> Iterator[Callable[[TensorEntry, int, int], bytes]]:
        """``read_at(tensor, lo, hi)``: bytes [lo, hi) of one of ``shard``'s tensors, read from
        the GGUF with ``pread`` (its parsed header says where each tensor lies)."""
        gguf = self._gguf(source)
        where = {}
        for entry in shard.tensors:
            info = gguf.tensors.get(entry.name)
            if info is None or info.nbytes != entry.nbytes:
                got = "no such tensor" if info is None else f"{info.nbytes} bytes"
                raise StoreError(f"tensor {entry.name}: {got} in {source.path}, not {entry.nbytes}")
            where[entry.name] = gguf.data_offset + info.offset
        try:
            fd = os.open(source.path, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"model file {source.path} is unreadable: {exc}") from exc
        try:
            st = os.fstat(fd)  # the file opened is the one checked (and parsed) by _gguf
            if st.st_size != source.size or st.st_mtime_ns != source.mtime_ns:
                raise StoreError(
                    f"model file {source.path} changed since it was added; add it again"
                )
            yield lambda entry, lo, hi: _pread_exactly(fd, where[entry.name] + lo, hi - lo)
        finally:
            os.close(fd)

    def close(self) -> None:
        for gguf in self._open_files.values():
            gguf.close()
        self._open_files.clear()


def _map(path: Path) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _range(cid: str, size: int, offset: int, length: int | None) -> tuple[int, int]:
    """[start, end) of a ranged read, clipped at the end of the shard."""
    if offset < 0 or offset > size:
        raise StoreError(f"shard {cid}: offset {offset} outside 0..{size}")
    end = size if length is None else min(size, offset + max(0, length))
    return offset, end


def _pread_exactly(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:  # pread may return short; an empty read means the file shrank
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise StoreError(f"shard file shrank while reading at {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _shard_range(
    shard: ShardEntry, read_at: Callable[[TensorEntry, int, int], bytes], start: int, end: int
) -> Iterator[bytes]:
    """The bytes [start, end) of a file-backed shard: ``read_at(tensor, lo, hi)`` of only the
    tensors (and zero padding) that overlap the range, instead of the whole shard joined."""
    tensors = shard.tensors
    # first tensor that ends after start (tensors are in offset order)
    first = bisect.bisect_right([t.offset + t.nbytes for t in tensors], start)
    position = tensors[first - 1].offset + tensors[first - 1].nbytes if first else 0
    for entry in tensors[first:]:
        if position >= end:
            return
        pad_lo, pad_hi = max(position, start), min(entry.offset, end)
        if pad_hi > pad_lo:  # zero padding before this tensor
            yield bytes(pad_hi - pad_lo)
        if entry.offset >= end:
            return
        lo = max(start, entry.offset) - entry.offset
        hi = min(end, entry.offset + entry.nbytes) - entry.offset
        yield read_at(entry, lo, hi)  # joined once by the caller
        position = entry.offset + entry.nbytes
    if position < end:  # a shard's size ends at its last tensor; nothing is past it
        raise StoreError(f"shard {shard.cid}: range ends past its tensors")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise storage_full(path.name, path.parent, len(data), PARTLY_WRITTEN) from exc
        raise
