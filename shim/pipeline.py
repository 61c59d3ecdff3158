"""One sequence's way through the stages: a ring of long-lived QUIC streams.

The coordinator opens a ``pipeline`` channel to the node of stage 0 (or calls its own stage 0
in-process); each stage opens one to the next. Steps are STEP frames (llm_omninode/net/frames.py:
a binary header of step number, position, shape, dtype and flags): the first stage gets token
ids (``hidden_dim`` 1), every later stage hidden states ``[T, d_model]`` straight from its
predecessor, and no stage waits for an answer. The last stage picks the next token and sends
its 4-byte id (with logprobs asked for, a SCORES frame: shim/scoring.py) straight to the
coordinator on the sequence's **tail**, a stream the coordinator
opened to the last stage's node before the first step (``REQUEST pipeline {tail: true, model,
seq, start, end, sampling, recent, constraint?}``, answered once it is ready): the sampling
setup (options, seed, the prompt's last MAX_RECENT ids for the repeat penalty, the answer's
constraint if it has one: backend/constraint.py) crosses the network once, and the last stage
keeps the penalty history and the constraint's state from the ids it picks. When the
coordinator hosts the last stage, the tail is a queue in its own process. A token thus
crosses each stage boundary once and one hop back; hidden states never pass through the
coordinator.

A long prompt goes in pieces of PREFILL_PIECE tokens: every piece but the last is marked
``more`` (the last stage only fills its caches), so each stage passes a piece on as soon as it
has computed it and starts on the next while the following stage works on the one before (the
first token comes after about one stage's whole prompt plus one piece per later stage, not the
sum of all stages' prompts).

A stage that fails answers upstream with an ERROR frame and ends its channel; each stage's
watcher of its next stage relays it (or the loss of that link) upstream at once, so the
coordinator hears it while it waits on the tail.

The channel opens with ``REQUEST pipeline {model, seq, route}``; ``route`` lists the hops from
the receiving stage to the last (node id, address hint, block range), checked before use. A
stage only serves a range it was asked to load; it never loads one because a pipeline asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_omninode.backend.cid import is_cid
from llm_omninode.backend.constraint import Constraint, ConstraintError
from llm_omninode.backend.generate import TokenPicker
from llm_omninode.backend.pooling import POOLINGS, Pooler
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.sequences import SequenceLimitError
from llm_omninode.net import frames as F
from llm_omninode.net.frames import Frame, FrameType
from llm_omninode.net.identity import is_node_id
from llm_omninode.net.quic import FrameStream, NetError

from .hosted_stage import HostedStage, PoolTail, Tail
from .scoring import Scoring, score_frames, scored_pick, scoring_from
from .stage_host import MAX_SEQUENCES, StageHost

if TYPE_CHECKING:
    from .peers import PeerTable

log = logging.getLogger("omninode_shim.pipeline")

MAX_HOPS = 64
MAX_RECENT = 4096  # prompt ids the last stage's repeat penalty may look back over
MAX_TAILS = 2 * MAX_SEQUENCES  # open tails one last stage keeps at once
STEP_TIMEOUT = 600.0  # one step of the rest of the chain (a long prefill on slow nodes)
# Liveness comes from the transport (net/session.py): a killed node's port answers the next
# ping (every second) with ICMP "unreachable", a frozen one after 20 s of silence, a
# node that says it is leaving (SIGTERM), at once. After a failed step the coordinator asks
# each node of the plan whether it is there: an open connection heard within LOST_AFTER, or a
# HELLO answered within PROBE_TIMEOUT.
PROBE_TIMEOUT = 3.0
LOST_AFTER = 8.0
_SEQ_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# starts the message of a constraint the last stage could not follow: the client's fault (400)
CONSTRAINT_MARKER = "answer constraint:"


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


def check_recent(doc: object, vocab_size: int) -> list[int]:
    """The prompt ids a tail's repeat penalty starts from: at most MAX_RECENT valid ids."""
    if (
        not isinstance(doc, list)
        or len(doc) > MAX_RECENT
        or not all(type(t) is int and 0 <= t < vocab_size for t in doc)
    ):
        raise PipelineError(f"recent must be a list of at most {MAX_RECENT} valid token ids")
    return doc


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


def tail_frame(
    request_id: int, model_id: str, seq: str, last: Hop, options: SamplingOptions,
    recent: Sequence[int], scoring: Scoring | None = None, constraint: Constraint | None = None,
) -> Frame:  # fmt: skip
    """Opens a sequence's tail on the node of its last stage (see the module's docstring;
    ``scoring``: shim/scoring.py; ``constraint``: backend/constraint.py)."""
    extra, payload = ({}, b"") if scoring is None else (scoring.header(), scoring.payload())
    if constraint is not None:
        extra = {**extra, "constraint": constraint.to_wire()}
    return F.request_frame(
        request_id, "pipeline", payload, tail=True, model=model_id, seq=seq, start=last.start,
        end=last.end, sampling=options.to_dict(), recent=list(recent)[-MAX_RECENT:], **extra,
    )  # fmt: skip


def pool_tail_frame(request_id: int, model_id: str, seq: str, last: Hop, pooling: str) -> Frame:
    """Opens an embedding sequence's tail: the last stage pools its final states (``pooling``,
    backend/pooling.py) and answers once, with the pooled vector (a STEP frame flagged
    pooled), after the prompt's last piece."""
    return F.request_frame(
        request_id, "pipeline", tail=True, model=model_id, seq=seq, start=last.start,
        end=last.end, pool=pooling,
    )  # fmt: skip


def park_frame() -> Frame:
    """The last frame of a finished sequence whose caches the stages keep for reuse."""
    return F.request_frame(1, "park")  # the id means nothing on a channel


def failure_of(frame: Frame | None, node_id: str) -> PipelineError:
    """What an unsolicited frame from the next stage (or a tail) means: an ERROR says why;
    the end of the stream, or anything else, that the sequence is over there."""
    if frame is None:
        return PipelineError(f"stage on {node_id[:16]} ended the sequence")
    if frame.type == FrameType.ERROR:
        code = frame.header.get("code")
        return PipelineError(f"{code}: {frame.header.get('message')}",
                             code if isinstance(code, str) else None)  # fmt: skip
    return PipelineError(f"stage on {node_id[:16]} sent a {frame.type.name} frame unasked")


Failed = Callable[[PipelineError], None]


class Downstream:
    """The channel to the next stage (or, for a coordinator, to stage 0 on another node).

    Steps go down it unanswered. The next stage speaks only to say it failed (an ERROR frame,
    then the end of the stream); a watcher reads that, or the loss of the link, and hands it to
    ``on_failure`` at once, so a failure travels back even while nobody sends.
    """

    def __init__(
        self,
        peers: PeerTable,
        model_id: str,
        seq: str,
        route: Sequence[Hop],
        reuse: Reuse | None = None,
        on_failure: Failed | None = None,
    ):
        self.peers = peers
        self.model_id = model_id
        self.seq = seq
        self.route = tuple(route)
        self.reuse = reuse
        self.on_failure = on_failure
        self.failure: PipelineError | None = None
        self._stream: FrameStream | None = None
        self._watcher: asyncio.Future | None = None

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

    async def _watch(self, stream: FrameStream) -> None:
        try:
            failure = failure_of(await stream.recv(), self.node_id)
        except (NetError, F.FrameError) as exc:
            failure = PipelineError(f"stage on {self.node_id[:16]} failed: {exc}",
                                    F.ErrorCode.LINK_LOST)  # fmt: skip
        self.failure = failure
        if self.on_failure is not None:
            self.on_failure(failure)

    async def send(self, frame: Frame) -> None:
        """Send one step's input on (a STEP frame); PipelineError if the chain has failed."""
        if self.failure is not None:
            raise self.failure
        try:
            if self._stream is None:
                self._stream = await self._open()
                self._watcher = asyncio.ensure_future(self._watch(self._stream))
            await self._stream.send(frame)
        except (NetError, OSError) as exc:
            # the next stage ended the channel: the watcher is reading why
            if self._watcher is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._watcher), PROBE_TIMEOUT)
            if self.failure is not None:
                raise self.failure from exc
            raise PipelineError(
                f"stage on {self.node_id[:16]} failed: {exc}", F.ErrorCode.LINK_LOST
            ) from exc

    async def close(self, park: bool = False) -> None:
        """End the channel; ``park``: the stages keep the sequence's caches for reuse."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                with contextlib.suppress(NetError):  # the next stage may be gone already
                    if park and self.failure is None:
                        await stream.send(park_frame())
            finally:  # ended even if cancelled while the park frame waited for room
                with contextlib.suppress(NetError):
                    stream.close_now()


def check_answer(frame: Frame, step: int) -> int:
    """The one token id a tail answered for ``step``; PipelineError unless it is exactly that."""
    if frame.type != FrameType.STEP or frame.header["step"] != step:
        raise PipelineError(f"step {step} was answered with something other than its token")
    ids = F.token_ids(frame)
    if len(ids) != 1:
        raise PipelineError(f"a step must answer one token id, got {len(ids)}")
    return ids[0]


class Link:
    """A sequence's pass through one stage hosted here, and on to the rest of the route; the
    last stage hands each picked id to the sequence's tail."""

    def __init__(
        self,
        host: StageHost,
        hosted: HostedStage,
        peers: PeerTable,
        seq: str,
        rest: Sequence[Hop],
        reuse: Reuse | None = None,
        on_failure: Failed | None = None,
    ) -> None:
        self.host = host
        self.hosted = hosted
        self.seq = seq
        self.reuse = reuse  # taken up at the first step, on the MLX worker thread
        self.next = (
            Downstream(peers, hosted.model_id, seq, rest, reuse, on_failure) if rest else None
        )
        if (self.next is None) != hosted.stage.is_last:
            raise PipelineError("the route does not end where the model ends")
        self.steps = 0  # STEP frames taken: the next one's number
        self.position = reuse.keep if reuse is not None else 0  # positions cached
        hosted.active += 1

    def _input(self, frame: Frame) -> np.ndarray:
        if frame.type != FrameType.STEP or frame.header.get("pooled"):
            raise PipelineError("expected a STEP frame on a pipeline channel")
        header = frame.header
        if header["step"] != self.steps or header["pos"] != self.position:
            raise PipelineError(
                f"step {header['step']} at position {header['pos']} is out of order: expected "
                f"step {self.steps} at {self.position}"
            )
        tokens, hidden_dim, dtype = F.hidden_geometry(header, FrameType.STEP)
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

    def _tail(self) -> Tail:
        tail = self.hosted.tails.get(self.seq)
        if tail is None:
            raise PipelineError("no sampling setup for this sequence (its tail is not open)")
        return tail

    async def send(self, frame: Frame) -> None:
        """Compute one step here and pass it on; the last stage picks the next id (unless
        the step is a prompt piece marked ``more``: it only fills the caches) and delivers it."""
        if self.reuse is not None:
            reuse, self.reuse = self.reuse, None
            kept = await self.host.adopt(self.hosted, reuse.seq, self.seq, reuse.keep)
            if kept != reuse.keep:
                raise PipelineError(f"prefix of {reuse.seq[:12]} is not cached here any more",
                                    F.ErrorCode.CACHE_MISS)  # fmt: skip
        x = self._input(frame)
        step, pos, more = frame.header["step"], frame.header["pos"], frame.header["more"]
        pool = self.hosted.pools.get(self.seq) if self.next is None else None
        if pool is not None:
            await self._pool(pool, x, step, more)
            return
        tail = None
        if self.next is None:
            tail = self.hosted.tails.get(self.seq) if more else self._tail()
        scorer = None if tail is None else tail.scorer
        rows = None if scorer is None else scorer.prompt_rows(pos, len(x))  # echo
        then = None
        if tail is not None and not more:
            then = tail.picker.pick
            if scorer is not None:
                then = functools.partial(scored_pick, tail.picker, scorer)
        try:
            out = await self.host.forward(self.hosted, self.seq, x, then, rows)
        except SequenceLimitError as exc:  # full of other sequences: worth a retry later
            raise PipelineError(str(exc), F.ErrorCode.BUSY) from exc
        except ValueError as exc:  # the stage's own checks and limits
            raise PipelineError(str(exc)) from exc
        self.steps += 1
        self.position += len(x)
        self.hosted.steps += 1
        if self.next is not None:
            await self.next.send(
                F.step_frame(step, pos, out.tobytes(), out.shape, out.dtype.name, more)
            )
        elif tail is not None and scorer is not None:
            picked = None if more else out
            self.hosted.tokens_out += picked is not None
            prompt = None if rows is None else rows.scores()
            for answer in score_frames(step, pos, prompt, picked):
                await tail.deliver(answer)
        elif tail is not None and not more:
            self.hosted.tokens_out += 1
            await tail.deliver(F.token_step(step, self.position, [out]))

    async def _pool(self, pool: PoolTail, x: np.ndarray, step: int, more: bool) -> None:
        """An embedding sequence's step on the last stage: pool its states; after the last
        piece, deliver the pooled vector."""
        try:
            await self.host.embed(self.hosted, self.seq, x, pool.pooler)
        except SequenceLimitError as exc:
            raise PipelineError(str(exc), F.ErrorCode.BUSY) from exc
        except ValueError as exc:  # the stage's own checks and limits (PoolingError too)
            raise PipelineError(str(exc)) from exc
        self.steps += 1
        self.position += len(x)
        self.hosted.steps += 1
        if not more:
            vec = pool.pooler.result().astype("<f4")
            await pool.deliver(F.pooled_step(step, self.position, vec.tobytes(), vec.size))

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
    """Handler of a ``pipeline`` channel: steps until the upstream ends the stream (or, with
    ``tail``, a sequence's tail: see ``serve_tail``)."""
    if first.header.get("tail") is True:
        return await serve_tail(host, first, stream)

    def report(exc: Exception) -> None:
        """Tell the upstream why the sequence failed here or further down, and end."""
        stream.end(F.error_frame(_reply_code(exc), str(exc), first.id))

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
        reuse = Reuse.from_json(first.header.get("reuse"))
        link = Link(host, hosted, peers, seq, route[1:], reuse, report)
    except PipelineError as exc:
        return F.error_frame(_reply_code(exc), str(exc), first.id)
    park = False
    try:
        async for frame in stream:
            if frame.type == FrameType.REQUEST and frame.header.get("method") == "park":
                park = True  # the sequence is over; keep its caches for the next turn
                break
            try:
                await link.send(frame)
            except (PipelineError, F.FrameError) as exc:
                log.warning("sequence %s: %s", seq[:12], exc)
                report(exc)
                return None
    except (NetError, asyncio.CancelledError):
        pass  # upstream went away: the sequence is over
    finally:
        await link.close(park)
    return None


async def serve_tail(host: StageHost, first: Frame, stream: FrameStream) -> Frame | None:
    """A sequence's tail on the node of its last stage: ``REQUEST pipeline {tail: true, model,
    seq, start, end, sampling, recent, constraint?}`` sets up its sampler (answered with a
    RESPONSE once it is ready); every id the stage picks for the sequence then goes back on
    this stream as a STEP frame, until the coordinator ends it."""
    header = first.header
    try:
        model, start, end = header.get("model"), header.get("start"), header.get("end")
        if not is_cid(model) or type(start) is not int or type(end) is not int:
            raise PipelineError("a tail needs model, start and end")
        seq = check_seq(header.get("seq"))
        hosted = host.get(model, start, end)
        if hosted is None:
            raise PipelineError(f"stage [{start}, {end}) of {model[:16]} is not loaded here",
                                F.ErrorCode.NOT_FOUND)  # fmt: skip
        if not hosted.stage.is_last:
            raise PipelineError("a tail is opened on the last stage")
        if seq in hosted.tails or seq in hosted.pools:  # its old tail may be ending: retry
            raise PipelineError("this sequence's tail is open already", F.ErrorCode.BUSY)
        if len(hosted.tails) + len(hosted.pools) >= MAX_TAILS:
            raise PipelineError("this stage has no room for another tail", F.ErrorCode.BUSY)
        if "pool" in header:
            if header["pool"] not in POOLINGS:
                raise PipelineError(f"pool must be one of {POOLINGS}")
            pool = PoolTail(Pooler(header["pool"], hosted.spec.d_model), stream.send)
            return await _hold(hosted.pools, seq, pool, first, stream)
        recent = check_recent(header.get("recent"), hosted.spec.vocab_size)
        options = SamplingOptions.from_dict(header.get("sampling"))
        scorer = scoring_from(header, first.payload, hosted.spec.vocab_size,
                              hosted.stage.max_context)  # fmt: skip
        constraint = header.get("constraint")
        guide = None if constraint is None else await host.guide(
            hosted, Constraint.from_wire(constraint)
        )  # fmt: skip
    except ConstraintError as exc:
        return F.error_frame(F.ErrorCode.BAD_REQUEST, f"{CONSTRAINT_MARKER} {exc}", first.id)
    except (PipelineError, ValueError) as exc:  # SamplingError, ScoringError are ValueErrors
        return F.error_frame(_reply_code(exc), str(exc), first.id)
    taken = seq in hosted.tails or seq in hosted.pools  # while the guide was made
    if taken or len(hosted.tails) + len(hosted.pools) >= MAX_TAILS:
        return F.error_frame(F.ErrorCode.BUSY, "this stage has no room for another tail",
                             first.id)  # fmt: skip
    tail = Tail(TokenPicker(options, recent, guide), stream.send, scorer)
    return await _hold(hosted.tails, seq, tail, first, stream)


async def _hold(
    table: dict[str, Any], seq: str, end: Tail | PoolTail, first: Frame, stream: FrameStream
) -> Frame | None:
    """Keep a sequence's end (a sampler's Tail, or an embedding's PoolTail) in its stage's
    ``table`` while the coordinator keeps the tail open; answered once it is ready."""
    table[seq] = end
    try:
        await stream.send(F.response_frame(first.id or 0))
        async for frame in stream:  # the coordinator sends nothing more
            return F.error_frame(F.ErrorCode.BAD_REQUEST, f"{frame.type.name} on a tail")
    except (NetError, asyncio.CancelledError):
        pass  # the coordinator went away: the sequence is over
    finally:
        if table.get(seq) is end:
            del table[seq]
    return None
