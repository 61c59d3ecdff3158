"""Shard transfer between peers: ranged reads over admitted QUIC connections.

Wire (frames.py): the fetching node opens one stream per window and sends
``SHARD_READ {id, cid, offset, length <= MAX_WINDOW}``; the serving node answers with
``SHARD_DATA {id, cid, offset, size}`` frames of at most CHUNK bytes, in order and without
gaps, the last one flagged ``FLAG_LAST`` -- or with one ERROR (``not_found``, ``bad_request``).

The fetching side writes every byte it accepts to a ``ShardSink`` (the store's partial file)
before asking for more, so a dropped connection resumes at ``sink.partial_size(cid)``, even
after a restart. Nothing a peer sends is trusted: each frame's id, cid, offset, size and
length are checked against what was asked, and the finished shard is hashed against its CID
by ``sink.commit_partial`` before it gets its name. Bytes that do not hash to the CID are
discarded and the shard is fetched again from the next peer.

net/ never imports backend/: the store implements ``ShardReader`` and ``ShardSink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import settings
from .frames import (
    FLAG_LAST,
    MAX_ID,
    MAX_SHARD_WINDOW,
    ErrorCode,
    Frame,
    FrameError,
    FrameType,
    error_frame,
    is_wire_cid,
    shard_data_frame,
    shard_read_frame,
)
from .quic import Connection
from .streams import ConnectionClosed, FrameStream, NetError, PeerRefused, RemoteError

log = logging.getLogger(__name__)

MAX_WINDOW = MAX_SHARD_WINDOW  # the most bytes one SHARD_READ may ask for
# What fetch_shard asks for per SHARD_READ. Smaller than MAX_WINDOW on purpose: the server
# queues a whole window in aioquic's send buffer, which copies that buffer on every append,
# so 64 MiB windows cost the server ~20-30% more CPU than 8 MiB ones (bench/transfer.py) and
# hold 64 MiB per request; the extra round trip per 8 MiB is lost in the noise.
WINDOW = 8 * 1024 * 1024
CHUNK = 1 * 1024 * 1024  # bytes per SHARD_DATA frame inside a window
FRAME_TIMEOUT = 30.0  # seconds to wait for each frame of a window before reconnecting

Progress = Callable[[str, int, int], None]  # (cid, bytes done, total)

# Test-only throttles, read from the environment of the fetching process and unset in real
# use: they let tests/test_shard_crash.py kill a shim mid-download deterministically (no
# timing): windows of at most OMNI_TEST_FETCH_WINDOW bytes, and once a shard has received
# OMNI_TEST_FETCH_STALL_AFTER bytes in this process, its download hangs until killed.
TEST_WINDOW_ENV = "OMNI_TEST_FETCH_WINDOW"
TEST_STALL_ENV = "OMNI_TEST_FETCH_STALL_AFTER"


def _test_limit(name: str) -> int | None:
    return settings.test_limit(name)


class ShardReader(Protocol):
    """What a serving node offers (the shard store implements it)."""

    def size(self, cid: str) -> int | None: ...

    def read(self, cid: str, offset: int, length: int) -> bytes | memoryview: ...


class ShardSink(Protocol):
    """Where a fetching node writes (the shard store implements it)."""

    def partial_size(self, cid: str) -> int: ...

    def append_partial(self, cid: str, offset: int, data: bytes) -> None: ...

    def commit_partial(self, cid: str, size: int) -> object: ...  # raises on a hash mismatch

    def discard_partial(self, cid: str) -> None: ...


@dataclass(frozen=True)
class ShardSource:
    """A peer that holds a shard, and how to reach it."""

    node_id: str
    connect: Callable[[], Awaitable[Connection]]  # an admitted connection (may be cached)


class TransferError(NetError):
    """Every source failed; ``failures`` says why, per node id (or per CID for many shards),
    and ``refused`` per shard: CID -> {node id -> why that source was refused}."""

    def __init__(
        self,
        message: str,
        failures: dict[str, str] | None = None,
        refused: dict[str, dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})
        self.refused = dict(refused or {})


# ---- serving ------------------------------------------------------------------------------


async def handle_shard_read(
    frame: Frame, stream: FrameStream, reader: ShardReader, *, chunk: int = CHUNK
) -> None:
    """Answer one SHARD_READ on ``stream`` (and end it): the range as SHARD_DATA frames.

    The range is read from ``reader`` one chunk at a time, so a 64 MiB window is never held
    twice; the frames decoder has already checked the header's types and limits.
    """
    request_id = frame.id
    if frame.type != FrameType.SHARD_READ or request_id is None:
        stream.end(error_frame(ErrorCode.BAD_REQUEST, "expected SHARD_READ", request_id))
        return
    cid, offset, length = frame.header["cid"], frame.header["offset"], frame.header["length"]
    if not 0 < length <= MAX_WINDOW:  # frames.py checks this too; a window is our promise
        stream.end(error_frame(ErrorCode.TOO_LARGE, f"length over {MAX_WINDOW}", request_id))
        return
    try:
        size = reader.size(cid)
    except ValueError:  # the store refuses anything that is not a canonical CID
        stream.end(error_frame(ErrorCode.BAD_REQUEST, "not a CID", request_id))
        return
    if size is None:
        stream.end(error_frame(ErrorCode.NOT_FOUND, f"no shard {cid}", request_id))
        return
    if offset > size:
        message = f"offset {offset} past the end of {cid} ({size} bytes)"
        stream.end(error_frame(ErrorCode.BAD_REQUEST, message, request_id))
        return
    end = min(size, offset + length)
    position = offset
    while True:
        take = min(chunk, end - position)
        try:
            data = reader.read(cid, position, take) if take else b""
        except Exception:  # the file went away or changed; say so without local details
            log.exception("reading %s at %d for %s failed", cid, position, stream.peer_id)
            stream.end(error_frame(ErrorCode.INTERNAL, "shard read failed", request_id))
            return
        if len(data) != take:
            log.error("shard %s: read %d bytes at %d, wanted %d", cid, len(data), position, take)
            stream.end(error_frame(ErrorCode.INTERNAL, "shard read came up short", request_id))
            return
        reply = shard_data_frame(request_id, cid, position, data, size=size)
        position += take
        if position >= end:
            stream.end(dataclasses.replace(reply, flags=FLAG_LAST))
            return
        await stream.send(reply)


# ---- fetching -----------------------------------------------------------------------------


class _PeerFault(Exception):
    """The peer broke the protocol (or lied about the shard): do not retry it."""


class _NotHere(Exception):
    """The peer does not hold the shard."""


@dataclass
class _Job:
    """One shard being fetched: what was asked, and who has served its bytes so far."""

    cid: str
    size: int
    sink: ShardSink
    progress: Progress | None
    window: int
    timeout: float
    served_by: list[str] = dataclasses.field(default_factory=list)
    received: int = 0  # bytes appended by this process (a resumed partial holds more)

    def report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(self.cid, done, self.size)


async def fetch_shard(
    cid: str,
    size: int,
    sources: Sequence[ShardSource],
    sink: ShardSink,
    *,
    progress: Progress | None = None,
    window: int = WINDOW,
    retries: int = 3,
    timeout: float = FRAME_TIMEOUT,
) -> str:
    """Fetch shard ``cid`` of ``size`` bytes into ``sink``; return the node id that served it.

    Resumes at ``sink.partial_size(cid)``. A dropped connection or a timeout reconnects to the
    same source and resumes, up to ``retries`` times in a row without progress; a source that
    lacks the shard, breaks the protocol or is refused is left for the next one. The complete
    partial is committed (hashed against the CID); bytes that do not match are discarded, the
    peers that served them logged, and the shard fetched again from the next source.
    TransferError (with every source's reason) when no source delivers. A partial that an
    earlier run completed is committed without a connection (credited to the first source).
    """
    if not is_wire_cid(cid):
        raise ValueError(f"not a CID: {cid!r:.80}")
    if type(size) is not int or not 0 <= size <= MAX_ID:
        raise ValueError(f"bad shard size {size!r}")
    if not 0 < window <= MAX_WINDOW:
        raise ValueError(f"window must be in 1..{MAX_WINDOW}")
    window = min(window, _test_limit(TEST_WINDOW_ENV) or window)
    job = _Job(cid, size, sink, progress, window, timeout)
    kept = sink.partial_size(cid)
    if 0 < kept <= size:  # left by a dropped connection or an earlier run (even a kill -9)
        log.info("shard %s: resuming at byte %d of %d from the partial kept", cid, kept, size)
    job.report(min(kept, size))
    failures: dict[str, str] = {}
    for source in sources:
        reason = await _fetch_from(job, source, retries)
        if reason is None:
            return source.node_id
        failures[source.node_id] = reason
    why = "; ".join(f"{node}: {reason}" for node, reason in failures.items()) or "no sources"
    raise TransferError(f"shard {cid}: every source failed ({why})", failures, {cid: failures})


async def _fetch_from(job: _Job, source: ShardSource, retries: int) -> str | None:
    """Fetch (the rest of) the shard from one source and commit it; None on success, else
    why this source failed."""
    while True:
        reason = await _download(job, source, retries)
        if reason is not None:
            return reason
        left_by_earlier_run = not job.served_by and job.sink.partial_size(job.cid) > 0
        reason = await _commit(job)
        if reason is None or not left_by_earlier_run:
            return reason
        # bad bytes from an earlier run, none from this source: now fetch them all from it


async def _download(job: _Job, source: ShardSource, retries: int) -> str | None:
    """Bring the partial up to the full size from ``source``; None when done, else why not."""
    failures_in_a_row = 0
    while (have := _start_offset(job)) < job.size:
        try:
            conn = await _connect(source)
            await _pull(job, conn, source.node_id)
        except (_PeerFault, FrameError) as exc:
            log.warning("shard %s: peer %s misbehaved: %s", job.cid, source.node_id, exc)
            return f"protocol violation: {exc}"
        except _NotHere as exc:
            return str(exc)
        except PeerRefused as exc:
            return f"refused: {exc}"
        except NetError as exc:  # dropped, timed out, busy, unreachable: the sink's errors pass
            progressed = job.sink.partial_size(job.cid) > have
            failures_in_a_row = 0 if progressed else failures_in_a_row + 1
            if failures_in_a_row > retries:
                return f"gave up after {retries} retries: {exc}"
            log.info("shard %s from %s interrupted (%s); resuming", job.cid, source.node_id, exc)
            await asyncio.sleep(min(1.0, 0.05 * 2**failures_in_a_row))
    return None


async def _commit(job: _Job) -> str | None:
    """Hash the complete partial against the CID and name it; None, or why it was refused."""
    try:  # hashing (and fsync) of a large shard: off the event loop
        await asyncio.to_thread(job.sink.commit_partial, job.cid, job.size)
    except OSError:
        raise  # our disk, not a peer's fault
    except Exception as exc:
        served = ", ".join(dict.fromkeys(job.served_by)) or "an earlier run"
        log.warning(
            "shard %s: bytes served by %s do not match the CID (%s); discarded",
            job.cid,
            served,
            exc,
        )
        job.sink.discard_partial(job.cid)
        job.served_by.clear()
        job.received = 0
        job.report(0)
        return "served bytes that do not match the CID"
    if job.received < job.size:
        log.info("shard %s verified: %d bytes kept from before, %d received now",
                 job.cid, job.size - job.received, job.received)  # fmt: skip
    return None


async def _connect(source: ShardSource) -> Connection:
    try:
        conn = await source.connect()
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionClosed(f"cannot connect: {exc or type(exc).__name__}") from exc
    if conn.peer_id != source.node_id:  # the certificate proves whom we reached
        raise _PeerFault(f"connected to {conn.peer_id}, not {source.node_id}")
    return conn


def _start_offset(job: _Job) -> int:
    have = job.sink.partial_size(job.cid)
    if have > job.size:  # left by something else: useless, and would never commit
        job.sink.discard_partial(job.cid)
        have = 0
    return have


async def _pull(job: _Job, conn: Connection, node_id: str) -> None:
    """Ranged reads of at most ``job.window`` bytes from the partial size to the end."""
    offset = job.sink.partial_size(job.cid)
    job.report(offset)
    stall = _test_limit(TEST_STALL_ENV)
    while offset < job.size:
        length = min(job.window, job.size - offset)
        await _read_window(job, conn, node_id, offset, length)
        offset += length
        if stall is not None and job.received >= stall and offset < job.size:
            log.warning("shard %s: test stall at byte %d (%s)", job.cid, offset, TEST_STALL_ENV)
            await asyncio.Event().wait()  # until the test kills this process


async def _read_window(job: _Job, conn: Connection, node_id: str, offset: int, length: int):
    """One SHARD_READ; every SHARD_DATA frame checked, then appended to the sink."""
    request_id = conn.next_id()
    request = shard_read_frame(request_id, job.cid, offset, length)
    expected, end = offset, offset + length
    try:
        async with contextlib.aclosing(conn.stream(request, job.timeout)) as frames:
            async for frame in frames:
                _check_data(job, frame, request_id, expected, end)
                if frame.payload:
                    # the write off the event loop: packets (and our ACKs) keep flowing
                    # while the disk takes its megabyte
                    append = job.sink.append_partial
                    await asyncio.to_thread(append, job.cid, expected, frame.payload)
                    job.served_by.append(node_id)
                    expected += len(frame.payload)
                    job.received += len(frame.payload)
                    job.report(expected)
                if frame.flags & FLAG_LAST:
                    if expected != end:
                        raise _PeerFault(f"window ended at byte {expected}, asked up to {end}")
                    return
    except RemoteError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            raise _NotHere(f"does not hold it ({exc.message})") from exc
        if exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.UNSUPPORTED):
            raise _PeerFault(f"refused the read: {exc}") from exc
        raise  # busy, timeout, internal: worth another try
    raise ConnectionClosed(f"stream ended at byte {expected} without the last frame")


def _check_data(job: _Job, frame: Frame, request_id: int, expected: int, end: int) -> None:
    header = frame.header
    if frame.type != FrameType.SHARD_DATA:
        raise _PeerFault(f"{frame.type.name} frame where SHARD_DATA was expected")
    if header.get("id") != request_id:
        raise _PeerFault(f"SHARD_DATA for request {header.get('id')}, not {request_id}")
    if header.get("cid") != job.cid:
        raise _PeerFault(f"SHARD_DATA of {header.get('cid')}, not {job.cid}")
    claimed = header.get("size")
    if type(claimed) is not int or claimed != job.size:  # type check: True == 1
        raise _PeerFault(f"peer says the shard has {claimed!r:.40} bytes, not {job.size}")
    if header.get("offset") != expected:
        raise _PeerFault(f"SHARD_DATA at offset {header.get('offset')}, expected {expected}")
    if expected + len(frame.payload) > end:
        raise _PeerFault(f"{expected + len(frame.payload) - end} bytes past the asked range")
    if not frame.payload and not frame.flags & FLAG_LAST:
        raise _PeerFault("empty SHARD_DATA frame")  # would let a peer stall us forever


# ---- many shards --------------------------------------------------------------------------


async def fetch_shards(
    wants: Sequence[tuple[str, int]],
    sources_for: Callable[[str], Sequence[ShardSource]],
    sink: ShardSink,
    *,
    concurrency: int = 4,
    progress: Progress | None = None,
    window: int = WINDOW,
    retries: int = 3,
    timeout: float = FRAME_TIMEOUT,
) -> dict[str, str]:
    """Fetch several shards, ``concurrency`` at a time, spread over the peers holding them
    (each shard starts with the source that has the fewest shards assigned so far). Returns
    cid -> node id that served it; TransferError (after all others finished) if any failed."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    sizes: dict[str, int] = {}
    for cid, size in wants:
        if sizes.setdefault(cid, size) != size:
            raise ValueError(f"shard {cid} wanted with two sizes ({sizes[cid]} and {size})")
    gate = asyncio.Semaphore(concurrency)
    busy: dict[str, int] = {}  # node id -> shards under way with it as first choice

    async def one(cid: str, size: int) -> str:
        async with gate:
            # least busy first (stable sort: ties keep the caller's order of preference)
            order = sorted(sources_for(cid), key=lambda s: busy.get(s.node_id, 0))
            first = order[0].node_id if order else ""
            busy[first] = busy.get(first, 0) + 1
            try:
                return await fetch_shard(
                    cid,
                    size,
                    order,
                    sink,
                    progress=progress,
                    window=window,
                    retries=retries,
                    timeout=timeout,
                )
            finally:
                busy[first] -= 1

    cids = list(sizes)
    results = await asyncio.gather(*(one(c, sizes[c]) for c in cids), return_exceptions=True)
    served: dict[str, str] = {}
    failed: dict[str, str] = {}
    refused: dict[str, dict[str, str]] = {}
    for cid, result in zip(cids, results, strict=True):
        if isinstance(result, TransferError):
            failed[cid] = str(result)
            refused.update(result.refused)
        elif isinstance(result, BaseException):
            raise result  # a local failure (the sink, a bug): not the peers' doing
        else:
            served[cid] = result
    if failed:
        raise TransferError(
            f"{len(failed)} of {len(cids)} shards failed: " + "; ".join(failed.values()),
            failed,
            refused,
        )
    return served


__all__ = [
    "CHUNK",
    "MAX_WINDOW",
    "WINDOW",
    "ShardReader",
    "ShardSink",
    "ShardSource",
    "TransferError",
    "fetch_shard",
    "fetch_shards",
    "handle_shard_read",
]
