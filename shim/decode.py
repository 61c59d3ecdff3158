"""One pass of a generation round the ring of its plan, as the coordinator runs it.

``Ring`` is a sequence's two ends seen from the coordinator: the entry (stage 0 hosted here,
or a channel to its node) and the tail, where the last stage's picked ids arrive (a stream
from its node, or a queue when this node hosts it; see shim/pipeline.py). Every answer, and
every failure the chain reports, lands in one queue, read once per step. ``run_pass`` prefills
the prompt, replays what a failed pass already sent, and decodes while the ``Generation``
wants tokens; shim/generation.py recovers from what it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llm_omninode import settings
from llm_omninode.backend.constraint import Constraint, ConstraintError
from llm_omninode.backend.generate import Chunk, Generation, TokenPicker
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.net import frames as F
from llm_omninode.net.frames import Frame, FrameType
from llm_omninode.net.quic import FrameStream, NetError
from llm_omninode.request import GenerationRequest, RequestError

from .errors import CacheMiss, LinkLost, NodeLost, StageBusy, StageMissing
from .hosted_stage import Tail
from .pipeline import (
    CONSTRAINT_MARKER,
    STEP_TIMEOUT,
    Downstream,
    Hop,
    Link,
    PipelineError,
    Reuse,
    check_answer,
    failure_of,
    tail_frame,
)
from .scoring import ScoreSink, Scoring, ScoringError

if TYPE_CHECKING:
    from .model_state import ModelText, PlanState
    from .peers import PeerTable
    from .prefixes import PrefixTable
    from .stage_host import StageHost

log = logging.getLogger("omninode_shim.coordinator")
_ANSWERS = (FrameType.STEP, FrameType.SCORES)


@dataclass(frozen=True)
class Here:
    """What a decode pass uses of the node it runs on: its id, its stages, its peers."""

    node_id: str
    host: StageHost
    peers: PeerTable


@dataclass
class Job:
    """One request's generation as the coordinator runs it, whatever plans it goes through."""

    model: ModelText
    request: GenerationRequest
    ids: list[int]  # the prompt
    gen: Generation
    timings: dict[str, float]
    picked: list[int] = field(default_factory=list)  # ids sent on: what a replay feeds again


class Ring:
    """A sequence's entry and tail (see above); ``step`` sends a step in and waits for its id."""

    def __init__(self, here: Here, model_id: str, seq: str, route: Sequence[Hop]) -> None:
        self.here = here
        self.model_id = model_id
        self.seq = seq
        self.route = tuple(route)
        self.answers: asyncio.Queue[Frame | PipelineError] = asyncio.Queue()
        self.entry: Link | Downstream | None = None
        self.steps = 0  # STEP frames sent: the next one's number
        self.position = 0  # positions the stages hold
        self._tail: FrameStream | None = None
        self._reader: asyncio.Future | None = None
        self._local: Tail | None = None
        self.scores: ScoreSink | None = None  # logprobs asked for: what the tail scored

    def _failed(self, exc: PipelineError) -> None:
        self.answers.put_nowait(exc)

    async def open(
        self,
        options: SamplingOptions,
        recent: Sequence[int],
        reuse: Reuse | None,
        scoring: tuple[Scoring, ScoreSink] | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        """Open the tail (it must be ready before the first step reaches the last stage),
        then the entry. ``scoring``: logprobs asked for (shim/scoring.py)."""
        last, here = self.route[-1], self.here.node_id
        self.scores = None if scoring is None else scoring[1]
        ask = None if scoring is None else scoring[0]
        if last.node_id == here:
            hosted = self.here.host.get(self.model_id, last.start, last.end)
            if hosted is None:
                raise PipelineError("this node's last stage was unloaded", F.ErrorCode.NOT_FOUND)

            async def deliver(frame: Frame) -> None:
                self.answers.put_nowait(frame)

            scorer = None if ask is None else ask.scorer()
            try:
                guide = None if constraint is None else await self.here.host.guide(
                    hosted, constraint
                )  # fmt: skip
            except ConstraintError as exc:
                raise RequestError(f"{CONSTRAINT_MARKER} {exc}") from exc
            self._local = Tail(TokenPicker(options, recent, guide), deliver, scorer)
            hosted.tails[self.seq] = self._local
        else:
            await self._open_tail(last, options, recent, ask, constraint)
        self._open_entry(reuse)

    def _open_entry(self, reuse: Reuse | None) -> None:
        """Stage 0 hosted here (a Link), or a channel to its node (opened at the first step)."""
        first, here = self.route[0], self.here.node_id
        self.position = reuse.keep if reuse is not None else 0
        if first.node_id == here:
            hosted = self.here.host.get(self.model_id, first.start, first.end)
            if hosted is None:
                raise PipelineError("this node's stage was unloaded", F.ErrorCode.NOT_FOUND)
            self.entry = Link(self.here.host, hosted, self.here.peers, self.seq, self.route[1:],
                              reuse, self._failed)  # fmt: skip
        else:
            self.entry = Downstream(self.here.peers, self.model_id, self.seq, self.route, reuse,
                                    self._failed)  # fmt: skip

    async def _open_tail(
        self,
        last: Hop,
        options: SamplingOptions,
        recent: Sequence[int],
        ask: Scoring | None,
        constraint: Constraint | None = None,
    ) -> None:
        await self._tail_channel(
            last,
            lambda rid: tail_frame(
                rid, self.model_id, self.seq, last, options, recent, ask, constraint
            ),  # fmt: skip
        )

    async def _tail_channel(self, last: Hop, opening: Callable[[int], Frame]) -> None:
        """Open the tail on the last stage's node with the frame ``opening(request id)``
        makes, wait until it is ready, and read its answers into ``answers``."""
        try:
            conn = await self.here.peers.connection(last.node_id)
            self._tail = await conn.channel(opening(conn.next_id()))
            ready = await self._tail.recv(STEP_TIMEOUT)
        except (NetError, OSError) as exc:
            raise PipelineError(f"tail on {last.node_id[:16]}: {exc}",
                                F.ErrorCode.LINK_LOST) from exc  # fmt: skip
        if ready is None or ready.type != FrameType.RESPONSE:
            failure = failure_of(ready, last.node_id)
            if failure.code == F.ErrorCode.BAD_REQUEST and CONSTRAINT_MARKER in str(failure):
                raise RequestError(str(failure))  # the client's schema: no node is to blame
            raise failure
        self._reader = asyncio.ensure_future(self._read_tail(self._tail, last.node_id))

    async def _read_tail(self, stream: FrameStream, node_id: str) -> None:
        try:
            while (frame := await stream.recv()) is not None and frame.type in _ANSWERS:
                self.answers.put_nowait(frame)
            self._failed(failure_of(frame, node_id))
        except (NetError, F.FrameError) as exc:
            self._failed(PipelineError(f"tail on {node_id[:16]} failed: {exc}",
                                       F.ErrorCode.LINK_LOST))  # fmt: skip

    async def send(self, ids: Sequence[int], more: bool = False) -> int:
        """Send ids in as the next step; the step's number."""
        assert self.entry is not None, "open the ring first"
        step = self.steps
        frame = F.token_step(step, self.position, ids, more)
        self.steps += 1
        self.position += len(ids)
        await self.entry.send(frame)
        return step

    async def answer(self, step: int) -> int:
        """The id the last stage picked at ``step``, or the failure the chain reported (with
        logprobs, its scores land in ``scores``)."""
        got = await self._next_answer(step)
        while got.type == FrameType.SCORES:  # with logprobs: scored rows, then the pick
            try:
                picked = None if self.scores is None else self.scores.take(got, step)
            except ScoringError as exc:
                raise PipelineError(f"step {step}: {exc}") from exc
            if picked is not None:
                return picked
            got = await self._next_answer(step)
        return check_answer(got, step)

    async def _next_answer(self, step: int) -> Frame:
        try:
            got = await asyncio.wait_for(self.answers.get(), STEP_TIMEOUT)
        except asyncio.TimeoutError as exc:
            raise PipelineError(f"no answer to step {step} within {STEP_TIMEOUT} s") from exc
        if isinstance(got, PipelineError):
            raise got
        return got

    async def step(self, ids: Sequence[int]) -> int:
        return await self.answer(await self.send(ids))

    async def close(self, park: bool = False) -> None:
        """End the sequence on every stage (``park``: they keep its caches) and the tail,
        whatever happens on the way (the tail is ended even if ending the entry fails or this
        task is cancelled meanwhile: a tail left open would hold its stage's sampler)."""
        try:
            if self.entry is not None:
                await self.entry.close(park)
        finally:
            self._close_tail()

    def _close_tail(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._tail is not None:
            tail, self._tail = self._tail, None
            with contextlib.suppress(NetError):
                tail.close_now()
        if self._local is not None:
            last = self.route[-1]
            hosted = self.here.host.get(self.model_id, last.start, last.end)
            if hosted is not None and hosted.tails.get(self.seq) is self._local:
                del hosted.tails[self.seq]


def scoring_of(job: Job) -> tuple[Scoring, ScoreSink] | None:
    """What the last stage is asked to score for ``job`` and where it lands; None if no
    logprobs were asked for."""
    request = job.request
    if not request.logprobs:
        return None
    scoring = Scoring(request.top_logprobs, tuple(job.ids) if request.echo else None)
    return scoring, ScoreSink(scoring, job.model.spec.vocab_size, job.ids)


async def prefill(ring: Ring, ids: Sequence[int]) -> int:
    """Send a prompt (pieces of settings.prefill_piece, see shim/pipeline.py) round the ring;
    the first token."""
    piece = settings.prefill_piece() or len(ids)
    for start in range(0, len(ids) - piece, piece):  # all but the last piece, unanswered
        await ring.send(ids[start : start + piece], more=True)
    last_start = (len(ids) - 1) // piece * piece
    if last_start:
        log.info("seq %s: prompt sent in %d pieces", ring.seq[:12], last_start // piece + 1)
    return await ring.step(ids[last_start:])


async def run_pass(
    here: Here,
    prefixes: PrefixTable,
    job: Job,
    state: PlanState,
    route: Sequence[Hop],
    reuse: Reuse | None = None,
) -> AsyncIterator[Chunk]:
    """One pass through the plan: prefill the prompt, then decode while ``job.gen`` wants
    tokens.

    With ``reuse``, every stage starts from the cache a finished sequence left parked and
    only ``job.ids[reuse.keep:]`` is computed (a chat's next turn). A sequence that ends well
    is parked in turn.

    After a lost node, ``job.picked`` holds the ids already sent to the client; they are
    replayed as the decode steps they were (not as one longer prefill, whose batched
    arithmetic rounds differently), so every stage's cache and the last stage's sampler
    (penalty history, seeded generator) end as they would have with no failure, and the
    text goes on as it would have.
    """
    model, request, ids, gen, timings, picked = (
        job.model, job.request, job.ids, job.gen, job.timings, job.picked
    )  # fmt: skip
    if gen.done and not request.echo:  # echo scores the prompt even with no token wanted
        for chunk in gen.finish():
            yield chunk
        return
    seq = uuid.uuid4().hex
    ring = Ring(here, model.manifest.model_id, seq, route)
    t0 = time.perf_counter()
    replay = list(picked)
    skip = reuse.keep if reuse else 0
    closed = False
    try:
        # the penalty looks at the whole prompt
        await ring.open(request.options, ids, reuse, scoring_of(job), request.constraint)
        token = await prefill(ring, ids[skip:])
        if request.echo and ring.scores is not None:
            gen.score_prompt(ring.scores.echo())
        t1 = time.perf_counter() - t0
        timings.setdefault("prefill_s", t1)
        log.info("seq %s: prefill of %d tokens (%d more cached) in %.3f s", seq[:12],
                 len(ids) - skip, skip, t1)  # fmt: skip
        for i, sent in enumerate(replay):
            if token != sent:  # arithmetic differs on the new plan: keep what was sent
                log.warning("seq %s: replay picked %d at %d, %d was sent", seq[:12], token,
                            i, sent)  # fmt: skip
            token = await ring.step([sent])
        if replay:
            log.info("seq %s: replayed %d tokens", seq[:12], len(replay))
        while not gen.done:
            chunks = gen.accept(token, None if ring.scores is None else ring.scores.picked)
            picked.append(token)
            # the stages compute the next token while this one's text goes out
            ahead = None if gen.done else asyncio.ensure_future(ring.step([token]))
            try:
                for chunk in chunks:
                    yield chunk
            except BaseException:  # the client went away: so does the step
                if ahead is not None:
                    ahead.cancel()
                    with contextlib.suppress(BaseException):
                        await ahead
                raise
            if ahead is None:
                break
            token = await ahead
        closed = True  # every stage keeps the caches: prompt and all ids fed but the last
        await ring.close(park=True)
        prefixes.park(seq, model.manifest.model_id, state.plan, [*ids, *picked[:-1]])
    except PipelineError as exc:
        if exc.code == F.ErrorCode.CACHE_MISS:
            raise CacheMiss(str(exc)) from exc
        if exc.code == F.ErrorCode.BUSY:
            raise StageBusy(str(exc)) from exc
        state.ready = False  # the next request re-checks every stage
        if exc.code == F.ErrorCode.NOT_FOUND:
            raise StageMissing(f"a stage is not loaded any more: {exc}") from exc
        if exc.code == F.ErrorCode.LINK_LOST:
            raise LinkLost(str(exc)) from exc
        raise NodeLost(str(exc)) from exc
    finally:
        if not closed:
            await ring.close()
    timings["decode_s"] = time.perf_counter() - t0 - timings.get("prefill_s", 0.0)
    log.info("seq %s: %d tokens in %.3f s (%s)", seq[:12], gen.generated,
             time.perf_counter() - t0, gen.reason)  # fmt: skip
    for chunk in gen.finish():
        yield chunk
