"""Generations run from this node, the coordinator of each: a few at once per model (the rest
queue, then "busy"), each over its model's plan (shim/lifecycle.py loads it) by shim/decode.py's
``run_pass``: the prompt's ids go to stage 0, the last stage's picked ids come straight back,
and ``Generation`` (backend/generate.py) turns them into streamed text. What fails on the way
is recovered from here: a prefix no longer cached, a full stage, a stage unloaded meanwhile,
a lost node (re-plan and replay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import replace

from llm_omninode.backend.chat_template import prompt_ids
from llm_omninode.backend.generate import Chunk, Generation, split_chunk
from llm_omninode.backend.memory import context_for
from llm_omninode.backend.tool_calls import ToolCall, call_constraint, reply_stream
from llm_omninode.request import GenerationRequest, RequestError

from .decode import Here, Job, run_pass
from .errors import Busy, CacheMiss, CoordinatorError, LinkLost, NodeLost, StageBusy, StageMissing
from .lifecycle import ModelLifecycle
from .load_progress import LoadProgress
from .metrics import Metrics
from .model_state import PlanState
from .peers import PeerTable
from .pipeline import LOST_AFTER, PROBE_TIMEOUT, Hop
from .planner import Plan
from .prefixes import PrefixTable
from .stage_host import StageHost

log = logging.getLogger("omninode_shim.coordinator")

MAX_RECOVERIES = 3  # re-plans (lost node, unloaded stage) one generation may go through
# sequences of one model this coordinator runs at once (Ollama's NUM_PARALLEL); more wait in
# a queue of at most MAX_QUEUE, then "busy"
DEFAULT_PARALLEL = 4
MAX_QUEUE = 256
BUSY_RETRIES = 40  # a stage full of other coordinators' sequences: retry, 0.25..2 s apart


class Generations:
    """The generations this node coordinates. ``address`` is where peers reach this node
    (host, QUIC port): a stage here may be the next hop of a stage on a peer."""

    def __init__(
        self,
        models: ModelLifecycle,
        node_id: str,
        address: Callable[[], tuple[str, int]],
        host: StageHost,
        peers: PeerTable,
        metrics: Metrics,
        max_context: int | None = None,
        parallel: int = DEFAULT_PARALLEL,
        prefix_reuse: bool = True,
    ) -> None:
        self.models = models
        self.node_id = node_id
        self.address = address
        self.peers = peers
        self.metrics = metrics
        self.max_context = max_context
        self.here = Here(node_id, host, peers)  # what a decode pass uses
        self.parallel = parallel
        self.prefixes = PrefixTable()  # finished sequences whose caches the stages keep
        self.prefixes.enabled = prefix_reuse
        self._slots: dict[str, asyncio.Semaphore] = {}  # model id -> running sequences
        self._queued: dict[str, int] = {}  # model id -> requests waiting for a slot

    def running(self) -> int:
        """Generations in progress or queued here, all models."""
        return self.models.users()

    async def generate(
        self,
        request: GenerationRequest,
        timings: dict[str, float] | None = None,
        keep_alive: float | None = None,
        progress: Callable[[LoadProgress], Awaitable[None]] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the request's chunks. ``timings`` (if given) receives load_s (resolve, plan,
        load), prefill_s (prompt in, first id out) and decode_s (the rest), measured here;
        ``progress`` (if given) hears the model's load, if it has to be loaded.

        A prompt that cannot be served as sent raises RequestError (before any load); an
        unknown model ModelUnknown; anything else that fails CoordinatorError.
        """
        timings = {} if timings is None else timings
        t_load = time.perf_counter()
        model = await self.models.resolve(request.model)
        model_id = model.manifest.model_id
        try:
            ids = prompt_ids(model.tokenizer, model.template, request)
        except ValueError as exc:  # a template that fails safely, text it cannot encode
            raise RequestError(f"prompt: {exc}") from exc
        calls = reply_stream(model.template, request)  # its content and tool calls apart
        forced = call_constraint(model.template, request)  # a required call: its schema
        if forced is not None:
            request = replace(request, constraint=forced)
        context = context_for(model.spec, self.max_context)
        if request.num_ctx is not None:
            context = min(context, request.num_ctx)

        try:
            gen = Generation(
                model.tokenizer, ids, max_tokens=request.max_tokens, stop=request.stop,
                context_length=context,
            )  # fmt: skip
        except ValueError as exc:  # empty prompt, or longer than the context
            raise RequestError(str(exc)) from exc
        with self.models.progress.listen(model_id, progress):
            await self.models.load(request.model, keep_alive)
        state = self._plan(model_id)
        timings["load_s"] = time.perf_counter() - t_load
        job = Job(model, request, ids, gen, timings)
        slot = self._slots.setdefault(model_id, asyncio.Semaphore(self.parallel))
        queued = self._queued.get(model_id, 0)
        if slot.locked() and queued >= MAX_QUEUE:
            raise Busy(f"{queued} requests are waiting for {request.model}: try again later")
        self.models.hold(model_id)  # queued ones count too
        try:
            self._queued[model_id] = queued + 1
            try:
                await slot.acquire()
            finally:
                self._queued[model_id] -= 1
            try:
                if (
                    state is not self.models.plan_of(model_id) or not state.ready
                ):  # changed while queued
                    with self.models.progress.listen(model_id, progress):
                        await self.models.load(request.model, keep_alive)
                    state = self._plan(model_id)
                found: list[ToolCall] = []
                async for chunk in self._recovering(job, state, keep_alive):
                    for out in split_chunk(calls, chunk, found) if calls else (chunk,):
                        yield out
            finally:
                slot.release()
        finally:
            self.models.release(model_id, keep_alive)  # the keep-alive counts from the end

    def _plan(self, model_id: str) -> PlanState:
        """The plan the model was just loaded on."""
        state = self.models.plan_of(model_id)
        if state is None:  # forgotten meanwhile (removed from this node)
            raise CoordinatorError(f"model {model_id[:16]} was removed while loading")
        return state

    def route(self, plan: Plan) -> list[Hop]:
        hops = []
        for s in plan.stages:
            if s.node_id == self.node_id:
                host, port = self.address()
            else:
                peer = self.peers.get(s.node_id)
                if peer is None:
                    raise CoordinatorError(f"node {s.node_id[:16]} of the plan is gone")
                host, port = peer.host, peer.port
            hops.append(Hop(s.node_id, host, port, s.start, s.end))
        return hops

    async def _recovering(
        self, job: Job, state: PlanState, keep_alive: float | None
    ) -> AsyncIterator[Chunk]:
        """Passes round the ring (shim/decode.py ``run_pass``) until one ends, through what
        can be recovered from: a prefix no longer cached, a full stage, a stage unloaded
        meanwhile, a lost node (re-plan and replay)."""
        model_id = job.model.manifest.model_id
        attempt, busy = 0, 0
        # echo scores every prompt position: none may come from a cache
        reuse = None if job.request.echo else self.prefixes.take(model_id, state.plan, job.ids)
        while True:
            try:
                route = self.route(state.plan)
                async for chunk in run_pass(self.here, self.prefixes, job, state, route, reuse):
                    yield chunk
                return
            except CacheMiss as exc:  # compute the whole prompt after all
                log.info("%s", exc)
                reuse = None
                continue
            except StageBusy as exc:
                busy += 1
                if busy > BUSY_RETRIES:
                    raise CoordinatorError(f"generation failed: {exc}") from exc
                await asyncio.sleep(min(2.0, 0.25 * busy))
                continue
            except StageMissing as exc:
                why = str(exc)
            except NodeLost as exc:
                lost = await self._drop_unanswering(state.plan)
                if lost:
                    why = f"lost {', '.join(n[:16] for n in lost)} ({exc})"
                elif isinstance(exc, LinkLost):
                    why = f"a link broke, every node answers now ({exc})"
                else:  # every node answers: not a loss, so a replay would fail again
                    raise CoordinatorError(f"generation failed: {exc}") from exc
            if attempt == MAX_RECOVERIES:
                raise CoordinatorError(f"generation failed after {attempt} recoveries: {why}")
            attempt += 1
            self.metrics.failovers.inc()
            log.warning("%s: planning again and replaying the prompt and %d tokens", why,
                        len(job.picked))  # fmt: skip
            state.ready = False
            await self._reload(job, why, keep_alive)
            state = self._plan(model_id)
            reuse = None

    async def _reload(self, job: Job, why: str, keep_alive: float | None) -> None:
        """Plan and load again after a failure; a node of the new plan that turns out to be
        gone too (found while loading) is left out and the load tried again."""
        model_id = job.model.manifest.model_id
        for _ in range(MAX_RECOVERIES):
            live = {p.node_id for p in self.peers.live()}
            try:
                await self.models.load(job.request.model, keep_alive)
                return
            except CoordinatorError as exc:
                failed = self.models.plan_of(model_id)
                lost = await self._drop_unanswering(failed.plan) if failed else []
                if not set(lost) & live:  # nobody newly lost: the rest cannot take over
                    raise CoordinatorError(
                        f"generation failed: {why}; the remaining nodes cannot take over: {exc}"
                    ) from exc
                log.warning("loading the new plan failed (%s): planning again", exc)
        raise CoordinatorError(f"generation failed: {why}; the nodes kept failing while loading")

    async def _drop_unanswering(self, plan: Plan) -> list[str]:
        """Probe the plan's other nodes; those that do not answer are marked down (so the
        next plan leaves them out) and returned."""
        others = [s.node_id for s in plan.stages if s.node_id != self.node_id]
        peers = self.peers
        answers = await asyncio.gather(*(peers.alive(n, PROBE_TIMEOUT, LOST_AFTER) for n in others))
        lost = [n for n, ok in zip(others, answers, strict=True) if not ok]
        for node_id in lost:
            self.peers.mark_down(node_id, "did not answer after a failed step")
        return lost
