"""The coordinator: the shim a request reached turns it into a pipeline run.

Resolve the model (here, or from a peer that has it), plan the split over this node and the
live peers (shim/planner.py), have every node of the plan load its stage, then run the
generation loop (shim/decode.py): the prompt's ids go to stage 0, the last stage's picked ids
come straight back, and ``Generation`` (backend/generate.py) turns them into streamed text;
recover from what fails on the way (re-plan, replay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from llm_omninode.backend.generate import Chunk, Generation
from llm_omninode.backend.memory import compute_bytes, context_for, kv_bytes_per_position
from llm_omninode.backend.registry import ModelNotFound
from llm_omninode.backend.runtime import prompt_ids
from llm_omninode.backend.shards import Manifest, ManifestError
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.net import frames as F
from llm_omninode.net.frames import FrameType
from llm_omninode.net.quic import NetError
from llm_omninode.request import GenerationRequest, RequestError

from .decode import Here, Job, run_pass
from .errors import (
    Busy,
    CacheMiss,
    CoordinatorError,
    LinkLost,
    ModelUnknown,
    NodeLost,
    StageBusy,
    StageMissing,
)
from .load_progress import LoadProgress, ProgressHub, StageProgress
from .model_state import ModelText, PlanState
from .pipeline import LOST_AFTER, PROBE_TIMEOUT, Hop
from .planner import NodeCapacity, Plan, PlanError, plan_stages
from .prefixes import PrefixTable

if TYPE_CHECKING:
    from .node_parts import NodeParts

log = logging.getLogger("omninode_shim.coordinator")

LOAD_TIMEOUT = 900.0  # a stage load may include fetching its shards
DEFAULT_KEEP_ALIVE = 300.0  # seconds a model stays loaded after its last request (Ollama's 5m)
MAX_RECOVERIES = 3  # re-plans (lost node, unloaded stage) one generation may go through
# sequences of one model this coordinator runs at once (Ollama's NUM_PARALLEL); more wait in
# a queue of at most MAX_QUEUE, then "busy"
DEFAULT_PARALLEL = 4
MAX_QUEUE = 256
BUSY_RETRIES = 40  # a stage full of other coordinators' sequences: retry, 0.25..2 s apart


class Coordinator:
    def __init__(self, node: NodeParts, parallel: int = DEFAULT_PARALLEL) -> None:
        self.node = node
        self.here = Here(node.node_id, node.host, node.peers)  # what a decode pass uses
        self.parallel = parallel
        self.prefixes = PrefixTable()  # finished sequences whose caches the stages keep
        self._slots: dict[str, asyncio.Semaphore] = {}  # model id -> running sequences
        self._queued: dict[str, int] = {}  # model id -> requests waiting for a slot
        self._models: dict[str, ModelText] = {}
        self._aliases: dict[str, str] = {}  # names resolved through peers -> model id
        self._plans: dict[str, PlanState] = {}
        # model id -> when (time.time()) to unload its stages; None: never (keep_alive < 0)
        self._expiry: dict[str, float | None] = {}
        self._active: dict[str, int] = {}  # model id -> generations running now
        self._tasks: set[asyncio.Future] = set()  # unloads running in the background
        self._lock = asyncio.Lock()
        self.progress = ProgressHub()  # requests waiting for a model's load hear it here

    # ---- models -------------------------------------------------------------------------
    async def resolve(self, name: str) -> ModelText:
        """An alias or model id, known here or to a live peer (whose manifest is verified)."""
        registry = self.node.registry
        try:
            model_id: str | None = registry.resolve(name)
        except ModelNotFound:
            model_id = self._aliases.get(name)
        if model_id is not None and model_id in self._models:
            return self._models[model_id]
        if model_id is not None and registry.store.has_manifest(model_id):
            manifest = registry.store.get_manifest(model_id)
        else:
            manifest = await self._manifest_from_peers(name)
        text = ModelText.of(manifest)
        self._models[manifest.model_id] = text
        self._aliases[name] = manifest.model_id
        return text

    def alias_of(self, model_id: str) -> str | None:
        """A name of the model: a local alias, else the name a request found it by."""
        for table in (self.node.registry.aliases(), self._aliases):
            for alias, known in sorted(table.items()):
                if known == model_id and alias != model_id:
                    return alias
        return None

    def forget(self, model_id: str) -> None:
        """Drop what is cached of a model that was removed here."""
        self._models.pop(model_id, None)
        self._plans.pop(model_id, None)
        self._expiry.pop(model_id, None)
        for alias in [a for a, m in self._aliases.items() if m == model_id]:
            del self._aliases[alias]

    async def _manifest_from_peers(self, name: str) -> Manifest:
        refused: list[str] = []  # peers that had the model, but a manifest we cannot accept
        for peer in self.node.peers.live():
            try:
                conn = await self.node.peers.connection(peer.node_id)
                reply = await conn.request(F.request_frame(conn.next_id(), "manifest", model=name))
            except NetError as exc:  # not there (an error frame), or the peer is unreachable
                log.debug("no manifest of %s from %s: %s", name, peer.node_id[:16], exc)
                continue
            try:
                manifest = Manifest.from_json(reply.payload)
            except (ManifestError, ValueError) as exc:  # malformed, or metadata that lies
                log.warning("refused the manifest of %s from %s: %s", name, peer.node_id[:16],
                            exc)  # fmt: skip
                refused.append(f"{peer.name or peer.node_id[:16]}: {exc}")
                continue
            wanted = reply.header.get("model_id")
            if manifest.model_id != wanted:  # content addressing: the bytes must be the id
                log.warning("peer %s sent a manifest that is not %s", peer.node_id[:16], wanted)
                continue
            self.node.store.put_manifest(manifest)
            return manifest
        if refused:
            why = "; ".join(refused)
            raise CoordinatorError(f"model {name!r}: refused what peers sent: {why}")
        raise ModelUnknown(
            f"model {name!r} not found on this node nor on any live peer (pull it first)"
        )

    # ---- planning -----------------------------------------------------------------------
    def capacities(self, spec: ModelSpec) -> tuple[list[NodeCapacity], int]:
        """This node and every live peer, each with the bytes it can give to a stage's weights
        and KV cache (its --max-memory less its runtime and a stage's compute buffers), and
        the KV bytes a block of this model is planned for (see backend/memory.py)."""
        host = self.node.host
        context = context_for(spec, host.max_context)
        compute = compute_bytes(spec, context, last=True)
        kv_per_block = kv_bytes_per_position(spec) * context * host.sequences

        def room(budget: int, runtime: int) -> int:
            return max(1, budget - runtime - compute)

        me = NodeCapacity(
            self.node.node_id,
            room(self.node.memory_budget, host.runtime),
            self.node.speed,
            self.node.name,
        )
        others = [
            NodeCapacity(p.node_id, room(p.memory_budget, p.runtime), p.speed, p.name)
            for p in self.node.peers.live()
            if p.memory_budget > 0
        ]
        return [me, *others], kv_per_block

    def unsourced(self, manifest: Manifest) -> list[str]:
        """Names of the model's shards that neither this node nor any live peer holds: no
        plan can be loaded while there are any (a stage's node would have nowhere to fetch
        them from)."""
        held = set(self.node.held_shards())
        for peer in self.node.peers.live():
            held |= peer.shards
        return [s.name for s in manifest.shards if s.cid not in held]

    async def plan_for(self, model: ModelText) -> PlanState:
        nodes, kv_per_block = self.capacities(model.spec)
        node_ids = tuple(sorted(n.node_id for n in nodes))
        state = self._plans.get(model.manifest.model_id)
        if state is not None and state.nodes == node_ids:
            return state
        missing = self.unsourced(model.manifest)
        if missing:
            named = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise CoordinatorError(
                f"no live node holds {len(missing)} shard(s) of this model ({named}): "
                "the nodes that had them are gone"
            )
        try:
            plan = plan_stages(model.manifest, nodes, kv_bytes_per_block=kv_per_block)
        except PlanError as exc:
            raise CoordinatorError(str(exc)) from exc
        state = PlanState(plan, node_ids)
        self._plans[model.manifest.model_id] = state
        names = {n.node_id: n.name or n.node_id[:16] for n in nodes}
        log.info("plan for %s: %s", model.manifest.model_id[:16], "; ".join(
            f"{names[s.node_id]} [{s.start}, {s.end})" for s in plan.stages
        ))  # fmt: skip
        return state

    def plans(self) -> list[PlanState]:
        return list(self._plans.values())

    async def ensure_ready(self, model: ModelText, state: PlanState) -> None:
        if state.ready:
            return
        payload = model.manifest.to_json()

        async def load(stage, part: StageProgress) -> None:
            if stage.node_id == self.node.node_id:
                await self.node.host.ensure(
                    model.manifest, stage.start, stage.end, self.node.shard_sources, part.bytes
                )
                part.loaded = True
                return
            conn = await self.node.peers.connection(stage.node_id)
            frame = F.request_frame(
                conn.next_id(),
                "stage.load",
                payload,
                model=model.manifest.model_id,
                start=stage.start,
                end=stage.end,
                progress=True,  # shard bytes as they arrive, then the answer
            )
            async for reply in conn.stream(frame, timeout=LOAD_TIMEOUT):
                if reply.type == FrameType.STREAM_DATA:
                    part.bytes(*_fetched(reply.header))
                elif reply.type == FrameType.RESPONSE:
                    part.loaded = True
            if not part.loaded:
                raise CoordinatorError("the stage load ended without an answer")

        async with self.progress.loading(model.manifest.model_id, len(state.plan.stages)) as w:
            results = await asyncio.gather(
                *(load(s, w.stage(i)) for i, s in enumerate(state.plan.stages)),
                return_exceptions=True,
            )
        failures = [
            f"{s.node_id[:16]} [{s.start}, {s.end}): {r}"
            for s, r in zip(state.plan.stages, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failures:
            raise CoordinatorError("stages could not be loaded: " + "; ".join(failures))
        state.ready = True

    def route(self, plan: Plan) -> list[Hop]:
        hops = []
        for s in plan.stages:
            if s.node_id == self.node.node_id:
                host, port = self.node.advertised_host, self.node.port
            else:
                peer = self.node.peers.get(s.node_id)
                if peer is None:
                    raise CoordinatorError(f"node {s.node_id[:16]} of the plan is gone")
                host, port = peer.host, peer.port
            hops.append(Hop(s.node_id, host, port, s.start, s.end))
        return hops

    # ---- keep-alive ---------------------------------------------------------------------
    async def load(self, name: str, keep_alive: float | None = None) -> ModelText:
        """Plan and load a model on every node of its plan; it stays ``keep_alive`` seconds.
        A caller that goes away (its client did) does not stop the load: others may wait on it.
        """
        model = await self.resolve(name)
        await _shielded(self._plan_and_load(model))
        self._touch(model.manifest.model_id, keep_alive)
        return model

    async def _plan_and_load(self, model: ModelText) -> None:
        async with self._lock:  # one planning/loading round at a time
            state = await self.plan_for(model)
            await self.ensure_ready(model, state)

    def _touch(self, model_id: str, keep_alive: float | None) -> None:
        keep = DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive
        self._expiry[model_id] = None if keep < 0 else time.time() + keep

    def running(self) -> int:
        """Generations in progress or queued here, all models."""
        return sum(self._active.values())

    def loaded(self) -> list[tuple[ModelText, PlanState, float | None]]:
        """Models whose stages this coordinator has loaded: (model, plan, unload time)."""
        return [
            (self._models[model_id], state, self._expiry.get(model_id))
            for model_id, state in self._plans.items()
            if state.ready and model_id in self._models
        ]

    async def unload(self, name: str) -> bool:
        """Unload the model's stages on every node of its plan (those in use stay)."""
        model_id = name if name in self._plans else (await self.resolve(name)).manifest.model_id
        self._expiry.pop(model_id, None)
        state = self._plans.get(model_id)
        if state is None or not state.ready:
            return False
        state.ready = False

        async def drop(stage) -> None:
            if stage.node_id == self.node.node_id:
                self.node.host.unload(model_id, stage.start, stage.end)
                return
            conn = await self.node.peers.connection(stage.node_id)
            frame = F.request_frame(
                conn.next_id(), "stage.unload", model=model_id, start=stage.start, end=stage.end
            )
            await conn.request(frame)

        results = await asyncio.gather(
            *(drop(s) for s in state.plan.stages), return_exceptions=True
        )
        for stage, result in zip(state.plan.stages, results, strict=True):
            if isinstance(result, BaseException):  # that node unloads idle stages itself
                log.info("unload on %s failed: %s", stage.node_id[:16], result)
        log.info("unloaded %s", model_id[:16])
        return True

    async def expire(self) -> None:
        """Unload the models whose keep-alive has run out (the maintenance loop calls it)."""
        now = time.time()
        for model_id, deadline in list(self._expiry.items()):
            if deadline is not None and deadline <= now and self._active.get(model_id, 0) == 0:
                await self.unload(model_id)

    # ---- generation ---------------------------------------------------------------------
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
        model = await self.resolve(request.model)
        model_id = model.manifest.model_id
        try:
            ids = prompt_ids(model.tokenizer, model.template, request)
        except ValueError as exc:  # a template that fails safely, text it cannot encode
            raise RequestError(f"prompt: {exc}") from exc
        context = context_for(model.spec, self.node.max_context)
        if request.num_ctx is not None:
            context = min(context, request.num_ctx)

        try:
            gen = Generation(
                model.tokenizer, ids, max_tokens=request.max_tokens, stop=request.stop,
                context_length=context,
            )  # fmt: skip
        except ValueError as exc:  # empty prompt, or longer than the context
            raise RequestError(str(exc)) from exc
        with self.progress.listen(model_id, progress):
            await self.load(request.model, keep_alive)
        state = self._plans[model_id]
        timings["load_s"] = time.perf_counter() - t_load
        job = Job(model, request, ids, gen, timings)
        slot = self._slots.setdefault(model_id, asyncio.Semaphore(self.parallel))
        queued = self._queued.get(model_id, 0)
        if slot.locked() and queued >= MAX_QUEUE:
            raise Busy(f"{queued} requests are waiting for {request.model}: try again later")
        self._active[model_id] = self._active.get(model_id, 0) + 1  # queued ones count too
        try:
            self._queued[model_id] = queued + 1
            try:
                await slot.acquire()
            finally:
                self._queued[model_id] -= 1
            try:
                if (
                    state is not self._plans.get(model_id) or not state.ready
                ):  # changed while queued
                    with self.progress.listen(model_id, progress):
                        await self.load(request.model, keep_alive)
                    state = self._plans[model_id]
                async for chunk in self._recovering(job, state, keep_alive):
                    yield chunk
            finally:
                slot.release()
        finally:
            self._active[model_id] -= 1
            self._touch(model_id, keep_alive)  # the keep-alive counts from the end
            if keep_alive == 0:  # unload now, not at the next maintenance round
                self._tasks.add(task := asyncio.ensure_future(self.expire()))
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _recovering(
        self, job: Job, state: PlanState, keep_alive: float | None
    ) -> AsyncIterator[Chunk]:
        """Passes round the ring (shim/decode.py ``run_pass``) until one ends, through what
        can be recovered from: a prefix no longer cached, a full stage, a stage unloaded
        meanwhile, a lost node (re-plan and replay)."""
        model_id = job.model.manifest.model_id
        attempt, busy = 0, 0
        reuse = self.prefixes.take(model_id, state.plan, job.ids)
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
            self.node.metrics.failovers.inc()
            log.warning("%s: planning again and replaying the prompt and %d tokens", why,
                        len(job.picked))  # fmt: skip
            state.ready = False
            await self._reload(job, why, keep_alive)
            state = self._plans[model_id]
            reuse = None

    async def _reload(self, job: Job, why: str, keep_alive: float | None) -> None:
        """Plan and load again after a failure; a node of the new plan that turns out to be
        gone too (found while loading) is left out and the load tried again."""
        model_id = job.model.manifest.model_id
        for _ in range(MAX_RECOVERIES):
            live = {p.node_id for p in self.node.peers.live()}
            try:
                await self.load(job.request.model, keep_alive)
                return
            except CoordinatorError as exc:
                failed = self._plans.get(model_id)
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
        others = [s.node_id for s in plan.stages if s.node_id != self.node.node_id]
        peers = self.node.peers
        answers = await asyncio.gather(*(peers.alive(n, PROBE_TIMEOUT, LOST_AFTER) for n in others))
        lost = [n for n, ok in zip(others, answers, strict=True) if not ok]
        for node_id in lost:
            self.node.peers.mark_down(node_id, "did not answer after a failed step")
        return lost


def _fetched(header: dict) -> tuple[int, int]:
    """A peer's report of a stage's shard bytes (done, lacking), checked; (0, 0) if bad."""
    done, total = header.get("fetched"), header.get("total")
    if type(done) is int and type(total) is int and 0 <= done <= total <= 1 << 50:
        return done, total
    return 0, 0


async def _shielded(coro) -> object:
    """Await ``coro`` in a task of its own that outlives a cancelled caller; its failure is
    retrieved either way (no "exception was never retrieved")."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)
