"""One sequence's path through the stages: a chain of long-lived QUIC streams.

The coordinator opens a ``pipeline`` channel to the node of stage 0 (or calls its own stage 0
in-process); each stage opens one to the next. Per step the first stage gets token ids
(HIDDEN, ``hidden_dim`` 1), every later stage float32 hidden states ``[T, d_model]`` straight
from its predecessor; the last stage picks the next token and its 4-byte id travels back along
the chain. Hidden states never pass through the coordinator. The prefill step also carries the
sampling options and the prompt's recent ids, which only the last stage uses.

A long prompt goes in pieces of PREFILL_PIECE tokens: every piece but the last is marked
``more`` and gets no answer, so each stage passes a piece on as soon as it has computed it and
starts on the next while the following stage works on the one before (the first token comes
after about one stage's whole prompt plus one piece per later stage, not the sum of all
stages' prompts). Only the last piece carries the sampling fields and is answered. An error
on the way ends the channel, and the last piece's answer says so.

The channel opens with ``REQUEST pipeline {model, seq, route}``; ``route`` lists the hops from
the receiving stage to the last (node id, address hint, block range), checked before use. A
stage only serves a range it was asked to load; it never loads one because a pipeline asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_omninode import settings
from llm_omninode.backend.cid import is_cid
from llm_omninode.backend.generate import TokenPicker
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.sequences import SequenceLimitError
from llm_omninode.net import frames as F
from llm_omninode.net.frames import Frame, FrameType
from llm_omninode.net.identity import is_node_id
from llm_omninode.net.quic import FrameStream, NetError

from .stage_host import HostedStage, StageHost

if TYPE_CHECKING:
    from .peers import PeerTable

log = logging.getLogger("omninode_shim.pipeline")

MAX_HOPS = 64
MAX_RECENT = 4096  # prompt ids the last stage's repeat penalty may look back over
STEP_TIMEOUT = 600.0  # one step of the rest of the chain (a long prefill on slow nodes)
# Liveness comes from the transport (net/session.py): a killed node's port answers the next
# ping (every second) with ICMP "unreachable", a frozen one after 20 s of silence, a
# node that says it is leaving (SIGTERM), at once. After a failed step the coordinator asks
# each node of the plan whether it is there: an open connection heard within LOST_AFTER, or a
# HELLO answered within PROBE_TIMEOUT.
PROBE_TIMEOUT = 3.0
LOST_AFTER = 8.0
# Tokens of a prompt per pipelined piece (see above): big enough for an efficient matmul,
# small enough that later stages start early (settings.prefill_piece; 0: the whole prompt at once).
_SEQ_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class PipelineError(RuntimeError):
    """A step could not be run; the message says where and why. ``code`` says what the
    coordinator can do about it: NOT_FOUND (a stage is not loaded any more: load again), BUSY
    (a stage is full of sequences: retry), CACHE_MISS (a prefix to reuse is gone: compute it),
    LINK_LOST (a link of the chain broke: plan again without the lost node and replay).
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


_RELAYED = (
    F.ErrorCode.NOT_FOUND,
    F.ErrorCode.BUSY,
    F.ErrorCode.CACHE_MISS,
    F.ErrorCode.LINK_LOST,
)


def _reply_code(exc: Exception) -> str:
    """What to answer upstream: the codes the coordinator acts on travel back as themselves,
    everything else (a malformed frame too) as bad request."""
    code = exc.code if isinstance(exc, PipelineError) else None
    return code if code in _RELAYED else F.ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class Hop:
    node_id: str
    host: str
    port: int
    start: int
    end: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node_id, "host": self.host, "port": self.port,
                "start": self.start, "end": self.end}  # fmt: skip


def route_from_json(doc: object) -> tuple[Hop, ...]:
    """A route from the wire: 1..MAX_HOPS hops, contiguous ranges, valid ids and ports."""
    if not isinstance(doc, list) or not 1 <= len(doc) <= MAX_HOPS:
        raise PipelineError(f"route must be a list of 1..{MAX_HOPS} hops")
    hops = []
    for h in doc:
        if not isinstance(h, dict) or set(h) != {"node", "host", "port", "start", "end"}:
            raise PipelineError("a hop is {node, host, port, start, end}")
        ints = [h["port"], h["start"], h["end"]]
        if not is_node_id(h["node"]) or any(type(v) is not int for v in ints):
            raise PipelineError("a hop has a bad node id or a non-integer field")
        if not isinstance(h["host"], str) or not 0 < len(h["host"]) <= 255:
            raise PipelineError("a hop's host must be a short string")
        if not 0 < h["port"] < 65536 or not 0 <= h["start"] < h["end"] <= 1 << 20:
            raise PipelineError("a hop's port or block range is out of range")
        hops.append(Hop(h["node"], h["host"], h["port"], h["start"], h["end"]))
    for a, b in zip(hops, hops[1:], strict=False):
        if a.end != b.start:
            raise PipelineError("route ranges are not contiguous")
    return tuple(hops)


def check_seq(seq: object) -> str:
    if not isinstance(seq, str) or not _SEQ_RE.match(seq):
        raise PipelineError("seq must be 1..128 characters of [A-Za-z0-9_-]")
    return seq


def step_fields(options: SamplingOptions | None, recent: Sequence[int]) -> dict[str, Any]:
    """Header fields of a prefill step (nothing on decode steps)."""
    if options is None:
        return {}
    return {"sampling": options.to_dict(), "recent": list(recent)[-MAX_RECENT:]}


@dataclass(frozen=True)
class Reuse:
    """Start the sequence from the first ``keep`` cached positions of the parked ``seq``."""

    seq: str
    keep: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "keep": self.keep}

    @classmethod
    def from_json(cls, doc: object) -> Reuse | None:
        if doc is None:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("keep"), int):
            raise PipelineError("reuse must be {seq, keep}")
        if not 0 < doc["keep"] <= 2**24:
            raise PipelineError("reuse.keep is out of range")
        return cls(check_seq(doc.get("seq")), doc["keep"])


def open_frame(
    request_id: int, model_id: str, seq: str, route: Sequence[Hop], reuse: Reuse | None = None
) -> Frame:
    extra = {} if reuse is None else {"reuse": reuse.to_json()}
    return F.request_frame(
        request_id, "pipeline", model=model_id, seq=seq, route=[h.to_json() for h in route],
        **extra,
    )  # fmt: skip


def park_frame() -> Frame:
    """The last frame of a finished sequence whose caches the stages keep for reuse."""
    return F.request_frame(1, "park")  # the id means nothing on a channel


class Downstream:
    """The channel to the next stage (or, for a coordinator, to stage 0 on another node)."""

    def __init__(
        self,
        peers: PeerTable,
        model_id: str,
        seq: str,
        route: Sequence[Hop],
        reuse: Reuse | None = None,
    ):
        self.peers = peers
        self.model_id = model_id
        self.seq = seq
        self.route = tuple(route)
        self.reuse = reuse
        self._stream: FrameStream | None = None

    @property
    def node_id(self) -> str:
        return self.route[0].node_id

    async def _open(self) -> FrameStream:
        hop = self.route[0]
        if self.peers.get(hop.node_id) is None:  # known from the route only: the address is a
            self.peers.note(hop.node_id, hop.host, hop.port, "hello")  # hint, the key is checked
        conn = await self.peers.connection(hop.node_id)
        frame = open_frame(conn.next_id(), self.model_id, self.seq, self.route, self.reuse)
        return await conn.channel(frame)

    async def step(self, frame: Frame) -> Frame | None:
        """Send one step's input; return the token frame that comes back (None for a piece
        marked ``more``, which is not answered)."""
        try:
            if self._stream is None:
                self._stream = await self._open()
            try:
                await self._stream.send(frame)
            except NetError:
                # the next stage ended the channel: after an unanswered prompt piece its
                # error frame (why) is waiting to be read
                reply = await self._stream.recv(PROBE_TIMEOUT)
                if reply is None or reply.type != FrameType.ERROR:
                    raise
            else:
                if frame.header.get("more") is True:
                    return None
                reply = await self._watched_recv(self._stream)
        except (NetError, OSError) as exc:
            raise PipelineError(
                f"stage on {self.node_id[:16]} failed: {exc}", F.ErrorCode.LINK_LOST
            ) from exc
        if reply is None:
            raise PipelineError(f"stage on {self.node_id[:16]} ended the sequence")
        if reply.type == FrameType.ERROR:
            code = reply.header.get("code")
            raise PipelineError(f"{code}: {reply.header.get('message')}",
                                code if isinstance(code, str) else None)  # fmt: skip
        check_token_reply(reply, self.seq)
        return reply

    async def _watched_recv(self, stream: FrameStream) -> Frame | None:
        """The step's answer. The transport watches the next node (pings answered by its
        event loop, ICMP for a dead process): when it is lost, the stream ends with PeerLost
        at once, however long its step would take."""
        return await stream.recv(STEP_TIMEOUT)

    async def close(self, park: bool = False) -> None:
        """End the channel; ``park``: the stages keep the sequence's caches for reuse."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(NetError):  # the next stage may be gone already
                if park:
                    await stream.send(park_frame())
                await stream.aclose()


async def prefill(
    entry: Link | Downstream, seq: str, ids: Sequence[int], fields: dict[str, Any]
) -> int:
    """Send a prompt (pieces of PREFILL_PIECE, see above) into the chain; the first token."""
    piece = settings.prefill_piece() or len(ids)
    for start in range(0, len(ids) - piece, piece):  # all but the last piece, unanswered
        await entry.step(F.token_frame(seq, ids[start : start + piece], more=True))
    last_start = (len(ids) - 1) // piece * piece
    if last_start:
        log.info("seq %s: prompt sent in %d pieces", seq[:12], last_start // piece + 1)
    reply = await entry.step(F.token_frame(seq, ids[last_start:], **fields))
    if reply is None:
        raise PipelineError("a prompt's last piece was not answered")
    return check_token_reply(reply, seq)


def check_token_reply(frame: Frame | None, seq: str) -> int:
    """The one token id of a step's answer; PipelineError unless it is exactly that."""
    if frame is None or frame.type != FrameType.HIDDEN or frame.header.get("seq") != seq:
        raise PipelineError("a step was answered with something other than its token")
    ids = F.token_ids(frame)
    if len(ids) != 1:
        raise PipelineError(f"a step must answer one token id, got {len(ids)}")
    return ids[0]


class Link:
    """A sequence's pass through one stage hosted here, and on to the rest of the route."""

    def __init__(
        self,
        host: StageHost,
        hosted: HostedStage,
        peers: PeerTable,
        seq: str,
        rest: Sequence[Hop],
        reuse: Reuse | None = None,
    ) -> None:
        self.host = host
        self.hosted = hosted
        self.seq = seq
        self.reuse = reuse  # taken up at the first step, on the MLX worker thread
        self.next = Downstream(peers, hosted.model_id, seq, rest, reuse) if rest else None
        if (self.next is None) != hosted.stage.is_last:
            raise PipelineError("the route does not end where the model ends")
        hosted.active += 1

    def _input(self, frame: Frame) -> np.ndarray:
        if frame.type != FrameType.HIDDEN or frame.header.get("seq") != self.seq:
            raise PipelineError("expected a HIDDEN frame of this sequence")
        tokens, hidden_dim, dtype = F.hidden_geometry(frame.header)
        stage = self.hosted.stage
        if stage.is_first:
            if hidden_dim != 1:
                raise PipelineError("the first stage takes token ids (hidden_dim 1)")
            # int64: a uint32 id past 2**31 must reach the stage's range check, not overflow
            return np.asarray(F.token_ids(frame), dtype=np.int64)
        if hidden_dim != self.hosted.spec.d_model:
            raise PipelineError(
                f"hidden_dim {hidden_dim} is not this model's width {self.hosted.spec.d_model}"
            )
        wire = "<f4" if dtype == "float32" else "<f2"  # the frame checked it is one of them
        return np.frombuffer(frame.payload, dtype=wire).reshape(tokens, hidden_dim)

    def _picker(self, frame: Frame) -> TokenPicker:
        header = frame.header
        if "sampling" in header:
            recent = header.get("recent", [])
            if (
                not isinstance(recent, list)
                or len(recent) > MAX_RECENT
                or not all(type(t) is int and 0 <= t < self.hosted.spec.vocab_size for t in recent)
            ):
                raise PipelineError("recent must be a list of valid token ids")
            options = SamplingOptions.from_dict(header["sampling"])
            self.hosted.pickers[self.seq] = TokenPicker(options, recent)
        picker = self.hosted.pickers.get(self.seq)
        if picker is None:
            raise PipelineError("no sampling options for this sequence (send them at prefill)")
        return picker

    async def step(self, frame: Frame) -> Frame | None:
        """Compute one step here and pass it on; the token frame that comes back, or None
        for a prompt piece marked ``more`` (the last stage then only fills its caches)."""
        more = frame.header.get("more", False)
        if not isinstance(more, bool):
            raise PipelineError("more must be true or false")
        if self.reuse is not None:
            reuse, self.reuse = self.reuse, None
            kept = await self.host.adopt(self.hosted, reuse.seq, self.seq, reuse.keep)
            if kept != reuse.keep:
                raise PipelineError(f"prefix of {reuse.seq[:12]} is not cached here any more",
                                    F.ErrorCode.CACHE_MISS)  # fmt: skip
        x = self._input(frame)
        picker = self._picker(frame) if self.next is None and not more else None
        pick = None if picker is None else picker.pick
        try:
            out = await self.host.forward(self.hosted, self.seq, x, pick)
        except SequenceLimitError as exc:  # full of other sequences: worth a retry later
            raise PipelineError(str(exc), F.ErrorCode.BUSY) from exc
        except ValueError as exc:  # the stage's own checks and limits
            raise PipelineError(str(exc)) from exc
        if self.next is None:
            return None if more else F.token_frame(self.seq, [out])
        extra = {k: frame.header[k] for k in ("sampling", "recent", "more") if k in frame.header}
        return await self.next.step(
            F.hidden_frame(self.seq, out.tobytes(), out.shape, out.dtype.name, **extra)
        )

    async def close(self, park: bool = False) -> None:
        """End the sequence here and downstream; ``park``: keep its caches for reuse."""
        self.hosted.active -= 1
        if park:
            self.host.park(self.hosted, self.seq)
        else:
            self.host.free(self.hosted, self.seq)
        if self.next is not None:
            await self.next.close(park)


async def serve_pipeline(
    host: StageHost, peers: PeerTable, node_id: str, first: Frame, stream: FrameStream
) -> Frame | None:
    """Handler of a ``pipeline`` channel: steps until the upstream ends the stream."""
    try:
        model = first.header.get("model")
        if not is_cid(model):
            raise PipelineError("model must be a model id")
        seq = check_seq(first.header.get("seq"))
        route = route_from_json(first.header.get("route"))
        if route[0].node_id != node_id:
            raise PipelineError("this route does not start at this node")
        hosted = host.get(model, route[0].start, route[0].end)
        if hosted is None:
            raise PipelineError(
                f"stage [{route[0].start}, {route[0].end}) of {model[:16]} is not loaded here",
                F.ErrorCode.NOT_FOUND,
            )
        link = Link(host, hosted, peers, seq, route[1:], Reuse.from_json(first.header.get("reuse")))
    except PipelineError as exc:
        return F.error_frame(_reply_code(exc), str(exc), first.id)
    park = False
    try:
        async for frame in stream:
            if frame.type == FrameType.REQUEST and frame.header.get("method") == "park":
                park = True  # the sequence is over; keep its caches for the next turn
                break
            try:
                reply = await link.step(frame)
            except (PipelineError, F.FrameError) as exc:
                log.warning("sequence %s: %s", seq[:12], exc)
                return F.error_frame(_reply_code(exc), str(exc), first.id)
            if reply is not None:
                await stream.send(reply)
    except (NetError, asyncio.CancelledError):
        pass  # upstream went away: the sequence is over
    finally:
        await link.close(park)
    return None
